"""Deep mutual learning (hfkd.peers): the student and its peers learn together, each from the labels and the others.

The references below are written from the paper's loss (Zhang et al., CVPR 2018, eq. 10 generalised to K models):
L_k = CE(p_k, y) + T^2 / (K - 1) * sum_{l != k} KL(p_l^T || p_k^T), with the other models' predictions fixed, one
SGD step per model; computed in float64 on copies of the models, independently of the trainer's code.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from tiny_models import COMMON, bert, classification_data, llama, lm_data, parameters_of
from transformers import AutoModelForSequenceClassification, TrainerCallback

from hfkd import DistillationConfig, DistillationTrainer

T = 2.0


def _config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=8,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        temperature=T,
        task_weight=1.0,
        logit_weight=1.0,
        logging_steps=1,
        max_grad_norm=1e9,
        **COMMON,
    )
    return DistillationConfig(**{**defaults, **kwargs})


def _sharp(model):
    """Random BERTs all predict near-uniform classes (KLs ~1e-5, below float32's resolution of a KL): scale the head
    so that the models disagree clearly."""
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    return model


def _reference_step(models: dict, data, lr: float, clip: float) -> tuple[dict, dict]:
    """One DML step in float64: each model's parameters after SGD on its own loss, and each loss's parts."""
    models = {name: copy.deepcopy(m).double().train() for name, m in models.items()}
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    labels = torch.tensor(data["labels"])
    logits = {name: m(**batch).logits for name, m in models.items()}
    after, parts = {}, {}
    for name, model in models.items():
        own = logits[name]
        log_q = torch.log_softmax(own / T, -1)
        kls = {}
        for other, z in logits.items():
            if other == name:
                continue
            p = torch.softmax(z.detach() / T, -1)
            kls[other] = T**2 * (p * (torch.log(p) - log_q)).sum(-1).mean()
        ce = F.cross_entropy(own, labels)
        loss = ce + (sum(kls.values()) / len(kls) if kls else 0.0)
        model.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        factor = min(1.0, clip / (norm.item() + 1e-6))
        with torch.no_grad():
            after[name] = {n: p - lr * factor * p.grad for n, p in model.named_parameters()}
        parts[name] = {"task": ce.item(), **{f"kl/{k}": v.item() for k, v in kls.items()}}
    return after, parts


def _first_log(trainer) -> dict:
    return next(h for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("clip", [1e9, 0.05])
def test_one_step_equals_each_model_on_its_own_loss_float64(tmp_path, clip):
    """Three models: every model's update is SGD on its own CE + the mean of its KLs to the two others (detached),
    its gradient clipped on its own; the per-model logs are the reference's parts."""
    student, peer_a, peer_b = (_sharp(bert(seed=s, dropout=0.0)) for s in (1, 2, 3))
    data = classification_data(n=8)
    before = {"student": student, "peer0": peer_a, "peer1": peer_b}
    expected, parts = _reference_step(before, data[:], lr=0.5, clip=clip)
    trainer = DistillationTrainer(
        model=student, peer_models=[peer_a, peer_b], args=_config(tmp_path, max_grad_norm=clip), train_dataset=data
    )
    trainer.train()
    for name, model in (("student", student), ("peer0", peer_a), ("peer1", peer_b)):
        for key, value in model.named_parameters():
            torch.testing.assert_close(value.detach().double(), expected[name][key], rtol=1e-5, atol=2e-6, msg=key)
    log = _first_log(trainer)
    assert log["task"] == pytest.approx(parts["student"]["task"], rel=1e-5)
    assert log["distill/logit/peer0"] == pytest.approx(parts["student"]["kl/peer0"], rel=1e-4, abs=1e-7)
    assert log["distill/logit/peer1"] == pytest.approx(parts["student"]["kl/peer1"], rel=1e-4, abs=1e-7)
    for peer in ("peer0", "peer1"):
        other = "peer1" if peer == "peer0" else "peer0"
        assert log[f"{peer}/task"] == pytest.approx(parts[peer]["task"], rel=1e-5)
        assert log[f"{peer}/distill/logit/student"] == pytest.approx(parts[peer]["kl/student"], rel=1e-4, abs=1e-7)
        assert log[f"{peer}/distill/logit/{other}"] == pytest.approx(parts[peer][f"kl/{other}"], rel=1e-4, abs=1e-7)


def test_one_peer_the_update_differs_from_labels_alone_by_the_kl(tmp_path):
    """One peer (logged as distill/logit): the student's update is CE + KL to the peer, and that KL's share of the
    update is far above the tolerance, so a trainer that ignored the peer (or let the peer's loss reach the student)
    would fail."""
    student, peer = _sharp(bert(seed=1, dropout=0.0)), _sharp(bert(seed=2, dropout=0.0))
    data = classification_data(n=8)
    expected, parts = _reference_step({"student": student, "peer": peer}, data[:], lr=0.5, clip=1e9)
    labels_only, _ = _reference_step({"student": student}, data[:], lr=0.5, clip=1e9)  # no other model: CE alone
    peer_start = parameters_of(peer)
    trainer = DistillationTrainer(model=student, peer_models=peer, args=_config(tmp_path), train_dataset=data)
    trainer.train()
    gap = max((expected["student"][k] - labels_only["student"][k]).abs().max() for k in expected["student"])
    assert gap > 1e-4  # 50 x the tolerance below
    for key, value in student.named_parameters():
        torch.testing.assert_close(value.detach().double(), expected["student"][key], rtol=1e-5, atol=2e-6, msg=key)
    for key, value in peer.named_parameters():
        torch.testing.assert_close(value.detach().double(), expected["peer"][key], rtol=1e-5, atol=2e-6, msg=key)
    assert any(not torch.equal(peer_start[k], v) for k, v in peer.named_parameters())
    log = _first_log(trainer)
    assert log["distill/logit"] == pytest.approx(parts["student"]["kl/peer"], rel=1e-4)
    assert log["peer/distill/logit"] == pytest.approx(parts["peer"]["kl/student"], rel=1e-4)


def test_accumulated_micro_batches_equal_one_batch(tmp_path):
    """2 x 4 rows with gradient accumulation update both models as one batch of 8 (each model's task loss and terms
    normalised over the whole window)."""
    results = []
    for name, kwargs in (("one", {}), ("two", {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2})):
        student, peer = _sharp(bert(seed=1, dropout=0.0)), _sharp(bert(seed=2, dropout=0.0))
        trainer = DistillationTrainer(
            model=student,
            peer_models=[peer],
            args=_config(tmp_path / name, max_steps=2, **kwargs),
            train_dataset=classification_data(n=16),
        )
        trainer.train()
        results.append((student, peer))
    for a, b in zip(*results, strict=True):
        for (key, x), y in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=key)


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _models(dropout=0.1):
    return bert(seed=1, dropout=dropout), bert(seed=2, dropout=dropout)


