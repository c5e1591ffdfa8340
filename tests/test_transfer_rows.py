"""Transfer rows (hfkd.transfer): rows whose label is -100 or None train on the distillation terms alone.

The task loss and dkd (the term that reads labels) are means over the labelled rows of the whole accumulation
window; the logit term is a mean over every row. Checked against float64 sums by hand, across accumulation with the
labelled rows split unevenly, in a window without any label, and across a resume.
"""

import math

import numpy as np
import pytest
import torch
from tiny_models import COMMON, bert, bert_with, classification_data, parameters_of, tiny_bert

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.mixing import confidence_weights
from hfkd.streams import ModelKind
from hfkd.transfer import MissingLabelCollator, missing_label_columns
from hfkd.units import unit_masks

EXAMPLES = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=False)
TOKENS = ModelKind(shifts_labels=False, encoder_decoder=False, token_level=True)
T_LOGIT, T_DKD = 2.0, 4.0  # the logit term's default temperature; dkd's, as set below (CIFAR-100)


def _teacher():
    """A confident teacher: an untrained BERT is near-uniform, and a KL of 1e-4 would test float32 rounding."""
    teacher = bert(dropout=0.0, seed=0)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30.0)
    return teacher


def _student():
    return bert(hidden=16, layers=2, dropout=0.0, seed=1)


def _data(n: int, unlabelled, missing="-100", torch_format=False):
    """`classification_data(n)` with the rows in `unlabelled` carrying no label (-100, or None in the column)."""
    data = classification_data(n=n)
    fill = -100 if missing == "-100" else None
    labels = [fill if i in unlabelled else y for i, y in enumerate(data["labels"])]
    data = data.remove_columns("labels").add_column("labels", labels)
    return data.with_format("torch") if torch_format else data


def _args(tmp_path, **overrides):
    values = dict(
        max_steps=1,
        per_device_train_batch_size=8,
        logging_steps=1,
        task_weight=0.5,
        logit_weight=0.5,
        terms=[{"name": "dkd", "weight": 1.0, "beta": 8.0, "temperature": T_DKD}],  # the paper's CIFAR-100 setting
        train_sampling_strategy="sequential",
        optim="sgd",
        lr_scheduler_type="constant",
    )
    return DistillationConfig(output_dir=str(tmp_path), **{**COMMON, **values, **overrides})


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _kd(z_s, z_t, t):
    p_s, p_t = _softmax(z_s / t), _softmax(z_t / t)
    return t * t * float((p_t * np.log(p_t / p_s)).sum())


def _dkd(z_s, z_t, y, t, alpha=1.0, beta=8.0):
    """The paper's TCKD and NCKD for one example, from their definitions."""
    p_s, p_t = _softmax(z_s / t), _softmax(z_t / t)
    b_s, b_t = [p_s[y], 1 - p_s[y]], [p_t[y], 1 - p_t[y]]
    tckd = sum(q * math.log(q / p) for q, p in zip(b_t, b_s, strict=True))
    rest = [i for i in range(len(z_s)) if i != y]
    hat_s, hat_t = p_s[rest] / p_s[rest].sum(), p_t[rest] / p_t[rest].sum()
    nckd = float((hat_t * np.log(hat_t / hat_s)).sum())
    return t * t * (alpha * tckd + beta * nckd)


def _by_hand(data, student, teacher):
    """float64 sums over the rows: task and dkd over the labelled rows only, the logit term over all."""
    plain = data.with_format(None)
    inputs = {k: torch.tensor(plain[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        z_s, z_t = student.eval()(**inputs).logits.double().numpy(), teacher.eval()(**inputs).logits.double().numpy()
    labels = plain["labels"]
    labelled = [i for i, y in enumerate(labels) if y is not None and y != -100]
    task = sum(-math.log(_softmax(z_s[i])[labels[i]]) for i in labelled)
    dkd = sum(_dkd(z_s[i], z_t[i], labels[i], T_DKD) for i in labelled)
    kd = sum(_kd(z_s[i], z_t[i], T_LOGIT) for i in range(len(labels)))
    per = max(len(labelled), 1)  # no labelled row: 0, not 0 / 0
    return {"task": task / per, "distill/dkd": dkd / per, "distill/logit": kd / len(labels)}


def _first_log(trainer) -> dict:
    return next(e for e in trainer.state.log_history if "loss" in e)


# ---------------------------------------------------------------------------------------------------- the units
def test_labelled_unit_counts_rows_with_a_label_and_token_positions():
    labels = torch.tensor([2, -100, 0, -100])
    masks = unit_masks({"input_ids": torch.ones(4, 3, dtype=torch.long), "labels": labels}, EXAMPLES)
    assert masks["labelled"].tolist() == [True, False, True, False] and masks["logit"] is None
    token_labels = torch.tensor([[1, -100, 2], [-100, -100, -100]])
    masks = unit_masks({"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": token_labels}, TOKENS)
    assert torch.equal(masks["labelled"], masks["logit"]) and int(masks["labelled"].sum()) == 2
    # Regression targets have no -100: every row counts; without labels there is no such unit.
    assert unit_masks({"labels": torch.tensor([0.5, -100.0])}, EXAMPLES)["labelled"] is None
    assert "labelled" not in unit_masks({"input_ids": torch.ones(2, 3, dtype=torch.long)}, EXAMPLES)


def test_a_row_without_a_label_weighs_its_teachers_equally():
    logits = [torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0], [4.0, 0.0, 0.0]])]
    weights = confidence_weights(logits, torch.tensor([0, -100]), shifts_labels=False)
    assert weights[1].tolist() == [0.5, 0.5] and weights[0, 0] > 0.5


