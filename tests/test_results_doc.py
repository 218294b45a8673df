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


def test_bench_rows_with_thread_counts_render_a_threads_column():
    """``tdqrt bench unet`` rows measured at several thread counts: each row shows its count, the header names the
    baseline, the machine line lists the counts."""
    gen = load_script("results_doc")
    seconds = lambda median: {"median": median, "iqr": 0.001}
    measured = [("ort-fp[ort-cpu]", 1, 0.4, 1.0), ("ort-int8[ort-cpu]", 1, 0.2, 2.0),
                ("ort-fp[ort-cpu]", 2, 0.25, 1.0), ("ort-int8[ort-cpu]", 2, 0.125, 2.0)]
    rows = [{"variant": v, "batch": 4, "threads": n, "seconds": seconds(t), "images_per_s": 4 / t,
             "speedup_vs_baseline": s} for v, n, t, s in measured]
    doc = {"kind": "bench", "results": rows, "method": {"baseline": "ort-fp[ort-cpu]"},
           "machine": {"cpu": "x", "cores": 4, "gpu": None, "load_average_1m": 0.5},
           "threads": {"torch_intra_op": [1, 2], "onnxruntime_intra_op": [1, 2]}}
    lines = gen.bench_table(doc).splitlines()
    assert lines[0] == "| variant | batch | threads | median ms | IQR ms | images/s | speedup vs ort-fp[ort-cpu] |"
    assert lines[2:6] == ["| ort-fp[ort-cpu] | 4 | 1 | 400 | 1 | 10 | 1 |",
                          "| ort-int8[ort-cpu] | 4 | 1 | 200 | 1 | 20 | 2 |",
                          "| ort-fp[ort-cpu] | 4 | 2 | 250 | 1 | 16 | 1 |",
                          "| ort-int8[ort-cpu] | 4 | 2 | 125 | 1 | 32 | 2 |"]
    assert lines[-1].endswith("threads: torch 1/2, ONNX Runtime 1/2.")
