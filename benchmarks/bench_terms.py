"""What each distillation term costs on top of a KD-only step, on the MiniLM pair. Prints a table, writes JSON.

    python benchmarks/bench_terms.py --rounds 30 --json benchmarks/terms.json   # the MiniLM pair (real models)
    python benchmarks/bench_terms.py --tiny --rounds 2                          # tiny models from configs, seconds

The pair is bench_distill.py's MiniLM pair (`load_pair("minilm")`): all-MiniLM-L6-v2 with a 3-label head teaching a
3-layer student built from its layers, batches of 32 tweets of up to 48 tokens, AdamW at learning rate 1e-5. Every
variant is a DistillationTrainer on the same student weights and the same batches:

- `kd`: task_weight=0.5, logit_weight=0.5 (KL, T=2), hidden_weight=0, attention_weight=0: the baseline;
- `kd+rkd`, `kd+sp`, `kd+pkt`: kd plus that relation term at its default options (pooled features of the last
  hidden state, mask-aware mean), weight 1;
- `kd+minilm`: kd plus `minilm` at its default options (last layers' q/k/v) but 12 relation heads (the default
  before issue 21, kept so that the timings stay comparable), weight 1;
- `kd+pkd`: kd plus `pkd` at its default options (PKD-Skip, [CLS] of the student's intermediate layers), weight 1;
- `kd+adv`: kd plus `adversarial` at its default options (an MLP discriminator of 3 x 256 on the logits, trained in
  the same backward by gradient reversal), weight 1.

A term's weight does not change what it costs. In `--tiny` mode (a BERT of width 32 with 4 heads) `minilm` takes
relation_heads=4, since 12 does not divide the width.

A step is bench_distill.py's `_step`: what Trainer does per optimizer step with no accumulation (collate,
`get_batch_samples`, `training_step`, `optimizer.step()`, `zero_grad()`, the loss read on the host). The variants take
turns, one step each per round in a rotating order; the first round warms up (it also runs each trainer's probe and
the terms' setup) and is not timed. Each variant's cost is its step time / the kd step time, as the median of the
per-round ratios (the form the targets are judged on, as in bench_distill.py) with their quartiles, and as the ratio
of the median step times. The machine's load is recorded per round (bench_distill.py's `load_between`).

Targets (the project's issue): kd + any one relation term on pooled features (rkd, sp, pkt) <= 1.05 x a kd-only step,
kd + minilm <= 1.10 x; pkd and adversarial have no target here. And no host sync per term per step: after the timed
rounds each variant takes one more step (untimed) under a dispatch mode that records every read of a tensor's values
by the host (`.item()`, `bool()`, `float()`, `int()` of a tensor: aten._local_scalar_dense), every op whose output
size depends on the data (nonzero, masked_select, boolean-mask indexing, unique), and every call of `Tensor.tolist`,
`.numpy` and `.cpu`, each with the place in the code it came from. On this CPU-only machine none of them waits for a
device, but each is a host sync on an accelerator. The table gives each variant's count per step and the difference
from kd; the JSON lists the places.
"""

import argparse
import collections
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_distill import (  # noqa: E402  (sets HF_HUB_OFFLINE etc. before transformers is imported by it)
    FORMS,
    JUDGED_ON,
    _batches,
    _features,
    _load_text,
    _step,
    _teacher_forward,
    _verdict,
    finish_run,
    hfkd_trainer,
    load_pair,
    load_summary,
    machine,
    ratios,
    run_header,
    student_trainer,
    take_turns,
)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import hfkd  # noqa: E402

