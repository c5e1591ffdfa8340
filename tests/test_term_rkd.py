"""The rkd term (Relational KD, Park et al., CVPR 2019) against a float64 reference written from the paper's
equations with explicit loops over pairs and triplets, on known values, under bf16 autocast and in the trainer."""

import math
import types

import pytest
import torch
from tiny_models import COMMON, bert, classification_data

import hfkd.terms.pkt  # noqa: F401  (registers pkt, used with rkd in the trainer run)
import hfkd.terms.rkd  # noqa: F401  (registers rkd)
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.rkd import RKDOptions, rkd_angle_loss, rkd_distance_loss, rkd_loss


# ---------------------------------------------------------------------------------------------------- reference
def _huber(x):
    """Huber loss with threshold delta = 1."""
    return 0.5 * x * x if abs(x) <= 1.0 else abs(x) - 0.5


def _distance(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def _reference_distance(student, teacher):
    """L_RKD-D: mean over ordered pairs i != j of Huber(t_ij / mu_t - s_ij / mu_s), mu = mean non-zero distance."""
    s, t = student.tolist(), teacher.tolist()
    b = len(s)
    pairs = [(i, j) for i in range(b) for j in range(b) if i != j]
    if not pairs:
        return 0.0

    def mu(rows):
        nonzero = [_distance(rows[i], rows[j]) for i, j in pairs if _distance(rows[i], rows[j]) > 0]
        return sum(nonzero) / len(nonzero)

    mu_s, mu_t = mu(s), mu(t)
    total = sum(_huber(_distance(t[i], t[j]) / mu_t - _distance(s[i], s[j]) / mu_s) for i, j in pairs)
    return total / len(pairs)


def _cos_at(rows, i, j, k):
    """Cosine of the angle at rows[j] between rows[i] - rows[j] and rows[k] - rows[j]."""
    u = [a - c for a, c in zip(rows[i], rows[j])]
    v = [a - c for a, c in zip(rows[k], rows[j])]
    return sum(x * y for x, y in zip(u, v)) / (math.sqrt(sum(x * x for x in u)) * math.sqrt(sum(y * y for y in v)))


def _reference_angle(student, teacher):
    """L_RKD-A: mean over triplets of distinct i, j, k of Huber(cos_t(i, j, k) - cos_s(i, j, k))."""
    s, t = student.tolist(), teacher.tolist()
    b = len(s)
    triplets = [(i, j, k) for i in range(b) for j in range(b) for k in range(b) if len({i, j, k}) == 3]
    if not triplets:
        return 0.0
    return sum(_huber(_cos_at(t, i, j, k) - _cos_at(s, i, j, k)) for i, j, k in triplets) / len(triplets)


def _pair(b=6, d_s=5, d_t=7, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(b, d_s, generator=g, dtype=torch.float64),
        scale * torch.randn(b, d_t, generator=g, dtype=torch.float64),
    )


# ---------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_float64_reference(seed):
    student, teacher = _pair(seed=seed, scale=1.0 + seed)
    student[0] *= 6.0  # an outlier: normalised distances far apart, |x| > 1 in the Huber loss
    d, a = _reference_distance(student, teacher), _reference_angle(student, teacher)
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(d, rel=1e-10, abs=1e-14)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(a, rel=1e-10, abs=1e-14)
    assert rkd_loss(student, teacher).item() == pytest.approx(25 * d + 50 * a, rel=1e-10)
    assert rkd_loss(student, teacher, 3.0, 0.0).item() == pytest.approx(3 * d, rel=1e-10)
    assert rkd_loss(student, teacher, 0.0, 2.0).item() == pytest.approx(2 * a, rel=1e-10)
    assert d > 0.05 and a > 0.05


def test_the_non_zero_mean_leaves_out_duplicate_examples():
    """Two examples with the same embedding: their zero distance is not part of mu (but its pair still counts)."""
    student, teacher = _pair(seed=3)
    student[4] = student[1]
    teacher[5] = teacher[2]
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(
        _reference_distance(student, teacher), rel=1e-10
    )


def test_hand_computed_triangle():
    """Teacher (0,0), (1,0), (0,1); student (0,0), (2,0), (0,1)."""
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    student = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    mu_t, mu_s = (2 + math.sqrt(2)) / 3, (3 + math.sqrt(5)) / 3
    # pairs (0,1), (0,2), (1,2), each counted twice (both orders) out of 6: the mean over the three
    diffs = [1 / mu_t - 2 / mu_s, 1 / mu_t - 1 / mu_s, math.sqrt(2) / mu_t - math.sqrt(5) / mu_s]
    assert all(abs(x) <= 1 for x in diffs)
    distance = sum(0.5 * x * x for x in diffs) / 3
    # angles: at vertex 0 both right angles; at vertex 1 cos 1/sqrt2 vs 2/sqrt5; at vertex 2 1/sqrt2 vs 1/sqrt5
    angle = (0.5 * (2 / math.sqrt(5) - 1 / math.sqrt(2)) ** 2 + 0.5 * (1 / math.sqrt(5) - 1 / math.sqrt(2)) ** 2) / 3
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(distance, rel=1e-12)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(angle, rel=1e-12)


def test_huber_linear_branch_by_hand():
    """Points on a line, so that some differences pass the Huber threshold 1 (the linear branch |x| - 1/2)."""
    teacher = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)  # distances 1, 2, 1; mu = 4/3
    student = torch.tensor([[0.0], [10.0], [0.1]], dtype=torch.float64)  # distances 10, 0.1, 9.9; mu = 20/3
    diffs = [0.75 - 1.5, 1.5 - 0.015, 0.75 - 1.485]  # pairs (0,1), (0,2), (1,2)
    expected = (0.5 * diffs[0] ** 2 + (abs(diffs[1]) - 0.5) + 0.5 * diffs[2] ** 2) / 3
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(expected, rel=1e-12)
    # cosines at vertices 0, 1, 2: teacher 1, -1, 1; student 1, 1, -1 -> Huber(0), Huber(-2), Huber(2)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx((0 + 1.5 + 1.5) / 3, rel=1e-12)


