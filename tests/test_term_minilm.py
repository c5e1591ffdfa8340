"""The `minilm` term (MiniLMv2 self-attention relation distillation, Wang et al. 2021) against a float64 reference
written from the paper, known values, masks, gradients, bf16 autocast, module-name detection, and short trainer
runs with BERT and Llama students and teachers of other widths and head counts."""

import math

import numpy as np
import pytest
import torch
from tiny_models import COMMON, bert, classification_data, llama, lm_data, parameters_of
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

import hfkd.terms.minilm  # noqa: F401  (registers the term)
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.streams import ModelKind
from hfkd.terms import TERMS, Features, TermBatch
from hfkd.terms.minilm import auto_relation_heads, detect_qkv

KIND = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)
S_NAMES = ("s.q", "s.k", "s.v")
T_NAMES = ("t.q", "t.k", "t.v")


def _term(**options):
    cls = TERMS["minilm"]
    options = {"student_modules": list(S_NAMES), "teacher_modules": list(T_NAMES), **options}
    return cls(cls.Options(**options))


def _side(q, k, v, names):
    return Features(None, dict(zip(names, (q, k, v), strict=True)), KIND)


def _batch(mask, n):
    return TermBatch(labels=None, mask=mask, num_examples=n)


def _value(term, s, t, mask):
    return term(_side(*s, S_NAMES), _side(*t, T_NAMES), _batch(mask, s[0].shape[0]))


# ---------------------------------------------------------------------------------------------------- reference
def _ref_row_kl(a_t, a_s, t, keys, head, heads):
    """KL(R_T || R_S) of query position t in relation head `head`, over the key positions `keys`.

    a_t, a_s: [T, W] (one example's projections); each side's relation head is its own width / heads."""
    rows = []
    for a in (a_t, a_s):
        d = a.shape[1] // heads
        scores = []
        for j in keys:
            dot = 0.0
            for c in range(head * d, (head + 1) * d):
                dot += a[t, c] * a[j, c]
            scores.append(dot / math.sqrt(d))
        top = max(scores)
        exps = [math.exp(x - top) for x in scores]
        total = sum(exps)
        rows.append([e / total for e in exps])
    p_t, p_s = rows
    return sum(p * math.log(p / q) for p, q in zip(p_t, p_s, strict=True) if p > 0)


def _ref_minilm(s, t, mask, heads, relations=("qq", "kk", "vv")):
    """The paper's loss summed over the kept query positions (or, without a mask, the per-example mean)."""
    which = {"qq": 0, "kk": 1, "vv": 2}
    s = [x.numpy() for x in s]
    t = [x.numpy() for x in t]
    batch, length = s[0].shape[:2]
    keep = mask.numpy() if mask is not None else np.ones((batch, length), dtype=bool)
    total = 0.0
    for b in range(batch):
        keys = [j for j in range(length) if keep[b, j]]
        example = 0.0
        for relation in relations:
            a_s, a_t = s[which[relation]][b], t[which[relation]][b]
            for i in keys:  # query positions that count
                example += sum(_ref_row_kl(a_t, a_s, i, keys, h, heads) for h in range(heads)) / heads
        total += example if mask is not None else example / length
    return total


def _inputs(widths, batch=3, length=5, seed=0, scale=1.5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(batch, length, w, generator=g, dtype=dtype) for w in widths)


def _ragged_mask(batch=3, length=5):
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, 3:] = False  # right padding
    if batch > 2:
        mask[2, :2] = False  # left padding
    return mask


# Student: 2 heads of 6 (q 12 wide) with grouped-query keys/values 6 wide; teacher: q and k 24 wide, v 12 wide.
S_WIDTHS, T_WIDTHS = (12, 6, 6), (24, 24, 12)


