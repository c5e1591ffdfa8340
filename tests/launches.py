"""Runs of tests/scripts/distill_run.py in a subprocess, alone or under `accelerate launch` (shared by the tests of
several processes: test_runs, test_launch, test_sharding), and forked gloo workers for terms' own tests."""

import os
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, "scripts", "distill_run.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
# The shipped FSDP-on-CPU launcher config (each model wraps its own layer classes).
FSDP_CPU_CONFIG = os.path.join(ROOT, "recipes", "accelerate", "fsdp_cpu.yaml")

LAUNCH_TWO = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--num_processes",
    "2",
    "--multi_gpu",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def run_script(args, launcher=None, check=True):
    """distill_run.py with `args`, by `launcher` (default: this Python, one process); asserts success if `check`."""
    command = [*(launcher or [sys.executable]), SCRIPT, *args]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_gloo_workers(worker, folder: str, processes: int = 2, timeout: float = 120.0) -> None:
    """Runs `worker(rank, processes, port, folder)` in `processes` forked processes that can join a gloo group on a
    free local port; fails the test (killing them) after `timeout` seconds. Fork: the children inherit the imported
    modules (spawn would import transformers again in each)."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.start_processes(
        worker, args=(processes, port, folder), nprocs=processes, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {processes} gloo processes did not finish within {timeout:g} s")
