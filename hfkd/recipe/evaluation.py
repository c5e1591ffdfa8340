"""The recipe's evaluation: each model's metric on the held-out split and the per-row scores behind it, the causal
LMs' bits per byte on the same held-out text, the latency of teacher and student, and each early exit of a student
trained with exit heads."""

import math
import os
import shutil
import statistics
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Trainer

from ..batch import SPANS, TEACHER_PREFIX, TEACHER_SPANS
from ..early_exit import EarlyExitModel, measure_exits
from ..lm_eval import bits_per_byte
from ..measure import compare_latency, forward_latency_ms
from ..metrics import load_metric
from .arguments import stage_args
from .data import collator
from .state import RunState


@dataclass
class Scores:
    """The final evaluation of every model on the held-out split."""

    teacher_metric: float
    student_metric: float
    teacher_text: dict | None
    """Causal LMs: the teacher's held-out text evaluation (hfkd.lm_eval.bits_per_byte); None for classifiers."""
    student_text: dict | None
    """Causal LMs: the student's held-out text evaluation; None for classifiers."""
    student_rows: dict
    """The student's per-row scores behind its metric (`score`), for the paired comparison."""
    peer_metrics: dict[str, float]
    """Each peer's metric by name ({} without peers)."""


def evaluate_models(state: RunState) -> Scores:
    """Teacher, student and peers on the held-out split."""
    teacher_metric, teacher_text, _ = evaluate_all(state, state.teacher)
    student_metric, student_text, student_rows = evaluate_all(state, state.student)
    return Scores(
        teacher_metric=teacher_metric,
        student_metric=student_metric,
        teacher_text=teacher_text,
        student_text=student_text,
        student_rows=student_rows,
        peer_metrics={name: evaluate(state, peer) for name, peer in state.peers.items()},
    )


def evaluate(state: RunState, model) -> float:
    """The recipe's metric on the held-out split, each model reading its own tokenization (the teacher its
    tokenizer's, every other model the student's): accuracy; for causal LMs perplexity over the packed blocks, or
    bits per byte when the student has its own tokenizer."""
    return score(state, model)[0]


def score(state: RunState, model) -> tuple[float, dict]:
    """`evaluate`'s metric and the per-row scores behind it, which a paired comparison of two models on the same
    rows needs (hfkd.compare): {"correct": [...]} per row for classifiers; {"loss": [...], "count": [...]} per
    packed block for causal LMs (summed negative log-likelihood in nats, predicted tokens), or per held-out text
    piece across tokenizers (bits, bytes)."""
    data, lm = state.data, state.recipe.task == "causal-lm"
    if lm and data.across:
        return _text_score(text_eval(state, model))
    args = stage_args(state.config, os.path.join(state.out, "checkpoints", "_eval"))
    teacher = model is state.teacher
    try:
        trainer = Trainer(
            model=model,
            args=args,
            data_collator=collator(data, state.recipe.task, state.data_args, "teacher" if teacher else "student"),
            processing_class=data.processor if teacher else data.student_processor,
            preprocess_logits_for_metrics=_block_nll if lm else None,
        )
        prediction = trainer.predict(data.eval_ds if teacher else data.student_eval_ds)
    finally:
        # Trainer makes its output_dir, which evaluation never writes into: a scratch folder, not left behind.
        if state.config.process_index == 0:
            shutil.rmtree(args.output_dir, ignore_errors=True)
    outputs = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    if lm:
        loss, count = np.asarray(outputs[:, 0], np.float64), np.asarray(outputs[:, 1], np.float64)
        perplexity = math.exp(min(loss.sum() / max(count.sum(), 1.0), 50.0))
        return perplexity, {"loss": loss.tolist(), "count": count.tolist()}
    predicted = np.argmax(outputs, -1)
    metric = load_metric("accuracy")
    accuracy = metric.compute(predictions=predicted.tolist(), references=prediction.label_ids.tolist())["accuracy"]
    return accuracy, {"correct": (predicted == prediction.label_ids).astype(int).tolist()}


