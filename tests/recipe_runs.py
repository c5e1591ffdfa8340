"""Tiny recipe runs shared by the command-line test modules (test_cli, test_recipe_transfer,
test_recipe_student_config): a tiny BERT teacher and CSV on disk (`make_tiny_text`, the `tiny_text` fixture of
conftest.py), recipe files, and reading a run's outputs. Test modules import this module, never each other."""

import json

import numpy as np
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

WORDS = "good bad fine great awful okay love hate the a movie film was is very not".split()


def make_tiny_text(root):
    """A tiny BERT teacher with a tokenizer, and a CSV of labelled sentences, on disk under `root` (the `tiny_text`
    fixture of conftest.py)."""
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))  # vocab_file= builds an empty vocabulary in transformers 5
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    teacher_dir = root / "teacher"
    BertForSequenceClassification(config).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    rng = np.random.default_rng(0)
    rows = ["text,sentiment"]
    for i in range(80):
        label = ["negative", "neutral", "positive"][i % 3]
        words = rng.choice(WORDS, size=rng.integers(3, 9))
        rows.append(
            f"{' '.join(words)} {'great' if label == 'positive' else 'awful' if label == 'negative' else 'okay'},{label}"
        )
    data = root / "data.csv"
    data.write_text("\n".join(rows) + "\n")
    return teacher_dir, data


def _recipe(tmp_path, teacher_dir, data, **extra):
    values = {
        "task": "text-classification",
        "teacher_model_name_or_path": str(teacher_dir),
        "teacher_hub_id": "org/tiny-teacher",
        "finetune_teacher": True,
        "teacher_max_steps": 2,
        "student_num_layers": 2,
        "dataset_name": "csv",
        "data_files": str(data),
        "text_column": "text",
        "label_column": "sentiment",
        "max_length": 16,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "hidden_weight": 1.0,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "latency_repeats": 2,
        "latency_batch_size": 4,
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _lm_recipe(tmp_path, tiny_text, **extra):
    """A tiny Llama teacher with the tiny BERT tokenizer, a text corpus, and a causal-LM recipe over them."""
    teacher_dir = tmp_path / "lm_teacher"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(teacher_dir)
    BertTokenizerFast.from_pretrained(tiny_text[0]).save_pretrained(teacher_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(WORDS[i % 7 : i % 7 + 6]) for i in range(200)))
    values = dict(task="causal-lm", dataset_name="text", finetune_teacher=False, label_column="label", max_length=16)
    return _recipe(tmp_path, teacher_dir, text, **{**values, **extra})


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err[err.index("hfkd: error: ") :]


def _csv(tmp_path, rows, name="labels.csv"):
    path = tmp_path / name
    path.write_text("text,sentiment\n" + "\n".join(rows) + "\n")
    return path


def _split_files(tmp_path, rows, test_rows) -> str:
    """A train and a test CSV, as the recipe's data_files JSON for eval_split='test'."""
    train, test = _csv(tmp_path, rows, "train.csv"), _csv(tmp_path, test_rows, "test.csv")
    return json.dumps({"train": str(train), "test": str(test)})


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
