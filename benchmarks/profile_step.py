"""Where a step's time goes: torch.profiler over a few steps of one variant, top operators by self CPU time.

python benchmarks/profile_step.py --pair smollm2 --variant online   # student|teacher|online|cached|full-logits
python benchmarks/profile_step.py --pair smollm2 --variant student,teacher,online > benchmarks/profile_smollm2.txt
python benchmarks/profile_step.py --pair minilm --variant online --python --steps 10  # hfkd's own Python per step

`teacher` profiles the teacher's forward alone (as bench_distill.py times it); the others a whole step. Several
variants (comma-separated) each run alone in a fresh process, one after another; the output then ends with the
operators' total self CPU time of the online step / (student step + teacher forward).
"""

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_distill import (  # noqa: E402
    _batches,
    _dataset,
    _features,
    _step,
    _teacher_forward,
    build_teacher_cache,
    hfkd_trainer,
    load_pair,
    student_trainer,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", default="smollm2", choices=["minilm", "smollm2"])
    parser.add_argument(
        "--variant",
        default="online",
        help="student, teacher, online, cached or full-logits; or several, comma-separated",
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--python", action="store_true", help="cProfile instead: the time spent in hfkd's own Python code per step"
    )
    args = parser.parse_args(argv)
    variants = args.variant.split(",")
    for variant in variants:
        if variant not in VARIANTS:
            parser.error(f"unknown variant {variant}; choose from {', '.join(VARIANTS)}")
    if len(variants) > 1:
        return several(args, variants, argv if argv is not None else sys.argv[1:])

    teacher, student, rows, collator, batch_size, terms = load_pair(args.pair, args.tiny)
    batches = _batches(rows, batch_size)
    rows = [r for b in batches for r in b]
    work = tempfile.mkdtemp()
    student = copy.deepcopy(student)
    with_rows = False
    if args.variant == "teacher":
        trainer = None
    elif args.variant == "student":
        trainer = student_trainer(student, rows, collator, work)
    elif args.variant == "cached":
        config = hfkd_trainer(copy.deepcopy(student), teacher, rows, collator, work + "/x", **terms).args
        build_teacher_cache(
            teacher,
            _dataset(rows),
            work + "/cache",
            args=config,
            student=student,
            data_collator=collator,
            progress=False,
        )
        trainer = hfkd_trainer(student, None, rows, collator, work, teacher_cache_dir=work + "/cache", **terms)
        with_rows = True
    else:
        extra = {"logit_chunk_size": 0} if args.variant == "full-logits" else {}
        trainer = hfkd_trainer(student, teacher, rows, collator, work, **terms, **extra)

    def run(i):
        if trainer is None:
            _teacher_forward(teacher, collator, batches[i % len(batches)])
        else:
            _step(trainer, _features(batches[i % len(batches)], with_rows))

    run(0)  # warm-up
    if args.python:
        return python_time(run, args)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        for i in range(args.steps):
            run(i + 1)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) / 1e6
    print(
        f"== {args.pair} {args.variant}: {args.steps} profiled steps after a warm-up; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; 1-minute load average {load:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"total self CPU time of all operators: {total:.3f} s; wall time of the profiled steps: {wall:.3f} s")
    return 0


VARIANTS = ("student", "teacher", "online", "cached", "full-logits")


def python_time(run, args) -> int:
    """cProfile over the steps: each hfkd function's own time (`tottime`: without what it calls, so torch's
    operators and the models' forwards are left out), per step, against the step's wall time."""
    import cProfile
    import pstats

    import hfkd

    package = os.path.dirname(os.path.abspath(hfkd.__file__))
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for i in range(args.steps):
        run(i + 1)
    profiler.disable()
    wall = (time.perf_counter() - start) / args.steps
    stats = pstats.Stats(profiler).stats
    own = [
        (tottime / args.steps, calls / args.steps, f"{os.path.relpath(path, package)}:{line}({name})")
        for (path, line, name), (_, calls, tottime, _, _) in stats.items()
        if os.path.abspath(path).startswith(package + os.sep)
    ]
    own.sort(reverse=True)
    total = sum(t for t, _, _ in own)
    print(f"== {args.pair} {args.variant}: hfkd's own Python time per step (cProfile, {args.steps} steps)")
    print("| function | calls per step | own time per step |\n|---|---|---|")
    for seconds, calls, where in own[: args.rows]:
        print(f"| {where} | {calls:g} | {seconds * 1e3:.2f} ms |")
    print(
        f"hfkd's own Python per step: {total * 1e3:.1f} ms of a {wall * 1e3:.0f} ms step ({total / wall:.2%}; the "
        "step's wall time here includes cProfile's own overhead)"
    )
    return 0


def several(args, variants: list[str], argv: list[str]) -> int:
    """Each variant in its own fresh process; then online / (student + teacher) in operator time."""
    print("$ python benchmarks/profile_step.py " + " ".join(argv))
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}; 1-minute load average {os.getloadavg()[0]:.2f}\n")
    totals = {}
    for variant in variants:
        command = [sys.executable, os.path.abspath(__file__), "--pair", args.pair, "--variant", variant]
        command += ["--steps", str(args.steps), "--rows", str(args.rows)] + (["--tiny"] if args.tiny else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
        print(done.stdout, flush=True)
        totals[variant] = float(re.search(r"all operators: ([0-9.]+) s", done.stdout).group(1))
    if {"student", "teacher", "online"} <= set(totals):
        print(
            f"operator time, online / (student + teacher): {totals['online']:.3f} / "
            f"({totals['student']:.3f} + {totals['teacher']:.3f}) = "
            f"{totals['online'] / (totals['student'] + totals['teacher']):.3f}"
        )
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}; 1-minute load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