def test_identical_and_scaled_students_give_zero():
    student, _ = _pair(seed=4)
    assert rkd_loss(student, student.clone()).item() == 0.0
    for scale in (0.01, 3.0, 1e4):  # distances are mean-normalised, angles scale-free
        assert rkd_distance_loss(scale * student, student).item() == pytest.approx(0.0, abs=1e-24)
        assert rkd_angle_loss(scale * student, student).item() == pytest.approx(0.0, abs=1e-24)
    # translated and rotated too (RKD sees only distances and angles)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    moved = 2.5 * student @ q + 7.0
    assert rkd_loss(moved, student).item() == pytest.approx(0.0, abs=1e-20)
    # and a teacher of another width with the same geometry (padded with zero columns)
    wide = torch.cat([student, torch.zeros(6, 3, dtype=torch.float64)], dim=1)
    assert rkd_loss(student, wide).item() == pytest.approx(0.0, abs=1e-24)


def test_small_batches():
    student, teacher = _pair(b=1)
    assert rkd_loss(student, teacher).item() == 0.0
    student, teacher = _pair(b=2)
    assert rkd_angle_loss(student, teacher).item() == 0.0  # no triplets
    # two points: both normalised distances are 1
    assert rkd_distance_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-15)
    student, teacher = _pair(b=3)
    assert rkd_angle_loss(student, teacher).item() == pytest.approx(_reference_angle(student, teacher), rel=1e-10)


# ---------------------------------------------------------------------------------------------------- gradients
def test_gradcheck_float64():
    student, teacher = _pair(b=5, d_s=3, d_t=4, seed=5)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: rkd_loss(s, teacher), (student,))


def test_gradients_stay_finite_with_duplicates_and_all_equal_embeddings():
    student, teacher = _pair(seed=6)
    student = student.clone()
    student[3] = student[0]  # a zero-length side
    student.requires_grad_(True)
    rkd_loss(student, teacher).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    same = torch.ones(4, 5, dtype=torch.float32, requires_grad=True)  # every distance 0
    value = rkd_loss(same, torch.randn(4, 6))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(same.grad).all()


def test_teacher_gets_no_gradient_through_the_term():
    student, teacher = _pair(seed=7)
    features = types.SimpleNamespace(hidden_states=(student.unsqueeze(1).requires_grad_(True),))
    t_features = types.SimpleNamespace(hidden_states=(teacher.unsqueeze(1).requires_grad_(True),))
    term = TERMS["rkd"](RKDOptions())
    kind = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)
    value = term(Features(features, {}, kind), Features(t_features, {}, kind), TermBatch(None, None, 6))
    value.backward()
    assert t_features.hidden_states[0].grad is None
    assert torch.isfinite(features.hidden_states[0].grad).all()


