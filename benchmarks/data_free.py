"""Data-free distillation on Fashion-MNIST (issue 23 item 1): the student on synthesised data only, against the same
student on the real data and at its random start.

    python benchmarks/data_free.py --seeds 0,1,2 --json benchmarks/data_free.json --markdown benchmarks/DATA_FREE.md
    python benchmarks/data_free.py --tiny                    # tiny models, a few rows of data (a minute)

The pair is benchmarks/methods.py's conv pair (its functions are imported, not copied): the ResNet teacher (widths
32/64/128, two blocks per stage, trained once on the 60,000 training images and kept in --teacher-dir, by default
methods.py's own outputs/methods, so an existing teacher is reused) and the smaller ResNet student (widths 16/32,
random init seeded by the run's seed). Every row starts from the same student weights for a seed, takes the same
number of optimiser steps (--steps) of the same batch (--batch) and is scored on the 10,000 test images:

- random: the student as initialised (no training);
- labels: the real training images (--fashion-train-size of them) with their labels, cross-entropy alone;
- kd-real: the same real images without their labels, the teacher's logits alone (KL at T = 4, methods.py's
  Fashion-MNIST temperature): what the data-free rows would reach with the real images;
- deepinversion: --num-images images synthesised from the teacher by DeepInversion (hfkd.synthesis, a new set per
  seed, kept under --out), then the kd-real loss on them alone;
- adversarial: the adversarial generator (DFAD's loss, generator and optimisers; hfkd.synthesis.adversarial_distill)
  with --steps student steps, i.e. --steps / 5 rounds.

The trainer rows use methods.py's Fashion-MNIST settings (AdamW, lr 1e-3, weight decay 0.01, 5% warm-up); the
adversarial row keeps DFAD's optimisers (student SGD lr 0.01, momentum 0.9; generator Adam lr 1e-3). Gains are paired
per seed (same start, same test rows) with their 95% interval by hfkd.compare.compare_seeds.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import methods  # noqa: E402  (sets the offline environment and quiets the libraries)
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Trainer, TrainingArguments, default_data_collator  # noqa: E402

from hfkd import DistillationConfig, DistillationTrainer  # noqa: E402
from hfkd.compare import compare_seeds  # noqa: E402
from hfkd.synthesis import (  # noqa: E402
    AdversarialConfig,
    DeepInversionConfig,
    ImageSpace,
    adversarial_distill,
    deep_inversion,
    save_synthesized,
    synthesized_dataset,
    transfer_rows,
)

ROWS = ("random", "labels", "kd-real", "deepinversion", "adversarial")
TITLES = {
    "random": "random start (no training)",
    "labels": "real images with their labels",
    "kd-real": "real images, the teacher's logits only",
    "deepinversion": "DeepInversion images only, the teacher's logits",
    "adversarial": "adversarial generator (DFAD), no images",
}
SPACE = ImageSpace(1, 28, 28, (methods.FASHION_MEAN,), (methods.FASHION_STD,))
TRAINER_SETTINGS = dict(learning_rate=1e-3, weight_decay=0.01, warmup_steps=0.05)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (student init, data order, synthesis)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny models and a few rows of data (a minute)")
    parser.add_argument("--steps", type=int, default=1000, help="optimiser steps of the student in every row")
    parser.add_argument("--batch", type=int, default=64, help="images per student step in every row")
    parser.add_argument("--num-images", type=int, default=1024, help="DeepInversion: images synthesised per seed")
    parser.add_argument("--di-iterations", type=int, default=500, help="DeepInversion: Adam steps per batch")
    parser.add_argument("--di-batch", type=int, default=256, help="DeepInversion: images optimised together")
    parser.add_argument(
        "--di-bn-weight", type=float, default=DeepInversionConfig.bn_weight, help="DeepInversion: R_feature weight"
    )
    parser.add_argument("--fashion-train-size", type=int, default=10000, help="real training images (labels, kd-real)")
    parser.add_argument("--teacher-dir", default=None, help="where methods.py keeps its teacher (outputs/methods)")
    parser.add_argument("--out", default=None, help="synthesised sets and scratch (outputs/data-free; tiny: temp)")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--markdown", default=None, help="write the report here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    for name in ("steps", "batch", "num_images", "di_iterations", "di_batch", "fashion_train_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tiny:
        args.steps, args.batch, args.num_images, args.di_iterations, args.di_batch = 4, 16, 32, 3, 16
    return args


def _pair(args, scratch: str):
    """methods.py's conv pair: its teacher (trained and kept in --teacher-dir if not there yet) and student."""
    teacher_dir = args.teacher_dir or (scratch if args.tiny else os.path.join(ROOT, "outputs", "methods"))
    os.makedirs(teacher_dir, exist_ok=True)
    settings = types.SimpleNamespace(
        tiny=args.tiny,
        out=teacher_dir,
        fashion_train_size=args.fashion_train_size,
        fashion_teacher_train_size=60000,
        fashion_teacher_epochs=1.0,
        fashion_epochs=2.0,
    )
    pairs = {p.name: p for p in methods.fashion_pairs(settings, scratch)}
    return pairs["fashion-resnet"]


