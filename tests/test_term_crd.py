"""The `crd` term (contrastive representation distillation, Tian et al. 2020): the loss against a float64 reference
written from the paper's definitions with fixed banks, negatives and Z; known values; the memory-bank update, Z, the
negative sampler; masks, gradients, bf16 autocast; trainer runs (logging, evaluation, exact resume)."""

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from launches import run_gloo_workers
from safetensors.torch import load_file
from tiny_models import COMMON, bert, classification_data, parameters_of

import hfkd.terms.crd  # noqa: F401  (registers the term)
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.crd import crd_nce_loss, crd_softmax_loss
from hfkd.terms.runner import TERMS_FILE

KIND = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)


def _term(**options):
    cls = TERMS["crd"]
    return cls(cls.Options(**options))


def _side(features):
    return Features(SimpleNamespace(hidden_states=(features,)), {}, KIND)


def _batch(rows=None, num_rows=None, training=True, mask=None, size=None):
    size = size if size is not None else (len(rows) if rows is not None else mask.shape[0])
    row_ids = torch.tensor(rows, dtype=torch.long) if rows is not None else None
    return TermBatch(labels=None, mask=mask, num_examples=size, row_ids=row_ids, training=training, num_rows=num_rows)


def _features(batch, width, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=g, dtype=dtype)


def _built(num_rows=12, d_s=6, d_t=9, batch=4, dtype=torch.float64, data_seed=0, **options):
    """A set-up term (heads, banks) with random banks of unit rows, and its inputs."""
    options = {"feat_dim": 5, "num_negatives": 4, "seed": 7, **options}
    term = _term(**options)
    s, t = _features(batch, d_s, data_seed, dtype), _features(batch, d_t, data_seed + 1, dtype)
    torch.manual_seed(data_seed)
    term.setup(_side(s), _side(t), _batch(list(range(batch)), num_rows, training=False))
    term.to(dtype)
    g = torch.Generator().manual_seed(data_seed + 2)
    with torch.no_grad():
        for bank in (term.memory_s, term.memory_t):
            bank.copy_(torch.nn.functional.normalize(torch.randn(bank.shape, generator=g, dtype=dtype), dim=1))
    return term, s, t


def _fixed_negatives(term, negatives):
    """Replaces the sampler by fixed indices (training and evaluation alike)."""
    term._negatives = lambda rows, b, training: negatives.clone()


# ---------------------------------------------------------------------------------------------------- reference
def _ref_embed(x, weight, bias):
    y = np.array([sum(weight[o, k] * x[k] for k in range(len(x))) + bias[o] for o in range(len(bias))])
    return y / math.sqrt(sum(v * v for v in y))


def _dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def _ref_scores(term, s, t, rows, negatives, training):
    """Per example and direction: [positive score, negative scores...], from the paper's definitions."""
    tau = term.options.nce_temperature
    ws, bs = term.embed_s.weight.detach().numpy(), term.embed_s.bias.detach().numpy()
    wt, bt = term.embed_t.weight.detach().numpy(), term.embed_t.bias.detach().numpy()
    bank_s, bank_t = term.memory_s.numpy(), term.memory_t.numpy()
    u, w = [], []
    for i in range(s.shape[0]):
        v_s = _ref_embed(s[i].numpy(), ws, bs)
        v_t = _ref_embed(t[i].numpy(), wt, bt)
        if training:  # the positive is the example's own bank row
            u_pos, w_pos = _dot(v_s, bank_t[rows[i]]) / tau, _dot(v_t, bank_s[rows[i]]) / tau
        else:  # evaluation: the example's own pair
            u_pos = w_pos = _dot(v_s, v_t) / tau
        u.append([u_pos] + [_dot(v_s, bank_t[j]) / tau for j in negatives[i]])
        w.append([w_pos] + [_dot(v_t, bank_s[j]) / tau for j in negatives[i]])
    return u, w


def _ref_nce(scores, z, num_rows):
    """-(1/B) sum_i [log h(u_i0) + sum_k log(1 - h(u_ik))], h = P / (P + K/N), P = exp(u) / Z."""
    total = 0.0
    for row in scores:
        k = len(row) - 1

        def h(value, k=k):
            p = math.exp(value) / z
            return p / (p + k / num_rows)

        total += math.log(h(row[0])) + sum(math.log(1.0 - h(value)) for value in row[1:])
    return -total / len(scores)


