"""Forward KL (or reverse KL, or GKD's generalised JSD) to the teacher plus the student's cross-entropy, with their
gradient in closed form.

At a large vocabulary a distillation step spends as much time in element-wise passes over `[rows, vocabulary]`
tensors as in matmuls (profiled on SmolLM2: log-softmax, clamps, products and their autograd backward). For the
default loss, forward KL at temperature T, the gradient with respect to the student's logits is known:

    d/ds [T^2 KL(p_T || q_T)] = T (q_T - p_T)          (q = softmax(s / T), p = softmax(t / T))
    d/ds [CE(s, y)]           = softmax(s) - onehot(y)

and for the top-k cached teacher, whose tail is one bucket of mass p_r while the student's is r = sum of q_T outside
the teacher's k ids K:

    d/ds_j [T^2 KL(fold p || fold q)] = T (q_j - p_j [j in K] - (p_r / r) q_j [j not in K])

Reverse KL and the generalised JSD of GKD (M = beta p + (1 - beta) q, JSD = beta KL(p || M) + (1 - beta) KL(q || M))
have one form: with R = p (reverse KL, c = 1) or R = M (JSD, c = 1 - beta) and d = log q - log R,

    d/ds [T^2 loss] = T c q (d - sum_j q_j d_j)

(for the JSD, the teacher's part of d/dq cancels against the mixture's: d/dq_i JSD = (1 - beta) log(q_i / M_i)).

`kl_ce_with_grad` computes the loss values and this gradient with few passes and in-place updates, for
`hfkd.losses.chunked.chunked_head_loss(with_gradient=True)`. Tests compare it with autograd on the registered
`kl` loss.
"""

import math

import torch

_TINY = torch.finfo(torch.float32).tiny


