"""The `at` term (attention transfer, Zagoruyko & Komodakis 2017) against a float64 reference written from the
paper, known values, gradients, bf16 autocast, and short trainer runs with conv students and teachers."""

import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny_models import COMMON, CONV_IMAGE_SIZE, NUM_LABELS, image_dataset, tiny_convnext, tiny_resnet
from torch import nn

import hfkd.terms.at  # noqa: F401  (registers the term)
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch

KIND = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)


def _term(**options):
    cls = TERMS["at"]
    return cls(cls.Options(**options))


def _side(*maps, modules=None):
    return Features(SimpleNamespace(hidden_states=tuple(maps)), modules or {}, KIND)


def _batch(n):
    return TermBatch(labels=None, mask=None, num_examples=n)


# ---------------------------------------------------------------------------------------------------- reference
def _ref_resize(q, height, width):
    """Bilinear resize of a 2-D array, half-pixel centres (align_corners=False), edges clamped."""
    h, w = q.shape
    out = np.zeros((height, width))
    for i in range(height):
        sy = max((i + 0.5) * h / height - 0.5, 0.0)
        y0 = int(math.floor(sy))
        y1, ly = min(y0 + 1, h - 1), sy - y0
        for j in range(width):
            sx = max((j + 0.5) * w / width - 0.5, 0.0)
            x0 = int(math.floor(sx))
            x1, lx = min(x0 + 1, w - 1), sx - x0
            top = (1 - lx) * q[y0, x0] + lx * q[y0, x1]
            bottom = (1 - lx) * q[y1, x0] + lx * q[y1, x1]
            out[i, j] = (1 - ly) * top + ly * bottom
    return out


def _ref_example(a_s, a_t, p, distance, norm_p, min_area=1):
    """One example's distance for one layer pair: a_s [C_s, H_s, W_s], a_t [C_t, H_t, W_t] (float64 numpy)."""
    q_s = np.zeros(a_s.shape[1:])
    for c in range(a_s.shape[0]):
        q_s += np.abs(a_s[c]) ** p
    q_t = np.zeros(a_t.shape[1:])
    for c in range(a_t.shape[0]):
        q_t += np.abs(a_t[c]) ** p
    if q_s.shape != q_t.shape:
        q_s = _ref_resize(q_s, *q_t.shape)
    v_s = q_s.ravel() / math.sqrt((q_s.ravel() ** 2).sum())
    v_t = q_t.ravel() / math.sqrt((q_t.ravel() ** 2).sum())
    d = v_s - v_t
    if distance == "mean_squared":
        return (d**2).sum() / max(d.size, min_area)
    return (np.abs(d) ** norm_p).sum() ** (1.0 / norm_p)


def _ref_at(s_maps, t_maps, pairs, p=2.0, distance="mean_squared", norm_p=2.0, min_area=1):
    s_maps = [m.numpy() for m in s_maps]
    t_maps = [m.numpy() for m in t_maps]
    total = 0.0
    for b in range(s_maps[0].shape[0]):
        for s, t in pairs:
            total += _ref_example(s_maps[s][b], t_maps[t][b], p, distance, norm_p, min_area)
    return total


def _maps(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes]


# Student: stem + 3 stages, teacher: stem + 3 stages, of other channel counts and spatial sizes (up- and
# downsampling, non-integer ratios, non-square maps).
S_SHAPES = [(3, 4, 8, 8), (3, 5, 8, 8), (3, 6, 3, 5), (3, 7, 8, 8)]
T_SHAPES = [(3, 8, 8, 8), (3, 9, 8, 8), (3, 10, 7, 6), (3, 11, 4, 4)]


