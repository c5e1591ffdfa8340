"""The `hfkd distill` command line and recipes, end to end on tiny models saved to disk."""

import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from recipe_runs import WORDS, _csv, _error, _lm_recipe, _recipe, _split_files, _state
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaForCausalLM

from hfkd.cli import main, parse_distill_args
from hfkd.compare import paired_accuracy, paired_blocks


def _held_out(run):
    """The run's held-out examples, rebuilt from its hfkd_config.yaml with the recipe's own data path."""
    from hfkd import data as hfkd_data

    recipe, data_args, config = parse_distill_args(["--config", str(run / "hfkd_config.yaml")])
    train, held_out = hfkd_data.load_splits(data_args, config.seed)
    tokenizer = BertTokenizerFast.from_pretrained(run)
    if recipe.task == "causal-lm":
        return hfkd_data.preprocess_causal_lm(held_out, tokenizer, data_args)
    train, held_out, _ = hfkd_data.drop_unlabelled(train, held_out, data_args)
    labels = json.loads((run / "config.json").read_text())["id2label"]
    names = [labels[str(i)] for i in range(len(labels))]
    return hfkd_data.preprocess_text_classification(held_out, tokenizer, data_args, names)


def _accuracy_by_hand(run, model_dir=None) -> float:
    """The held-out accuracy of the model in `model_dir` (default: the run's student), by plain transformers."""
    model = BertForSequenceClassification.from_pretrained(model_dir or run).eval()
    right = 0
    rows = _held_out(run)
    for row in rows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
        right += int(logits.argmax(-1).item() == row["labels"])
    return right / len(rows)


def _perplexity_by_hand(run) -> float:
    """exp of the mean next-token negative log-likelihood over every held-out block (all blocks are full)."""
    model = LlamaForCausalLM.from_pretrained(run).eval()
    total, count = 0.0, 0
    for row in _held_out(run):
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        total -= log_probs.gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return float(np.exp(total / count))


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
    assert not (out / "checkpoints" / "_eval").exists()  # evaluation's scratch folder goes
    metrics = json.loads((out / "metrics.json").read_text())
    # The reported accuracy is the saved student's on the held-out rows, recomputed here row by row.
    assert metrics["metric"] == "accuracy" and metrics["student"]["metric"] == pytest.approx(_accuracy_by_hand(out))
    assert metrics["data"]["eval_examples"] == 8 and metrics["data"]["train_examples"] == 72
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
    # The advice runs: huggingface_hub's own `hf` command line parses it (without running it) as the push it redoes.
    import click
    from huggingface_hub.cli.hf import app

    command = shlex.split(out.split("push it later with: ")[1].splitlines()[0])
    assert command[:2] == ["hf", "upload"]
    name, upload, rest = app.resolve_command(click.Context(app), command[1:])
    params = upload.make_context(name, rest).params
    assert params["repo_id"] == "someone/tiny-student" and params["local_path"] == str(tmp_path / "run")
    assert params["path_in_repo"] == "." and set(params["exclude"]) == {"teacher/*", "checkpoints/*"}
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


