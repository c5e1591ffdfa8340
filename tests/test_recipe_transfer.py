"""Transfer rows in `hfkd distill` recipes (issue 21, item 1): rows without a label from a transfer split or file,
from the training split's own unlabelled rows, or from setting labels aside (labelled_train_samples)."""

import json

import pytest
import torch
import transformers
from recipe_runs import _error, _lm_recipe, _recipe, _split_files, _state

from hfkd.cli import main


@pytest.fixture
def seen(monkeypatch):
    """Every trainer a run trains: its class, the labels of its training rows and the steps it took."""
    runs = []
    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        runs.append(
            {
                "trainer": type(self).__name__,
                "labels": list(self.train_dataset["labels"]),
                "steps": self.state.global_step,
                "max_steps": self.state.max_steps,
            }
        )
        return result

    monkeypatch.setattr(transformers.Trainer, "train", train)
    return runs


def _transfer_file(tmp_path, tiny_text, labels=None, name="transfer.csv", column="sentiment"):
    """40 sentences of the training data's words, with a `sentiment` column empty except where `labels` says."""
    rows = [r.rsplit(",", 1)[0] for r in tiny_text[1].read_text().splitlines()[1:41]]
    labels = labels or {}
    path = tmp_path / name
    path.write_text(f"text,{column}\n" + "\n".join(f"{t},{labels.get(i, '')}" for i, t in enumerate(rows)) + "\n")
    return path


def _metrics(run):
    return json.loads((run / "metrics.json").read_text())


def test_transfer_data_files_join_distillation_and_the_teacher_learns_from_labelled_rows(tmp_path, tiny_text, seen):
    # 4 rows of the transfer file carry a known label: they are labelled rows; the other 36 are transfer rows.
    transfer = _transfer_file(tmp_path, tiny_text, labels={0: "positive", 1: "negative", 2: "neutral", 3: "positive"})
    path = _recipe(tmp_path, *tiny_text, transfer_data_files=str(transfer))
    assert main(["distill", "--config", str(path)]) == 0
    run = tmp_path / "run"
    data = _metrics(run)["data"]
    assert (data["labelled_examples"], data["transfer_examples"], data["train_examples"]) == (76, 36, 112)
    assert "76 labelled and 36 transfer rows" in data["note"]
    assert "76 labelled and 36 transfer rows" in (run / "README.md").read_text()
    assert _metrics(run)["teacher"]["finetune"]["train_examples"] == 76
    # The card says the teacher learnt from the labelled rows, not from all 112 rows distillation reads.
    assert "on 76 labelled examples" in (run / "README.md").read_text()
    teacher, distillation = seen
    assert teacher["trainer"] == "Trainer" and -100 not in teacher["labels"] and len(teacher["labels"]) == 76
    assert distillation["labels"].count(-100) == 36 and len(distillation["labels"]) == 112


def test_unlabelled_rows_of_the_training_split_and_a_transfer_split(tmp_path, tiny_text, seen):
    rows = tiny_text[1].read_text().splitlines()[1:]
    blanks = [f"{row.rsplit(',', 1)[0]}," for row in rows[:7]]  # the same texts, label cell empty
    files = json.loads(_split_files(tmp_path, rows[:60] + blanks, rows[60:]))
    files["unlabelled"] = str(_transfer_file(tmp_path, tiny_text))
    extra = dict(data_files=json.dumps(files), eval_split="test", finetune_teacher=False)
    extra.update(keep_unlabelled_rows=True, transfer_split="unlabelled")
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text, **extra))]) == 0
    data = _metrics(tmp_path / "run")["data"]
    assert (data["labelled_examples"], data["transfer_examples"], data["eval_examples"]) == (60, 47, 20)
    assert "7 training rows without a label (keep_unlabelled_rows)" in data["note"] and "dropped" not in data["note"]
    assert "40 rows of transfer_split='unlabelled' without a label" in data["note"]
    assert seen[0]["labels"].count(-100) == 47 and len(seen[0]["labels"]) == 107