@pytest.mark.parametrize(
    "options",
    [
        {"layers": "uniform", "min_area": 1},  # hfkd's defaults before issue 21
        {"layers": "uniform", "min_area": 1, "p": 1.0},
        {"layers": "uniform", "p": 3.0, "distance": "norm"},
        {"layers": "uniform", "distance": "norm", "norm_p": 1.0},
        {"distance": "norm", "norm_p": 3.0, "layers": [[1, 1], [2, 2], [3, 3], [0, 0]]},
        {"layers": "3:1,1:3", "min_area": 1},
        {"layers": "uniform", "min_area": 30},  # floors the 4x4 and 7x6 maps' areas, not the 8x8's
        {"layers": "uniform"},  # min_area 64: all three teacher maps (64, 42 and 16 positions) divide by 64
    ],
)
def test_matches_the_float64_reference(options):
    s_maps, t_maps = _maps(S_SHAPES, 0), _maps(T_SHAPES, 1)
    term = _term(**options)
    value = term(_side(*s_maps), _side(*t_maps), _batch(3))
    spec = term.options.layers
    pairs = (
        [(1, 1), (2, 2), (3, 3)]  # uniform over 3 stages each (the stem, entry 0, is left out)
        if spec == "uniform"
        else [tuple(int(i) for i in p.split(":")) for p in spec.split(",")]
        if isinstance(spec, str)
        else [tuple(p) for p in spec]
    )
    kwargs = {k: v for k, v in options.items() if k != "layers"}
    kwargs.setdefault("min_area", 64)  # the default
    expected = _ref_at(s_maps, t_maps, pairs, **kwargs)
    assert value.dtype == torch.float64
    np.testing.assert_allclose(value.item(), expected, rtol=1e-10, atol=1e-14)


def test_min_area_1_equals_the_official_code_per_example_mean():
    """szagoruyko/attention-transfer: at(x) = normalize(x.pow(2).mean(1).view(B, -1)), at_loss = (at(x) - at(y))
    .pow(2).mean(), loss = beta * sum over pairs; the term is that sum times the batch size (the trainer's mean).
    min_area=1 is the official code (the default, 64, floors the 3x3 map's area at 64: next test)."""
    s_maps, t_maps = _maps([(3, 4, 6, 6), (3, 5, 3, 3)], 11), _maps([(3, 8, 6, 6), (3, 9, 3, 3)], 12)

    def at(x):
        return torch.nn.functional.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    official = sum((at(x) - at(y)).pow(2).mean() for x, y in zip(s_maps, t_maps, strict=True))
    value = _term(layers=[[0, 0], [1, 1]], min_area=1)(_side(*s_maps), _side(*t_maps), _batch(3))
    torch.testing.assert_close(value / 3, official, rtol=1e-12, atol=0)


def test_default_min_area_divides_small_maps_by_64_and_cifar_sized_ones_by_their_area():
    """Per unit of squared distance, no pair weighs more than CIFAR's smallest (8x8) map did with the official
    code; maps of 8x8 and larger are divided by their own area, as the official code does."""

    def at(x):
        return torch.nn.functional.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    for size, divisor in ((2, 64), (4, 64), (7, 64), (8, 64), (16, 256), (32, 1024)):
        (s,), (t,) = _maps([(3, 4, size, size)], size), _maps([(3, 6, size, size)], size + 1)
        expected = (at(s) - at(t)).pow(2).sum() / divisor
        value = _term(layers="0:0")(_side(s), _side(t), _batch(3))
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0)
        official = _term(layers="0:0", min_area=1)(_side(s), _side(t), _batch(3))
        torch.testing.assert_close(official, (at(s) - at(t)).pow(2).sum() / (size * size), rtol=1e-12, atol=0)


def test_uniform_and_last_pairing():
    term = _term(layers="uniform")
    s = _maps([(2, 3, 4, 4)] * 3, 0)  # stem + 2 stages (a 2-stage student)
    t = _maps([(2, 3, 4, 4)] * 4, 1)  # stem + 3 stages
    term(_side(*s), _side(*t), _batch(2))
    assert term._pairs == [(1, 2), (2, 3)]
    last = _term(layers="last")
    last(_side(*s), _side(*t), _batch(2))
    assert last._pairs == [(2, 3)]
    with pytest.raises(ValueError, match=r"at.layers pairs student index 3 with teacher index 1"):
        _term(layers=[[3, 1]])(_side(*s), _side(*t), _batch(2))


