"""DistillationTrainer behaviour that does not depend on the model family: the drop-in contract, exact
normalisation under gradient accumulation, checkpoints of the projections, and early errors."""

import copy
import json
import shutil

import pytest
import torch
from tiny_models import COMMON, bert, classification_data, llama, lm_data, parameters_of, projector_of
from transformers import Trainer, TrainerCallback, TrainingArguments

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.projection import PROJECTOR_FILE
from hfkd.terms.runner import TERMS_FILE


def test_task_only_training_is_identical_to_trainer(tmp_path):
    data = classification_data()
    student = bert(hidden=16, layers=2)
    reference = copy.deepcopy(student)
    kwargs = dict(max_steps=4, per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3, **COMMON)

    plain = Trainer(
        model=reference, args=TrainingArguments(output_dir=str(tmp_path / "a"), **kwargs), train_dataset=data
    )
    plain.train()
    distil = DistillationTrainer(
        model=student,
        teacher_model=bert(),
        args=DistillationConfig(output_dir=str(tmp_path / "b"), task_weight=1.0, logit_weight=0.0, **kwargs),
        train_dataset=data,
    )
    distil.train()

    losses = lambda t: [e["loss"] for e in t.state.log_history if "loss" in e]  # noqa: E731
    assert losses(plain) == losses(distil)
    for (name, a), b in zip(reference.named_parameters(), student.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert [e["task"] for e in distil.state.log_history if "task" in e] == losses(plain)


@pytest.mark.parametrize(
    "family,terms",
    [
        ("llama", {"logit_weight": 1.0}),
        ("llama", {"logit_weight": 1.0, "hidden_weight": 1.0, "attention_weight": 1.0}),
        # BERT's head returns a per-batch mean although it takes **kwargs, which Trainer mistakes for a sum.
        ("bert", {"logit_weight": 1.0, "hidden_weight": 1.0}),
    ],
)
def test_gradient_accumulation_matches_one_big_batch(tmp_path, family, terms):
    """Batch 8 x 1 step and batch 2 x 4 accumulation steps give the same loss and the same update (SGD)."""
    data = lm_data() if family == "llama" else classification_data(n=8)
    results = []
    for batch, accumulation in ((8, 1), (2, 4)):
        if family == "llama":
            student, teacher = llama(hidden=16, layers=2, seed=1), llama(hidden=32, layers=4, seed=2)
        else:
            student, teacher = bert(hidden=16, layers=2, dropout=0.0, seed=1), bert(dropout=0.0, seed=2)
        args = DistillationConfig(
            output_dir=str(tmp_path / f"{batch}"),
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            logging_steps=1,
            task_weight=0.5,
            **terms,
            **COMMON,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.train()
        log = next(e for e in trainer.state.log_history if "loss" in e)
        results.append(
            (log, parameters_of(student), parameters_of(projector_of(trainer)) if projector_of(trainer) else {})
        )
    (log_a, params_a, proj_a), (log_b, params_b, proj_b) = results
    for key in ["loss", "task", *(f"distill/{k.split('_')[0]}" for k in terms)]:
        assert log_a[key] == pytest.approx(log_b[key], rel=1e-5, abs=1e-7), key
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in proj_a:
        torch.testing.assert_close(proj_a[name], proj_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_restores_projector_and_ends_like_an_uninterrupted_run(tmp_path):
    data = classification_data(n=16)

    def run(output_dir, resume=None, max_steps=4):
        args = DistillationConfig(
            output_dir=str(output_dir),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            hidden_weight=1.0,
            learning_rate=1e-3,
            **{**COMMON, "save_strategy": "steps"},
            save_steps=2,
        )
        student = bert(hidden=16, layers=2, dropout=0.0, seed=3)
        trainer = DistillationTrainer(
            model=student, teacher_model=bert(dropout=0.0, seed=4), args=args, train_dataset=data
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / TERMS_FILE).is_file()
    from safetensors.torch import load_file

    student_keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert not any("projector" in k or "layers.main" in k for k in student_keys)

    resumed = run(tmp_path / "resumed", resume=str(checkpoint))
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for (name, a), b in zip(projector_of(full).named_parameters(), projector_of(resumed).parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # The projections really were restored: a fresh projector differs from the trained one.
    fresh = run(tmp_path / "fresh", max_steps=0)
    assert not torch.equal(next(projector_of(fresh).parameters()), next(projector_of(full).parameters()))

    # A checkpoint written before terms were plugins kept the projections in hfkd_projector.safetensors, with
    # their layout as metadata: resuming from it ends the same way.
    from safetensors.torch import save_file

    legacy = tmp_path / "legacy" / "checkpoint-2"
    shutil.copytree(checkpoint, legacy)
    state = load_file(str(legacy / TERMS_FILE))
    prefix = "terms.hidden.projector."
    old = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    assert old and len(old) == len(state)
    (legacy / TERMS_FILE).unlink()
    save_file(old, str(legacy / PROJECTOR_FILE), metadata={"specs": json.dumps(projector_of(full).specs)})
    from_legacy = run(tmp_path / "from-legacy", resume=str(legacy))
    for (name, a), b in zip(full.model.named_parameters(), from_legacy.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    for (name, a), b in zip(
        projector_of(full).named_parameters(), projector_of(from_legacy).parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_drop_in_keeps_trainer_features(tmp_path):
    """compute_metrics, callbacks, processing_class, teacher by local path and dtype all keep working."""
    teacher_dir = tmp_path / "teacher"
    bert(seed=5).save_pretrained(teacher_dir)
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs or {}))

    def compute_metrics(prediction):
        logits, labels = prediction
        assert logits.shape == (len(labels), 3)  # features requested for the loss are not gathered as predictions
        return {"accuracy": float((logits.argmax(-1) == labels).mean())}

    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        teacher_model_name_or_path=str(teacher_dir),
        teacher_model_init_kwargs={"dtype": "float64"},
        hidden_weight=0.5,
        **COMMON,
    )
    trainer = DistillationTrainer(
        model=bert(hidden=16, layers=2),
        args=args,
        train_dataset=classification_data(),
        eval_dataset=classification_data(n=8, seed=1),
        compute_metrics=compute_metrics,
        callbacks=[Recorder()],
    )
    assert next(trainer.teacher_model.parameters()).dtype == torch.float64
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_accuracy" in metrics and "eval_distill/logit" in metrics and "eval_distill/hidden" in metrics
    assert any("distill/hidden" in logs for logs in seen) and any("eval_accuracy" in logs for logs in seen)


def test_peft_lora_student(tmp_path):
    from peft import LoraConfig, get_peft_model

    student = get_peft_model(llama(hidden=32, layers=2, seed=6), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    before = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
    args = DistillationConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        **COMMON,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=llama(hidden=32, layers=4, seed=7), args=args, train_dataset=lm_data()
    )
    trainer.train()
    changed = [n for n, p in student.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert changed and all("lora" in n for n in changed)
    assert "distill/logit" in trainer.state.log_history[0]


def test_teacher_only_inputs_reach_the_teacher_alone(tmp_path):
    """`teacher_*` batch keys go to the teacher only, e.g. for a teacher tokenised differently."""
    data = classification_data(n=8)
    shifted = [[min(i + 1, 98) for i in row] for row in data["input_ids"]]
    data = data.add_column("teacher_input_ids", shifted)
    calls = []
    teacher = bert(seed=8)
    teacher.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].clone()), with_kwargs=True)
    args = DistillationConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, **COMMON)
    trainer = DistillationTrainer(
        model=bert(hidden=16, layers=2), teacher_model=teacher, args=args, train_dataset=data
    )
    trainer.train()
    assert calls and all((c >= 6).all() for c in calls)  # the shifted ids (originals start at 5)


