"""TRL side of the hfkd-vs-TRL off-policy logit-distillation benchmark (TRL 1.16.0).

TRL 1.16.0 has two trainers that distil a student from a teacher's full next-token distribution:

* ``trl.experimental.gkd.GKDTrainer`` (an ``SFTTrainer`` subclass). With ``lmbda=0`` and ``seq_kd=False`` it trains
  on the dataset's own sequences (off-policy, nothing is generated) with TRL's ``generalized_jsd_loss``. Used here.
* ``trl.DistillationTrainer`` (stable API; ``trl.experimental.distillation`` is a deprecated alias). It is on-policy
  only: every step generates completions from a ``"prompt"`` column (``_prepare_inputs`` ->
  ``_generate_and_score_completions``), and it has no ``lmbda``. It cannot consume fixed pre-tokenised batches.

See TRL_NOTES.md for the loss formula and the conversion to hfkd's loss.

Public API:
    make_trl_trainer(student, teacher, train_dataset, *, output_dir, beta, temperature, learning_rate,
                     per_device_train_batch_size, max_steps, seed, ...)
    trl_step(trainer, batch) -> float
    trl_reference_loss(student_logits, teacher_logits, labels, beta, temperature) -> torch.Tensor

On-policy (``trl.DistillationTrainer``; used by bench_onpolicy.py):
    make_trl_onpolicy_trainer(student, teacher, prompts, tokenizer, *, output_dir, beta, temperature,
                              max_new_tokens, fixed_length, learning_rate, batch_size, seed, ...)
    trl_onpolicy_step(trainer, prompts) -> (loss, generated tokens)
    trl_onpolicy_loss(trainer, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor

Run ``python benchmarks/trl_side.py`` for a quick self-check on tiny Llama models (about 10 s on CPU).
"""

from __future__ import annotations

import os

# No Hub on the benchmark machine, and TRL's trainers ping a telemetry endpoint on construction.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import warnings  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from transformers import PreTrainedTokenizerFast, default_data_collator  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the experimental namespace warns on import
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

__all__ = [
    "make_trl_trainer",
    "trl_step",
    "trl_reference_loss",
    "GKDTrainerLossTemperature",
    "make_trl_onpolicy_trainer",
    "trl_onpolicy_step",
    "trl_onpolicy_loss",
]


class GKDTrainerLossTemperature(GKDTrainer):
    """``GKDTrainer`` whose loss uses the configured temperature and multiplies by T^2.

    Stock ``GKDTrainer.compute_loss`` calls ``self.generalized_jsd_loss(..., beta=self.beta, num_items_in_batch=...)``
    without ``temperature``, so the training loss is always taken at T = 1 (``args.temperature`` only feeds on-policy
    sampling) and never scaled by T^2. This subclass changes only that call: it still runs TRL's own
    ``compute_loss`` / ``training_step`` and TRL's own ``generalized_jsd_loss`` (same tensors, same cost: the stock
    code already divides the logits by temperature=1.0), passing ``temperature=self.temperature`` and multiplying the
    result by ``self.temperature ** 2``, so the value equals hfkd's T^2-scaled loss.
    """

    def generalized_jsd_loss(  # noqa: D102 - instance method shadowing the parent's staticmethod on purpose
        self,
        student_logits,
        teacher_logits,
        labels=None,
        beta=0.5,
        temperature=1.0,
        reduction="batchmean",
        num_items_in_batch=None,
    ):
        t = float(self.temperature)
        loss = GKDTrainer.generalized_jsd_loss(
            student_logits,
            teacher_logits,
            labels=labels,
            beta=beta,
            temperature=t,
            reduction=reduction,
            num_items_in_batch=num_items_in_batch,
        )
        return loss * (t * t)