def test_resolution_pairing_is_the_default_and_pairs_stages_of_the_same_size():
    # The Fashion-MNIST pair of benchmarks/methods.py: student stem 7x7, stages 7x7, 4x4; teacher stem 7x7, stages
    # 7x7, 4x4, 2x2. 'uniform' pairs 7x7 with 4x4 and 4x4 with 2x2; 'resolution' pairs equal sizes.
    s = _maps([(2, 3, 7, 7), (2, 3, 7, 7), (2, 5, 4, 4)], 0)
    t = _maps([(2, 4, 7, 7), (2, 4, 7, 7), (2, 6, 4, 4), (2, 8, 2, 2)], 1)
    term = _term()
    assert term.options.layers == "resolution"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every stage has a partner of its size: no warning
        value = term(_side(*s), _side(*t), _batch(2))
    assert term._pairs == [(1, 1), (2, 2)]
    np.testing.assert_allclose(value.item(), _ref_at(s, t, [(1, 1), (2, 2)], min_area=64), rtol=1e-10)
    # Several teacher stages of one size: the last of them (the official code pairs each group's output).
    t_twice = _maps([(2, 4, 7, 7), (2, 4, 7, 7), (2, 4, 7, 7), (2, 6, 4, 4)], 2)
    term = _term()
    term(_side(*s), _side(*t_twice), _batch(2))
    assert term._pairs == [(1, 2), (2, 3)]


def test_resolution_pairing_falls_back_to_uniform_with_a_warning_naming_the_sizes():
    s = _maps([(2, 3, 8, 8), (2, 3, 8, 8), (2, 5, 3, 5)], 0)  # the 3x5 stage has no partner of its size
    t = _maps([(2, 4, 8, 8), (2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2)], 1)
    term = _term()
    with pytest.warns(UserWarning, match=r"student 2 \(3x5\) with teacher 3 \(2x2\).*Give at.layers explicitly"):
        term(_side(*s), _side(*t), _batch(2))
    assert term._pairs == [(1, 1), (2, 3)]  # stage 1 by size, stage 2 as 'uniform' pairs it


# ---------------------------------------------------------------------------------------------------- known values
def test_identical_and_rescaled_maps_give_zero():
    (a,) = _maps([(2, 4, 5, 5)], 0)
    for distance in ("mean_squared", "norm"):
        term = _term(layers="0:0", distance=distance)
        assert term(_side(a), _side(a.clone()), _batch(2)).item() == 0.0
        # 3x the activations, or the channels repeated: the same normalised map (channel counts may differ).
        assert term(_side(a), _side(3 * a), _batch(2)).item() == pytest.approx(0.0, abs=1e-14)
        assert term(_side(a), _side(torch.cat([a, a], 1)), _batch(2)).item() == pytest.approx(0.0, abs=1e-14)