def _trainer_args(output_dir: str, seed: int, args) -> dict:
    return dict(
        output_dir=output_dir,
        seed=seed,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=50,
        **TRAINER_SETTINGS,
    )


def _without_labels(dataset):
    plain = dataset.with_format(None)
    return plain.map(lambda batch: {"labels": [-100] * len(batch["labels"])}, batched=True).with_format("torch")


def _distil(pair, student, rows, seed, args, workdir):
    config = DistillationConfig(
        **_trainer_args(workdir, seed, args), task_weight=0.0, logit_weight=1.0, temperature=pair.kd_temperature
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=pair.teacher, args=config, train_dataset=rows, data_collator=default_data_collator
    )
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.train()
    return {"student_steps": trainer.state.global_step}


def _synthesised(pair, seed: int, args, out: str) -> tuple[str, dict]:
    """The seed's DeepInversion set, synthesised once and kept under --out (its folder names its settings)."""
    config = DeepInversionConfig(
        num_images=args.num_images,
        batch_size=args.di_batch,
        iterations=args.di_iterations,
        bn_weight=args.di_bn_weight,
        seed=seed,
    )
    teacher_record = pair.notes["teacher_record"]
    key = json.dumps({"config": vars(config), "teacher": teacher_record, "tiny": args.tiny}, sort_keys=True)
    folder = os.path.join(out, f"deepinversion-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}")
    settings_path = os.path.join(folder, "hfkd_synthesis.json")
    if os.path.isfile(settings_path):
        with open(settings_path) as handle:
            print(f"[data-free] seed {seed}: DeepInversion set reused from {folder}", flush=True)
            return folder, {**json.load(handle), "reused": True}
    result = deep_inversion(pair.teacher, config, SPACE, log_every=0)
    save_synthesized(synthesized_dataset(result.pixel_values, result.targets, SPACE), folder, result.record)
    print(
        f"[data-free] seed {seed}: {args.num_images} DeepInversion images in {result.record['seconds']:.0f} s, the "
        f"teacher predicts their target for {result.record['teacher_agrees']:.1%}",
        flush=True,
    )
    return folder, {**result.record, "reused": False}


