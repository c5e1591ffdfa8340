"""Augmentation with consistent teaching: teacher and student see the same augmented view of each batch.

Beyer et al. (CVPR 2022, "Knowledge distillation: A good teacher is patient and consistent") show that distillation
pays when the teacher labels exactly the view the student sees, drawn afresh on the fly (with mixup and long
schedules), rather than a fixed view or one of its own. `DistillationConfig.augment` names the operations
("crop,flip,mixup", "cutmix", "word_mask", ...). The trainer draws one augmentation per training micro-batch before
the batch is split into the student's and the teachers' inputs (hfkd.step), so an online teacher (frozen models, the
mean teacher, peers) reads the very tensors the student reads. Evaluation batches are never augmented.

Images (`pixel_values` [batch, channels, height, width], float), applied in this order, with torch alone:
- `crop`: random resized crop, one box per image: an area share drawn uniformly from `augment_crop_scale` (default
  (0.08, 1), the Inception crop torchvision uses) and an aspect ratio log-uniform in (3/4, 4/3); ten tries, then the
  centre crop at the nearest allowed ratio; resized back to the input size (bilinear, `F.interpolate`).
- `flip`: horizontal flip, each image with probability 1/2.
- `mixup` (Zhang et al., ICLR 2018): x = lam x + (1 - lam) x[perm], lam ~ Beta(a, a) with a = `augment_mixup_alpha`
  (0.2, the paper's ImageNet setting), one lam and one permutation per batch.
- `cutmix` (Yun et al., ICCV 2019): a box of area share 1 - lam (lam ~ Beta(1, 1) by default,
  `augment_cutmix_alpha`) at a uniform centre, clipped to the image, is pasted from x[perm]; lam is then recomputed
  from the clipped box, as the reference code does. With both mixup and cutmix, each batch uses one of them with
  probability 1/2 (as timm does).
  Labels: the student's task loss becomes lam CE(y) + (1 - lam) CE(y[perm]) per row (hfkd.step), over the window's
  labelled rows; a row whose own label or partner's label is -100 (a transfer row) keeps only the labelled share,
  and the mean stays over the labelled rows (the permutation keeps their number). Terms that read labels (dkd, the
  confidence weights of several teachers) read each row's own label.

Text, word-level and before tokenizing, so that a teacher with its own tokenizer (hfkd.two_tokenizers) gets its
tokenization of the same augmented text (TinyBERT, Jiao et al. 2020; Tang et al. 2019):
- `word_mask`: each whitespace-separated word, with probability `augment_word_prob` (0.1), becomes the student
  tokenizer's mask token (its unknown token when it has none);
- `word_replace`: each word, with that probability, becomes a word drawn uniformly from the words of the batch.
  The text comes from `tokenize_text_column` (and `tokenize_text_pair_column`): rows must keep their raw text, and
  the trainer tokenizes each augmented batch (`TextCollator` for one tokenizer, `TwoTokenizerCollator` for two).

Seeded and resumable: every draw of a micro-batch comes from a generator seeded by (`seed`, the global step, the
micro-batch's index in its accumulation window, the process index), so a resumed run draws the views of an
uninterrupted one. A teacher cache stores one view per row and cannot teach augmented ones: refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .batch import INTERNAL_PREFIX, SPANS, TEACHER_ID, TEACHER_PREFIX, TEACHER_SPANS

IMAGE_OPS = ("crop", "flip", "mixup", "cutmix")
TEXT_OPS = ("word_mask", "word_replace")
# Batch keys of mixup/cutmix (no model receives hfkd_ keys): each row's partner label and the batch's lam, per row.
MIX_LABELS = INTERNAL_PREFIX + "mix_labels"
MIX_LAMBDA = INTERNAL_PREFIX + "mix_lambda"
CROP_RATIO = (3 / 4, 4 / 3)
# Token-level keys of a tokenized row; an augmented text row is tokenized again without them.
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", SPANS, TEACHER_SPANS)


def parse_augment(value) -> tuple[str, ...]:
    """`augment` ("crop,flip,mixup", a list, or None) as a tuple of known operation names."""
    if value is None or value == "" or value == []:
        return ()
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else [str(n).strip() for n in value]
    unknown = [n for n in names if n not in IMAGE_OPS + TEXT_OPS]
    if unknown or not all(names):
        raise ValueError(
            f"augment={value!r} names {unknown or 'an empty entry'}, which is no augmentation; use a comma-separated "
            f"list of {list(IMAGE_OPS)} (images) or {list(TEXT_OPS)} (text), e.g. 'crop,flip,mixup'."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"augment={value!r} names an operation twice; name each once.")
    if set(names) & set(IMAGE_OPS) and set(names) & set(TEXT_OPS):
        raise ValueError(
            f"augment={value!r} mixes image operations {list(IMAGE_OPS)} with text operations {list(TEXT_OPS)}; a "
            "batch is either images or text: keep the ones that fit the data."
        )
    return tuple(names)


def generator(seed: int, step: int, micro_batch: int, process: int) -> np.random.Generator:
    """The random draws of one micro-batch: the same (seed, global step, micro-batch, process) gives the same view."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(micro_batch), int(process)]))


