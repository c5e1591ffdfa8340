"""The `adversarial` term (Xu et al. 2018; Wang et al. AAAI 2018): the discriminator's loss against a float64 reference
written here from the GAN objective (a hand-computed case, then random ones); the one-backward min-max (D's gradient
is that of its own loss, the student's is the reversed or non-saturating generator gradient, each against
torch.autograd.grad of the reference); masks of token-level heads; trainer runs (D trains, is checkpointed, resumes
exactly, never reaches the exported student; accumulation and two DDP processes equal one big batch); the teacher
cache; bad input refused before anything is written."""

import copy
import math
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from launches import run_gloo_workers
from safetensors.torch import load_file
from tiny_models import COMMON, PlainCNN, bert, classification_data, parameters_of, vit_with

from hfkd import DistillationConfig, DistillationTrainer, build_teacher_cache
from hfkd.cache import TeacherCacheError
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.runner import TERMS_FILE, TermSet

EXAMPLES = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)
CAUSAL = ModelKind(shifts_labels=True, encoder_decoder=False, token_level=True)


def _term(**options):
    cls = TERMS["adversarial"]
    return cls(cls.Options(**options))


def _logits(values, kind=EXAMPLES):
    return Features(SimpleNamespace(logits=values), {}, kind)


def _hidden(values):
    return Features(SimpleNamespace(hidden_states=(values,), logits=None), {}, EXAMPLES)


def _batch(n, labels=None, logit_mask=None, training=True):
    return TermBatch(labels=labels, mask=None, num_examples=n, logit_mask=logit_mask, training=training)


