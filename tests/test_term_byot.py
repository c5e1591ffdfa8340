"""The `byot` term (Zhang et al., ICCV 2019, "Be Your Own Teacher"): its value against a float64 reference written
from the paper's loss, hand-computed cases, units and padding, option and set-up refusals; training without a teacher
(a tiny BERT, ViT and ResNet: the heads train, are saved beside the student and not in it, resume exactly); early exit
(hfkd.early_exit): exit k's logits equal the head on `hidden_states[k]`, the layers above never run, a layer without a
head is refused."""

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from recipe_runs import _recipe
from safetensors.torch import load_file
from tiny_models import COMMON, bert_with, classification_data, image_dataset, parameters_of, tiny_resnet, vit_with

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.cli import main
from hfkd.early_exit import EXITS_FILE, HEADS_FILE, EarlyExitModel, measure_exits
from hfkd.sources import StudentOnly
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.byot import default_exits
from hfkd.terms.runner import TERMS_FILE, TermSet

KIND = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)


def _term(**options):
    cls = TERMS["byot"]
    return cls(cls.Options(**options))


def _student(states, logits):
    return Features(SimpleNamespace(hidden_states=tuple(states), logits=logits), {}, KIND)


def _inputs(batch=4, tokens=5, width=6, layers=4, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(batch, tokens, width, generator=g, dtype=dtype) for _ in range(layers + 1)]
    logits = torch.randn(batch, classes, generator=g, dtype=dtype) * 2
    return states, logits


def _value(term, states, logits, batch) -> float:
    with torch.no_grad():
        return float(term(_student(states, logits), None, batch))


def _batch(labels=None, mask=None, num_examples=4):
    counts = {"examples": torch.tensor(float(num_examples))}
    if labels is not None:
        counts["labelled"] = labels.ne(-100).sum().float().clamp_min(1)
    return TermBatch(labels=labels, mask=mask, num_examples=num_examples, counts=counts)


def _built(states, logits, batch, seed=3, **options):
    term = _term(**options)
    term.setup(_student(states, logits), None, batch)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # heads away from their initial values, so that every weight matters
        for param in term.parameters():
            param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype))
    return term


# ---------------------------------------------------------------------------------------------------- reference
def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _pooled(x, mask, pooling):
    if pooling == "cls":
        return x[:, 0]
    keep = np.ones(x.shape[:2]) if mask is None else mask.astype(float)
    return (x * keep[..., None]).sum(1) / keep.sum(1)[:, None]


def _reference(term, states, logits, labels, mask, pooling="cls", alpha=0.3, t=3.0, lam=0.03):
    """The paper's sum over shallow exits of (1-a) CE + a KL(p_C^T || p_i^T) + lambda mean((F_i - F_C)^2), from the
    definitions (LayerNorm, linear maps, softmax by hand), summed per unit and divided by the unit counts."""
    states = [s.detach().numpy().astype(np.float64) for s in states]
    z_deep = logits.detach().numpy().astype(np.float64)
    mask = None if mask is None else mask.numpy()
    f_deep = _pooled(states[-1], mask, pooling)
    n = z_deep.shape[0]
    kl = hint = ce = 0.0
    for layer, head in term.heads.items():
        w = {k: v.detach().numpy().astype(np.float64) for k, v in head.state_dict().items()}
        x = _pooled(states[int(layer)], mask, pooling)
        for row in range(n):
            v = x[row]
            normed = (v - v.mean()) / math.sqrt(((v - v.mean()) ** 2).mean() + head.norm.eps)
            normed = normed * w["norm.weight"] + w["norm.bias"]
            f = w["bottleneck.weight"] @ normed + w["bottleneck.bias"]
            q = w["classifier.weight"] @ f + w["classifier.bias"]
            p_deep, p_i = _softmax(z_deep[row] / t), _softmax(q / t)
            kl += float((p_deep * (np.log(p_deep) - np.log(p_i))).sum())
            hint += float(((f - f_deep[row]) ** 2).mean())
            if labels is not None and int(labels[row]) != -100:
                ce += -math.log(_softmax(q)[int(labels[row])])
    value = (alpha * kl + lam * hint) / n
    if labels is not None:
        value += (1 - alpha) * ce / max(int((labels != -100).sum()), 1)
    return value


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_value_equals_an_independent_float64_reference(pooling, with_labels):
    states, logits = _inputs()
    labels = torch.tensor([0, 2, -100, 1]) if with_labels else None
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    batch = _batch(labels, mask)
    term = _built(states, logits, batch, pooling=pooling)
    assert term.exits == [1, 2, 3]
    value = term(_student(states, logits), None, batch).detach()
    assert value.dtype == torch.float64 and value.dim() == 0
    assert float(value) == pytest.approx(_reference(term, states, logits, labels, mask.bool(), pooling), rel=1e-10)
    other = _built(states, logits, batch, pooling=pooling, alpha=0.7, temperature=1.5, hint_weight=0.5, layers=[2])
    expected = _reference(other, states, logits, labels, mask.bool(), pooling, alpha=0.7, t=1.5, lam=0.5)
    assert _value(other, states, logits, batch) == pytest.approx(expected, rel=1e-10)


