"""`hfkd distill` with a student that has its own tokenizer: tokenized for both, saved with its own, compared in bits
per byte; end to end on tiny models and tokenizers trained here, saved to disk."""

import json

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hfkd import data as hfkd_data
from hfkd.cli import main, parse_distill_args
from hfkd.lm_eval import bits_per_byte

WORDS = "good bad fine great awful okay love hate the a movie film was is very not unbelievable tokenizer".split()


def _sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(n)]


def _bpe(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _wordpiece(texts: list[str], vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    )
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _llama(cls, tokenizer, hidden: int, layers: int, seed: int, **extra):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )
    return cls(config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Folders of tiny models with their own tokenizers, a CSV of labelled sentences and a text corpus."""
    root = tmp_path_factory.mktemp("two_tokenizers")
    texts = _sentences(300, 0)
    folders = {}
    # Causal LMs: a teacher and a student, each with a byte-level BPE of its own size.
    teacher_tok, student_tok = _bpe(texts, 400), _bpe(texts, 300)
    for name, tok, hidden, layers, seed in (
        ("lm_teacher", teacher_tok, 32, 2, 1),
        ("lm_student", student_tok, 16, 1, 2),
    ):
        folders[name] = root / name
        _llama(LlamaForCausalLM, tok, hidden, layers, seed).save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    # The same student, without its tokenizer.
    folders["lm_student_bare"] = root / "lm_student_bare"
    _llama(LlamaForCausalLM, student_tok, 16, 1, 2).save_pretrained(folders["lm_student_bare"])
    # A student that shares the teacher's tokenizer.
    folders["lm_student_same"] = root / "lm_student_same"
    _llama(LlamaForCausalLM, teacher_tok, 16, 1, 2).save_pretrained(folders["lm_student_same"])
    teacher_tok.save_pretrained(folders["lm_student_same"])
    # Classifiers of two families: a BERT teacher with WordPiece, a Llama student with byte-level BPE.
    labels = {"id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}
    wordpiece = _wordpiece(texts, 120)
    torch.manual_seed(3)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=len(wordpiece),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=2,
            **labels,
        )
    )
    folders["cls_teacher"] = root / "cls_teacher"
    bert.save_pretrained(folders["cls_teacher"])
    wordpiece.save_pretrained(folders["cls_teacher"])
    folders["cls_student"] = root / "cls_student"
    _llama(LlamaForSequenceClassification, student_tok, 16, 1, 4, num_labels=2, **labels).save_pretrained(
        folders["cls_student"]
    )
    student_tok.save_pretrained(folders["cls_student"])
    rows = ["text,sentiment"]
    for i, text in enumerate(_sentences(80, 1)):
        label = "positive" if i % 2 else "negative"
        rows.append(f"{text} {'great' if label == 'positive' else 'awful'},{label}")
    folders["csv"] = root / "data.csv"
    folders["csv"].write_text("\n".join(rows) + "\n")
    folders["corpus"] = root / "corpus.txt"
    folders["corpus"].write_text("\n".join(_sentences(200, 2)) + "\n")
    return folders


def _write(tmp_path, values: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _common(tmp_path) -> dict:
    return {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "latency_repeats": 2,
        "latency_batch_size": 4,
        "max_length": 16,
        "text_column": "text",
    }


def _lm_recipe(tmp_path, tiny, student: str | None = "lm_student", **extra):
    values = {
        "task": "causal-lm",
        "teacher_model_name_or_path": str(tiny["lm_teacher"]),
        "dataset_name": "text",
        "data_files": str(tiny["corpus"]),
        "max_eval_samples": 12,
        "logit_weight": 0.0,
        "hidden_weight": 0.0,
        "terms": '[{"name": "span_kd"}]',
        **_common(tmp_path),
    }
    if student:
        values["student_model_name_or_path"] = str(tiny[student])
    return _write(tmp_path, {**values, **extra})


def _cls_recipe(tmp_path, tiny, **extra):
    values = {
        "task": "text-classification",
        "teacher_model_name_or_path": str(tiny["cls_teacher"]),
        "student_model_name_or_path": str(tiny["cls_student"]),
        "dataset_name": "csv",
        "data_files": str(tiny["csv"]),
        "label_column": "sentiment",
        "hidden_weight": 1.0,
        **_common(tmp_path),
    }
    return _write(tmp_path, {**values, **extra})


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_text_classification_across_tokenizers_saves_the_students_own_tokenizer(tmp_path, tiny, capsys):
    path = _cls_recipe(tmp_path, tiny, finetune_teacher=True, teacher_max_steps=2, compare_without_distillation=True)
    assert main(["distill", "--config", str(path)]) == 0
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    student_vocab = AutoTokenizer.from_pretrained(tiny["cls_student"]).get_vocab()
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.get_vocab() == student_vocab  # the student's own, never the teacher's
    teacher_vocab = AutoTokenizer.from_pretrained(tiny["cls_teacher"]).get_vocab()
    assert AutoTokenizer.from_pretrained(out / "teacher").get_vocab() == teacher_vocab  # fine-tuned on its own tokens
    assert metrics["metric"] == "accuracy" and metrics["student"]["own_tokenizer"]["vocab"] == len(student_vocab)
    assert set(metrics["distillation"]["terms"]) == {"task", "distill/logit", "distill/hidden"}
    assert "labels_only" in metrics and "own tokenizer" in metrics["student"]["note"]
    # The saved student loads with plain transformers and reaches the accuracy the run reported.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    recipe, data_args, config = parse_distill_args(["--config", str(out / "hfkd_config.yaml")])
    train, held_out = hfkd_data.load_splits(data_args, config.seed)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    rows = hfkd_data.preprocess_text_classification(held_out, saved, data_args, names)
    right = 0
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
        right += int(logits.argmax(-1).item() == row["labels"])
    assert metrics["student"]["metric"] == pytest.approx(right / len(rows))
    assert "own tokenizer" in (out / "README.md").read_text()


def test_causal_lm_across_tokenizers_reports_bits_per_byte_of_every_model(tmp_path, tiny, capsys):
    path = _lm_recipe(tmp_path, tiny, compare_without_distillation=True)
    assert main(["distill", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "bits_per_byte"
    for model in (metrics["teacher"], metrics["student"], metrics["labels_only"]):
        assert model["metric"] == model["bits_per_byte"] > 0
        assert model["own_token_perplexity"] > 1 and model["eval_bytes"] > 0
    assert metrics["gain"] == pytest.approx(metrics["labels_only"]["metric"] - metrics["student"]["metric"])
    # Paired text piece by text piece: each student's pieces pool to its reported bits per byte.
    rows = json.loads((out / "eval_rows.json").read_text())
    for side in ("student", "labels_only"):
        bits, nbytes = rows[side]["loss"], rows[side]["count"]
        assert len(bits) == len(nbytes) == metrics["text_eval"]["texts"] and sum(nbytes) == metrics[side]["eval_bytes"]
        assert sum(bits) / sum(nbytes) == pytest.approx(metrics[side]["metric"], rel=1e-6)
    paired = metrics["paired"]
    # (the headline sums in float32, the pieces in float64: equal to float32 rounding of bits per byte ~5)
    assert paired["gain"] == pytest.approx(metrics["gain"], abs=1e-5) and paired["verdict"] in printed
    assert paired["blocks"] == sum(1 for b in rows["student"]["count"] if b > 0)
    assert metrics["text_eval"]["texts"] > 0 and "distill/span_kd" in metrics["distillation"]["terms"]
    assert "not packed" in metrics["data"]["note"]
    # The saved student with its own tokenizer gives the reported figure on the same held-out text.
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny["lm_student"]).get_vocab()
    recipe, data_args, config = parse_distill_args(["--config", str(out / "hfkd_config.yaml")])
    _, held_out = hfkd_data.load_splits(data_args, config.seed)
    teacher_tok = AutoTokenizer.from_pretrained(tiny["lm_teacher"])
    texts = hfkd_data.split_text([t for t in held_out["text"] if t], [teacher_tok, tokenizer], data_args.max_length)
    assert len(texts) == metrics["text_eval"]["texts"]
    by_hand = bits_per_byte(AutoModelForCausalLM.from_pretrained(out), tokenizer, texts, data_args.max_length)
    assert metrics["student"]["bits_per_byte"] == pytest.approx(by_hand["bits_per_byte"], rel=1e-4)
    assert "bits per byte" in printed and "ppl per own token" in printed
    card = (out / "README.md").read_text()
    assert "perplexity per own token" in card and "teacher's bits per byte" in card


def test_a_student_with_the_teachers_tokenizer_runs_as_before_and_reports_bits_per_byte(tmp_path, tiny, capsys):
    path = _lm_recipe(tmp_path, tiny, student="lm_student_same", terms=None, logit_weight=1.0)
    assert main(["distill", "--config", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity" and "own_tokenizer" not in metrics["student"]
    for model in (metrics["teacher"], metrics["student"]):
        assert model["bits_per_byte"] > 0 and model["metric"] != model["bits_per_byte"]
    assert "bits per byte (held-out text)" in (tmp_path / "run" / "README.md").read_text()


@pytest.mark.parametrize(
    ("recipe", "extra", "expected"),
    [
        ("lm", {"student": "lm_student_bare"}, "student_model_name_or_path="),
        ("lm", {"logit_weight": 1.0}, "--logit_weight 0"),
        ("lm", {"generations": 2}, "generations=2"),
        ("lm", {"teacher_processing_class": "x"}, "unset teacher_processing_class"),
        ("lm", {"peer_model_name_or_path": "PEER"}, "peer_model_name_or_path: "),
        ("cls", {"terms": '[{"name": "span_kd"}]'}, "drop 'span_kd' from --terms"),
        ("cls", {"attention_weight": 1.0}, "--attention_weight 0"),
    ],
)
def test_what_cannot_run_across_tokenizers_is_refused_before_anything_is_written(
    tmp_path, tiny, capsys, recipe, extra, expected
):
    extra = dict(extra)
    if extra.get("peer_model_name_or_path") == "PEER":
        extra["peer_model_name_or_path"] = str(tiny["lm_student"])
    if recipe == "lm":
        path = _lm_recipe(tmp_path, tiny, **extra)
    else:
        path = _cls_recipe(tmp_path, tiny, **extra)
    assert main(["distill", "--config", str(path)]) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_a_teacher_cache_is_refused_across_tokenizers(tmp_path, tiny, capsys):
    path = _lm_recipe(tmp_path, tiny)
    assert main(["cache", "--config", str(path), "--cache_dir", str(tmp_path / "cache")]) == 2
    assert "has its own tokenizer" in _error(capsys)
    path = _lm_recipe(tmp_path, tiny, teacher_cache_dir=str(tmp_path / "cache"))
    assert main(["distill", "--config", str(path)]) == 2
    assert "teacher_cache_dir" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_split_text_cuts_at_whitespace_within_every_tokenizers_budget(tiny):
    tokenizers = [AutoTokenizer.from_pretrained(tiny[name]) for name in ("lm_teacher", "lm_student")]
    text = " ".join(_sentences(20, 5))
    pieces = hfkd_data.split_text([text, "", "   "], tokenizers, 12)
    assert " ".join(pieces) == " ".join(text.split())  # nothing lost but the whitespace at the cuts
    for piece in pieces:
        assert piece == piece.strip()
        for tok in tokenizers:
            assert len(tok(piece)["input_ids"]) <= 12