@pytest.mark.parametrize(
    "heads, relations, masked",
    [(3, ("qq", "kk", "vv"), True), (1, ("qq", "kk", "vv"), True), (6, ("kk", "vv"), True), (3, ("vv",), False)],
)
def test_matches_the_float64_reference(heads, relations, masked):
    s, t = _inputs(S_WIDTHS, seed=0), _inputs(T_WIDTHS, seed=1)
    mask = _ragged_mask() if masked else None
    value = _value(_term(relation_heads=heads, relations=list(relations)), s, t, mask)
    expected = _ref_minilm(s, t, mask, heads, relations)
    assert value.dtype == torch.float64 and expected > 1e-3
    np.testing.assert_allclose(value.item(), expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------- known values
def test_identical_projections_give_zero():
    s = _inputs((12, 12, 12), seed=3)
    value = _value(_term(relation_heads=4), s, s, _ragged_mask())
    assert value.item() == 0.0


def test_same_relations_at_another_width_give_zero():
    """Teacher relation head [x, x] / 2^(1/4) (width 2 d_r) has the scores of the student's x (width d_r)."""
    s = _inputs((8, 8, 8), seed=4)
    heads = 2
    t = []
    for x in s:
        parts = x.reshape(*x.shape[:2], heads, -1)
        t.append(torch.cat([parts, parts], dim=-1).reshape(*x.shape[:2], -1) / 2**0.25)
    value = _value(_term(relation_heads=heads), s, tuple(t), _ragged_mask())
    assert abs(value.item()) < 1e-14


def test_hand_computed_case():
    """T = 2, width 1, one relation head, queries only. Student q = (1, 0): its score rows are (1, 0) and (0, 0);
    teacher q = (0, 0): uniform rows. KL(uniform || softmax(1, 0)) = log((1 + e) / 2) - 1/2, and 0 for row 2."""
    s = (torch.tensor([[[1.0], [0.0]]], dtype=torch.float64),) + (torch.zeros(1, 2, 1, dtype=torch.float64),) * 2
    t = (torch.zeros(1, 2, 1, dtype=torch.float64),) * 3
    term = _term(relation_heads=1, relations=["qq"])
    expected = math.log((1 + math.e) / 2) - 0.5
    kept = torch.ones(1, 2, dtype=torch.bool)
    assert _value(term, s, t, kept).item() == pytest.approx(expected, rel=1e-12)  # a sum over the 2 positions
    assert _value(term, s, t, None).item() == pytest.approx(expected / 2, rel=1e-12)  # the example's mean
    # Position 2 padded: query 1 attends to key 1 only (probability 1 on both sides) and query 2 never counts.
    assert _value(term, s, t, torch.tensor([[True, False]])).item() == 0.0
    # All three relations: the keys and values are zero for both, so only the queries differ.
    assert _value(_term(relation_heads=1), s, t, kept).item() == pytest.approx(expected, rel=1e-12)


def test_relations_sum_and_examples_add_up():
    s, t = _inputs(S_WIDTHS, seed=5), _inputs(T_WIDTHS, seed=6)
    mask = _ragged_mask()
    parts = sum(_value(_term(relation_heads=3, relations=[r]), s, t, mask) for r in ("qq", "kk", "vv"))
    whole = _value(_term(relation_heads=3), s, t, mask)
    torch.testing.assert_close(whole, parts, rtol=1e-12, atol=0)
    rows = sum(
        _value(_term(relation_heads=3), [x[i : i + 1] for x in s], [x[i : i + 1] for x in t], mask[i : i + 1])
        for i in range(3)
    )
    torch.testing.assert_close(whole, rows, rtol=1e-12, atol=0)  # a sum over positions, not a mean


# ---------------------------------------------------------------------------------------------------- masks, grads
def test_padding_never_counts_even_when_it_holds_nan():
    s, t = _inputs(S_WIDTHS, seed=7), _inputs(T_WIDTHS, seed=8)
    mask = _ragged_mask()
    s = [x.clone().requires_grad_(True) for x in s]
    value = _value(_term(relation_heads=3), s, t, mask)
    value.backward()
    for x in s:
        assert torch.all(x.grad[~mask] == 0) and torch.isfinite(x.grad).all()
    garbage_s = [x.detach().masked_fill(~mask[..., None], float("nan")) for x in s]
    garbage_t = [x.masked_fill(~mask[..., None], 1e4) for x in t]
    again = _value(_term(relation_heads=3), garbage_s, garbage_t, mask)
    torch.testing.assert_close(again, value.detach(), rtol=1e-12, atol=0)


def test_gradcheck_float64():
    s, t = _inputs((4, 2, 2), batch=2, length=3, seed=9), _inputs((6, 6, 2), batch=2, length=3, seed=10)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    term = _term(relation_heads=2)
    s = tuple(x.requires_grad_(True) for x in s)
    assert torch.autograd.gradcheck(lambda q, k, v: _value(term, (q, k, v), t, mask), s, fast_mode=True)


def test_gradients_are_finite_at_a_perfect_match_and_the_teacher_gets_none():
    s = _inputs((8, 8, 8), seed=11)
    student = [x.clone().requires_grad_(True) for x in s]
    teacher = [x.clone().requires_grad_(True) for x in s]
    value = _value(_term(relation_heads=2), student, teacher, _ragged_mask())
    value.backward()
    assert value.item() == 0.0
    for x in student:
        assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1e-12
    assert all(x.grad is None for x in teacher)


def test_bf16_autocast_is_finite_and_close_to_float32():
    s, t = (
        _inputs((32, 16, 16), batch=2, length=8, seed=12, dtype=torch.float32),
        _inputs((64, 32, 32), batch=2, length=8, seed=13, dtype=torch.float32),
    )
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    term = _term(relation_heads=4)
    reference = _value(term, s, t, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _value(term, [x.bfloat16().requires_grad_(True) for x in s], [x.bfloat16() for x in t], mask)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    torch.testing.assert_close(low, reference, rtol=5e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------- module names
def _names(model):
    return [name for name, _ in model.named_modules()]


def test_detects_bert_and_llama_projections_from_module_names():
    assert detect_qkv(_names(bert(hidden=16, layers=2, heads=2)), -1, None, "student") == (
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.value",
    )
    base = BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=3, num_attention_heads=2))
    assert detect_qkv(_names(base), 0, "bert", "teacher")[0] == "encoder.layer.0.attention.self.query"
    assert detect_qkv(_names(base), -2, None, "teacher")[2] == "encoder.layer.1.attention.self.value"
    assert detect_qkv(_names(llama()), -1, "llama", "teacher") == (
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.k_proj",
        "model.layers.1.self_attn.v_proj",
    )
    bare = LlamaModel(LlamaConfig(vocab_size=20, hidden_size=8, num_hidden_layers=2, num_attention_heads=2))
    assert detect_qkv(_names(bare), 1, None, "student")[1] == "layers.1.self_attn.k_proj"
    with pytest.raises(ValueError, match=r"student_layer=-3 refers to no layer of the student, which has 2"):
        detect_qkv(_names(bare), -3, None, "student")
    with pytest.raises(ValueError, match=r"match the 'bert' pattern; give student_modules"):
        detect_qkv(_names(bare), -1, "bert", "student")


def test_detection_refuses_two_attention_stacks():
    names = [f"model.{part}.layers.0.self_attn.{p}" for part in ("encoder", "decoder") for p in ("q", "k", "v")]
    names = [n + "_proj" for n in names]
    with pytest.raises(ValueError, match=r"several attention stacks .*give teacher_modules"):
        detect_qkv(names, -1, None, "teacher")


def test_names_from_the_architecture_table_and_explicit_names():
    cls = TERMS["minilm"]
    term = cls(cls.Options(architecture="llama", teacher_layer=3, student_layer=1, relations=["kk", "vv"]))
    needs = term.needs()
    assert needs.student_modules == ("model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj")
    assert needs.teacher_modules == ("model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj")
    mixed = cls(cls.Options(architecture="bert", student_layer=0, teacher_modules="a.q, a.k, a.v"))
    assert mixed.needs().teacher_modules == ("a.q", "a.k", "a.v")
    with pytest.raises(ValueError, match=r"teacher_layer=-1 counts from the end.*non-negative"):
        cls(cls.Options(architecture="bert", student_layer=0)).needs()
    with pytest.raises(ValueError, match=r"Give student_modules = \[query, key, value\].*or architecture"):
        cls(cls.Options()).needs()


# ---------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "options, message",
    [
        ({"relation_heads": 0}, r"relation_heads must be an integer >= 1"),
        ({"relation_heads": True}, r"relation_heads must be an integer >= 1"),
        (
            {"relation_heads": "paper"},
            r'relation_heads must be an integer >= 1 or "auto", got \'paper\' \(the paper: 48',
        ),
        ({"teacher_layer": 1.5}, r"teacher_layer must be an integer"),
        ({"student_layer": "last"}, r"student_layer must be an integer"),
        ({"relations": ["qq", "qk"]}, r"'qk' is not a relation"),
        ({"relations": []}, r"relations must be a non-empty list"),
        ({"relations": "vv,vv"}, r"gives 'vv' twice"),
        ({"architecture": "gpt2"}, r"architecture='gpt2' is not known"),
        ({"student_modules": ["a", "b"]}, r"student_modules must be the three submodule names"),
        ({"heads": 4}, r"term 'minilm' has no option 'heads'"),
    ],
)
def test_bad_options_fail_at_config_time(options, message):
    with pytest.raises(ValueError, match=message):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "minilm", **options}])


