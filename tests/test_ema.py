"""Self-distillation with a mean teacher (hfkd.ema): the teacher is an EMA of the student, updated after every
optimizer step, saved and restored exactly, never exported; bad settings fail before anything is written."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import COMMON, bert, classification_data, dataset_for, tiny_resnet
from transformers import TrainerCallback

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.ema import EMA_FILE


def _config(out, **overrides):
    values = dict(
        max_steps=4,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        teacher_ema_decay=0.6,
        **COMMON,
    )
    values.update(overrides)
    return DistillationConfig(output_dir=str(out), **values)


class _Record(TrainerCallback):
    """The student's state right after each optimizer step (before the EMA update, which comes after this)."""

    def __init__(self, model):
        self.model, self.states = model, []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.states.append({k: v.detach().double().clone() for k, v in self.model.state_dict().items()})


@pytest.mark.parametrize("family", ["bert", "resnet"])
def test_the_teacher_follows_the_mean_teacher_recurrence(tmp_path, family):
    """After 4 steps every teacher tensor equals, in float64, e_{t+1} = a_t e_t + (1 - a_t) s_t with
    a_t = min(0.6, 1 - 1/(t+1)), e_0 = the initial student; BatchNorm statistics too; integer buffers are copied."""
    if family == "bert":
        student, data = bert(layers=2, dropout=0.0, seed=1), classification_data(n=16)
    else:
        student, data = tiny_resnet((8, 16), seed=1), dataset_for("resnet", 16)
    initial = {k: v.detach().double().clone() for k, v in student.state_dict().items()}
    floating = {k: v.is_floating_point() for k, v in student.state_dict().items()}  # the records are all float64
    record = _Record(student)
    trainer = DistillationTrainer(model=student, args=_config(tmp_path), train_dataset=data, callbacks=[record])
    assert trainer.teacher_model is not student
    trainer.train()
    assert len(record.states) == 4
    expected = dict(initial)
    for t, state in enumerate(record.states):
        a = min(0.6, 1.0 - 1.0 / (t + 1))
        expected = {k: a * expected[k] + (1 - a) * state[k] if floating[k] else state[k] for k in state}
    teacher = trainer.teacher_model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(teacher[name].double(), value, rtol=1e-6, atol=1e-6, msg=name)
    # The teacher is neither the first nor the last student: it averages them.
    final = record.states[-1]
    moved = [k for k, v in final.items() if floating[k] and not torch.equal(v, initial[k])]
    assert moved and any(not torch.allclose(teacher[k].double(), final[k]) for k in moved)
    assert not any(p.requires_grad for p in trainer.teacher_model.parameters())
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all("distill/logit" in e for e in logs) and logs[-1]["distill/logit"] > 0


def test_resume_restores_the_teacher_exactly_and_the_export_is_the_student_alone(tmp_path):
    data = classification_data(n=16)

    def run(out, resume=None, max_steps=4):
        args = _config(out, max_steps=max_steps, save_strategy="steps", save_steps=2, hidden_weight=1.0)
        trainer = DistillationTrainer(model=bert(layers=2, dropout=0.0, seed=1), args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / EMA_FILE).is_file()
    assert not any("teacher" in k for k in load_file(str(checkpoint / "model.safetensors")))
    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for (name, a), b in zip(
        full.teacher_model.state_dict().items(), resumed.teacher_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # Equal teachers also prove the load: a resumed run that started its teacher from the fresh student instead of
    # the checkpoint's average would end elsewhere (the recurrence test pins the average down).
    full.save_model(str(tmp_path / "export"))
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert exported.keys() == {k for k in full.model.state_dict() if k in exported}
    for name, value in full.model.state_dict().items():
        if name in exported:
            assert torch.equal(exported[name], value.cpu()), name


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, float("nan"), True])
def test_a_decay_outside_0_1_fails_when_the_config_is_built(tmp_path, decay):
    with pytest.raises(ValueError, match="teacher_ema_decay must lie strictly between 0 and 1"):
        _config(tmp_path / "out", teacher_ema_decay=decay)
    assert not (tmp_path / "out").exists()


def test_an_ema_teacher_with_another_teacher_a_cache_or_a_partial_optimizer_is_refused(tmp_path):
    out, data = tmp_path / "out", classification_data(n=8)
    with pytest.raises(ValueError, match="pass no teacher_model"):
        DistillationTrainer(model=bert(layers=2), teacher_model=bert(), args=_config(out), train_dataset=data)
    with pytest.raises(ValueError, match="names another teacher"):
        _config(out, teacher_model_name_or_path="some/teacher")
    with pytest.raises(ValueError, match="a teacher cache .* cannot stand for it"):
        _config(out, teacher_cache_dir=str(tmp_path / "cache"))
    student = bert(layers=2)
    head_only = torch.optim.SGD(student.classifier.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not update \d+ trainable parameters"):
        DistillationTrainer(model=student, args=_config(out), train_dataset=data, optimizers=(head_only, None))
    assert not out.exists()
    # Frozen weights are fine: they never change, so their average is themselves.
    frozen = bert(layers=2)
    frozen.bert.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in frozen.parameters() if p.requires_grad], lr=0.1)
    trainer = DistillationTrainer(
        model=frozen, args=_config(out, max_steps=1), train_dataset=data, optimizers=(optimizer, None)
    )
    before = copy.deepcopy(trainer.teacher_model.bert.state_dict())
    trainer.train()
    assert all(torch.equal(v, trainer.teacher_model.bert.state_dict()[k]) for k, v in before.items())
