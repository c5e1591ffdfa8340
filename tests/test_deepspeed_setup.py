"""The teacher's DeepSpeed set-up (hfkd.models.prepare_teacher), with the engine mocked at the boundary.

DeepSpeed installs from PyPI without CUDA, but Accelerate joins CPU processes as one under it (issue 22, measured with
DeepSpeed 0.19.8 and accelerate 1.16; hfkd.launch refuses that launch), so no real ZeRO-3 run is possible on this
project's machines. What hfkd adds is tested here: the configuration it hands `deepspeed.initialize` for the teacher.
"""

import copy
import sys
import types

import pytest
import torch
from tiny_models import llama

from hfkd.models import prepare_teacher


class _Engine(torch.nn.Module):
    """What deepspeed.initialize returns in our place: the module it wraps, and the config it was given."""

    def __init__(self, module, config):
        super().__init__()
        self.module, self.config = module, config


@pytest.fixture
def fake_deepspeed(monkeypatch):
    calls = []

    def initialize(model=None, config=None, **kwargs):
        calls.append({"model": model, "config": config, "kwargs": kwargs})
        return _Engine(model, config), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    return calls


def _accelerator(deepspeed_config: dict):
    plugin = types.SimpleNamespace(deepspeed_config=deepspeed_config)
    return types.SimpleNamespace(state=types.SimpleNamespace(deepspeed_plugin=plugin), is_fsdp2=False)


# The student's config as Accelerate fills it from recipes/accelerate/deepspeed_zero3.yaml and the Trainer's arguments.
STUDENT_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    "scheduler": {"type": "WarmupLR", "params": {}},
}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_the_teacher_gets_an_inference_engine_sharded_like_the_student_under_zero3_and_replicated_below(
    fake_deepspeed, stage
):
    config = {**copy.deepcopy(STUDENT_CONFIG), "zero_optimization": {"stage": stage, "overlap_comm": True}}
    before = copy.deepcopy(config)
    teacher = llama(layers=2)
    engine = prepare_teacher(teacher, _accelerator(config))

    assert len(fake_deepspeed) == 1 and fake_deepspeed[0]["model"] is teacher
    given = fake_deepspeed[0]["config"]
    # No optimizer or scheduler: the teacher never steps (an optimizer would also allocate state for its weights).
    assert "optimizer" not in given and "scheduler" not in given
    # ZeRO-3 shards the teacher's weights like the student's; ZeRO-1/2 shard only optimizer state and gradients,
    # which a frozen teacher has none of, so it gets stage 0 (replicated).
    assert given["zero_optimization"] == ({"stage": 3, "overlap_comm": True} if stage == 3 else {"stage": 0})
    # Everything else is the student's: precision and batch sizes agree with the run.
    assert {k: v for k, v in given.items() if k != "zero_optimization"} == {
        k: v for k, v in STUDENT_CONFIG.items() if k not in ("optimizer", "scheduler")
    }
    # The student's own config is left as it was (the teacher's is a copy).
    assert config == before
    # Frozen and in evaluation mode, inside the engine too.
    assert isinstance(engine, _Engine) and not engine.training
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_without_deepspeed_or_fsdp_the_teacher_is_placed_by_accelerate_in_evaluation_mode(fake_deepspeed):
    placed = []

    def prepare_model(model, evaluation_mode=False):
        placed.append(evaluation_mode)
        return model

    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(deepspeed_plugin=None), is_fsdp2=False, prepare_model=prepare_model
    )
    teacher = llama(layers=2)
    assert prepare_teacher(teacher, accelerator) is teacher
    assert placed == [True] and not fake_deepspeed