def test_a_share_of_the_labels_and_the_labels_only_comparison_on_the_same_budget(tmp_path, tiny_text, seen):
    """labelled_train_samples=8 of 72: the teacher is fine-tuned on the 8, distillation reads all 72 (9 steps of 8
    rows), and the labels-only student trains on the 8 alone for the same 9 steps."""
    extra = dict(labelled_train_samples=8, compare_without_distillation=True, max_steps=-1, num_train_epochs=1)
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text, **extra))]) == 0
    metrics = _metrics(tmp_path / "run")
    teacher, distillation, labels_only = seen
    assert len(teacher["labels"]) == 8 and -100 not in teacher["labels"]
    assert len(distillation["labels"]) == 72 and distillation["labels"].count(-100) == 64
    assert distillation["trainer"] == "_RecipeTrainer" and distillation["steps"] == 9
    assert (
        labels_only["trainer"] == "Trainer" and len(labels_only["labels"]) == 8 and -100 not in labels_only["labels"]
    )
    assert labels_only["steps"] == 9 == metrics["labels_only"]["steps"]
    assert metrics["labels_only"]["train_examples"] == 8 and "64 transfer rows" in metrics["labels_only"]["note"]
    assert (metrics["data"]["labelled_examples"], metrics["data"]["transfer_examples"]) == (8, 64)
    # The choice is the run's seed's: the 8 labelled rows are the teacher's 8 and the labels-only student's 8.
    assert sorted(teacher["labels"]) == sorted(labels_only["labels"])


def test_max_transfer_samples_caps_the_transfer_rows(tmp_path, tiny_text, seen):
    transfer = _transfer_file(tmp_path, tiny_text)
    extra = dict(transfer_data_files=str(transfer), max_transfer_samples=10, finetune_teacher=False)
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text, **extra))]) == 0
    data = _metrics(tmp_path / "run")["data"]
    assert (data["labelled_examples"], data["transfer_examples"]) == (72, 10) and "chosen from 40" in data["note"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"labelled_train_samples": 500}, "labelled_train_samples=500 is more than the 72 labelled training rows"),
        ({"labelled_train_samples": -1}, "labelled_train_samples must be >= 0"),
        (
            {"labelled_train_samples": 0, "finetune_teacher": False, "compare_without_distillation": True},
            "the labels-only comparison trains the student on the labelled rows alone, but this run has none",
        ),
        ({"labelled_train_samples": 0}, "teacher fine-tuning trains on the labelled rows, but this run has none"),
        ({"transfer_split": "train"}, "transfer_split='train' is also train_split"),
        ({"transfer_split": "unlabelled"}, "transfer_split='unlabelled' is not in the data set"),
        ({"transfer_ignore_labels": True}, "transfer_ignore_labels=true applies to the rows of transfer_split"),
        ({"max_transfer_samples": 5}, "max_transfer_samples caps transfer rows, but no option makes any"),
    ],
)
def test_bad_transfer_settings_are_refused_before_anything_is_written(tmp_path, tiny_text, capsys, change, expected):
    path = _recipe(tmp_path, *tiny_text, **change)
    assert main(["distill", "--config", str(path)]) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_transfer_labels_the_training_split_never_had_are_refused_naming_the_fix(tmp_path, tiny_text, capsys):
    transfer = _transfer_file(tmp_path, tiny_text, labels={0: "sarcastic", 5: "sarcastic", 6: "positive"})
    path = _recipe(tmp_path, *tiny_text, transfer_data_files=str(transfer))
    assert main(["distill", "--config", str(path)]) == 2
    err = _error(capsys)
    assert "'sarcastic' (2 rows)" in err and "--transfer_ignore_labels true" in err and "transfer_data_files=" in err
    assert not (tmp_path / "run").exists()
    # With transfer_ignore_labels every row of the file is a transfer row.
    assert main(["distill", "--config", str(path), "--transfer_ignore_labels", "true", "--max_steps", "1"]) == 0
    data = _metrics(tmp_path / "run")["data"]
    assert (data["labelled_examples"], data["transfer_examples"]) == (72, 40)


