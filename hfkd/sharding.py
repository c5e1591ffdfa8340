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
"""

from __future__ import annotations

from .launch import fsdp_requested


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
