"""The data-free benchmark (issue 23 item 1) runs end to end on tiny models; its figures come from the real pair
(`python benchmarks/data_free.py`, Fashion-MNIST and methods.py's ResNet teacher)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ["random", "labels", "kd-real", "deepinversion", "adversarial"]


def test_data_free_benchmark_tiny(tmp_path):
    out, report = tmp_path / "data_free.json", tmp_path / "DATA_FREE.md"
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "data_free.py"), "--tiny", "--seeds", "0,1"]
    command += ["--out", str(tmp_path / "work"), "--json", str(out), "--markdown", str(report)]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["meta"]["tiny"] and results["meta"].get("finished")
    assert list(results["rows"]) == ROWS
    for name, row in results["rows"].items():
        assert [run["seed"] for run in row["runs"]] == [0, 1], name
        assert all(0.0 <= run["accuracy"] <= 1.0 for run in row["runs"])
        assert math.isfinite(row["accuracy_mean"])
        if name != "random":
            assert all(run["student_steps"] >= 4 for run in row["runs"]) and "vs_random" in row
        if name not in ("random", "labels"):
            assert len(row["vs_labels"]["gains"]) == 2
    # Each seed synthesises its own DeepInversion set once, kept under --out; the random row never trains.
    synthesised = sorted(p.name for p in (tmp_path / "work").iterdir() if p.name.startswith("deepinversion-"))
    assert [name.split("-")[1] for name in synthesised] == ["seed0", "seed1"]
    assert all((tmp_path / "work" / name / "hfkd_synthesis.json").is_file() for name in synthesised)
    assert results["rows"]["deepinversion"]["runs"][0]["synthesis"]["config"]["num_images"] == 32
    text = report.read_text()
    assert "| deepinversion | DeepInversion images only" in text and "Adversarial: 1 round(s)" in text
