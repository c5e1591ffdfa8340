"""The GPU check (benchmarks/gpu_check.py, issue 22 item 7) runs every part on CPU with --smoke: each row of its
table measured with finite positive numbers, and FSDP2 over 1 and 2 gloo processes training to the same losses. Its
GPU figures come from `make gpu-check` on a CUDA machine; no timing is asserted here (timing tests fail at random)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
# No GPU is visible to the script, even on a machine that has one: --smoke is the CPU check, and without it the
# script must refuse rather than start the 10-minute GPU check.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV["CUDA_VISIBLE_DEVICES"] = ""
TIMED = ["student_step", "teacher_forward", "online_step", "hfkd_jsd_step", "trl_step", "fsdp1", "fsdp2"]
RATIOS = ["online_ratio", "memory_ratio", "trl_ratio"]


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_gpu_check_smoke_runs_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    setup = record["setup"]
    assert setup["smoke"] and not setup["cuda"] and setup["precision"] == "float32"
    assert (setup["batch"], setup["length"]) == (2, 32)
    assert all(record["versions"][k] for k in ("torch", "transformers", "accelerate", "trl")) and record["device"]

    rows = {row["name"]: row for row in record["rows"]}
    assert list(rows) == TIMED[:3] + RATIOS[:2] + TIMED[3:5] + RATIOS[2:] + TIMED[5:]
    for row in rows.values():
        assert row["status"] == "ran", row
        for key in ("median_s", "tokens_per_s", "peak_mib", "ratio", "ratio_of_medians"):
            assert row.get(key) is None or _positive(row[key]), (row["name"], key, row[key])
        assert all(_positive(loss) for loss in row.get("losses", ())), row
    for name in TIMED:
        assert _positive(rows[name]["median_s"]) and _positive(rows[name]["tokens_per_s"]), name
    assert _positive(rows["online_ratio"]["ratio"]) and _positive(rows["trl_ratio"]["ratio"])
    # On CPU no allocator peak can be reset in-process: the memory rows say so instead of giving a number.
    assert rows["memory_ratio"]["ratio"] is None and "n/a on CPU" in rows["memory_ratio"]["note"]
    assert rows["online_step"]["peak_mib"] is None and rows["student_step"]["peak_mib"] is None

    # FSDP2 under `accelerate launch`: 1 and 2 processes, the same global batch, so the same losses step by step.
    one, two = rows["fsdp1"], rows["fsdp2"]
    assert (one["processes"], two["processes"]) == (1, 2) and two["fsdp_applied"]
    assert len(one["losses"]) == len(two["losses"]) == setup["fsdp_steps"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert len(two["peak_mib_per_process"]) == 2 and all(_positive(x) for x in two["peak_mib_per_process"])
    shares = record["parts"]["fsdp2"]["student_share_per_process"]
    assert all(0.45 <= share <= 0.55 for share in shares), shares  # the student is split over the two processes

    # One table, every row in it.
    assert done.stdout.count("| measurement |") == 1
    assert all(f"| {row['label']} |" in done.stdout for row in record["rows"])


def test_without_a_gpu_and_without_smoke_it_stops_and_says_what_to_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [sys.executable, SCRIPT, "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=120, check=False
    )
    assert done.returncode != 0 and "no CUDA device: run with --smoke on CPU" in done.stderr
    assert not out.exists() and "| measurement |" not in done.stdout