def test_hand_computed_case():
    # One example, one channel, 1x2 maps. Student [1, 1] -> q = [1, 1]/sqrt2; teacher [1, 0] -> q = [1, 0].
    a_s = torch.tensor([[[[1.0, 1.0]]]], dtype=torch.float64)
    a_t = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    d2 = (1 - 1 / math.sqrt(2)) ** 2 + 0.5  # = 2 - sqrt2
    ms = _term(layers="0:0", min_area=1)(_side(a_s), _side(a_t), _batch(1)).item()
    assert ms == pytest.approx(d2 / 2, rel=1e-12)  # mean over the 2 positions (the official code)
    assert _term(layers="0:0")(_side(a_s), _side(a_t), _batch(1)).item() == pytest.approx(d2 / 64, rel=1e-12)
    norm = _term(layers="0:0", distance="norm")(_side(a_s), _side(a_t), _batch(1)).item()
    assert norm == pytest.approx(math.sqrt(d2), rel=1e-12)
    # p = 2 squares the activations: [2, 0] -> [4, 0], normalised [1, 0] as well; [1, -1] -> [1, 1].
    official = _term(layers="0:0", min_area=1)
    assert official(_side(-a_s), _side(2 * a_t), _batch(1)).item() == pytest.approx(d2 / 2, rel=1e-12)
    # A 1x1 student map upsampled to the teacher's 1x2 is constant: the same as the [1, 1] student.
    one = torch.tensor([[[[5.0]]]], dtype=torch.float64)
    assert official(_side(one), _side(a_t), _batch(1)).item() == pytest.approx(d2 / 2, rel=1e-12)


def test_sum_over_examples():
    s_maps, t_maps = _maps(S_SHAPES, 2), _maps(T_SHAPES, 3)
    term = _term()
    whole = term(_side(*s_maps), _side(*t_maps), _batch(3))
    parts = sum(
        term(_side(*[m[i : i + 1] for m in s_maps]), _side(*[m[i : i + 1] for m in t_maps]), _batch(1))
        for i in range(3)
    )
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("options", [{}, {"distance": "norm", "p": 3.0}])
def test_gradcheck_through_the_resize_and_normalisation(options):
    s_maps, t_maps = _maps([(2, 3, 3, 3), (2, 2, 4, 4)], 4), _maps([(2, 4, 5, 4), (2, 3, 2, 2)], 5)
    term = _term(layers=[[0, 0], [1, 1]], **options)

    def f(a, b):
        return term(_side(a, b), _side(*t_maps), _batch(2))

    inputs = tuple(m.requires_grad_() for m in s_maps)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_gradients_are_finite_at_a_perfect_match():
    (a,) = _maps([(2, 3, 4, 4)], 6)
    for distance in ("mean_squared", "norm"):
        x = a.clone().requires_grad_()
        _term(layers="0:0", distance=distance)(_side(x), _side(a), _batch(2)).backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-6


def test_teacher_gets_no_gradient():
    s, t = _maps([(2, 3, 4, 4)], 7)[0].requires_grad_(), _maps([(2, 5, 2, 2)], 8)[0].requires_grad_()
    _term(layers="0:0")(_side(s), _side(t), _batch(2)).backward()
    assert s.grad is not None and t.grad is None


# ---------------------------------------------------------------------------------------------------- bf16
def test_bf16_autocast_is_finite_and_close_to_float32():
    s_maps = [m.float() for m in _maps(S_SHAPES, 9)]
    t_maps = [m.float() for m in _maps(T_SHAPES, 10)]
    for options in ({}, {"distance": "norm"}):
        term = _term(**options)
        reference = term(_side(*s_maps), _side(*t_maps), _batch(3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = term(_side(*[m.bfloat16() for m in s_maps]), _side(*[m.bfloat16() for m in t_maps]), _batch(3))
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, reference, rtol=3e-2, atol=1e-4)
    # Large activations: their squares overflow nothing in float32.
    big = [1e4 * m.bfloat16() for m in s_maps]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(_term()(_side(*big), _side(*[m.bfloat16() for m in t_maps]), _batch(3)))


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"distance": "l1"}, r"term 'at': distance='l1' is not known"),
        ({"p": 0}, r"term 'at': p must be a finite number > 0"),
        ({"norm_p": 0.5}, r"term 'at': norm_p must be >= 1"),
        ({"layers": [[1]]}, r"term 'at': layers=\[\[1\]\]: each entry must be a \[student_index, teacher_index\]"),
        ({"layers": "1-2"}, r"term 'at': layers='1-2' is neither 'resolution', 'uniform', 'last' nor a list"),
        ({"min_area": 0}, r"term 'at': min_area must be an integer >= 1 \(64: CIFAR's smallest map"),
        ({"min_area": 8.0}, r"term 'at': min_area must be an integer >= 1"),
        ({"student_modules": []}, r"term 'at': student_modules must be a non-empty list"),
        ({"layer": 2}, r"term 'at' has no option 'layer'"),
    ],
)
def test_bad_options_fail_at_config_time(options, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "at", **options}])


