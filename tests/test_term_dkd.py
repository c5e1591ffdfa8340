"""Decoupled KD (hfkd.terms.dkd) against the paper's definitions, on its edge cases, and in a short training run."""

import math

import numpy as np
import pytest
import torch
from tiny_models import COMMON, bert, classification_data, llama, lm_data, text_dataset, tiny_bert

import hfkd.terms.dkd  # noqa: F401  (registers the term)
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.dkd import DKDOptions, dkd_beta_for_classes, dkd_per_item

EXAMPLES = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _reference(student, teacher, labels, temperature):
    """The paper's definitions of b, p^, TCKD and NCKD in float64 numpy, one example at a time: (T^2 TCKD, T^2 NCKD) per example."""
    tckd, nckd = [], []
    for z_s, z_t, target in zip(np.asarray(student), np.asarray(teacher), np.asarray(labels), strict=True):
        if target == -100:
            tckd.append(0.0)
            nckd.append(0.0)
            continue
        p_s, p_t = _softmax(z_s / temperature), _softmax(z_t / temperature)
        b_s = [p_s[target], 1.0 - p_s[target]]
        b_t = [p_t[target], 1.0 - p_t[target]]
        tckd.append(temperature**2 * sum(q * math.log(q / p) for q, p in zip(b_t, b_s, strict=True)))
        others = [i for i in range(len(z_s)) if i != target]
        hat_s = [p_s[i] / sum(p_s[j] for j in others) for i in others]
        hat_t = [p_t[i] / sum(p_t[j] for j in others) for i in others]
        nckd.append(temperature**2 * sum(q * math.log(q / p) for q, p in zip(hat_t, hat_s, strict=True)))
    return np.array(tckd), np.array(nckd)