BASELINE = "kd"
# The variants, each kd plus these terms (default options; the weight does not change the cost).
VARIANTS = {
    "kd": [],
    "kd+rkd": [{"name": "rkd", "weight": 1.0}],
    "kd+sp": [{"name": "sp", "weight": 1.0}],
    "kd+pkt": [{"name": "pkt", "weight": 1.0}],
    "kd+minilm": [{"name": "minilm", "weight": 1.0, "relation_heads": 12}],
    "kd+pkd": [{"name": "pkd", "weight": 1.0}],
    "kd+adv": [{"name": "adversarial", "weight": 1.0}],
}
TINY_OPTIONS = {"minilm": {"relation_heads": 4}}  # the tiny BERT's width is 32: 12 relation heads do not divide it
# Step time of kd + the term / kd step time (median of per-round ratios, see bench_distill.JUDGED_ON).
TARGETS = {"kd+rkd": 1.05, "kd+sp": 1.05, "kd+pkt": 1.05, "kd+minilm": 1.10}
EMA_TARGET = 0.02  # the mean teacher's update / a training step (issue 11)
MULTI_TARGET = 1.05  # a two-teacher step / (student step + both teachers' forwards) (issue 11)
MUTUAL_TARGET = 1.05  # a mutual-learning step of two models / the sum of their own training steps (issue 11)


# ---------------------------------------------------------------------------------------------------- host reads
HFKD_DIR = os.path.dirname(os.path.abspath(hfkd.__file__))
ROOT = os.path.dirname(HFKD_DIR)
TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# ops whose output size depends on the values of their inputs: the host must see those values first
DATA_DEPENDENT = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive"}


def _where() -> str:
    """The code that caused a host read: the innermost frame outside torch and this file (hfkd, transformers, or the
    benchmark's own `_step`), followed by "via" the innermost frame in hfkd/ when the first is outside hfkd/."""
    frame, inner, ours = sys._getframe(2), None, None
    while frame is not None and ours is None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path.startswith(HFKD_DIR + os.sep):
            ours = f"{os.path.relpath(path, ROOT)}:{frame.f_lineno} ({frame.f_code.co_name})"
        if inner is None and not path.startswith(TORCH_DIR + os.sep) and path != os.path.abspath(__file__):
            short = (
                path.split("site-packages" + os.sep)[-1] if "site-packages" in path else os.path.relpath(path, ROOT)
            )
            inner = f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    if inner is None or inner == ours:
        return ours or inner or "?"
    return f"{inner} via {ours}" if ours else inner


class HostReads(TorchDispatchMode):
    """Records, with their place in the code, the host's reads of tensor values during the block (see the docstring)."""

    PATCHED = ("tolist", "numpy", "cpu")

    def __init__(self):
        super().__init__()
        self.events: collections.Counter = collections.Counter()
        self._saved = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.events[("item/bool/float of a tensor", _where())] += 1
        elif name in DATA_DEPENDENT:
            self.events[(name, _where())] += 1
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ()
        ):
            self.events[("boolean-mask indexing", _where())] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in self.PATCHED:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def wrapper(tensor, *a, _original=original, _method=method, **k):
                self.events[(f"Tensor.{_method}", _where())] += 1
                return _original(tensor, *a, **k)

            setattr(torch.Tensor, method, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)
        self._saved = {}
        return super().__exit__(*exc)


def _events_list(events: collections.Counter) -> list[dict]:
    return [{"kind": kind, "where": where, "count": n} for (kind, where), n in sorted(events.items())]


# ---------------------------------------------------------------------------------------------------- benchmark
def variant_terms(name: str, tiny: bool) -> list[dict]:
    return [{**t, **(TINY_OPTIONS.get(t["name"], {}) if tiny else {})} for t in VARIANTS[name]]


