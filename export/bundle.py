"""``tdqrt export``: quantized checkpoint (+ its FP checkpoint, + optional D² statistics) -> a bundle directory.

The bundle (read by :mod:`tdqrt.engines.bundle`, which needs none of this code) holds ``unet.onnx`` (the INT8
Q/DQ graph in the flavour of ``ExportConfig.target`` — ``trt`` or ``ort-cpu`` —, ``unet.onnx.data`` beside it
when large), ``unet_fp.onnx`` (the FP reference with the same signature),
``lint.json`` (the lint report of both graphs), ``d2.npz`` + ``d2.json`` when D² statistics are given,
``decoder.onnx`` for a latent model (the FP32 decoder of the autoencoder the quant card records:
:mod:`tdqrt.export.decoder`), ``tdqrt_data_loader.py`` + ``validation_inputs.npz`` + ``fake_quant_outputs.json``
(Polygraphy's data-loader script over the calibration inputs ``tdqrt validate`` uses and the reference outputs:
:mod:`tdqrt.export.data_loader`; when the calibration set is there), and
``manifest.json`` last: format tag and version, sha256 and size of every file, the model description, quant and
export settings, schedule, D² sampler settings, sources (paths + sha256) and tool versions.

Atomicity (:func:`tdqrt.engines.artifacts.atomic_dir`): everything is written into a temporary directory beside the
target and renamed onto it at the end; a
failure (export error, lint error, Ctrl-C) removes the temporary directory, so a half bundle never appears under
the real name. An existing bundle at the target is replaced only once the new one is complete, with everything
made from it inside its folder (``ort/``, ``trt/``, ``validation/``: built for the old graphs); a warning names
what was replaced. A directory that is not a bundle is never replaced.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

from tdqrt.calibration.quant.api import load_model_dir
from tdqrt.calibration.quant.checkpoint import QUANT_FORMAT
from tdqrt.calibration.resolve import open_recorded
from tdqrt.engines.artifacts import atomic_dir, read_json, sha256_file, versions, write_json_atomic
from tdqrt.calibration.models.autoencoder import LatentDecoder
from tdqrt.engines.bundle import (BUNDLE_FORMAT, BUNDLE_VERSION, DECODER_FILE, MANIFEST_FILE, UNET_FILE, UNET_FP_FILE,
                                  is_bundle_dir, open_bundle)
from tdqrt.engines.errors import ArtifactError, ConfigError
from tdqrt.engines.ort import saturation_warning
from tdqrt.calibration.quant.calib_set import CalibrationSet
from tdqrt.export.decoder import export_decoder
from tdqrt.export.data_loader import INPUTS_FILE, REFERENCE_FILE, SCRIPT_FILE, write_data_loader
from tdqrt.export.exporter import ExportConfig, ExportedModel, export_fp, export_quantized, save_onnx
from tdqrt.export.lint import LintReport, get_flavour, lint_model
from tdqrt.runtime.d2 import JSON_FILE as D2_JSON
from tdqrt.runtime.d2 import NPZ_FILE as D2_NPZ
from tdqrt.runtime.d2 import D2Table

LINT_FILE = "lint.json"

RATIO_IN = {"div": "Div(s_t/s_ref)", "mul": "Mul(r_t = s_ref/s_t)"}


def graph_description(ratio_op: str, quantize_outputs: bool) -> str:
    """One line per layer kind of the exported graph, for the manifest."""
    out = " -> Q(s_out) -> DQ(s_out)" if quantize_outputs else ""
    act = "Q(s_ref, uint8 zp 128) -> DQ" if quantize_outputs else "Q(s_ref) -> DQ(s_ref)"
    return (f"x -> {RATIO_IN[ratio_op]} -> {act} -> Conv(DQ(W_int8), no bias){out} -> Mul(s_t/s_ref) -> Add(bias); "
            f"static layers: x -> {act.replace('s_ref', 's')} -> Conv(DQ(W_int8), bias){out}; Linear layers: "
            f"MatMul(DQ(x), DQ(W_int8 [K, N])){out} -> [Mul(s_t/s_ref)] -> Add(bias)")


def _role(name: str) -> str:
    return {UNET_FILE: "int8 Q/DQ UNet", UNET_FP_FILE: "FP reference UNet", LINT_FILE: "lint report",
            D2_NPZ: "D² statistics", D2_JSON: "D² statistics card", UNET_FILE + ".data": "unet.onnx external data",
            UNET_FP_FILE + ".data": "unet_fp.onnx external data",
            DECODER_FILE: "FP32 latent decoder (latents -> images in [-1, 1])",
            DECODER_FILE + ".data": "decoder.onnx external data", SCRIPT_FILE: "Polygraphy data-loader script",
            INPUTS_FILE: "validation inputs of the data-loader script",
            REFERENCE_FILE: "fake-quant outputs on the validation inputs (Polygraphy RunResults)"}.get(name, "")


def _check_d2(table: D2Table, d2_dir: Path, quant_sha: str, schedule: dict) -> None:
    recorded = table.settings.quant_model_sha256
    if recorded and recorded != quant_sha:
        raise ConfigError(f"the D² statistics in {d2_dir} were collected for another quantized model (sha256 "
                          f"{recorded[:12]}…, exporting {quant_sha[:12]}…); run `tdqrt d2-stats` for this one")
    if table.settings.schedule.to_dict() != schedule:
        raise ConfigError(f"the D² statistics in {d2_dir} were collected with schedule "
                          f"{table.settings.schedule.to_dict()}, the model uses {schedule}; re-collect them")


def _lint(path: Path, config: ExportConfig, failed_report: Path) -> LintReport:
    report = lint_model(path, config.target, polygraphy=config.polygraphy, file=path.name)
    if not report:
        report.save(failed_report)
        raise ArtifactError(f"the exported {path.name} fails lint ({len(report.errors)} error(s); report written to "
                            f"{failed_report}):\n{report.format(max_findings=10)}")
    return report


def _prepare_target(out: Path) -> Optional[str]:
    """Refuse a target that is not (empty or) a bundle; for an existing bundle, the line that says what the
    new bundle replaces: the bundle itself and everything made from it inside its folder (``ort/``, ``trt/``
    engines, ``validation/`` reports...), which would not match the new graphs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        return None
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; choose another --out")
    entries = sorted(out.iterdir())
    if entries and not is_bundle_dir(out):
        raise ArtifactError(f"{out} is a non-empty directory that is not a tdqrt bundle; refusing to replace it. "
                            "Choose another --out or remove it")
    if not entries:
        return None
    own = set(read_json(out / MANIFEST_FILE).get("files", {})) | {MANIFEST_FILE}
    derived = [p.name + ("/" if p.is_dir() else "") for p in entries if p.name not in own]
    return (f"replacing the existing bundle at {out}" + (f" together with what was made from it there: "
                                                          f"{', '.join(derived)}" if derived else "")
            + " (export elsewhere with another --out to keep them)")