def test_causal_lm_recipe_reports_perplexity(tmp_path, tiny_text):
    path = _lm_recipe(tmp_path, tiny_text, hidden_weight=0.0, compare_without_distillation=True)
    assert main(["distill", "--config", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity"
    assert metrics["student"]["metric"] == pytest.approx(_perplexity_by_hand(tmp_path / "run"), rel=1e-4)
    # The comparison pairs the two students block by block; each one's pooled blocks give its reported perplexity.
    rows = json.loads((tmp_path / "run" / "eval_rows.json").read_text())
    blocks = len(_held_out(tmp_path / "run"))
    for side, key in (("student", "student"), ("labels_only", "labels_only")):
        loss, count = rows[side]["loss"], rows[side]["count"]
        assert len(loss) == len(count) == blocks and set(count) == {15.0}  # 16-token blocks, 15 predicted
        assert metrics[key]["metric"] == pytest.approx(math.exp(sum(loss) / sum(count)), rel=1e-6)
    paired = metrics["paired"]
    assert paired["blocks"] == blocks and paired["gain"] == pytest.approx(metrics["gain"], rel=1e-6)
    expected = paired_blocks(
        *(rows[s][k] for s in ("student", "labels_only") for k in ("loss", "count")), "perplexity"
    )
    assert paired == expected
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
    assert metrics["student"]["metric"] == pytest.approx(_perplexity_by_hand(tmp_path / "run"), rel=1e-4)
    assert metrics["teacher"]["cache"]["logits"]["top_k"] == 8
    # Another temperature than the cached top-k probabilities is refused before training.
    argv = ["distill", "--config", str(path), "--teacher_cache_dir", str(cache), "--temperature", "4"]
    assert main([*argv, "--overwrite_output_dir", "true"]) == 2
    assert "temperature=4.0 but" in capsys.readouterr().err
    with pytest.raises(ValueError, match="temperature=4.0 but"):
        main([*argv, "--overwrite_output_dir", "true", "--traceback"])


# ---------------------------------------------------------------- nothing lost, nothing silent


def _files(folder):
    """Every file under folder with its bytes, to show that a refusal changed nothing."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_of_other_files_is_refused_and_left_intact(tmp_path, tiny_text, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"a user's own weights")
    (out / "notes.txt").write_text("keep me")
    before = _files(out)
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text))]) == 2
    err = _error(capsys)
    assert "not empty and holds no hfkd run" in err and "model.safetensors" in err and "--overwrite_output_dir" in err
    assert _files(out) == before
    # An empty folder is fine; with --overwrite_output_dir true the user's folder is written into.
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text)), "--overwrite_output_dir", "true"]) == 0
    assert (out / "notes.txt").read_text() == "keep me" and (out / "metrics.json").is_file()


def test_output_dir_that_is_a_file_fails_cleanly(tmp_path, tiny_text, capsys):
    target = tmp_path / "run"
    target.write_text("a file")
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text))]) == 2
    assert "is a file, not a folder" in _error(capsys)
    assert target.read_text() == "a file"


def test_rows_without_a_label_are_dropped_and_counted_never_a_class(tmp_path, tiny_text, caplog):
    teacher_dir, data = tiny_text
    rows = data.read_text().splitlines()[1:]
    blanks = [f"{row.rsplit(',', 1)[0]}," for row in rows[:7]]  # the same texts, label cell empty
    path = _recipe(tmp_path, teacher_dir, _csv(tmp_path, rows + blanks), eval_fraction=0.2)
    with caplog.at_level("WARNING"):
        assert main(["distill", "--config", str(path)]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["negative", "neutral", "positive"]  # 3 labels, no "None"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["train_examples"] + metrics["data"]["eval_examples"] == len(rows)
    counted = [r.getMessage() for r in caplog.records if "without a 'sentiment' label" in r.getMessage()]
    assert counted, "the drop is reported"
    dropped = [int(word) for word in counted[0].replace(",", " ").split() if word.isdigit()]
    assert sum(dropped) == 7
    assert "rows without a 'sentiment' label" in metrics["data"]["note"]


def _hfkd_distill(recipe_path, *argv) -> subprocess.CompletedProcess:
    """`hfkd distill` in its own process, as a user runs it (python -m hfkd: the worktree's code on PYTHONPATH)."""
    command = [sys.executable, "-m", "hfkd", "distill", "--config", str(recipe_path), *argv]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The first line of the error hfkd prints (log lines come before it on stderr), with no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("hfkd: error: ")]
    assert lines, result.stderr
    return lines[0]


def test_a_label_only_in_the_held_out_split_is_refused_naming_it(tmp_path, tiny_text):
    teacher_dir, data = tiny_text
    rows = data.read_text().splitlines()[1:]
    sarcastic = [f"{row.rsplit(',', 1)[0]},sarcastic" for row in rows[:5]]
    files = _split_files(tmp_path, rows[:60], rows[60:] + sarcastic)
    path = _recipe(tmp_path, teacher_dir, data, data_files=files, eval_split="test")
    result = _hfkd_distill(path)
    assert result.returncode == 2, result.stderr
    line = _error_line(result)
    assert "'sarcastic' (5 rows)" in line and "eval_split='test'" in line and "--unseen_eval_labels drop" in line
    assert not (tmp_path / "run").exists()


def test_a_label_only_in_the_held_out_split_can_be_dropped_and_the_card_says_so(tmp_path, tiny_text, caplog):
    teacher_dir, data = tiny_text
    rows = data.read_text().splitlines()[1:]
    sarcastic = [f"{row.rsplit(',', 1)[0]},sarcastic" for row in rows[:5]]
    files = _split_files(tmp_path, rows[:60], rows[60:] + sarcastic)
    path = _recipe(tmp_path, teacher_dir, data, data_files=files, eval_split="test", unseen_eval_labels="drop")
    with caplog.at_level("WARNING"):
        assert main(["distill", "--config", str(path)]) == 0
    out = tmp_path / "run"
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["negative", "neutral", "positive"]  # no class without training
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["eval_examples"] == len(rows) - 60
    assert any("5 held-out rows" in r.getMessage() and "'sarcastic'" in r.getMessage() for r in caplog.records)
    assert "5 held-out rows whose 'sentiment' label never occurs in training" in metrics["data"]["note"]
    assert "unseen_eval_labels=drop" in (out / "README.md").read_text()


def test_a_teacher_whose_head_was_never_trained_is_refused_unless_fine_tuned_first(tmp_path, tiny_text):
    from transformers import BertModel

    teacher_dir, data = tiny_text
    base = tmp_path / "base_teacher"  # the encoder alone, its config naming the data's labels: no classifier
    BertModel(BertConfig.from_pretrained(teacher_dir)).save_pretrained(base)
    BertTokenizerFast.from_pretrained(teacher_dir).save_pretrained(base)
    path = _recipe(tmp_path, base, data, finetune_teacher=False)
    result = _hfkd_distill(path)
    assert result.returncode == 2, result.stderr
    line = _error_line(result)
    assert "initialised at random on loading (classifier.bias, classifier.weight" in line, line
    assert "--finetune_teacher true" in line
    assert not (tmp_path / "run").exists()
    # Stage 1 trains the new head before anything distils from it: no refusal then.
    path = _recipe(tmp_path, base, data, finetune_teacher=True)
    assert main(["distill", "--config", str(path)]) == 0


def test_a_single_class_is_refused_not_regression(tmp_path, tiny_text, capsys):
    teacher_dir, _ = tiny_text
    data = _csv(tmp_path, [f"good movie number {i},positive" for i in range(20)])
    path = _recipe(tmp_path, teacher_dir, data)
    assert main(["distill", "--config", str(path)]) == 2
    assert "holds a single class ['positive']" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_resume_from_a_missing_checkpoint_is_refused(tmp_path, tiny_text, capsys):
    path = _recipe(tmp_path, *tiny_text)
    missing = tmp_path / "run" / "checkpoints" / "checkpoint-10"
    assert main(["distill", "--config", str(path), "--resume_from_checkpoint", str(missing)]) == 2
    assert f"resume_from_checkpoint={str(missing)!r} does not exist" in _error(capsys)
    assert not (tmp_path / "run").exists()
    # Resuming a folder that holds no run, or resuming and overwriting at once, is refused too.
    assert main(["distill", "--config", str(path), "--resume_from_checkpoint", "true"]) == 2
    assert "holds no hfkd run to resume" in _error(capsys)
    argv = ["--resume_from_checkpoint", "true", "--overwrite_output_dir", "true"]
    assert main(["distill", "--config", str(path), *argv]) == 2
    assert "contradict each other" in _error(capsys)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data_files": "/no/such/data.csv"}, "/no/such/data.csv"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
        ({"student_num_layers": 9}, "between 1 and the teacher's 4 layers"),
        ({"student_num_layers": None, "student_layers": "0,7"}, "indices [7] out of range"),
        ({"student_num_layers": None, "student_layers": "0,x"}, "student_layers='0,x' must be comma-separated"),
        ({"metric_for_best_model": "f1", "eval_strategy": "steps"}, "metric_for_best_model='f1' is not reported"),
        ({"early_stopping_patience": 2}, "early_stopping_patience=2 needs --eval_strategy steps"),
        ({"teacher_ema_decay": 0.99}, "teacher_ema_decay makes the teacher a moving average of the student"),
        (
            {"teacher_ema_decay": 0.99, "teacher_model_name_or_path": None},
            "teacher_ema_decay (a mean teacher made from the student) is not offered",
        ),
        ({"teacher_cache_dir": ["/a", "/b"]}, "teacher_cache_dir set for several teachers, but a recipe distils"),
        ({"teacher_combine": "confidence"}, "teacher_combine set for several teachers, but a recipe distils"),
        ({"teacher_weights": [1, 2]}, "teacher_weights set for several teachers, but a recipe distils"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_folder(tmp_path, tiny_text, capsys, change, expected):
    path = _recipe(tmp_path, *tiny_text, **change)
    assert main(["distill", "--config", str(path)]) == 2
    err = _error(capsys)
    assert expected in err, err
    assert not (tmp_path / "run").exists()  # nor teacher/_trainer, nor checkpoints/hfkd_run.json
    # The traceback, on request.
    with pytest.raises((ValueError, FileNotFoundError)):
        main(["distill", "--config", str(path), "--traceback"])


def test_a_bug_keeps_its_traceback_and_a_failed_run_leaves_no_folder(tmp_path, tiny_text, monkeypatch, capsys):
    from hfkd.recipe import evaluation, pipeline

    def broken(state):
        raise KeyError("a bug")

    # After the teacher is fine-tuned: the finished teacher stays for a resume, the scratch folder goes.
    monkeypatch.setattr(pipeline, "build_student", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["distill", "--config", str(_recipe(tmp_path, *tiny_text))])
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["hfkd_config.yaml", "teacher"]
    assert (out / "teacher" / "hfkd_teacher.json").is_file() and not (out / "teacher" / "_trainer").exists()
    assert "Continue it with the same command and --resume_from_checkpoint true" in capsys.readouterr().err
    # Before anything resumable exists: the folder the run created goes entirely (checkpoints/hfkd_run.json too).
    monkeypatch.undo()
    monkeypatch.setattr(evaluation, "score", lambda state, model: broken(state))  # what evaluation calls
    path = _recipe(tmp_path, *tiny_text, output_dir=str(tmp_path / "second"), finetune_teacher=False)
    with pytest.raises(KeyError, match="a bug"):
        main(["distill", "--config", str(path)])
    assert not (tmp_path / "second").exists()


def test_resume_from_the_command_line_continues_exactly(tmp_path, tiny_text, monkeypatch, capsys):
    from hfkd.trainer import DistillationTrainer

    extra = dict(max_steps=6, save_strategy="steps", save_steps=2, teacher_max_steps=3, learning_rate=1e-3)
    whole = _recipe(tmp_path, *tiny_text, **{**extra, "output_dir": str(tmp_path / "whole")})
    assert main(["distill", "--config", str(whole)]) == 0

    path = _recipe(tmp_path, *tiny_text, **extra)
    original = DistillationTrainer._save_checkpoint

    def crash_after_step_4(self, model, trial):
        original(self, model, trial)
        if self.state.global_step == 4:
            raise RuntimeError("killed")

    monkeypatch.setattr(DistillationTrainer, "_save_checkpoint", crash_after_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        main(["distill", "--config", str(path)])
    monkeypatch.setattr(DistillationTrainer, "_save_checkpoint", original)
    out = tmp_path / "run"
    assert (out / "checkpoints" / "checkpoint-4").is_dir() and not (out / "metrics.json").exists()
    assert "--resume_from_checkpoint true" in capsys.readouterr().err

    # Starting again without resuming is refused; resuming with other settings is refused, naming them.
    assert main(["distill", "--config", str(path)]) == 2
    assert "--resume_from_checkpoint true" in _error(capsys)
    assert main(["distill", "--config", str(path), "--resume_from_checkpoint", "true", "--temperature", "3"]) == 2
    assert "temperature: 2.0 -> 3.0" in _error(capsys)

    teacher_before = (out / "teacher" / "model.safetensors").read_bytes()
    assert main(["distill", "--config", str(path), "--resume_from_checkpoint", "true"]) == 0
    err = capsys.readouterr().err
    assert "teacher fine-tuning, already done in this run" in err and "resuming from" in err
    assert (out / "teacher" / "model.safetensors").read_bytes() == teacher_before
    resumed, reference = _state(out), _state(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 6 and metrics["training"]["resumed"] is True


def test_metric_during_training_selects_the_best_checkpoint_and_stops_early(tmp_path, tiny_text):
    path = _recipe(
        tmp_path,
        *tiny_text,
        max_steps=8,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        early_stopping_patience=2,
        early_stopping_threshold=1.0,  # no change of accuracy can reach it: stops after 1 + 2 evaluations
        learning_rate=1e-3,
    )
    assert main(["distill", "--config", str(path)]) == 0
    out = tmp_path / "run"
    log = json.loads((out / "training_log.json").read_text())
    accuracies = [entry["eval_accuracy"] for entry in log if "eval_accuracy" in entry]
    assert len(accuracies) == 3
    metrics = json.loads((out / "metrics.json").read_text())
    training = metrics["training"]
    assert training["steps"] == 3 and training["evaluations"] == 3 and training["best_by"] == "accuracy"
    assert training["best_metric"] == max(accuracies)
    assert "best checkpoint by eval accuracy" in (out / "README.md").read_text()


def test_perplexity_during_training_for_language_models(tmp_path, tiny_text, capsys):
    path = _lm_recipe(tmp_path, tiny_text, hidden_weight=0.0, eval_strategy="steps", eval_steps=1)
    assert main(["distill", "--config", str(path), "--metric_for_best_model", "perplexity"]) == 2
    assert "Pass --greater_is_better false" in _error(capsys)
    assert main(["distill", "--config", str(path)]) == 0
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    evals = [entry for entry in log if "eval_perplexity" in entry]
    assert len(evals) == 3
    for entry in evals:
        assert entry["eval_perplexity"] == pytest.approx(np.exp(entry["eval_task"]), rel=1e-6)


def test_saved_configuration_is_exact_and_never_overwrites(tmp_path, tiny_text, capsys):
    path = _recipe(tmp_path, *tiny_text, overwrite_output_dir=True, max_steps=1, teacher_max_steps=1)
    assert main(["distill", "--config", str(path)]) == 0
    saved = tmp_path / "run" / "hfkd_config.yaml"
    values = yaml.safe_load(saved.read_text())
    assert values["overwrite_output_dir"] is False and values["resume_from_checkpoint"] is None
    assert "hub_token" not in values
    # Every field is there, defaults included, and parsing the file gives this run's configuration back.
    recipe, data_args, config = parse_distill_args(["--config", str(path)])
    again = parse_distill_args(["--config", str(saved)])
    from hfkd.recipe import run_values

    assert run_values(*again) == run_values(recipe, data_args, config) == values
    assert values["warmup_steps"] == 0 and values["temperature"] == 2.0 and values["eval_fraction"] == 0.1
    # Running the saved file again asks before overwriting.
    assert main(["distill", "--config", str(saved)]) == 2
    assert "already holds a run" in _error(capsys)


def test_lineage_of_a_teacher_fine_tuned_earlier_and_read_from_a_cache(tmp_path, tiny_text, capsys):
    first = _recipe(tmp_path, *tiny_text, output_dir=str(tmp_path / "first"), max_steps=1, hidden_weight=0.0)
    assert main(["distill", "--config", str(first)]) == 0
    card = (tmp_path / "first" / "README.md").read_text()
    assert "`org/tiny-teacher`, fine-tuned on the task here first: 2 steps" in card
    assert "learning rate 5e-05, batch size 8, on 72 examples" in card
    assert "- Distillation: 1 steps" in card and "Evaluated on 8 held-out examples" in card

    teacher = tmp_path / "first" / "teacher"
    second = _recipe(
        tmp_path, teacher, tiny_text[1], teacher_hub_id=None, finetune_teacher=False, hidden_weight=0.0, max_steps=2
    )
    cache = tmp_path / "cache"
    assert main(["cache", "--config", str(second), "--cache_dir", str(cache)]) == 0
    assert main(["distill", "--config", str(second), "--teacher_cache_dir", str(cache)]) == 0
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"`{teacher}`, which an earlier hfkd run fine-tuned from `org/tiny-teacher` (2 steps" in card
    assert f"read from the teacher cache `{cache}` (72 rows; all 3 logits)" in card
    assert "base_model: org/tiny-teacher" in card
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["teacher"]["cache"]["rows"] == 72 and metrics["teacher"]["origin"]["hub_id"] == "org/tiny-teacher"
    # A cache with a recipe that fine-tunes its teacher is refused before anything runs.
    argv = ["--teacher_cache_dir", str(cache), "--finetune_teacher", "true", "--output_dir", str(tmp_path / "x")]
    assert main(["distill", "--config", str(second), *argv]) == 2
    assert "Fine-tune first" in _error(capsys)


def test_help_puts_the_recipe_first_and_says_what_max_steps_bounds(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    order = [out.index(name) for name in ("--config", "--task", "--dataset_name", "--temperature", "--learning_rate")]
    assert order == sorted(order)
    assert out.index("recipe (the stages)") < out.index("training (transformers TrainingArguments")
    help_of_max_steps = out[out.index("--max_steps MAX_STEPS") :][:300]
    assert "teacher_max_steps" in " ".join(help_of_max_steps.split())


def test_report_to_a_missing_integration_is_refused_early(tmp_path, tiny_text, capsys, monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: False)
    path = _recipe(tmp_path, *tiny_text, report_to="tensorboard")
    assert main(["distill", "--config", str(path)]) == 2
    assert "pip install 'hfkd[tensorboard]'" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_eval_accuracy_reaches_tensorboard(tmp_path, tiny_text):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = _recipe(tmp_path, *tiny_text, report_to="tensorboard", eval_strategy="steps", eval_steps=2, max_steps=4)
    assert main(["distill", "--config", str(path)]) == 0
    events = [p for p in (tmp_path / "run" / "checkpoints").rglob("events.out.tfevents.*")]
    assert events
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"eval/accuracy", "eval/task", "eval/distill/logit", "train/distill/hidden"} <= tags, tags


def test_terms_from_the_command_line_and_the_labels_only_comparison(tmp_path, tiny_text, capsys):
    path = _recipe(tmp_path, *tiny_text, compare_without_distillation=True, max_steps=2, teacher_max_steps=1)
    terms = '[{"name": "sp", "weight": 10.0, "pooling": "cls"}, {"name": "dkd", "weight": 0.5}]'
    assert main(["distill", "--config", str(path), "--terms", terms]) == 0
    captured = capsys.readouterr()
    assert "comparison: the same student on the labels alone, 2 steps" in captured.err
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"distill/sp", "distill/dkd"} <= set(metrics["distillation"]["terms"])
    assert metrics["distillation"]["terms"]["distill/sp"] == {
        "weight": 10.0,
        "loss": "sp (pooling=cls)",
        "last_logged": metrics["distillation"]["terms"]["distill/sp"]["last_logged"],
    }
    labels_only = metrics["labels_only"]
    assert labels_only["steps"] == 2 and 0 <= labels_only["metric"] <= 1
    assert metrics["gain"] == pytest.approx(metrics["student"]["metric"] - labels_only["metric"])
    # Both students scored on the same held-out rows: the paired test decides, from the per-row scores kept beside.
    rows = json.loads((out / "eval_rows.json").read_text())
    ours, theirs = rows["student"]["correct"], rows["labels_only"]["correct"]
    assert len(ours) == len(theirs) == metrics["data"]["eval_examples"]
    assert sum(ours) / len(ours) == pytest.approx(metrics["student"]["metric"])
    assert sum(theirs) / len(theirs) == pytest.approx(labels_only["metric"])
    paired = metrics["paired"]
    assert paired == paired_accuracy(ours, theirs) and paired["gain"] == pytest.approx(metrics["gain"])
    b = sum(1 for x, y in zip(ours, theirs) if x and not y)
    c = sum(1 for x, y in zip(ours, theirs) if y and not x)
    assert (paired["only_ours"], paired["only_theirs"]) == (b, c)
    verdict = {
        "helped": "Distillation helped",
        "no measurable difference": "Distillation made no measurable difference",
        "hurt": "Distillation hurt",
    }[paired["verdict"]]
    card = (out / "README.md").read_text()
    assert verdict in captured.out and verdict in card
    for text in (captured.out, card):
        assert f"{b} rows only the distilled student got right, {c} only the labels-only one" in text
        assert f"McNemar's exact p = {paired['p_value']:.3g}" in text
    assert "(labels only)" in captured.out
    # The saved configuration keeps the terms, and runs again.
    saved = yaml.safe_load((out / "hfkd_config.yaml").read_text())
    assert saved["terms"] == [{"name": "sp", "weight": 10.0, "pooling": "cls"}, {"name": "dkd", "weight": 0.5}]
    assert main(["distill", "--config", str(path), "--terms", '[{"name": "spp"}]', "--output_dir", "x"]) == 2
    assert "no term named 'spp'" in _error(capsys)


def _rows(n: int, b: int, c: int, both: int) -> tuple[list[int], list[int]]:
    """Per-row correctness of two models on n rows: b right only for the first, c only for the second, `both` for
    both, the rest for neither."""
    ours = [1] * b + [0] * c + [1] * both + [0] * (n - b - c - both)
    theirs = [0] * b + [1] * c + [1] * both + [0] * (n - b - c - both)
    return ours, theirs


def _accuracy_metrics(teacher: float, ours: list[int], theirs: list[int]) -> dict:
    student, plain = sum(ours) / len(ours), sum(theirs) / len(theirs)
    return {
        "metric": "accuracy",
        "teacher": {"metric": teacher},
        "student": {"metric": student},
        "labels_only": {"metric": plain},
        "gain": student - plain,
        "paired": paired_accuracy(ours, theirs),
        "data": {"eval_examples": len(ours)},
    }


def test_the_comparison_says_plainly_what_helped():
    from hfkd.report import comparison_lines

    def lines(metrics):
        return " ".join(comparison_lines(metrics))

    # 1,000 rows: 40 only the distilled student got right, 10 only the labels-only one (84.0 against 81.0).
    text = lines(_accuracy_metrics(0.82, *_rows(1000, 40, 10, 800)))
    assert text.startswith("Distillation helped") and "3.00 points higher" in text and "undertrained" not in text
    assert "40 rows only the distilled student got right, 10 only the labels-only one, 800 both, 150 neither" in text
    assert "McNemar's exact p = " in text and "paired bootstrap over the 1000 held-out rows" in text
    text = lines(_accuracy_metrics(0.810, *_rows(1000, 5, 25, 800)))  # the labels alone beat both
    assert (
        text.startswith("Distillation hurt here") and "2.00 points better" in text and "probably undertrained" in text
    )
    same = _rows(1000, 0, 0, 800)[0]
    text = lines(_accuracy_metrics(0.9, same, same))  # identical predictions: the interval is exactly 0
    assert "Distillation made no measurable difference" in text and "+0.00 to +0.00 points" in text
    assert comparison_lines({"metric": "accuracy"}) == []
    # Perplexity per block: every block of the distilled student 10% lower in loss (helped); 10% higher (hurt).
    loss, count = [3.0 + 0.1 * (i % 5) for i in range(40)], [15.0] * 40
    lm = {"metric": "perplexity", "teacher": {"metric": 20.0}, "labels_only": {"metric": 30.0}}
    lower = paired_blocks([0.9 * v for v in loss], count, loss, count, metric="perplexity")
    text = lines({**lm, "student": {"metric": 26.0}, "gain": 4.0, "paired": lower})
    assert text.startswith("Distillation helped") and "40 blocks lower for the distilled student, 0 for" in text
    higher = paired_blocks([1.1 * v for v in loss], count, loss, count, metric="perplexity")
    assert lines({**lm, "student": {"metric": 34.0}, "gain": -4.0, "paired": higher}).startswith("Distillation hurt")
    # Without per-row scores (a metrics.json from before they were kept) the gap is reported untested, no verdict.
    text = lines({**lm, "student": {"metric": 26.0}, "gain": 4.0})
    assert "untested" in text and "helped" not in text and "no measurable" not in text


def test_the_unpaired_band_no_longer_decides():
    """The cases the old unpaired band (hfkd.report.noise_band, removed) called "no measurable difference": one point
    of accuracy on 1,000 rows (band 2 * sqrt((0.8 * 0.2 + 0.81 * 0.19) / 1000) = 3.5 points) and 0.006 bits per byte
    at 3.05 (band 1%). Paired on the same rows, both are a difference when the rows say so."""
    from hfkd.report import comparison_lines

    unpaired_band = 2 * math.sqrt((0.8 * 0.2 + 0.81 * 0.19) / 1000)
    metrics = _accuracy_metrics(0.9, *_rows(1000, 12, 2, 798))  # 81.0 against 80.0: 12 rows won, 2 lost
    assert metrics["gain"] == pytest.approx(0.01) and abs(metrics["gain"]) < unpaired_band
    assert metrics["paired"]["p_value"] == pytest.approx(2 * sum(math.comb(14, i) for i in range(3)) / 2**14)
    assert metrics["paired"]["interval"][0] > 0 and metrics["paired"]["verdict"] == "helped"
    assert " ".join(comparison_lines(metrics)).startswith("Distillation helped")
    # Bits per byte: 29 pieces, each 0.2% lower for the distilled student (3.052 against 3.058).
    bits, nbytes = [3.058 * (100 + 7 * i) for i in range(29)], [100.0 + 7 * i for i in range(29)]
    ours = [v * 3.052 / 3.058 for v in bits]
    paired = paired_blocks(ours, nbytes, bits, nbytes, metric="bits_per_byte")
    assert paired["gain"] == pytest.approx(0.006) and 0.006 < 0.01 * 3.058 and paired["verdict"] == "helped"
    metrics = {"metric": "bits_per_byte", "teacher": {"metric": 1.716}, "student": {"metric": 3.052}}
    metrics.update(labels_only={"metric": 3.058}, gain=0.006, paired=paired)
    text = " ".join(comparison_lines(metrics))
    assert text.startswith("Distillation helped") and "0.006 bits per byte lower" in text
    # And the other way: models that disagree on most rows. 55.0 against 50.0 on 1,000 rows is beyond the old band
    # (4.46 points), but 500 rows won against 450 lost is well within chance (McNemar p ~ 0.11).
    metrics = _accuracy_metrics(0.9, *_rows(1000, 500, 450, 50))
    old_band = 2 * math.sqrt((0.55 * 0.45 + 0.5 * 0.5) / 1000)
    assert metrics["gain"] == pytest.approx(0.05) and metrics["gain"] > old_band
    assert metrics["paired"]["verdict"] == "no measurable difference" and metrics["paired"]["interval"][0] < 0
    assert " ".join(comparison_lines(metrics)).startswith("Distillation made no measurable difference")


def test_born_again_generations_each_teach_the_next_and_are_reported(tmp_path, tiny_text, capsys):
    """generations: 3: the distilled student (generation 1) teaches generation 2 from the same initial weights,
    which teaches generation 3; each generation's metric is in metrics.json, the summary, the card and report.png,
    and the saved student is the last generation (its metric is the run's student metric)."""
    path = _recipe(tmp_path, *tiny_text, generations=3, max_steps=2, teacher_max_steps=1)
    assert main(["distill", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "born-again generation 2/3: the same student, taught by generation 1, 2 steps" in captured.err
    assert "born-again generation 3/3: the same student, taught by generation 2, 2 steps" in captured.err
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    generations = metrics["generations"]
    assert [g["generation"] for g in generations] == [1, 2, 3]
    assert [g["teacher"] for g in generations] == ["the teacher", "generation 1", "generation 2"]
    assert all(g["steps"] == 2 and 0 <= g["metric"] <= 1 for g in generations)
    assert metrics["student"]["metric"] == generations[-1]["metric"]
    assert metrics["wall_time_s"]["born-again generations"] > 0
    card = (out / "README.md").read_text()
    assert "Born-again generations" in card and "The saved student is generation 3." in card
    assert "Born-again generations" in captured.out
    assert (out / "report.png").stat().st_size > 0
    assert not (out / "checkpoints" / "_generation-2").exists()
    # The saved student is generation 3: evaluated again from its folder, it gives generation 3's accuracy.
    assert _accuracy_by_hand(out) == pytest.approx(generations[-1]["metric"])


@pytest.mark.parametrize("value", ["0", "-1", "1.5"])
def test_generations_must_be_a_positive_integer(tmp_path, tiny_text, capsys, value):
    path = _recipe(tmp_path, *tiny_text)
    if value == "1.5":  # not an integer: argparse's own usage error, exit status 2, as for every integer flag
        with pytest.raises(SystemExit) as stop:
            main(["distill", "--config", str(path), "--generations", value])
        assert stop.value.code == 2 and "argument --generations: invalid int value: '1.5'" in capsys.readouterr().err
    else:
        assert main(["distill", "--config", str(path), "--generations", value]) == 2
        assert "generations must be an integer >= 1" in _error(capsys)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- deep mutual learning (peer_model_name_or_path)


@pytest.fixture(scope="module")
def tiny_peer(tiny_text):
    """A tiny BERT without a classification head (the recipe gives it one, seeded) and the teacher's tokenizer."""
    from transformers import BertModel

    folder = tiny_text[0].parent / "peer"
    torch.manual_seed(7)
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    BertTokenizerFast.from_pretrained(tiny_text[0]).save_pretrained(folder)
    return folder


def _peer_recipe(tmp_path, tiny_text, **extra):
    """A recipe without teacher fine-tuning or feature terms: what mutual learning takes."""
    values = dict(finetune_teacher=False, hidden_weight=0.0, max_steps=3, learning_rate=1e-3)
    return _recipe(tmp_path, *tiny_text, **{**values, **extra})


def test_mutual_learning_with_a_peer_from_the_command_line(tmp_path, tiny_text, tiny_peer, capsys):
    """`--peer_model_name_or_path '["<folder>"]'`: the student learns with the peer instead of the teacher; the peer
    is evaluated (its metric is its saved folder's accuracy, recomputed by plain transformers), saved beside the
    student, described in metrics.json, the card and the summary; the teacher is evaluated but does not teach."""
    from transformers import AutoModelForSequenceClassification

    path = _peer_recipe(tmp_path, tiny_text)
    assert main(["distill", "--config", str(path), "--peer_model_name_or_path", json.dumps([str(tiny_peer)])]) == 0
    captured = capsys.readouterr()
    assert "deep mutual learning, the student and 1 peer(s) (peer0)" in captured.err
    assert "the teacher does not teach" in captured.err
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    peer = metrics["peers"]["peer0"]
    assert peer["source"] == str(tiny_peer) and peer["folder"] == "peers/peer0"
    assert metrics["teacher"]["taught"] is False
    # The peer's folder loads with plain transformers, with the run's labels and tokenizer, and its accuracy on the
    # held-out rows is the one reported.
    folder = out / "peers" / "peer0"
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert loaded.config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert peer["params"] == sum(p.numel() for p in loaded.parameters())
    assert BertTokenizerFast.from_pretrained(folder).vocab == BertTokenizerFast.from_pretrained(out).vocab
    assert peer["metric"] == pytest.approx(_accuracy_by_hand(out, folder))
    assert metrics["student"]["metric"] == pytest.approx(_accuracy_by_hand(out))
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 2
    # The peer trained: its encoder moved from the weights it was loaded with.
    start = AutoModelForSequenceClassification.from_pretrained(tiny_peer, num_labels=3)
    assert not torch.equal(start.bert.embeddings.word_embeddings.weight, loaded.bert.embeddings.word_embeddings.weight)
    # The training log has the peer's own terms; the card, the summary and report.png tell of the peer.
    log = json.loads((out / "training_log.json").read_text())
    assert any("peer0/task" in entry and "peer0/distill/logit" in entry for entry in log)
    card = (out / "README.md").read_text()
    assert "deep mutual learning" in card and "no teacher taught it" in card and "deep-mutual-learning" in card
    assert "Deep Mutual Learning (Zhang et al. 2018)" in card and "`peer0` (from" in card
    assert "saved in `peers/peer0/`" in card and "| | teacher | student | peer `peer0` |" in card
    assert "(peer peer0)" in captured.out and "Deep Mutual Learning (Zhang et al. 2018)" in captured.out
    assert (out / "report.png").stat().st_size > 0
    # The saved configuration keeps the peers beside the recipe's teacher, and parses again.
    _, _, config = parse_distill_args(["--config", str(out / "hfkd_config.yaml")])
    assert config.peer_model_name_or_path == [str(tiny_peer)] and config.teacher_model_name_or_path is not None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"generations": 2}, "peer_model_name_or_path with generations=2"),
        ({"teacher_cache_dir": "/tmp/some-cache"}, "teacher_cache_dir is set; unset it, or drop the peers"),
        ({"hidden_weight": 1.0}, "the terms ['hidden'] read features (hidden states, attentions or submodules); "),
        ({"terms": '[{"name": "sp"}]'}, "drop 'sp' from --terms"),
        ({"logit_weight": 0.0}, "nothing would compare the student with its peers"),
        ({"peer_model_name_or_path": '["/no/such/peer"]'}, "the peer 'peer0' ('/no/such/peer') is no folder"),
        ({"peer_model_name_or_path": '{"a": "no-such-peer"}'}, "the peer 'a' ('no-such-peer') is neither a folder"),
        ({"peer_model_name_or_path": "[]"}, "peer_models is an empty list"),
    ],
)
def test_mutual_learning_bad_input_is_refused_before_anything_runs(
    tmp_path, tiny_text, tiny_peer, capsys, change, expected
):
    values = {"peer_model_name_or_path": json.dumps([str(tiny_peer)]), "finetune_teacher": True, **change}
    path = _peer_recipe(tmp_path, tiny_text, **values)
    assert main(["distill", "--config", str(path)]) == 2
    err = _error(capsys)
    assert expected in err and len(err.strip().splitlines()) == 2, err  # the error, then where the traceback is
    assert not (tmp_path / "run").exists()


def test_the_teacher_cache_is_refused_with_peers(tmp_path, tiny_text, tiny_peer, capsys):
    argv = ["--peer_model_name_or_path", str(tiny_peer), "--cache_dir", str(tmp_path / "cache")]
    assert main(["cache", "--config", str(_peer_recipe(tmp_path, tiny_text)), *argv]) == 2
    assert "no teacher outputs to cache" in _error(capsys)
    assert not (tmp_path / "cache").exists()


def test_mutual_learning_resumes_exactly_from_the_command_line(tmp_path, tiny_text, tiny_peer, monkeypatch, capsys):
    """Stopped after checkpoint 2 of 4 and resumed with --resume_from_checkpoint true: the student and the peer end
    bitwise equal to an uninterrupted run's (the trainer restores the peer from the checkpoint's peers/ folder)."""
    from hfkd.trainer import DistillationTrainer

    peers = ["--peer_model_name_or_path", json.dumps({"buddy": str(tiny_peer)})]
    extra = dict(max_steps=4, save_strategy="steps", save_steps=2)
    whole = _peer_recipe(tmp_path, tiny_text, **extra, output_dir=str(tmp_path / "whole"))
    assert main(["distill", "--config", str(whole), *peers]) == 0

    path = _peer_recipe(tmp_path, tiny_text, **extra)
    original = DistillationTrainer._save_checkpoint

    def crash_after_step_2(self, model, trial):
        original(self, model, trial)
        if self.state.global_step == 2:
            raise RuntimeError("killed")

    monkeypatch.setattr(DistillationTrainer, "_save_checkpoint", crash_after_step_2)
    with pytest.raises(RuntimeError, match="killed"):
        main(["distill", "--config", str(path), *peers])
    monkeypatch.setattr(DistillationTrainer, "_save_checkpoint", original)
    out = tmp_path / "run"
    assert (out / "checkpoints" / "checkpoint-2" / "peers" / "buddy" / "model.safetensors").is_file()
    capsys.readouterr()
    # Other peers are another run: refused, naming the field.
    other = ["--peer_model_name_or_path", json.dumps({"other": str(tiny_peer)})]
    assert main(["distill", "--config", str(path), *other, "--resume_from_checkpoint", "true"]) == 2
    assert "peer_model_name_or_path: {'buddy'" in _error(capsys)

    assert main(["distill", "--config", str(path), *peers, "--resume_from_checkpoint", "true"]) == 0
    assert "resuming from" in capsys.readouterr().err
    for name in ("", "peers/buddy"):
        resumed, reference = _state(out / name), _state(tmp_path / "whole" / name)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), (name, key)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"]["resumed"] is True and metrics["training"]["steps"] == 4
    assert (
        metrics["peers"]["buddy"]["metric"]
        == json.loads((tmp_path / "whole" / "metrics.json").read_text())["peers"]["buddy"]["metric"]
    )


# ---------------------------------------------------------------- advice that works, refusals that come first
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hfkd(*args):
    """`hfkd ...` in a subprocess, with this checkout's hfkd: (exit status, stderr)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [sys.executable, "-m", "hfkd", *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )
    return result.returncode, result.stderr


def _hfkd_lines(err: str) -> list[str]:
    """What hfkd itself wrote to stderr (its stage headings and errors), without libraries' logs and progress bars."""
    return [line for line in err.splitlines() if line.startswith(("hfkd: ", "== hfkd: "))]


def test_help_imports_neither_torch_nor_transformers():
    """`hfkd --help` answers without loading the training stack; `from hfkd import ...` still gives every name."""
    code = (
        "import sys, contextlib, io; from hfkd.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
        "print(sorted({'torch', 'transformers', 'hfkd.recipe'} & set(sys.modules)))\n"
        "from hfkd import DistillationTrainer, register_term\n"
        "print(DistillationTrainer.__module__, 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "hfkd.trainer True"]


def test_a_mistyped_flag_or_field_gets_the_nearest_one(tmp_path, tiny_text):
    path = _recipe(tmp_path, *tiny_text)
    status, err = _hfkd("distill", "--config", path, "--max_stpes", "5")
    assert status == 2
    assert err.splitlines()[0] == (
        "hfkd: error: Unknown arguments ['--max_stpes', '5'] (did you mean --max_steps?); `hfkd distill --help` "
        "lists the valid ones."
    )
    assert not (tmp_path / "run").exists()
    path = _recipe(tmp_path, *tiny_text, temprature=3, zzz=1)
    status, err = _hfkd("distill", "--config", path)
    assert (
        status == 2
        and "unknown field(s) ['temprature', 'zzz'] (did you mean temprature -> temperature?)" in err.splitlines()[0]
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "first_line"),
    [
        (["--lmbda", "0.5", "--task_weight", "0"], "hfkd: error: --lmbda: on-policy distillation (lmbda)"),
        (["--seq_kd", "true"], "hfkd: error: --seq_kd: on-policy distillation (lmbda)"),
        (["--terms", '[{"name": "span_kd"}]'], "hfkd: error: --terms ['span_kd']: these compare next-token"),
        (["--tokenize_text_column", "sentence"], "hfkd: error: --tokenize_text_column: these are for"),
        (["--hidden_layer_map", "0,2,9"], "hfkd: error: --hidden_layer_map refers to teacher index 9"),
        (["--attention_weight", "1", "--attention_layer_map", "1"], "hfkd: error: --attention_layer_map has 1"),
    ],
)
def test_refused_before_the_teacher_is_fine_tuned(tmp_path, tiny_text, flags, first_line):
    """Settings the task cannot use fail before stage 1 (minutes to hours on real models), leaving nothing."""
    status, err = _hfkd("distill", "--config", _recipe(tmp_path, *tiny_text), *flags)
    assert status == 2
    # hfkd's first word is the error (the layer maps are checked once the teacher is loaded, after its progress bar).
    assert _hfkd_lines(err)[0].startswith(first_line), err[-3000:]
    assert "stage 1" not in err and not (tmp_path / "run").exists()


def test_cross_tokenizer_terms_need_two_tokenizers_and_are_refused_first(tmp_path, tiny_text):
    """span_kd on a causal LM whose student reads the teacher's tokens: refused after the data, before stage 1."""
    status, err = _hfkd(
        "distill", "--config", _lm_recipe(tmp_path, tiny_text, finetune_teacher=True), "--terms", '[{"name": "uld"}]'
    )
    assert status == 2
    assert _hfkd_lines(err)[0].startswith("hfkd: error: --terms ['uld']: these line up two different tokenizations")
    assert "stage 1" not in err and not (tmp_path / "run").exists()


def _cut_short(checkpoint):
    """A checkpoint as a SIGKILL during its save leaves it: transformers writes trainer_state.json last (and hfkd its
    run file after that), so both are missing, and the optimizer state is written only in part."""
    (checkpoint / "trainer_state.json").unlink()
    (checkpoint / "hfkd_run.json").unlink()
    optimizer = checkpoint / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 8])


