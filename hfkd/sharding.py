"""FSDP2 on CPU: the student and the teacher sharded over gloo processes, through Accelerate's own FSDP plugin.

Accelerate applies an FSDP plugin only over GPUs and other accelerators: with `use_cpu=True` and several processes
its distributed type is MULTI_CPU and the model is wrapped in DDP instead, whole in every process. Yet
`torch.distributed.fsdp.fully_shard` itself runs on a CPU device mesh with the gloo backend (forward, backward and
optimizer step). `enable_fsdp_on_cpu` therefore switches the run's Accelerate state to FSDP after the accelerator
is made, as Accelerate does on GPUs, so that the Trainer's own FSDP code paths (`accelerator.prepare` of the student
and its optimizer, gradient clipping, full state dicts for saving) run unchanged, and hfkd's teacher is sharded by
the same plugin. Why not `fully_shard` applied by hfkd: the Trainer would still wrap the student in DDP, and its
saving and checkpoint code would not know the parameters are sharded.

Measured here (2 gloo processes, transformers 5.25, accelerate 1.16, torch 2.13): the per-process losses average to
one process's, the trained weights equal one process's within float32 rounding, and the full state dict
(`accelerator.get_state_dict`) returns whole tensors. The switch must reach both state objects: AcceleratorState
copies PartialState's fields each time it is instantiated, so setting it alone was undone by the next
instantiation (and `get_state_dict` then returned each process's shards).

Models that train beside the student (the peers of mutual learning) are sharded by the same plugin. FSDP2's
preparation of the student maps every parameter of its optimizer to one of the student's, so their groups, like the
terms' own, join the optimizer after it and leave it while FSDP saves or loads the student's state (`DetachedGroups`,
whose state is gathered whole); `clip_norm` clips each by its own whole norm; `whole_state` and `copy_whole` gather
a sharded model for saving and give each process its part back on loading.
"""

from __future__ import annotations

import contextlib

import torch

from .launch import fsdp_requested

# Under FSDP, the optimizer state of the terms' own parameters (kept out of FSDP's optimizer state), per checkpoint.
TERMS_OPTIMIZER_FILE = "hfkd_terms_optimizer.pt"
# Under FSDP, the optimizer state of the models that train beside the student (peers), gathered whole, per checkpoint.
PEERS_OPTIMIZER_FILE = "hfkd_peers_optimizer.pt"


