"""The methods benchmark runs end to end on tiny models (its figures come from `make methods` on the real tasks)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("tweets", "fashion")


TWO_TEACHER_ROWS = {"kd-teacher-b": ["b"], "kd-two-teachers": ["a", "b"], "kd-two-teachers-confidence": ["a", "b"]}


def _run(*args, timeout=900):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "methods.py"), "--tiny", "--seeds", "0", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_methods_benchmark_tiny(tmp_path):
    out, report = tmp_path / "methods.json", tmp_path / "METHODS.md"
    _run("--out", tmp_path / "work", "--json", out, "--markdown", report)
    results = json.loads(out.read_text())
    assert results["meta"]["tiny"] and results["meta"].get("finished")

    always = {"labels", "kd", "dkd", "kd+rkd", "kd+sp", "kd+pkt", "kd+ls", "dml", *TWO_TEACHER_ROWS}
    assert [p["pair"] for p in results["pairs"]] == ["tweets", "fashion-resnet", "fashion-vit"]
    for pair in results["pairs"]:
        skipped = {s["row"] for s in pair["skipped"]}
        assert always <= set(pair["rows"]), pair["pair"]
        # a row per method that applies to this student; only rows whose term is not registered are left out
        assert set(pair["rows"]) | skipped == set(pair["applicable"]) and not set(pair["rows"]) & skipped
        assert all("not registered" in s["reason"] for s in pair["skipped"])
        for row in pair["rows"].values():
            assert len(row["runs"]) == 1
            run = row["runs"][0]
            assert 0.0 <= run["accuracy"] <= 1.0
            assert math.isfinite(run["median_step_s"]) and run["median_step_s"] > 0
            assert math.isfinite(run["cpu_per_step_s"]) and run["cpu_per_step_s"] >= 0
            assert math.isfinite(row["accuracy_mean"]) and math.isfinite(row["step_vs_kd"])
            if row["row"] != "labels":
                assert math.isfinite(row["gain_mean"])
        # the two-teacher rows: KD's settings, from teacher B, or from A and B mixed (fixed or confidence weights)
        assert pair["rows"]["kd"]["teachers"] == ["a"]
        for key, teachers in TWO_TEACHER_ROWS.items():
            row = pair["rows"][key]
            assert row["teachers"] == teachers
            combine = row["settings"].pop("teacher_combine", "weights")
            assert combine == ("confidence" if key.endswith("confidence") else "weights")
            assert row["settings"] == pair["rows"]["kd"]["settings"]
        # mutual learning: the student with a peer, and the peer against the same peer trained alone
        dml = pair["rows"]["dml"]
        assert dml["teachers"] == [] and 0.0 <= dml["runs"][0]["peer_alone_accuracy"][0] <= 1.0
        assert math.isfinite(dml["peer"]["gain_mean"]) and 0.0 <= dml["peer"]["accuracy_mean"] <= 1.0
        assert 0.0 <= pair["notes"]["teacher_b_accuracy"] <= 1.0
        assert pair["notes"]["teacher_b_record"]["seed"] == 43 and pair["notes"]["teacher_record"]["seed"] == 42
    text = report.read_text()
    assert "| method |" in text and "## fashion-vit" in text
    assert text.count("the same peer trained alone on the labels") == 3
    assert text.count("- Teacher B:") == 3 and "| KD from teachers A + B (confidence weights) |" in text
    assert all((tmp_path / "work" / f"{task}-teacher-b" / "methods_teacher.json").is_file() for task in TASKS)

    # --resume with --jobs 2 keeps every run of --json (the children read only their part files, cut from it), and
    # rows that do not read teacher B never train it (a fresh --out: no teacher is cached there)
    before = json.loads(out.read_text())
    _run("--jobs", 2, "--resume", "--rows", "labels,kd", "--out", tmp_path / "work2", "--json", out)
    after = json.loads(out.read_text())
    assert not any((tmp_path / "work2" / f"{task}-teacher-b").exists() for task in TASKS)
    assert after["meta"].get("finished") and len(after["meta"]["resumed"]) == 1
    assert [p["pair"] for p in after["pairs"]] == [p["pair"] for p in before["pairs"]]
    for old, new in zip(before["pairs"], after["pairs"], strict=True):
        assert {k: r["runs"] for k, r in new["rows"].items()} == {k: r["runs"] for k, r in old["rows"].items()}
        assert new["notes"]["teacher_b_record"] == old["notes"]["teacher_b_record"]  # kept: it taught the rows


def test_methods_benchmark_transfer_pair_tiny(tmp_path):
    # Issue 21's second edition: the text pair with 10% of the labels. The distilling rows train on the whole pool
    # (the other 90% as transfer rows), the labels row on the labelled rows alone, for the same number of steps.
    out = tmp_path / "methods.json"
    rows = "labels,kd,kd+minilm,kd+minilm-fitted,dml"
    _run("--task", "tweets-transfer", "--rows", rows, "--teacher-cache", "--out", tmp_path / "work", "--json", out)
    (pair,) = json.loads(out.read_text())["pairs"]
    assert pair["pair"] == "tweets-transfer" and pair["budget"]["max_steps"] == pair["steps_per_run"] == 12
    runs = {key: row["runs"][0] for key, row in pair["rows"].items()}
    assert set(runs) == {"labels", "kd", "kd+minilm-fitted", "dml"}
    assert runs["labels"]["train_rows"] == 10 and runs["kd"]["train_rows"] == runs["dml"]["train_rows"] == 96
    assert all(run["steps"] == 12 for run in runs.values())
    # --teacher-cache: teacher A's outputs come from one cache per pair, except for rows that read attention maps
    # (MiniLM) or learn without teacher A (the labels row, mutual learning)
    from_cache = {key for key, run in runs.items() if run.get("teacher_from_cache")}
    assert from_cache == {"kd"}
    assert (tmp_path / "work" / "tweets-transfer-teacher-cache" / "hfkd_cache.json").is_file()
    # the earlier default of 12 relation heads cannot divide the student's width: left out, with the reason
    assert pair["skipped"] == [{"row": "kd+minilm", "reason": pair["skipped"][0]["reason"]}]
    assert "do not divide the student's width 32" in pair["skipped"][0]["reason"]
    assert "labelled rows" in pair["budget_text"] and pair["notes"]["teacher_record"]["seed"] == 0
    assert (tmp_path / "work" / "tweets-transfer-teacher" / "tokenizer.json").is_file()


def test_a_searched_row_runs_at_the_values_its_search_chose_on_labelled_training_rows(tmp_path):
    # Issue 21, item 6: the searched setting. The trials are scored on labelled training rows held out of the
    # pool (transfer rows never score a trial), and the searched row then trains on the whole pool.
    out, report = tmp_path / "methods.json", tmp_path / "methods.md"
    _run(
        "--task", "tweets-transfer", "--rows", "labels,kd", "--search", "2", "--search-fraction", "0.3",
        "--out", tmp_path / "work", "--json", out, "--markdown", report,
    )  # fmt: skip
    (pair,) = json.loads(out.read_text())["pairs"]
    search = pair["searches"]["kd"]
    assert search["validation_rows"] == 3 and search["fit_rows"] == 96 - 3  # ceil(0.3 x 10 labelled rows)
    assert [t["trial"] for t in search["trials"]] == [0, 1]
    assert all(round(3 * t["objective"]) == pytest.approx(3 * t["objective"]) for t in search["trials"])
    best = max(search["trials"], key=lambda t: t["objective"])
    assert search["chosen"] == best["values"] and set(search["chosen"]) == {
        "temperature",
        "task_weight",
        "logit_weight",
    }
    row = pair["rows"]["kd@searched"]
    assert row["settings"]["temperature"] == pytest.approx(search["chosen"]["temperature"])
    assert row["settings"]["task_weight"] == pytest.approx(search["chosen"]["task_weight"])
    assert row["runs"][0]["train_rows"] == 96 and row["runs"][0]["steps"] == 12
    assert pair["rows"]["kd"]["settings"]["temperature"] == 2.0  # the row itself keeps its own values
    text = report.read_text()
    assert row["title"].endswith(", searched") and f"| {row['title']} | searched (2 trials): temperature" in text
    assert "Search for kd: 2 trials" in text and "3 labelled training rows held out" in text

    # Runs split over part files (one search per process) merge back with their searches and searched rows.
    merge_parts = _methods_module().merge_parts
    results = json.loads(out.read_text())
    first, second = json.loads(json.dumps(results)), json.loads(json.dumps(results))
    del first["pairs"][0]["searches"], first["pairs"][0]["rows"]["kd@searched"]
    second["pairs"][0]["rows"] = {"kd@searched": second["pairs"][0]["rows"]["kd@searched"]}
    (merged,) = merge_parts([first, second])["pairs"]
    assert list(merged["rows"]) == ["labels", "kd", "kd@searched"] and merged["searches"] == pair["searches"]
    assert merged["rows"]["kd@searched"]["runs"] == row["runs"]
    (plain,) = merge_parts([first])["pairs"]
    assert "searches" not in plain and list(plain["rows"]) == ["labels", "kd"]


def _methods_module():
    """benchmarks/methods.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("methods_benchmark", os.path.join(ROOT, "benchmarks", "methods.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--search", "-1"], "--search must be a number of trials"),
        (["--search", "2", "--search-rows", "labels"], "--search-rows"),
        (["--search", "2", "--search-fraction", "1"], "--search-fraction must lie in (0, 1)"),
    ],
)
def test_bad_search_flags_are_refused_by_the_parser(tmp_path, flags, message):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "methods.py"), "--tiny", *flags],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_teacher_cache_with_parallel_units_is_refused_before_anything_runs(tmp_path):
    # Two seeds of one task run at once would build the same pair's cache together: refused by the parser.
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "methods.py"), "--tiny", "--teacher-cache", "--jobs", "2"]
        + ["--out", str(tmp_path / "work"), "--json", str(tmp_path / "m.json")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        check=False,
    )
    assert done.returncode == 2 and "--teacher-cache runs in one process" in done.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "m.json").exists()