def test_resume_passes_over_a_checkpoint_cut_short_by_a_kill(tmp_path, tiny_text, monkeypatch, capsys):
    from hfkd.trainer import DistillationTrainer

    extra = dict(max_steps=6, save_strategy="steps", save_steps=2, teacher_max_steps=1, hidden_weight=0.0)
    path = _recipe(tmp_path, *tiny_text, **extra)
    original = DistillationTrainer._save_checkpoint

    def crash_after_step_4(self, model, trial):
        original(self, model, trial)
        if self.state.global_step == 4:
            raise RuntimeError("killed")

    monkeypatch.setattr(DistillationTrainer, "_save_checkpoint", crash_after_step_4)
    with pytest.raises(RuntimeError, match="killed"):
        main(["distill", "--config", str(path)])
    monkeypatch.undo()
    capsys.readouterr()
    checkpoints = tmp_path / "run" / "checkpoints"
    _cut_short(checkpoints / "checkpoint-4")
    before = _files(tmp_path / "run")

    # Named explicitly, it is refused, naming the newest complete one; nothing changes.
    status, err = _hfkd("distill", "--config", path, "--resume_from_checkpoint", checkpoints / "checkpoint-4")
    assert status == 2
    assert err.splitlines()[0] == (
        f"hfkd: error: resume_from_checkpoint={str(checkpoints / 'checkpoint-4')!r} is incomplete (no "
        "trainer_state.json): the run stopped while saving it (transformers writes trainer_state.json last). Resume "
        f"from the newest complete one, {checkpoints / 'checkpoint-2'} (resume_from_checkpoint=true takes it)."
    )
    assert _files(tmp_path / "run") == before
    # `true` takes checkpoint-2 and says which one it skipped.
    status, err = _hfkd("distill", "--config", path, "--resume_from_checkpoint", "true")
    assert status == 0, err[-3000:]
    assert "skipped checkpoint-4 (no trainer_state.json)" in err
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 6 and metrics["training"]["resumed"] is True
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()  # saved whole this time


