"""Launches whose processes would train apart, or unsharded where FSDP was asked for, stop before the first step
(hfkd.launch; issue 22, "nothing silent"). The two launches that ran silently before are run for real with
`accelerate launch` and 2 CPU processes."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from launches import ENV, FSDP_CPU_CONFIG, LAUNCH_TWO, SCRIPT
from recipe_runs import _recipe
from tiny_models import bert, classification_data

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.cli import main
from hfkd.launch import check_launch, fsdp_applies, launched_processes

_NO_FSDP_ENV = {"WORLD_SIZE": None, "ACCELERATE_USE_FSDP": None}


@pytest.fixture
def env(monkeypatch):
    """Sets the launcher's variables for one test (None: unset)."""

    def set_env(**values):
        for key, value in {**_NO_FSDP_ENV, **values}.items():
            if value is None:
                monkeypatch.delenv(key, raising=False)
            else:
                monkeypatch.setenv(key, value)

    return set_env


def test_processes_launched_but_not_joined_are_refused_with_the_fix(env):
    env(WORLD_SIZE="2")
    assert launched_processes() == 2
    args = SimpleNamespace(use_cpu=False, fsdp=None)
    with pytest.raises(ValueError, match=r"2 processes were launched \(WORLD_SIZE=2\), but this run joined 1") as err:
        check_launch(args, processes=1, distributed_type="NO")
    assert "use_cpu=True" in str(err.value) and "multi_cpu_2proc.sh" in str(err.value)
    check_launch(args, processes=2, distributed_type="MULTI_CPU")  # joined: no error
    env()
    check_launch(args, processes=1, distributed_type="NO")  # run directly: WORLD_SIZE unset


def test_fsdp_asked_for_but_not_applied_is_refused(env):
    env(WORLD_SIZE="2", ACCELERATE_USE_FSDP="true")
    args = SimpleNamespace(use_cpu=True, fsdp=None)
    with pytest.raises(ValueError, match=r"FSDP was asked for by the launcher .*distributed type MULTI_CPU"):
        check_launch(args, processes=2, distributed_type="MULTI_CPU")
    with pytest.raises(ValueError, match="FSDP was asked for"):  # the trainer's own answer wins over the type's
        check_launch(args, processes=2, distributed_type="MULTI_GPU", fsdp_applied=False)
    check_launch(args, processes=2, distributed_type="MULTI_GPU")  # Accelerate shards over GPUs
    check_launch(args, processes=2, distributed_type="FSDP", fsdp_applied=True)
    env(WORLD_SIZE="2")
    check_launch(SimpleNamespace(use_cpu=False, fsdp=["full_shard"]), processes=2, distributed_type="MULTI_GPU")
    with pytest.raises(ValueError, match=r"FSDP was asked for by the training arguments"):
        check_launch(SimpleNamespace(use_cpu=True, fsdp=["full_shard"]), processes=2, distributed_type="MULTI_CPU")
    assert fsdp_applies("DistributedType.MULTI_GPU") and not fsdp_applies("MULTI_CPU")
    env(ACCELERATE_USE_FSDP="true")  # one process: nothing to shard over, nothing silent
    check_launch(SimpleNamespace(use_cpu=True, fsdp=None), processes=1, distributed_type="NO")


def test_the_trainer_refuses_before_creating_its_output_dir(env, tmp_path):
    out = tmp_path / "run"
    config = DistillationConfig(output_dir=str(out), max_steps=1, report_to=[], use_cpu=True)
    env(WORLD_SIZE="2")  # this process has joined no other: as one of two launched without use_cpu
    with pytest.raises(ValueError, match="2 processes were launched"):
        DistillationTrainer(
            model=bert(hidden=16, layers=2, seed=1),
            teacher_model=bert(seed=0),
            args=config,
            train_dataset=classification_data(),
        )
    assert not out.exists()


def test_a_recipe_refuses_before_anything_is_written(env, tmp_path, tiny_text, capsys):
    env(WORLD_SIZE="2")
    assert main(["distill", "--config", str(_recipe(tmp_path, *tiny_text))]) == 2
    assert "2 processes were launched (WORLD_SIZE=2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _launch(tmp_path, launcher, *extra):
    out = tmp_path / "run"
    command = [*launcher, SCRIPT, "--output_dir", str(out), "--result", str(tmp_path / "r.pt"), *extra]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    return result, out


def test_two_processes_launched_without_use_cpu_stop_before_the_first_step(tmp_path):
    """Before hfkd.launch, these two processes each trained alone as process 0 of 1, without an error."""
    result, out = _launch(tmp_path, LAUNCH_TWO, "--no_use_cpu", "--max_steps", "1")
    assert result.returncode != 0
    assert result.stderr.count("2 processes were launched (WORLD_SIZE=2), but this run joined 1") == 2
    assert not out.exists() and not (tmp_path / "r.pt").exists()


def test_an_fsdp_launch_of_a_recipe_on_cpu_stops_before_the_first_step(tmp_path, tiny_text):
    """accelerate's FSDP config on CPU around `hfkd distill`: before hfkd.launch its processes ran as plain DDP, each
    holding everything (DistillationTrainer shards on CPU, tests/test_sharding.py; the recipe's other stages not)."""
    recipe = _recipe(tmp_path, *tiny_text)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CPU_CONFIG, "-m", "hfkd"]
    command += ["distill", "--config", str(recipe), "--use_cpu", "true"]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode != 0
    assert result.stderr.count("FSDP was asked for by the launcher") == 2, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()
