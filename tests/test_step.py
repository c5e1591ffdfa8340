"""The training step as objects of their own (hfkd.step, hfkd.sources, hfkd.mixing, hfkd.units), without a Trainer:
a batch goes to (loss, logged values, outputs); float64 references written from the definitions."""

import torch
from tiny_models import bert

from hfkd.mixing import TeacherMixer
from hfkd.sources import FrozenTeachers
from hfkd.step import DistillationStep, TaskLossSettings
from hfkd.streams import model_kind
from hfkd.terms.base import Features, TermSpec
from hfkd.terms.runner import TermSet
from hfkd.units import WindowUnits


def _batch(n=4, length=8, vocab=99, labels=3, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 5:] = 0
    return {
        "input_ids": torch.randint(5, vocab, (n, length), generator=g),
        "attention_mask": mask,
        "labels": torch.randint(0, labels, (n,), generator=g),
    }


def _step(student, teachers: dict, specs, task_weight=0.5, mode="weights", weights=None):
    source = FrozenTeachers(teachers)
    term_set = TermSet(specs, source.names)
    term_set.bind_module_names(tuple(n for n, _ in student.named_modules()), source.module_names())
    units = WindowUnits(model_kind(student, shifts_labels=False))

    def task_loss(model, inputs, num_items_in_batch, training, accepts=None, uses_num_items=None):
        outputs = model(**inputs)
        return outputs.loss, outputs

    return DistillationStep(
        term_set, source, TeacherMixer(mode, weights), units, task_loss, TaskLossSettings(task_weight=task_weight)
    )


def _kl_t2(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """Mean over examples of T^2 KL(softmax(z_t / T) || softmax(z_s / T)), float64, from the definition."""
    p = torch.softmax(teacher_logits.double() / t, -1)
    q = torch.softmax(student_logits.double() / t, -1)
    return (t * t * (p * (p / q).log()).sum(-1)).mean()


def test_a_step_is_task_plus_weighted_terms_without_a_trainer():
    student, teacher = bert(hidden=16, layers=2, dropout=0.0, seed=1), bert(dropout=0.0, seed=0)
    student.eval()  # dropout off: the reference forward sees the same network
    with torch.no_grad():  # a confident teacher: an untrained BERT's KL of 1e-4 would test float32 rounding
        teacher.classifier.weight.mul_(30.0)
    spec = TermSpec("logit", 2.0, {"temperature": 3.0})
    step = _step(student, {"teacher": teacher.eval()}, [spec], task_weight=0.5)
    batch = _batch()
    with step.capturing(student) as modules:
        result = step(student, batch, modules=modules)

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        z_s, z_t = student(**inputs).logits, teacher(**inputs).logits
        ce = torch.nn.functional.cross_entropy(z_s.double(), batch["labels"])
    kd = _kl_t2(z_t, z_s, 3.0)
    assert set(result.logged) == {"task", "distill/logit"}
    torch.testing.assert_close(result.logged["task"].double(), ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.logged["distill/logit"].double(), kd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(result.loss.double(), 0.5 * ce + 2.0 * kd, rtol=1e-5, atol=1e-6)
    assert result.loss.requires_grad  # the student's parameters get a gradient through it
    result.loss.backward()
    assert student.classifier.weight.grad is not None and teacher.classifier.weight.grad is None


def test_a_step_without_distillation_terms_is_the_task_loss_alone():
    student, teacher = bert(hidden=16, layers=2, dropout=0.0, seed=1).eval(), bert(dropout=0.0, seed=0).eval()
    step = _step(student, {"teacher": teacher}, [], task_weight=1.0)
    batch = _batch(seed=3)
    result = step(student, batch)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(
            student(**{k: v for k, v in batch.items() if k != "labels"}).logits.double(), batch["labels"]
        )
    assert set(result.logged) == {"task"}
    torch.testing.assert_close(result.loss.double(), ce, rtol=1e-5, atol=1e-6)


def _mixture_reference(logits: list[torch.Tensor], weights: list[float], t: float) -> torch.Tensor:
    """T log sum_k w_k softmax(z_k / T), float64, written from the definition."""
    p = sum(w * torch.softmax(z.double() / t, -1) for w, z in zip(weights, logits, strict=True))
    return t * p.log()


def test_each_response_term_mixes_the_teachers_at_its_own_temperature():
    # The logit term compares at T=2 and dkd at its T=4: each reads the mixture of the teachers' distributions at
    # its own temperature (before, both read the mixture at the logit term's T).
    specs = [
        TermSpec("logit", 1.0, {"temperature": 2.0}),
        TermSpec("dkd", 1.0, {"temperature": 4.0}),
    ]
    term_set = TermSet(specs, ("a", "b"))
    term_set.bind_module_names((), {})
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 3, generator=g) * 4, torch.randn(5, 3, generator=g) * 4
    kind = model_kind(bert(hidden=16, layers=1), shifts_labels=False)
    teachers = {"a": Features(_Out(z_a), {}, kind), "b": Features(_Out(z_b), {}, kind)}
    mixer = TeacherMixer("weights", torch.tensor([0.25, 0.75]))
    mixed, mean_weights = mixer.mix(term_set, teachers, {"labels": torch.zeros(5, dtype=torch.long)})

    assert set(mixed) == {"logit", "dkd"}
    for name, t in (("logit", 2.0), ("dkd", 4.0)):
        expected = _mixture_reference([z_a, z_b], [0.25, 0.75], t)
        torch.testing.assert_close(mixed[name].logits.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed["logit"].logits, mixed["dkd"].logits)  # the temperatures matter here
    torch.testing.assert_close(mean_weights, torch.tensor([0.25, 0.75]))


def test_one_teacher_is_not_mixed():
    term_set = TermSet([TermSpec("logit", 1.0)], ("teacher",))
    term_set.bind_module_names((), {})
    kind = model_kind(bert(hidden=16, layers=1), shifts_labels=False)
    teachers = {"teacher": Features(_Out(torch.randn(2, 3)), {}, kind)}
    assert TeacherMixer().mix(term_set, teachers, {}) == (None, None)


class _Out:
    def __init__(self, logits):
        self.logits = logits