def _random(batch=6, classes=7, seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    t = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    labels = torch.randint(0, classes, (batch,), generator=g)
    return s, t, labels


def _sides(s, t, labels, training=True):
    kind = EXAMPLES
    return (
        Features(s, {}, kind),
        Features(t, {}, kind),
        TermBatch(labels=labels, mask=None, num_examples=s.shape[0], training=training),
    )


def _term(**options):
    return TERMS["dkd"](DKDOptions(**options))


# ------------------------------------------------------------------------------------------------- the definition
@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.5])
def test_parts_equal_an_independent_float64_reference(temperature):
    s, t, labels = _random(seed=int(temperature * 10))
    labels[2] = -100
    tckd, nckd = dkd_per_item(s, t, labels, temperature)
    ref_tckd, ref_nckd = _reference(s, t, labels, temperature)
    np.testing.assert_allclose(tckd.numpy(), ref_tckd, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(nckd.numpy(), ref_nckd, rtol=1e-10, atol=1e-13)
    assert (ref_tckd > 0).sum() == 5 and (ref_nckd > 0).sum() == 5  # the comparison is not between zeros


def test_term_is_alpha_tckd_plus_beta_nckd_summed_over_examples():
    s, t, labels = _random(batch=5, classes=4, seed=3)
    ref_tckd, ref_nckd = _reference(s, t, labels, 2.0)
    value = _term(alpha=0.7, beta=3.0, temperature=2.0)(*_sides(s, t, labels))
    assert value.dim() == 0
    assert value.item() == pytest.approx(float((0.7 * ref_tckd + 3.0 * ref_nckd).sum()), rel=1e-10)
    paper = _term(beta=8.0, temperature=4.0)(*_sides(s, t, labels))  # the paper's CIFAR-100 setting
    ref_tckd, ref_nckd = _reference(s, t, labels, 4.0)
    assert paper.item() == pytest.approx(float((ref_tckd + 8.0 * ref_nckd).sum()), rel=1e-10)


# ------------------------------------------------------------------------------------- beta fitted to the classes
def test_default_is_the_papers_imagenet_setting():
    """alpha 1, beta 0.5, T 1 (measured in benchmarks/METHODS.md, "Task-fitted defaults"), at any class count."""
    options = DKDOptions()
    assert (options.alpha, options.beta, options.temperature) == (1.0, 0.5, 1.0)
    for classes in (3, 10, 100):
        s, t, labels = _random(batch=5, classes=classes, seed=classes)
        ref_tckd, ref_nckd = _reference(s, t, labels, 1.0)
        expected = float((ref_tckd + 0.5 * ref_nckd).sum())
        assert _term()(*_sides(s, t, labels)).item() == pytest.approx(expected, rel=1e-10)


def test_auto_beta_is_the_papers_8_at_100_classes_and_shrinks_with_fewer():
    assert dkd_beta_for_classes(100) == pytest.approx(8.0, rel=1e-15)
    assert dkd_beta_for_classes(1000) == pytest.approx(8.0, rel=1e-15)  # never above the paper's value
    assert dkd_beta_for_classes(10) == pytest.approx(8.0 * math.sqrt(9 / 99), rel=1e-15)  # 2.41
    assert dkd_beta_for_classes(3) == pytest.approx(8.0 * math.sqrt(2 / 99), rel=1e-15)  # 1.14
    with pytest.raises(ValueError, match="at least 2 classes"):
        dkd_beta_for_classes(1)


@pytest.mark.parametrize("classes", [3, 10, 100])
def test_auto_beta_is_fitted_to_the_logits_class_count(classes):
    s, t, labels = _random(batch=5, classes=classes, seed=classes)
    ref_tckd, ref_nckd = _reference(s, t, labels, 4.0)
    beta = 8.0 * math.sqrt(min(classes - 1, 99) / 99)
    expected = float((ref_tckd + beta * ref_nckd).sum())
    assert _term(beta="auto", temperature=4.0)(*_sides(s, t, labels)).item() == pytest.approx(expected, rel=1e-10)
    assert _term(beta="AUTO", temperature=4.0)(*_sides(s, t, labels)).item() == pytest.approx(expected, rel=1e-10)


def _nckd_over_ce_gradient(classes: int, beta: float, scale: float) -> float:
    """Median over examples of ||d(beta * NCKD)/dz|| / ||d CE/dz|| at T = 4, on synthetic logits: a teacher that
    prefers the target by 2 * scale over noise of std `scale`, a student of noise only."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (512,), generator=generator)
    t = scale * torch.randn(512, classes, generator=generator, dtype=torch.float64)
    t[torch.arange(512), labels] += 2 * scale
    s = (scale * torch.randn(512, classes, generator=generator, dtype=torch.float64)).requires_grad_()
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="sum")
    (g_ce,) = torch.autograd.grad(ce, s)
    (g_nckd,) = torch.autograd.grad(dkd_per_item(s, t, labels, 4.0)[1].sum(), s)
    return float((beta * g_nckd.norm(dim=1) / g_ce.norm(dim=1)).median())


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_auto_beta_keeps_the_nckd_to_ce_gradient_ratio_near_cifar_100s(scale):
    """The rule's purpose: with beta = 8 the ratio at 3 and 10 classes is several times CIFAR-100's; with "auto"
    it stays within a factor of 2 of it."""
    cifar = _nckd_over_ce_gradient(100, 8.0, scale)
    for classes in (3, 10):
        assert _nckd_over_ce_gradient(classes, 8.0, scale) > 2.5 * cifar
        fitted = _nckd_over_ce_gradient(classes, dkd_beta_for_classes(classes), scale)
        assert cifar / 2 < fitted < 2 * cifar


def test_classical_kd_decomposes_as_the_paper_says():
    """Sec. 3.1: KL(p^T || p^S) = TCKD + (1 - p_t^T) NCKD (before the T^2 factors, which scale both sides)."""
    s, t, labels = _random(batch=8, classes=10, seed=5)
    temperature = 3.0
    tckd, nckd = dkd_per_item(s, t, labels, temperature)
    p_s, p_t = (s / temperature).softmax(-1), (t / temperature).softmax(-1)
    kd = (p_t * (p_t.log() - p_s.log())).sum(-1) * temperature**2
    p_target = p_t.gather(-1, labels[:, None]).squeeze(-1)
    torch.testing.assert_close(kd, tckd + (1 - p_target) * nckd, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- known values
def test_identical_student_and_teacher_give_zero():
    s, _, labels = _random(seed=7)
    tckd, nckd = dkd_per_item(s, s.clone(), labels, 4.0)
    assert torch.equal(tckd, torch.zeros_like(tckd)) or tckd.abs().max() < 1e-14
    assert nckd.abs().max() < 1e-14
    # Shifting all logits of a row by a constant changes neither distribution.
    tckd, nckd = dkd_per_item(s, s + 5.0, labels, 4.0)
    assert tckd.abs().max() < 1e-12 and nckd.abs().max() < 1e-12


def test_a_hand_computed_case():
    # T = 2, target 0. Teacher logits / T = [0, ln 3, 0]: p^T = [1/5, 3/5, 1/5]; student uniform: p^S = 1/3 each.
    # b^T = [1/5, 4/5], b^S = [1/3, 2/3]; non-target p^^T = [3/4, 1/4], p^^S = [1/2, 1/2].
    s = torch.zeros(1, 3, dtype=torch.float64)
    t = torch.tensor([[0.0, 2 * math.log(3.0), 0.0]], dtype=torch.float64)
    tckd, nckd = dkd_per_item(s, t, torch.tensor([0]), 2.0)
    expected_tckd = 4 * (0.2 * math.log(0.2 * 3) + 0.8 * math.log(0.8 * 1.5))
    expected_nckd = 4 * (0.75 * math.log(0.75 * 2) + 0.25 * math.log(0.25 * 2))
    assert tckd.item() == pytest.approx(expected_tckd, rel=1e-12)
    assert nckd.item() == pytest.approx(expected_nckd, rel=1e-12)
    value = _term(alpha=2.0, beta=0.5, temperature=2.0)(*_sides(s, t, torch.tensor([0])))
    assert value.item() == pytest.approx(2.0 * expected_tckd + 0.5 * expected_nckd, rel=1e-12)


def test_each_part_sees_only_its_own_knowledge():
    # Same non-target logits, different target logit: NCKD is 0, TCKD is not.
    s = torch.tensor([[0.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    t = s.clone()
    t[0, 1] += 3.0
    tckd, nckd = dkd_per_item(s, t, torch.tensor([1]), 1.0)
    assert nckd.abs().item() < 1e-14 and tckd.item() > 0.1
    # Same target probability, other non-target distribution: TCKD is 0, NCKD is not.
    t = torch.tensor([[0.0, 1.0, math.log(math.exp(-1.0) + math.exp(2.0)), float("-1e9")]], dtype=torch.float64)
    tckd, nckd = dkd_per_item(s, t, torch.tensor([1]), 1.0)
    assert tckd.abs().item() < 1e-12 and nckd.item() > 0.1
    # Two classes: the non-target distribution has one class, NCKD is exactly 0.
    s2, t2, labels2 = _random(batch=4, classes=2, seed=9)
    tckd, nckd = dkd_per_item(s2, t2, labels2, 4.0)
    assert torch.equal(nckd, torch.zeros_like(nckd)) and (tckd > 0).all()


# -------------------------------------------------------------------------------------- masks, gradients, extremes
def test_examples_labelled_minus_100_count_nothing_and_get_no_gradient():
    s, t, labels = _random(batch=4, classes=5, seed=11)
    labels[1] = -100
    s.requires_grad_(True)
    value = _term()(*_sides(s, t, labels))
    kept = torch.tensor([0, 2, 3])
    alone = _term()(*_sides(s.detach()[kept], t[kept], labels[kept]))
    assert value.item() == pytest.approx(alone.item(), rel=1e-12)
    value.backward()
    assert torch.equal(s.grad[1], torch.zeros(5, dtype=s.dtype)) and s.grad[0].abs().sum() > 0


def test_per_item_parts_work_on_any_leading_shape():
    """`dkd_per_item` on [B, T, C] equals it row by row, with 0 at -100 (what a token-level unit would build on)."""
    s, t, labels = _random(batch=6, classes=5, seed=23)
    labels[4] = -100
    tckd, nckd = dkd_per_item(s.view(2, 3, 5), t.view(2, 3, 5), labels.view(2, 3), 2.0)
    ref_tckd, ref_nckd = _reference(s, t, labels, 2.0)
    np.testing.assert_allclose(tckd.flatten().numpy(), ref_tckd, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(nckd.flatten().numpy(), ref_nckd, rtol=1e-10, atol=1e-13)


def test_gradcheck_float64():
    s, t, labels = _random(batch=3, classes=5, seed=13)
    labels[2] = -100
    term = _term(alpha=1.3, beta=2.0, temperature=1.5)

    def f(student):
        return term(*_sides(student, t, labels))

    assert torch.autograd.gradcheck(f, (s.requires_grad_(True),))


def test_extreme_logits_stay_finite_in_float32():
    # Probabilities that round to 0 or 1 (even in float64, where the reference's log(1 - p_t) gives inf): the
    # log-sum-exp form keeps every log finite. Row 0: b^S_rest ~ e^-200 while b^T_rest ~ 1, so TCKD ~ 200; the
    # teacher's non-target mass sits on class 1, where the student's is ~ e^-200, so NCKD ~ 200 too. Row 1 likewise
    # with 1e4 -/+ log(1 + e^3).
    s = torch.tensor([[200.0, -200.0, 0.0, -50.0], [-1e4, 1e4, 0.0, 3.0]], requires_grad=True)
    t = torch.tensor([[-300.0, 300.0, 1.0, 0.0], [1e4, -1e4, 0.0, -3.0]])
    labels = torch.tensor([0, 1])
    tckd, nckd = dkd_per_item(s, t, labels, 1.0)
    offset = math.log1p(math.exp(3.0))
    torch.testing.assert_close(tckd, torch.tensor([200.0, 1e4 - offset]), rtol=1e-5, atol=0)
    torch.testing.assert_close(nckd, torch.tensor([200.0, 1e4 + offset]), rtol=1e-5, atol=0)
    value = _term(temperature=1.0)(*_sides(s, t, labels))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize(
    ("student", "teacher", "labels", "message"),
    [
        (torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]), "same shape"),
        (torch.randn(2, 1), torch.randn(2, 1), torch.tensor([0, 0]), "at least 2 classes"),
        (torch.randn(2, 3), torch.randn(2, 3), None, "needs the labels"),
        (torch.randn(2, 3), torch.randn(2, 3), torch.rand(2, 3), "one integer class id per example"),
        (torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 3]), r"class ids in \[0, 3\) or -100, got \[3\]"),
    ],
)
def test_setup_refuses_what_dkd_cannot_read(student, teacher, labels, message):
    with pytest.raises(ValueError, match=message):
        _term().setup(*_sides(student, teacher, labels))


# ---------------------------------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_is_finite_and_close_to_float32():
    s, t, labels = _random(batch=8, classes=10, seed=17, dtype=torch.float32)
    layer = torch.nn.Linear(10, 10)
    torch.nn.init.eye_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    term = _term()
    exact = term(*_sides(layer(s), t, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = layer(s)  # bf16 logits, as from a model under autocast
        value = term(*_sides(student, t.bfloat16(), labels))
    assert student.dtype == torch.bfloat16 and value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert value.item() == pytest.approx(exact.item(), rel=5e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 inputs are not cast down inside the term
        same = term(*_sides(s, t, labels))
    assert same.item() == pytest.approx(exact.item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------------- warm-up
def test_warmup_scales_training_forwards_linearly_and_not_evaluation():
    s, t, labels = _random(batch=3, classes=4, seed=19)
    full = _term()(*_sides(s, t, labels)).item()
    term = _term(warmup_steps=4)
    values = [term(*_sides(s, t, labels)).item() for _ in range(6)]
    assert values == pytest.approx([full * f for f in (0.25, 0.5, 0.75, 1.0, 1.0, 1.0)], rel=1e-12)
    assert term(*_sides(s, t, labels, training=False)).item() == pytest.approx(full, rel=1e-12)
    assert int(term.warmup_count) == 6 and "warmup_count" in term.state_dict()
    assert not list(_term().buffers())  # no state without warm-up


# ------------------------------------------------------------------------------------------------ in the trainer
def _trainer(tmp_path, terms, **overrides):
    values = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    args = DistillationConfig(output_dir=str(tmp_path / "out"), terms=terms, **{**COMMON, **values, **overrides})
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    teacher = bert(hidden=32, layers=2, heads=2, dropout=0.0, seed=0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())


def test_trainer_logs_the_term_and_adds_it_with_its_weight(tmp_path):
    trainer = _trainer(tmp_path, [{"name": "dkd", "weight": 2.0, "temperature": 2.0}])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        assert {"task", "distill/logit", "distill/dkd"} <= set(entry)
        assert entry["distill/dkd"] > 0
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 2.0 * entry["distill/dkd"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)


def test_trainer_warmup_scales_the_first_step(tmp_path):
    plain = _trainer(tmp_path / "a", [{"name": "dkd"}], max_steps=1, task_weight=1.0, logit_weight=0.0)
    plain.train()
    warm = _trainer(tmp_path / "b", [{"name": "dkd", "warmup_steps": 4}], max_steps=1, task_weight=1.0, logit_weight=0)
    warm.train()
    first = [e for e in plain.state.log_history if "loss" in e][0]["distill/dkd"]
    warmed = [e for e in warm.state.log_history if "loss" in e][0]["distill/dkd"]
    assert warmed == pytest.approx(first / 4, rel=1e-5)
    assert int(warm.term_set.terms["dkd"].warmup_count) == 1


@pytest.mark.parametrize("family", ["token", "causal"])
def test_token_level_dkd_is_the_mean_over_labelled_positions(tmp_path, family):
    """Token classification and causal LMs: the reference per labelled position (shifted for the causal LM),
    divided by their count, as the logit term is; padding and -100 never count."""
    if family == "token":
        student, teacher, data = tiny_bert("token", 16, 2, seed=1), tiny_bert("token", 32, 2, seed=0), None
        data = text_dataset("token")
    else:
        student, teacher, data = llama(seed=1), llama(layers=3), lm_data()
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        terms=[{"name": "dkd", "temperature": 2.0, "beta": 8.0}],  # the paper's CIFAR-100 beta
        task_weight=1.0,
        logit_weight=0.0,
        per_device_eval_batch_size=len(data),
        **COMMON,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, eval_dataset=data)
    rows = [data[i] for i in range(len(data))]
    batch = {k: torch.tensor([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student.eval()(**inputs).logits.double(), teacher.eval()(**inputs).logits.double()
    labels = batch["labels"]
    if family == "causal":
        s, t, labels = s[:, :-1], t[:, :-1], labels[:, 1:]
    keep = labels.flatten() != -100
    tckd, nckd = _reference(
        s.flatten(0, 1)[keep].numpy(), t.flatten(0, 1)[keep].numpy(), labels.flatten()[keep].numpy(), 2.0
    )
    expected = (1.0 * tckd + 8.0 * nckd).sum() / int(keep.sum())
    assert 0 < int(keep.sum()) < labels.numel()  # some positions do not count
    assert trainer.evaluate()["eval_distill/dkd"] == pytest.approx(expected, rel=1e-4)  # float32 KL sums


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"alpha": -1.0}, "alpha must be a finite number >= 0"),
        ({"beta": float("nan")}, "beta must be a finite number >= 0"),
        ({"beta": "paper"}, r"beta='paper' is not known: give a number >= 0 \(the paper: 8.0 on CIFAR-100"),
        ({"alpha": 0.0, "beta": 0}, "alpha and beta are both 0"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"temperature": True}, "temperature must be a finite number > 0"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        ({"warmup_steps": 2.5}, "warmup_steps must be an integer >= 0"),
    ],
)
def test_bad_options_fail_at_config_time_naming_the_option(options, message):
    with pytest.raises(ValueError, match=rf"term 'dkd': {message}"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "dkd", **options}])