def _uniform_heads(term, feature=None):
    """Classifiers that answer uniformly (weights and biases 0), and bottlenecks that output `feature` (or 0)."""
    with torch.no_grad():
        for head in term.heads.values():
            head.classifier.weight.zero_()
            head.classifier.bias.zero_()
            head.bottleneck.weight.zero_()
            head.bottleneck.bias.copy_(feature if feature is not None else torch.zeros_like(head.bottleneck.bias))


def test_a_hand_computed_case():
    # One example, three classes, two exits that answer uniformly, deepest logits (0, ln 2, ln 5) at T = 1: p_C =
    # (1, 2, 5) / 8. Per exit: CE = ln 3, KL(p_C || uniform) = ln 3 - H(p_C), hint = mean of F_C^2 (F = 0).
    states, _ = _inputs(batch=1, layers=3, classes=3)
    logits = torch.tensor([[0.0, math.log(2), math.log(5)]], dtype=torch.float64)
    batch = _batch(torch.tensor([2]), num_examples=1)
    term = _built(states, logits, batch, temperature=1.0, alpha=0.25, hint_weight=0.5)
    assert term.exits == [1, 2]
    _uniform_heads(term)
    p = np.array([1, 2, 5]) / 8
    entropy = -(p * np.log(p)).sum()
    f_deep = states[-1][0, 0].numpy()
    per_exit = 0.75 * math.log(3) + 0.25 * (math.log(3) - entropy) + 0.5 * (f_deep**2).mean()
    assert _value(term, states, logits, batch) == pytest.approx(2 * per_exit, rel=1e-12)


def test_an_exit_that_matches_the_deepest_classifier_costs_only_its_cross_entropy():
    states, _ = _inputs(batch=1, layers=2, classes=3)
    logits = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    batch = _batch(torch.tensor([1]), num_examples=1)
    term = _built(states, logits, batch)
    f_deep = states[-1][0, 0]
    _uniform_heads(term, feature=f_deep)  # F_i = F_C: no hint
    with torch.no_grad():
        term.heads["1"].classifier.bias.copy_(logits[0])  # q_i = q_C: no KL
    value = _value(term, states, logits, batch)
    assert value == pytest.approx(0.7 * -math.log(torch.softmax(logits[0], 0)[1].item()), rel=1e-12)
    term.options.alpha = 1.0  # the KL alone, which is 0 here
    assert _value(term, states, logits, batch) == pytest.approx(0.0, abs=1e-15)


def test_padding_never_counts_and_unlabelled_rows_learn_from_the_deepest_classifier_alone():
    states, logits = _inputs(batch=2, tokens=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    labels = torch.tensor([1, -100])
    batch = _batch(labels, mask, num_examples=2)
    term = _built(states, logits, batch, pooling="mean")
    value = _value(term, states, logits, batch)
    changed = [s.clone() for s in states]
    for s in changed:
        s[0, 2:] = 1e6  # padding of row 0
    assert _value(term, changed, logits, batch) == pytest.approx(value, rel=1e-12)
    # the unlabelled row has no cross-entropy: giving it a label changes the value, and the reference agrees
    assert _value(term, states, logits, _batch(torch.tensor([1, 0]), mask, num_examples=2)) != pytest.approx(value)
    assert value == pytest.approx(_reference(term, states, logits, labels, mask, "mean"), rel=1e-10)


def test_gradients_reach_the_heads_and_the_layers_below_but_not_the_deepest_classifier():
    states, logits = _inputs(batch=3, layers=2)
    states = [s.requires_grad_() for s in states]
    logits.requires_grad_()
    batch = _batch(torch.tensor([0, 1, 2]), num_examples=3)
    term = _built(states, logits, batch)
    term(_student(states, logits), None, batch).backward()
    assert states[1].grad.abs().sum() > 0 and all(p.grad is not None for p in term.parameters())
    assert logits.grad is None and states[2].grad is None  # the deepest classifier and feature are the teacher


@pytest.mark.parametrize(
    ("layers", "expected"), [(1, []), (2, [1]), (3, [1, 2]), (4, [1, 2, 3]), (6, [2, 3, 5]), (12, [3, 6, 9])]
)
def test_default_exits_end_the_first_three_of_four_sections(layers, expected):
    assert default_exits(layers) == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layers": [0]}, "layers must be a non-empty list of hidden_states indices >= 1"),
        ({"layers": []}, "layers must be a non-empty list"),
        ({"layers": [1, 1]}, "lists a layer twice"),
        ({"pooling": "max"}, "pooling='max' is not known"),
        ({"temperature": 0}, "temperature must be a finite number > 0"),
        ({"alpha": 1.5}, r"alpha must be a number in \[0, 1\]"),
        ({"hint_weight": -1}, "hint_weight must be a finite number >= 0"),
        ({"beta": 1}, "term 'byot' has no option 'beta'"),
    ],
)
def test_bad_options_fail_at_config_time_naming_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="x", report_to=[], logit_weight=0, terms=[{"name": "byot", **options}])