def test_non_conv_features_are_refused_at_setup():
    term = _term()
    tokens = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"needs conv feature maps .* student's feature 1 has shape \(2, 5, 8\)"):
        term.setup(_side(tokens, tokens), _side(tokens, tokens), _batch(2))
    with pytest.raises(ValueError, match="give teacher_modules"):
        term.setup(_side(tokens), Features(torch.zeros(2, 3), {}, KIND), _batch(2))


# ---------------------------------------------------------------------------------------------------- trainer
def _train(tmp_path, student, teacher, terms, **overrides):
    values = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        terms=terms,
        task_weight=0.5,
        logit_weight=0.5,
        **{**COMMON, **values, **overrides},
    )
    data = image_dataset(8, CONV_IMAGE_SIZE)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    return trainer


def _check_logs(trainer, weight):
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs
    for entry in logs:
        assert {"task", "distill/logit", "distill/at"} <= set(entry)
        assert entry["distill/at"] > 0
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + weight * entry["distill/at"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)


def test_trainer_convnext_student_of_a_resnet_teacher(tmp_path):
    teacher, student = tiny_resnet((16, 32, 64), seed=0), tiny_convnext((8, 16), seed=1)
    trainer = _train(tmp_path, student, teacher, [{"name": "at", "weight": 1000.0, "layers": "uniform"}])
    # Stages: student 8x8, 4x4; teacher 8x8, 4x4, 2x2: both student maps are downsampled to the teacher's.
    assert trainer.term_set.terms["at"]._pairs == [(1, 2), (2, 3)]
    _check_logs(trainer, 1000.0)


def test_trainer_default_pairs_the_stages_of_the_same_size(tmp_path):
    teacher, student = tiny_resnet((16, 32, 64), seed=0), tiny_convnext((8, 16), seed=1)
    trainer = _train(tmp_path, student, teacher, [{"name": "at", "weight": 1000.0}])
    assert trainer.term_set.terms["at"]._pairs == [(1, 1), (2, 2)]  # 8x8 with 8x8, 4x4 with 4x4
    _check_logs(trainer, 1000.0)


class PlainCNN(nn.Module):
    """A timm-style CNN: forward(x) -> logits, no hidden_states."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(12, 24, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(24, NUM_LABELS)

    def forward(self, x):
        return self.head(self.stage2(self.stage1(self.stem(x))).mean((2, 3)))


def test_trainer_plain_cnn_teacher_by_module_names(tmp_path):
    student = tiny_resnet((8, 16), seed=1)
    terms = [{"name": "at", "weight": 1000.0, "teacher_modules": ["stage1", "stage2"]}]
    trainer = _train(tmp_path / "a", student, PlainCNN(), terms)
    assert trainer.term_set.terms["at"]._pairs == [(1, 0), (2, 1)]  # student hidden_states 1, 2 <- modules
    _check_logs(trainer, 1000.0)
    # Module names on both sides (then no model is asked for hidden_states).
    terms = [
        {
            "name": "at",
            "weight": 1000.0,
            "student_modules": "resnet.encoder.stages.0,resnet.encoder.stages.1",
            "teacher_modules": ["stage1", "stage2"],
            "layers": [[0, 0], [1, 1]],
        }
    ]
    trainer = _train(tmp_path / "b", tiny_resnet((8, 16), seed=1), PlainCNN(), terms)
    assert not trainer.term_set.needs().hidden_states
    _check_logs(trainer, 1000.0)