def test_resume_restores_the_peers_and_their_optimizer_state_exactly(tmp_path):
    """AdamW, dropout on: stopped after checkpoint-2 and resumed, the student and the peer end bitwise equal to an
    uninterrupted run (weights, Adam moments and RNG all restored)."""
    data = classification_data(n=16)
    kwargs = dict(
        max_steps=4,
        per_device_train_batch_size=4,
        optim="adamw_torch",
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=2,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
    )
    student, peer = _models()
    DistillationTrainer(
        model=student, peer_models=[peer], args=_config(tmp_path / "a", **kwargs), train_dataset=data
    ).train()

    cut_student, cut_peer = _models()
    DistillationTrainer(
        model=cut_student,
        peer_models=[cut_peer],
        args=_config(tmp_path / "b", **kwargs),
        train_dataset=data,
        callbacks=[_StopAt(2)],
    ).train()
    checkpoint = tmp_path / "b" / "out" / "checkpoint-2"
    assert (checkpoint / "peers" / "peer0" / "model.safetensors").is_file()
    resumed_student, resumed_peer = _models()
    DistillationTrainer(
        model=resumed_student, peer_models=[resumed_peer], args=_config(tmp_path / "b", **kwargs), train_dataset=data
    ).train(resume_from_checkpoint=str(checkpoint))
    for a, b in ((student, resumed_student), (peer, resumed_peer)):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), key
    # A peer that did not move from its start would also be "equal": make sure both trained.
    assert not torch.equal(peer.classifier.weight, _models()[1].classifier.weight)


