"""The `hfkd distill` command line and recipes, end to end on tiny models saved to disk."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from hfkd.cli import main, parse_distill_args

os.environ["HF_HUB_OFFLINE"] = "1"

WORDS = "good bad fine great awful okay love hate the a movie film was is very not".split()


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny BERT teacher with a tokenizer, and a CSV of labelled sentences, on disk."""
    root = tmp_path_factory.mktemp("tiny_text")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
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


def test_yaml_and_overrides(tmp_path, tiny_text):
    path = _recipe(tmp_path, *tiny_text)
    recipe, data_args, config = parse_distill_args(
        ["--config", str(path), "--temperature", "4", "--hidden_layer_map", "0,2,4", "--student_num_layers", "2"]
    )
    assert recipe.task == "text-classification" and recipe.student_num_layers == 2
    assert data_args.label_column == "sentiment" and data_args.max_length == 16
    assert config.temperature == 4.0 and config.hidden_layer_map == [0, 2, 4] and config.max_steps == 3
    assert config.hidden_weight == 1.0  # from the file, not the default


def test_unknown_yaml_key_and_bad_values_fail_clearly(tmp_path, tiny_text, capsys):
    path = _recipe(tmp_path, *tiny_text, temprature=3)
    assert main(["distill", "--config", str(path)]) == 2
    assert "temprature" in capsys.readouterr().err
    path = _recipe(tmp_path, *tiny_text)
    assert main(["distill", "--config", str(path), "--temperature", "0"]) == 2
    assert "temperature must be > 0" in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    assert main(["--help"]) == 0
    assert "distill" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    for name in ("--student_num_layers", "--finetune_teacher", "--text_column", "--temperature", "--hidden_layer_map"):
        assert name in out


def test_recipe_end_to_end_writes_every_output(tmp_path, tiny_text):
    path = _recipe(tmp_path, *tiny_text)
    assert main(["distill", "--config", str(path)]) == 0
    out = tmp_path / "run"
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "metrics.json",
        "report.png",
        "hfkd_config.yaml",
        "teacher/model.safetensors",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "accuracy" and 0 <= metrics["student"]["metric"] <= 1
    assert metrics["teacher"]["params"] > metrics["student"]["params"] and metrics["speedup"] > 0
    assert set(metrics["distillation"]["terms"]) == {"task", "distill/logit", "distill/hidden"}
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny-teacher" in card and "knowledge-distillation" in card and "accuracy" in card
    # The saved configuration runs again as a recipe.
    recipe, _, config = parse_distill_args(["--config", str(out / "hfkd_config.yaml")])
    assert recipe.student_num_layers == 2 and config.hidden_weight == 1.0
    # The student loads with plain transformers, hfkd never imported, and holds no projector or teacher keys.
    code = (
        "import sys, transformers, safetensors.torch as st;"
        f"m = transformers.AutoModelForSequenceClassification.from_pretrained({str(out)!r});"
        f"keys = st.load_file({str(out / 'model.safetensors')!r}).keys();"
        "assert not any('projector' in k or 'teacher' in k for k in keys);"
        "assert 'hfkd' not in sys.modules; print(m.config.num_hidden_layers)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2"


def test_existing_run_is_not_overwritten(tmp_path, tiny_text, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text))]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == "{}"


def test_push_to_unreachable_hub_fails_clearly_and_keeps_the_folder(tmp_path, tiny_text, capsys):
    path = _recipe(
        tmp_path,
        *tiny_text,
        push_to_hub=True,
        hub_model_id="someone/tiny-student",
        teacher_max_steps=1,
        max_steps=1,
        hidden_weight=0.0,
    )
    assert main(["distill", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "someone/tiny-student" in out
    for name in ("model.safetensors", "README.md", "metrics.json", "report.png"):
        assert (tmp_path / "run" / name).is_file()


def test_lora_teacher_finetuning_then_distillation(tmp_path, tiny_text):
    path = _recipe(
        tmp_path, *tiny_text, teacher_lora_r=4, teacher_lora_target_modules="query,value", hidden_weight=0.0
    )
    assert main(["distill", "--config", str(path)]) == 0
    teacher_keys = __import__("safetensors.torch").torch.load_file(
        str(tmp_path / "run" / "teacher" / "model.safetensors")
    )
    assert not any("lora" in k for k in teacher_keys)  # merged before distillation
    assert "LoRA r=4" in (tmp_path / "run" / "README.md").read_text()


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


def test_causal_lm_recipe_reports_perplexity(tmp_path, tiny_text):
    path = _lm_recipe(tmp_path, tiny_text, hidden_weight=0.0)
    assert main(["distill", "--config", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity" and metrics["student"]["metric"] > 1.0
    assert "pipeline_tag: text-generation" in (tmp_path / "run" / "README.md").read_text()


def test_image_recipe_with_teacher_built_from_config(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("dark", "light"):
        (images / "train" / label).mkdir(parents=True)
        for i in range(12):
            base = 40 if label == "dark" else 200
            pixels = np.clip(rng.normal(base, 20, size=(8, 8)), 0, 255).astype("uint8")
            Image.fromarray(pixels, mode="L").save(images / "train" / label / f"{i}.png")
    teacher_config = {
        "model_type": "vit",
        "image_size": 8,
        "patch_size": 4,
        "num_channels": 1,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 64,
    }
    processor = {"size": {"height": 8, "width": 8}, "do_resize": False, "image_mean": [0.5], "image_std": [0.5]}
    path = _recipe(
        tmp_path,
        "unused",
        images,
        task="image-classification",
        dataset_name="imagefolder",
        data_files=None,
        teacher_model_name_or_path=None,
        teacher_config=json.dumps(teacher_config),
        image_processor_kwargs=json.dumps(processor),
        label_column="label",
        eval_fraction=0.25,
        attention_weight=1.0,
    )
    values = yaml.safe_load(path.read_text())
    values["data_dir"] = None
    values.pop("data_dir")
    values["data_files"] = json.dumps({"train": str(images / "train" / "**")})
    path.write_text(yaml.safe_dump(values))
    assert main(["distill", "--config", str(path)]) == 0
    out = tmp_path / "run"
    assert (out / "preprocessor_config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "distill/attention" in metrics["distillation"]["terms"]
    assert metrics["student"]["params"] < metrics["teacher"]["params"]


def test_cache_command_then_distill_from_the_cache(tmp_path, tiny_text, capsys):
    path = _lm_recipe(tmp_path, tiny_text, hidden_weight=1.0, hidden_loss="cosine")
    cache = tmp_path / "cache"
    assert main(["cache", "--config", str(path), "--cache_dir", str(cache), "--top_k", "8"]) == 0
    out = capsys.readouterr().out
    assert "top-8 of 21 logits" in out and "hidden states of teacher layers [0, 2, 4]" in out
    # A second run does not overwrite it; a recipe that fine-tunes its teacher cannot be cached.
    assert main(["cache", "--config", str(path), "--cache_dir", str(cache)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(["cache", "--config", str(path), "--cache_dir", str(tmp_path / "c2"), "--finetune_teacher", "true"]) == 2
    )
    assert "fine-tuned teacher's outputs" in capsys.readouterr().err

    assert main(["distill", "--config", str(path), "--teacher_cache_dir", str(cache)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["student"]["metric"] > 1.0
    # Another temperature than the cached top-k probabilities is refused before training.
    with pytest.raises(ValueError, match="temperature=4.0 but"):
        main(
            [
                "distill",
                "--config",
                str(path),
                "--teacher_cache_dir",
                str(cache),
                "--temperature",
                "4",
                "--overwrite_output_dir",
                "true",
            ]
        )
