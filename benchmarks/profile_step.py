"""Where a step's time goes: torch.profiler over a few steps of one variant, top operators by self CPU time.

python benchmarks/profile_step.py --pair smollm2 --variant online   # student|teacher|online|cached|full-logits

`teacher` profiles the teacher's forward alone (as bench_distill.py times it); the others a whole step.
"""

import argparse
import copy
import os
import sys
import tempfile

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
        "--variant", default="online", choices=["student", "teacher", "online", "cached", "full-logits"]
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25, help="operators to list")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)

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
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        for i in range(args.steps):
            run(i + 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