def test_each_peer_is_saved_loadable_without_hfkd(tmp_path):
    student, peer = _models(dropout=0.0)
    trainer = DistillationTrainer(
        model=student,
        peer_models={"buddy": peer},
        args=_config(tmp_path, max_steps=2),
        train_dataset=classification_data(),
    )
    trainer.train()
    trainer.save_model()
    folder = tmp_path / "out" / "peers" / "buddy"
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    for (key, x), y in zip(peer.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(x, y), key
    # The student is saved where Trainer saves it, without the peer's weights.
    student_keys = set(AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").state_dict())
    assert student_keys == set(student.state_dict())


def test_the_best_checkpoint_brings_back_the_peers_of_that_step(tmp_path):
    """load_best_model_at_end: the peers come back as they were at the student's best checkpoint."""
    student, peer = _models(dropout=0.0)
    data = classification_data(n=8)
    config = _config(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst loss, so the best checkpoint is an early one and differs from the last
        learning_rate=0.5,
    )
    trainer = DistillationTrainer(
        model=student, peer_models=[peer], args=config, train_dataset=data, eval_dataset=data
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    saved = AutoModelForSequenceClassification.from_pretrained(os.path.join(best, "peers", "peer0"))
    for (key, x), y in zip(peer.state_dict().items(), saved.state_dict().values(), strict=True):
        assert torch.equal(x, y), key
    assert not best.endswith("checkpoint-3")
    last = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "checkpoint-3" / "peers" / "peer0")
    assert not torch.equal(last.classifier.weight, peer.classifier.weight)


def test_evaluation_reports_each_peer_and_predict_is_the_student_alone(tmp_path):
    student, peer = _models(dropout=0.0)
    data = classification_data(n=8)
    trainer = DistillationTrainer(
        model=student, peer_models=[peer], args=_config(tmp_path), train_dataset=data, eval_dataset=data
    )
    metrics = trainer.evaluate()
    assert {"eval_task", "eval_distill/logit", "eval_peer0/task", "eval_peer0/distill/logit"} <= set(metrics)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = F.cross_entropy(peer.eval()(**batch).logits, torch.tensor(data["labels"]))
    assert metrics["eval_peer0/task"] == pytest.approx(float(expected), rel=1e-5)
    prediction = trainer.predict(data)
    with torch.no_grad():
        torch.testing.assert_close(torch.as_tensor(prediction.predictions), student.eval()(**batch).logits)


def test_causal_lm_peers_learn_per_token(tmp_path):
    """Token-level heads: both models train; the logged per-token KL of the first step (lr 0) is the float64 mean
    over the labelled next-token positions."""
    student, peer = llama(seed=1), llama(seed=2)
    data = lm_data()
    trainer = DistillationTrainer(
        model=student,
        peer_models=[peer],
        args=_config(tmp_path, learning_rate=0.0, per_device_train_batch_size=8),
        train_dataset=data,
    )
    trainer.train()
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    labels = torch.tensor(data["labels"])
    with torch.no_grad():
        zs, zp = (m.double()(**batch).logits for m in (student, peer))
    counted = labels[:, 1:].ne(-100)
    p, log_q = torch.softmax(zp[:, :-1] / T, -1), torch.log_softmax(zs[:, :-1] / T, -1)
    kl = (p * (torch.log(p) - log_q)).sum(-1)
    expected = T**2 * kl[counted].sum() / counted.sum()
    assert _first_log(trainer)["distill/logit"] == pytest.approx(float(expected), rel=1e-4)


# ------------------------------------------------------------------ bad input
def _refused(tmp_path, match, *, peers="default", config=None, **trainer_kwargs):
    student = trainer_kwargs.pop("model", None) or bert(seed=1)
    peers = [bert(seed=2)] if peers == "default" else peers
    with pytest.raises((ValueError, TypeError), match=match):
        DistillationTrainer(
            model=student,
            peer_models=peers,
            args=config or _config(tmp_path),
            train_dataset=classification_data(),
            **trainer_kwargs,
        )
    assert not os.path.exists(tmp_path / "out"), "nothing may be written for a refused run"


def test_a_peer_that_is_the_student_itself_is_refused(tmp_path):
    student = bert(seed=1)
    _refused(tmp_path, "is the student itself", model=student, peers=[bert(seed=2), student])


def test_bad_peer_lists_are_refused(tmp_path):
    _refused(tmp_path, "peer_models is an empty list", peers=[])
    twice = bert(seed=2)
    _refused(tmp_path, "is the same as 'peer0'", peers=[twice, twice])
    _refused(tmp_path, "not 'student'", peers={"student": bert(seed=2)})
    _refused(tmp_path, "must be a model", peers=[3])
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(bert(seed=2), LoraConfig(r=2, target_modules=["query", "value"]))
    _refused(tmp_path, "carry peft adapters", peers=[adapted])


def test_settings_that_peers_cannot_take_are_refused(tmp_path):
    _refused(tmp_path, r"\['hidden'\] read features", config=_config(tmp_path, hidden_weight=1.0))
    _refused(tmp_path, "no term compares the models", config=_config(tmp_path, logit_weight=0.0))
    _refused(tmp_path, "teacher_model is set", teacher_model=bert(seed=3))
    _refused(tmp_path, "teacher_combine is set", config=_config(tmp_path, teacher_combine="confidence"))
    _refused(tmp_path, "teacher_ema_decay is set", config=_config(tmp_path, teacher_ema_decay=0.9))
    _refused(tmp_path, "peers must solve the student.s task", peers=[bert(seed=2, labels=4)])  # another label count


def test_an_optimizer_that_does_not_update_the_peers_is_refused(tmp_path):
    student = bert(seed=1)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    _refused(tmp_path, "does not update the peer 'peer0'", model=student, optimizers=(optimizer, None))


def test_peer_names_come_from_the_config_and_json(tmp_path):
    config = DistillationConfig(output_dir=str(tmp_path / "x"), peer_model_name_or_path='["a", "b"]', **COMMON)
    assert config.peer_model_name_or_path == ["a", "b"]
    with pytest.raises(ValueError, match="is the same as 'peer0'"):
        DistillationConfig(output_dir=str(tmp_path / "x"), peer_model_name_or_path='["a", "a"]', **COMMON)
    with pytest.raises(ValueError, match="teacher_cache_dir is set"):
        DistillationConfig(
            output_dir=str(tmp_path / "x"), peer_model_name_or_path="a", teacher_cache_dir="c", **COMMON
        )
    # A recipe's teacher may stand beside peers in the config (it never teaches); the trainer refuses it.
    config = _config(tmp_path, peer_model_name_or_path=["a"], teacher_model_name_or_path="b")
    with pytest.raises(ValueError, match="teacher_model_name_or_path is set"):
        DistillationTrainer(model=bert(seed=1), args=config, train_dataset=classification_data())
    with pytest.raises(ValueError, match="no such folder"):
        DistillationTrainer(
            model=bert(seed=1),
            args=_config(tmp_path, peer_model_name_or_path=["./no/such/peer"]),
            train_dataset=classification_data(),
        )
    assert not os.path.exists(tmp_path / "out")