def test_class_label_ids_follow_the_order_of_a_teacher_not_fine_tuned_here(tmp_path, tiny_text, monkeypatch):
    """A ClassLabel column listing the classes in another order than the teacher's id2label: each row's id is the
    teacher's id of its class name, never the data's own id (which would swap the labels silently)."""
    import datasets
    import transformers

    teacher_dir, data = tiny_text
    rows = [row.rsplit(",", 1) for row in data.read_text().splitlines()[1:]]
    data_order = ["positive", "negative", "neutral"]  # the teacher's: negative, neutral, positive
    features = datasets.Features(
        {"text": datasets.Value("string"), "sentiment": datasets.ClassLabel(names=data_order)}
    )
    table = {"text": [t for t, _ in rows], "sentiment": [data_order.index(label) for _, label in rows]}
    parquet = tmp_path / "data.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(parquet))
    seen = []
    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        seen.append(self.train_dataset)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", train)
    extra = dict(dataset_name="parquet", data_files=str(parquet), finetune_teacher=False, max_steps=1)
    assert main(["distill", "--config", str(_recipe(tmp_path, teacher_dir, data, **extra))]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    tokenizer = BertTokenizerFast.from_pretrained(teacher_dir)
    teacher_ids = {"awful": 0, "okay": 1, "great": 2}  # the word each class's sentences end with
    for row in seen[0]:
        last_word = tokenizer.decode(row["input_ids"], skip_special_tokens=True).split()[-1]
        assert row["labels"] == teacher_ids[last_word]


def test_the_runs_optimizer_choice_reaches_every_stage(tmp_path, tiny_text, monkeypatch):
    """`optim` (e.g. the fused AdamW the demo uses) drives the teacher's fine-tuning, the distillation and the
    labels-only comparison alike, not the distillation alone."""
    import transformers

    seen = []
    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        seen.append((type(self).__name__, self.args.optim))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", train)
    teacher_dir, data = tiny_text
    extra = dict(optim="adamw_torch_fused", compare_without_distillation=True, max_steps=1, teacher_max_steps=1)
    assert main(["distill", "--config", str(_recipe(tmp_path, teacher_dir, data, **extra))]) == 0
    assert [name for name, _ in seen] == ["Trainer", "_RecipeTrainer", "Trainer"]
    assert {getattr(optim, "value", optim) for _, optim in seen} == {"adamw_torch_fused"}
