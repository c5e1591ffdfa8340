"""FSDP2 on CPU (hfkd.sharding): 2 gloo processes under `accelerate launch`, the student and the teacher sharded
by Accelerate's FSDP plugin (issue 22, item 1): training equal to one process within float32 rounding, the
teacher's parameters split over the processes, a checkpoint that plain transformers loads, and exact resume. Peers
of mutual learning are sharded like the student (issue 22, item 3)."""

import sys
from types import SimpleNamespace

import pytest
import torch
from launches import FSDP_CPU_CONFIG, LAUNCH_TWO
from launches import run_script as _run
from tiny_models import classification_data, teacher_student_pair, tiny_llama
from transformers import LlamaForCausalLM

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.sharding import DetachedGroups, check_teacher_memory, teacher_bytes_per_process
from hfkd.sources.peers import Peers

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


def test_peers_under_fsdp_are_sharded_train_as_in_one_process_and_resume_exactly(tmp_path):
    """Deep mutual learning under FSDP2: the student and one peer, each sharded by the student's plugin; the peer's
    optimizer groups join after FSDP2's preparation of the student and are saved gathered (hfkd_peers_optimizer.pt);
    each model is clipped by its own whole norm (0.1: every step clips both). Equal to one process within 1e-5,
    exact after a kill and resume; the checkpoint's peer loads with plain from_pretrained, and load_best_model_at_end
    brings the sharded peer back to the best checkpoint's (the first: distill_run.py picks the highest loss)."""
    one, two, resumed = tmp_path / "one.pt", tmp_path / "two.pt", tmp_path / "resumed.pt"
    common = ["--max_steps", "4", "--save_steps", "2", "--optim", "adamw_torch", "--learning_rate", "0.01"]
    common += ["--max_grad_norm", "0.1", "--peers", "1", "--eval_best"]
    _run(["--output_dir", str(tmp_path / "a"), "--result", str(one), *common])
    sharded = [*common, "--fsdp", "--per_device_train_batch_size", "4"]
    _run(["--output_dir", str(tmp_path / "b"), "--result", str(two), *sharded], launcher=LAUNCH_TWO)
    a, b = torch.load(one), torch.load(two)
    assert b["fsdp"] and b["world_size"] == 2
    # Each process holds half of the peer after training (FSDP2 splits each tensor by rows); one process all of it.
    (local, total) = b["peer_shares"]["peer0"]
    assert a["peer_shares"]["peer0"] == (total, total) and 0.45 * total <= local <= 0.55 * total, b["peer_shares"]
    # Clipped at every step, the student by its norm and the peer by its own (after clipping: exactly 0.1).
    assert all(step["grad_norm"] > 0.1 for step in a["log"]) and len(b["peer_grad_norms"]) == 4
    for norms_a, norms_b in zip(a["peer_grad_norms"], b["peer_grad_norms"], strict=True):
        assert norms_a["peer0"] == pytest.approx(0.1, rel=1e-5) and norms_b["peer0"] == pytest.approx(0.1, rel=1e-5)
    for step_a, step_b in zip(a["log"], b["log"], strict=True):
        for key in ("loss", "task", "distill/logit", "peer0/task", "peer0/distill/logit", "grad_norm"):
            assert step_a[key] == pytest.approx(step_b[key], rel=1e-5, abs=1e-6), (step_a["step"], key)
    assert [e["step"] for e in b["eval_log"]] == [2, 4] and "eval_peer0/task" in b["eval_log"][0]
    assert a["best"].endswith("checkpoint-2") and b["best"].endswith("checkpoint-2")
    last_a, last_b = a["last_step"], b["last_step"]  # after step 4, before the best checkpoint is loaded
    for part, model in (("student", None), ("peers", "peer0")):
        for x, y in ((last_a[part], last_b[part]), (a[part], b[part])):
            x, y = (x[model], y[model]) if model else (x, y)
            for key, value in x.items():
                torch.testing.assert_close(y[key], value, rtol=0, atol=1e-5, msg=f"{part}.{key}")
    # The checkpoints' peers load with plain transformers; the best one was loaded into the sharded peer.
    peer_b, last_peer_b = b["peers"]["peer0"], last_b["peers"]["peer0"]
    assert max((peer_b[k] - last_peer_b[k]).abs().max() for k in peer_b) > 1e-3
    for step, expected in ((2, peer_b), (4, last_peer_b)):
        folder = tmp_path / "b" / f"checkpoint-{step}"
        saved = LlamaForCausalLM.from_pretrained(folder / "peers" / "peer0").state_dict()
        assert saved.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0, msg=f"checkpoint-{step} {key}")
    assert (tmp_path / "b" / "checkpoint-2" / "hfkd_peers_optimizer.pt").is_file()
    cut = ["--output_dir", str(tmp_path / "c"), "--result", str(resumed), *sharded]
    assert _run([*cut, "--kill_at_step", "3"], launcher=LAUNCH_TWO, check=False).returncode != 0
    _run([*cut, "--resume"], launcher=LAUNCH_TWO)
    c = torch.load(resumed)
    for x, y in ((b, c), (b["last_step"], c["last_step"])):
        for key, value in x["student"].items():
            torch.testing.assert_close(y["student"][key], value, rtol=0, atol=0, msg=f"student.{key}")
        for key, value in x["peers"]["peer0"].items():
            torch.testing.assert_close(y["peers"]["peer0"][key], value, rtol=0, atol=0, msg=f"peer0.{key}")