def kl_ce_with_grad(
    student_logits: torch.Tensor,
    *,
    temperature: float,
    kl_scale: torch.Tensor | float,
    teacher_logits: torch.Tensor | None = None,
    teacher_scaled: bool = False,
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    targets: torch.Tensor | None = None,
    ce_scale: torch.Tensor | float = 0.0,
    targets_all_valid: bool = False,
    loss: str = "kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(sum over rows of T^2 KL, sum of CE over targets != -100 or None, gradient of the scaled sum).

    `loss` is 'kl', 'reverse_kl' or 'jsd' (with `beta`; 0 and 1 mean forward and reverse KL, as GKD and the
    registered `jsd` loss take them); the top-k cached teacher takes 'kl' only.

    The gradient is that of `kl_scale * KL_sum + ce_scale * CE_sum` with respect to `student_logits` `[rows, V]`.
    The teacher is given as logits `[rows, V]` (already divided by T if `teacher_scaled`: the caller can scale the
    hidden states before the head, a V / hidden times smaller division) or as `topk = (ids [rows, k], log_probs
    [rows, k + 1])` at temperature T (last column: the rest of the mass). `targets_all_valid` skips masking rows
    whose target is -100 (the trainer selects rows by their labels already).
    """
    # float32 at least (also under bf16/fp16 autocast); float64 inputs stay float64 (tests).
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = student_logits.to(dtype)
    T = float(temperature)
    # log_softmax is one fused kernel; logsumexp followed by a subtraction takes several passes on CPU.
    log_q = torch.log_softmax(s if T == 1.0 else s * (1.0 / T), dim=-1)

    ce_sum, grad = None, None
    if targets is not None:
        ce_sum, grad = _ce_with_grad(s, log_q, T, targets, ce_scale, targets_all_valid, dtype)

    if beta <= 0.0 and loss == "jsd":
        loss = "kl"
    elif beta >= 1.0 and loss == "jsd":
        loss = "reverse_kl"
    if loss not in ("kl", "reverse_kl", "jsd") or (topk is not None and loss != "kl"):
        raise ValueError(f"kl_ce_with_grad: no closed form for loss={loss!r} with this teacher.")
    # Each branch consumes log_q in place (it is read no more here) and returns the divergence per row and its
    # gradient d/ds [T^2 divergence] divided by T (module docstring).
    if loss != "kl":
        kl_rows, kl_grad = _reverse_kl_or_jsd(log_q, teacher_logits, teacher_scaled, T, loss, beta, dtype)
    elif topk is None:
        kl_rows, kl_grad = _forward_kl(log_q, teacher_logits, teacher_scaled, T, dtype)
    else:
        kl_rows, kl_grad = _forward_kl_topk(log_q, topk, dtype)
    kl_rows = kl_rows * (T * T)
    scale = torch.as_tensor(kl_scale, dtype=dtype, device=s.device) * T
    if grad is None:
        grad = kl_grad.mul_(scale)
    else:
        grad.addcmul_(kl_grad, scale)
    return kl_rows.sum(), ce_sum, grad


def _ce_with_grad(s, log_q, T, targets, ce_scale, targets_all_valid, dtype):
    """(sum of the student's CE over valid targets, `ce_scale` * its gradient); reuses log_q at T = 1."""
    valid = targets.ne(-100)
    safe = targets if targets_all_valid else torch.where(valid, targets, torch.zeros_like(targets))
    log_softmax = log_q if T == 1.0 else torch.log_softmax(s, dim=-1)
    picked = log_softmax.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    ce_sum = -(picked.sum() if targets_all_valid else torch.where(valid, picked, 0.0).sum())
    # d CE / ds = softmax(s) - onehot(y), for valid rows only.
    grad = log_softmax.exp() if T == 1.0 else log_softmax.exp_()
    weight = torch.ones_like(picked) if targets_all_valid else valid.to(dtype)
    grad.scatter_add_(-1, safe.unsqueeze(-1), -weight.unsqueeze(-1))
    if not targets_all_valid:
        grad.mul_(valid.unsqueeze(-1))
    grad.mul_(ce_scale)
    return ce_sum, grad


def _teacher_log_probs(teacher_logits, teacher_scaled, T, dtype):
    """log softmax(t / T) of the dense teacher, -inf clamped to the dtype's min unless `teacher_scaled`."""
    t = teacher_logits.to(dtype)
    log_p = torch.log_softmax(t if teacher_scaled or T == 1.0 else t * (1.0 / T), dim=-1)
    if not teacher_scaled:
        # A stored logit of -inf (masked class) must give 0 * log 0 = 0. Logits just made by a linear head
        # (teacher_scaled) are finite: the pass is skipped for them.
        log_p.clamp_min_(torch.finfo(dtype).min)
    return log_p


def _reverse_kl_or_jsd(log_q, teacher_logits, teacher_scaled, T, loss, beta, dtype):
    """Reverse KL or GKD's JSD: (loss per row, c q (d - sum_j q_j d_j)) with d = log q - log R (module docstring)."""
    log_p = _teacher_log_probs(teacher_logits, teacher_scaled, T, dtype)
    if loss == "jsd":
        log_r = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))  # log M
        teacher_part = torch.linalg.vecdot(log_p.exp(), log_p.sub_(log_r))  # KL(p || M); log_p is read no more
        c = 1.0 - beta
    else:
        log_r, c = log_p, 1.0
    d = log_q - log_r
    q = log_q.exp_()
    kl_qr = torch.linalg.vecdot(q, d)  # KL(q || R)
    kl_rows = beta * teacher_part + c * kl_qr if loss == "jsd" else kl_qr
    kl_grad = d.sub_(kl_qr.unsqueeze(-1)).mul_(q).mul_(c)
    return kl_rows, kl_grad


def _forward_kl(log_q, teacher_logits, teacher_scaled, T, dtype):
    """Forward KL to the dense teacher: (KL(p || q) per row, q - p)."""
    log_p = _teacher_log_probs(teacher_logits, teacher_scaled, T, dtype)
    p = log_p.exp()
    kl_rows = torch.linalg.vecdot(p, log_p.sub_(log_q))
    kl_grad = log_q.exp_().sub_(p)  # q - p
    return kl_rows, kl_grad


def _forward_kl_topk(log_q, topk, dtype):
    """Forward KL to the top-k cached teacher, whose tail is one bucket: (KL of the folded distributions per row,
    q_j - p_j [j in K] - (p_r / r) q_j [j not in K])."""
    ids, t_log_probs = topk[0].long(), topk[1].to(dtype)
    p_top, p_rest = t_log_probs[:, :-1].exp(), t_log_probs[:, -1:].exp()
    log_q_top = log_q.gather(-1, ids)
    q = log_q.exp_()
    outside = q.scatter(-1, ids, 0.0)  # student mass outside the teacher's top-k, per class
    r = outside.sum(-1, keepdim=True).clamp_min(_TINY)  # the student's whole tail underflowing: avoid log 0
    kl_rows = (p_top * (t_log_probs[:, :-1] - log_q_top)).sum(-1) + (p_rest * (t_log_probs[:, -1:] - r.log())).squeeze(
        -1
    )
    kl_grad = outside.mul_(-(p_rest / r)).add_(q)  # q_j - (p_r / r) q_j outside K, q_j inside
    kl_grad.scatter_add_(-1, ids, -p_top)
    return kl_rows, kl_grad
