"""The dependency direction of the README's layout: tools -> export -> calibration -> runtime -> engines.

An import may only point down that list (or stay inside its own layer), and a deployment host that imports
``tdqrt.runtime`` / ``tdqrt.engines`` must not pull in calibration or export code (nor training-only libraries).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["tools", "export", "calibration", "runtime", "engines"]  # top imports bottom, never the reverse


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}; use absolute tdqrt.* imports"
            found.append((node.lineno, node.module or ""))
    return found


def _source_files():
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            yield layer, path


def _is_stub(node: ast.AST) -> bool:
    """A function whose body is only a docstring, ``pass``, ``...`` or ``raise NotImplementedError``."""
    body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return all(isinstance(n, ast.Pass) or (isinstance(n, ast.Raise) and "NotImplementedError" in ast.unparse(n))
               for n in body)


def test_every_layer_has_code():
    """Each layer is a package with modules of its own, and every module defines functions or classes with a body:
    an empty layer, a module of only imports or a docstring, or a stub function (``pass``, ``...``,
    ``raise NotImplementedError``) fails."""
    for layer in LAYERS:
        assert (ROOT / layer / "__init__.py").is_file(), f"{layer}/ is not a package"
        modules = [p for p in sorted((ROOT / layer).rglob("*.py")) if p.name not in ("__init__.py", "__main__.py")]
        assert modules, f"{layer}/ has no modules besides __init__.py"
        for path in modules:
            tree = ast.parse(path.read_text(), str(path))
            defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            assert defs, f"{path.relative_to(ROOT)} defines no function or class"
            stubs = [n.name for n in defs if not isinstance(n, ast.ClassDef) and _is_stub(n)]
            assert not stubs, f"{path.relative_to(ROOT)}: stub functions {stubs}"


@pytest.mark.parametrize("layer,path", list(_source_files()), ids=lambda v: str(v.relative_to(ROOT)) if isinstance(v, Path) else v)
def test_imports_point_down(layer, path):
    rank = LAYERS.index(layer)
    for lineno, module in _imported_modules(ast.parse(path.read_text(), str(path))):
        parts = module.split(".")
        if parts[0] in LAYERS:
            pytest.fail(f"{path.relative_to(ROOT)}:{lineno} imports bare `{module}`; use `tdqrt.{module}`")
        if parts[0] != "tdqrt":
            continue
        assert len(parts) > 1 and parts[1] in LAYERS, f"{path}:{lineno}: unknown tdqrt module {module}"
        target = LAYERS.index(parts[1])
        assert target >= rank, (
            f"{path.relative_to(ROOT)}:{lineno} imports {module}: `{layer}` may only import "
            f"{LAYERS[rank:]} (direction {' -> '.join(LAYERS)})"
        )


FORBIDDEN_ON_DEPLOYMENT = ("tdqrt.calibration", "tdqrt.export", "tdqrt.tools", "diffusers", "sklearn",
                           "torch_fidelity", "onnx_graphsurgeon")


def _loaded_forbidden(modules: list[str]) -> str:
    code = (
        "import sys, importlib\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in {FORBIDDEN_ON_DEPLOYMENT!r})]\n"
        "print(','.join(sorted(bad)))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("layer", ["runtime", "engines"])
def test_deployment_imports_stay_lean(layer):
    """Importing the package and every one of its modules loads no calibration/export/tools code."""
    modules = [f"tdqrt.{layer}"] + [f"tdqrt.{layer}.{p.stem}" for p in sorted((ROOT / layer).glob("*.py"))
                                    if p.stem != "__init__"]
    assert _loaded_forbidden(modules) == "", f"importing {modules} loaded training-side modules"


def test_no_bare_stage_packages_installed():
    """The wheel maps folders into tdqrt.*; a bare `runtime` or `export` package must not be importable from it."""
    code = "import importlib.util as u; print([n for n in ('runtime','export','engines','calibration','tools') if u.find_spec(n) and 'tdqrt' in str(u.find_spec(n).origin or '')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout.strip()
    assert out == "[]", out