def _stub_tokenizer(pad_token_id: int = 0) -> PreTrainedTokenizerFast:
    """A tokenizer built offline: GKD/SFT only need ``pad_token_id`` from it when a collator is passed."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"<tok{i}>": i for i in range(pad_token_id)}
    vocab["<pad>"] = pad_token_id
    vocab["<unk>"] = pad_token_id + 1
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def make_trl_trainer(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    train_dataset,
    *,
    output_dir: str,
    beta: float,
    temperature: float,
    learning_rate: float,
    per_device_train_batch_size: int,
    max_steps: int,
    seed: int,
    processing_class=None,
    match_hfkd_loss: bool = True,
    **config_overrides: Any,
) -> GKDTrainer:
    """Build TRL's off-policy distillation trainer (``GKDTrainer``, ``lmbda=0``, ``seq_kd=False``).

    ``train_dataset``: a ``datasets.Dataset`` with columns ``input_ids``, ``attention_mask``, ``labels`` (labels =
    input_ids, -100 where padded), all rows the same length. It is used as-is (``skip_prepare_dataset=True``) and
    batched with ``transformers.default_data_collator`` (plain stacking), so no ``messages`` column or ChatML
    collator is needed.

    ``match_hfkd_loss``:
        True (default): if ``temperature != 1`` use ``GKDTrainerLossTemperature`` (TRL's loss at temperature T, times
        T^2), so the training loss and gradients equal hfkd's. At ``temperature == 1`` this is stock ``GKDTrainer``.
        False: stock ``GKDTrainer`` always; its loss ignores ``temperature`` (T = 1, no T^2).

    ``processing_class``: a tokenizer; only its ``pad_token_id`` is read (for the never-used generation config).
    A stub is built offline if None (otherwise SFTTrainer would call ``AutoProcessor.from_pretrained`` on the Hub).

    Defaults differing from TRL's are set for a fair comparison with a plain ``TrainingArguments`` run:
    ``activation_checkpointing=False`` (transformers 5 name of ``gradient_checkpointing``; TRL defaults it to True),
    ``bf16=False`` (TRL defaults to True when fp16 is off), ``report_to="none"``, ``save_strategy="no"``,
    ``logging_steps=1``. ``disable_dropout`` stays at GKD's default True (mutates the student). Anything else can be passed through ``config_overrides`` (any GKDConfig/
    TrainingArguments field, e.g. ``lr_scheduler_type``, ``warmup_steps``, ``max_grad_norm``, ``bf16``).

    Note: the trainer mutates ``student`` in place (SFTTrainer wraps ``student.forward`` with a fused-LM-head shim
    that is a no-op unless ``fused_lm_head=True`` is passed; GKD sets dropout to 0). Give each side its own copy.
    """
    if processing_class is None:
        pad_id = getattr(student.config, "pad_token_id", None)
        processing_class = _stub_tokenizer(0 if pad_id is None else int(pad_id))

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        # off-policy: never sample from the student (lmbda) nor the teacher (seq_kd)
        lmbda=0.0,
        seq_kd=False,
        beta=beta,
        temperature=temperature,
        learning_rate=learning_rate,
        per_device_train_batch_size=per_device_train_batch_size,
        gradient_accumulation_steps=1,
        max_steps=max_steps,
        seed=seed,
        data_seed=seed,
        activation_checkpointing=False,  # transformers 5.x name of gradient_checkpointing (TRL defaults it to True)
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
    )
    kwargs.update(config_overrides)
    args = GKDConfig(**kwargs)

    cls = GKDTrainerLossTemperature if (match_hfkd_loss and float(temperature) != 1.0) else GKDTrainer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = cls(
            model=student,
            teacher_model=teacher,
            args=args,
            data_collator=default_data_collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
        )
    assert trainer.lmbda == 0.0 and not trainer.seq_kd
    return trainer


def trl_step(trainer: GKDTrainer, batch: dict[str, torch.Tensor]) -> float:
    """One optimisation step on an already-collated batch: ``training_step`` + ``optimizer.step`` + ``zero_grad``.

    ``training_step`` does forward (student with grad, teacher under no_grad), loss and backward. The optimizer and
    scheduler are created on first use (``create_optimizer_and_scheduler(num_training_steps=args.max_steps)``).
    No gradient clipping and no ``lr_scheduler.step()`` (as the brief specifies), so the LR stays at its initial
    scheduled value: ``learning_rate`` for the default linear schedule without warmup (with ``warmup_steps > 0`` it
    would stay 0). ``num_items_in_batch=None``, so the loss is TRL's ``batchmean``: divided by the number of
    positions with ``labels[:, 1:] != -100`` in this batch (what ``Trainer.train`` passes too when GA = 1).
    Returns the loss as a float (the value that was backpropagated).
    """
    if trainer.optimizer is None:
        trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    # Set inside Trainer's train loop only; training_step divides the loss by it when num_items_in_batch is None.
    if getattr(trainer, "current_gradient_accumulation_steps", None) is None:
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    inputs = dict(batch)  # training_step may replace keys (on-policy path) and deletes its reference
    loss = trainer.training_step(trainer.model, inputs, None)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


def trl_reference_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    temperature: float,
    *,
    scale_by_t2: bool = False,
) -> torch.Tensor:
    """TRL's own ``GKDTrainer.generalized_jsd_loss`` on full-sequence logits, shifted as ``GKDTrainer.compute_loss``
    shifts them (``logits[:, :-1]``, ``labels[:, 1:]``), with ``temperature`` passed explicitly.

    Returns TRL's number: mean over positions with ``labels[:, 1:] != -100`` of JSD_beta(teacher_T, student_T),
    *without* T^2. hfkd's loss on the same logits is ``temperature**2 * trl_reference_loss(...)`` (or pass
    ``scale_by_t2=True``). Stock ``GKDTrainer`` training uses this with temperature=1 regardless of its config.
    Logits are used in the dtype given (TRL does not upcast); pass float32 to compare with hfkd, which upcasts.
    """
    loss = GKDTrainer.generalized_jsd_loss(
        student_logits[:, :-1, :],
        teacher_logits[:, :-1, :],
        labels=labels[:, 1:],
        beta=beta,
        temperature=temperature,
    )
    return loss * (temperature**2) if scale_by_t2 else loss


# --------------------------------------------------------------------------------------------------------------------
# On-policy: trl.DistillationTrainer (stable API in TRL 1.16)
# --------------------------------------------------------------------------------------------------------------------


def make_trl_onpolicy_trainer(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompts: list[str],
    tokenizer,
    *,
    output_dir: str,
    beta: float,
    temperature: float,
    max_new_tokens: int,
    fixed_length: bool,
    learning_rate: float,
    batch_size: int,
    seed: int,
    max_steps: int = 1000,
    **config_overrides: Any,
):
    """Build TRL's on-policy distillation trainer, ``trl.DistillationTrainer``, on a ``"prompt"`` column of texts.

    Every training step tokenizes its prompts with ``tokenizer`` (no special tokens are added unless the tokenizer
    adds them itself), samples one completion per prompt from the student (``do_sample=True`` at ``temperature``,
    top_p 1, top_k 0, up to ``max_new_tokens`` = ``max_completion_length``, cut after the first EOS of the tokenizer's
    and the model's EOS ids), and trains on the generalised JSD between the student and the teacher over the
    completion tokens (``beta``: 0 forward KL, 1 reverse KL, mixture M = beta p_teacher + (1 - beta) p_student;
    softmax at ``temperature`` and no T^2 factor; divided by the number of completion tokens).

    ``fixed_length``: ``generation_kwargs={"min_new_tokens": max_new_tokens}``, so that EOS is suppressed and every
    completion is exactly ``max_new_tokens`` long.

    Defaults differing from TRL's, for a like-for-like comparison with a plain ``TrainingArguments`` run (as
    ``make_trl_trainer``): ``activation_checkpointing=False`` (TRL defaults gradient checkpointing on), ``bf16=False``,
    ``report_to="none"``, ``save_strategy="no"``, ``shuffle_dataset=False``. Dropout is left as the model has it
    (TRL's ``disable_dropout`` defaults to False here). The trainer mutates ``student`` (pad token id on its config
    and generation config, model tags): give it its own copy.
    """
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl import DistillationConfig, DistillationTrainer

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        beta=beta,
        temperature=temperature,
        max_completion_length=max_new_tokens,
        top_p=1.0,
        top_k=0,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=max_steps,
        seed=seed,
        data_seed=seed,
        activation_checkpointing=False,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        shuffle_dataset=False,
        disable_tqdm=True,
    )
    if fixed_length:
        kwargs["generation_kwargs"] = {"min_new_tokens": max_new_tokens}
    kwargs.update(config_overrides)
    args = DistillationConfig(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": list(prompts)}),
            processing_class=tokenizer,
        )
    return trainer


def trl_onpolicy_step(trainer, prompts: list[str]) -> tuple[float, int]:
    """One on-policy optimisation step as ``Trainer``'s loop takes it (no accumulation): ``get_batch_samples`` on the
    collated rows (TRL's collator is the identity: a list of ``{"prompt": text}``), ``training_step`` (which runs
    ``_prepare_inputs``: tokenize, generate, pad; then the chunked JSD loss and backward), ``optimizer.step()``,
    ``zero_grad()``, and the loss read on the host.

    Returns (loss, number of completion tokens the loss was taken on, EOS included).
    """
    if trainer.optimizer is None:
        trainer.model.train()
        trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
    rows = trainer.data_collator([{"prompt": p} for p in prompts])
    samples, num_items = trainer.get_batch_samples(iter([rows]), 1, trainer.args.device)
    loss = trainer.training_step(trainer.model, samples[0], num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1
    tokens = int(trainer._buffered_inputs[0]["completion_mask"].sum())
    return float(loss), tokens


def trl_onpolicy_loss(
    trainer,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> torch.Tensor:
    """TRL's own training loss (``DistillationTrainer.compute_loss``, student in train mode, with gradients) on given
    sequences laid out as TRL lays out a generated batch: prompts left-padded, completions right-padded, masks 1 on
    real tokens; ``num_items_in_batch`` = completion tokens, as ``_generate_and_score_completions`` counts them."""
    trainer.model.train()
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "num_items_in_batch": completion_mask.sum(),
    }
    return trainer.compute_loss(trainer.model, inputs)


# --------------------------------------------------------------------------------------------------------------------
# Self-check on tiny models: python benchmarks/trl_side.py
# --------------------------------------------------------------------------------------------------------------------


def _hfkd_definition(s_logits, t_logits, labels, beta, temperature):
    """The benchmark's loss, written from its definition in float64 (independent of both libraries)."""
    s = torch.log_softmax(s_logits[:, :-1].double() / temperature, -1)
    t = torch.log_softmax(t_logits[:, :-1].double() / temperature, -1)
    mask = labels[:, 1:] != -100

    def kl(lp, lq):
        return (lp.exp() * (lp - lq)).sum(-1)

    if beta == 0:
        per = kl(t, s)
    elif beta == 1:
        per = kl(s, t)
    else:
        m = torch.logaddexp(
            t + torch.log(torch.tensor(beta, dtype=t.dtype)), s + torch.log1p(-torch.tensor(beta, dtype=t.dtype))
        )
        per = beta * kl(t, m) + (1 - beta) * kl(s, m)
    return temperature**2 * per[mask].sum() / mask.sum()


