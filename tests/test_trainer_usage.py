"""The trainer as a new user meets it: calls outside train(), no data at construction, plain modules, other head
counts, predictions and evaluation without the teacher."""

import copy

import datasets
import numpy as np
import pytest
import torch
from tiny_models import COMMON, PlainCNN, bert, classification_data, llama, lm_data, vit_with
from transformers import Trainer, TrainingArguments

from hfkd import DistillationConfig, DistillationTrainer


def _collate(data, n=4):
    rows = [data[i] for i in range(n)]
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def _config(tmp_path, **overrides):
    values = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1}
    return DistillationConfig(output_dir=str(tmp_path / "out"), **{**COMMON, **values, **overrides})


def test_compute_loss_outside_train_matches_the_first_step(tmp_path):
    data = classification_data(n=4)
    trainer = DistillationTrainer(
        model=bert(dropout=0.0, seed=1, layers=2),
        teacher_model=bert(dropout=0.0),
        args=_config(tmp_path, hidden_weight=1.0),
        train_dataset=data,
    )
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, _collate(data))  # Trainer's own works here; so must ours
    assert torch.isfinite(loss)
    trainer.args.max_steps, trainer.args.optim = 1, "sgd"
    trainer.train()
    first = trainer.state.log_history[0]["loss"]
    assert first == pytest.approx(loss.item(), rel=1e-5)