def _ref_softmax(scores):
    return -sum(row[0] - math.log(sum(math.exp(v) for v in row)) for row in scores) / len(scores)


def _ref_z(scores, num_rows):
    values = [math.exp(v) for row in scores for v in row]
    return num_rows * sum(values) / len(values)


# ---------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_loss_equals_an_independent_float64_reference(objective, training):
    num_rows = 12
    term, s, t = _built(num_rows, objective=objective)
    rows = [3, 0, 11, 6]
    negatives = torch.tensor([[1, 2, 5, 9], [4, 4, 7, 10], [0, 1, 2, 3], [11, 8, 5, 2]])
    _fixed_negatives(term, negatives)
    z_s, z_t = 3.7 * num_rows, 5.2 * num_rows
    term.log_z.copy_(torch.tensor([math.log(z_s), math.log(z_t)], dtype=torch.float64))
    u, w = _ref_scores(term, s, t, rows, negatives.tolist(), training)
    if objective == "nce":
        expected = _ref_nce(u, z_s, num_rows) + _ref_nce(w, z_t, num_rows)
    else:
        expected = _ref_softmax(u) + _ref_softmax(w)
    batch = _batch(rows if training else None, num_rows, training=training, size=4)
    value = term(_side(s), _side(t), batch)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(expected, rel=1e-10)


def test_a_hand_computed_case():
    """d = 2, tau = 1, N = 3, K = 1, Z = N: P(u) = e^u / 3 and K/N = 1/3.

    Student side: v_s = (1, 0), M_T[y] = (1, 0), M_T[j] = (0, 1): u = (1, 0),
        h(1) = e / (e + 1), 1 - h(0) = 1/2, L_S = log(1 + e) - 1 + log 2.
    Teacher side: v_t = (0, 1), M_S[y] = (0, 1), M_S[j] = (0, -1): w = (1, -1),
        h(1) = e / (e + 1), 1 - h(-1) = 1 / (1 + e^-1) = e / (e + 1), L_T = 2 (log(1 + e) - 1).
    """
    term, _, _ = _built(num_rows=3, d_s=2, d_t=2, batch=1, feat_dim=2, num_negatives=1, nce_temperature=1.0)
    with torch.no_grad():
        for head in (term.embed_s, term.embed_t):
            head.weight.copy_(torch.eye(2, dtype=torch.float64))
            head.bias.zero_()
        term.memory_t.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64))
        term.memory_s.copy_(torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]], dtype=torch.float64))
        term.log_z.fill_(math.log(3.0))
    _fixed_negatives(term, torch.tensor([[1]]))
    s = torch.tensor([[2.0, 0.0]], dtype=torch.float64)  # normalised by the head: (1, 0)
    t = torch.tensor([[0.0, 0.5]], dtype=torch.float64)
    value = term(_side(s), _side(t), _batch([0], 3))
    e = math.e
    expected = (math.log(1 + e) - 1 + math.log(2)) + 2 * (math.log(1 + e) - 1)
    assert value.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_uninformative_scores_give_the_chance_value(objective):
    """Every bank row the same: the positive scores as the negatives. Softmax: log(K + 1) per side. NCE with Z taken
    from this example: P = 1/N, h = 1/(K + 1), so log(K + 1) + K log((K + 1)/K) per side."""
    k = 4
    term, s, t = _built(num_rows=9, batch=1, num_negatives=k, objective=objective)
    with torch.no_grad():
        term.memory_s.copy_(torch.nn.functional.normalize(torch.ones_like(term.memory_s), dim=1))
        term.memory_t.copy_(torch.nn.functional.normalize(torch.ones_like(term.memory_t), dim=1))
    value = term(_side(s), _side(t), _batch([5], 9)).item()
    per_side = math.log(k + 1) if objective == "softmax" else math.log(k + 1) + k * math.log((k + 1) / k)
    assert value == pytest.approx(2 * per_side, rel=1e-12)


