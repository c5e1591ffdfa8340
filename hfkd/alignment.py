"""Lining up two tokenizations of the same text, for teachers and students that do not share a tokenizer.

Two tokenizers cut a text at different places, but both know where each token ends in the text (fast tokenizers'
`offset_mapping`). Wherever both have a token ending at the same character, the text before it is covered by whole
tokens on both sides: the tokens between two such shared ends form a *span*, the unit the cross-tokenizer terms
compare (the idea of GOLD's sequence alignment, Hugging Face 2025; TRL's `GOLDTrainer` walks byte offsets the same
way). Where the tokenizers agree, a span is one token on each side.

- `align_spans`: span ids per token for one example.
- `span_log_probs`: a causal LM's log-probabilities of each span's text, merged by the chain rule.
- `span_mean`: each model's features averaged over the tokens of each span (hidden-state terms).
- `match_vocabularies`: the ids of token strings both vocabularies hold.
"""

from collections.abc import Sequence

import torch


def align_spans(
    student_offsets: Sequence[Sequence[int]],
    teacher_offsets: Sequence[Sequence[int]],
    student_keep: Sequence[bool] | None = None,
    teacher_keep: Sequence[bool] | None = None,
) -> tuple[list[int], list[int]]:
    """Span id of every token of one example on each side (-1: in no span).

    Args:
        student_offsets / teacher_offsets: one `(start, end)` character pair per token; tokens with `start >= end`
            (special tokens, padding) take part in nothing.
        student_keep / teacher_keep: one bool per token; a span holding any token that is not kept is dropped
            (e.g. the prompt, or a token no logit predicts).

    A span closes where both sides' current tokens end at the same character; tokens that follow and end no later
    (the byte tokens of one multi-byte character share its offsets) join it. Tokens after the last shared end (one
    side truncated earlier) are in no span. Kept spans are numbered 0, 1, ... in text order.
    """
    s_tokens = [i for i, (start, end) in enumerate(student_offsets) if start < end]
    t_tokens = [j for j, (start, end) in enumerate(teacher_offsets) if start < end]
    s_span = [-1] * len(student_offsets)
    t_span = [-1] * len(teacher_offsets)
    s_keep = student_keep if student_keep is not None else [True] * len(student_offsets)
    t_keep = teacher_keep if teacher_keep is not None else [True] * len(teacher_offsets)
    a = b = 0  # next token on each side
    a0 = b0 = 0  # first token of the open span
    next_id = 0
    while a < len(s_tokens) and b < len(t_tokens):
        s_end, t_end = student_offsets[s_tokens[a]][1], teacher_offsets[t_tokens[b]][1]
        if s_end < t_end:
            a += 1
            continue
        if t_end < s_end:
            b += 1
            continue
        a, b = a + 1, b + 1
        while a < len(s_tokens) and student_offsets[s_tokens[a]][1] <= s_end:
            a += 1
        while b < len(t_tokens) and teacher_offsets[t_tokens[b]][1] <= t_end:
            b += 1
        s_members, t_members = s_tokens[a0:a], t_tokens[b0:b]
        if all(s_keep[i] for i in s_members) and all(t_keep[j] for j in t_members):
            for i in s_members:
                s_span[i] = next_id
            for j in t_members:
                t_span[j] = next_id
            next_id += 1
        a0, b0 = a, b
    return s_span, t_span


def match_vocabularies(
    student_vocab: dict[str, int], teacher_vocab: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student ids, teacher ids) of the token strings both vocabularies hold (`tokenizer.get_vocab()`), by teacher id.

    Tokenizers of one family share most strings (and the same conventions for a leading space: 'Ġ' for byte-level BPE,
    '▁' for SentencePiece, '##' for a WordPiece continuation); across conventions few strings match, and the
    cross-tokenizer terms compare the rest by sorted probabilities.
    """
    pairs = sorted((t_id, student_vocab[token]) for token, t_id in teacher_vocab.items() if token in student_vocab)
    teacher_ids = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    student_ids = torch.tensor([s for _, s in pairs], dtype=torch.long)
    return student_ids, teacher_ids


def _span_index(spans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each token's row in the flat list of spans (ordered by example, then span id), its validity, and the count."""
    per_row = spans.max(dim=1).values.clamp_min(-1) + 1  # spans in each example
    offsets = torch.cumsum(per_row, 0) - per_row
    valid = spans >= 0
    flat = torch.where(valid, spans + offsets[:, None], torch.zeros_like(spans))
    return flat, valid, int(per_row.sum())


def span_log_probs(
    logits: torch.Tensor, input_ids: torch.Tensor, spans: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log q of every span's text under a causal LM, one row per span (by example, then span id).

    With l_k = log_softmax(logits[k] / T) (position k predicts token k + 1), a span over positions p1 < ... < pm gives
    log q(v) = l_{p1 - 1}(v) + sum_{r >= 2} l_{pr - 1}(x_{pr}): the distribution of its first token, times the
    probability of its remaining actual tokens (GOLD's merge of the first position, by the chain rule). One-token
    spans give the model's own next-token distribution; longer spans an unnormalised one.

    Args:
        logits: `[batch, positions, vocabulary]`.
        input_ids: `[batch, positions]`, the tokens the logits were computed on.
        spans: `[batch, positions]` long, from `align_spans` (each span's first position >= 1).
    """
    targets = spans[:, 1:]  # row k - 1 of the logits predicts token k
    flat, valid, count = _span_index(targets)
    first = span_starts(targets)[valid]
    # Only the rows that predict a span token are normalised (not the prompt's, nor padding): [M, V], in (example,
    # position) order, so the first tokens' rows come in (example, span id) order.
    rows = logits[:, :-1][valid]
    rows = rows.to(torch.promote_types(rows.dtype, torch.float32))  # float32 at least; float64 kept
    log_probs = torch.log_softmax(rows / temperature, dim=-1)
    # The other tokens' log-probabilities of the actual token, summed per span.
    actual = log_probs.gather(-1, input_ids[:, 1:][valid].unsqueeze(-1)).squeeze(-1)
    rest = ~first
    extra = torch.zeros(count, dtype=actual.dtype, device=actual.device).index_add(0, flat[valid][rest], actual[rest])
    return log_probs[first] + extra[:, None]


def span_mean(features: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
    """`[batch, positions, width]` features averaged over each span's tokens: `[spans, width]`, rows as
    `span_log_probs` orders them."""
    flat, valid, count = _span_index(spans)
    sums = torch.zeros(count, features.shape[-1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, flat[valid], features[valid])
    sizes = torch.zeros(count, dtype=features.dtype, device=features.device)
    sizes = sizes.index_add(0, flat[valid], torch.ones_like(flat[valid], dtype=features.dtype))
    return sums / sizes.clamp_min(1)[:, None]


def span_starts(spans: torch.Tensor) -> torch.Tensor:
    """`[batch, positions]` bool: the first token of each span (one per span, to count them)."""
    # Span ids rise along the text, so a token starts its span when every earlier token has a lower id (a special
    # token inside a span, id -1, does not start it again).
    earlier = torch.cummax(spans, dim=1).values
    earlier = torch.cat([torch.full_like(spans[:, :1], -1), earlier[:, :-1]], dim=1)
    return (spans >= 0) & (spans > earlier)
