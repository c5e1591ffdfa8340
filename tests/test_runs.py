"""Runs that must survive: several processes, SIGKILL and resume, non-finite losses, another run's folder."""

import os
import shutil

import pytest
import torch
from launches import LAUNCH_TWO, run_script
from tiny_models import COMMON, bert, classification_data, tiny_llama

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.losses import register_logit_loss
from hfkd.trainer import RUN_FILE, NonFiniteLossError

_run = run_script


def _assert_same(a, b, atol):
    for key in a["student"]:
        torch.testing.assert_close(a["student"][key], b["student"][key], rtol=0, atol=atol, msg=key)
    for key in a["projector"]:
        torch.testing.assert_close(a["projector"][key], b["projector"][key], rtol=0, atol=atol, msg=key)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """`accelerate launch --num_processes 2` (gloo, CPU) with 2 x 4 examples per step equals one process with 8.

    Tolerance 1e-5: the two runs sum the same numbers in another order (all-reduce vs one batch)."""
    one = tmp_path / "one.pt"
    two = tmp_path / "two.pt"
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), "--max_steps", "3", "--save_steps", "100"])
    launcher = LAUNCH_TWO
    _run(
        [
            "--output_dir",
            str(tmp_path / "b"),
            "--result",
            str(two),
            "--max_steps",
            "3",
            "--save_steps",
            "100",
            "--per_device_train_batch_size",
            "4",
        ],
        launcher=launcher,
    )
    a, b = torch.load(one), torch.load(two)
    assert b["world_size"] == 2
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        for key in ("loss", "task", "distill/logit", "distill/hidden"):
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-6), (step_a["step"], key)
    _assert_same(a, b, atol=1e-5)


def test_mutual_learning_in_two_processes_matches_one(tmp_path):
    """Deep mutual learning under DDP: 2 processes x 4 examples equal one process with 8, for the student and both
    peers (each peer's gradients are all-reduced by its own DDP wrapper)."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = ["--max_steps", "3", "--save_steps", "100", "--peers", "2"]
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), *common])
    _run(
        ["--output_dir", str(tmp_path / "b"), "--result", str(two), *common, "--per_device_train_batch_size", "4"],
        launcher=LAUNCH_TWO,
    )
    a, b = torch.load(one), torch.load(two)
    assert b["world_size"] == 2 and set(a["peers"]) == {"peer0", "peer1"}
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        for key in ("loss", "task", "distill/logit", "peer0/task", "peer1/distill/logit"):
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-6), (step_a["step"], key)
    _assert_same(a, b, atol=1e-5)
    for name, trained in a["peers"].items():
        start = tiny_llama(16, 2, seed=2 + int(name[-1])).state_dict()  # as distill_run.py builds peer i
        assert any(not torch.equal(value, start[key]) for key, value in trained.items()), f"{name} did not train"
        for key, value in trained.items():
            torch.testing.assert_close(value, b["peers"][name][key], rtol=0, atol=1e-5, msg=f"{name}.{key}")


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    full, resumed = tmp_path / "full.pt", tmp_path / "resumed.pt"
    _run(["--output_dir", str(tmp_path / "full"), "--result", str(full)])
    killed = _run(
        ["--output_dir", str(tmp_path / "cut"), "--result", str(resumed), "--kill_at_step", "3"], check=False
    )
    assert killed.returncode == -9 and not resumed.exists()
    assert (tmp_path / "cut" / "checkpoint-2" / "hfkd_terms.safetensors").is_file()
    _run(["--output_dir", str(tmp_path / "cut"), "--result", str(resumed), "--resume"])
    _assert_same(torch.load(full), torch.load(resumed), atol=1e-6)


_CALLS = {"n": 0}


@register_logit_loss("test_nan_at_third_call")
def _nan_at_third_call(student_logits, teacher_logits, **_):
    _CALLS["n"] += 1
    loss = (student_logits.float() - teacher_logits.float()).pow(2).mean(-1)
    return loss * float("nan") if _CALLS["n"] == 3 else loss


def test_non_finite_loss_stops_with_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path):
    _CALLS["n"] = 0
    student = bert(hidden=16, layers=2, dropout=0.0)
    args = DistillationConfig(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=4,
        logit_loss="test_nan_at_third_call",
        **{**COMMON, "save_strategy": "steps"},
        save_steps=2,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=bert(dropout=0.0), args=args, train_dataset=classification_data()
    )
    _CALLS["n"] = 0  # the probe before training does not call the loss, but be explicit
    with pytest.raises(NonFiniteLossError, match=r"step 3: distill/logit went bad.*checkpoint-2"):
        trainer.train()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    for name, param in student.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], param), name  # the bad step changed nothing
    # The checkpoint the message names is the last one: the failing step saved nothing.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


def _train(tmp_path, teacher, **config):
    args = DistillationConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        **{**COMMON, "save_strategy": "steps"},
        save_steps=1,
        **config,
    )
    trainer = DistillationTrainer(
        model=bert(hidden=16, layers=2), teacher_model=teacher, args=args, train_dataset=classification_data(n=8)
    )
    trainer.train()
    return trainer


def test_another_runs_checkpoints_are_not_mixed_in(tmp_path):
    _train(tmp_path, bert(seed=1))
    assert (tmp_path / RUN_FILE).is_file() and (tmp_path / "checkpoint-1" / RUN_FILE).is_file()
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="holds checkpoints of another run.*overwrite_output_dir"):
        _train(tmp_path, bert(seed=1, layers=2))  # another teacher architecture
    assert sorted(os.listdir(tmp_path)) == before
    _train(tmp_path, bert(seed=1))  # the same run again is fine
    _train(tmp_path, bert(seed=1, layers=2), overwrite_output_dir=True)  # asked for: the old checkpoints go
    with pytest.raises(ValueError, match="written by another run"):
        args = DistillationConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, **COMMON)
        DistillationTrainer(
            model=bert(hidden=16, layers=2),
            teacher_model=bert(seed=1),
            args=args,
            train_dataset=classification_data(n=8),
        ).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    shutil.rmtree(tmp_path)


def test_resume_true_passes_over_a_checkpoint_cut_short_while_saving(tmp_path, caplog):
    """A kill while checkpoint-2 was written leaves it without trainer_state.json (transformers writes it last) and
    without hfkd's run file (written after it): `True` resumes from checkpoint-1 and says so; checkpoint-2 by name is
    refused, naming checkpoint-1."""

    def trainer(max_steps, save):
        args = DistillationConfig(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            **{**COMMON, "save_strategy": "steps" if save else "no"},
            save_steps=1,
        )
        return DistillationTrainer(
            model=bert(hidden=16, layers=2),
            teacher_model=bert(seed=1),
            args=args,
            train_dataset=classification_data(n=8),
        )

    trainer(2, save=True).train()
    cut = tmp_path / "checkpoint-2"
    (cut / "trainer_state.json").unlink()
    (cut / RUN_FILE).unlink()
    (cut / "optimizer.pt").write_bytes((cut / "optimizer.pt").read_bytes()[:100])

    with pytest.raises(ValueError, match=r"checkpoint-2' is incomplete \(no trainer_state.json\).*checkpoint-1"):
        trainer(3, save=False).train(resume_from_checkpoint=str(cut))
    with caplog.at_level("WARNING", logger="hfkd.trainer"):
        result = trainer(3, save=False).train(resume_from_checkpoint=True)
    assert result.global_step == 3
    assert any("checkpoint-1" in r.getMessage() and "skipped checkpoint-2" in r.getMessage() for r in caplog.records)