def bench_terms(tiny: bool, rounds: int, names: list[str], work: str) -> dict:
    teacher, student, rows, collator, batch_size, pair_terms = load_pair("minilm", tiny)
    batches = _batches(rows, batch_size)
    rows = [r for b in batches for r in b]
    base = {**pair_terms, "hidden_weight": 0.0, "attention_weight": 0.0}
    result = {
        "pair": "minilm",
        "batch": [batch_size, max(len(r["input_ids"]) for r in rows)],
        "batches": len(batches),
        "kd": base,
        "teacher_params": teacher.num_parameters(),
        "student_params": student.num_parameters(),
        "rounds": rounds,
        "variants": {},
    }
    trainers = {}
    for name in names:
        terms = variant_terms(name, tiny)
        # Every variant starts from the same student weights.
        trainers[name] = hfkd_trainer(
            copy.deepcopy(student), teacher, rows, collator, f"{work}/{name}", **base, terms=terms
        )
    step = {
        name: (lambda i, t=trainers[name]: _step(t, _features(batches[i % len(batches)], False))) for name in names
    }

    # Round 0 warms up (the probe, the terms' setup, optimizer state).
    times, losses, loads = take_turns(step, rounds, label="terms")

    # One more step each, untimed, recording the host's reads of tensor values.
    reads = {}
    for name in names:
        with HostReads() as recorder:
            losses[name].append(step[name](rounds + 1))
        reads[name] = recorder.events
    base_reads = reads.get(BASELINE, collections.Counter())

    for name in names:
        trainer = trainers[name]
        term_set = getattr(trainer, "term_set", None)
        entry = {
            "terms": variant_terms(name, tiny),
            "median_s": statistics.median(times[name]),
            "times_s": times[name],
            "losses": losses[name],
            "host_reads_per_step": sum(reads[name].values()),
            "host_reads": _events_list(reads[name]),
            "host_reads_beyond_kd": _events_list(reads[name] - base_reads),
            "host_reads_in_terms": _events_list(
                collections.Counter({k: n for k, n in reads[name].items() if k[1].startswith("hfkd/terms/")})
            ),
        }
        if term_set is not None and len(term_set):
            needs = term_set.needs()
            entry["model_flags"] = term_set.flags()
            entry["hooked_modules"] = {"student": list(needs.student_modules), "teacher": list(needs.teacher_modules)}
        if name != BASELINE:
            entry["ratio_to_kd"] = ratios(times[name], times[BASELINE])
            target = TARGETS.get(name)
            entry["target"] = target
            entry["verdict"] = _verdict(entry["ratio_to_kd"], target) if target is not None else None
        result["variants"][name] = entry
    result["load_per_round"] = loads
    result["load"] = load_summary(loads)
    return result