def test_a_trainer_built_without_data_plans_on_its_first_batch(tmp_path):
    """The chunked large-vocabulary path is taken at the first batch, and gives the full-logits loss."""
    data = lm_data()
    batch = _collate(data, 8)
    losses = {}
    for name, data_at_init in (("with data", data), ("without", None)):
        trainer = DistillationTrainer(
            model=llama(seed=1),
            teacher_model=llama(layers=3),
            args=_config(tmp_path / name, logit_chunk_size=4),
            train_dataset=data_at_init,
        )
        trainer.model.train()
        losses[name] = trainer.compute_loss(trainer.model, dict(batch))
        assert trainer.step.plan.head is not None, name
    full = DistillationTrainer(
        model=llama(seed=1), teacher_model=llama(layers=3), args=_config(tmp_path / "full", logit_chunk_size=0)
    )
    full.model.train()
    reference = full.compute_loss(full.model, dict(batch))
    assert full.step.plan.head is None
    torch.testing.assert_close(losses["without"], losses["with data"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(losses["without"], reference, rtol=1e-5, atol=1e-6)


def test_a_plain_module_teacher_teaches_a_vit_with_kd_and_a_relation_term(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {"pixel_values": torch.randn(8, 3, 16, 16, generator=g).tolist(), "labels": [0, 1, 2, 0, 1, 2, 0, 1]}
    ).with_format("torch")
    teacher = PlainCNN()
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    terms = [{"name": "sp", "weight": 100.0, "teacher_module": "global_pool", "student_layer": -1, "pooling": "cls"}]
    trainer = DistillationTrainer(
        model=vit_with(), teacher_model=teacher, args=_config(tmp_path, terms=terms), train_dataset=data
    )
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logs) == 2 and calls
    for entry in logs:
        assert entry["loss"] == pytest.approx(
            0.5 * entry["task"] + 0.5 * entry["distill/logit"] + 100.0 * entry["distill/sp"], rel=1e-4
        )
        assert entry["distill/logit"] > 0 and entry["distill/sp"] > 0
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


class PlainStudentCNN(PlainCNN):
    """A plain student: forward(pixel_values) returns a logits tensor; its loss comes from compute_loss_func."""

    def forward(self, pixel_values):
        return super().forward(pixel_values)


def test_a_plain_module_student_learns_from_a_vit_with_kd_and_a_relation_term(tmp_path):
    """The student is a plain nn.Module: its own loss comes from Trainer's `compute_loss_func`, its logits feed the
    logit term and a named submodule the relation term. Checked against the loss computed by hand."""
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict(
        {"pixel_values": torch.randn(8, 3, 16, 16, generator=g).tolist(), "labels": [0, 1, 2, 0, 1, 2, 0, 1]}
    ).with_format("torch")
    teacher = vit_with()
    teacher.eval()
    student = PlainStudentCNN()
    terms = [{"name": "sp", "weight": 100.0, "student_module": "global_pool", "teacher_layer": -1, "pooling": "cls"}]

    def task_loss(outputs, labels, num_items_in_batch=None):
        return torch.nn.functional.cross_entropy(outputs, labels)

    args = _config(tmp_path, terms=terms, max_steps=1, optim="sgd", temperature=1.0)
    batch = {"pixel_values": data[:4]["pixel_values"], "labels": data[:4]["labels"]}
    with torch.no_grad():
        s_logits = student(batch["pixel_values"]).double()
        out = teacher(pixel_values=batch["pixel_values"], output_hidden_states=True)
        t_logits, t_cls = out.logits.double(), out.hidden_states[-1][:, 0].double()
        s_pool = student.global_pool(student.features(batch["pixel_values"])).flatten(1).double()
    ce = torch.nn.functional.cross_entropy(s_logits, batch["labels"]).item()
    p_t = t_logits.softmax(-1)
    kl = (p_t * (p_t.log() - s_logits.log_softmax(-1))).sum(-1).mean().item()
    g_s, g_t = s_pool @ s_pool.T, t_cls @ t_cls.T
    g_s, g_t = g_s / g_s.norm(dim=1, keepdim=True), g_t / g_t.norm(dim=1, keepdim=True)
    sp = ((g_s - g_t) ** 2).sum().item() / 16
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=data, compute_loss_func=task_loss
    )
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * kl + 100.0 * sp, rel=1e-5)
    before = copy.deepcopy(student.state_dict())
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["task"] > 0 and entry["distill/logit"] > 0 and entry["distill/sp"] > 0
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def _attention_reference(student, teacher, batch) -> float:
    """float64, from the definition: KL(teacher || student) per kept query row, between head-averaged maps, over
    the uniform layer map (student layer k -> teacher layer round((k + 1) * L_t / L_s) - 1), averaged over pairs."""
    with torch.no_grad():
        s_maps = student(**batch, output_attentions=True).attentions
        t_maps = teacher(**batch, output_attentions=True).attentions
    mask = batch["attention_mask"].numpy().astype(bool)
    pairs = [(k, round((k + 1) * len(t_maps) / len(s_maps)) - 1) for k in range(len(s_maps))]
    total = 0.0
    for s_idx, t_idx in pairs:
        s = s_maps[s_idx].double().mean(1).numpy()
        t = t_maps[t_idx].double().mean(1).numpy()
        value, count = 0.0, 0
        for b in range(s.shape[0]):
            for q in range(s.shape[1]):
                if not mask[b, q]:
                    continue
                count += 1
                for k in range(s.shape[2]):
                    if t[b, q, k] > 0:
                        value += t[b, q, k] * (np.log(t[b, q, k]) - np.log(s[b, q, k]))
        total += value / count
    return total / len(pairs)


def test_attention_between_other_head_counts_compares_head_averaged_maps(tmp_path):
    data = classification_data(n=4)
    student, teacher = bert(heads=2, layers=2, dropout=0.0, seed=1), bert(heads=4, dropout=0.0)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
    with torch.no_grad():  # sharper teacher maps: a KL far above float32's resolution (random maps give ~3e-5)
        for layer in teacher.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(30.0)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=_config(tmp_path, attention_weight=1.0, per_device_eval_batch_size=4),
        train_dataset=data,
        eval_dataset=data,
    )
    metrics = trainer.evaluate()
    expected = _attention_reference(student.eval(), teacher.eval(), {k: v for k, v in _collate(data).items()})
    assert expected > 1e-3
    assert metrics["eval_distill/attention"] == pytest.approx(expected, rel=1e-5)  # float32 maps
    with pytest.raises(ValueError, match="attention_heads must be"):
        _config(tmp_path, attention_heads="max")


