"""The term-cost benchmark runs end to end on tiny models (its figures come from the real MiniLM pair)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"kd", "kd+rkd", "kd+sp", "kd+pkt", "kd+minilm", "kd+pkd", "kd+adv"}


def test_bench_terms_tiny(tmp_path):
    out = tmp_path / "terms.json"
    done = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_terms.py"),
            "--tiny",
            "--rounds",
            "2",
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
    variants = results["terms"]["variants"]
    assert set(variants) == VARIANTS
    for name, v in variants.items():
        assert len(v["times_s"]) == 2 and all(t > 0 for t in v["times_s"])
        assert all(math.isfinite(x) for x in v["losses"])
        assert v["host_reads_per_step"] >= 1  # at least the loss read on the host
        if name == "kd":
            continue
        ratio = v["ratio_to_kd"]
        for key in ("median_of_round_ratios", "ratio_of_medians"):
            assert math.isfinite(ratio[key]) and ratio[key] > 0, (name, key)
        assert all(math.isfinite(q) for q in ratio["round_ratio_quartiles"])
    assert variants["kd+rkd"]["target"] == 1.05 and variants["kd+minilm"]["target"] == 1.10
    assert variants["kd+rkd"]["model_flags"] == {"output_hidden_states": True}
    assert len(variants["kd+minilm"]["hooked_modules"]["student"]) == 3  # its q/k/v projections were found
    assert "| variant | median step |" in done.stdout and "| kd+minilm |" in done.stdout
    ema = results["ema"]  # the mean teacher's update, timed beside self-distillation steps
    assert len(ema["update_s"]) == 2 and 0 < ema["update_share"] < 1 and ema["target"] == 0.02
    assert "mean teacher (teacher_ema_decay)" in done.stdout
    multi = results["multi_teacher"]  # two teachers against a student step plus both teachers' forwards
    assert len(multi["times_s"]["two_teacher_step"]) == 2 and multi["target"] == 1.05
    assert math.isfinite(multi["ratio"]["median_of_round_ratios"]) and "two teachers" in done.stdout
    mutual = results["mutual"]  # deep mutual learning against each model's own training step
    assert len(mutual["times_s"]["mutual_step"]) == 2 and mutual["target"] == 1.05
    assert math.isfinite(mutual["ratio"]["median_of_round_ratios"]) and "mutual learning" in done.stdout


def test_host_reads_recorder_names_the_place():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import torch
    from bench_terms import HostReads

    x = torch.arange(6.0)
    with HostReads() as recorder:
        y = (x * 2).sum()
        y.item(), bool(y > 0), x.tolist(), x[x > 2]
    kinds = {kind for kind, _ in recorder.events}
    assert kinds == {"item/bool/float of a tensor", "Tensor.tolist", "boolean-mask indexing"}
    assert all("test_bench_terms.py" in where for _, where in recorder.events)
    assert sum(recorder.events.values()) == 4
    assert torch.Tensor.tolist is not None and x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # restored after the block
