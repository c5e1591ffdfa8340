"""On-policy distillation and sequence-level KD: a micro-batch's completions are generated before the step.

- **GKD** (Agarwal et al., ICLR 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes"): with probability `lmbda` a micro-batch's completions are replaced by ones the *student* samples from
  the batch's prompts, and the divergence to the teacher is taken on those, so the student learns where its own
  generations lead it. `lmbda=0` is ordinary (off-policy, supervised) KD. The paper pairs it with the generalised
  JSD (`logit_loss="jsd"`, `jsd_beta=0.5` is a common choice) and no task loss; TRL's GKDConfig defaults are lmbda
  0.5, beta 0.5, temperature 0.9, max_new_tokens 128, seq_kd False.
- **Sequence-level KD** (Kim & Rush, EMNLP 2016, "Sequence-Level Knowledge Distillation"), `seq_kd`: the micro-batches
  that are not on-policy get completions the *teacher* samples, so the task loss learns the teacher's sequences.

The data are causal-LM rows whose `labels` are -100 on the prompt (and padding) and equal `input_ids` on the
completion (`hfkd.data.tokenize_prompt_completion` builds them). A row's prompt is its real tokens before its first
label; the prompts are left-padded for `generate`, and the row becomes prompt + completion (up to `max_new_tokens`,
ending at the first EOS, which is kept), right-padded, labelled on the completion only. Prompt tokens never count.

The trainer does this in `get_batch_samples`, for the whole accumulation window before any forward, so that every
term's units (the completion tokens) and `num_items_in_batch` are counted on the sequences the models see.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .batch import TEACHER_ID
from .checks import collator_kind, visible_columns

IGNORE_INDEX = -100
# The batch keys a generated row replaces; any other key that runs along the sequence would no longer line up.
REBUILT_KEYS = ("input_ids", "attention_mask", "labels")
_SCAN_ROWS = 65_536

_NEEDS = (
    "On-policy distillation (lmbda > 0) and seq_kd generate a completion for each row's prompt, read from the "
    "labels: -100 on the prompt tokens (and padding), the token ids on the completion (hfkd.data."
    "tokenize_prompt_completion builds such rows from prompt/completion or messages columns)"
)


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are sampled (from `DistillationConfig`) and what the models allow.

    Attributes:
        max_new_tokens: the most tokens per completion.
        temperature: the sampling temperature (`generation_temperature`).
        top_p: nucleus sampling (1 = off).
        top_k: top-k sampling (0 = off).
        pad_token_id: the id written at padding positions.
        eos_token_ids: the ids that end a completion (may be empty: completions then run to `max_new_tokens`).
        max_positions: the fewest `max_position_embeddings` of the models that see the sequences (None: no limit).
    """

    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    pad_token_id: int
    eos_token_ids: tuple[int, ...]
    max_positions: int | None