def test_a_perfect_student_tends_to_zero_and_a_reversed_one_grows():
    """Scores: positive far above the noise level and negatives far below give ~0; the reverse a large loss."""
    n = 100
    good = torch.tensor([[30.0, -30.0, -30.0]], dtype=torch.float64)
    bad = torch.tensor([[-30.0, 30.0, 30.0]], dtype=torch.float64)
    log_z = torch.tensor(math.log(n), dtype=torch.float64)
    assert float(crd_nce_loss(good, log_z, n)) < 1e-10 and float(crd_softmax_loss(good)) < 1e-10
    assert float(crd_nce_loss(bad, log_z, n)) > 60 and float(crd_softmax_loss(bad)) > 60


# ---------------------------------------------------------------------------------------------------- state
def test_the_bank_update_is_momentum_then_renormalisation():
    term, s, t = _built(num_rows=12, momentum=0.3)
    rows = [3, 0, 11, 6]
    before_s, before_t = term.memory_s.clone(), term.memory_t.clone()
    ws, bs = term.embed_s.weight.detach().numpy(), term.embed_s.bias.detach().numpy()
    wt, bt = term.embed_t.weight.detach().numpy(), term.embed_t.bias.detach().numpy()
    term(_side(s), _side(t), _batch(rows, 12))
    for i, row in enumerate(rows):
        for bank, old, v in (
            (term.memory_s, before_s, _ref_embed(s[i].numpy(), ws, bs)),
            (term.memory_t, before_t, _ref_embed(t[i].numpy(), wt, bt)),
        ):
            mixed = [0.3 * old[row, k].item() + 0.7 * v[k] for k in range(len(v))]
            norm = math.sqrt(sum(x * x for x in mixed))
            np.testing.assert_allclose(bank[row].numpy(), [x / norm for x in mixed], rtol=1e-12)
            assert float(bank[row].norm()) == pytest.approx(1.0, rel=1e-12)
    untouched = [r for r in range(12) if r not in rows]
    assert torch.equal(term.memory_s[untouched], before_s[untouched])
    assert torch.equal(term.memory_t[untouched], before_t[untouched])


def test_the_banks_start_as_in_the_authors_code():
    term = _term(feat_dim=12, num_negatives=4)
    s, t = _features(4, 6, 0, torch.float32), _features(4, 9, 1, torch.float32)
    term.setup(_side(s), _side(t), _batch([0, 1, 2, 3], 2000))
    bound = 1 / math.sqrt(12 / 3)
    for bank in (term.memory_s, term.memory_t):
        assert bank.shape == (2000, 12) and bank.dtype == torch.float32
        assert float(bank.abs().max()) <= bound and float(bank.abs().max()) > 0.99 * bound
        assert float(bank.pow(2).sum(1).mean()) == pytest.approx(1.0, abs=0.03)  # E||row||^2 = d a^2 / 3 = 1
    assert not torch.equal(term.memory_s, term.memory_t)
    assert torch.isnan(term.log_z).all() and int(term.sampler_draws) == 0


def test_z_is_estimated_once_at_the_first_training_step():
    num_rows = 12
    term, s, t = _built(num_rows)
    negatives = torch.tensor([[1, 2, 5, 9], [4, 4, 7, 10], [0, 1, 2, 3], [11, 8, 5, 2]])
    _fixed_negatives(term, negatives)
    rows = [3, 0, 11, 6]
    # Evaluation before any training: Z is estimated from the batch but not stored.
    term(_side(s), _side(t), _batch(None, num_rows, training=False, size=4))
    assert torch.isnan(term.log_z).all()
    u, w = _ref_scores(term, s, t, rows, negatives.tolist(), training=True)
    first = term(_side(s), _side(t), _batch(rows, num_rows)).item()
    z_s, z_t = _ref_z(u, num_rows), _ref_z(w, num_rows)
    np.testing.assert_allclose(term.log_z.exp().numpy(), [z_s, z_t], rtol=1e-10)
    assert first == pytest.approx(_ref_nce(u, z_s, num_rows) + _ref_nce(w, z_t, num_rows), rel=1e-10)
    stored = term.log_z.clone()
    term(_side(s * 3), _side(t), _batch(rows, num_rows))  # other scores: Z stays
    assert torch.equal(term.log_z, stored)


