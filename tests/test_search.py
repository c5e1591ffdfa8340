"""Searching temperature and weights: DistillationTrainer.hyperparameter_search (Optuna), hfkd.search.kd_space, and
the recipe's search_trials option; each trial has a new student, its own values and term state, the same teacher."""

import json
import os

import pytest
import torch
import yaml
from tiny_models import COMMON, bert, classification_data
from transformers import TrainerCallback

import hfkd.sources.frozen as frozen
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.cli import main
from hfkd.search import kd_space

optuna = pytest.importorskip("optuna")  # the `search` extra; `dev` installs it, so CI runs these


class _Seen(TrainerCallback):
    """What each run's set-up left on the trainer at its first step: term state, teacher, values."""

    def __init__(self):
        self.trainer, self.runs = None, []

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        logit = t.term_set.terms["logit"]
        self.runs.append(
            {
                "teacher": t.teacher_model,
                "student": kwargs["model"],
                "term_set": t.term_set,
                "projection": {n: p.detach().clone() for n, p in t.term_set.terms["hidden"].named_parameters()},
                "crd_memory": t.term_set.terms["crd"].memory_s.detach().clone(),
                "temperature": logit.options.temperature,
                "task_weight": t.step.settings.task_weight,
                "weights": dict(t.term_set.weights),
            }
        )