# ---------------------------------------------------------------------------------------------------- trainer
def _bert_trainer(tmp_path, term, **overrides):
    values = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    values = {"task_weight": 0.5, "logit_weight": 0.5, **COMMON, **values, **overrides}
    args = DistillationConfig(output_dir=str(tmp_path / "out"), terms=[term], **values)
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())


def _check_logs(trainer, weight):
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs
    for entry in logs:
        assert {"task", "distill/logit", "distill/minilm"} <= set(entry)
        assert entry["distill/minilm"] > 0
        total = 0.5 * entry["task"] + 0.5 * entry["distill/logit"] + weight * entry["distill/minilm"]
        assert entry["loss"] == pytest.approx(total, rel=1e-4)


def test_trainer_bert_4_head_teacher_2_head_student(tmp_path):
    term = {"name": "minilm", "weight": 2.0, "relation_heads": 4, "architecture": "bert"}
    trainer = _bert_trainer(tmp_path, {**term, "teacher_layer": 3, "student_layer": 1})
    needs = trainer.term_set.needs()
    assert needs.teacher_modules == tuple(
        f"bert.encoder.layer.3.attention.self.{p}" for p in ("query", "key", "value")
    )
    assert needs.student_modules[0] == "bert.encoder.layer.1.attention.self.query"
    before = parameters_of(trainer.model)
    trainer.train()
    _check_logs(trainer, 2.0)
    after = parameters_of(trainer.model)
    assert not torch.equal(
        before["bert.encoder.layer.1.attention.self.key.weight"],
        after["bert.encoder.layer.1.attention.self.key.weight"],
    )