# ---------------------------------------------------------------------------------------------------- term, masks
def _side(states):
    kind = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)
    return Features(types.SimpleNamespace(hidden_states=tuple(states)), {}, kind)


def test_term_pools_only_real_positions():
    g = torch.Generator().manual_seed(8)
    s_states = [torch.randn(5, 4, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    t_states = [torch.randn(5, 4, 9, generator=g, dtype=torch.float64) for _ in range(5)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    term = TERMS["rkd"](RKDOptions(student_layer=1, teacher_layer=-2))
    value = term(_side(s_states), _side(t_states), TermBatch(None, mask, 5))

    def mean_pool(x):
        return torch.stack([x[i][mask[i]].mean(0) for i in range(5)])

    expected = 25 * _reference_distance(mean_pool(s_states[1]), mean_pool(t_states[3])) + 50 * _reference_angle(
        mean_pool(s_states[1]), mean_pool(t_states[3])
    )
    assert value.item() == pytest.approx(expected, rel=1e-10)
    # garbage at padded positions changes nothing
    for states in (s_states, t_states):
        for x in states:
            x.masked_fill_(~mask.unsqueeze(-1), 1e6)
    assert term(_side(s_states), _side(t_states), TermBatch(None, mask, 5)).item() == pytest.approx(
        expected, rel=1e-10
    )
    # cls pooling reads position 0
    cls = TERMS["rkd"](RKDOptions(pooling="cls"))
    expected_cls = rkd_loss(s_states[-1][:, 0], t_states[-1][:, 0]).item()
    assert cls(_side(s_states), _side(t_states), TermBatch(None, mask, 5)).item() == pytest.approx(expected_cls)


# ---------------------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_is_finite_and_close_to_float32():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(8, 16, generator=g) + 3.0  # an offset shared by all rows, as hidden states have
    teacher = torch.randn(8, 32, generator=g) + 3.0
    reference = rkd_loss(student, teacher).item()
    s16 = student.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = rkd_loss(s16, teacher.bfloat16())
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert value.item() == pytest.approx(reference, rel=5e-2)
    value.backward()
    assert torch.isfinite(s16.grad.float()).all()
    # float32 inputs under autocast: computed in float32 (autocast off inside), the same value
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rkd_loss(student, teacher).item() == pytest.approx(reference, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- config
def test_bad_options_fail_at_config_time_naming_the_option():
    with pytest.raises(ValueError, match=r"term 'rkd': distance_weight must be a finite number >= 0"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "rkd", "distance_weight": -1}])
    with pytest.raises(ValueError, match=r"term 'rkd': angle_weight must be a finite number >= 0"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "rkd", "angle_weight": float("nan")}])
    with pytest.raises(ValueError, match="distance_weight and angle_weight are both 0"):
        DistillationConfig(
            output_dir="x", report_to=[], terms=[{"name": "rkd", "distance_weight": 0, "angle_weight": 0}]
        )
    with pytest.raises(ValueError, match=r"term 'rkd': pooling='max' is not known"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "rkd", "pooling": "max"}])
    with pytest.raises(ValueError, match=r"term 'rkd' has no option 'lambda_d'"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "rkd", "lambda_d": 1}])
    config = DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "rkd", "angle_weight": 0}])
    assert config.terms == [{"name": "rkd", "weight": 1.0, "angle_weight": 0}]


# ---------------------------------------------------------------------------------------------------- trainer
def test_trainer_run_with_rkd_and_pkt_on_bert(tmp_path):
    """Teacher BERT 32 wide, student 16 wide: both relation terms beside the default task and logit terms."""
    terms = [{"name": "rkd", "weight": 0.5, "pooling": "cls"}, {"name": "pkt", "weight": 2.0, "layer": 1}]
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        terms=terms,
        **{**COMMON, "max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
    )
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert {"task", "distill/logit", "distill/rkd", "distill/pkt"} <= set(entry)
        assert entry["distill/rkd"] > 0 and entry["distill/pkt"] > 0
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 0.5 * entry["distill/rkd"]
        total += 2.0 * entry["distill/pkt"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
