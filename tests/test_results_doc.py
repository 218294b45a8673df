"""docs/results.md is generated from docs/data/*.json by scripts/results_doc.py: every stored file renders, every
row of it reaches the document, and the committed document is the generator's current output."""
import json
from pathlib import Path

from _scripts import ROOT, load_script


def test_every_result_file_renders_all_its_rows():
    gen = load_script("results_doc")
    paths = sorted((ROOT / "docs" / "data").glob("*.json"))
    assert paths
    text = gen.render(paths)
    for path in paths:
        doc = json.loads(path.read_text())
        assert f"## {doc['title']}" in text
        if doc["kind"] == "bench":
            names = [r["variant"] for r in doc["results"]]
        elif doc["kind"] == "validate-margins":  # every model's good and broken graphs, with the rule's verdict
            names = [f"| {Path(m).name} | {b['node'].split('/')[0]} x{b['factor']:g} |"
                     for m, rows in doc["models"].items() for b in rows["broken"]]
            good = [line for line in text.splitlines() if any(line.startswith(f"| {Path(m).name} | good |")
                                                                for m in doc["models"])]
            assert len(good) == len(doc["models"]) and all(line.endswith("| passes |") for line in good), good
        else:
            names = doc["rows"]
        for name in names:
            shown = name.split("|")[0].strip() if doc["kind"] == "d2" else name
            assert shown in text, (path.name, name)


def test_committed_results_doc_is_up_to_date():
    gen = load_script("results_doc")
    expected = gen.render(sorted((ROOT / "docs" / "data").glob("*.json")))
    assert (ROOT / "docs" / "results.md").read_text() == expected, "run `python scripts/results_doc.py`"