def test_trainer_tiny_llamas_with_grouped_query_attention(tmp_path):
    """llama(): 4 query and 2 key-value heads, so the key/value relations are half as wide as the query ones."""
    values = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    term = {
        "name": "minilm",
        "weight": 1.0,
        "relation_heads": 4,
        "architecture": "llama",
        "student_layer": 1,
        "teacher_modules": [f"model.layers.3.self_attn.{p}_proj" for p in "qkv"],
    }
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"), terms=[term], task_weight=0.5, logit_weight=0.5, **{**COMMON, **values}
    )
    trainer = DistillationTrainer(
        model=llama(hidden=16, layers=2, seed=1),
        teacher_model=llama(hidden=32, layers=4, seed=2),
        args=args,
        train_dataset=lm_data(),
    )
    trainer.train()
    _check_logs(trainer, 1.0)
    bad = DistillationConfig(
        output_dir=str(tmp_path / "bad"), terms=[{**term, "relation_heads": 16}], **{**COMMON, **values}
    )
    with pytest.raises(ValueError, match=r"relation_heads=16 does not divide the student's kk width 8 \(with grouped"):
        DistillationTrainer(
            model=llama(hidden=16, layers=2, seed=1),
            teacher_model=llama(hidden=32, layers=4, seed=2),
            args=bad,
            train_dataset=lm_data(),
        )


