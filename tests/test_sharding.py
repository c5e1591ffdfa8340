"""FSDP2 on CPU (hfkd.sharding): 2 gloo processes under `accelerate launch`, the student and the teacher sharded
by Accelerate's FSDP plugin (issue 22, item 1): training equal to one process within float32 rounding, the
teacher's parameters split over the processes, a checkpoint that plain transformers loads, and exact resume."""

import sys

import pytest
import torch
from launches import FSDP_CPU_CONFIG, LAUNCH_TWO
from launches import run_script as _run
from tiny_models import classification_data, teacher_student_pair, tiny_llama
from transformers import LlamaForCausalLM

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.sharding import check_teacher_memory, teacher_bytes_per_process

TWO = ["--fsdp", "--logit_only", "--per_device_train_batch_size", "4"]  # 2 x 4 rows = one process's 8


def test_fsdp_on_two_cpu_processes_equals_one_process_and_shards_the_teacher(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = ["--max_steps", "3", "--save_steps", "3"]
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), *common, "--logit_only"])
    _run(["--output_dir", str(tmp_path / "b"), "--result", str(two), *common, *TWO], launcher=LAUNCH_TWO)
    a, b = torch.load(one), torch.load(two)
    assert not a["fsdp"] and b["fsdp"] and b["world_size"] == 2
    # The logit term reads both heads by chunks (logit_chunk_size 128) under FSDP2 too: the teacher's head is
    # gathered for the chunks, the student's stays whole from its forward to its backward.
    assert a["chunked"] and b["chunked"]
    # Each process holds about half of the teacher (FSDP2 splits each tensor by rows, rounding up on process 0).
    ((local, total),) = b["teacher_shares"]
    assert a["teacher_shares"] == [(total, total)] and 0.45 * total <= local <= 0.55 * total, b["teacher_shares"]
    # And still after training: FSDP2 keeps a root module gathered after its forward unless told otherwise (a
    # teacher, which has no backward, would hold its embeddings and head whole from the first step on).
    assert b["teacher_shares_after"] == b["teacher_shares"]
    # teacher_memory_limit's estimate is what process 0 held (float32 teacher).
    assert teacher_bytes_per_process(tiny_llama(32, 4, seed=0), 2) == 4 * local
    assert teacher_bytes_per_process(tiny_llama(32, 4, seed=0), 1) == 4 * total
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        for key in ("loss", "task", "distill/logit", "grad_norm"):
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-6), (step_a["step"], key)
    assert a["student"].keys() == b["student"].keys()
    for key, value in a["student"].items():  # gathered whole from both processes (the full state dict)
        torch.testing.assert_close(b["student"][key], value, rtol=0, atol=1e-5, msg=key)
    # The checkpoint holds the whole student, loadable by plain transformers.
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "b" / "checkpoint-3").state_dict()
    for key, value in b["student"].items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=key)


def test_a_term_with_a_projection_under_fsdp_trains_as_in_one_process_and_resumes_exactly(tmp_path):
    """The hidden term projects the student's 16-wide states to the teacher's 32: the projection is replicated (DDP)
    beside the sharded student, joins the optimizer after FSDP2's preparation, is clipped with the student by their
    joint norm, and its optimizer state is saved beside FSDP's (hfkd_terms_optimizer.pt). The sharded optimizer state
    and student come back exactly after a kill (AdamW: plain SGD keeps no state, which torch's full-state-dict
    loading of a sharded optimizer cannot place)."""
    one, two, resumed = tmp_path / "one.pt", tmp_path / "two.pt", tmp_path / "resumed.pt"
    # AdamW at 0.01: at the SGD runs' 0.5 its steps blow the loss up to ~300, where float32 sums taken in another
    # order (reduce-scatter against one batch) drift apart by 1e-4 even between DDP and one process.
    common = ["--max_steps", "4", "--save_steps", "2", "--optim", "adamw_torch", "--learning_rate", "0.01"]
    common += ["--max_grad_norm", "0.1"]  # below every step's norm: each step clips by the joint norm
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), *common])
    sharded = [*common, "--fsdp", "--per_device_train_batch_size", "4"]
    _run(["--output_dir", str(tmp_path / "b"), "--result", str(two), *sharded], launcher=LAUNCH_TWO)
    a, b = torch.load(one), torch.load(two)
    assert b["fsdp"] and a["projector"] and a["projector"].keys() == b["projector"].keys()
    assert all(step["grad_norm"] > 0.1 for step in a["log"])
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        for key in ("loss", "distill/logit", "distill/hidden", "grad_norm"):
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-6), (step_a["step"], key)
    _assert_close(a, b, atol=1e-5)
    assert (tmp_path / "b" / "checkpoint-2" / "hfkd_terms_optimizer.pt").is_file()
    cut = ["--output_dir", str(tmp_path / "c"), "--result", str(resumed), *sharded]
    assert _run([*cut, "--kill_at_step", "3"], launcher=LAUNCH_TWO, check=False).returncode != 0
    _run([*cut, "--resume"], launcher=LAUNCH_TWO)
    _assert_close(b, torch.load(resumed), atol=0)


