"""Losses as pure functions, against float64 references written out independently (numpy, explicit loops) and
known values."""

import math

import numpy as np
import pytest
import torch

from hfkd.losses import (
    LOGIT_LOSSES,
    attention_kl,
    attention_mse,
    forward_kl,
    generalized_jsd,
    hidden_cosine,
    hidden_mse,
    logit_mse,
    register_logit_loss,
    reverse_kl,
)
from hfkd.units import masked_sum


def _softmax(x, t):
    z = x / t
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _kl_np(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


# Per-position references written from the definitions with explicit loops in float64: nothing here reuses the
# implementation's expressions or its helper functions.
def _positions(x):
    """Every index of x but the last axis (the axis a loss reduces), in order."""
    return list(np.ndindex(*x.shape[:-1]))


def _softmax_row(logits, temperature):
    scaled = [float(v) / temperature for v in logits]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def _kl_row(p, q):
    """KL(p || q) = sum_i p_i log(p_i / q_i), with 0 log 0 = 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _divergence_reference(student, teacher, temperature, direction):
    """T^2 KL between the two softmax distributions at T, per position; 'forward' is KL(teacher || student)."""
    s, t = student.double().numpy(), teacher.double().numpy()
    out = np.zeros(s.shape[:-1])
    for index in _positions(s):
        p_s, p_t = _softmax_row(s[index], temperature), _softmax_row(t[index], temperature)
        kl = _kl_row(p_t, p_s) if direction == "forward" else _kl_row(p_s, p_t)
        out[index] = temperature**2 * kl
    return out


def _mean_square_reference(a, b):
    """(1 / n) sum_i (a_i - b_i)^2 over the last axis, per position."""
    a, b = a.double().numpy(), b.double().numpy()
    out = np.zeros(a.shape[:-1])
    for index in _positions(a):
        diffs = [float(x) - float(y) for x, y in zip(a[index], b[index])]
        out[index] = sum(d * d for d in diffs) / len(diffs)
    return out


def _attention_mse_reference(student, teacher):
    """For maps [batch, heads, query, key]: (1 / heads) sum_h (1 / keys) sum_k (s - t)^2, per (batch, query)."""
    s, t = student.double().numpy(), teacher.double().numpy()
    batch, heads, queries, keys = s.shape
    out = np.zeros((batch, queries))
    for b in range(batch):
        for q in range(queries):
            per_head = [sum((s[b, h, q, k] - t[b, h, q, k]) ** 2 for k in range(keys)) / keys for h in range(heads)]
            out[b, q] = sum(per_head) / heads
    return out


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 11, generator=g) * 3
    t = torch.randn(3, 5, 11, generator=g) * 3
    return s, t


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_forward_and_reverse_kl_match_float64_reference(logits, temperature):
    s, t = logits
    p_s, p_t = _softmax(s.double().numpy(), temperature), _softmax(t.double().numpy(), temperature)
    expected_fwd = temperature**2 * _kl_np(p_t, p_s)
    expected_rev = temperature**2 * _kl_np(p_s, p_t)
    np.testing.assert_allclose(forward_kl(s, t, temperature=temperature).numpy(), expected_fwd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reverse_kl(s, t, temperature=temperature).numpy(), expected_rev, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_matches_float64_reference(logits, beta):
    s, t = logits
    p_s, p_t = _softmax(s.double().numpy(), 2.0), _softmax(t.double().numpy(), 2.0)
    m = beta * p_t + (1 - beta) * p_s
    expected = 4.0 * (beta * _kl_np(p_t, m) + (1 - beta) * _kl_np(p_s, m))
    got = generalized_jsd(s, t, temperature=2.0, beta=beta).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_jsd_endpoints_are_forward_and_reverse_kl(logits):
    """GKD's convention: beta = 0 is T^2 KL(teacher || student), beta = 1 is T^2 KL(student || teacher)."""
    s, t = (x.double() for x in logits)  # float64 in, float64 out: the references can be tight
    for beta, direction in ((0.0, "forward"), (1.0, "reverse")):
        expected = _divergence_reference(s, t, 1.5, direction)
        got = generalized_jsd(s, t, temperature=1.5, beta=beta)
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12, err_msg=f"beta={beta}")


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_jsd_endpoints_known_values(temperature):
    # Student probabilities (1/4, 3/4), teacher (1/2, 1/2) at temperature T: logits T * log p.
    student = torch.tensor([[0.0, temperature * math.log(3.0)]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(teacher || student) = log(4/3) / 2
    reverse = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(student || teacher)
    got_0 = generalized_jsd(student, teacher, temperature=temperature, beta=0.0).item()
    got_1 = generalized_jsd(student, teacher, temperature=temperature, beta=1.0).item()
    assert got_0 == pytest.approx(temperature**2 * forward, rel=1e-12)
    assert got_1 == pytest.approx(temperature**2 * reverse, rel=1e-12)


def test_symmetric_jsd_is_symmetric_and_bounded(logits):
    s, t = logits
    a = generalized_jsd(s, t, temperature=1.0, beta=0.5)
    b = generalized_jsd(t, s, temperature=1.0, beta=0.5)
    torch.testing.assert_close(a, b)
    assert (a <= np.log(2) + 1e-6).all() and (a >= 0).all()


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd", "mse"])
def test_identical_logits_give_zero(logits, name):
    s, _ = logits
    out = LOGIT_LOSSES[name](s, s.clone(), temperature=3.0, beta=0.5)
    assert out.shape == s.shape[:-1]
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-6, rtol=0)


def test_temperature_squared_scaling():
    # For a tiny logit gap, KL(T) ~ |gap|^2 / (2 T^2) * var, so T^2 * KL(T) tends to a constant: the Hinton scaling
    # keeps the gradient magnitude independent of T.
    t = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    s = torch.tensor([[1e-2, -1e-2, 2e-2, 0.0]])
    values = [forward_kl(s, t, temperature=temp).item() for temp in (1.0, 2.0, 4.0)]
    assert values[0] == pytest.approx(values[1], rel=0.05) == pytest.approx(values[2], rel=0.05)
    # Without the T^2 factor the divergence itself shrinks as 1 / T^2.
    assert values[1] / 4.0 == pytest.approx(values[0] / 4.0, rel=0.05) and values[1] / 4.0 < 0.3 * values[0]


def test_logit_mse_reference(logits):
    s, t = logits
    expected = torch.from_numpy(_mean_square_reference(s, t))
    torch.testing.assert_close(logit_mse(s, t).double(), expected, rtol=1e-5, atol=1e-6)
    # Raw logits: the temperature does not enter (Ba & Caruana).
    torch.testing.assert_close(logit_mse(s, t, temperature=4.0).double(), expected, rtol=1e-5, atol=1e-6)
    # ((1 - 0)^2 + (2 - 0)^2 + (3 - 0)^2) / 3 and ((1 - 2)^2 + (1 - 0)^2 + (1 - 1)^2) / 3
    known = logit_mse(
        torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 1.0]])
    )
    torch.testing.assert_close(known, torch.tensor([14.0 / 3.0, 2.0 / 3.0]))


