"""Several teachers (hfkd.mixing): each term per teacher, response terms against the weighted mixture of the
teachers' distributions, CA-MKD confidence weights, a teacher per row; float64 references written from the
definitions, and the bad inputs refused before anything is written."""

import pytest
import torch
from tiny_models import COMMON, bert, classification_data

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.mixing import confidence_weights, mixed_logits

T = 2.0


def _config(out, **overrides):
    values = dict(
        max_steps=1,
        per_device_train_batch_size=16,
        optim="sgd",
        learning_rate=0.0,  # the first step's logs are the terms of the initial student
        lr_scheduler_type="constant",
        logging_steps=1,
        task_weight=0.5,
        logit_weight=0.5,
        temperature=T,
        **COMMON,
    )
    values.update(overrides)
    return DistillationConfig(output_dir=str(out), **values)


def _first_log(trainer) -> dict:
    trainer.train()
    return next(e for e in trainer.state.log_history if "loss" in e)


def _logits(model, data) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(data["input_ids"]), attention_mask=torch.tensor(data["attention_mask"])
        ).logits.double()


def _kl(p: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per example T^2 KL(p || softmax(z_s / T)), float64."""
    log_q = torch.log_softmax(student_logits / T, -1)
    return T * T * (p * (p.log() - log_q)).sum(-1)


def _teachers():
    """Two teachers with confident, different heads (untrained BERTs are near-uniform: a KL of 1e-4 would test
    float32 rounding rather than the combination)."""
    teachers = bert(dropout=0.0, seed=0), bert(dropout=0.0, seed=2)
    with torch.no_grad():
        for teacher in teachers:
            teacher.classifier.weight.mul_(30.0)
    return teachers


# ---------------------------------------------------------------------------------------------------- the maths
def test_mixed_logits_are_the_weighted_mixture_of_distributions():
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(4, 5, 7, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    w = torch.softmax(torch.randn(4, 3, generator=g, dtype=torch.float64), -1)
    mixed = mixed_logits(z, w, T, "kl")
    expected = sum(w[:, k, None, None] * torch.softmax(z[k] / T, -1) for k in range(3))
    torch.testing.assert_close(torch.softmax(mixed.double() / T, -1), expected, rtol=1e-6, atol=1e-7)
    # One-hot weights (a teacher per row) give that teacher's distribution; MSE mixes the logits themselves.
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 2]), 3).double()
    routed = torch.softmax(mixed_logits(z, one_hot, T, "kl").double() / T, -1)
    for b, k in enumerate([2, 0, 1, 2]):
        torch.testing.assert_close(routed[b], torch.softmax(z[k][b] / T, -1), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        mixed_logits(z, w, T, "mse").double(), sum(w[:, k, None, None] * z[k] for k in range(3)), rtol=1e-6, atol=1e-6
    )


def test_kl_to_the_mixture_has_the_gradient_of_the_weighted_per_teacher_kls():
    """The reason response terms read the mixture: d/dz_s KL(sum_k w_k p_k || q) = d/dz_s sum_k w_k KL(p_k || q)."""
    g = torch.Generator().manual_seed(1)
    z = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    w = torch.softmax(torch.randn(6, 2, generator=g, dtype=torch.float64), -1)
    student = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    p_mix = sum(w[:, k, None] * torch.softmax(z[k] / T, -1) for k in range(2))
    (grad_mix,) = torch.autograd.grad(_kl(p_mix, student).sum(), student)
    per_teacher = sum(w[:, k] * _kl(torch.softmax(z[k] / T, -1), student) for k in range(2))
    (grad_sum,) = torch.autograd.grad(per_teacher.sum(), student)
    torch.testing.assert_close(grad_mix, grad_sum, rtol=1e-6, atol=1e-9)


def test_confidence_weights_are_ca_mkds():
    """w_k = (1 - softmax_k(L)_k) / (K - 1) with L_k the teacher's cross-entropy on the label (per example; for
    token-level heads its mean over labelled positions), written out in float64."""
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(5, 4, generator=g, dtype=torch.float64) * 2 for _ in range(3)]
    labels = torch.tensor([0, 3, 1, 1, 2])
    w = confidence_weights(z, labels, shifts_labels=False).double()
    for b in range(5):
        losses = torch.tensor([-torch.log_softmax(z[k][b], -1)[labels[b]] for k in range(3)], dtype=torch.float64)
        expected = (1 - torch.exp(losses) / torch.exp(losses).sum()) / 2
        torch.testing.assert_close(w[b], expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(w.sum(1), torch.ones(5, dtype=torch.float64))
    # The teacher that is more confidently right weighs more.
    right = [torch.tensor([[9.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    assert confidence_weights(right, torch.tensor([0]), False)[0, 0] > 0.5
    # Token level, causal shift: position t predicts label t + 1; -100 does not count.
    zt = [torch.randn(2, 4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    yt = torch.tensor([[5, 1, 2, -100], [0, 3, -100, -100]])
    wt = confidence_weights(zt, yt, shifts_labels=True).double()
    for b in range(2):
        losses = []
        for k in range(2):
            terms = [-torch.log_softmax(zt[k][b, t], -1)[yt[b, t + 1]] for t in range(3) if yt[b, t + 1] != -100]
            losses.append(sum(terms) / len(terms))
        losses = torch.stack(losses)
        torch.testing.assert_close(wt[b], 1 - torch.softmax(losses, 0), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- the trainer
def test_two_teachers_with_fixed_weights(tmp_path):
    """The logit term is KL to the 3:1 mixture (float64 reference); each teacher's value is logged and equals the
    value a one-teacher run gives; a feature term is the weighted sum of its per-teacher values."""
    data = classification_data(n=16)
    student = bert(layers=2, dropout=0.0, seed=1)
    t0, t1 = _teachers()
    trainer = DistillationTrainer(
        model=student,
        teacher_model={"a": t0, "b": t1},
        args=_config(tmp_path / "two", teacher_weights=[3, 1], hidden_weight=1.0),
        train_dataset=data,
    )
    z0, z1, zs = _logits(t0, data), _logits(t1, data), _logits(student, data)
    log = _first_log(trainer)
    p_mix = 0.75 * torch.softmax(z0 / T, -1) + 0.25 * torch.softmax(z1 / T, -1)
    assert log["distill/logit"] == pytest.approx(_kl(p_mix, zs).mean().item(), rel=1e-4)
    assert log["distill/logit/a"] == pytest.approx(_kl(torch.softmax(z0 / T, -1), zs).mean().item(), rel=1e-4)
    assert log["distill/logit/b"] == pytest.approx(_kl(torch.softmax(z1 / T, -1), zs).mean().item(), rel=1e-4)
    assert log["distill/hidden"] == pytest.approx(0.75 * log["distill/hidden/a"] + 0.25 * log["distill/hidden/b"])
    assert log["loss"] == pytest.approx(
        0.5 * log["task"] + 0.5 * log["distill/logit"] + log["distill/hidden"], rel=1e-5
    )
    # One teacher alone gives the same per-teacher value (same student, same batch).
    alone = DistillationTrainer(
        model=bert(layers=2, dropout=0.0, seed=1),
        teacher_model=_teachers()[1],
        args=_config(tmp_path / "one", hidden_weight=1.0),
        train_dataset=data,
    )
    single = _first_log(alone)
    assert single["distill/hidden"] == pytest.approx(log["distill/hidden/b"], rel=1e-5)
    assert single["distill/logit"] == pytest.approx(log["distill/logit/b"], rel=1e-5)


def test_each_teacher_has_its_own_projections_trained_and_checkpointed(tmp_path):
    data = classification_data(n=16)
    student = bert(hidden=16, layers=2, dropout=0.0, seed=1)
    args = _config(tmp_path / "out", hidden_weight=1.0, learning_rate=0.1, max_steps=2, save_strategy="steps")
    args.save_steps = 2
    trainer = DistillationTrainer(model=student, teacher_model=list(_teachers()), args=args, train_dataset=data)
    projections = {name: trainer.term_set.terms[f"hidden/{name}"].projector for name in ("teacher0", "teacher1")}
    assert all(p is not None for p in projections.values())
    before = {n: p.layers["main__1"].weight.detach().clone() for n, p in projections.items()}
    trainer.train()
    for name, projection in projections.items():
        assert not torch.equal(projection.layers["main__1"].weight, before[name]), name
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "checkpoint-2" / "hfkd_terms.safetensors"))
    assert any(k.startswith("terms.hidden/teacher0.projector") for k in saved)
    assert any(k.startswith("terms.hidden/teacher1.projector") for k in saved)


def _two_teacher_run(tmp_path, data, **overrides):
    """(first log, teacher logits, student logits) of one lr-0 step with the two teachers of `_teachers`."""
    student = bert(layers=2, dropout=0.0, seed=1)
    t0, t1 = _teachers()
    trainer = DistillationTrainer(
        model=student, teacher_model=[t0, t1], args=_config(tmp_path / "out", **overrides), train_dataset=data
    )
    z0, z1, zs = _logits(t0, data), _logits(t1, data), _logits(student, data)
    return _first_log(trainer), z0, z1, zs


def test_a_teacher_per_row(tmp_path):
    ids = [i % 2 for i in range(16)]
    data = classification_data(n=16).add_column("teacher_id", ids)
    log, z0, z1, zs = _two_teacher_run(tmp_path, data, teacher_combine="teacher_id")
    routed = torch.stack([torch.softmax((z0 if k == 0 else z1)[i] / T, -1) for i, k in enumerate(ids)])
    assert log["distill/logit"] == pytest.approx(_kl(routed, zs).mean().item(), rel=1e-4)


def test_confidence_weighting_in_training(tmp_path):
    data = classification_data(n=16)
    log, z0, z1, zs = _two_teacher_run(tmp_path, data, teacher_combine="confidence")
    labels = torch.tensor(data["labels"])
    losses = torch.stack([torch.nn.functional.cross_entropy(z, labels, reduction="none") for z in (z0, z1)], 1)
    w = 1 - torch.softmax(losses, 1)  # K = 2: (1 - softmax) / (K - 1)
    p_mix = w[:, :1] * torch.softmax(z0 / T, -1) + w[:, 1:] * torch.softmax(z1 / T, -1)
    assert log["distill/logit"] == pytest.approx(_kl(p_mix, zs).mean().item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_teacher_lists_fail_before_anything_is_written(tmp_path):
    out, data = tmp_path / "out", classification_data(n=8)
    t0, t1 = _teachers()

    def build(teachers, **overrides):
        return DistillationTrainer(
            model=bert(layers=2), teacher_model=teachers, args=_config(out, **overrides), train_dataset=data
        )

    with pytest.raises(ValueError, match="teacher_model is an empty list"):
        build([])
    with pytest.raises(ValueError, match="given twice"):
        build([t0, t0])
    with pytest.raises(ValueError, match="teacher_weights has 3 entries for 2 teachers"):
        build([t0, t1], teacher_weights=[1, 1, 1])
    with pytest.raises(ValueError, match="teacher_weights names"):
        build({"a": t0, "b": t1}, teacher_weights={"a": 1, "c": 1})
    with pytest.raises(ValueError, match="with a positive sum"):
        build([t0, t1], teacher_weights=[0, 0])
    with pytest.raises(ValueError, match="combines several teachers, but there is one"):
        build(t0, teacher_combine="teacher_id")
    with pytest.raises(ValueError, match="weighs several teachers, but there is one"):
        build(t0, teacher_weights=[1])
    with pytest.raises(ValueError, match="has no 'teacher_id' column"):
        build([t0, t1], teacher_combine="teacher_id")
    with pytest.raises(ValueError, match=r"name no teacher; use the teacher's index, 0..1"):
        DistillationTrainer(
            model=bert(layers=2),
            teacher_model=[t0, t1],
            args=_config(out, teacher_combine="teacher_id"),
            train_dataset=data.add_column("teacher_id", [0, 1, 2, 0, 1, 0, 1, 0]),
        )
    with pytest.raises(ValueError, match="one cache per teacher"):
        build([t0, t1], teacher_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="same number of labels"):
        build([t0, bert(labels=5)])
    with pytest.raises(ValueError, match="teacher_combine must be one of"):
        _config(out, teacher_combine="vote")
    with pytest.raises(ValueError, match="given twice"):
        _config(out, teacher_model_name_or_path='["org/a", "org/a"]')
    assert not out.exists()


def test_list_teachers_are_named_teacher0_teacher1(tmp_path):
    log, *_ = _two_teacher_run(tmp_path, classification_data(n=16))
    assert {"distill/logit", "distill/logit/teacher0", "distill/logit/teacher1"} <= set(log)


def test_one_cache_per_teacher_trains_as_the_teachers_online(tmp_path):
    """Each teacher cached by `build_teacher_cache` (its logits and the hidden layers its terms read); training from
    the two caches, with no teacher given, logs the same terms and ends with the same student as online."""
    import copy

    from hfkd import build_teacher_cache

    data = classification_data(n=16)
    t0, t1 = _teachers()
    student = bert(hidden=16, layers=2, dropout=0.0, seed=1)
    terms = dict(
        hidden_weight=1.0, learning_rate=0.1, max_steps=2, per_device_train_batch_size=8, teacher_weights=[3, 1]
    )
    caches = {}
    for name, teacher in (("a", t0), ("b", t1)):
        caches[name] = str(tmp_path / f"cache-{name}")
        build_teacher_cache(
            teacher,
            data,
            caches[name],
            args=_config(tmp_path / "x", **terms),
            student=student,
            hidden_dtype="float32",  # exactness; the default bfloat16 is measured in benchmarks/README.md
            progress=False,
        )
    runs = {}
    for how, teachers, cache_dir in (("online", {"a": t0, "b": t1}, None), ("cached", None, caches)):
        trainer = DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=teachers,
            args=_config(tmp_path / how, teacher_cache_dir=cache_dir, **terms),
            train_dataset=data,
        )
        trainer.train()
        runs[how] = ([e for e in trainer.state.log_history if "loss" in e], trainer.model.state_dict())
    assert runs["cached"][0] and len(runs["cached"][0]) == len(runs["online"][0]) == 2
    for online, cached in zip(runs["online"][0], runs["cached"][0], strict=True):
        for key in ("loss", "distill/logit", "distill/logit/a", "distill/hidden", "distill/hidden/b"):
            assert cached[key] == pytest.approx(online[key], rel=1e-5), key
    for name, value in runs["online"][1].items():
        torch.testing.assert_close(runs["cached"][1][name], value, rtol=1e-5, atol=1e-6, msg=name)

    with pytest.raises(ValueError, match=r"no cache for \['b'\]"):
        DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model={"a": t0, "b": t1},
            args=_config(tmp_path / "bad", teacher_cache_dir={"a": caches["a"]}, teacher_weights=[3, 1]),
            train_dataset=data,
        )
    with pytest.raises(ValueError, match="one cache per teacher"):
        DistillationTrainer(
            model=copy.deepcopy(student),
            teacher_model=[t0, t1],
            args=_config(tmp_path / "bad", teacher_cache_dir=caches["a"]),
            train_dataset=data,
        )
    assert not (tmp_path / "bad").exists()


def test_several_teachers_from_the_command_line_as_json(tmp_path):
    """The fields that name several teachers, weights and caches take JSON on the command line."""
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path / "out"),
            "--teacher_model_name_or_path", '["org/a", "org/b"]',
            "--teacher_weights", "[1, 2]",
            "--teacher_cache_dir", '{"teacher0": "/c/a", "teacher1": "/c/b"}',
            "--teacher_combine", "confidence",
        ]
    )  # fmt: skip
    assert config.teacher_model_name_or_path == ["org/a", "org/b"]
    assert config.teacher_weights == [1, 2]
    assert config.teacher_cache_dir == {"teacher0": "/c/a", "teacher1": "/c/b"}
    with pytest.raises(ValueError, match="teacher_weights has 3 entries for 2 teachers"):
        HfArgumentParser(DistillationConfig).parse_args_into_dataclasses(
            ["--output_dir", "x", "--teacher_model_name_or_path", '["org/a", "org/b"]', "--teacher_weights", "[1,1,1]"]
        )