def test_predict_and_student_only_evaluation_never_run_the_teacher(tmp_path):
    data = classification_data(n=8)
    teacher = bert(dropout=0.0)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    student = bert(layers=2, dropout=0.0, seed=1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path), train_dataset=data, eval_dataset=data
    )
    calls.clear()
    prediction = trainer.predict(data)
    assert not calls
    with torch.no_grad():
        logits = student.eval()(**{k: v for k, v in _collate(data, 8).items() if k != "labels"}).logits
    np.testing.assert_allclose(prediction.predictions, logits.numpy(), rtol=1e-5, atol=1e-6)
    # By default evaluation runs the teacher and eval_loss is the weighted objective ...
    with_teacher = trainer.evaluate()
    assert calls and "eval_distill/logit" in with_teacher
    # ... and with eval_with_teacher=False it is the student's own loss, as plain Trainer reports it.
    calls.clear()
    trainer.args.eval_with_teacher = False
    alone = trainer.evaluate()
    assert not calls and "eval_distill/logit" not in alone
    plain = Trainer(model=student, args=TrainingArguments(output_dir=str(tmp_path / "plain"), **COMMON))
    assert alone["eval_loss"] == pytest.approx(plain.evaluate(data)["eval_loss"], rel=1e-6)
    assert alone["eval_task"] == pytest.approx(alone["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------- whose token ids
WORDS = "hello world the quick brown fox jumps over lazy dogs naïve café straße 13 , ! ; .".split()


def _word_tokenizer(words):
    """A fast word-level tokenizer over `words` (ids in that order after 5 specials), built here with `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials + list(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


@pytest.fixture
def two_tokenizers(tmp_path):
    """A teacher folder holding its weights and its own tokenizer, and a student tokenizer in another folder whose
    ids differ (the same words, in reverse order)."""
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "student_tokenizer"
    bert().save_pretrained(teacher_dir)
    _word_tokenizer(WORDS).save_pretrained(teacher_dir)
    _word_tokenizer(WORDS[::-1]).save_pretrained(student_dir)
    return teacher_dir, student_dir


def test_a_teacher_with_another_tokenizer_is_refused_not_fed_the_students_ids(tmp_path, two_tokenizers):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    teacher_dir, student_dir = two_tokenizers
    student_tokenizer = AutoTokenizer.from_pretrained(student_dir)
    out = tmp_path / "out"
    # The teacher by path, and the same teacher loaded first: both know where their tokenizer lives.
    for teacher in (str(teacher_dir), AutoModelForSequenceClassification.from_pretrained(teacher_dir)):
        with pytest.raises(ValueError, match="has its own tokenizer") as caught:
            DistillationTrainer(
                model=bert(seed=1, layers=2),
                teacher_model=teacher,
                args=_config(tmp_path),
                train_dataset=classification_data(),
                processing_class=student_tokenizer,
            )
        message = str(caught.value)
        assert str(teacher_dir) in message and str(student_dir) in message
        assert "teacher_processing_class=" in message and "student_model_name_or_path" in message
        assert not out.exists()
    # Told the teacher's tokenizer, hfkd tokenizes for both: no refusal.
    DistillationTrainer(
        model=bert(seed=1, layers=2),
        teacher_model=str(teacher_dir),
        args=_config(tmp_path),
        processing_class=student_tokenizer,
        teacher_processing_class=str(teacher_dir),
    )


def test_a_teacher_with_the_students_tokenizer_passes(tmp_path, two_tokenizers, caplog):
    from transformers import AutoTokenizer

    teacher_dir, _ = two_tokenizers
    copy_dir = tmp_path / "a_copy"
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(copy_dir)
    for tokenizer_dir in (teacher_dir, copy_dir):  # the very files, and the same tokenizer saved elsewhere
        with caplog.at_level("WARNING"):
            DistillationTrainer(
                model=bert(seed=1, layers=2),
                teacher_model=str(teacher_dir),
                args=_config(tmp_path),
                train_dataset=classification_data(),
                processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
            )
        assert not [r for r in caplog.records if "tokenizer" in r.getMessage()]


def test_a_teacher_without_a_tokenizer_of_its_own_gets_one_warning_line(tmp_path, two_tokenizers, caplog):
    from transformers import AutoTokenizer

    _, student_dir = two_tokenizers
    bare = tmp_path / "bare_teacher"
    bert().save_pretrained(bare)  # weights and config only
    with caplog.at_level("WARNING"):
        DistillationTrainer(
            model=bert(seed=1, layers=2),
            teacher_model=str(bare),
            args=_config(tmp_path),
            train_dataset=classification_data(),
            processing_class=AutoTokenizer.from_pretrained(student_dir),
        )
    lines = [r.getMessage() for r in caplog.records if "no tokenizer of its own" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "teacher_processing_class" in lines[0]


def test_a_hub_teacher_whose_tokenizer_is_not_cached_yet_is_still_compared(tmp_path, two_tokenizers, monkeypatch):
    """Loading a model from the Hub leaves its weights in the cache, not its tokenizer: hfkd fetches the tokenizer's
    files (users have network) instead of warning that there is none. The Hub is stood in for by the teacher folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hfkd import two_tokenizers as module

    teacher_dir, student_dir = two_tokenizers
    repo = "someone/teacher-on-the-hub"
    fetched = []
    monkeypatch.setattr(module, "_hub_file", lambda repo_id, name: fetched.append((repo_id, name)) or repo_id == repo)
    load = AutoTokenizer.from_pretrained.__func__
    monkeypatch.setattr(
        AutoTokenizer,
        "from_pretrained",
        classmethod(lambda cls, name, *a, **k: load(cls, str(teacher_dir) if name == repo else name, *a, **k)),
    )
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    teacher.name_or_path = teacher.config._name_or_path = repo  # as if loaded from the Hub
    with pytest.raises(ValueError, match="has its own tokenizer") as caught:
        DistillationTrainer(
            model=bert(seed=1, layers=2),
            teacher_model=teacher,
            args=_config(tmp_path),
            train_dataset=classification_data(),
            processing_class=AutoTokenizer.from_pretrained(student_dir),
        )
    assert repo in str(caught.value) and (repo, "tokenizer_config.json") in fetched


# ---------------------------------------------------------------------------------------------------- untrained heads
def test_a_teacher_whose_head_was_just_initialised_is_refused(tmp_path, caplog):
    from transformers import BertConfig, BertModel

    base = tmp_path / "base"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
    )
    BertModel(config).save_pretrained(base)  # a base checkpoint: no classifier
    two_labels = tmp_path / "two_labels"
    bert(labels=2).save_pretrained(two_labels)
    out = tmp_path / "out"
    for source, init_kwargs in (
        (base, {"num_labels": 3}),
        (two_labels, {"num_labels": 3, "ignore_mismatched_sizes": True}),
    ):
        with pytest.raises(ValueError, match="initialised at random on loading") as caught:
            DistillationTrainer(
                model=bert(seed=1, layers=2),
                teacher_model=str(source),
                args=_config(tmp_path, teacher_model_init_kwargs=init_kwargs),
                train_dataset=classification_data(),
            )
        message = str(caught.value)
        assert "classifier.weight" in message and "['logit']" in message and "--finetune_teacher true" in message
        assert not out.exists()
    # A head of another size without ignore_mismatched_sizes is a clear error too, not transformers' RuntimeError.
    with pytest.raises(ValueError, match="Could not load the teacher"):
        DistillationTrainer(
            model=bert(seed=1, layers=2),
            teacher_model=str(two_labels),
            args=_config(tmp_path, teacher_model_init_kwargs={"num_labels": 3}),
            train_dataset=classification_data(),
        )
    # Terms that read only features do not use the head: the teacher is taken.
    DistillationTrainer(
        model=bert(seed=1, layers=2),
        teacher_model=str(base),
        args=_config(tmp_path, logit_weight=0.0, hidden_weight=1.0, teacher_model_init_kwargs={"num_labels": 3}),
        train_dataset=classification_data(),
    )
    # A checkpoint whose head loads whole is taken with the logit term.
    DistillationTrainer(
        model=bert(seed=1, layers=2, labels=2),
        teacher_model=str(two_labels),
        args=_config(tmp_path),
        train_dataset=classification_data(labels=2),
    )
