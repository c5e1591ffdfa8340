"""A teacher and a student with different tokenizers (hfkd.two_tokenizers, hfkd.alignment, span_kd, uld, hidden over
spans) and bits per byte (hfkd.lm_eval), on tiny tokenizers trained here and tiny models built from configs."""

import math
import os

import pytest
import torch
from datasets import Dataset
from tiny_models import llama
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hfkd import DistillationConfig, DistillationTrainer, TwoTokenizerCollator, bits_per_byte, tokenize_for_both
from hfkd.batch import SPANS, TEACHER_SPANS

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a distilled student learns from its teacher",
    "tokenizers cut words into pieces, don't they?",
    "unbelievable results were reported today",
    "hello world, again and again",
    "students and teachers read the same text",
]


def byte_bpe(vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        TEXTS, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<eos>"], initial_alphabet=alphabet)
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def wordpiece(vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        TEXTS, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def llama_classifier(vocab: int, seed: int) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=2,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def bert_classifier(vocab: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def tokenizers():
    return {"bpe_small": byte_bpe(300), "bpe_large": byte_bpe(400), "wordpiece": wordpiece(200)}


def config(tmp_path, name="run", **kwargs) -> DistillationConfig:
    base = dict(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=3,
        per_device_eval_batch_size=6,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_drop_last=False,
    )
    base.update(kwargs)
    return DistillationConfig(**base)


# ---------------------------------------------------------------------------------------------------- data path
def test_spans_cover_the_same_text_on_both_sides(tokenizers):
    student, teacher = tokenizers["wordpiece"], tokenizers["bpe_large"]
    for text in TEXTS:
        row = tokenize_for_both({"text": text}, student, teacher)
        s_off = student(text, return_offsets_mapping=True)["offset_mapping"]
        t_off = teacher(text, return_offsets_mapping=True)["offset_mapping"]
        spans = max(row[SPANS]) + 1
        assert spans == max(row[TEACHER_SPANS]) + 1 and spans >= len(text.split())
        previous_end = 0
        for k in range(spans):
            s_tokens = [i for i, v in enumerate(row[SPANS]) if v == k]
            t_tokens = [j for j, v in enumerate(row[TEACHER_SPANS]) if v == k]
            assert s_tokens == list(range(s_tokens[0], s_tokens[-1] + 1))  # consecutive tokens
            end = s_off[s_tokens[-1]][1]
            assert t_off[t_tokens[-1]][1] == end  # both sides stop at the same character
            # Between two span ends, each side's tokens spell the same text up to spaces (lower case: WordPiece).
            s_text = "".join(text[a:b] for a, b in (s_off[i] for i in s_tokens))
            t_text = "".join(text[a:b] for a, b in (t_off[j] for j in t_tokens)).replace(" ", "")
            assert s_text.lower() == t_text.lower() == text[previous_end:end].replace(" ", "").lower()
            previous_end = end
        # [CLS] and [SEP] spell no text: in no span.
        assert row[SPANS][0] == -1 and row[SPANS][-1] == -1


def test_collator_pads_both_sides_and_text_rows_equal_mapped_rows(tokenizers):
    student, teacher = tokenizers["bpe_small"], tokenizers["bpe_large"]
    rows = [{"prompt": "the quick brown", "completion": " fox jumps"}, {"text": TEXTS[3]}]
    collator = TwoTokenizerCollator(student, teacher, causal_lm=True)
    from_text = collator(rows)
    mapped = [tokenize_for_both(r, student, teacher, causal_lm=True) for r in rows]
    from_mapped = collator(mapped)
    assert from_text.keys() == from_mapped.keys()
    for key in from_text:
        assert torch.equal(from_text[key], from_mapped[key]), key
    batch = from_text
    s_len = [len(m["input_ids"]) for m in mapped]
    t_len = [len(m["teacher_input_ids"]) for m in mapped]
    assert batch["input_ids"].shape == (2, max(s_len)) and batch["teacher_input_ids"].shape == (2, max(t_len))
    short = s_len.index(min(s_len))
    assert batch["attention_mask"][short].tolist() == [1] * min(s_len) + [0] * (max(s_len) - min(s_len))
    assert batch["labels"][short, min(s_len) :].eq(-100).all() and batch[SPANS][short, min(s_len) :].eq(-1).all()
    # Prompt tokens are never a target nor in a span; the completion's are both.
    ids = student("the quick brown")["input_ids"]
    assert batch["labels"][0, : len(ids)].eq(-100).all()
    assert batch["labels"][0, len(ids) : s_len[0]].tolist() == batch["input_ids"][0, len(ids) : s_len[0]].tolist()
    assert batch[SPANS][0, : len(ids)].eq(-1).all() and batch[SPANS][0, len(ids) : s_len[0]].ge(0).all()
    # A text row: every token but the first (no logit predicts it) is a target of some span.
    assert batch[SPANS][1, 0] == -1 and batch[TEACHER_SPANS][1, 0] == -1


# ---------------------------------------------------------------------------------------------------- exactness
def test_span_kd_on_one_tokenizer_equals_the_logit_term(tmp_path, tokenizers):
    """One tokenizer on both sides: one token per span, every id matched, so span_kd at T is the logit term's
    T^2 KL per predicted token (same positions, same count)."""
    tok = tokenizers["bpe_large"]
    student, teacher = (
        llama(hidden=16, layers=1, vocab=len(tok), seed=0),
        llama(hidden=32, layers=2, vocab=len(tok), seed=1),
    )
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # a confident teacher: a KL far from zero
    data = Dataset.from_dict({"text": TEXTS})
    two = DistillationTrainer(
        model=student,
        args=config(tmp_path, "two", logit_weight=0, terms=[{"name": "span_kd", "temperature": 2.0}]),
        teacher_model=teacher,
        eval_dataset=data,
        processing_class=tok,
        teacher_processing_class=tok,
    )
    spans = two.evaluate()["eval_distill/span_kd"]

    tokenized = data.map(lambda r: {**tok(r["text"]), "labels": tok(r["text"])["input_ids"]}, remove_columns=["text"])
    from transformers import DataCollatorForSeq2Seq

    one = DistillationTrainer(
        model=student,
        args=config(tmp_path, "one", logit_weight=1.0, temperature=2.0),
        teacher_model=teacher,
        eval_dataset=tokenized,
        processing_class=tok,
        data_collator=DataCollatorForSeq2Seq(tok, label_pad_token_id=-100),
    )
    logit = one.evaluate()["eval_distill/logit"]
    assert logit > 0.1
    assert spans == pytest.approx(logit, rel=1e-5)


def _reference_hidden_and_sp(trainer, batch, student, teacher):
    """float64: the last layer of each model averaged over each span's tokens (by the batch's span ids), the student's
    through the term's projection, MSE per span averaged over features, summed over spans / spans; and SP with
    each model's mean over its own attention mask."""
    term = trainer.term_set.terms["hidden"]
    weight, bias = (p.detach().double() for p in next(iter(term.projector.layers.values())).parameters())
    s_out = student.double()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
    )
    t_out = teacher.double()(
        input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"], output_hidden_states=True
    )
    s_last, t_last = s_out.hidden_states[-1], t_out.hidden_states[-1]
    total, count = 0.0, 0
    for b in range(s_last.shape[0]):
        spans = batch[SPANS][b].tolist()
        for k in range(max(spans) + 1):
            s_rows = [s_last[b, i] for i, v in enumerate(spans) if v == k]
            t_rows = [t_last[b, j] for j, v in enumerate(batch[TEACHER_SPANS][b].tolist()) if v == k]
            s_mean = sum(s_rows) / len(s_rows) @ weight.T + bias
            t_mean = sum(t_rows) / len(t_rows)
            total += float(((s_mean - t_mean) ** 2).mean())
            count += 1
    hidden = total / count

    def pooled(states, mask):
        m = mask.double()[..., None]
        return (states * m).sum(1) / m.sum(1)

    def sim(q):
        g = q @ q.T
        return g / g.norm(dim=1, keepdim=True)

    q_s = pooled(s_last, batch["attention_mask"])
    q_t = pooled(t_last, batch["teacher_attention_mask"])
    sp = float(((sim(q_t) - sim(q_s)) ** 2).sum()) / q_s.shape[0] ** 2
    return hidden, sp


def test_hidden_over_spans_and_relations_with_the_teachers_own_mask(tmp_path, tokenizers):
    s_tok, t_tok = tokenizers["wordpiece"], tokenizers["bpe_large"]
    student, teacher = bert_classifier(len(s_tok), 0), llama_classifier(len(t_tok), 1)
    data = Dataset.from_dict({"text": TEXTS, "labels": [i % 2 for i in range(len(TEXTS))]})
    trainer = DistillationTrainer(
        model=student,
        args=config(tmp_path, hidden_weight=1.0, hidden_layer_map="last", terms=[{"name": "sp", "weight": 1.0}]),
        teacher_model=teacher,
        eval_dataset=data,
        processing_class=s_tok,
        teacher_processing_class=t_tok,
    )
    metrics = trainer.evaluate()
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    # Different lengths and padding on each side, so the teacher's own mask matters.
    assert batch["input_ids"].shape[1] != batch["teacher_input_ids"].shape[1]
    hidden, sp = _reference_hidden_and_sp(trainer, batch, student, teacher)
    assert metrics["eval_distill/hidden"] == pytest.approx(hidden, rel=1e-4)
    assert metrics["eval_distill/sp"] == pytest.approx(sp, rel=1e-4)
    assert metrics["eval_distill/logit"] > 0  # the label space is shared: the logit term works as usual


def test_span_counts_over_the_accumulation_window(tmp_path, tokenizers):
    """Gradient accumulation 2 x 3 equals one batch of 6: span_kd and uld divide by the spans of the whole window."""
    s_tok, t_tok = tokenizers["bpe_small"], tokenizers["bpe_large"]
    data = Dataset.from_dict({"text": TEXTS})
    results = {}
    for name, batch, accumulation in (("big", 6, 1), ("accumulated", 3, 2)):
        student = llama(hidden=16, layers=1, vocab=len(s_tok), seed=0)
        trainer = DistillationTrainer(
            model=student,
            args=config(
                tmp_path,
                name,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                logit_weight=0,
                task_weight=0,
                terms=[{"name": "span_kd"}, {"name": "uld", "weight": 2.0}],
            ),
            teacher_model=llama(hidden=32, layers=2, vocab=len(t_tok), seed=1),
            train_dataset=data,
            processing_class=s_tok,
            teacher_processing_class=t_tok,
        )
        before = {n: p.detach().clone() for n, p in student.named_parameters()}
        trainer.train()
        results[name] = {n: p.detach() for n, p in student.named_parameters()}
        moved = max(float((results[name][n] - before[n]).abs().max()) for n in before)
        assert moved > 1e-4
    for name, value in results["big"].items():
        torch.testing.assert_close(results["accumulated"][name], value, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "case,match",
    [
        ("no_teacher_tokenizer", "pass teacher_processing_class"),
        ("wrong_teacher_tokenizer", "is not the teacher's tokenizer"),
        ("logit_on_lm", "use the cross-tokenizer terms"),
        ("attention", "compare the two models token position by token position"),
        ("no_student_tokenizer", "pass the student's tokenizer as processing_class"),
        ("on_policy", "cannot be combined with lmbda > 0"),
        ("messages", "Render `messages` to text first"),
        ("slow", "not a fast tokenizer"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, tokenizers, case, match):
    s_tok, t_tok = tokenizers["bpe_small"], tokenizers["bpe_large"]
    teacher = llama(hidden=32, layers=2, vocab=len(t_tok), seed=1)
    data = Dataset.from_dict({"text": TEXTS})
    kwargs = dict(logit_weight=0, terms=[{"name": "span_kd"}])
    given = dict(processing_class=s_tok, teacher_processing_class=t_tok)
    if case == "no_teacher_tokenizer":
        data = data.map(
            lambda r: {**s_tok(r["text"]), "labels": s_tok(r["text"])["input_ids"]}, remove_columns=["text"]
        )
        from transformers import DataCollatorForSeq2Seq

        given = dict(processing_class=s_tok, data_collator=DataCollatorForSeq2Seq(s_tok, label_pad_token_id=-100))
    elif case == "wrong_teacher_tokenizer":
        teacher = llama(hidden=32, layers=2, vocab=len(s_tok) - 10, seed=1)
    elif case == "logit_on_lm":
        kwargs = dict(logit_weight=1.0)
    elif case == "attention":
        kwargs = dict(attention_weight=1.0, logit_weight=0, terms=[{"name": "span_kd"}])
    elif case == "no_student_tokenizer":
        given = dict(teacher_processing_class=t_tok)
    elif case == "on_policy":
        kwargs["lmbda"] = 0.5
    elif case == "messages":
        data = Dataset.from_dict(
            {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]]}
        )
    elif case == "slow":

        class Slow:
            is_fast = False
            pad_token_id = 0

            def __len__(self):
                return 10

        given["teacher_processing_class"] = Slow()
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(
            model=llama(hidden=16, layers=1, vocab=len(s_tok), seed=0),
            args=config(tmp_path, "out", **kwargs),
            teacher_model=teacher,
            train_dataset=data,
            **given,
        )
    assert not os.path.exists(out)


def test_a_missing_text_column_names_the_field_and_the_datasets_own_columns(tmp_path, tokenizers):
    """Checked against the data as given, not after Trainer dropped the columns the student's forward ignores."""
    s_tok, t_tok = tokenizers["wordpiece"], tokenizers["bpe_large"]
    data = Dataset.from_dict({"sentence": TEXTS, "labels": [i % 2 for i in range(len(TEXTS))]})
    with pytest.raises(
        ValueError, match=r"no 'text' column .* columns are \['sentence', 'labels'\]\. Set tokenize_text_col"
    ):
        DistillationTrainer(
            model=bert_classifier(len(s_tok), 0),
            args=config(tmp_path, "out"),
            teacher_model=llama_classifier(len(t_tok), 1),
            train_dataset=data,
            processing_class=s_tok,
            teacher_processing_class=t_tok,
        )
    assert not os.path.exists(tmp_path / "out")
    trainer = DistillationTrainer(  # the field it names is the fix
        model=bert_classifier(len(s_tok), 0),
        args=config(tmp_path, "out", tokenize_text_column="sentence"),
        teacher_model=llama_classifier(len(t_tok), 1),
        train_dataset=data,
        processing_class=s_tok,
        teacher_processing_class=t_tok,
    )
    assert trainer.train().global_step == 1


# ---------------------------------------------------------------------------------------------------- bits per byte
class Uniform(torch.nn.Module):
    """Every next token equally likely among `vocab`: each predicted token costs log2(vocab) bits."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.anchor)


def test_bits_per_byte_known_answer(tokenizers):
    tok = tokenizers["wordpiece"]  # [CLS] ... [SEP]: specials spell no text and count in neither sum
    texts = ["hello world", "unbelievable results were reported today"]
    bits, nbytes, tokens = 0.0, 0, 0
    for text in texts:
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        text_tokens = [i for i, (a, b) in enumerate(offsets) if a < b]  # position 0 is [CLS]: all are predicted
        tokens += len(text_tokens)
        nbytes += len(text[: offsets[text_tokens[-1]][1]].encode())
    bits = tokens * math.log2(len(tok))
    result = bits_per_byte(Uniform(len(tok)), tok, texts, batch_size=1)
    assert result["tokens"] == tokens and result["bytes"] == nbytes == sum(len(t) for t in texts)
    assert result["bits_per_byte"] == pytest.approx(bits / nbytes, rel=1e-6)
    assert result["perplexity"] == pytest.approx(len(tok), rel=1e-5)
    # Each text's own sums (for paired comparisons): log2(V) bits per predicted token, its covered bytes.
    per_text = [
        [i for i, (a, b) in enumerate(tok(t, return_offsets_mapping=True)["offset_mapping"]) if a < b] for t in texts
    ]
    assert result["text_bits"] == pytest.approx([len(p) * math.log2(len(tok)) for p in per_text], rel=1e-6)
    assert result["text_bytes"] == [len(t) for t in texts]
    # Without a BOS-like token the first token is never predicted: the covered text starts after it.
    bpe = tokenizers["bpe_large"]
    one = bits_per_byte(Uniform(len(bpe)), bpe, ["hello world"])
    first_end = bpe("hello world", return_offsets_mapping=True)["offset_mapping"][0][1]
    assert one["bytes"] == len("hello world") - first_end
    both = bits_per_byte(Uniform(len(bpe)), bpe, ["hello world", TEXTS[3]], batch_size=2)
    alone = bits_per_byte(Uniform(len(bpe)), bpe, ["hello world", TEXTS[3]], batch_size=1)
    # Padding counts in neither sum, nor in each text's own sums.
    for key in ("text_bits", "text_bytes"):
        assert both.pop(key) == pytest.approx(alone.pop(key), rel=1e-6)
    assert both == pytest.approx(alone, rel=1e-6)


def test_teacher_tokenizer_by_path_in_the_config(tmp_path, tokenizers):
    s_tok, t_tok = tokenizers["bpe_small"], tokenizers["bpe_large"]
    t_tok.save_pretrained(tmp_path / "teacher_tokenizer")
    teacher = llama(hidden=32, layers=2, vocab=len(t_tok), seed=1)
    data = Dataset.from_dict({"story": TEXTS})
    args = config(
        tmp_path,
        teacher_processing_class=str(tmp_path / "teacher_tokenizer"),
        tokenize_text_column="story",
        tokenize_max_length=5,
        logit_weight=0,
        terms=[{"name": "uld"}],
    )
    trainer = DistillationTrainer(
        model=llama(hidden=16, layers=1, vocab=len(s_tok), seed=0),
        args=args,
        teacher_model=teacher,
        eval_dataset=data,
        processing_class=s_tok,
    )
    assert trainer.teacher_processing_class.get_vocab() == t_tok.get_vocab()
    batch = trainer.data_collator([data[0], data[1]])
    assert batch["input_ids"].shape[1] <= 5 and batch["teacher_input_ids"].shape[1] <= 5  # max_length per side
    assert trainer.evaluate()["eval_distill/uld"] > 0
    with pytest.raises(ValueError, match="cannot be combined with teacher_cache_dir"):
        config(tmp_path, teacher_processing_class="x", teacher_cache_dir="somewhere")
    with pytest.raises(ValueError, match="tokenize_max_length must be an integer >= 2"):
        config(tmp_path, tokenize_max_length=1)