def test_trainer_accumulation_equals_one_big_batch(tmp_path):
    """A sum over positions that the trainer divides by the whole window's count: 8 x 1 equals 2 x 4 (the term
    alone, strongly weighted, so that a per-micro-batch mean would show)."""
    term = {
        "name": "minilm",
        "weight": 1e4,
        "relation_heads": 4,
        "architecture": "bert",
        "teacher_layer": 3,
        "student_layer": 1,
    }
    common = {"max_steps": 1, "optim": "sgd", "learning_rate": 1.0, "task_weight": 0.0, "logit_weight": 0.0}
    one = _bert_trainer(tmp_path / "one", term, per_device_train_batch_size=8, **common)
    before = parameters_of(one.model)
    one.train()
    four = _bert_trainer(
        tmp_path / "four", term, per_device_train_batch_size=2, gradient_accumulation_steps=4, **common
    )
    four.train()
    key = "bert.encoder.layer.1.attention.self.query.weight"
    assert (parameters_of(one.model)[key] - before[key]).abs().max() > 1e-3  # the step moved the student
    for name, value in parameters_of(one.model).items():
        torch.testing.assert_close(value, parameters_of(four.model)[name], rtol=1e-5, atol=1e-6)


def test_auto_relation_heads_gives_the_papers_counts_and_divides_small_widths():
    assert auto_relation_heads(768, [768, 768]) == 48  # MiniLMv2, base-size teacher
    assert auto_relation_heads(1024, [1024, 1024]) == 64  # large-size teacher
    assert auto_relation_heads(768, [768, 384]) == 48  # a 384-wide student of a base teacher: d_r 8 there
    assert auto_relation_heads(384, [384, 384]) == 24  # all-MiniLM-L6-v2 (the tweets pair of benchmarks/methods.py)
    assert auto_relation_heads(768, [768, 256]) == 32  # 48 would not divide 256
    assert auto_relation_heads(32, [32, 32, 16, 16]) == 2  # the tiny BERTs here: 12 divides neither width
    assert auto_relation_heads(24, [24, 24, 12, 6, 6, 12]) == 1  # S_WIDTHS / T_WIDTHS: the teacher is < 32 wide
    assert auto_relation_heads(8, [8, 8]) == 1


def test_default_relation_heads_are_auto_resolved_from_the_widths():
    s, t = _inputs((32, 32, 32), seed=3), _inputs((64, 64, 64), seed=4)
    term = _term()
    assert term.options.relation_heads == "auto"
    value = _value(term, s, t, _ragged_mask())
    assert term._auto_heads == 4  # gcd 32, teacher 64 / 4 = 16
    np.testing.assert_allclose(value.item(), _ref_minilm(s, t, _ragged_mask(), 4), rtol=1e-10)


def test_trainer_default_relation_heads_divide_the_tiny_widths(tmp_path):
    """12 divides neither 16 nor 32; the default picks 2 (teacher 32 / 2 = 16) and trains."""
    trainer = _bert_trainer(
        tmp_path, {"name": "minilm", "weight": 2.0, "architecture": "bert", "teacher_layer": 3, "student_layer": 1}
    )
    trainer.train()
    assert trainer.term_set.terms["minilm"]._auto_heads == 2
    _check_logs(trainer, 2.0)


def test_trainer_construction_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match=r"relation_heads=3 does not divide the student's qq width 16"):
        _bert_trainer(
            tmp_path / "c",
            {"name": "minilm", "relation_heads": 3, "architecture": "bert", "teacher_layer": 0, "student_layer": 0},
        )
    with pytest.raises(ValueError, match=r"minilm: teacher_layer=9 refers to no layer of the teacher, which has 4"):
        _bert_trainer(
            tmp_path / "d",
            {"name": "minilm", "relation_heads": 4, "architecture": "bert", "teacher_layer": 9, "student_layer": 0},
        )


def test_trainer_with_module_names_bound_before_needs(tmp_path):
    """The trainer passes both models' module names to the terms right after building them (Term.bind_module_names),
    so the defaults (auto-detected family, last layers) work without any module name in the config."""
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    values = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        terms=[{"name": "minilm", "relation_heads": 4}],
        task_weight=0.5,
        logit_weight=0.5,
        **{**COMMON, **values},
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())
    needs = trainer.term_set.needs()
    assert needs.student_modules[0] == "bert.encoder.layer.1.attention.self.query"
    assert needs.teacher_modules[0] == "bert.encoder.layer.3.attention.self.query"
    trainer.train()
    _check_logs(trainer, 1.0)
