"""The uniform tail of a top-k teacher cache (`topk_logit_loss(tail='uniform')`, which benchmarks/bench_cache.py
measures against the folded tail training uses) against float64 references written here from
the definition, with plain Python arithmetic: the teacher's full distribution is rebuilt class by class (the k cached
log-probabilities on their ids, the rest mass R split evenly over the V - k other classes) and the divergences and
their gradients are summed term by term."""

import math

import pytest
import torch

from hfkd.losses import LOGIT_LOSSES
from hfkd.losses.topk import fold_teacher, topk_logit_loss

T = 1.7


def _softmax(values: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in values]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def _teacher_with_even_tail(ids: list[int], log_probs: list[float], vocab: int) -> list[float]:
    """p~: the cached classes as stored, R / (V - k) on every other class."""
    k = len(ids)
    share = math.exp(log_probs[k]) / (vocab - k)
    p = [share] * vocab
    for position, i in enumerate(ids):
        p[i] = math.exp(log_probs[position])
    return p


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _reference(name: str, student: list[float], ids: list[int], log_probs: list[float], beta: float):
    """(T^2 divergence, its gradient with respect to the student's logits) for one position."""
    vocab = len(student)
    p, q = _teacher_with_even_tail(ids, log_probs, vocab), _softmax(student, T)
    if name == "kl":
        value = _kl(p, q)
        # d/ds_j T^2 KL(p || softmax(s / T)) = T (q_j - p_j)
        grad = [T * (qj - pj) for pj, qj in zip(p, q, strict=True)]
        return T * T * value, grad
    if name == "reverse_kl":
        value = _kl(q, p)
        # d/ds_j T^2 KL(q || p) = T q_j (log(q_j / p_j) - KL(q || p))
        grad = [T * qj * (math.log(qj / pj) - value) for pj, qj in zip(p, q, strict=True)]
        return T * T * value, grad
    m = [beta * pj + (1 - beta) * qj for pj, qj in zip(p, q, strict=True)]
    value = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    # d/dq_j of the JSD is (1 - beta) log(q_j / m_j); through the softmax: q_j (g_j - sum_i q_i g_i) / T, times T^2.
    g = [(1 - beta) * math.log(qj / mj) for qj, mj in zip(q, m, strict=True)]
    mean = sum(qi * gi for qi, gi in zip(q, g, strict=True))
    grad = [T * qj * (gj - mean) for qj, gj in zip(q, g, strict=True)]
    return T * T * value, grad


def _case(seed: int, rows: int = 5, vocab: int = 23, k: int = 6):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    ids, log_probs = fold_teacher(teacher, k, T)
    return student, ids, log_probs


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("seed", [0, 1])
def test_uniform_tail_loss_and_gradient_equal_the_reference(name, seed):
    student, ids, log_probs = _case(seed)
    s = student.clone().requires_grad_()
    loss = topk_logit_loss(name, s, ids, log_probs, temperature=T, beta=0.3, tail="uniform")
    loss.sum().backward()
    for row in range(student.shape[0]):
        value, grad = _reference(name, student[row].tolist(), ids[row].tolist(), log_probs[row].tolist(), 0.3)
        assert loss[row].item() == pytest.approx(value, rel=1e-10, abs=1e-12)
        torch.testing.assert_close(s.grad[row], torch.tensor(grad, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd"])
def test_uniform_tail_is_exact_when_the_teachers_tail_is_even(name):
    """A teacher whose classes outside its top k share one logit: the cache then lost nothing, and the uniform tail
    gives the full-logits divergence; the folded tail does not (the student's tail is uneven)."""
    g = torch.Generator().manual_seed(4)
    vocab, k = 17, 4
    teacher = torch.full((3, vocab), -1.0, dtype=torch.float64)
    for row in range(3):
        chosen = torch.randperm(vocab, generator=g)[:k]
        teacher[row, chosen] = torch.tensor([2.5, 1.75, 1.0, 0.25], dtype=torch.float64)
    student = torch.randn(3, vocab, generator=g, dtype=torch.float64)
    full = LOGIT_LOSSES[name](student, teacher, temperature=T, beta=0.3)
    ids, log_probs = fold_teacher(teacher, k, T)
    uniform = topk_logit_loss(name, student, ids, log_probs, temperature=T, beta=0.3, tail="uniform")
    folded = topk_logit_loss(name, student, ids, log_probs, temperature=T, beta=0.3, tail="folded")
    torch.testing.assert_close(uniform, full, rtol=1e-10, atol=1e-12)
    assert ((full - folded).abs() > 1e-3).all()


def test_a_student_equal_to_its_teacher_is_the_optimum_of_the_folded_tail_only():
    g = torch.Generator().manual_seed(5)
    teacher = torch.randn(4, 19, generator=g, dtype=torch.float64) * 2
    ids, log_probs = fold_teacher(teacher, 5, T)
    for tail, at_optimum in (("folded", True), ("uniform", False)):
        s = teacher.clone().requires_grad_()
        loss = topk_logit_loss("kl", s, ids, log_probs, temperature=T, tail=tail)
        loss.sum().backward()
        assert (loss.abs().max().item() < 1e-12) == at_optimum, tail
        assert (s.grad.abs().max().item() < 1e-12) == at_optimum, tail


def test_with_no_class_outside_the_k_both_tails_are_the_same():
    student, ids, log_probs = _case(6, vocab=8, k=8)
    folded = topk_logit_loss("jsd", student, ids, log_probs, temperature=T, tail="folded")
    uniform = topk_logit_loss("jsd", student, ids, log_probs, temperature=T, tail="uniform")
    torch.testing.assert_close(uniform, folded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tail must be one of"):
        topk_logit_loss("kl", student, ids, log_probs, temperature=T, tail="flat")