def test_transfer_rows_without_the_text_column_are_refused(tmp_path, tiny_text, capsys):
    transfer = _transfer_file(tmp_path, tiny_text)
    transfer.write_text(transfer.read_text().replace("text,sentiment", "sentence,sentiment", 1))
    path = _recipe(tmp_path, *tiny_text, transfer_data_files=str(transfer))
    assert main(["distill", "--config", str(path)]) == 2
    err = _error(capsys)
    assert "text_column='text' is not a column of the transfer rows" in err and "sentence" in err
    assert not (tmp_path / "run").exists()


def test_transfer_options_are_refused_for_causal_lms(tmp_path, tiny_text, capsys):
    path = _lm_recipe(tmp_path, tiny_text, keep_unlabelled_rows=True)
    assert main(["distill", "--config", str(path)]) == 2
    assert "keep_unlabelled_rows: transfer rows are rows without a label, and a causal LM's labels" in _error(capsys)
    assert not (tmp_path / "run").exists()
    assert main(["cache", "--config", str(path), "--cache_dir", str(tmp_path / "cache")]) == 2
    assert "keep_unlabelled_rows" in _error(capsys) and not (tmp_path / "cache").exists()


@pytest.fixture
def one_thread():
    """torch on one thread for the test: the cache runs the teacher on other batches than training does, and with
    several threads a matmul's sums are split by the batch's shape, so the same row's logits can differ in the last
    float32 bits (measured with 2 threads: distill/logit 2.1368e-05 cached against 2.1348e-05 online). One thread sums
    in one order whatever the shape, which the tolerances below assume."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_cache_serves_transfer_rows_with_the_online_losses(tmp_path, tiny_text, capsys, one_thread):
    transfer = _transfer_file(tmp_path, tiny_text)
    extra = dict(transfer_data_files=str(transfer), finetune_teacher=False, hidden_weight=0.0, max_steps=4)
    online = _recipe(tmp_path, *tiny_text, **extra, output_dir=str(tmp_path / "online"))
    assert main(["distill", "--config", str(online)]) == 0
    path = _recipe(tmp_path, *tiny_text, **extra)
    cache = tmp_path / "cache"
    assert main(["cache", "--config", str(path), "--cache_dir", str(cache)]) == 0
    assert "112 rows (40 of them transfer rows)" in capsys.readouterr().out
    assert main(["distill", "--config", str(path), "--teacher_cache_dir", str(cache)]) == 0
    logs = [json.loads((tmp_path / d / "training_log.json").read_text()) for d in ("online", "run")]
    losses = [[e[k] for e in log if "loss" in e for k in ("loss", "task", "distill/logit")] for log in logs]
    assert len(losses[0]) == 12
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-8)
    assert _metrics(tmp_path / "run")["teacher"]["cache"]["rows"] == 112


def test_a_run_with_transfer_rows_resumes_exactly(tmp_path, tiny_text, monkeypatch, capsys):
    from hfkd.trainer import DistillationTrainer

    transfer = _transfer_file(tmp_path, tiny_text)
    extra = dict(
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        teacher_max_steps=3,
        learning_rate=1e-3,
        transfer_data_files=str(transfer),
        labelled_train_samples=30,
    )
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
    # Other transfer settings are not this run's.
    assert (
        main(["distill", "--config", str(path), "--resume_from_checkpoint", "true", "--labelled_train_samples", "20"])
        == 2
    )
    assert "labelled_train_samples: 30 -> 20" in _error(capsys)
    assert main(["distill", "--config", str(path), "--resume_from_checkpoint", "true"]) == 0
    resumed, reference = _state(out), _state(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    metrics = _metrics(out)
    assert metrics["training"]["steps"] == 6 and metrics["training"]["resumed"] is True
    assert (metrics["data"]["labelled_examples"], metrics["data"]["transfer_examples"]) == (30, 82)