# ---------------------------------------------------------------------------------------------------- images
def crop_boxes(rng: np.random.Generator, count: int, height: int, width: int, scale, ratio=CROP_RATIO) -> list:
    """(top, left, h, w) of a random resized crop for each of `count` images (module docstring)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = []
    for _ in range(count):
        for _ in range(10):
            target = area * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                boxes.append((top, left, h, w))
                break
        else:  # the centre crop at the nearest allowed aspect ratio
            aspect = width / height
            if aspect < ratio[0]:
                w, h = width, int(round(width / ratio[0]))
            elif aspect > ratio[1]:
                h, w = height, int(round(height * ratio[1]))
            else:
                w, h = width, height
            boxes.append(((height - h) // 2, (width - w) // 2, h, w))
    return boxes


def resized_crop(x: torch.Tensor, boxes: Sequence) -> torch.Tensor:
    """Each image's box, resized back to the image's size (bilinear)."""
    size = x.shape[-2:]
    out = [
        F.interpolate(x[i : i + 1, :, t : t + h, left : left + w], size=size, mode="bilinear", align_corners=False)
        for i, (t, left, h, w) in enumerate(boxes)
    ]
    return torch.cat(out).to(x.dtype)


def flip(x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """Images where `which` [batch] is True, mirrored left to right."""
    which = which.to(x.device).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(which, x.flip(-1), x)


def mixup(x: torch.Tensor, perm: torch.Tensor, lam: float) -> torch.Tensor:
    """lam x + (1 - lam) x[perm]."""
    return lam * x + (1 - lam) * x[perm.to(x.device)]


def cutmix_box(rng: np.random.Generator, height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2): a box of area share about 1 - lam at a uniform centre, clipped to the image (Yun et al.)."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y1, y2, x1, x2


def cutmix(x: torch.Tensor, perm: torch.Tensor, box: tuple[int, int, int, int]) -> tuple[torch.Tensor, float]:
    """x with `box` pasted from x[perm], and lam = 1 - the box's share of the image."""
    y1, y2, x1, x2 = box
    out = x.clone()
    out[..., y1:y2, x1:x2] = x[perm.to(x.device)][..., y1:y2, x1:x2]
    return out, 1.0 - (y2 - y1) * (x2 - x1) / (x.shape[-2] * x.shape[-1])


# ---------------------------------------------------------------------------------------------------- text
def augment_words(texts: list[str], rng: np.random.Generator, mode: str, prob: float, mask_token: str) -> list[str]:
    """Each text with each whitespace-separated word, with probability `prob`, replaced by `mask_token`
    (`word_mask`) or by a word drawn from all the texts' words (`word_replace`); spacing is kept."""
    pieces = [re.split(r"(\s+)", text) for text in texts]
    pool = [w for parts in pieces for w in parts[::2] if w]
    out = []
    for parts in pieces:
        for i in range(0, len(parts), 2):
            if parts[i] and rng.random() < prob:
                parts[i] = mask_token if mode == "word_mask" else pool[int(rng.integers(0, len(pool)))]
        out.append("".join(parts))
    return out


def _token_key(key: str) -> bool:
    return key in _TOKEN_KEYS or (key.startswith(TEACHER_PREFIX) and key != TEACHER_ID)


class TextCollator:
    """Batches of text rows for one tokenizer: each row's `text_column` (and `text_pair_column`) tokenized, then
    padded like `DataCollatorWithPadding`; rows without the text column (tokenized already) are padded as they are.
    The default collator of word augmentations, which tokenize each augmented batch on the fly."""

    def __init__(self, tokenizer, text_column: str = "text", text_pair_column: str | None = None, max_length=None):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.text_column, self.text_pair_column = text_column, text_pair_column

    def text_columns(self) -> set[str]:
        """The columns this collator reads text from (Trainer must not drop them as unused)."""
        return {self.text_column, self.text_pair_column} - {None}

    def __call__(self, features):
        rows = []
        for feature in features:
            feature = dict(feature)
            if self.text_column in feature:
                pair = feature.pop(self.text_pair_column) if self.text_pair_column else None
                encoded = self.tokenizer(
                    feature.pop(self.text_column),
                    pair,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                )
                feature = {k: v for k, v in feature.items() if k not in _TOKEN_KEYS}
                feature.update(encoded)
            rows.append(feature)
        batch = dict(self.tokenizer.pad(rows, padding=True, return_tensors="pt"))
        if "label" in batch and "labels" not in batch:
            batch["labels"] = batch.pop("label")
        return batch