def run_row(row: str, pair, seed: int, args, out: str, workdir: str) -> dict:
    student = pair.make_student(seed)
    started = time.perf_counter()
    extra: dict = {}
    if row == "labels":
        trainer = Trainer(
            model=student,
            args=TrainingArguments(**_trainer_args(workdir, seed, args)),
            train_dataset=pair.train,
            data_collator=default_data_collator,
        )
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
        extra = {"student_steps": trainer.state.global_step, "images": len(pair.train)}
    elif row == "kd-real":
        extra = {**_distil(pair, student, _without_labels(pair.train), seed, args, workdir), "images": len(pair.train)}
    elif row == "deepinversion":
        folder, record = _synthesised(pair, seed, args, out)
        started = time.perf_counter()  # training time; the synthesis's is recorded apart
        extra = {**_distil(pair, student, transfer_rows(folder), seed, args, workdir), "images": args.num_images}
        extra["synthesis"] = {
            k: record[k] for k in ("seconds", "teacher_agrees", "batch_norm_layers", "config", "reused") if k in record
        }
    elif row == "adversarial":
        rounds = max(args.steps // AdversarialConfig.student_steps, 1)
        config = AdversarialConfig(iterations=rounds, batch_size=args.batch, seed=seed)
        result = adversarial_distill(pair.teacher, student, config, SPACE, log_every=0)
        extra = {
            "student_steps": result.record["student_steps"],
            "rounds": rounds,
            "last": result.record["history"][-1],
        }
    correct = methods.correct_rows(student.eval(), pair.test, pair.collator, 256, workdir)
    seconds = time.perf_counter() - started
    accuracy = float(correct.mean())
    print(f"[data-free] seed {seed} {row}: accuracy {accuracy:.4f} ({seconds:.0f} s)", flush=True)
    return {
        "seed": seed,
        "accuracy": accuracy,
        "seconds": round(seconds, 1),
        "correct": methods._row_string(correct),
        **extra,
    }


def summarise(results: dict) -> None:
    """Per row: mean and std of the accuracy, and the paired gain over random start and over labels."""
    rows = results["rows"]
    for name, row in rows.items():
        accuracies = [run["accuracy"] for run in row["runs"]]
        if not accuracies:
            continue
        row["accuracy_mean"] = statistics.mean(accuracies)
        row["accuracy_std"] = statistics.stdev(accuracies) if len(accuracies) > 1 else None
        for base in ("random", "labels"):
            if base == name or base not in rows or not rows[base]["runs"]:
                continue
            theirs = {run["seed"]: run for run in rows[base]["runs"]}
            paired = [(run, theirs[run["seed"]]) for run in row["runs"] if run["seed"] in theirs]
            gains = [a["accuracy"] - b["accuracy"] for a, b in paired]
            if not gains:
                continue
            interval = compare_seeds(
                gains,
                [methods._row_bits(a["correct"]) for a, _ in paired],
                [methods._row_bits(b["correct"]) for _, b in paired],
            )
            row[f"vs_{base}"] = {"gains": gains, "mean": statistics.mean(gains), "interval": interval}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _versus(row: dict, base: str) -> str:
    entry = row.get(f"vs_{base}")
    if not entry:
        return ""
    judged = entry["interval"]
    if not judged:
        return f"{100 * entry['mean']:+.2f}"
    low, high = judged["interval"]
    return f"{100 * entry['mean']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] {judged['verdict']}"


def markdown(results: dict) -> str:
    meta, teacher = results["meta"], results["teacher"]
    lines = [
        "# Data-free distillation on Fashion-MNIST",
        "",
        f"Written by `benchmarks/data_free.py` (command: `{meta['command']}`). Teacher: {teacher['note']} "
        f"({100 * teacher['accuracy']:.2f}% on the test images). Student: {meta['student']}. Data: {meta['data']}.",
        f"Every trained row: {meta['steps']} student steps of {meta['batch']} images. Seeds: "
        f"{', '.join(map(str, meta['seeds']))}. Machine: {meta['machine']['cpus']} CPUs, torch "
        f"{meta['machine']['torch']}; started {meta['started']}, wall time {meta.get('minutes', 'n/a')} min.",
        "",
        "| row | the student trains on | accuracy % (mean ± std) | per seed | vs random start, pt [95%] | vs labels, pt "
        "[95%] | train s (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in results["rows"].items():
        if not row["runs"]:
            continue
        std = f" ± {_pct(row['accuracy_std'])}" if row["accuracy_std"] is not None else ""
        seeds = ", ".join(_pct(run["accuracy"]) for run in row["runs"])
        seconds = statistics.mean(run["seconds"] for run in row["runs"])
        lines.append(
            f"| {name} | {TITLES[name]} | {_pct(row['accuracy_mean'])}{std} | {seeds} | {_versus(row, 'random')} | "
            f"{_versus(row, 'labels')} | {seconds:.0f} |"
        )
    di = results["rows"].get("deepinversion")
    if di and di["runs"]:
        synthesis = [run["synthesis"] for run in di["runs"]]
        agrees = ", ".join(f"{100 * s['teacher_agrees']:.1f}%" for s in synthesis)
        cost = ", ".join(f"{s['seconds']:.0f} s" for s in synthesis)
        config = synthesis[0]["config"]
        lines += [
            "",
            f"DeepInversion: {meta['num_images']} images per seed, {config['iterations']} Adam iterations per batch of "
            f"{config['batch_size']}, lr {config['lr']}, bn_weight {config['bn_weight']}, tv_l2_weight "
            f"{config['tv_l2_weight']}, jitter {config['jitter']}; the teacher predicts the target class for {agrees} "
            f"of them; synthesis took {cost} (not in the train column).",
        ]
    adv = results["rows"].get("adversarial")
    if adv and adv["runs"]:
        lines += [
            "",
            f"Adversarial: {adv['runs'][0]['rounds']} round(s) of 5 student steps and 1 generator step, batch "
            f"{meta['batch']}, DFAD's optimisers; last logged student L1 discrepancy per seed: "
            + ", ".join(f"{run['last']['student_loss']:.3f}" for run in adv["runs"])
            + ".",
        ]
    return "\n".join(lines) + "\n"


def _write(results: dict, args) -> None:
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown(results))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="hfkd-data-free-")
    out = args.out or (scratch if args.tiny else os.path.join(ROOT, "outputs", "data-free"))
    os.makedirs(out, exist_ok=True)
    started = time.perf_counter()
    try:
        pair = _pair(args, scratch)
        results = {
            "meta": {
                "command": "python benchmarks/data_free.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "tiny": args.tiny,
                "seeds": args.seeds,
                "steps": args.steps,
                "batch": args.batch,
                "num_images": args.num_images,
                "student": pair.notes["student"],
                "data": pair.notes["data"],
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads(),
                },
            },
            "teacher": {"note": pair.notes["teacher"], "accuracy": pair.notes["teacher_accuracy"]},
            "rows": {row: {"title": TITLES[row], "runs": []} for row in ROWS if row in args.rows},
        }
        for seed in args.seeds:
            for row in results["rows"]:
                if row == "random":
                    correct = methods.correct_rows(
                        pair.make_student(seed).eval(), pair.test, pair.collator, 256, scratch
                    )
                    run = {"seed": seed, "accuracy": float(correct.mean()), "seconds": 0.0}
                    run["correct"] = methods._row_string(correct)
                else:
                    run = run_row(row, pair, seed, args, out, os.path.join(scratch, f"{row}-{seed}"))
                results["rows"][row]["runs"].append(run)
                summarise(results)
                _write(results, args)
        results["meta"]["minutes"] = round((time.perf_counter() - started) / 60, 1)
        results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _write(results, args)
        print(markdown(results))
        return results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