def _random(shape, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _built(s, t, batch, **options):
    """A set-up float64 term whose discriminator weights are drawn from a fixed seed."""
    term = _term(**options)
    term.setup(s, t, batch)
    term.double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in term.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    return term


def _weights(term):
    """D's (weight, bias) pairs as plain float64 tensors (the reference takes them by value)."""
    return [(m.weight.detach().clone(), m.bias.detach().clone()) for m in term.discriminator if hasattr(m, "weight")]


# ---------------------------------------------------------------------------------------------------- reference
def _ref_d(x, layers, slope=0.2):
    """D(x): linear layers with leaky ReLUs between them, written out with matmuls (float64)."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i < len(layers) - 1:
            x = torch.where(x > 0, x, slope * x)
    return x[..., 0]


def _log_sigmoid(a):
    return -torch.log1p(torch.exp(-a))  # log(1 / (1 + e^-a)); the test values stay far from overflow


def _ref_loss_per_unit(s, t, layers, real_label=1.0, condition=None, slope=0.2):
    """The GAN discriminator loss per unit: -[r log D(t) + (1 - r) log(1 - D(t))] - log(1 - D(s))."""
    if condition is not None:
        s, t = torch.cat((s, condition), -1), torch.cat((t, condition), -1)
    a_t, a_s = _ref_d(t, layers, slope), _ref_d(s, layers, slope)
    real = -(real_label * _log_sigmoid(a_t) + (1 - real_label) * _log_sigmoid(-a_t))
    return real - _log_sigmoid(-a_s)


def test_a_hand_computed_case():
    # D(v) = v_0 - v_1 (one linear layer); teacher logits (2, 0) -> a = 2, student (0, 1) -> a = -1:
    # L = -log sigma(2) - log(1 - sigma(-1)) = log(1 + e^-2) + log(1 + e^-1) = 0.126928 + 0.313262.
    s, t = torch.tensor([[0.0, 1.0]], dtype=torch.float64), torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    term = _built(_logits(s), _logits(t), _batch(1), num_layers=1)
    with torch.no_grad():
        term.discriminator[0].weight.copy_(torch.tensor([[1.0, -1.0]]))
        term.discriminator[0].bias.zero_()
    value = term(_logits(s), _logits(t), _batch(1))
    assert value.item() == pytest.approx(0.126928011 + 0.313261688, abs=1e-8)
    # The same pair with one-sided label smoothing r = 0.9: the teacher part becomes
    # 0.9 log(1 + e^-2) + 0.1 log(1 + e^2) = 0.114235 + 0.212693.
    term.options.real_label = 0.9
    value = term(_logits(s), _logits(t), _batch(1))
    assert value.item() == pytest.approx(0.9 * 0.126928011 + 0.1 * 2.126928011 + 0.313261688, abs=1e-8)


def test_an_undecided_discriminator_gives_2_ln_2_per_unit():
    s, t = _random((5, 4), 0), _random((5, 4), 1)
    term = _built(_logits(s), _logits(t), _batch(5))
    with torch.no_grad():
        term.discriminator[-1].weight.zero_()
        term.discriminator[-1].bias.zero_()
    assert term(_logits(s), _logits(t), _batch(5)).item() == pytest.approx(5 * 2 * math.log(2), rel=1e-12)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"reads": "probabilities", "temperature": 2.0, "hidden_size": 7},
        {"condition_on_labels": True, "real_label": 0.9, "num_layers": 2, "negative_slope": 0.1},
        {"generator_loss": "non_saturating", "generator_scale": 0.3},
    ],
)
def test_value_equals_an_independent_float64_reference(options):
    s, t = _random((6, 5), 0), _random((6, 5), 1)
    labels = torch.tensor([0, 4, -100, 2, 2, 1])
    batch = _batch(6, labels=labels)
    term = _built(_logits(s), _logits(t), batch, **{"hidden_size": 9, **options})
    value = term(_logits(s), _logits(t), batch)
    opts = term.options
    s_in, t_in = s, t
    if opts.reads == "probabilities":
        s_in, t_in = (np.exp(x / 2.0) / np.exp(x / 2.0).sum(-1, keepdims=True) for x in (s.numpy(), t.numpy()))
        s_in, t_in = torch.from_numpy(s_in), torch.from_numpy(t_in)
    condition = None
    if opts.condition_on_labels:
        condition = torch.zeros(6, 5, dtype=torch.float64)
        for i, y in enumerate(labels.tolist()):
            if y != -100:
                condition[i, y] = 1.0  # rows without a label: no condition
    reference = _ref_loss_per_unit(s_in, t_in, _weights(term), opts.real_label, condition, opts.negative_slope)
    assert value.item() == pytest.approx(reference.sum().item(), rel=1e-12)


@pytest.mark.parametrize("generator_loss", ["minimax", "non_saturating"])
@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_one_backward_gives_d_its_loss_gradient_and_the_student_the_generator_gradient(generator_loss, scale):
    s, t = _random((6, 5), 2), _random((6, 5), 3)
    term = _built(_logits(s), _logits(t), _batch(6), generator_loss=generator_loss, generator_scale=scale)
    s_leaf = s.clone().requires_grad_(True)
    t_leaf = t.clone().requires_grad_(True)  # the teacher's side must get nothing
    value = term(_logits(s_leaf), _logits(t_leaf), _batch(6))
    value.backward()

    layers = [(w.requires_grad_(True), b.requires_grad_(True)) for w, b in _weights(term)]
    flat = [p for pair in layers for p in pair]
    s_ref = s.clone().requires_grad_(True)
    loss_d = _ref_loss_per_unit(s_ref, t, layers).sum()
    assert value.item() == pytest.approx(loss_d.item(), rel=1e-12)  # the logged value is D's loss in both forms
    d_grads = torch.autograd.grad(loss_d, flat, retain_graph=True)
    if generator_loss == "minimax":  # the student ascends D's loss: -lambda dL_D/ds
        (ds,) = torch.autograd.grad(loss_d, s_ref)
        expected_s = -scale * ds
    else:  # the student descends lambda (-log D(s)); D is untouched by it
        fixed = [(w.detach(), b.detach()) for w, b in layers]
        (ds,) = torch.autograd.grad(-_log_sigmoid(_ref_d(s_ref, fixed)).sum(), s_ref)
        expected_s = scale * ds
    got = [p.grad for m in term.discriminator if hasattr(m, "weight") for p in (m.weight, m.bias)]
    for mine, reference in zip(got, d_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_leaf.grad, expected_s, rtol=1e-10, atol=1e-12)
    assert t_leaf.grad is None


def test_a_saturated_discriminator_leaves_the_minimax_student_almost_nothing_and_the_non_saturating_one_a_push():
    s, t = _random((4, 3), 4), _random((4, 3), 5)
    grads = {}
    for form in ("minimax", "non_saturating"):
        term = _built(_logits(s), _logits(t), _batch(4), num_layers=1, generator_loss=form)
        with torch.no_grad():
            term.discriminator[0].weight.zero_()
            term.discriminator[0].bias.fill_(-12.0)  # D(v) = sigma(-12): "student" with certainty, for every input
            term.discriminator[0].weight[0, 0] = 1e-3  # a little slope so that the student has a direction
        leaf = s.clone().requires_grad_(True)
        term(_logits(leaf), _logits(t), _batch(4)).backward()
        grads[form] = leaf.grad.abs().max().item()
    # minimax: sigma(a) * 1e-3 ~ 6e-9; non-saturating: (1 - sigma(a)) * 1e-3 ~ 1e-3.
    assert grads["minimax"] < 1e-8 and grads["non_saturating"] == pytest.approx(1e-3, rel=1e-4)


def test_pooled_features_of_other_widths_go_through_a_projection_on_the_students_side():
    s, t = _random((5, 3), 6), _random((5, 7), 7)
    term = _built(_hidden(s), _hidden(t), _batch(5), reads="pooled", hidden_size=4)
    assert term.unit == "examples" and term.project.in_features == 3 and term.project.out_features == 7
    leaf = s.clone().requires_grad_(True)
    value = term(_hidden(leaf), _hidden(t), _batch(5))
    value.backward()
    p_w, p_b = term.project.weight.detach().clone(), term.project.bias.detach().clone()
    p_w.requires_grad_(True)
    loss = _ref_loss_per_unit(s @ p_w.T + p_b, t, _weights(term)).sum()
    assert value.item() == pytest.approx(loss.item(), rel=1e-12)
    (grad_w,) = torch.autograd.grad(loss, p_w)
    torch.testing.assert_close(term.project.weight.grad, -grad_w, rtol=1e-10, atol=1e-12)  # trained to fool D


def test_a_causal_lm_is_scored_at_the_counted_positions_shifted():
    s, t = _random((2, 4, 6), 8), _random((2, 4, 6), 9)
    mask = torch.tensor([[True, True, False], [True, False, False]])  # [batch, positions - 1]: labels != -100
    batch = _batch(2, logit_mask=mask)
    term = _built(_logits(s, CAUSAL), _logits(t, CAUSAL), batch)
    value = term(_logits(s, CAUSAL), _logits(t, CAUSAL), batch)
    per = _ref_loss_per_unit(s[:, :-1], t[:, :-1], _weights(term))
    assert value.item() == pytest.approx(per[mask].sum().item(), rel=1e-12)
    leaf = s.clone().requires_grad_(True)
    t_nan = t.clone()
    t_nan[1, 2] = float("nan")  # an uncounted position cannot leak in
    term(_logits(leaf, CAUSAL), _logits(t_nan, CAUSAL), batch).backward()
    assert torch.isfinite(leaf.grad).all() and leaf.grad[:, -1].abs().max() == 0 and leaf.grad[1, 1:].abs().max() == 0


def test_bf16_autocast_is_finite_and_close_to_float32():
    s, t = _random((6, 5), 10).float(), _random((6, 5), 11).float()
    term = _built(_logits(s.double()), _logits(t.double()), _batch(6)).float()
    reference = term(_logits(s), _logits(t), _batch(6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term(_logits(s), _logits(t), _batch(6))
        from_bf16 = term(_logits(s.bfloat16()), _logits(t.bfloat16()), _batch(6))
    assert value.dtype == torch.float32 and value.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.isfinite(from_bf16) and from_bf16.item() == pytest.approx(reference.item(), rel=5e-2)


def test_misuse_fails_with_the_reason():
    s, t = _random((3, 4), 0), _random((3, 5), 1)
    with pytest.raises(ValueError, match="same number of labels.*Set reads: pooled"):
        _term().setup(_logits(s), _logits(t), _batch(3))
    with pytest.raises(ValueError, match="the teacher returned none; set reads: pooled"):
        _term().setup(_logits(s), _logits(None), _batch(3))
    with pytest.raises(ValueError, match="condition_on_labels: the adversarial term needs one label per unit"):
        _term(condition_on_labels=True).setup(_logits(s), _logits(s), _batch(3))
    with pytest.raises(ValueError, match=r"class ids in \[0, 4\) or -100, got \[7\]"):
        _term(condition_on_labels=True).setup(_logits(s), _logits(s), _batch(3, labels=torch.tensor([0, 7, -100])))
    with pytest.raises(ValueError, match="give teacher_module"):
        _term(reads="pooled").setup(_hidden(s), Features(torch.zeros(3, 4), {}, EXAMPLES), _batch(3))
    with pytest.raises(ValueError, match="setup"):
        _term()(_logits(s), _logits(s), _batch(3))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reads": "features"}, "reads='features' is not known"),
        ({"generator_loss": "wasserstein"}, "generator_loss='wasserstein' is not known"),
        ({"generator_scale": -1.0}, "generator_scale must be a finite number >= 0"),
        ({"hidden_size": 0}, "hidden_size must be an integer >= 1"),
        ({"num_layers": 1.5}, "num_layers must be an integer >= 1"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"real_label": 0.4}, r"real_label must be a number in \(0.5, 1\]"),
        ({"reads": "pooled", "condition_on_labels": True}, "condition_on_labels needs the number of classes"),
        ({"teacher_module": "pooler"}, "set reads: pooled"),
        ({"pooling": "max"}, "pooling='max' is not known"),
        ({"lambda": 1.0}, "term 'adversarial' has no option 'lambda'"),
    ],
)
def test_bad_options_fail_at_config_time_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "adversarial", **options}])


# ---------------------------------------------------------------------------------------------------- trainer
TERM = {"name": "adversarial", "weight": 1.0, "hidden_size": 16}


def _config(out, terms=(TERM,), **overrides):
    values = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    return DistillationConfig(output_dir=str(out), terms=list(terms), **{**COMMON, **values, **overrides})


def _trainer(out, terms=(TERM,), teacher=True, data=None, **overrides):
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    return DistillationTrainer(
        model=student,
        teacher_model=bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0) if teacher else None,
        args=_config(out, terms, **overrides),
        train_dataset=data if data is not None else classification_data(n=16),
    )


def test_the_discriminator_trains_is_checkpointed_resumes_exactly_and_stays_out_of_the_student(tmp_path):
    whole = _trainer(tmp_path / "a", max_steps=4)
    term = whole.term_set.terms["adversarial"]
    in_optimizer = {id(p) for group in whole.create_optimizer().param_groups for p in group["params"]}
    assert {id(p) for p in term.parameters()} <= in_optimizer
    start = {k: v.clone() for k, v in term.state_dict().items()}
    whole.train()
    assert all(not torch.equal(v, start[k]) for k, v in term.state_dict().items())  # every D tensor moved
    logs = [e for e in whole.state.log_history if "loss" in e]
    for entry in logs:
        assert 0 < entry["distill/adversarial"] < 2.0
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 1.0 * entry["distill/adversarial"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)

    first = _trainer(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    saved = load_file(str(tmp_path / "b" / "checkpoint-2" / TERMS_FILE))
    assert {k for k in saved if "discriminator" in k} == {f"terms.adversarial.{k}" for k in term.state_dict()}
    resumed = _trainer(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for name, value in term.state_dict().items():
        torch.testing.assert_close(
            resumed.term_set.terms["adversarial"].state_dict()[name], value, rtol=1e-6, atol=1e-7, msg=name
        )
    for name, value in parameters_of(whole.model).items():
        torch.testing.assert_close(parameters_of(resumed.model)[name], value, rtol=1e-6, atol=1e-7, msg=name)

    resumed.save_model(str(tmp_path / "exported"))
    exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert exported and not [k for k in exported if "discriminator" in k or "adversarial" in k]
    assert set(exported) == set(load_file(str(tmp_path / "b" / "checkpoint-4" / "model.safetensors")))


def test_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 2 = 1 batch of 4: the same D, the same student, the same logged term (SGD)."""
    runs = {}
    for name, micro, steps in (("big", 4, 1), ("acc", 2, 2)):
        trainer = _trainer(
            tmp_path / name,
            max_steps=2,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=steps,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
        )
        trainer.train()
        runs[name] = trainer
    a, b = runs["big"], runs["acc"]
    for key, value in a.term_set.terms["adversarial"].state_dict().items():
        torch.testing.assert_close(b.term_set.terms["adversarial"].state_dict()[key], value, rtol=1e-5, atol=1e-6)
    for key, value in parameters_of(a.model).items():
        torch.testing.assert_close(parameters_of(b.model)[key], value, rtol=1e-5, atol=1e-6, msg=key)
    logged = [e["distill/adversarial"] for e in a.state.log_history if "loss" in e]
    assert [e["distill/adversarial"] for e in b.state.log_history if "loss" in e] == pytest.approx(logged, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        s, t, term_set = _ddp_inputs()
        part = slice(0, 2) if rank == 0 else slice(2, 5)
        wrapped = torch.nn.parallel.DistributedDataParallel(term_set)
        leaf = s[part].clone().requires_grad_(True)
        raw = wrapped(_logits(leaf), {"teacher": _logits(t[part])}, _batch(leaf.shape[0]))["adversarial"]
        (raw * (world / 5)).backward()  # WindowUnits: the window's count over all processes, times the world size
        grads = {n: p.grad for n, p in term_set.named_parameters()}
        torch.save({"d": grads, "s": leaf.grad}, f"{out_dir}/rank{rank}.pt")
        del wrapped  # its reducer goes before the process group it uses (destroyed after it, it can hang)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _ddp_inputs():
    s, t = _random((5, 3), 20), _random((5, 3), 21)
    from hfkd.terms import TermSpec

    term_set = TermSet([TermSpec(name="adversarial", weight=1.0, options={"hidden_size": 6})])
    torch.manual_seed(3)
    term_set.setup(_logits(s), {"teacher": _logits(t)}, _batch(5))
    return s, t, term_set.double()


def test_two_ddp_processes_give_the_gradients_of_one_batch(tmp_path):
    """Two gloo processes with DDP around the terms: D's averaged gradient and each student row's reversed gradient
    equal one process's over the whole batch (DDP averages the student's gradients too, hence the / world)."""
    run_gloo_workers(_ddp_worker, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    s, t, term_set = _ddp_inputs()
    leaf = s.clone().requires_grad_(True)
    (term_set(_logits(leaf), {"teacher": _logits(t)}, _batch(5))["adversarial"] / 5).backward()
    for name, p in term_set.named_parameters():
        for rank in range(2):
            torch.testing.assert_close(results[rank]["d"][name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
    joined = torch.cat([results[0]["s"], results[1]["s"]]) / 2
    torch.testing.assert_close(joined, leaf.grad, rtol=1e-10, atol=1e-12)
    assert (leaf.grad != 0).any()


# ---------------------------------------------------------------------------------------------------- cache
def test_a_logit_cache_serves_the_term_as_the_online_teacher_does(tmp_path):
    data = classification_data(n=16)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    config = _config(tmp_path / "build", logit_weight=0.0, task_weight=1.0)
    cache = build_teacher_cache(teacher, data, str(tmp_path / "cache"), args=config, student=student, progress=False)
    assert cache.logits["mode"] == "dense" and cache.meta.get("hidden") is None
    runs = {}
    for name, given, extra in (
        ("online", teacher, {}),
        ("cached", None, {"teacher_cache_dir": str(tmp_path / "cache")}),
    ):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=given,
            args=_config(tmp_path / name, logit_weight=0.0, task_weight=1.0, **extra),
            train_dataset=data,
        )
        trainer.train()
        runs[name] = trainer
    online, cached = (
        [e["distill/adversarial"] for e in runs[n].state.log_history if "loss" in e] for n in ("online", "cached")
    )
    assert cached == pytest.approx(online, rel=1e-5)
    d_online = runs["online"].term_set.terms["adversarial"].state_dict()
    for key, value in runs["cached"].term_set.terms["adversarial"].state_dict().items():
        torch.testing.assert_close(value, d_online[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------- refusals
def test_a_cache_without_logits_is_refused_before_anything_is_written(tmp_path):
    data = classification_data(n=8)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    hidden_only = _config(tmp_path / "build", terms=(), logit_weight=0.0, task_weight=1.0, hidden_weight=1.0)
    cache = build_teacher_cache(
        teacher, data, str(tmp_path / "cache"), args=hidden_only, student=student, progress=False
    )
    assert cache.logits is None
    out = tmp_path / "out"
    with pytest.raises(TeacherCacheError, match=r"reads the teacher's full logits \(reads: logits\).*holds no logits"):
        DistillationTrainer(
            model=student,
            args=_config(out, logit_weight=0.0, task_weight=1.0, teacher_cache_dir=str(tmp_path / "cache")),
            train_dataset=data,
        )
    assert not out.exists()


def test_pooled_features_of_a_teacher_that_gives_none_are_refused_before_anything_is_written(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {"pixel_values": torch.randn(8, 3, 16, 16, generator=g).tolist(), "labels": [0, 1, 2, 0, 1, 2, 0, 1]}
    ).with_format("torch")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="pools the teacher's hidden_states, but the teacher returned none; give"):
        DistillationTrainer(
            model=vit_with(),
            teacher_model=PlainCNN(),
            args=_config(out, terms=[{"name": "adversarial", "reads": "pooled"}]),
            train_dataset=data,
        )
    assert not out.exists()
    # Named, the module's output serves: a projection maps the student's 16 wide [CLS] to the pool's 8.
    terms = [{"name": "adversarial", "reads": "pooled", "teacher_module": "global_pool", "pooling": "cls"}]
    trainer = DistillationTrainer(
        model=vit_with(), teacher_model=PlainCNN(), args=_config(out, terms=terms, max_steps=1), train_dataset=data
    )
    trainer.train()
    assert trainer.term_set.terms["adversarial"].project.out_features == 8
    assert math.isfinite(trainer.state.log_history[0]["distill/adversarial"])
