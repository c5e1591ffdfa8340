"""The cache size benchmark runs end to end on tiny models and measures what it says (its figures come from the
SmolLM2 pair: `make bench-cache`)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cache_tiny(tmp_path):
    out = tmp_path / "cache.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_cache.py"), "--tiny", "--threads", "1"]
        + ["--json", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["targets"] == {"bytes_per_token": 150, "grad_cosine": 0.98}
    setup, sizes, gradients = results["setup"], results["sizes"], results["gradients"]
    # Two students, each measured on every format with both tails; the first is the one the target is judged on.
    assert list(results["students"]) == ["2", "3"] and gradients == results["students"]["2"]
    assert results["students"]["3"].keys() == sizes.keys()
    verdict = results["verdict"]
    assert verdict["cosine_T2"] == gradients["compact k=48"]["2.0"]["logits_min"]
    assert verdict["uniform_cosine_T2"] == gradients["compact k=48"]["2.0"]["uniform_tail_logits_min"]
    assert setup["tokens"] == setup["batches"] * setup["batch"] * setup["length"] > 0
    assert setup["default"] == "compact k=48" and "float k=128 float16" in sizes
    # The layouts: k * (2 + 1) + 4 bytes compact (uint16 ids for 512 classes), k * 4 + (k + 1) * 2 in float16.
    assert sizes["compact k=48"]["layout_bytes_per_token"] == 148
    assert sizes["float k=128 float16"]["layout_bytes_per_token"] == 770
    for name, size in sizes.items():
        k = size["top_k"]
        # On disk: the values, plus Arrow's framing and the JSON (a few KB over the tiny data's 256 tokens).
        assert size["layout_bytes_per_token"] < size["shard_bytes_per_token"] < size["bytes_per_token"]
        assert size["shard_bytes_per_token"] - size["layout_bytes_per_token"] < 10, name
        assert size["folder_bytes"] == size["shard_bytes"] + size["json_bytes"]
        assert 0 < size["mean_top_k_mass"]["2.0"] < size["mean_top_k_mass"]["1.0"] < 1, name
        for t in ("2.0", "1.0"):
            record = gradients[name][t]
            for key in ("logits", "params", "uniform_tail_logits", "uniform_tail_params"):
                assert len(record[key]) == setup["batches"]
                assert all(0 < c <= 1 + 1e-9 for c in record[key]), (name, t, key)
                assert record[key + "_min"] <= record[key + "_mean"]
        if size["encoding"] == "compact":
            assert 0 < size["step_max"]["2.0"] < 0.05 and k in (16, 32, 48, 64, 128)
    # More kept classes, a gradient closer to the full one; the uint8 codes cost next to nothing at the same k.
    for t in ("2.0", "1.0"):
        ladder = [gradients[f"compact k={k}"][t]["logits_mean"] for k in (16, 32, 48, 64, 128)]
        assert ladder == sorted(ladder)
        quantised, exact = (
            gradients["compact k=48"][t]["logits_mean"],
            gradients["float k=48 float32"][t]["logits_mean"],
        )
        assert abs(quantised - exact) < 1e-3
    assert "| compact k=48 (default) | 148 |" in done.stdout and "Target (issue 12)" in done.stdout
