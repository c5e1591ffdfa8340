"""Divergences between distributions over two different vocabularies, one value per row (a span, hfkd.alignment).

- `sorted_l1`: ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
  Loss for LLMs"): both distributions sorted from the most to the least likely, the shorter padded with zeros, and
  compared entry by entry in L1. It needs no correspondence between the vocabularies, and ignores which token is
  which.
- `span_divergence`: the hybrid of GOLD (TRL's `GOLDTrainer`): tokens whose strings both vocabularies hold are
  compared id to id, the rest by sorted L1. hfkd takes the generalised KL (I-divergence)
  sum q_t (log q_t - log q_s) - q_t + q_s on the matched ids, not GOLD's JSD: it is >= 0 for the unnormalised
  distributions of merged spans, and where the tokenizers agree (one-token spans, every id matched) it equals the
  forward KL of hfkd's `logit` term exactly.
"""

import torch


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`[N, Vp]`, `[N, Vq]` probabilities -> `[N]`: sum_r |sort_desc(p)_r - sort_desc(q)_r|, zero-padded."""
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p.sort(dim=-1, descending=True).values, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q.sort(dim=-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def _complement(ids: torch.Tensor, size: int) -> torch.Tensor:
    keep = torch.ones(size, dtype=torch.bool, device=ids.device)
    keep[ids] = False
    return keep.nonzero().squeeze(-1)


def span_divergence(
    log_q_student: torch.Tensor,
    log_q_teacher: torch.Tensor,
    matched_student: torch.Tensor,
    matched_teacher: torch.Tensor,
    matched_weight: float = 1.0,
    unmatched_weight: float = 1.0,
) -> torch.Tensor:
    """`[N, Vs]`, `[N, Vt]` log-probabilities (possibly unnormalised) -> `[N]`.

    matched_weight x generalised KL over the matched pairs (matched_student[i], matched_teacher[i]) + unmatched_weight
    x `sorted_l1` over the ids on each side that no pair holds.
    """
    matched_student = matched_student.to(log_q_student.device)
    matched_teacher = matched_teacher.to(log_q_teacher.device)
    total = torch.zeros(log_q_student.shape[0], dtype=log_q_student.dtype, device=log_q_student.device)
    if matched_weight and matched_student.numel():
        ls = log_q_student[:, matched_student]
        lt = log_q_teacher[:, matched_teacher].to(ls.dtype)
        qt = lt.exp()
        total = total + matched_weight * (qt * (lt - ls) - qt + ls.exp()).sum(-1)
    if unmatched_weight:
        rest_s = _complement(matched_student, log_q_student.shape[-1])
        rest_t = _complement(matched_teacher, log_q_teacher.shape[-1])
        if rest_s.numel() or rest_t.numel():
            qs = log_q_student[:, rest_s].exp()
            qt = log_q_teacher[:, rest_t].exp().to(qs.dtype)
            total = total + unmatched_weight * sorted_l1(qs, qt)
    return total