# ---------------------------------------------------------------------------------------------------- report
def table(results: dict) -> str:
    r = results["terms"]
    variants = r["variants"]
    judged = FORMS[JUDGED_ON]
    kd_reads = variants[BASELINE]["host_reads_per_step"] if BASELINE in variants else 0
    lines = [
        f"MiniLM pair{' (tiny)' if results['tiny'] else ''}: batch {r['batch'][0]} x up to {r['batch'][1]} tokens, "
        f"{r['rounds']} timed rounds after a warm-up round. Ratios are step time / kd step time; targets are judged "
        f"on the {judged}; quartiles are those of the per-round ratios.",
        "",
        f"| variant | median step | {judged} | per-round quartiles | ratio of medians | target | verdict | "
        f"host reads per step (beyond kd; in hfkd/terms/) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in variants.items():
        beyond = sum(e["count"] for e in v["host_reads_beyond_kd"])
        in_terms = sum(e["count"] for e in v["host_reads_in_terms"])
        reads = f"{v['host_reads_per_step']} ({'+' if beyond else ''}{beyond}; {in_terms})"
        if name == BASELINE:
            lines.append(f"| {name} | {v['median_s']:.3f} s | 1 | - | 1 | - | baseline | {reads} |")
            continue
        x = v["ratio_to_kd"]
        target = f"<= {v['target']:.2f}" if v["target"] is not None else "-"
        lines.append(
            f"| {name} | {v['median_s']:.3f} s | **{x['median_of_round_ratios']:.3f}** | "
            f"{x['round_ratio_quartiles'][0]:.3f}-{x['round_ratio_quartiles'][1]:.3f} | {x['ratio_of_medians']:.3f} | "
            f"{target} | {v['verdict'] or '-'} | {reads} |"
        )
    lines += ["", f"host reads per kd step: {kd_reads}, from:"]
    lines += [
        f"  {e['count']} x {e['kind']} at {e['where']}" for e in variants.get(BASELINE, {}).get("host_reads", [])
    ]
    for name, v in variants.items():
        for e in v["host_reads_beyond_kd"]:
            lines.append(f"{name}: {e['count']} more x {e['kind']} at {e['where']}")
    ema = results.get("ema")
    if ema:
        lines += [
            "",
            f"mean teacher (teacher_ema_decay), {ema['student_params'] / 1e6:.1f}M-parameter student: update "
            f"{ema['median_update_s'] * 1e3:.1f} ms after a {ema['median_step_s']:.3f} s step (medians) = "
            f"{ema['update_share']:.2%} of a training step (target <= {ema['target']:.0%}: {ema['verdict']})",
        ]
    multi = results.get("multi_teacher")
    if multi:
        judged = multi["ratio"][JUDGED_ON]
        medians = multi["median_s"]
        lines.append(
            f"two teachers (fixed weights, kd): step {medians['two_teacher_step']:.3f} s vs student step "
            f"{medians['student_step']:.3f} s + teacher forwards {medians['teacher0_forward']:.3f} s and "
            f"{medians['teacher1_forward']:.3f} s: {judged:.3f} (median of per-round ratios), "
            f"{multi['ratio']['ratio_of_medians']:.3f} (ratio of medians); target <= {multi['target']}: "
            f"{multi['verdict']}"
        )
    mutual = results.get("mutual")
    if mutual:
        medians = mutual["median_s"]
        lines.append(
            f"mutual learning (student + 1 peer, task + KL at T 1): step {medians['mutual_step']:.3f} s vs the "
            f"models' own steps {medians['student_step']:.3f} s + {medians['peer_step']:.3f} s: "
            f"{mutual['ratio'][JUDGED_ON]:.3f} (median of per-round ratios), "
            f"{mutual['ratio']['ratio_of_medians']:.3f} (ratio of medians); target <= {mutual['target']}: "
            f"{mutual['verdict']}"
        )
    lines += ["", f"load during the timed rounds: {_load_text(r.get('load', {}))}"]
    run = results["run"]
    lines.append(
        f"run: {run['started']} to {run['finished']}, {run['wall_s'] / 60:.1f} min; commit {run['git_commit'] or '?'}"
        f"{' (hfkd/ modified)' if run.get('hfkd_modified') else ''}; torch threads {results['torch_threads']}; "
        f"other processes used {run.get('load', {}).get('other_processes_cores', float('nan')):.2f} cores on average"
    )
    return "\n".join(lines)


def bench_ema(tiny: bool, rounds: int, work: str) -> dict:
    """The mean teacher's update (hfkd.ema) against a self-distillation step of the same student.

    `_step` runs no Trainer callbacks, so the update that follows each optimizer step in training is timed on its
    own, alternating with the steps: update / (step + update) is its share of a training step. Target: <= 2%.
    """
    from hfkd.ema import EMATeacher

    _, student, rows, collator, batch_size, pair_terms = load_pair("minilm", tiny)
    batches = _batches(rows, batch_size)
    rows = [r for b in batches for r in b]
    base = {**pair_terms, "hidden_weight": 0.0, "attention_weight": 0.0, "teacher_ema_decay": 0.999}
    trainer = hfkd_trainer(copy.deepcopy(student), None, rows, collator, f"{work}/ema", **base)
    ema = EMATeacher(trainer.teacher_model, trainer.model, 0.999)
    steps, updates = [], []
    for i in range(rounds + 1):
        tick = time.perf_counter()
        _step(trainer, _features(batches[i % len(batches)], False))
        middle = time.perf_counter()
        ema.update(i)
        if i:  # round 0 warms up
            steps.append(middle - tick)
            updates.append(time.perf_counter() - middle)
    step, update = statistics.median(steps), statistics.median(updates)
    share = update / (step + update)
    return {
        "student_params": trainer.model.num_parameters(),
        "step_s": steps,
        "update_s": updates,
        "median_step_s": step,
        "median_update_s": update,
        "update_share": share,
        "target": EMA_TARGET,
        "verdict": "met" if share <= EMA_TARGET else "not met",
    }


def _against_limit(terms: dict, times: dict, ratio: dict, target: float) -> dict:
    """A step against its limit (the sum of the steps and forwards it runs): what the JSON records."""
    return {
        "terms": terms,
        "median_s": {key: statistics.median(values) for key, values in times.items()},
        "times_s": times,
        "ratio": ratio,
        "target": target,
        "verdict": _verdict(ratio, target),
    }


def bench_multi(tiny: bool, rounds: int, work: str) -> dict:
    """Two teachers (hfkd.mixing, fixed weights): a kd step against its limit, a student-only step plus both
    teachers' forwards, with the variants taking turns as above. Target: <= 1.05 (issue 11)."""
    teacher, student, rows, collator, batch_size, pair_terms = load_pair("minilm", tiny)
    second = copy.deepcopy(teacher)  # the same encoder with another head: another teacher of the same cost
    torch.manual_seed(1)
    second.classifier.reset_parameters()
    batches = _batches(rows, batch_size)
    rows = [r for b in batches for r in b]
    kd = {**pair_terms, "hidden_weight": 0.0, "attention_weight": 0.0}
    multi = hfkd_trainer(copy.deepcopy(student), [teacher, second], rows, collator, f"{work}/multi", **kd)
    student_only = student_trainer(copy.deepcopy(student), rows, collator, f"{work}/student")
    variants = {
        "student_step": lambda i: _step(student_only, _features(batches[i % len(batches)], False)),
        "teacher0_forward": lambda i: _teacher_forward(teacher, collator, batches[i % len(batches)]),
        "teacher1_forward": lambda i: _teacher_forward(second, collator, batches[i % len(batches)]),
        "two_teacher_step": lambda i: _step(multi, _features(batches[i % len(batches)], False)),
    }
    times, _, _ = take_turns(variants, rounds)  # round 0 warms up
    ratio = ratios(
        times["two_teacher_step"], times["student_step"], times["teacher0_forward"], times["teacher1_forward"]
    )
    return _against_limit(kd, times, ratio, MULTI_TARGET)


def bench_mutual(tiny: bool, rounds: int, work: str) -> dict:
    """Deep mutual learning (hfkd.peers): one step of the student and a peer learning together (task 1 + KL at T 1,
    each model's loss and optimizer update) against the sum of each model's own training step on the labels alone
    (plain Trainer), taking turns as above. The peer is the student with another classifier initialisation: a model
    of the same cost. Target: <= 1.05 (issue 11)."""
    _, student, rows, collator, batch_size, _ = load_pair("minilm", tiny)
    peer = copy.deepcopy(student)
    torch.manual_seed(1)
    peer.classifier.reset_parameters()
    batches = _batches(rows, batch_size)
    rows = [r for b in batches for r in b]
    dml = dict(task_weight=1.0, logit_weight=1.0, temperature=1.0, hidden_weight=0.0, attention_weight=0.0)
    mutual = hfkd_trainer(
        copy.deepcopy(student), None, rows, collator, f"{work}/mutual", peer_models=[copy.deepcopy(peer)], **dml
    )
    alone = {
        "student_step": student_trainer(copy.deepcopy(student), rows, collator, f"{work}/student-alone"),
        "peer_step": student_trainer(copy.deepcopy(peer), rows, collator, f"{work}/peer-alone"),
        "mutual_step": mutual,
    }
    variants = {
        key: (lambda i, t=trainer: _step(t, _features(batches[i % len(batches)], False)))
        for key, trainer in alone.items()
    }
    times, _, _ = take_turns(variants, rounds)  # round 0 warms up
    ratio = ratios(times["mutual_step"], times["student_step"], times["peer_step"])
    return _against_limit(dml, times, ratio, MUTUAL_TARGET)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=30, help="timed rounds (one step per variant each) after warm-up"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models from configs and random data (smoke test)")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, kd always included: {', '.join(VARIANTS)}"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    names = [BASELINE] + [n for n in dict.fromkeys(args.variants.split(",")) if n and n != BASELINE]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    start = machine()
    results = {**run_header("benchmarks/bench_terms.py", argv, TARGETS, start), "tiny": args.tiny}
    with tempfile.TemporaryDirectory() as work:
        results["terms"] = bench_terms(args.tiny, args.rounds, names, work)
        results["ema"] = bench_ema(args.tiny, args.rounds, work)
        results["multi_teacher"] = bench_multi(args.tiny, args.rounds, work)
        results["mutual"] = bench_mutual(args.tiny, args.rounds, work)
    finish_run(results, start)
    print(table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1, allow_nan=True)
    bad = [n for n, v in results["terms"]["variants"].items() if not all(map(math.isfinite, v["losses"]))]
    if bad:
        print(f"non-finite losses in {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