def test_masked_class_with_minus_inf_gives_finite_kl():
    t = torch.tensor([[2.0, -float("inf"), 0.5]])
    s = torch.tensor([[1.0, -float("inf"), 0.0]])
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        assert torch.isfinite(fn(s, t, temperature=2.0)).all()


def test_half_precision_inputs_are_computed_in_float32(logits):
    s, t = logits
    out = forward_kl(s.bfloat16(), t.bfloat16(), temperature=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, forward_kl(s.bfloat16().float(), t.bfloat16().float(), temperature=2.0))


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd", "mse"])
def test_logit_gradients_are_finite_and_reach_the_student(logits, name):
    s, t = logits
    s = s.clone().requires_grad_(True)
    LOGIT_LOSSES[name](s, t, temperature=2.0, beta=0.3).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_hidden_losses_reference():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 8, generator=g)
    torch.testing.assert_close(hidden_mse(s, t).double(), torch.from_numpy(_mean_square_reference(s, t)))
    # ((1 - 3)^2 + (2 - 0)^2) / 2 = 4 and ((0 - 0)^2 + (-1 - 1)^2) / 2 = 2
    known = hidden_mse(torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(known, torch.tensor([4.0, 2.0]))
    sn, tn = s.double().numpy(), t.double().numpy()
    cos = (sn * tn).sum(-1) / np.linalg.norm(sn, axis=-1) / np.linalg.norm(tn, axis=-1)
    np.testing.assert_allclose(hidden_cosine(s, t).numpy(), 1 - cos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_mse(s, s.clone()), torch.zeros(2, 4))
    torch.testing.assert_close(hidden_cosine(s, 3 * s), torch.zeros(2, 4), atol=1e-6, rtol=0)


def test_attention_losses_reference_and_padded_keys():
    g = torch.Generator().manual_seed(2)
    scores_s, scores_t = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    # The last key is padding: both models give it exactly zero probability.
    scores_s[..., -1] = -float("inf")
    scores_t[..., -1] = -float("inf")
    a_s, a_t = scores_s.softmax(-1), scores_t.softmax(-1)
    ps, pt = a_s.double().numpy()[..., :-1], a_t.double().numpy()[..., :-1]
    expected_kl = _kl_np(pt, ps).mean(1)
    np.testing.assert_allclose(attention_kl(a_s, a_t).numpy(), expected_kl, rtol=1e-4, atol=1e-6)
    expected_mse = torch.from_numpy(_attention_mse_reference(a_s, a_t))
    torch.testing.assert_close(attention_mse(a_s, a_t).double(), expected_mse)
    assert attention_kl(a_s, a_t).shape == (2, 5)
    torch.testing.assert_close(attention_kl(a_t, a_t.clone()), torch.zeros(2, 5), atol=1e-6, rtol=0)


def test_attention_mse_known_value():
    # [batch 1, heads 2, query 2, key 2]. Query 0: head 0 differs by 1 at both keys (mean 1), head 1 agrees: 1 / 2.
    # Query 1: head 0 agrees, head 1 differs by 1/2 at both keys (mean 1/4): 1 / 8.
    student = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]]])
    teacher = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]], [[0.5, 0.5], [1.0, 0.0]]]])
    torch.testing.assert_close(attention_mse(student, teacher), torch.tensor([[0.5, 0.125]]))