def test_setup_refuses_what_it_cannot_serve():
    states, logits = _inputs(layers=4)
    with pytest.raises(ValueError, match=r"byot: layers=\[4\] gives exits \[4\].*after layers 1\.\.3"):
        _term(layers=[4]).setup(_student(states, logits), None, _batch())
    with pytest.raises(ValueError, match=r"logits \[batch, classes\]"):
        _term().setup(_student(states, torch.randn(4, 5, 3)), None, _batch())
    with pytest.raises(ValueError, match="returned none"):
        _term().setup(Features(SimpleNamespace(logits=logits), {}, KIND), None, _batch())
    with pytest.raises(ValueError, match="single-label classification"):
        _term().setup(_student(states, logits), None, _batch(torch.zeros(4, 3)))
    with pytest.raises(ValueError, match="no shallow exit"):
        _term().setup(_student(states[:2], logits), None, _batch())
    with pytest.raises(ValueError, match="read the student alone, but there are 2 teachers"):
        TermSet(DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "byot"}]).term_specs, ("a", "b"))


# ---------------------------------------------------------------------------------------------------- trainer
def _students():
    return {
        "bert": (lambda: bert_with(layers=4), lambda: classification_data(n=16)),
        "vit": (lambda: vit_with(layers=4), lambda: image_dataset(16)),
        "resnet": (lambda: tiny_resnet((8, 16, 32, 64), seed=1), lambda: image_dataset(16, 32)),
    }


def _trainer(tmp_path, family="bert", terms=None, **overrides):
    make, data = _students()[family]
    values = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        logit_weight=0.0,
        task_weight=1.0,
        terms=terms if terms is not None else [{"name": "byot"}],
        **{**COMMON, **values, **overrides},
    )
    return DistillationTrainer(model=make(), args=args, train_dataset=data())


@pytest.mark.parametrize("family", ["bert", "vit", "resnet"])
def test_training_without_a_teacher_trains_the_heads_and_saves_them_beside_the_student(tmp_path, family):
    trainer = _trainer(tmp_path, family)
    assert isinstance(trainer.source, StudentOnly) and trainer.teacher_model is None
    term = trainer.term_set.terms["byot"]
    assert term.exits == [1, 2, 3] and term.num_layers == 4
    in_optimizer = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert {id(p) for p in term.parameters()} <= in_optimizer
    heads, student = parameters_of(term), parameters_of(trainer.model)
    trainer.train()
    assert all(not torch.equal(value, parameters_of(term)[name]) for name, value in heads.items()), "heads train"
    assert not torch.equal(student[next(iter(student))], parameters_of(trainer.model)[next(iter(student))])
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss"] == pytest.approx(entry["task"] + entry["distill/byot"], rel=1e-4)

    out = tmp_path / "final"
    trainer.save_model(str(out))
    saved = load_file(str(out / "model.safetensors"))
    assert not any("bottleneck" in key or "heads" in key for key in saved)
    assert sum(v.numel() for v in saved.values()) == sum(v.numel() for v in trainer.model.state_dict().values())
    record = json.loads((out / EXITS_FILE).read_text())
    assert record["layers"] == [1, 2, 3] and record["num_layers"] == 4
    assert {k.split(".", 1)[0] for k in load_file(str(out / HEADS_FILE))} == {"1", "2", "3"}

    model = EarlyExitModel.from_pretrained(str(out))
    assert model.exits == (1, 2, 3, 4)
    model.eval()
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        reference = trainer.model(**inputs, output_hidden_states=True)
        mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        ran = []
        hooks = [layer.register_forward_hook(lambda *_, i=i: ran.append(i)) for i, layer in enumerate(model.layers)]
        try:
            for k in (1, 2, 3):
                ran.clear()
                manual = term.heads[str(k)](reference.hidden_states[k], mask)[1]
                torch.testing.assert_close(model(**inputs, exit_layer=k), manual, rtol=1e-5, atol=1e-6)
                assert ran == list(range(k)), "the layers above the exit never run"
            torch.testing.assert_close(model(**inputs, exit_layer=4), reference.logits, rtol=1e-5, atol=1e-6)
            every = model.all_exits(**inputs)
            for k in model.exits:
                torch.testing.assert_close(every[k], model(**inputs, exit_layer=k), rtol=1e-5, atol=1e-6)
        finally:
            for hook in hooks:
                hook.remove()
    with pytest.raises(ValueError, match=r"exit_layer=5 has no exit head: this student's exits are \[1, 2, 3, 4\]"):
        model(**inputs, exit_layer=5)
    with pytest.raises(ValueError, match=r"exit_layer=0 has no exit head"):
        model(**inputs, exit_layer=0)
    measured = measure_exits(
        model, trainer.train_dataset, trainer.data_collator, batch_size=8, latency_rows=4, repeats=2
    )
    assert [m["layer"] for m in measured] == [1, 2, 3, 4]
    assert all(0.0 <= m["accuracy"] <= 1.0 and m["latency_ms"] > 0 for m in measured)