# ---------------------------------------------------------------------------------------------------- missing labels
def test_missing_labels_become_minus_100_before_the_collator():
    from transformers import default_data_collator

    data = _data(4, {1, 2}, missing="None")
    assert missing_label_columns(data) == {"labels": True}
    assert missing_label_columns(classification_data(n=4)) == {}
    for rows in (data, data.with_format("torch")):  # torch format turns None into NaN, and the column into floats
        batch = MissingLabelCollator(default_data_collator, ["labels"])([rows[i] for i in range(4)])
        assert batch["labels"].dtype == torch.long
        assert batch["labels"].tolist() == [data[0]["labels"], -100, -100, data[3]["labels"]]


def test_missing_labels_are_refused_where_a_row_has_no_class_to_miss(tmp_path):
    data = _data(8, {1}, missing="None")
    regression = bert_with(labels=1, vocab=99)
    with pytest.raises(ValueError, match=r"Column 'labels' of train_dataset has rows without a label \(None\)"):
        DistillationTrainer(
            model=regression,
            teacher_model=bert_with(labels=1, vocab=99, seed=2),
            args=_args(tmp_path / "r", terms=None),
            train_dataset=data,
        )
    assert not (tmp_path / "r").exists()
    tokens = classification_data(n=4)
    tokens = tokens.remove_columns("labels").add_column("labels", [[1] * 10, None, [2] * 10, [0] * 10])
    with pytest.raises(ValueError, match="for token-level labels give -100"):
        DistillationTrainer(
            model=tiny_bert("token", 16, 2, seed=1),
            teacher_model=tiny_bert("token", 32, 2),
            train_dataset=tokens,
            args=_args(tmp_path / "t", terms=None),
        )


# ---------------------------------------------------------------------------------------------------- the step
@pytest.mark.parametrize(
    "missing,torch_format", [("-100", False), ("None", False), ("None", True)], ids=["minus100", "none", "none-torch"]
)
def test_a_mixed_batch_equals_float64_sums_by_hand(tmp_path, missing, torch_format):
    """One step at learning rate 0: task and dkd are means over the 5 labelled rows, the logit term over all 8."""
    data = _data(8, {1, 4, 5}, missing, torch_format)
    student, teacher = _student(), _teacher()
    expected = _by_hand(data, student, teacher)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=_args(tmp_path, learning_rate=0.0), train_dataset=data
    )
    trainer.train()
    log = _first_log(trainer)
    for key, value in expected.items():
        assert log[key] == pytest.approx(value, rel=1e-5), key
    total = 0.5 * expected["task"] + 0.5 * expected["distill/logit"] + expected["distill/dkd"]
    assert log["loss"] == pytest.approx(total, rel=1e-5)


def test_accumulation_with_labels_split_3_and_0_equals_one_batch(tmp_path):
    """Batch 8 x 1 and 4 x 2 accumulated, the second micro-batch without any label: the same logged values and the
    same SGD update (a mean per micro-batch would weigh 3 rows as much as 0 and give NaN for the empty one)."""
    data = _data(8, {2, 4, 5, 6, 7})  # rows 0-3 (3 labelled) form the first micro-batch, rows 4-7 (none) the second
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        student = _student()
        args = _args(
            tmp_path / str(batch),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.5,
        )
        trainer = DistillationTrainer(model=student, teacher_model=_teacher(), args=args, train_dataset=data)
        trainer.train()
        results.append((_first_log(trainer), parameters_of(student)))
    (log_a, params_a), (log_b, params_b) = results
    for key in ("loss", "task", "distill/logit", "distill/dkd"):
        assert math.isfinite(log_b[key]) and log_a[key] == pytest.approx(log_b[key], rel=1e-5, abs=1e-7), key
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(params_a[n], p) for n, p in parameters_of(_student()).items())