def test_a_mean_teacher_under_fsdp_averages_each_shard_as_one_process_and_resumes_exactly(tmp_path):
    """teacher_ema_decay under FSDP2: the teacher (a copy of the student) is sharded like the student, each process
    averages its own shard after every step; equal to one process, and exact after a kill and resume (the
    checkpoint's teacher is gathered from both processes, and each takes its shard back on loading)."""
    one, two, resumed = tmp_path / "one.pt", tmp_path / "two.pt", tmp_path / "resumed.pt"
    common = ["--max_steps", "4", "--save_steps", "2", "--optim", "adamw_torch", "--learning_rate", "0.01"]
    common += ["--ema", "0.5"]
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), *common])
    sharded = [*common, "--fsdp", "--per_device_train_batch_size", "4"]
    _run(["--output_dir", str(tmp_path / "b"), "--result", str(two), *sharded], launcher=LAUNCH_TWO)
    a, b = torch.load(one), torch.load(two)
    assert b["fsdp"] and b["world_size"] == 2
    # The teacher has moved away from the student (it averages), by far more than the tolerance below.
    assert max((a["ema"][k] - a["student"][k]).abs().max() for k in a["student"]) > 1e-3
    assert a["log"][-1]["distill/logit"] > 0
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        for key in ("loss", "distill/logit", "distill/hidden"):
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-6), (step_a["step"], key)
    for part in ("student", "ema"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=1e-5, msg=f"{part}.{key}")
    assert (tmp_path / "b" / "checkpoint-2" / "hfkd_ema_teacher.safetensors").is_file()
    cut = ["--output_dir", str(tmp_path / "c"), "--result", str(resumed), *sharded]
    assert _run([*cut, "--kill_at_step", "3"], launcher=LAUNCH_TWO, check=False).returncode != 0
    _run([*cut, "--resume"], launcher=LAUNCH_TWO)
    c = torch.load(resumed)
    for part in ("student", "ema"):
        for key, value in b[part].items():
            torch.testing.assert_close(c[part][key], value, rtol=0, atol=0, msg=f"{part}.{key}")


def _assert_close(a, b, atol):
    for part in ("student", "projector"):
        for key, value in a[part].items():
            torch.testing.assert_close(b[part][key], value, rtol=0, atol=atol, msg=f"{part}.{key}")