def test_early_exit_without_heads_is_refused(tmp_path):
    bert_with().save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="holds no exit heads.*byot"):
        EarlyExitModel.from_pretrained(str(tmp_path))


def test_resume_restores_the_heads_exactly(tmp_path):
    whole = _trainer(tmp_path / "a", max_steps=4)
    whole.train()
    _trainer(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert any(key.startswith("terms.byot.heads.") for key in load_file(str(checkpoint / TERMS_FILE)))
    assert (checkpoint / HEADS_FILE).is_file()  # a checkpoint is an early-exit folder too
    resumed = _trainer(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = whole.term_set.terms["byot"], resumed.term_set.terms["byot"]
    for name, value in a.state_dict().items():
        torch.testing.assert_close(value, b.state_dict()[name], rtol=1e-6, atol=1e-7, msg=name)
    for name, value in parameters_of(whole.model).items():
        torch.testing.assert_close(value, parameters_of(resumed.model)[name], rtol=1e-6, atol=1e-7)


def test_a_teacher_reading_term_without_a_teacher_is_refused_before_anything_is_written(tmp_path):
    args = DistillationConfig(output_dir=str(tmp_path / "out"), terms=[{"name": "byot"}], **COMMON)  # logit 0.5
    with pytest.raises(
        ValueError, match=r"The terms \['byot'\] read the student alone, but \['logit'\] read a teacher"
    ):
        DistillationTrainer(model=bert_with(layers=4), args=args, train_dataset=classification_data(n=8))
    assert not os.path.exists(tmp_path / "out")


def test_with_a_teacher_too_it_adds_to_kd(tmp_path):
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        terms=[{"name": "byot", "weight": 0.5}],
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        **COMMON,
    )
    teacher = bert_with(layers=2, hidden=32, labels=3, seed=0)
    trainer = DistillationTrainer(
        model=bert_with(layers=4), teacher_model=teacher, args=args, train_dataset=classification_data(n=8)
    )
    trainer.train()
    for entry in (e for e in trainer.state.log_history if "loss" in e):
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 0.5 * entry["distill/byot"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)


# ---------------------------------------------------------------------------------------------------- recipe
def test_a_recipe_trains_without_the_teacher_and_reports_each_exit(tmp_path, tiny_text, capsys):
    path = _recipe(
        tmp_path,
        *tiny_text,
        finetune_teacher=False,
        student_num_layers=3,
        logit_weight=0.0,
        hidden_weight=0.0,
        task_weight=1.0,
    )
    assert main(["distill", "--config", str(path), "--terms", '[{"name": "byot", "layers": [1, 2]}]']) == 0
    assert "self-distillation (every term reads the student alone)" in capsys.readouterr().err
    out = tmp_path / "run"
    assert (out / HEADS_FILE).is_file() and json.loads((out / EXITS_FILE).read_text())["layers"] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["taught"] is False
    exits = metrics["early_exit"]
    assert [e["layer"] for e in exits] == [1, 2, 3]
    assert all(0.0 <= e["accuracy"] <= 1.0 and e["latency_ms"] > 0 for e in exits)
    # the deepest exit is the student itself: the same accuracy as the recipe's own evaluation
    assert exits[-1]["accuracy"] == pytest.approx(metrics["student"]["metric"])
    card = (out / "README.md").read_text()
    assert "### Early exit" in card and "| 1 |" in card and "| 3 (its own classifier) |" in card
    assert "no teacher taught it" in card
    model = EarlyExitModel.from_pretrained(str(out))
    assert model.exits == (1, 2, 3)
