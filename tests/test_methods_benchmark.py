"""The methods benchmark runs end to end on tiny models (its figures come from `make methods` on the real tasks)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


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

    import methods  # benchmarks/methods.py: which rows apply to which student, with the terms registered now

    registered = set(results["meta"]["terms_registered"])
    assert [p["pair"] for p in results["pairs"]] == ["tweets", "fashion-resnet", "fashion-vit"]
    for pair in results["pairs"]:
        expected = {m.key for m in methods.METHODS if pair["kind"] in m.kinds and set(m.terms) <= registered}
        assert set(pair["rows"]) == expected, pair["pair"]
        assert {s["row"] for s in pair["skipped"]} == {
            m.key for m in methods.METHODS if pair["kind"] in m.kinds and not set(m.terms) <= registered
        }
        for row in pair["rows"].values():
            assert len(row["runs"]) == 1
            run = row["runs"][0]
            assert 0.0 <= run["accuracy"] <= 1.0
            assert math.isfinite(run["median_step_s"]) and run["median_step_s"] > 0
            assert math.isfinite(row["accuracy_mean"]) and math.isfinite(row["step_vs_kd"])
            if row["row"] != "labels":
                assert math.isfinite(row["gain_mean"])
    text = report.read_text()
    assert "| method |" in text and "## fashion-vit" in text
