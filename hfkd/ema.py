"""A teacher that is an exponential moving average of the student: self-distillation with a mean teacher.

Tarvainen & Valpola (NeurIPS 2017), "Mean teachers are better role models": after every optimizer step the
teacher's weights become theta_T <- a_t theta_T + (1 - a_t) theta_S, with a_t = min(a, 1 - 1 / (t + 1)) at update t
(counted from 0), so that early on, while the student moves fast, the teacher follows it closely. The paper uses
a = 0.99 early in training and 0.999 later; hfkd's default is 0.999. Floating-point buffers (BatchNorm statistics)
are averaged the same way, since the teacher runs in eval mode and never updates its own; integer buffers are
copied.

The update is one fused in-place `torch._foreach_lerp_` over all tensors, so it costs a few passes over the
student's weights. Under FSDP2 the teacher is sharded like the student (the same plugin, the same layer classes),
so each process averages its own shard of each weight, with no communication; the checkpoint gathers the whole
teacher (a collective on every process, `gather_state`) and loading gives each process its shard back. The
teacher is saved in each checkpoint (`hfkd_ema_teacher.safetensors`) and restored on
resume; the exported student never contains it. A teacher cache cannot stand for a teacher that changes every
step, so `teacher_cache_dir` is refused with it.
"""

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from .sharding import copy_whole, whole_state

EMA_FILE = "hfkd_ema_teacher.safetensors"


class EMATeacher:
    """Keeps `teacher` the exponential moving average of `student` (both plain modules of the same structure)."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, decay: float):
        self.teacher, self.student, self.decay = teacher, student, decay
        t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
        if t_params.keys() != s_params.keys():
            raise ValueError("The EMA teacher must have the student's parameters; build it as a copy of the student.")
        names = list(s_params)
        for n in names:
            _check_same_shards(n, t_params[n], s_params[n])
        # Pairs of tensors updated together, in a fixed order (the same in every process and after a resume).
        self._float = [(t_params[n], s_params[n]) for n in names]
        t_buffers, s_buffers = dict(teacher.named_buffers()), dict(student.named_buffers())
        self._float += [(t_buffers[n], b) for n, b in s_buffers.items() if b.is_floating_point()]
        self._copied = [(t_buffers[n], b) for n, b in s_buffers.items() if not b.is_floating_point()]

    def decay_at(self, update: int) -> float:
        """The decay used at update `update` (0-based): the mean teacher's ramp, then `decay`."""
        return min(self.decay, 1.0 - 1.0 / (update + 1))

    @torch.no_grad()
    def update(self, update: int) -> None:
        weight = 1.0 - self.decay_at(update)
        # Sharded weights (FSDP2 DTensors) are averaged shard by shard: both sides hold the same rows here.
        targets = [_local(t) for t, _ in self._float]
        sources = [_local(s).detach() for _, s in self._float]
        sources = [s.to(t.dtype) if s.dtype != t.dtype else s for t, s in zip(targets, sources, strict=True)]
        torch._foreach_lerp_(targets, sources, weight)
        for t, s in self._copied:
            t.copy_(s)

    def gather_state(self) -> dict:
        """The teacher's whole weights on the CPU. Under FSDP2 each weight is gathered from every process: a
        collective that every process must call, in the same order."""
        return whole_state(self.teacher)

    def save(self, directory: str, state: dict | None = None) -> None:
        """Writes the teacher (`state`: gathered by `gather_state` beforehand, needed when it is sharded)."""
        state = self.gather_state() if state is None else state
        save_file(_untied(state), os.path.join(directory, EMA_FILE))

    def load(self, directory: str) -> None:
        path = os.path.join(directory, EMA_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"{directory} holds no {EMA_FILE}, but this run's teacher is an EMA of the student "
                "(teacher_ema_decay): the checkpoint comes from another kind of run. Resume from a checkpoint of this "
                "run or start without resume_from_checkpoint."
            )
        state = load_file(path)
        mine = self.teacher.state_dict()
        missing = sorted(set(mine) - set(state) - _tied_names(mine))
        if missing or set(state) - set(mine):
            raise ValueError(f"The EMA teacher in {path} does not match this student ({missing[:3]} ...).")
        for key, value in state.items():
            copy_whole(mine[key], value)  # every process read the whole tensor: each keeps its own shard


class EMAUpdate(TrainerCallback):
    """Updates the EMA teacher after every optimizer step that was applied (not after a skipped fp16 step).

    `ema`: the EMATeacher, or a function returning it (bound once the student is prepared, under FSDP2)."""

    def __init__(self, ema, step_was_skipped):
        self.ema, self.step_was_skipped = ema, step_was_skipped

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.step_was_skipped():
            ema = self.ema if isinstance(self.ema, EMATeacher) else self.ema()
            # global_step counts the steps before this one: the update's index, the same after a resume.
            ema.update(state.global_step)


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded weight's shard on this process (it shares the weight's storage), else the tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def _check_same_shards(name: str, teacher: torch.Tensor, student: torch.Tensor) -> None:
    if _is_dtensor(teacher) != _is_dtensor(student) or (
        _is_dtensor(student)
        and (teacher.placements != student.placements or teacher.device_mesh != student.device_mesh)
    ):
        raise ValueError(
            f"The EMA teacher's {name} is not sharded like the student's: each process must hold the same part of "
            "both to average them. Shard both with the run's FSDP plugin (DistillationTrainer does), or neither."
        )


def _tied_names(state: dict) -> set[str]:
    """Names whose tensor shares storage with an earlier name (tied embeddings): safetensors stores one of them."""
    seen, tied = {}, set()
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride())
        if key in seen:
            tied.add(name)
        else:
            seen[key] = name
    return tied


def _untied(state: dict) -> dict:
    tied = _tied_names(state)
    return {k: v for k, v in state.items() if k not in tied}
