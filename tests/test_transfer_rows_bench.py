"""The transfer-rows benchmark (issue 21, item 6) runs end to end on tiny models; its figures come from the real
pairs (benchmarks/transfer_rows.json)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["labels-10", "kd-transfer", "labels-100", "kd-transfer-aug"]


def _run(*args, timeout=900):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "transfer_rows.py"), "--tiny", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_transfer_rows_tiny(tmp_path):
    out, report = tmp_path / "rows.json", tmp_path / "METHODS.md"
    report.write_text("# Methods\n\n## An earlier section\n\nkept\n")
    common = ("--out", tmp_path / "work", "--json", out, "--markdown", report)
    # text: one teacher for both seeds, its logits cached once (hfkd's teacher cache); vision: a teacher per seed
    log = _run("--seeds", 0, 1, "--rows", ",".join(ROWS), "--text_shared_teacher", *common)
    assert log.count("[text] teacher cache built") == 1 and "[text] seed 1 teacher reused" in log
    assert "[vision] teacher cache built" not in log
    results = json.loads(out.read_text())
    assert set(results["pairs"]) == {"text", "vision"}
    text_teachers = [results["pairs"]["text"]["seeds"][s]["teacher"] for s in ("0", "1")]
    assert text_teachers[0] == text_teachers[1] and text_teachers[0]["shared"]
    assert not results["pairs"]["vision"]["seeds"]["1"]["teacher"]["shared"]
    for name, entry in results["pairs"].items():
        assert set(entry["seeds"]) == {"0", "1"}
        for seed in entry["seeds"].values():
            assert 0.0 <= seed["teacher"]["accuracy"] <= 1.0
            assert list(seed["rows"]) == ROWS
            runs = seed["rows"]
            # (a) trains on the 10% only, (b) and (c) on the whole pool, all for the same number of steps
            assert runs["labels-100"]["train_rows"] == runs["kd-transfer"]["train_rows"]
            assert runs["labels-10"]["train_rows"] == round(runs["labels-100"]["train_rows"] * 0.1)
            assert len({r["steps"] for r in runs.values()}) == 1
        summary = results["summary"][name]
        assert summary["seeds"] == [0, 1] and set(summary["rows"]) == set(ROWS)
        gains = summary["comparisons"]["kd_vs_labels10"]
        by_seed = [entry["seeds"][s]["rows"] for s in ("0", "1")]
        expected = [r["kd-transfer"]["accuracy"] - r["labels-10"]["accuracy"] for r in by_seed]
        assert gains["gains"] == expected  # the paired gain per seed, from the per-row correctness kept in the JSON
        assert gains["compare"]["seeds"] == 2 and "rows" in gains["compare"]  # the hierarchical paired bootstrap
        assert summary["verdicts"]["gain_over_labels10"] in ("met", "not met")
        assert summary["verdicts"]["within_2pt_of_labels100"] in ("met", "not met")

    text = report.read_text()
    title = "## Transfer rows: 10% of the labels (issue 21, item 6)"
    assert text.startswith("# Methods\n\n## An earlier section\n\nkept\n") and text.count(title) == 1
    assert "### text pair" in text and "### vision pair" in text and "- Command: `" in text
    assert text.count("Target 1, (b) - (a) >= +3 pt: **") == 2

    # a rerun skips the runs already in the JSON and adds a seed; the section is replaced, still at the end
    report.write_text(text + "\n## A later section\n\nalso kept\n")
    log = _run("--seeds", 0, 2, "--pairs", "vision", *common)
    assert "seed 0: all rows already in" in log
    again = json.loads(out.read_text())
    assert again["pairs"]["vision"]["seeds"]["0"] == results["pairs"]["vision"]["seeds"]["0"]
    assert set(again["pairs"]["vision"]["seeds"]) == {"0", "1", "2"}
    text = report.read_text()
    assert text.count(title) == 1 and text.index("## A later section") < text.index(title)
    assert "also kept" in text


def test_vision_pair_as_the_table_runs_it(tmp_path):
    """The second edition's vision pair: an MLP student, a shared teacher trained on all the pool's labels, run live
    on rows held as tensors (no datasets.Dataset); the teacher's notes say what it saw, and only it sees 100%."""
    out = tmp_path / "rows.json"
    common = ("--pairs", "vision", "--vision_shared_teacher", "--no_teacher_cache", "vision", "--out", tmp_path / "w")
    _run(*common, "--vision_teacher_labels", "all", "--vision_student_type", "mlp", "--seeds", 0, "--json", out)
    entry = json.loads(out.read_text())["pairs"]["vision"]
    assert "all the pool's labels" in entry["notes"]["teacher"] and "MLP" in entry["notes"]["student"]
    runs = entry["seeds"]["0"]["rows"]
    assert entry["seeds"]["0"]["teacher"]["train_rows"] == runs["labels-100"]["train_rows"]  # the whole pool
    assert runs["labels-10"]["train_rows"] == round(runs["labels-100"]["train_rows"] * 0.1)  # the student: 10%
    # the ViT student builds and trains the same way
    vit = tmp_path / "vit.json"
    _run(*common, "--vision_student_type", "vit", "--seeds", 0, "--rows", "labels-10", "--json", vit)
    assert "ViT" in json.loads(vit.read_text())["pairs"]["vision"]["notes"]["student"]


def test_help_prints():
    # argparse %-formats help strings: a bare "10%" in one once made --help crash with a TypeError.
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "transfer_rows.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--vision_teacher_labels" in done.stdout and "labelled 10% only" in done.stdout
