"""A causal LM seen as its final hidden states plus a linear output head, for the chunked logit loss.

The trainer asks the model for the logits of one position only (`logits_to_keep=1`) and takes the final hidden
states from the base model's output with a forward hook; the logits themselves are then built a chunk at a time
by `hfkd.losses.chunked_head_loss`. Everything here is checked on the probe batch before training: a head that is
not a plain `nn.Linear` of those hidden states (soft-capping, logit scaling, a LoRA-wrapped head) keeps the full
logits path.
"""

import contextlib
import inspect
from collections.abc import Iterator

import torch


class _Capture:
    value: torch.Tensor | None = None


def base_module(model: torch.nn.Module) -> torch.nn.Module | None:
    """The transformers base model (`model.model`, `model.transformer`, ...) whose output feeds the head."""
    base = getattr(model, "base_model", None)
    return base if isinstance(base, torch.nn.Module) and base is not model else None


@contextlib.contextmanager
def capture_last_hidden(module: torch.nn.Module | None) -> Iterator[_Capture]:
    """Records `module`'s `last_hidden_state` (or first output) during the forwards inside the block."""
    captured = _Capture()
    if module is None:
        yield captured
        return

    def hook(_module, _args, output):
        value = output.get("last_hidden_state") if isinstance(output, dict) else None
        if value is None:
            value = getattr(output, "last_hidden_state", None)
        if value is None and isinstance(output, (tuple, list)) and output:
            value = output[0]
        captured.value = value

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The output head if it is exactly an `nn.Linear` (a wrapped or custom head might do more than a matmul)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if type(head) is torch.nn.Linear or _sharded_linear(head) else None


def _sharded_linear(head) -> bool:
    """A plain `nn.Linear` that FSDP2 made a unit of its own (its class `FSDPLinear`: FSDPModule, then Linear)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(head, FSDPModule) and type(head).__bases__ == (FSDPModule, torch.nn.Linear)


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def head_reproduces_logits(hidden: torch.Tensor | None, head: torch.nn.Linear, logits: torch.Tensor | None) -> bool:
    """Whether `head(hidden)` gives the model's own logits (no soft-capping, scaling or extra projection)."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(logits, torch.Tensor):
        return False
    if hidden.shape[:-1] != logits.shape[:-1]:
        return False
    with torch.no_grad():
        rebuilt = head(hidden.to(head.weight.dtype)).float()
    reference = logits.float()
    tolerance = 1e-3 * reference.abs().max().clamp_min(1.0)
    return bool((rebuilt - reference).abs().max() <= tolerance)
