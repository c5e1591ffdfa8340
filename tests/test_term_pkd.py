"""The `pkd` term (patient knowledge distillation, Sun et al. 2019) against a float64 reference written from the
paper's eq. 3, known values, masks, gradients, bf16 autocast, layer maps, and trainer runs (with the projection it
builds when the widths differ: created, trained, checkpointed)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import COMMON, bert, classification_data

import hfkd.terms.pkd  # noqa: F401  (registers the term)
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.pkd import pkd_pairs
from hfkd.terms.runner import TERMS_FILE

KIND = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)


def _term(**options):
    cls = TERMS["pkd"]
    return cls(cls.Options(**options))


def _side(states):
    return Features(SimpleNamespace(hidden_states=tuple(states)), {}, KIND)


def _batch(mask):
    return TermBatch(labels=None, mask=mask, num_examples=mask.shape[0])


def _states(num_layers, width, seed, batch=4, length=6):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, width, generator=g, dtype=torch.float64) for _ in range(num_layers + 1)]


def _mask(batch=4, length=6):
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row in range(batch):
        mask[row, length - row :] = False if row else True  # 0, 1, 2, 3 padded positions
    return mask


# ---------------------------------------------------------------------------------------------------- reference
def _ref_vector(h, mask_row, pooling):
    """h [T, D] of one example -> [D]: position 0, or the mean of the kept positions (explicit loop)."""
    if pooling == "cls":
        return h[0].copy()
    total, count = np.zeros(h.shape[1]), 0
    for t in range(h.shape[0]):
        if mask_row[t]:
            total += h[t]
            count += 1
    return total / count


def _ref_pkd(s_states, t_states, pairs, mask, pooling="cls", reduction="sum", normalize=True, projections=None):
    """L_PT = sum_i sum_j || h_s/||h_s|| - h_t/||h_t|| ||^2 (eq. 3), with the code's mean as an alternative."""
    s_states = [x.detach().numpy() for x in s_states]
    t_states = [x.detach().numpy() for x in t_states]
    mask = mask.numpy()
    total = 0.0
    for i in range(mask.shape[0]):
        for j, (s, t) in enumerate(pairs):
            h_s = _ref_vector(s_states[s][i], mask[i], pooling)
            h_t = _ref_vector(t_states[t][i], mask[i], pooling)
            if projections is not None:
                weight, bias = projections[j]
                h_s = np.array(
                    [sum(weight[o, k] * h_s[k] for k in range(len(h_s))) + bias[o] for o in range(len(bias))]
                )
            if normalize:
                h_s = h_s / math.sqrt(sum(x * x for x in h_s))
                h_t = h_t / math.sqrt(sum(x * x for x in h_t))
            d = sum((a - b) ** 2 for a, b in zip(h_s, h_t, strict=True))
            if reduction == "mean":
                d = d / (len(h_t) * len(pairs))
            total += d
    return total


@pytest.mark.parametrize(
    ("options", "pairs"),
    [
        ({"reduction": "sum"}, [(1, 2), (2, 4), (3, 6)]),  # PKD-Skip, 4 of 8 layers; eq. 3 as written
        ({}, [(1, 2), (2, 4), (3, 6)]),  # the default: the official code's mean
        ({"layer_map": "last", "pooling": "mean", "reduction": "sum"}, [(1, 5), (2, 6), (3, 7)]),
        ({"layer_map": "2,8", "reduction": "mean"}, [(1, 2), (2, 8)]),  # partial map: student layers 1, 2
        ({"layer_map": [3, 5], "student_layers": "4,2", "pooling": "mean", "reduction": "mean"}, [(4, 3), (2, 5)]),
        ({"layer_map": "8,1,4,7", "normalize": False, "reduction": "sum"}, [(1, 8), (2, 1), (3, 4), (4, 7)]),
    ],
)
def test_matches_the_float64_reference(options, pairs):
    s_states, t_states, mask = _states(4, 5, 0), _states(8, 5, 1), _mask()
    term = _term(**options)
    value = term(_side(s_states), _side(t_states), _batch(mask))
    assert term._pairs == pairs
    kwargs = {k: v for k, v in options.items() if k in ("pooling", "reduction", "normalize")}
    kwargs.setdefault("reduction", "mean")  # the default
    expected = _ref_pkd(s_states, t_states, pairs, mask, **kwargs)
    assert value.dtype == torch.float64
    np.testing.assert_allclose(value.item(), expected, rtol=1e-10, atol=1e-14)