def test_evaluation_changes_no_state():
    term, s, t = _built()
    term(_side(s), _side(t), _batch([0, 1, 2, 3], 12))
    state = {k: v.clone() for k, v in term.state_dict().items()}
    first = term(_side(s), _side(t), _batch(None, 12, training=False, size=4))
    second = term(_side(s), _side(t), _batch(None, 12, training=False, size=4))
    assert torch.equal(first, second)  # the evaluation draws are the same at every call
    for name, value in term.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_negatives_exclude_the_own_row_and_are_uniform_over_the_others():
    term, s, t = _built(num_rows=5, num_negatives=4)
    rows = torch.tensor([0, 1, 2, 3, 4])
    counts = torch.zeros(5, 5)
    for _ in range(400):
        negatives = term._negatives(rows, 5, training=True)
        assert negatives.shape == (5, 4)
        assert not (negatives == rows.unsqueeze(1)).any()
        counts += torch.nn.functional.one_hot(negatives, 5).sum(1)
    assert int(term.sampler_draws) == 400
    expected = 400 * 4 / 4  # per other row
    off_diagonal = counts[~torch.eye(5, dtype=torch.bool)]
    assert float((off_diagonal - expected).abs().max()) < 0.15 * expected
    included = _built(num_rows=5, num_negatives=4, exclude_positive=False)[0]
    draws = torch.cat([included._negatives(rows, 5, training=True) for _ in range(50)])
    assert (draws == rows.repeat(50).unsqueeze(1)).any()


def test_negatives_follow_the_seed_and_the_draw_count_restored_from_a_state_dict():
    a = _built()[0]
    b = _built()[0]
    rows = torch.tensor([0, 5, 7, 11])
    first = [a._negatives(rows, 4, training=True) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(first, [b._negatives(rows, 4, training=True) for _ in range(3)]))
    assert not torch.equal(first[0], first[1])
    state = {k: v.clone() for k, v in a.state_dict().items()}  # after 3 draws
    fourth = a._negatives(rows, 4, training=True)
    c = _built()[0]
    c._negatives(rows, 4, training=True)  # its host copy of the counter is now 1 ...
    c.load_state_dict(state)  # ... and loading the state resets it to the stored 3
    assert torch.equal(c._negatives(rows, 4, training=True), fourth)
    other_seed = _built(seed=8)[0]
    assert not torch.equal(other_seed._negatives(rows, 4, training=True), first[0])


def test_too_many_negatives_are_clamped_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="hfkd.terms.crd"):
        term, s, t = _built(num_rows=6, num_negatives=16384)
    assert term.num_negatives == 5
    assert "num_negatives=16384 but the memory bank has only 6 rows" in caplog.text
    assert term._negatives(torch.tensor([0, 1, 2, 3]), 4, training=True).shape == (4, 5)
    assert torch.isfinite(term(_side(s), _side(t), _batch([0, 1, 2, 3], 6)))


# ---------------------------------------------------------------------------------------------------- inputs
def test_padding_never_counts():
    g = torch.Generator().manual_seed(3)
    s, t = (
        torch.randn(4, 7, 6, generator=g, dtype=torch.float64),
        torch.randn(4, 7, 9, generator=g, dtype=torch.float64),
    )
    mask = torch.ones(4, 7, dtype=torch.bool)
    for row in range(4):
        mask[row, 7 - row :] = False if row else True
    s2, t2 = s.clone(), t.clone()
    s2[~mask], t2[~mask] = 1e3, -1e3
    values = []
    for student, teacher in ((s, t), (s2, t2)):
        term = _built()[0]  # mean pooling over the kept positions
        values.append(term(_side(student), _side(teacher), _batch([0, 1, 2, 3], 12, mask=mask)))
    assert values[0].item() == pytest.approx(values[1].item(), rel=1e-12)