def generation_settings(args, generators: list, scorers: list, processing_class=None) -> GenerationSettings:
    """Settings from the config; pad and EOS ids from the generating models' generation config, then their config,
    then the tokenizer; the position limit from every model that generates or scores the sequences."""

    def first_id(name: str):
        sources = [getattr(m, "generation_config", None) for m in generators]
        sources += [getattr(m, "config", None) for m in generators]
        sources.append(getattr(processing_class, "tokenizer", processing_class))
        for source in sources:
            value = getattr(source, name, None)
            if value is not None and value != []:
                return value
        return None

    eos = first_id("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    pad = first_id("pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0  # padding positions are masked: any valid id will do
    positions = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in (*generators, *scorers)]
    positions = [p for p in positions if isinstance(p, int) and not isinstance(p, bool) and p > 0]
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_p=args.generation_top_p,
        top_k=args.generation_top_k,
        pad_token_id=int(pad),
        eos_token_ids=eos_ids,
        max_positions=min(positions) if positions else None,
    )


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A decoder-only model that `generate`s (the kind whose completions can replace a row)."""
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and can_generate() and not getattr(config, "is_encoder_decoder", False)


# ---------------------------------------------------------------------------------------------------- prompts
def prompt_positions(batch: dict, where: str = "a batch") -> torch.Tensor:
    """`[batch, sequence]` True at each row's prompt tokens: the real positions before its first label.

    Raises a ValueError naming what is wrong when the batch cannot be rebuilt: no `input_ids` or `labels`, other keys
    that run along the sequence (they would no longer line up), or a row without a prompt.
    """
    ids, labels = batch.get("input_ids"), batch.get("labels")
    if not (isinstance(ids, torch.Tensor) and isinstance(labels, torch.Tensor) and ids.dim() == 2):
        raise ValueError(f"{_NEEDS}; {where} has no 2-D `input_ids` and `labels` (keys: {sorted(batch)}).")
    others = [
        key
        for key, value in batch.items()
        if key not in REBUILT_KEYS
        and key != TEACHER_ID
        and isinstance(value, torch.Tensor)
        and value.dim() >= 2
        and tuple(value.shape[:2]) == tuple(ids.shape)
    ]
    if others:
        raise ValueError(
            f"{where} holds {others} beside input_ids, attention_mask and labels; a generated row replaces those "
            "three only, so these would no longer line up. Drop them from the data (the models make position ids "
            "themselves), or set lmbda=0 and seq_kd=False."
        )
    attention = batch.get("attention_mask")
    real = attention.bool() if isinstance(attention, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)
    labelled = labels.ne(IGNORE_INDEX)
    length = ids.shape[1]
    first = torch.where(
        labelled.any(1), labelled.int().argmax(1), torch.full_like(labelled[:, 0], length, dtype=torch.long)
    )
    prompt = (torch.arange(length, device=ids.device) < first[:, None]) & real
    empty = (~prompt.any(1)).nonzero().flatten().tolist()
    if empty:
        row = empty[0]
        raise _no_prompt(f"row {row} of {where}", labels[row, :6].tolist())
    return prompt


def _no_prompt(row: str, labels: list) -> ValueError:
    return ValueError(
        f"{_NEEDS}; {row} has no prompt: no real token comes before its first label (its labels start {labels}). "
        "Mask each prompt with -100 in `labels` (plain language-model data, whose labels equal input_ids, has no "
        "prompts), or set lmbda=0 and seq_kd=False."
    )


def check_prompt_room(prompt: torch.Tensor, settings: GenerationSettings, where: str = "a batch") -> int:
    """How many tokens can be generated after the batch's longest prompt (at most `max_new_tokens`)."""
    longest = int(prompt.sum(1).max())
    if settings.max_positions is None:
        return settings.max_new_tokens
    room = settings.max_positions - longest
    if room < 1:
        raise ValueError(
            f"A prompt in {where} is {longest} tokens long, but the models have {settings.max_positions} positions "
            "(config.max_position_embeddings): no generated token fits after it. Shorten the prompts to fewer than "
            f"{settings.max_positions} tokens (tokenize_prompt_completion's max_length cuts rows), or "
            "set lmbda=0 and seq_kd=False."
        )
    return min(settings.max_new_tokens, room)


def check_dataset_prompts(dataset, max_positions: int | None, name: str = "train_dataset") -> None:
    """Every row of a `datasets.Dataset` has a prompt that leaves room for a generated token: its stored `labels`
    (and `attention_mask`) columns scanned with Arrow before the first step. Call it only when the collator passes
    the columns through (transformers' padding collators); other data are checked batch by batch."""
    import numpy as np
    import pyarrow.compute as pc

    offset = 0
    for table in dataset.with_format("arrow").iter(batch_size=_SCAN_ROWS):
        labels = table.column("labels").combine_chunks()
        lengths = pc.list_value_length(labels).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = labels.flatten().fill_null(IGNORE_INDEX).to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(len(lengths)), lengths)
        positions = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        first = lengths.copy()  # a row without labels (prompt only) is all prompt
        labelled = values != IGNORE_INDEX
        np.minimum.at(first, rows[labelled], positions[labelled])
        in_prompt = positions < first[rows]
        if "attention_mask" in table.column_names:
            mask = table.column("attention_mask").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if len(mask) == len(values):
                in_prompt &= mask.astype(bool)
        prompt = np.bincount(rows[in_prompt], minlength=len(lengths))
        if (prompt == 0).any():
            row = int(np.argmax(prompt == 0))
            start = values[np.sum(lengths[:row]) :][: min(6, int(lengths[row]))].tolist()
            raise _no_prompt(f"{name} row {offset + row}", start)
        if max_positions is not None and (prompt >= max_positions).any():
            row = int(np.argmax(prompt >= max_positions))
            raise ValueError(
                f"{name} row {offset + row} has a prompt of {int(prompt[row])} tokens, but the models have "
                f"{max_positions} positions (config.max_position_embeddings): no generated token fits after it. "
                f"Shorten the prompts to fewer than {max_positions} tokens, or set lmbda=0 and seq_kd=False."
            )
        offset += len(lengths)