def test_fsdp_from_the_launchers_config_shards_on_cpu(tmp_path):
    """FSDP asked for by the shipped accelerate config (recipes/accelerate/fsdp_cpu.yaml: FSDP_* environment
    variables, no layer class named), not by the training arguments."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP_CPU_CONFIG]
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = ["--max_steps", "2", "--save_steps", "100", "--logit_only"]
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), *common])
    _run(["--output_dir", str(tmp_path / "b"), "--result", str(two), *common, "--per_device_train_batch_size", "4"],
         launcher=launcher)  # fmt: skip
    a, b = torch.load(one), torch.load(two)
    assert b["fsdp"] and b["teacher_shares"][0][0] < 0.55 * b["teacher_shares"][0][1]
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("teachers", ["--two_teachers", "--gpt2_teacher"])
def test_two_teachers_or_another_family_are_sharded_and_train_as_in_one_process(tmp_path, teachers):
    """Two Llama teachers, each sharded; or a GPT-2 teacher for the Llama student: the plugin names
    LlamaDecoderLayer, which GPT-2 does not hold, so it is wrapped by its own GPT2Block."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = ["--max_steps", "2", "--save_steps", "100", teachers]
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), *common, "--logit_only"])
    _run(["--output_dir", str(tmp_path / "b"), "--result", str(two), *common, *TWO], launcher=LAUNCH_TWO)
    a, b = torch.load(one), torch.load(two)
    assert len(b["teacher_shares"]) == (2 if teachers == "--two_teachers" else 1)
    for (local, total), (whole, _) in zip(b["teacher_shares"], a["teacher_shares"], strict=True):
        assert whole == total and local <= 0.55 * total
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        assert step_a["distill/logit"] == pytest.approx(step_b["distill/logit"], rel=1e-5, abs=1e-6)
    for key, value in a["student"].items():
        torch.testing.assert_close(b["student"][key], value, rtol=0, atol=1e-5, msg=key)


def test_a_wrap_class_the_student_does_not_hold_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    command = ["--output_dir", str(out), "--result", str(tmp_path / "r.pt"), *TWO, "--wrap_class", "BertLayer"]
    result = _run(command, launcher=LAUNCH_TWO, check=False)
    assert result.returncode != 0
    message = "name ['BertLayer'], which the student (LlamaForCausalLM) does not hold. Name its layer class"
    assert result.stderr.count(message) == 2, result.stderr[-3000:]
    assert "['LlamaDecoderLayer']" in result.stderr and not out.exists() and not (tmp_path / "r.pt").exists()


def test_a_sharded_checkpoint_resumes_with_another_process_count(tmp_path):
    """Checkpoints hold full state dicts (FULL_STATE_DICT): a run saved by 2 processes resumes with 4 (2 rows each:
    the same global batch of 8, the same rows per step) and ends where the uninterrupted 2-process run ends."""
    full, resumed = tmp_path / "full.pt", tmp_path / "resumed.pt"
    common = ["--max_steps", "4", "--save_steps", "2", "--optim", "adamw_torch", "--learning_rate", "0.01", "--fsdp"]
    two = [*common, "--per_device_train_batch_size", "4"]
    _run(["--output_dir", str(tmp_path / "full"), "--result", str(full), *two], launcher=LAUNCH_TWO)
    cut = ["--output_dir", str(tmp_path / "cut"), "--result", str(resumed)]
    assert _run([*cut, *two, "--kill_at_step", "3"], launcher=LAUNCH_TWO, check=False).returncode != 0
    four = [*LAUNCH_TWO[:4], "4", *LAUNCH_TWO[5:]]
    _run([*cut, *common, "--per_device_train_batch_size", "2", "--resume"], launcher=four)
    a, b = torch.load(full), torch.load(resumed)
    assert b["world_size"] == 4
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        assert step_a["loss"] == pytest.approx(step_b["loss"], rel=1e-5)
    _assert_close(a, b, atol=1e-6)


def test_a_teacher_larger_than_teacher_memory_limit_is_refused_before_anything_is_written(tmp_path):
    teacher, student = teacher_student_pair("bert_sequence")
    need = teacher_bytes_per_process(teacher, 1)
    out = tmp_path / "run"
    args = dict(output_dir=str(out), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"teacher_memory_limit='1KB' allows 1,000 bytes .* whole in every process"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=DistillationConfig(**args, teacher_memory_limit="1KB"),
            train_dataset=classification_data(),
        )
    assert not out.exists()
    DistillationTrainer(  # a limit the teacher fits: no complaint
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(**args, teacher_memory_limit=str(need)),
        train_dataset=classification_data(),
    )
    # Sharded over 2 processes, the same teacher needs about half (rows rounded up on the first process).
    check_teacher_memory(str(need // 2 + 1000), {"teacher": teacher}, processes=2, sharded=True)
    with pytest.raises(ValueError, match="sharded over 2 processes"):
        check_teacher_memory(str(need // 3), {"teacher": teacher}, processes=2, sharded=True)
    with pytest.raises(ValueError, match="teacher_memory_limit must be a positive size"):
        DistillationConfig(**args, teacher_memory_limit="lots")
