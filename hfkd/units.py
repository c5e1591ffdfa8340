"""Units: which positions of a batch count for each term, and how many there are.

Every term's sum is divided by the count of its unit (tokens, labelled logits, examples, labelled rows, spans),
counted once per accumulation window over all micro-batches and processes (`WindowUnits`), so that a window of
micro-batches gives the same gradient as one batch holding them all. This module is the one place those masks and
counts are made.
"""

import torch

from .alignment import span_starts
from .batch import SPANS
from .streams import ModelKind


def _two_dim(mask: object) -> torch.Tensor | None:
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def unit_masks(inputs: dict, kind: ModelKind) -> dict[str, torch.Tensor | None]:
    """Which positions count, per term and stream; None means one unit per example (mean over its positions).

    - `logit`: token-level heads count the positions whose label is not -100 (shifted for causal LMs), or, without
      labels, the positions the attention mask keeps; example-level heads count examples.
    - streams: the attention mask of that stream (decoder: the labels that are not -100), else examples.
    - `labelled` (only when the batch has labels): what the task loss and the terms that read labels average over.
      Example-level heads with class ids count the rows whose label is not -100 (rows without one are transfer
      rows: they train on the other terms alone); token-level heads count the `logit` positions; other example
      labels (regression, multi-label) count every example.
    """
    given = inputs.get("labels")
    labels = given if isinstance(given, torch.Tensor) and given.dim() == 2 else None
    attention = _two_dim(inputs.get("attention_mask"))
    masks: dict[str, torch.Tensor | None] = {"examples": None}

    if not kind.token_level:
        masks["logit"] = None
    elif kind.encoder_decoder:
        masks["logit"] = labels.ne(-100) if labels is not None else _two_dim(inputs.get("decoder_attention_mask"))
    elif labels is not None:
        masks["logit"] = labels[:, 1:].ne(-100) if kind.shifts_labels else labels.ne(-100)
    elif attention is not None:
        masks["logit"] = attention[:, 1:] if kind.shifts_labels else attention
    else:
        masks["logit"] = None
    if isinstance(given, torch.Tensor):
        if kind.token_level:
            masks["labelled"] = masks["logit"] if labels is not None else None
        elif given.dim() == 1 and not (given.is_floating_point() or given.dtype == torch.bool):
            masks["labelled"] = given.ne(-100)
        else:
            masks["labelled"] = None

    if kind.encoder_decoder:
        masks["encoder"] = attention
        decoder = _two_dim(inputs.get("decoder_attention_mask"))
        masks["decoder"] = labels.ne(-100) if labels is not None else decoder
    else:
        masks["main"] = attention
    spans = inputs.get(SPANS)
    if isinstance(spans, torch.Tensor):  # a teacher with its own tokenizer: the cross-tokenizer terms count spans
        masks["spans"] = span_starts(spans)
    return masks


def batch_size(inputs: dict) -> int:
    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("The batch holds no tensor; hfkd cannot tell its size.")


def unit_counts(masks: dict[str, torch.Tensor | None], num_examples: int) -> dict[str, torch.Tensor]:
    """Number of units behind each mask, as float tensors (no host sync)."""
    counts = {}
    for name, mask in masks.items():
        counts[name] = mask.sum().float() if mask is not None else torch.tensor(float(num_examples))
    return counts


def masked_sum(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Sum of a per-position loss over the units that count.

    With a mask, positions are units; without one, each example is a unit worth the mean over its positions.
    `torch.where` rather than multiplication so that NaN or inf at masked positions cannot leak in.
    """
    if mask is not None:
        return torch.where(
            mask, per_position, torch.zeros((), dtype=per_position.dtype, device=per_position.device)
        ).sum()
    if per_position.dim() == 1:
        return per_position.sum()
    return per_position.flatten(1).mean(1).sum()


class WindowUnits:
    """Counts each unit once per accumulation window (all micro-batches, all processes) and divides each term's sum
    by its count, so that a window gives the gradient of one batch that held it all.

    `gather`: sums a `[1, n]` vector over processes (`accelerator.gather(...).sum(0)`), None on one process."""

    def __init__(self, kind: ModelKind, world_size: int = 1, gather=None):
        self.kind, self.world_size, self.gather = kind, world_size, gather
        self.window: dict[str, torch.Tensor] | None = None

    @property
    def stream(self) -> str:
        return "encoder" if self.kind.encoder_decoder else "main"

    def count_window(self, batches: list[dict], device) -> None:
        """Units behind each term over the whole accumulated window (and all processes), for exact normalisation."""
        totals: dict[str, torch.Tensor] = {}
        for batch in batches:
            for name, count in unit_counts(unit_masks(batch, self.kind), batch_size(batch)).items():
                count = count.to(device)  # summed where the masks are: reading them on the host would sync
                totals[name] = totals[name] + count if name in totals else count
        names = sorted(totals)
        vector = torch.stack([totals[n] for n in names])
        if self.world_size > 1:
            vector = self.gather(vector.unsqueeze(0)).sum(0)
        self.window = dict(zip(names, vector, strict=True))

    def normalisers(self, masks: dict, batch: dict, training: bool) -> tuple[dict[str, torch.Tensor], float]:
        """Counts to divide each term's sum by, and the factor that undoes DDP's averaging over processes."""
        if training and self.window is not None:
            counts, scale = self.window, float(self.world_size)
        else:
            counts, scale = unit_counts(masks, batch_size(batch)), 1.0
        # An all-masked batch gives 0 / 1 = 0 rather than 0 / 0 = NaN.
        return {k: v.clamp_min(1.0) for k, v in counts.items()}, scale

    def normalise(self, raw: dict, term_set, counts: dict, scale: float, training: bool, accumulation_steps: int):
        """Each term's value over its unit (see hfkd.terms.base), logged as `distill/<name>`."""
        values = {}
        for name, value in raw.items():
            unit = term_set.unit_of(name)
            if unit == "mixed":  # divided by its counts already; `scale` undoes DDP's mean over processes
                value = value * scale
            elif unit == "batch":
                # A micro-batch value: the mean over the window's micro-batches (and, through DDP, processes).
                value = value / accumulation_steps if training else value
            else:
                count = {
                    "tokens": counts.get(self.stream),
                    "logits": counts.get("logit"),
                    "labelled": counts.get("labelled"),
                }.get(unit)
                value = value * (scale / (count if count is not None else counts["examples"]))
            values[f"distill/{name}"] = value
        return values


class LoggedSums:
    """Sums of the logged values (task, each term) on the device, turned into means at each log with one host sync.

    `reduce(vector, reduction="mean")`: the mean over processes (`accelerator.reduce`), used when `world_size > 1`."""

    def __init__(self, world_size: int = 1, reduce=None):
        self.world_size, self.reduce = world_size, reduce
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0  # calls of `add` (evaluation batches)

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.count += 1

    def means(self, divisor: float) -> dict[str, float]:
        """Each sum / `divisor` (averaged over processes), and a fresh start; {} when nothing was added."""
        if not self.sums or divisor <= 0:
            return {}
        names = list(self.sums)
        vector = torch.stack([self.sums[n] for n in names])
        if self.world_size > 1:
            vector = self.reduce(vector, reduction="mean")
        values = (vector / divisor).tolist()  # the one host sync per log
        self.sums, self.count = {}, 0
        return dict(zip(names, values, strict=True))