def test_peers_refuse_fsdp1_deepspeed_and_a_given_optimizer_under_fsdp():
    """What cannot shard peers is refused in `attach`, inside the trainer's check that removes a new output_dir."""
    peers = Peers({"peer": tiny_llama(16, 2, seed=2)})
    fsdp1 = SimpleNamespace(
        is_deepspeed_enabled=False, is_fsdp_enabled=True, accelerator=SimpleNamespace(is_fsdp2=False)
    )
    with pytest.raises(ValueError, match=r"peer_models with FSDP1: .* set `fsdp_version: 2`"):
        peers.attach(SimpleNamespace(**vars(fsdp1), optimizer=None))
    fsdp2 = SimpleNamespace(
        is_deepspeed_enabled=False, is_fsdp_enabled=True, accelerator=SimpleNamespace(is_fsdp2=True)
    )
    with pytest.raises(ValueError, match=r"optimizer given by `optimizers=`.* Let DistillationTrainer create"):
        peers.attach(SimpleNamespace(**vars(fsdp2), optimizer=object()))
    with pytest.raises(ValueError, match="peer_models with DeepSpeed"):
        peers.attach(SimpleNamespace(is_deepspeed_enabled=True))


def test_detached_groups_come_out_and_back_with_their_state_and_refuse_another_runs():
    """The terms' and the peers' groups (the optimizer's last ones) leave the optimizer with their AdamW state while
    FSDP2 saves or loads the student's, and their saved state loads into another optimizer exactly."""

    def stepped(seed):
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(4)]
        optimizer = torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:3]}, {"params": params[3:]}])
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        return params, optimizer

    params, optimizer = stepped(0)
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in params}
    with DetachedGroups(optimizer, 2) as detached:
        assert [g["params"] for g in optimizer.param_groups] == [params[:2]]
        assert set(optimizer.state) == set(params[:2])
        saved = detached.state_dict()
    assert [g["params"] for g in optimizer.param_groups] == [params[:2], params[2:3], params[3:]]
    assert len(saved) == 2 and [len(entry["state"]) for entry in saved] == [1, 1]
    other_params, other = stepped(1)
    with DetachedGroups(other, 2) as detached:
        detached.load(saved, "state")
    for mine, theirs in zip(params[2:], other_params[2:], strict=True):
        for key, value in before[id(mine)].items():
            assert torch.equal(other.state[theirs][key], value)
    with DetachedGroups(other, 1) as detached, pytest.raises(ValueError, match=r"holds \[1, 1\] parameters .* \[1\]"):
        detached.load(saved, "state")


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