class RawRows(list):
    """A training micro-batch left as its rows, for word augmentations: the trainer augments and collates it."""


def raw_rows(features) -> RawRows:
    """The collate function of the training data loader under word augmentations."""
    return RawRows(features)


# ---------------------------------------------------------------------------------------------------- the views
@dataclass(frozen=True)
class Augmenter:
    """The configured operations and their parameters (`DistillationConfig.augment*`; module docstring).

    `view(batch, rng, collate)`: one micro-batch's augmented view; word augmentations take its rows (`RawRows`) and
    `collate` them after augmenting their text, image augmentations take its collated tensors."""

    ops: tuple[str, ...]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    word_prob: float = 0.1
    text_column: str = "text"
    text_pair_column: str | None = None
    mask_token: str = "[UNK]"

    @classmethod
    def from_config(cls, args, tokenizer=None) -> Augmenter | None:
        ops = parse_augment(args.augment)
        if not ops:
            return None
        mask = getattr(tokenizer, "mask_token", None) or getattr(tokenizer, "unk_token", None) or "[UNK]"
        return cls(
            ops=ops,
            crop_scale=tuple(args.augment_crop_scale),
            mixup_alpha=args.augment_mixup_alpha,
            cutmix_alpha=args.augment_cutmix_alpha,
            word_prob=args.augment_word_prob,
            text_column=args.tokenize_text_column,
            text_pair_column=args.tokenize_text_pair_column,
            mask_token=str(mask),
        )

    @property
    def text(self) -> bool:
        return any(op in TEXT_OPS for op in self.ops)

    @property
    def mixes(self) -> bool:
        return "mixup" in self.ops or "cutmix" in self.ops

    def view(self, batch, rng: np.random.Generator, collate=None):
        if self.text:
            return collate(self._text_rows(batch, rng))
        return self._images(dict(batch), rng)

    def _text_rows(self, rows, rng) -> list[dict]:
        columns = [c for c in (self.text_column, self.text_pair_column) if c]
        rows = [dict(r) for r in rows]
        mode = next(op for op in self.ops if op in TEXT_OPS)
        for column in columns:
            texts = augment_words([r[column] for r in rows], rng, mode, self.word_prob, self.mask_token)
            for row, text in zip(rows, texts, strict=True):
                row[column] = text
        # Tokenized again from the augmented text, for each model.
        return [{k: v for k, v in r.items() if not _token_key(k)} for r in rows]

    def _images(self, batch: dict, rng) -> dict:
        x = batch["pixel_values"]
        count, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        if "crop" in self.ops:
            x = resized_crop(x, crop_boxes(rng, count, height, width, self.crop_scale))
        if "flip" in self.ops:
            x = flip(x, torch.from_numpy(rng.random(count) < 0.5))
        if self.mixes:
            use = [op for op in ("mixup", "cutmix") if op in self.ops]
            op = use[int(rng.integers(0, len(use)))] if len(use) > 1 else use[0]
            perm = torch.from_numpy(rng.permutation(count))
            if op == "mixup":
                lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
                x = mixup(x, perm, lam)
            else:
                lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
                x, lam = cutmix(x, perm, cutmix_box(rng, height, width, lam))
            labels = batch.get("labels")
            if isinstance(labels, torch.Tensor):
                batch[MIX_LABELS] = labels[perm.to(labels.device)]
                dtype = torch.promote_types(x.dtype, torch.float32)
                batch[MIX_LAMBDA] = torch.full((count,), lam, device=labels.device, dtype=dtype)
        batch["pixel_values"] = x
        return batch


def mixed_cross_entropy(logits, labels, mix_labels, lam, label_smoothing: float = 0.0):
    """Per row: lam CE(labels) + (1 - lam) CE(mix_labels), each share only where its label is not -100."""
    per_row = torch.zeros(labels.shape[0], device=logits.device, dtype=torch.float32)
    for target, weight in ((labels, lam), (mix_labels, 1 - lam)):
        labelled = target.ne(-100)
        ce = F.cross_entropy(
            logits.float(),
            torch.where(labelled, target, torch.zeros_like(target)),
            reduction="none",
            label_smoothing=label_smoothing,
        )
        per_row = per_row + torch.where(labelled, weight * ce, torch.zeros_like(ce))
    return per_row