def left_padded(input_ids: torch.Tensor, prompt: torch.Tensor, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prompt tokens, left-padded to the longest (what `generate` expects): (ids, attention mask)."""
    lengths = prompt.sum(1)
    width = int(lengths.max())
    ids = torch.full((len(input_ids), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long, device=input_ids.device)
    for row, length in enumerate(lengths.tolist()):
        ids[row, width - length :] = input_ids[row][prompt[row]]
        mask[row, width - length :] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------- generation
def sample_completions(
    model, prompts: torch.Tensor, mask: torch.Tensor, settings: GenerationSettings, room: int, seed: int
):
    """Completions sampled by `model` (eval mode, no gradients, KV cache; its train mode restored), `[batch, new]`.

    The sampling runs on an RNG of its own seeded with `seed`, so it neither draws from nor disturbs the training's
    random stream (dropout, data order), and the same seed gives the same completions (exact resume)."""
    was_training = model.training
    model.eval()
    device = prompts.device
    fork = {"devices": []} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
    try:
        with torch.no_grad(), torch.random.fork_rng(**fork):
            torch.manual_seed(seed)
            sequences = model.generate(
                input_ids=prompts,
                attention_mask=mask,
                do_sample=True,
                num_beams=1,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
                max_new_tokens=room,
                pad_token_id=settings.pad_token_id,
                eos_token_id=list(settings.eos_token_ids) or None,
                use_cache=True,
            )
    finally:
        model.train(was_training)
    sequences = sequences if isinstance(sequences, torch.Tensor) else sequences.sequences
    return sequences[:, prompts.shape[1] :]


def rebuilt_batch(batch: dict, prompt: torch.Tensor, completions: torch.Tensor, settings: GenerationSettings) -> dict:
    """The batch with each row replaced by its prompt + completion (cut after the first EOS), right-padded; labels
    -100 on the prompt and padding, the completion's tokens elsewhere. Other keys (row ids, teacher ids) are kept."""
    ids, labels = batch["input_ids"], batch["labels"]
    completions = completions.to(ids.device)
    if settings.eos_token_ids:
        eos = torch.isin(completions, torch.tensor(settings.eos_token_ids, device=completions.device))
        ends = torch.where(eos.any(1), eos.int().argmax(1) + 1, completions.shape[1])
    else:
        ends = torch.full((len(completions),), completions.shape[1], device=completions.device)
    rows = [(ids[row][prompt[row]], completions[row, :end]) for row, end in enumerate(ends.tolist())]
    width = max(len(p) + len(c) for p, c in rows)
    new_ids = torch.full((len(rows), width), settings.pad_token_id, dtype=ids.dtype, device=ids.device)
    new_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=labels.dtype, device=ids.device)
    attention = batch.get("attention_mask")
    dtype = attention.dtype if isinstance(attention, torch.Tensor) else torch.long
    new_attention = torch.zeros((len(rows), width), dtype=dtype, device=ids.device)
    for row, (p, c) in enumerate(rows):
        end = len(p) + len(c)
        new_ids[row, : len(p)] = p
        new_ids[row, len(p) : end] = c
        new_labels[row, len(p) : end] = c
        new_attention[row, :end] = 1
    return {**batch, "input_ids": new_ids, "attention_mask": new_attention, "labels": new_labels}