def test_gradcheck_float64():
    term, s, t = _built()
    term(_side(s), _side(t), _batch([0, 1, 2, 3], 12))  # sets Z
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    batch = _batch(None, 12, training=False, size=4)  # evaluation: the banks stay fixed between calls
    assert torch.autograd.gradcheck(lambda x: term(_side(x), _side(t), batch), (s,))
    value = term(_side(s), _side(t), batch)
    value.backward()
    assert t.grad is None  # the teacher's features are detached
    assert all(torch.isfinite(p.grad).all() for p in term.parameters())  # both heads are trained
    scores = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    log_z = torch.tensor(2.0, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: crd_nce_loss(x, log_z, 7), (scores,))
    assert torch.autograd.gradcheck(crd_softmax_loss, (scores,))


@pytest.mark.parametrize("objective", ["nce", "softmax"])
def test_bf16_autocast_is_finite_and_close_to_float32(objective):
    term, s, t = _built(dtype=torch.float32, objective=objective)
    term(_side(s), _side(t), _batch([0, 1, 2, 3], 12))  # sets Z
    batch = _batch(None, 12, training=False, size=4)
    reference = term(_side(s), _side(t), batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term(_side(s), _side(t), batch)
        from_bf16 = term(_side(s.bfloat16()), _side(t.bfloat16()), batch)
    for v in (value, from_bf16):
        assert v.dtype == torch.float32 and torch.isfinite(v)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6)
    assert from_bf16.item() == pytest.approx(reference.item(), rel=5e-2)


def test_misuse_fails_with_the_reason():
    term = _term(num_negatives=4)
    s, t = _features(4, 6, 0, torch.float32), _features(4, 9, 1, torch.float32)
    assert term.needs().row_ids and term.needs().hidden_states
    with pytest.raises(ValueError, match="datasets.Dataset"):
        term.setup(_side(s), _side(t), _batch([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="at least 2 training rows"):
        term.setup(_side(s), _side(t), _batch([0], 1, size=4))
    with pytest.raises(ValueError, match="setup"):
        term(_side(s), _side(t), _batch([0, 1, 2, 3], 12))
    term.setup(_side(s), _side(t), _batch([0, 1, 2, 3], 12))
    with pytest.raises(ValueError, match="row_ids"):
        term(_side(s), _side(t), _batch(None, 12, training=True, size=4))
    with pytest.raises(ValueError, match="banks have 12 rows but the train set has 13"):
        term(_side(s), _side(t), _batch([0, 1, 2, 3], 13))
    with pytest.raises(ValueError, match="4 examples but 3 row ids"):
        term(_side(s), _side(t), _batch([0, 1, 2], 12))


# ---------------------------------------------------------------------------------------------------- trainer
def _trainer(tmp_path, terms, eval_dataset=None, **overrides):
    values = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    args = DistillationConfig(output_dir=str(tmp_path / "out"), terms=terms, **{**COMMON, **values, **overrides})
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=classification_data(n=16),
        eval_dataset=eval_dataset,
    )


def test_trainer_logs_the_term_adds_it_with_its_weight_and_evaluates(tmp_path):
    terms = [{"name": "crd", "weight": 0.8, "num_negatives": 8, "feat_dim": 16}]
    trainer = _trainer(
        tmp_path, terms, eval_dataset=classification_data(n=8, seed=1), save_strategy="steps", save_steps=3
    )
    term = trainer.term_set.terms["crd"]
    assert term.memory_s.shape == (16, 16) and term.embed_s.in_features == 16 and term.embed_t.in_features == 32
    in_optimizer = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert {id(p) for p in term.parameters()} <= in_optimizer
    banks = term.memory_s.clone(), term.memory_t.clone()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert math.isfinite(entry["distill/crd"])
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 0.8 * entry["distill/crd"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
    assert int(term.sampler_draws) == 3 and not torch.isnan(term.log_z).any()
    changed = (term.memory_s != banks[0]).any(1)
    assert int(changed.sum()) == 12  # 3 steps x 4 rows, each seen once
    np.testing.assert_allclose(term.memory_s[changed].norm(dim=1).numpy(), 1.0, rtol=1e-5)
    assert torch.equal(term.memory_s[~changed], banks[0][~changed])
    state = {k: v.clone() for k, v in term.state_dict().items()}
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_distill/crd"])
    for name, value in term.state_dict().items():
        assert torch.equal(value, state[name]), name  # evaluation reads the banks, never writes them
    saved = load_file(str(tmp_path / "out" / "checkpoint-3" / TERMS_FILE))
    assert {"terms.crd.memory_s", "terms.crd.memory_t", "terms.crd.log_z", "terms.crd.sampler_draws"} <= set(saved)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    terms = [{"name": "crd", "weight": 0.8, "num_negatives": 8, "feat_dim": 16}]
    whole = _trainer(tmp_path / "a", terms, max_steps=4)
    whole.train()
    first = _trainer(tmp_path / "b", terms, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed = _trainer(tmp_path / "b", terms, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    a, b = whole.term_set.terms["crd"], resumed.term_set.terms["crd"]
    assert int(b.sampler_draws) == 4
    for name, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[name], rtol=1e-6, atol=1e-7, equal_nan=True, msg=name)
    for name, value in parameters_of(whole.model).items():
        torch.testing.assert_close(value, parameters_of(resumed.model)[name], rtol=1e-6, atol=1e-7)
    logged = [e["distill/crd"] for e in whole.state.log_history if "distill/crd" in e]
    resumed_logged = [e["distill/crd"] for e in resumed.state.log_history if "distill/crd" in e]
    assert resumed_logged[-2:] == pytest.approx(logged[-2:], rel=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"feat_dim": 0}, "feat_dim must be an integer >= 1"),
        ({"num_negatives": 2.5}, "num_negatives must be an integer >= 1"),
        ({"nce_temperature": 0}, "nce_temperature must be a finite number > 0"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
        ({"objective": "infonce"}, "objective='infonce' is not known"),
        ({"exclude_positive": "yes"}, "exclude_positive must be true or false"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"pooling": "max"}, "pooling='max' is not known"),
        ({"negatives": 8}, "term 'crd' has no option 'negatives'"),
    ],
)
def test_bad_options_fail_at_config_time_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "crd", **options}])