def test_a_window_without_any_label_trains_on_the_terms_alone(tmp_path, caplog):
    """Every row unlabelled: task and dkd are 0 (not NaN), the logit term is the mean over all rows and still
    trains the student; the data check says that the task loss will be 0 throughout."""
    data = _data(8, set(range(8)))
    student, teacher = _student(), _teacher()
    before = parameters_of(student)
    expected = _by_hand(data, student, teacher)
    with caplog.at_level("WARNING", logger="hfkd.checks"):
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=_args(tmp_path, learning_rate=0.5), train_dataset=data
        )
    assert "train_dataset has no labelled row" in caplog.text
    trainer.train()
    log = _first_log(trainer)
    assert log["task"] == 0.0 and log["distill/dkd"] == 0.0
    assert log["distill/logit"] == pytest.approx(expected["distill/logit"], rel=1e-5)
    assert log["loss"] == pytest.approx(0.5 * expected["distill/logit"], rel=1e-5)
    assert any(not torch.equal(before[n], p) for n, p in parameters_of(student).items())


def test_resume_with_transfer_rows_ends_like_an_uninterrupted_run(tmp_path):
    """Accumulated windows with unlabelled rows (one micro-batch without any): a run resumed at step 2 ends with
    the weights of the uninterrupted run."""
    data = _data(16, {1, 2, 3, 5, 8, 9, 10, 11, 14}, missing="None")

    def run(output_dir, resume=None):
        args = _args(
            output_dir,
            max_steps=4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=0.1,
            train_sampling_strategy="random",
            save_strategy="steps",
            save_steps=2,
        )
        student = _student()
        trainer = DistillationTrainer(model=student, teacher_model=_teacher(), args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
        return student

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_a_peer_task_loss_is_also_the_mean_over_the_labelled_rows_of_the_window(tmp_path):
    """Deep mutual learning: each peer's own task loss is normalised like the student's, so 4 x 2 with 3 and 0
    labelled rows per micro-batch equals one batch of 8 for the student and its peer."""
    data = _data(8, {2, 4, 5, 6, 7})
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        student, peer = _student(), bert(hidden=16, layers=2, dropout=0.0, seed=2)
        with torch.no_grad():
            peer.classifier.weight.mul_(30.0)
        args = _args(
            tmp_path / str(batch),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.5,
            terms=None,
            max_grad_norm=1e9,
        )
        trainer = DistillationTrainer(model=student, peer_models=[peer], args=args, train_dataset=data)
        trainer.train()
        params = {f"student.{n}": p for n, p in parameters_of(student).items()}
        params.update({f"peer.{n}": p for n, p in parameters_of(peer).items()})
        results.append((_first_log(trainer), params))
    (log_a, params_a), (log_b, params_b) = results
    for key in ("loss", "task", "distill/logit", "peer0/task", "peer0/distill/logit"):
        assert math.isfinite(log_b[key]) and log_a[key] == pytest.approx(log_b[key], rel=1e-5, abs=1e-7), key
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_processes_with_transfer_rows_match_one(tmp_path):
    """`accelerate launch --num_processes 2` (gloo, CPU), 2 x 4 rows per step, the second process's first
    micro-batch without any label, equals one process with 8: task and dkd count the labelled rows of all processes.
    """
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "scripts" / "distill_run.py"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = {}
    for name, launcher, batch in (("one", [sys.executable], "8"), ("two", launch, "4")):
        out = tmp_path / f"{name}.pt"
        command = [*launcher, str(script), "--output_dir", str(tmp_path / name), "--result", str(out), "--transfer"]
        command += ["--max_steps", "2", "--save_steps", "100", "--per_device_train_batch_size", batch]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        results[name] = torch.load(out)
    one, two = results["one"], results["two"]
    assert two["world_size"] == 2
    for step_a, step_b in zip(one["log"], two["log"], strict=True):
        for key in ("loss", "task", "distill/logit", "distill/hidden", "distill/dkd"):
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-6), (step_a["step"], key)
    for part in ("student", "projector"):
        for key, value in one[part].items():
            torch.testing.assert_close(value, two[part][key], rtol=0, atol=1e-5, msg=key)