class SequenceGeneration:
    """The scheme that replaces a window's micro-batches by generated ones (GKD with `lmbda`, seq-KD with `seq_kd`).

    Args:
        lmbda: probability that a micro-batch is on-policy (the student generates).
        seq_kd: the other micro-batches are generated by the teacher (else they stay as they are).
        settings: how to sample.
        seed: the run's seed (`args.seed`).
    """

    def __init__(self, lmbda: float, seq_kd: bool, settings: GenerationSettings, seed: int):
        self.lmbda, self.seq_kd, self.settings, self.seed = lmbda, seq_kd, settings, seed

    def draws(self, step: int, count: int) -> list[tuple[bool, int]]:
        """(on-policy?, sampling seed) for each of the `count` micro-batches of the window before optimizer step
        `step` (`state.global_step`, the number of steps taken).

        The generator is seeded from the run's seed and the step alone, never from the global RNG, so a run resumed
        from checkpoint-k draws for step k exactly what the uninterrupted run drew, whatever happened before.
        `random.Random` hashes a string seed with SHA-512: the same on every machine and Python process.
        """
        rng = random.Random(f"hfkd-generation:{self.seed}:{step}")
        return [(rng.random() < self.lmbda, rng.getrandbits(63)) for _ in range(count)]

    def replace(self, batches: list, step: int, student, teacher=None, process_index: int = 0) -> tuple[list, int]:
        """The window's micro-batches with the drawn ones generated, and how many the student generated."""
        out, on_policy = [], 0
        for batch, (student_turn, seed) in zip(batches, self.draws(step, len(batches)), strict=True):
            model = student if student_turn else teacher if self.seq_kd else None
            if model is None:
                out.append(batch)
                continue
            on_policy += int(student_turn)
            out.append(self.generate(batch, model, (seed + process_index) % 2**63))
        return out, on_policy

    def generate(self, batch: dict, model, seed: int, where: str = "a training batch") -> dict:
        """One micro-batch with its completions sampled by `model`."""
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        prompt = prompt_positions(batch, where)
        room = check_prompt_room(prompt, self.settings, where)
        prompts, mask = left_padded(batch["input_ids"], prompt, self.settings.pad_token_id)
        completions = sample_completions(model, prompts, mask, self.settings, room, seed)
        return rebuilt_batch(batch, prompt, completions, self.settings)


def build_generation(
    args,
    *,
    student,
    teachers: dict,
    learners: dict,
    sharded: bool,
    kind,
    processing_class,
    dataset,
    collator,
    first_batch,
) -> SequenceGeneration | None:
    """On-policy distillation (`lmbda`) and sequence-level KD (`seq_kd`): checks, then the scheme the trainer's
    `get_batch_samples` runs; None when neither is on.

    `student` / `teachers`: the unwrapped models; `learners`: models that train beside the student (peers);
    `sharded`: DeepSpeed or FSDP; `first_batch()`: the first collated training batch."""
    if args.lmbda == 0 and not args.seq_kd:
        return None
    which = "lmbda > 0" if args.lmbda > 0 else "seq_kd"
    if learners:
        raise ValueError(
            f"{which} with peer_models (deep mutual learning) is not supported; drop the peers, or set lmbda=0 "
            "and seq_kd=False."
        )
    if sharded:
        raise ValueError(
            f"{which} generates with the whole model, which DeepSpeed and FSDP shard; train on one device or with "
            "DDP, or set lmbda=0 and seq_kd=False."
        )
    if args.lmbda > 0 and not (kind.shifts_labels and is_causal_lm(student)):
        raise ValueError(
            f"lmbda={args.lmbda} makes the student generate completions, which needs a decoder-only causal "
            f"language model (a *ForCausalLM); the student is {type(student).__name__}. Set lmbda=0."
        )
    models = list(teachers.values())
    generators = [student] if args.lmbda > 0 else []
    if args.seq_kd:
        if len(teachers) != 1:
            raise ValueError(
                "seq_kd trains the student on sequences the teacher generates, so it needs one teacher model "
                f"(got {len(teachers)}: {list(teachers) or 'a teacher cache'}); pass one teacher_model, "
                "or set seq_kd=False."
            )
        if not (kind.shifts_labels and is_causal_lm(models[0])):
            raise ValueError(
                f"seq_kd makes the teacher generate the targets, which needs decoder-only causal language models "
                f"(*ForCausalLM); the student is {type(student).__name__}, the teacher "
                f"{type(models[0]).__name__}. Set seq_kd=False."
            )
        generators.append(models[0])
    settings = generation_settings(args, generators, [student, *models], processing_class)
    # Every row's prompt before the first step: the stored columns when the collator passes them through, and
    # the first collated batch (a collator that builds labels, an iterable data set).
    import datasets

    if (
        isinstance(dataset, datasets.Dataset)
        and collator_kind(collator) == "plain"
        and "labels" in (visible_columns(dataset) or [])
    ):
        check_dataset_prompts(dataset, settings.max_positions)
    if dataset is not None:
        where = "the first batch of train_dataset"
        check_prompt_room(prompt_positions(first_batch(), where), settings, where)
    return SequenceGeneration(args.lmbda, args.seq_kd, settings, args.seed)