def _search_trainer(tmp_path, teacher, seen=None, students=None, **config):
    def model_init():
        if students is not None:
            students.append(1)
        return bert(hidden=16, layers=2, seed=1)

    data = classification_data(n=24)
    args = DistillationConfig(
        output_dir=str(tmp_path / "search"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        hidden_weight=1.0,
        terms=[{"name": "crd", "weight": 0.5, "feat_dim": 8, "num_negatives": 4}],
        **{**COMMON, **config},
    )
    trainer = DistillationTrainer(
        model_init=model_init,
        teacher_model=teacher,
        args=args,
        train_dataset=data.select(range(16)),
        eval_dataset=data.select(range(16, 24)),
        callbacks=[seen] if seen is not None else None,
    )
    if seen is not None:
        seen.trainer = trainer
    return trainer


def test_each_trial_has_its_values_and_new_term_state_and_the_teacher_loads_once(tmp_path, monkeypatch):
    bert(seed=2).save_pretrained(tmp_path / "teacher")
    loads, real_load = [], frozen.load_teacher_with_info
    monkeypatch.setattr(frozen, "load_teacher_with_info", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    seen, students = _Seen(), []
    trainer = _search_trainer(tmp_path, str(tmp_path / "teacher"), seen, students)

    best = trainer.hyperparameter_search(n_trials=3, backend="optuna", sampler=optuna.samplers.RandomSampler(seed=0))

    assert loads == [str(tmp_path / "teacher")]  # once, not once per trial
    assert len(students) == 1 + 3  # the trainer's first student, then one per trial
    history = trainer.search_history
    assert [h["trial"] for h in history] == [0, 1, 2] and len(seen.runs) == 3
    for run, trial in zip(seen.runs, history, strict=True):
        values = trial["values"]
        assert run["temperature"] == pytest.approx(values["temperature"])
        assert run["task_weight"] == pytest.approx(values["task_weight"])
        assert run["weights"]["logit"] == pytest.approx(values["logit_weight"])
        assert run["weights"]["hidden"] == pytest.approx(values["hidden_weight"])
        assert run["weights"]["crd"] == pytest.approx(values["terms"][0]["weight"])
        assert run["teacher"] is seen.runs[0]["teacher"]
        assert isinstance(trial["objective"], float)
    assert len({r["temperature"] for r in seen.runs}) == 3
    assert len({id(r["student"]) for r in seen.runs}) == 3
    assert len({id(r["term_set"]) for r in seen.runs}) == 3
    # Each trial's projection and CRD memory bank start from the same fresh initialisation (the seed is set before
    # model_init), not from the weights the trial before trained.
    first, second = seen.runs[0], seen.runs[1]
    trained = {n: p.detach() for n, p in first["term_set"].terms["hidden"].named_parameters()}
    for name, start in second["projection"].items():
        assert torch.equal(start, first["projection"][name]), name
        assert not torch.equal(start, trained[name]), name
    assert torch.equal(second["crd_memory"], first["crd_memory"])
    assert not torch.equal(first["term_set"].terms["crd"].memory_s, first["crd_memory"])  # the bank was updated

    # The best run names the fields it set; the arguments are back to what they were.
    chosen = history[int(best.run_id)]
    assert best.hyperparameters == chosen["values"] and best.objective == chosen["objective"]
    assert min(h["objective"] for h in history) == best.objective
    assert (trainer.args.temperature, trainer.args.task_weight, trainer.args.hidden_weight) == (2.0, 0.5, 1.0)
    assert trainer.args.terms[0]["weight"] == 0.5
    # Applying them and training again runs with them.
    for name, value in best.hyperparameters.items():
        setattr(trainer.args, name, value)
    seen.runs.clear()
    trainer.train()
    assert seen.runs[0]["temperature"] == pytest.approx(best.hyperparameters["temperature"])
    assert seen.runs[0]["teacher"] is first["teacher"] and loads == [str(tmp_path / "teacher")]


def test_kd_space_follows_the_configured_terms():
    trial = optuna.trial.FixedTrial({"temperature": 3.0, "logit_share": 0.25, "attention_weight": 20.0})
    args = DistillationConfig(output_dir="unused", attention_weight=2.0, report_to=[])
    values = kd_space(args)(trial)
    assert values == {"temperature": 3.0, "task_weight": 0.75, "logit_weight": 0.25, "attention_weight": 20.0}
    # Label-free: the task weight stays 0 and only the temperature is searched.
    free = DistillationConfig(output_dir="unused", task_weight=0.0, logit_weight=1.0, report_to=[])
    assert kd_space(free)(optuna.trial.FixedTrial({"temperature": 1.5})) == {"temperature": 1.5}
    # Ranges: the temperature in [1, 8], a weight within a factor 10 of its configured value.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = kd_space(args)(study.ask())
        assert 1.0 <= values["temperature"] <= 8.0 and 0.2 <= values["attention_weight"] <= 20.0
        assert values["task_weight"] + values["logit_weight"] == pytest.approx(1.0)


def test_kd_space_mixes_at_the_configured_scale_and_holds_the_configured_share():
    # Logit standardisation's paper setting: task 0.1 + logit 9 (W = 9.1, logit share 9 / 9.1 = 0.989).
    args = DistillationConfig(output_dir="unused", task_weight=0.1, logit_weight=9.0, report_to=[])
    values = kd_space(args)(optuna.trial.FixedTrial({"temperature": 2.0, "logit_share": 9.0 / 9.1}))
    assert values["task_weight"] == pytest.approx(0.1) and values["logit_weight"] == pytest.approx(9.0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    shares = []
    for _ in range(30):
        values = kd_space(args)(study.ask())
        assert values["task_weight"] + values["logit_weight"] == pytest.approx(9.1)
        shares.append(values["logit_weight"] / 9.1)
    assert min(shares) >= 0.1 and max(shares) <= 9.0 / 9.1 and max(shares) > 0.9  # [0.1, 0.989]


def test_kd_space_searches_the_options_a_term_declares():
    """DKD's beta and temperature (its search_space) are searched with its weight; the other options stay as set."""
    args = DistillationConfig(
        output_dir="unused",
        logit_weight=0.0,
        terms=[{"name": "dkd", "weight": 1.0, "alpha": 1.0, "warmup_steps": 5}, {"name": "rkd", "weight": 2.0}],
        report_to=[],
    )
    trial = optuna.trial.FixedTrial({"dkd_weight": 0.5, "dkd_beta": 4.0, "dkd_temperature": 2.0, "rkd_weight": 3.0})
    dkd, rkd = kd_space(args)(trial)["terms"]
    assert (dkd["weight"], dkd["beta"], dkd["temperature"]) == (0.5, 4.0, 2.0)
    assert (dkd["alpha"], dkd["warmup_steps"]) == (1.0, 5)
    assert rkd == {"name": "rkd", "weight": 3.0}  # RKD declares no options to search
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        dkd = kd_space(args)(study.ask())["terms"][0]
        assert 0.25 <= dkd["beta"] <= 8.0 and 1.0 <= dkd["temperature"] <= 8.0 and 0.1 <= dkd["weight"] <= 10.0
    # A searched trial's terms build: the values are valid DKD options.
    DistillationConfig(output_dir="unused", logit_weight=0.0, terms=[dkd], report_to=[])


def test_a_search_without_validation_rows_or_model_init_is_refused_before_any_trial(tmp_path):
    trainer = _search_trainer(tmp_path, bert(seed=2))
    trainer.eval_dataset = None
    with pytest.raises(ValueError, match="eval_dataset= rows held out from the training data"):
        trainer.hyperparameter_search(n_trials=1, backend="optuna")
    assert trainer.search_history == [] and not os.path.exists(tmp_path / "search" / "run-0")

    plain = DistillationTrainer(
        model=bert(hidden=16, layers=2, seed=1),
        teacher_model=bert(seed=2),
        args=DistillationConfig(output_dir=str(tmp_path / "plain"), max_steps=1, **COMMON),
        train_dataset=classification_data(n=8),
        eval_dataset=classification_data(n=8, seed=1),
    )
    with pytest.raises(ValueError, match="pass model_init="):
        plain.hyperparameter_search(n_trials=1, backend="optuna")


def test_a_missing_optuna_names_the_extra(tmp_path, monkeypatch):
    import hfkd.search

    trainer = _search_trainer(tmp_path, bert(seed=2))
    monkeypatch.setattr(hfkd.search.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install hfkd\[search\]"):
        trainer.hyperparameter_search(n_trials=1)


def test_model_init_with_a_mean_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass model= instead of model_init"):
        DistillationTrainer(
            model_init=lambda: bert(hidden=16, layers=2, seed=1),
            args=DistillationConfig(output_dir=str(tmp_path / "ema"), teacher_ema_decay=0.9, **COMMON),
            train_dataset=classification_data(n=8),
        )
    assert not os.path.exists(tmp_path / "ema")


# ---------------------------------------------------------------------------------------------------- the recipe
WORDS = "good bad fine great awful okay love hate the a movie film was is very not".split()


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    """A tiny BERT teacher with its tokenizer, and a CSV of 60 labelled sentences, on disk."""
    import numpy as np
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_text")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    labels = ["negative", "neutral", "positive"]
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(root / "teacher")
    BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    rows = ["text,sentiment"]
    for i in range(60):
        rows.append(f"{' '.join(rng.choice(WORDS, size=rng.integers(3, 9)))} {WORDS[i % len(WORDS)]},{labels[i % 3]}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    return root


def _recipe(tmp_path, root, **extra):
    values = {
        "task": "text-classification",
        "teacher_model_name_or_path": str(root / "teacher"),
        "student_num_layers": 2,
        "dataset_name": "csv",
        "data_files": str(root / "data.csv"),
        "text_column": "text",
        "label_column": "sentiment",
        "max_length": 16,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 2,
        "per_device_train_batch_size": 8,
        "hidden_weight": 1.0,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "latency_repeats": 1,
        "latency_batch_size": 2,
        "search_trials": 2,
        "search_validation_fraction": 0.25,
        **extra,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_the_recipe_searches_on_rows_carved_from_training_and_reports_the_choice(tmp_path, tiny_text, monkeypatch):
    import hfkd.recipe.pipeline as pipeline
    import hfkd.recipe.stages as stages

    seen, real_search, real_evaluate = {}, stages._RecipeTrainer.hyperparameter_search, pipeline.evaluate_models

    def spy_search(trainer, *args, **kwargs):
        seen["fit"], seen["validation"] = trainer.train_dataset, trainer.eval_dataset
        return real_search(trainer, *args, **kwargs)

    def spy_evaluate(state):
        seen["state"] = state
        return real_evaluate(state)

    monkeypatch.setattr(stages._RecipeTrainer, "hyperparameter_search", spy_search)
    monkeypatch.setattr(pipeline, "evaluate_models", spy_evaluate)
    assert main(["distill", "--config", str(_recipe(tmp_path, tiny_text))]) == 0

    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    search = metrics["search"]
    assert [t["trial"] for t in search["trials"]] == [0, 1]
    assert all(0.0 <= t["objective"] <= 1.0 for t in search["trials"])  # validation accuracy
    best = max(search["trials"], key=lambda t: t["objective"])
    assert search["chosen"] == best["values"] and search["best_trial"] == best["trial"]
    # The distillation ran with the chosen values on all training rows.
    distilled = metrics["distillation"]
    assert distilled["temperature"] == pytest.approx(search["chosen"]["temperature"])
    assert distilled["terms"]["distill/hidden"]["weight"] == pytest.approx(search["chosen"]["hidden_weight"])
    assert distilled["terms"]["task"]["weight"] == pytest.approx(search["chosen"]["task_weight"])
    train_rows = metrics["data"]["train_examples"]
    assert (
        search["train_rows"] + search["validation_rows"] == train_rows and search["validation_rows"] == 14
    )  # ceil(0.25 x 54)
    # The validation rows come from the training rows, none from the held-out split the figures come from.
    as_rows = lambda ds: {tuple(ids) for ids in ds["input_ids"]}  # noqa: E731
    state = seen["state"]
    assert as_rows(seen["validation"]) <= as_rows(state.data.distill_train_ds)
    assert not as_rows(seen["validation"]) & as_rows(state.data.student_eval_ds)
    assert not as_rows(seen["validation"]) & as_rows(seen["fit"])
    card = (out / "README.md").read_text()
    assert "chosen by a search" in card and f"Best trial #{best['trial']}" in card
    assert "search" in metrics["wall_time_s"]
    assert not (out / "checkpoints" / "_search").exists()


def test_with_transfer_rows_the_trials_are_scored_on_labelled_rows_only(tmp_path, tiny_text, monkeypatch):
    """A transfer row has no label: it cannot score a trial (it would count as wrong in each one), so the validation
    part is carved from the labelled rows and every transfer row stays in the trials' training."""
    import hfkd.recipe.stages as stages

    seen, real_search = {}, stages._RecipeTrainer.hyperparameter_search

    def spy_search(trainer, *args, **kwargs):
        seen["fit"], seen["validation"] = trainer.train_dataset, trainer.eval_dataset
        return real_search(trainer, *args, **kwargs)

    monkeypatch.setattr(stages._RecipeTrainer, "hyperparameter_search", spy_search)
    assert main(["distill", "--config", str(_recipe(tmp_path, tiny_text, labelled_train_samples=20))]) == 0
    search = json.loads((tmp_path / "run" / "metrics.json").read_text())["search"]
    assert search["validation_rows"] == 5 and search["train_rows"] == 54 - 5  # ceil(0.25 x 20 labelled rows)
    assert all(label != -100 for label in seen["validation"]["labels"])
    assert sum(label == -100 for label in seen["fit"]["labels"]) == 54 - 20  # every transfer row trains
    objectives = [trial["objective"] for trial in search["trials"]]
    assert all(round(value * 5) == pytest.approx(value * 5) for value in objectives)  # a share of 5 labelled rows


def test_the_validation_part_is_counted_on_the_labelled_rows(tmp_path, tiny_text, capsys):
    # One labelled row of 54: it would score the trials and leave them no labelled row to train on, although 53
    # training rows (the transfer rows) remain.
    recipe = _recipe(tmp_path, tiny_text, labelled_train_samples=1, search_validation_fraction=0.5)
    assert main(["distill", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "of 1 labelled training rows leaves 1 validation and 0 labelled training rows" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"search_validation_fraction": 0.0}, "search_validation_fraction=0.0: the search scores its trials"),
        ({"search_validation_fraction": 1.0}, "must lie in (0, 1)"),
        ({"search_validation_fraction": 0.999}, "both need at least one"),
        ({"search_trials": -1}, "search_trials must be an integer >= 0"),
        ({"search_max_steps": 0}, "search_max_steps must be a positive number of steps"),
        ({"peer_model_name_or_path": "PEER"}, "search_trials with peer_model_name_or_path"),
    ],
)
def test_a_search_that_cannot_select_fairly_is_refused_and_writes_nothing(
    tmp_path, tiny_text, capsys, change, expected
):
    if change.get("peer_model_name_or_path") == "PEER":
        change = {"peer_model_name_or_path": str(tiny_text / "teacher")}
    assert main(["distill", "--config", str(_recipe(tmp_path, tiny_text, **change))]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_a_recipe_search_without_optuna_names_the_extra(tmp_path, tiny_text, capsys, monkeypatch):
    import hfkd.search

    monkeypatch.setattr(hfkd.search.importlib.util, "find_spec", lambda name: None)
    assert main(["distill", "--config", str(_recipe(tmp_path, tiny_text))]) == 2
    assert "pip install hfkd[search]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