def _selfcheck() -> None:  # pragma: no cover - manual check
    import tempfile
    import time

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, seq, n_rows, bs = 128, 32, 64, 8

    def tiny(layers):
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
            pad_token_id=0,
            initializer_range=0.2,  # sharper than the default 0.02, so the two models' distributions differ
        )
        return LlamaForCausalLM(cfg)

    # 1. Loss conversion on random logits, with a few masked label positions.
    B, L = 3, 7
    s_logits = torch.randn(B, L, vocab) * 3
    t_logits = torch.randn(B, L, vocab) * 3
    labels = torch.randint(0, vocab, (B, L))
    labels[0, :3] = -100
    labels[2, -2:] = -100
    try:
        from hfkd.losses.logits import generalized_jsd as hfkd_jsd
    except Exception:  # hfkd not importable: compare with the definition only
        hfkd_jsd = None
    print("conversion check (B=3, L=7, V=128, 14 of 18 shifted positions counted):")
    for beta in (0.0, 0.5, 0.9, 1.0):
        for T in (1.0, 2.0):
            trl_raw = trl_reference_loss(s_logits, t_logits, labels, beta, T).item()
            ref = _hfkd_definition(s_logits, t_logits, labels, beta, T).item()
            line = f"  beta={beta} T={T}: TRL={trl_raw:.6f} definition={ref:.6f} ratio={ref / trl_raw:.6f}"
            if hfkd_jsd is not None:
                mask = labels[:, 1:] != -100
                per = hfkd_jsd(s_logits[:, :-1], t_logits[:, :-1], temperature=T, beta=beta)
                line += f" hfkd={(per[mask].sum() / mask.sum()).item():.6f}"
            print(line)
            assert abs(ref - T * T * trl_raw) <= 1e-5 * max(1.0, abs(ref)), (beta, T)

    # 2. A few real steps; make sure nothing is generated.
    student, teacher = tiny(2), tiny(4)
    teacher.eval()
    ids = torch.randint(1, vocab, (n_rows, seq))
    ds = Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": ids.tolist()}
    )
    calls = {"generate": 0}

    def _no_generate(*a, **k):
        calls["generate"] += 1
        raise RuntimeError("generate() must not be called in off-policy distillation")

    student.generate = _no_generate
    teacher.generate = _no_generate

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trl_trainer(
            student,
            teacher,
            ds,
            output_dir=out,
            beta=0.5,
            temperature=2.0,
            learning_rate=3e-3,
            per_device_train_batch_size=bs,
            max_steps=10,
            seed=0,
        )
        print(f"trainer: {type(trainer).__name__}, lmbda={trainer.lmbda}, seq_kd={trainer.seq_kd}")
        batch = default_data_collator([ds[i] for i in range(bs)])
        with torch.no_grad():
            ref = _hfkd_definition(
                student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                batch["labels"],
                0.5,
                2.0,
            ).item()
        assert not getattr(trainer.model, "is_activation_checkpointing", False)
        losses, times = [], []
        for step in range(10):
            b = batch if step == 0 else default_data_collator([ds[(step * bs + i) % n_rows] for i in range(bs)])
            t0 = time.perf_counter()
            losses.append(trl_step(trainer, b))
            times.append(time.perf_counter() - t0)
        print(f"step-0 loss {losses[0]:.6f} vs definition on same batch {ref:.6f}")
        assert abs(losses[0] - ref) < 1e-4 * max(1.0, ref)
        print("losses:", " ".join(f"{x:.4f}" for x in losses))
        print("step times (s):", " ".join(f"{x:.3f}" for x in times))
        assert losses[-1] < losses[0], "loss did not decrease"
        with torch.no_grad():
            after = trl_reference_loss(
                trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                batch["labels"],
                0.5,
                2.0,
                scale_by_t2=True,
            ).item()
        print(f"first batch before {ref:.6f} -> after 10 steps {after:.6f}")
        assert after < ref
        assert calls["generate"] == 0
        print("generate() calls:", calls["generate"])
    print("OK")


if __name__ == "__main__":
    _selfcheck()
