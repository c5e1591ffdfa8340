"""The pkt term (Probabilistic Knowledge Transfer, Passalis & Tefas, ECCV 2018) against a float64 reference written
from the paper's equations with explicit loops over pairs, on known values, under bf16 autocast and in the trainer
(with a ViT student whose [CLS] hidden state is the feature)."""

import math
import types

import pytest
import torch
from tiny_models import COMMON, image_dataset, tiny_vit

import hfkd.terms.pkt  # noqa: F401  (registers pkt)
import hfkd.terms.rkd  # noqa: F401  (registers rkd, used with pkt in the ViT run)
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.pkt import PKTOptions, pkt_loss

EPS = 1e-7


# ---------------------------------------------------------------------------------------------------- reference
def _kernel(a, b):
    """Cosine kernel (cos(a, b) + 1) / 2."""
    dot = sum(x * y for x, y in zip(a, b))
    cos = dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    return (cos + 1.0) / 2.0


def _conditional(rows):
    """p[i][j] = p_{i|j} = K(x_i, x_j) / sum_{k != j} K(x_k, x_j), for i != j."""
    b = len(rows)
    p = [[0.0] * b for _ in range(b)]
    for j in range(b):
        total = sum(_kernel(rows[k], rows[j]) for k in range(b) if k != j)
        for i in range(b):
            if i != j:
                p[i][j] = _kernel(rows[i], rows[j]) / total
    return p


def _reference(student, teacher, eps=EPS):
    """sum_j sum_{i != j} p_{i|j} log((p_{i|j} + eps) / (q_{i|j} + eps)), p teacher, q student."""
    p, q = _conditional(teacher.tolist()), _conditional(student.tolist())
    b = len(p)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for j in range(b) for i in range(b) if i != j)


def _pair(b=6, d_s=5, d_t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_s, generator=g, dtype=torch.float64), torch.randn(b, d_t, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_float64_reference(seed):
    student, teacher = _pair(seed=seed)
    expected = _reference(student, teacher)
    assert expected > 1e-3
    assert pkt_loss(student, teacher).item() == pytest.approx(expected, rel=1e-10)
    assert pkt_loss(student, teacher, eps=1e-3).item() == pytest.approx(_reference(student, teacher, 1e-3), rel=1e-10)


def test_hand_computed_case_with_zero_kernel_values():
    """Teacher (1,0), (0,1), (-1,0); student (1,0), (0,1), (0,-1): antipodal pairs have kernel 0."""
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    # teacher kernels K01 = 1/2, K02 = 0, K12 = 1/2; student K01 = 1/2, K02 = 1/2, K12 = 0
    # columns j = 0, 1, 2 over i != j: teacher (1, 0), (1/2, 1/2), (0, 1); student (1/2, 1/2), (1, 0), (1, 0)
    expected = (
        math.log((1 + EPS) / (0.5 + EPS))
        + 0.5 * math.log((0.5 + EPS) / (1 + EPS))
        + 0.5 * math.log((0.5 + EPS) / EPS)
        + math.log((1 + EPS) / EPS)
    )
    assert pkt_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    assert pkt_loss(student, teacher).item() == pytest.approx(_reference(student, teacher), rel=1e-12)


def test_identical_and_scaled_features_give_zero():
    student, _ = _pair(seed=3)
    assert pkt_loss(student, student.clone()).item() == 0.0
    for scale in (1e-3, 0.5, 7.0, 1e5):  # the features are L2-normalised first
        assert pkt_loss(scale * student, student).item() == pytest.approx(0.0, abs=1e-13)
        assert pkt_loss(student, scale * student).item() == pytest.approx(0.0, abs=1e-13)
    # each row scaled by its own positive factor: still the same cosines
    factors = torch.tensor([0.3, 2.0, 5.0, 1.0, 0.01, 40.0], dtype=torch.float64).unsqueeze(1)
    assert pkt_loss(factors * student, student).item() == pytest.approx(0.0, abs=1e-13)
    # a teacher of another width with the same cosines (padded with zero columns)
    wide = torch.cat([student, torch.zeros(6, 3, dtype=torch.float64)], dim=1)
    assert pkt_loss(student, wide).item() == pytest.approx(0.0, abs=1e-13)


def test_the_diagonal_does_not_count():
    """Excluding k = j: the value equals the reference without self-similarities, not the full-kernel variant."""
    student, teacher = _pair(b=4, seed=4)
    full = _full_kernel_variant(student, teacher)
    assert pkt_loss(student, teacher).item() == pytest.approx(_reference(student, teacher), rel=1e-10)
    assert pkt_loss(student, teacher).item() != pytest.approx(full, rel=1e-3)


def _full_kernel_variant(student, teacher):
    """The authors' code's conditional probabilities (row-normalised with the diagonal), summed: for contrast."""

    def probabilities(rows):
        b = len(rows)
        return [
            [_kernel(rows[i], rows[j]) / sum(_kernel(rows[i], rows[k]) for k in range(b)) for j in range(b)]
            for i in range(b)
        ]

    p, q = probabilities(teacher.tolist()), probabilities(student.tolist())
    return sum(pi * math.log((pi + EPS) / (qi + EPS)) for pr, qr in zip(p, q) for pi, qi in zip(pr, qr))


def test_small_batches():
    student, teacher = _pair(b=1)
    assert pkt_loss(student, teacher).item() == 0.0
    student, teacher = _pair(b=2)
    assert pkt_loss(student, teacher).item() == 0.0  # each conditional distribution is (1)
    student, teacher = _pair(b=3)
    assert pkt_loss(student, teacher).item() == pytest.approx(_reference(student, teacher), rel=1e-10)


# ---------------------------------------------------------------------------------------------------- gradients
def test_gradcheck_float64():
    student, teacher = _pair(b=5, d_s=3, d_t=4, seed=5)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: pkt_loss(s, teacher), (student,))