def _trainer(output_dir, student, teacher, data, **config):
    args = DistillationConfig(
        output_dir=str(output_dir), max_steps=1, per_device_train_batch_size=2, **COMMON, **config
    )
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)


def test_errors_before_the_first_step(tmp_path):
    data = classification_data(n=4)
    out = tmp_path / "out"  # does not exist yet: a trainer that fails must not leave it behind
    with pytest.raises(ValueError, match="needs a teacher.*teacher_ema_decay.*peer_models"):
        DistillationTrainer(model=bert(), args=DistillationConfig(output_dir=str(out), **COMMON), train_dataset=data)
    with pytest.raises(ValueError, match="number of labels: the student has 2 outputs, the teacher 3"):
        _trainer(out, bert(labels=2), bert(), data)
    with pytest.raises(ValueError, match="same vocabulary"):
        _trainer(out, llama(vocab=60), llama(), lm_data(vocab=60))
    with pytest.raises(ValueError, match="hidden_layer_map has 2 entries"):
        _trainer(out, bert(layers=2), bert(), data, hidden_weight=1.0, hidden_layer_map="0,4")
    with pytest.raises(ValueError, match="same number of heads"):
        _trainer(out, bert(heads=2), bert(heads=4), data, attention_weight=1.0, attention_heads="match")
    with pytest.raises(ValueError, match="projections"):
        student = bert(hidden=16)
        args = DistillationConfig(output_dir=str(out), hidden_weight=1.0, **COMMON)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        DistillationTrainer(
            model=student, teacher_model=bert(), args=args, train_dataset=data, optimizers=(optimizer, None)
        )
    with pytest.raises(ValueError, match="Could not load the teacher"):
        _trainer(out, bert(), str(tmp_path / "no-such-teacher"), data)
    # Trainer.__init__ creates output_dir before hfkd's checks run; each failure above removed it again.
    assert not out.exists() and not any(tmp_path.iterdir())


def test_bf16_autocast_on_cpu_gives_finite_terms_close_to_float32(tmp_path):
    logs = {}
    for bf16 in (False, True):
        args = DistillationConfig(
            output_dir=str(tmp_path / str(bf16)),
            max_steps=1,
            per_device_train_batch_size=8,
            logging_steps=1,
            hidden_weight=1.0,
            bf16=bf16,
            **COMMON,
        )
        trainer = DistillationTrainer(
            model=llama(hidden=16, layers=2, seed=1),
            teacher_model=llama(hidden=32, layers=4, seed=2),
            args=args,
            train_dataset=lm_data(),
        )
        trainer.train()
        logs[bf16] = trainer.state.log_history[0]
    for key in ("task", "distill/logit", "distill/hidden"):
        assert torch.isfinite(torch.tensor(logs[True][key]))
        # bf16 keeps 8 bits of mantissa: agreement within a few percent is what it can give.
        assert logs[True][key] == pytest.approx(logs[False][key], rel=0.05), key