def export_bundle(quant_dir: Union[str, os.PathLike], out: Union[str, os.PathLike],
                  config: ExportConfig = ExportConfig(), *, d2_stats: Optional[Union[str, os.PathLike]] = None,
                  fp_dir: Optional[Union[str, os.PathLike]] = None,
                  calib_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """Export the quantized checkpoint in ``quant_dir`` into the bundle directory ``out``; returns ``out``.

    ``fp_dir`` overrides where the FP checkpoint named by the quant card lives (it must still have the recorded
    sha256). ``d2_stats``: a directory written by ``tdqrt d2-stats`` for this quantized model. ``calib_dir``: the
    calibration set whose inputs set the output grids of a target that quantizes outputs (``ort-cpu``; default:
    the set the quant card records).
    """
    out = Path(out)
    rec = load_model_dir(quant_dir)
    if rec.card.get("format") != QUANT_FORMAT:
        raise ConfigError(f"{quant_dir} is an FP checkpoint; export needs a quantized one (run `tdqrt calibrate`)")
    fp = open_recorded(rec.card["fp_model"], fp_dir, "FP model", f"the quantized checkpoint {quant_dir}", "--fp")
    schedule = rec.schedule.to_dict()
    table = None
    if d2_stats is not None:
        table = D2Table.load(d2_stats)
        _check_d2(table, Path(d2_stats), rec.sha256, schedule)
    qm = rec.model
    flavour = get_flavour(config.target)
    calib = None
    if flavour.quantize_outputs:
        calib = calib_dir if calib_dir is not None else (rec.card.get("calibration") or {}).get("path")
        if calib is None or not Path(calib).is_dir():
            raise ArtifactError(f"target {config.target} sets its output grids from calibration inputs, and the set "
                                f"{calib} recorded by {quant_dir} is not there; pass one with --calib")
    record = rec.card.get("autoencoder")
    decoder = None if record is None else LatentDecoder.from_record(record)  # refuses changed/missing weights
    replacing = _prepare_target(out)

    failed_report = out.parent / f"{out.name}.lint-failed.json"
    with atomic_dir(out) as tmp:
        files: list[str] = []
        q: ExportedModel = export_quantized(qm, config, calib=calib)
        files += save_onnx(q.model, tmp / UNET_FILE, external_data_mb=config.external_data_mb)
        reports = {}
        if config.lint:
            reports[UNET_FILE] = _lint(tmp / UNET_FILE, config, failed_report)
        signature = {"unet": q.signature}
        if config.fp_reference:
            f = export_fp(fp.model, rec.schedule.num_train_timesteps, config)
            files += save_onnx(f.model, tmp / UNET_FP_FILE, external_data_mb=config.external_data_mb)
            if config.lint:
                reports[UNET_FP_FILE] = _lint(tmp / UNET_FP_FILE, config, failed_report)
            signature["unet_fp"] = f.signature
        decoder_entry = None
        if decoder is not None:
            written, info = export_decoder(decoder, (qm.in_channels, qm.image_size, qm.image_size),
                                           tmp / DECODER_FILE, config)
            files += written
            signature["decoder"] = info.pop("signature")
            decoder_entry = {"record": record} | info
        if reports:
            merged = LintReport(target=config.target)
            for r in reports.values():
                merged.merge(r)
            merged.save(tmp / LINT_FILE)
            files.append(LINT_FILE)
        if table is not None:
            for name in (D2_NPZ, D2_JSON):
                shutil.copy2(Path(d2_stats) / name, tmp / name)
                files.append(name)
        null = getattr(qm, "null_label", None)
        loader = None
        validation_calib = calib_dir if calib_dir is not None else (rec.card.get("calibration") or {}).get("path")
        if validation_calib is not None and Path(validation_calib).is_dir():
            loader = write_data_loader(tmp, CalibrationSet(validation_calib), q.signature, fp.model, qm,
                                       target=config.target, null_label=null)
            files += [INPUTS_FILE, SCRIPT_FILE, REFERENCE_FILE]
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size,
                             "role": _role(name)} for name in files},
            "model": {"spec": rec.card["model"], "num_classes": int(qm.num_classes or 0),
                      "null_label": None if null is None else int(null), "image_size": int(qm.image_size),
                      "in_channels": int(qm.in_channels), "min_timestep": int(getattr(qm, "min_timestep", 0))} | (
                {} if getattr(qm, "cond_shape", None) is None else {"cond_shape": [int(d) for d in qm.cond_shape]}),
            "signature": signature,
            "quant": {"config": rec.card["quant"], "options": rec.card.get("options", {}),
                      "qdq": q.plan.summary() if q.plan is not None else None},
            "export": config.to_dict() | {"flavour": flavour.description,
                                          "graph": graph_description(config.ratio_op, flavour.quantize_outputs),
                                          "layer_nodes": {k: v["nodes"] for k, v in q.layers.items()}},
            "schedule": schedule,
            "decoder": decoder_entry,
            # a text-to-image model's text encoder (path + sha256 of its weights and tokenizer): `tdqrt sample`
            # encodes the prompts with it in float, outside the INT8 UNet
            "text_encoder": rec.card.get("text_encoder"),
            "d2": None if table is None else {"settings": table.settings.to_dict(),
                                              "timesteps": table.timesteps.tolist(),
                                              "num_channels": table.num_channels},
            "sources": {"quant_model": {"path": str(Path(quant_dir).resolve()), "sha256": rec.sha256},
                        "fp_model": {"path": str(Path(fp.path).resolve()), "sha256": fp.sha256}}
                       | ({"output_grid_calibration": str(Path(calib).resolve())} if calib is not None else {}),
            "data_loader": loader,
            "lint": {name: {"clean": bool(r), "errors": len(r.errors), "warnings": len(r.warnings),
                            "checks": r.checks} for name, r in reports.items()},
            "versions": versions(),
        }
        write_json_atomic(tmp / MANIFEST_FILE, manifest)
    if failed_report.exists():
        failed_report.unlink()
    if warning := saturation_warning(open_bundle(out, verify=False)):
        warnings.warn(warning, stacklevel=2)
    if replacing:  # said once the new bundle is in place: a failed export replaces nothing
        warnings.warn(replacing, stacklevel=2)
    return out
