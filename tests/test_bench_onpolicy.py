"""The on-policy benchmark (hfkd vs TRL's DistillationTrainer) runs end to end on tiny models, and on the same
completions the two libraries' losses agree (its figures come from the SmolLM2 pair: `make bench-onpolicy`)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_onpolicy_tiny(tmp_path):
    out = tmp_path / "onpolicy.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_onpolicy.py"),
            "--tiny",
            "--rounds",
            "2",
            "--threads",
            "1",  # one thread: on a shared machine two oversubscribed threads run several times slower
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    setup = results["setup"]
    assert setup["trl_trainer"] == "trl.DistillationTrainer" and setup["fixed_length"] is True
    assert results["targets"] == {"time": 1.0, "memory": 1.0}
    per_step = setup["batch"] * setup["max_new_tokens"]

    # 1. The same completions: hfkd's loss and TRL's agree, with each other and with the float64 definition, at the
    # benchmark's beta and at 0.1 / 0.9 (where a mirrored beta convention would show), on equal and ragged lengths.
    cases = results["loss_agreement"]["cases"]
    assert {(c["completions"], c["beta"]) for c in cases} == {
        (name, beta) for name in ("sampled", "ragged") for beta in (0.5, 0.1, 0.9)
    }
    for c in cases:
        for key in ("hfkd", "trl", "definition_float64"):
            assert math.isfinite(c[key]) and c[key] > 0, (c["completions"], c["beta"], key)
        assert c["relative_difference"] <= 1e-5, c
        assert c["hfkd_vs_definition"] <= 1e-5 and c["trl_vs_definition"] <= 1e-5, c
        assert c["gradient_relative_difference"] <= 1e-4, c
        assert c["gradient_tensors_compared"] == c["gradient_tensors"][0] == c["gradient_tensors"][1] > 0
        assert c["completion_tokens"] == sum(c["completion_lengths"])
        if c["completions"] == "sampled":
            assert c["completion_lengths"] == [setup["max_new_tokens"]] * setup["batch"]
        else:
            assert len(set(c["completion_lengths"])) == setup["batch"]  # every row its own length
    assert results["loss_agreement"]["max_relative_difference"] <= 1e-5

    # 2. Full steps, taking turns: times, finite losses, the generated tokens (fixed length: all of them).
    steps = results["steps"]
    assert steps["rounds"] == 2
    for side in ("hfkd", "trl"):
        x = steps[side]
        assert len(x["times_s"]) == 2 and all(t > 0 for t in x["times_s"]) and x["median_s"] > 0
        assert len(x["losses"]) == 3 and all(math.isfinite(v) for v in x["losses"])
        assert x["generated_tokens"] == [per_step, per_step] and x["mean_generated_tokens"] == per_step
    # hfkd's first step samples with the seed the loss check used: the same completions, the same loss
    sampled = next(c for c in cases if c["completions"] == "sampled" and c["beta"] == 0.5)
    assert steps["hfkd"]["losses"][0] == pytest.approx(sampled["hfkd"], rel=1e-6)
    ratio = steps["ratio_hfkd_to_trl"]
    for key in ("median_of_round_ratios", "ratio_of_medians"):
        assert math.isfinite(ratio[key]) and ratio[key] > 0
    assert len(ratio["per_round"]) == 2

    memory = results["memory"]
    for side in ("hfkd", "trl"):
        assert memory[side]["step_mib"] >= 0 and memory[side]["resident_mib"] > 0
        assert memory[side]["generated_tokens"] == per_step
    assert math.isfinite(memory["ratio_hfkd_to_trl"])

    assert "| completions | beta | tokens | hfkd | TRL |" in done.stdout
    assert "hfkd / TRL step time:" in done.stdout and "hfkd / TRL peak step memory:" in done.stdout
