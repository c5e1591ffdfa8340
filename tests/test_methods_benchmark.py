"""The methods benchmark runs end to end on tiny models (its figures come from `make methods` on the real tasks)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_methods_benchmark_tiny(tmp_path):
    out, report = tmp_path / "methods.json", tmp_path / "METHODS.md"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "methods.py"),
            "--tiny",
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "work"),
            "--json",
            str(out),
            "--markdown",
            str(report),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["tiny"] and results["meta"].get("finished")

    always = {"labels", "kd", "dkd", "kd+rkd", "kd+sp", "kd+pkt", "kd+ls"}
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
    text = report.read_text()
    assert "| method |" in text and "## fashion-vit" in text