def test_projection_matches_the_reference_and_is_built_only_when_widths_differ():
    s_states, t_states, mask = _states(3, 4, 2), _states(6, 7, 3), _mask()
    term = _term(pooling="mean", reduction="sum")
    term.setup(_side(s_states), _side(t_states), _batch(mask))
    assert [type(p).__name__ for p in term.projections] == ["Linear", "Linear"]
    assert term.projections[0].weight.shape == (7, 4)
    term.double()
    value = term(_side(s_states), _side(t_states), _batch(mask))
    weights = [(p.weight.detach().numpy(), p.bias.detach().numpy()) for p in term.projections]
    expected = _ref_pkd(
        s_states, t_states, [(1, 2), (2, 4)], mask, pooling="mean", reduction="sum", projections=weights
    )
    np.testing.assert_allclose(value.item(), expected, rtol=1e-10)
    same = _term()
    same.setup(_side(_states(3, 7, 4)), _side(t_states), _batch(mask))
    assert same.projections is None and not list(same.parameters())


def test_layer_maps_of_the_paper():
    # BERT-base (12 layers) -> 6 layers: PKD-Skip 2, 4, 6, 8, 10; PKD-Last 7, 8, 9, 10, 11.
    assert pkd_pairs("skip", None, 7, 13) == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert pkd_pairs("last", None, 7, 13) == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert pkd_pairs("skip", None, 4, 13) == [(1, 4), (2, 8)]  # 3-layer student
    assert pkd_pairs([4, 8, 12], None, 7, 13) == [(1, 4), (2, 8), (3, 12)]
    assert pkd_pairs("skip", [2, 5], 7, 13) == [(2, 4), (5, 10)]
    with pytest.raises(ValueError, match="layer_map has 7 entries but the student has only 6 layers"):
        pkd_pairs([1, 2, 3, 4, 5, 6, 7], None, 7, 13)
    with pytest.raises(ValueError, match="teacher index 13, but the teacher has 13 hidden_states entries"):
        pkd_pairs([13], None, 7, 13)
    with pytest.raises(ValueError, match="student hidden_states index 7"):
        pkd_pairs([2], [7], 7, 13)
    with pytest.raises(ValueError, match="has 1 layer\\(s\\), so PKD-skip has no intermediate layer"):
        pkd_pairs("skip", None, 2, 13)


# ---------------------------------------------------------------------------------------------------- known values
def test_identical_and_rescaled_states_give_zero():
    states, mask = _states(3, 6, 5), _mask()
    for pooling in ("cls", "mean"):
        term = _term(layer_map="1,2,3", pooling=pooling)
        assert term(_side(states), _side([s.clone() for s in states]), _batch(mask)).item() == 0.0
        scaled = [5 * s for s in states]  # normalised away
        assert term(_side(states), _side(scaled), _batch(mask)).item() == pytest.approx(0.0, abs=1e-13)
        raw = _term(layer_map="1,2,3", pooling=pooling, normalize=False)
        assert raw(_side(states), _side(scaled), _batch(mask)).item() > 1.0


def test_hand_computed_case():
    # One example, [CLS] student [1, 0], teacher [0, 2]: normalised [1, 0] and [0, 1], squared distance 2.
    s = [torch.zeros(1, 2, 2, dtype=torch.float64) for _ in range(3)]
    t = [torch.zeros(1, 2, 2, dtype=torch.float64) for _ in range(3)]
    s[1][0, 0] = torch.tensor([1.0, 0.0])
    t[2][0, 0] = torch.tensor([0.0, 2.0])
    s[1][0, 1] = t[2][0, 1] = torch.tensor([7.0, -3.0])  # position 1: never read with 'cls'
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert _term(layer_map="2", reduction="sum").forward(_side(s), _side(t), _batch(mask)).item() == pytest.approx(2.0)
    assert _term(layer_map="2", reduction="mean")(_side(s), _side(t), _batch(mask)).item() == pytest.approx(1.0)
    assert _term(layer_map="2")(_side(s), _side(t), _batch(mask)).item() == pytest.approx(1.0)  # default: mean
    # Mean pooling: student [4, -1.5] -> [8, -3]/sqrt73, teacher [3.5, -0.5] -> [7, -1]/sqrt50.
    a, b = np.array([8.0, -3.0]) / math.sqrt(73), np.array([7.0, -1.0]) / math.sqrt(50)
    value = _term(layer_map="2", pooling="mean", reduction="sum")(_side(s), _side(t), _batch(mask)).item()
    assert value == pytest.approx(((a - b) ** 2).sum(), rel=1e-12)
    # Unnormalised: || [1, 0] - [0, 2] ||^2 = 5.
    raw = _term(layer_map="2", normalize=False, reduction="sum")
    assert raw(_side(s), _side(t), _batch(mask)).item() == pytest.approx(5.0)


# ---------------------------------------------------------------------------------------------------- masks, grads
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_never_counts(pooling):
    s_states, t_states, mask = _states(3, 5, 6), _states(6, 5, 7), _mask()
    term = _term(pooling=pooling, layer_map="2,4,6")
    before = term(_side(s_states), _side(t_states), _batch(mask))
    noisy = [x.masked_fill(~mask.unsqueeze(-1), 1e6) for x in s_states]
    noisy_t = [x.masked_fill(~mask.unsqueeze(-1), -1e6) for x in t_states]
    after = term(_side(noisy), _side(noisy_t), _batch(mask))
    torch.testing.assert_close(after, before, rtol=1e-12, atol=0)


