"""Checks that the processes a launcher started form one training run, before anything is written.

Two launches train without an error and without sharing anything (issue 22, measured with transformers 5.25 and
accelerate 1.16 on CPU):

- `accelerate launch` with several processes on a machine without GPUs and without `use_cpu=True` in the training
  arguments: Accelerate finds no device to join the processes over, so each one runs as process 0 of 1 (distributed
  type NO). Every process trains its own copy on the whole data and writes to the same `output_dir`.
- FSDP asked for (accelerate's `distributed_type: FSDP`, which sets `ACCELERATE_USE_FSDP=true`, or
  `TrainingArguments.fsdp`) on CPU with `use_cpu=True`: Accelerate applies FSDP only over GPUs and other
  accelerators, so the processes run as plain data parallel (MULTI_CPU), each holding the whole student and
  teacher that the user sharded to make them fit. DistillationTrainer now applies it on CPU itself
  (hfkd.sharding); the recipe's other stages do not.

`check_launch` turns both into an error naming the setting to change (FSDP with a single process is let through:
there is nothing to shard over, and that process holds the whole models either way). The counts come from the launcher's own
environment (`WORLD_SIZE`, set by torchrun and `accelerate launch`) against the processes the run actually joined.
"""

from __future__ import annotations

import os

# The distributed types over which Accelerate's AcceleratorState applies an FSDP plugin (accelerate/state.py, 1.16):
# anything else, MULTI_CPU and NO included, keeps the model whole in every process.
_FSDP_DEVICE_TYPES = frozenset(
    {
        "MULTI_GPU",
        "MULTI_MLU",
        "MULTI_SDAA",
        "MULTI_MUSA",
        "MULTI_NPU",
        "MULTI_XPU",
        "MULTI_HPU",
        "MULTI_NEURON",
    }
)


def launched_processes() -> int:
    """How many processes the launcher started (`WORLD_SIZE`; 1 when the script was run directly)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def fsdp_requested(args) -> str | None:
    """Where FSDP was asked for, in words (None: it was not): the launcher's config or the training arguments."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "the launcher (ACCELERATE_USE_FSDP=true, from `distributed_type: FSDP` in accelerate's config)"
    if getattr(args, "fsdp", None):
        return "the training arguments (fsdp / fsdp_config)"
    return None


def fsdp_applies(distributed_type) -> bool:
    """Whether Accelerate applies an FSDP plugin under this distributed type (a `DistributedType` or its name)."""
    return str(getattr(distributed_type, "name", distributed_type)).rsplit(".", 1)[-1] in _FSDP_DEVICE_TYPES


def check_launch(args, *, processes: int, distributed_type, fsdp_applied: bool | None = None) -> None:
    """Refuses a launch whose processes would train apart, or unsharded where FSDP was asked for.

    `args`: the run's TrainingArguments; `processes`: how many processes the run joined (the accelerator's
    `num_processes`); `distributed_type`: Accelerate's; `fsdp_applied`: whether the trainer's accelerator holds an
    FSDP plugin (None: judged from `distributed_type`, for checks made before any Trainer exists)."""
    launched = launched_processes()
    name = str(getattr(distributed_type, "name", distributed_type)).rsplit(".", 1)[-1]
    if launched > processes:
        cpu_fix = (
            "On a machine without GPUs, pass use_cpu=True (`--use_cpu true` on the command line) so that they join "
            "one gloo group, e.g. `bash recipes/accelerate/multi_cpu_2proc.sh --config <recipe.yaml>`"
            if not getattr(args, "use_cpu", False)
            else "Check that the launcher's settings (num_processes, the rendezvous address) reach every process"
        )
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}), but this run joined {processes} "
            f"(Accelerate's distributed type: {name}): each process would train alone on all the data and write to "
            f"the same output_dir. {cpu_fix}; or run one process (`python -m hfkd ...` or `accelerate launch "
            "--num_processes 1`)."
        )
    where = fsdp_requested(args)
    applied = fsdp_applies(distributed_type) if fsdp_applied is None else fsdp_applied
    # One process has nothing to shard over: it holds the whole models either way, as the user expects of it.
    if where is not None and not applied and max(launched, processes) > 1:
        raise ValueError(
            f"FSDP was asked for by {where}, but it is not applied here (distributed type {name}): Accelerate "
            "shards over several GPUs (or other accelerators) only, and on CPU DistillationTrainer does (hfkd.sharding) "
            "but not the other stages of `hfkd distill`, so each process would hold the whole student and teacher. "
            "For sharding, run 2 or more processes on GPUs (recipes/accelerate/fsdp.yaml), or DistillationTrainer "
            "in Python with use_cpu=True; for data parallel on CPU, launch with `distributed_type: MULTI_CPU` "
            "instead (e.g. `bash recipes/accelerate/multi_cpu_2proc.sh`)."
        )