def test_masked_sum_ignores_masked_positions_even_if_nan():
    per = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_sum(per, mask).item() == 13.0
    assert masked_sum(per, torch.zeros_like(mask)).item() == 0.0
    # Without a mask each example counts once, as the mean over its positions.
    assert masked_sum(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), None).item() == 8.0
    assert masked_sum(torch.tensor([1.0, 3.0]), None).item() == 4.0


def test_register_logit_loss_and_clash():
    @register_logit_loss("test_l1")
    def l1(student_logits, teacher_logits, **_):
        return (student_logits - teacher_logits).abs().mean(-1)

    assert LOGIT_LOSSES["test_l1"] is l1
    with pytest.raises(ValueError, match="already registered"):

        @register_logit_loss("kl")
        def other(student_logits, teacher_logits, **_):
            return student_logits.sum(-1)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0])
def test_fp16_large_logits_with_low_temperature_stay_finite(name, temperature):
    # fp16 logits near its range (6e4) divided by T <= 1 overflow in fp16; the losses upcast first.
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(4, 7, 50, generator=g) * 3e4).clamp(-6e4, 6e4).half()
    t = (torch.randn(4, 7, 50, generator=g) * 3e4).clamp(-6e4, 6e4).half()
    s.requires_grad_(True)
    out = LOGIT_LOSSES[name](s, t, temperature=temperature, beta=0.5)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()