def text_eval(state: RunState, model) -> dict:
    """Bits per byte and perplexity per own token on the held-out text pieces (hfkd.lm_eval), the same text for
    every model whatever its tokenizer."""
    data = state.data
    return bits_per_byte(
        model,
        data.processor if model is state.teacher else data.student_processor,
        data.lm_texts,
        max_length=state.data_args.max_length,
        batch_size=state.config.per_device_eval_batch_size,
    )


def evaluate_all(state: RunState, model) -> tuple[float, dict | None, dict]:
    """The recipe's metric, for causal LMs the held-out text's bits per byte (None for classifiers), and the
    metric's per-row scores (`score`)."""
    if state.recipe.task != "causal-lm":
        metric, rows = score(state, model)
        return metric, None, rows
    text = text_eval(state, model)
    metric, rows = _text_score(text) if state.data.across else score(state, model)
    return metric, text, rows


def latency(state: RunState) -> tuple[float, float]:
    """Median forward latencies of teacher and student on one batch of held-out rows, each model reading its own
    tokenization (or, across modalities, its own modality) of the same examples (hfkd.measure.compare_latency when
    they share one)."""
    data, task, data_args = state.data, state.recipe.task, state.data_args
    n = min(state.recipe.latency_batch_size, len(data.student_eval_ds))
    repeats = state.recipe.latency_repeats
    if data.cross_modal:  # each model on its own modality of the same rows (the teacher's text, the student's audio)
        teacher_batch = collator(data, task, data_args, "teacher")([data.eval_ds[i] for i in range(n)])
        student_batch = collator(data, task, data_args, "student")([data.student_eval_ds[i] for i in range(n)])
    elif not data.across:
        batch = collator(data, task, data_args, "teacher")([data.eval_ds[i] for i in range(n)])
        return compare_latency(state.teacher, state.student, batch, repeats)
    else:
        batch = collator(data, task, data_args, "distill")([data.distill_eval_ds[i] for i in range(n)])
        teacher_batch = {k[len(TEACHER_PREFIX) :]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
        student_batch = {
            k: v for k, v in batch.items() if not k.startswith(TEACHER_PREFIX) and k not in (SPANS, TEACHER_SPANS)
        }
    teacher_times, student_times = [], []
    for _ in range(max(1, repeats // 2)):  # alternating rounds, as compare_latency: drift hits both alike
        teacher_times.append(forward_latency_ms(state.teacher, teacher_batch, repeats=2, warmup=1))
        student_times.append(forward_latency_ms(state.student, student_batch, repeats=2, warmup=1))
    return statistics.median(teacher_times), statistics.median(student_times)


def early_exits(state: RunState) -> list[dict]:
    """Each exit of a student trained with exit heads (byot): its accuracy on the held-out rows and its median latency
    on the latency batch, every layer above the exit left out (hfkd.early_exit.measure_exits)."""
    data = state.data
    model = EarlyExitModel.from_pretrained(state.out, model=state.student)
    return measure_exits(
        model,
        data.student_eval_ds,
        collator(data, state.recipe.task, state.data_args, "student"),
        batch_size=state.config.per_device_eval_batch_size,
        latency_rows=min(state.recipe.latency_batch_size, len(data.student_eval_ds)),
        repeats=state.recipe.latency_repeats,
    )


def _block_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per packed block: [summed next-token negative log-likelihood in nats, predicted tokens] (the causal LM's
    loss before its mean), so that blocks can be paired across models (hfkd.compare.paired_blocks)."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    target = labels[:, 1:]
    keep = target != -100
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return torch.stack([torch.where(keep, nll.double(), 0.0).sum(-1), keep.sum(-1).double()], dim=-1)


def _text_score(text: dict) -> tuple[float, dict]:
    """Across tokenizers: the bits per byte of hfkd.lm_eval.bits_per_byte and its per-piece sums (bits, bytes)."""
    return text["bits_per_byte"], {"loss": text["text_bits"], "count": text["text_bytes"]}


def text_fields(text: dict | None) -> dict:
    """A model's held-out text evaluation (hfkd.lm_eval.bits_per_byte) as metrics.json holds it ({} without one)."""
    if text is None:
        return {}
    return {
        "bits_per_byte": text["bits_per_byte"],
        "own_token_perplexity": text["perplexity"],
        "eval_tokens": text["tokens"],
        "eval_bytes": text["bytes"],
    }
