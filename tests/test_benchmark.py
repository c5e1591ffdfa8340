"""The benchmark script runs end to end on tiny models (its figures come from `make bench` on the real pairs)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-memory reset needs Linux /proc")
def test_benchmark_script_on_tiny_models(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_distill.py"),
            "--tiny",
            "--steps",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    pairs = {r["pair"]: r for r in results["pairs"]}
    assert set(pairs) == {"minilm", "smollm2"}
    for r in pairs.values():
        assert r["ratio_online"] > 0 and r["ratio_cached"] > 0
    lm = pairs["smollm2"]
    assert lm["online_chunked"] and lm["cache_logits"]["mode"] == "topk"
    assert lm["trl"]["max_relative_loss_difference"] < 1e-4  # the same loss as TRL on the same batches
    assert {m["variant"] for m in results["memory"]} >= {"student", "hfkd", "hfkd-full-logits", "trl-gkd"}
    assert "| pair | batch |" in done.stdout


def test_profile_script_reports_hfkds_own_python_time_per_step():
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "profile_step.py"),
            *("--pair", "minilm", "--variant", "online", "--tiny", "--python", "--steps", "2", "--rows", "5"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "ms |" in line]
    assert 1 <= len(rows) <= 5 and any("step.py" in row for row in rows)  # the step's own functions are listed
    assert "hfkd's own Python per step:" in done.stdout