def enable_fsdp_on_cpu(trainer) -> bool:
    """Switches `trainer.accelerator` to FSDP2 where FSDP was asked for and the processes run on CPU (MULTI_CPU);
    returns whether it did. Raises, naming the field, for an FSDP version other than 2."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator, args = trainer.accelerator, trainer.args
    if fsdp_requested(args) is None or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    # The training arguments' FSDP settings when given (Trainer builds them into fsdp_plugin_args), else the
    # launcher's (the plugin reads accelerate's FSDP_* environment variables).
    kwargs = dict(args.fsdp_plugin_args) if getattr(args, "fsdp_plugin_args", None) else {}
    plugin = FullyShardedDataParallelPlugin(**kwargs)
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP on CPU runs as FSDP2 (fully_shard over gloo), but fsdp_version is {plugin.fsdp_version}: set "
            "`fsdp_version: 2` in accelerate's config (or fsdp_config={'version': 2})."
        )
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state = accelerator.state
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    return True


def replicated(module, accelerator):
    """`module` (the terms' projections and heads) replicated in every process under FSDP: a DDP wrapper over the
    same gloo/NCCL group, so its gradients are averaged as the student's are reduced. Accelerate's `prepare_model`
    refuses FSDP2, and sharding a few small projections would buy nothing."""
    import torch

    kwargs = accelerator.ddp_handler.to_kwargs() if accelerator.ddp_handler is not None else {}
    return torch.nn.parallel.DistributedDataParallel(module, **kwargs)


class DetachedGroups:
    """The optimizer's last `count` param groups taken out (with their per-parameter state) and put back: FSDP2's
    preparation, saving and loading of the optimizer map every optimizer parameter to one of the student's, and the
    terms' own parameters and the peers' (sharded by units of their own) are not the student's. Used as
    `with DetachedGroups(optimizer, count) as detached: ...`."""

    def __init__(self, optimizer, count: int = 1):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # the torch optimizer under Accelerate's wrapper
        self.count = count

    def __enter__(self) -> DetachedGroups:
        groups = self.optimizer.param_groups
        self.groups = groups[len(groups) - self.count :]
        del groups[len(groups) - self.count :]
        self.states = [[self.optimizer.state.pop(p, None) for p in group["params"]] for group in self.groups]
        return self

    def __exit__(self, *exc) -> None:
        self.optimizer.param_groups.extend(self.groups)
        for group, states in zip(self.groups, self.states, strict=True):
            for p, state in zip(group["params"], states, strict=True):
                if state is not None:
                    self.optimizer.state[p] = state

    def state_dict(self) -> list[dict]:
        """Each detached group's settings and per-parameter state (by position), whole on the CPU: the state of
        sharded parameters is gathered from every process (a collective, called by all), so that a checkpoint
        resumes with any process count."""
        return [
            {
                "group": {k: v for k, v in group.items() if k != "params"},
                "state": [None if state is None else {k: _whole(v) for k, v in state.items()} for state in states],
            }
            for group, states in zip(self.groups, self.states, strict=True)
        ]

    def load(self, saved: list[dict], what: str) -> None:
        """Restores what `state_dict` saved, before the groups are put back; each process keeps its shard of a
        sharded parameter's state. `what` names the saved state in the message that refuses another run's."""
        held = [len(entry["state"]) for entry in saved]
        wanted = [len(group["params"]) for group in self.groups]
        if held != wanted:
            raise ValueError(
                f"The checkpoint's {what} holds {held} parameters (per optimizer group), this run's {wanted}: the "
                "checkpoint comes from a run with other terms or peers. Resume from a checkpoint of this run."
            )
        for group, entry in zip(self.groups, saved, strict=True):
            group.update(entry["group"])
        self.states = [
            [
                None if state is None else {k: _placed_like(v, p) for k, v in state.items()}
                for p, state in zip(group["params"], entry["state"], strict=True)
            ]
            for group, entry in zip(self.groups, saved, strict=True)
        ]


def _is_dtensor(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _whole(value):
    """A sharded tensor (DTensor) gathered whole from every process, on the CPU (a collective); anything else as is."""
    return value.full_tensor().cpu() if _is_dtensor(value) else value


def _placed_like(value, param):
    """A saved optimizer state value for `param`: this process's shard of a whole tensor of the parameter's shape
    when the parameter is sharded (every process read the whole, so no communication), else on its device."""
    if not hasattr(value, "to"):
        return value
    if _is_dtensor(param) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value.to(param.device)


def whole_state(model) -> dict:
    """`model.state_dict()` with every tensor whole, detached, on the CPU: FSDP2's sharded weights (DTensors) are
    gathered from every process, a collective that every process calls, in the same order."""
    return {k: _whole(v).detach().contiguous().cpu() for k, v in model.state_dict().items()}


@torch.no_grad()
def copy_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copies `value`, a whole tensor, into `target` in place; a sharded target (a DTensor) takes this process's
    shard of it, with no communication: every process read the whole."""
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        shard = distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(value)


def reshard(model) -> None:
    """Every FSDP2 unit of `model` back to its shards: a forward without a backward after it (the probe, evaluation)
    leaves the root unit gathered, and `parameters()` then gives the gathered tensors, not the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def clip_norm(parameters, max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over `parameters` whose gradients may be sharded (DTensors of one mesh): the
    norm is taken whole, over every process's shards, so that each process clips by the same factor."""
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.tensor(0.0)
    norm = get_total_norm([p.grad for p in parameters])
    norm = norm.full_tensor() if _is_dtensor(norm) else norm
    clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def clip_joint_norm(accelerator, model, extra, max_norm: float):
    """Clips the student's (sharded) and the terms' (replicated) gradients by their joint norm, as one trainable
    system, and returns that norm: sqrt(|g_student|^2 + |g_terms|^2), each factor as torch's clip_grad_norm_."""
    import torch

    student = accelerator.clip_grad_norm_(model.parameters(), float("inf"))  # the norm, no clipping
    grads = [p.grad for p in extra if p.grad is not None]
    terms = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else 0.0
    total = float(torch.sqrt(torch.as_tensor(float(student)) ** 2 + torch.as_tensor(float(terms)) ** 2))
    coef = min(max_norm / (total + 1e-6), 1.0)  # a float: the student's gradients are DTensors
    if coef < 1.0:
        with torch.no_grad():
            for p in [*model.parameters(), *extra]:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return torch.tensor(total)


def _wrap_names(plugin) -> list[str] | None:
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    return [names] if isinstance(names, str) else list(names) if names else None


def check_wrap_classes(plugin, student) -> None:
    """Refuses FSDP layer classes to wrap (`fsdp_transformer_layer_cls_to_wrap`) that the student does not hold, before
    anything is prepared or written (Accelerate would raise at the first step's preparation, after output_dir exists).
    """
    from accelerate.utils.dataclasses import get_module_class_from_name

    names = _wrap_names(plugin)
    missing = [n for n in names or () if get_module_class_from_name(student, n) is None]
    if missing:
        own = [n for n in getattr(student, "_no_split_modules", None) or () if get_module_class_from_name(student, n)]
        raise ValueError(
            f"FSDP's layer classes to wrap ({names}; `fsdp_transformer_layer_cls_to_wrap` in accelerate's config, or "
            f"fsdp_config['transformer_layer_cls_to_wrap']) name {missing}, which the student "
            f"({type(student).__name__}) does not hold. Name its layer class{' ' + str(own) if own else ''}, or leave "
            "the field unset to wrap each model's own layer classes (`_no_split_modules`)."
        )


def prepare_sharded(model, accelerator, frozen: bool = True):
    """`model` (a teacher, or with `frozen=False` a peer that trains) sharded by the run's FSDP2 plugin, wrapping the
    layer classes of the plugin's list that it holds, or its own (`_no_split_modules`) when it holds none of them: a
    model of another family than the student. The plugin is left as it was for the student: Accelerate binds its wrap
    policy to the classes of the first model it prepares, and raises for a named class a model does not hold."""
    from accelerate.utils.dataclasses import get_module_class_from_name

    plugin = accelerator.state.fsdp_plugin
    saved = plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap
    names = [n for n in _wrap_names(plugin) or () if get_module_class_from_name(model, n) is not None]
    plugin.transformer_cls_names_to_wrap = names or None
    try:
        sharded = accelerator.prepare(model)
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = saved
    if frozen:
        # FSDP2 keeps the root module's weights gathered after its forward, expecting the backward to need them at
        # once; a teacher has no backward, so each process would hold its embeddings and head whole from the first
        # step on. Every level of a teacher is resharded after its forward.
        sharded.set_reshard_after_forward(True)
    return sharded


def teacher_bytes_per_process(model: torch.nn.Module, processes: int) -> int:
    """Bytes of `model`'s parameters one process holds at rest when they are split over `processes` by rows, as
    FSDP2 splits each tensor (rounding up: the first process holds the most), or whole with `processes=1`."""
    total = 0
    for p in model.parameters():
        rows = p.shape[0] if p.dim() else 1
        total += -(-rows // processes) * (p.numel() // max(rows, 1)) * p.element_size()
    return total


def check_teacher_memory(limit: str | None, teachers: dict, processes: int, sharded: bool) -> None:
    """Refuses teachers whose parameters need more than `limit` bytes per process (`teacher_memory_limit`)."""
    if limit is None or not teachers:
        return
    from .cache import parse_size

    allowed = parse_size(limit, "teacher_memory_limit")
    split = processes if sharded else 1
    needs = {name: teacher_bytes_per_process(model, split) for name, model in teachers.items()}
    if sum(needs.values()) <= allowed:
        return
    each = ", ".join(f"{name} {need:,}" for name, need in needs.items())
    how = f"sharded over {processes} processes" if split > 1 else "whole in every process (not sharded)"
    raise ValueError(
        f"teacher_memory_limit={limit!r} allows {allowed:,} bytes per process, but the teachers' parameters need "
        f"{sum(needs.values()):,} ({each}), {how}. Shard the teacher over more processes (FSDP: "
        "recipes/accelerate/fsdp.yaml), load it in a smaller dtype (torch_dtype=torch.bfloat16), run it once "
        "beforehand (`hfkd cache`, then teacher_cache_dir), or raise teacher_memory_limit."
    )


@contextlib.contextmanager
def gathered(models):
    """Inside, each FSDP2-sharded model of `models` holds its root unit's weights whole (embeddings and head):
    the chunked logit head reads the teacher's head weight outside the teacher's forward (hfkd.terms.logit). A
    collective: every process enters it, in the same order."""
    from torch.distributed.fsdp import FSDPModule

    units = [part for model in models for part in (model, _output_head(model))]
    sharded = [m for m in units if isinstance(m, FSDPModule)]  # the root, and the head if it is a unit of its own
    for model in sharded:
        model.unshard()
    try:
        yield
    finally:
        for model in sharded:
            model.reshard()


def keep_root_gathered_until_backward(model) -> None:
    """Leaves the student's root unit (embeddings, head) gathered from its forward to its backward, FSDP2's own
    choice for a root, which Accelerate overrides with the plugin's setting: the chunked logit head computes the
    head's gradient outside the forward, into the gathered weight that FSDP2 then reduce-scatters."""
    from torch.distributed.fsdp import FSDPModule

    for unit in (model, _output_head(model)):  # the head may be a unit of its own (Accelerate wraps it so)
        if isinstance(unit, FSDPModule):
            unit.set_reshard_after_forward(False, recurse=False)


def _output_head(model):
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None