# ---------------------------------------------------------------------------------------------------- DDP
_DDP_ROWS = ([0, 5], [7, 9, 11])  # micro-batches of different sizes


def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        term = _built()[0]
        s, t = _features(5, 6, 10), _features(5, 9, 11)
        part = slice(0, 2) if rank == 0 else slice(2, 5)
        drawn = []
        sample = term._negatives
        term._negatives = lambda rows, b, training: drawn.append(sample(rows, b, training)) or drawn[-1]
        term(_side(s[part]), _side(t[part]), _batch(_DDP_ROWS[rank], 12))
        torch.save({"state": term.state_dict(), "negatives": drawn[0]}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_processes_apply_the_same_bank_update_and_z(tmp_path):
    """Two gloo processes: every process's rows reach every bank copy, and Z is estimated over both."""
    run_gloo_workers(_ddp_worker, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][name]), name
    assert not torch.equal(results[0]["negatives"][:1], results[1]["negatives"][:1])  # each process draws its own
    reference = _built()[0]
    s, t = _features(5, 6, 10), _features(5, 9, 11)
    u_all, w_all = [], []
    for rank, part in enumerate((slice(0, 2), slice(2, 5))):
        u, w = _ref_scores(reference, s[part], t[part], _DDP_ROWS[rank], results[rank]["negatives"].tolist(), True)
        u_all, w_all = u_all + u, w_all + w
    np.testing.assert_allclose(
        results[0]["state"]["log_z"].exp().numpy(), [_ref_z(u_all, 12), _ref_z(w_all, 12)], rtol=1e-10
    )
    ws, bs = reference.embed_s.weight.detach().numpy(), reference.embed_s.bias.detach().numpy()
    bank = reference.memory_s.clone()
    for i, row in enumerate(_DDP_ROWS[0] + _DDP_ROWS[1]):
        v = _ref_embed(s[i].numpy(), ws, bs)
        mixed = 0.5 * bank[row].numpy() + 0.5 * v
        bank[row] = torch.from_numpy(mixed / np.sqrt((mixed * mixed).sum()))
    torch.testing.assert_close(results[0]["state"]["memory_s"], bank, rtol=1e-12, atol=1e-14)