def test_gradients_stay_finite_with_a_zero_vector_and_duplicates():
    student, teacher = _pair(seed=6)
    student = student.clone()
    student[2] = 0.0
    student[4] = student[1]
    student.requires_grad_(True)
    value = pkt_loss(student, teacher)
    assert value.item() == pytest.approx(_reference_with_zero_row(student.detach(), teacher), rel=1e-10)
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def _reference_with_zero_row(student, teacher):
    """A zero feature vector has cosine 0 with every other vector (kernel 1/2)."""
    rows = student.tolist()
    b = len(rows)

    def kernel(i, j):
        zero = not any(rows[i]) or not any(rows[j])
        return 0.5 if zero else _kernel(rows[i], rows[j])

    q = [[0.0] * b for _ in range(b)]
    for j in range(b):
        total = sum(kernel(k, j) for k in range(b) if k != j)
        for i in range(b):
            if i != j:
                q[i][j] = kernel(i, j) / total
    p = _conditional(teacher.tolist())
    return sum(p[i][j] * math.log((p[i][j] + EPS) / (q[i][j] + EPS)) for j in range(b) for i in range(b) if i != j)


# ---------------------------------------------------------------------------------------------------- term, masks
def _side(states):
    kind = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)
    return Features(types.SimpleNamespace(hidden_states=tuple(states)), {}, kind)


def test_term_pools_only_real_positions_and_leaves_the_teacher_without_gradient():
    g = torch.Generator().manual_seed(8)
    s_states = [torch.randn(5, 4, 6, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(3)]
    t_states = [torch.randn(5, 4, 9, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    term = TERMS["pkt"](PKTOptions())
    value = term(_side(s_states), _side(t_states), TermBatch(None, mask, 5))

    def mean_pool(x):
        return torch.stack([x[i][mask[i]].mean(0) for i in range(5)]).detach()

    expected = _reference(mean_pool(s_states[-1]), mean_pool(t_states[-1]))
    assert value.item() == pytest.approx(expected, rel=1e-10)
    value.backward()
    assert t_states[-1].grad is None and torch.isfinite(s_states[-1].grad).all()
    assert s_states[-1].grad[~mask].abs().max() == 0  # padding gets no gradient either
    with torch.no_grad():  # garbage at padded positions changes nothing
        for x in s_states + t_states:
            x.masked_fill_(~mask.unsqueeze(-1), -1e6)
    assert term(_side(s_states), _side(t_states), TermBatch(None, mask, 5)).item() == pytest.approx(
        expected, rel=1e-10
    )


# ---------------------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_is_finite_and_close_to_float32():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(8, 16, generator=g) + 0.5
    teacher = torch.randn(8, 32, generator=g) + 0.5
    reference = pkt_loss(student, teacher).item()
    s16 = student.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = pkt_loss(s16, teacher.bfloat16())
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(reference, rel=5e-2)
    value.backward()
    assert torch.isfinite(s16.grad.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inputs: float32 inside, the same value
        assert pkt_loss(student, teacher).item() == pytest.approx(reference, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- config
def test_bad_options_fail_at_config_time_naming_the_option():
    for bad in (0, -1e-7, float("inf"), "1e-7", True):
        with pytest.raises(ValueError, match=r"term 'pkt': eps must be a finite number > 0"):
            DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "pkt", "eps": bad}])
    with pytest.raises(ValueError, match=r"term 'pkt': pooling='first' is not known"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "pkt", "pooling": "first"}])
    with pytest.raises(ValueError, match=r"term 'pkt' has no option 'epsilon'"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "pkt", "epsilon": 1e-7}])
    config = DistillationConfig(output_dir="x", report_to=[], terms='[{"name": "pkt", "weight": 30, "eps": 1e-6}]')
    assert config.terms == [{"name": "pkt", "weight": 30.0, "eps": 1e-6}]


# ---------------------------------------------------------------------------------------------------- trainer
def test_trainer_run_with_a_vit_student_and_cls_features(tmp_path):
    """ViT teacher 32 wide, ViT student 16 wide; pkt and rkd read hidden_states[-1][:, 0] ([CLS])."""
    terms = [{"name": "pkt", "weight": 3.0, "pooling": "cls"}, {"name": "rkd", "weight": 0.25, "pooling": "cls"}]
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        terms=terms,
        **{**COMMON, "max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
    )
    teacher, student = tiny_vit(32, 4, seed=0), tiny_vit(16, 2, seed=1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=image_dataset(8))
    assert trainer.term_set.needs().hidden_states
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"task", "distill/logit", "distill/pkt", "distill/rkd"} <= set(entry)
        assert entry["distill/pkt"] > 0 and entry["distill/rkd"] > 0
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 3.0 * entry["distill/pkt"]
        total += 0.25 * entry["distill/rkd"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