def test_gradcheck_with_a_projection():
    s_states, t_states, mask = _states(3, 3, 8, batch=3, length=4), _states(6, 4, 9, batch=3, length=4), _mask(3, 4)
    term = _term(pooling="mean")
    term.setup(_side(s_states), _side(t_states), _batch(mask))
    term.double()

    def f(a, b, weight, bias):
        params = {"projections.0.weight": weight, "projections.0.bias": bias}
        student = _side([s_states[0], a, b, s_states[3]])
        return torch.func.functional_call(term, params, (student, _side(t_states), _batch(mask)))

    weight, bias = term.projections[0].weight.detach(), term.projections[0].bias.detach()
    inputs = tuple(x.clone().requires_grad_() for x in (s_states[1], s_states[2], weight, bias))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    # The projection's parameters get finite gradients; the teacher's states get none.
    t_leaf = t_states[2].clone().requires_grad_()
    term(_side(s_states), _side([*t_states[:2], t_leaf, *t_states[3:]]), _batch(mask)).backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in term.parameters())
    assert t_leaf.grad is None


def test_gradients_are_finite_at_a_perfect_match():
    states, mask = _states(3, 5, 10), _mask()
    x = [s.clone().requires_grad_() for s in states]
    _term(layer_map="1,2,3")(_side(x), _side(states), _batch(mask)).backward()
    assert all(torch.isfinite(v.grad).all() for v in x[1:])


def test_bf16_autocast_is_finite_and_close_to_float32():
    s_states = [x.float() for x in _states(3, 16, 11)]
    t_states = [x.float() for x in _states(6, 32, 12)]
    mask = _mask()
    for options in ({}, {"pooling": "mean", "reduction": "mean"}):
        term = _term(**options)
        term.setup(_side(s_states), _side(t_states), _batch(mask))
        reference = term(_side(s_states), _side(t_states), _batch(mask))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = term(
                _side([x.bfloat16() for x in s_states]), _side([x.bfloat16() for x in t_states]), _batch(mask)
            )
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_map": "uniform"}, r"term 'pkd': layer_map='uniform' would also match the embeddings"),
        ({"layer_map": "2,x"}, r"term 'pkd': layer_map='2,x' is neither"),
        ({"layer_map": [2, -1]}, r"term 'pkd': layer_map=\[2, -1\] holds a negative index"),
        ({"layer_map": "2,4", "student_layers": [1]}, r"term 'pkd': student_layers has 1 entries but layer_map has 2"),
        ({"student_layers": "0,1"}, r"term 'pkd': student_layers holds 0"),
        ({"pooling": "max"}, r"term 'pkd': pooling='max' is not known"),
        ({"reduction": "avg"}, r"term 'pkd': reduction='avg' is not known"),
        ({"normalize": "yes"}, r"term 'pkd': normalize must be true or false"),
    ],
)
def test_bad_options_fail_at_config_time(options, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "pkd", **options}])


# ---------------------------------------------------------------------------------------------------- trainer
def _trainer(tmp_path, terms, **overrides):
    values = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        terms=terms,
        task_weight=0.5,
        logit_weight=0.5,
        **{**COMMON, **values, **overrides},
    )
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())


def test_trainer_run_trains_and_checkpoints_the_projection(tmp_path):
    trainer = _trainer(
        tmp_path, [{"name": "pkd", "weight": 100.0, "reduction": "mean"}], save_strategy="steps", save_steps=3
    )
    term = trainer.term_set.terms["pkd"]
    assert term._pairs == [(1, 2)]  # PKD-Skip, 2-layer student of a 4-layer teacher
    projection = term.projections[0]
    assert isinstance(projection, torch.nn.Linear) and projection.weight.shape == (32, 16)
    before = projection.weight.detach().clone()
    in_optimizer = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert {id(projection.weight), id(projection.bias)} <= in_optimizer
    trainer.train()
    assert not torch.equal(projection.weight, before)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs
    for entry in logs:
        assert {"task", "distill/logit", "distill/pkd"} <= set(entry)
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 100.0 * entry["distill/pkd"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
    saved = load_file(str(tmp_path / "out" / "checkpoint-3" / TERMS_FILE))
    assert set(saved) == {"terms.pkd.projections.0.weight", "terms.pkd.projections.0.bias"}
    torch.testing.assert_close(saved["terms.pkd.projections.0.weight"], projection.weight.detach().cpu())


def test_trainer_run_with_a_partial_map_and_mean_pooling(tmp_path):
    trainer = _trainer(tmp_path, [{"name": "pkd", "weight": 1.0, "layer_map": "2,4", "pooling": "mean"}], max_steps=2)
    trainer.train()
    assert trainer.term_set.terms["pkd"]._pairs == [(1, 2), (2, 4)]
    assert all(entry["distill/pkd"] > 0 for entry in trainer.state.log_history if "loss" in entry)
