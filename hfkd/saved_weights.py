"""Loading the weights `save_pretrained` wrote back into the live model they came from, exactly, or refusing.

transformers 5 gives some architectures new module names (a ViT's `vit.encoder.layer.0.attention.attention.query`
is now `vit.layers.0.attention.q_proj`) and keeps the old ones on disk: `save_pretrained` writes every weight under
its original name (`save_original_format=True`, `revert_weight_conversion`) and `from_pretrained` renames them back.
`Trainer._load_from_checkpoint` and `Trainer._load_best_model` (5.25) instead call `model.load_state_dict(state,
strict=False)` on the file as written, so every renamed weight is left out, and only a warning says so: a resumed
ViT student kept its fresh weights (transformers issues #43701, #48805). hfkd therefore checks what such a load left
out, copies each renamed weight into the tensor it was saved from, and refuses anything else that does not fit.
"""

import json
import os

import torch
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from .sharding import copy_whole

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def own_names(model: torch.nn.Module) -> dict[str, str]:
    """{the name `save_pretrained` writes a weight under: its name in `model.state_dict()`}, for the weights it
    renames (empty for most models, and for a model that is not a transformers one)."""
    return _saved_layout(model)[0]


def _saved_layout(model: torch.nn.Module) -> tuple[dict[str, str], set[str]]:
    """`own_names`, and the saved names of the weights `save_pretrained` converts (fuses or splits into new
    tensors, as a mixture of experts' stacked experts): those have no single own name to be copied back to.

    Found by running transformers' own reversal over the model's state dict and following each tensor, so the
    names are exactly those it wrote."""
    if not isinstance(model, PreTrainedModel):
        return {}, set()
    state = model.state_dict()
    by_tensor = {id(tensor): name for name, tensor in state.items()}
    saved = revert_weight_conversion(model, dict(state))
    renamed = {k: by_tensor[id(v)] for k, v in saved.items() if id(v) in by_tensor and by_tensor[id(v)] != k}
    return renamed, {k for k, v in saved.items() if id(v) not in by_tensor}


def read_weights(folder: str, names=None) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` wrote into `folder` (model.safetensors, or its shards), on the CPU; only `names`
    when given. A folder without them is refused."""
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, WEIGHTS_INDEX)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):  # save_pretrained shards large models
        with open(index) as handle:
            files = [os.path.join(folder, name) for name in sorted(set(json.load(handle)["weight_map"].values()))]
    else:
        raise ValueError(
            f"{folder} holds no {WEIGHTS_FILE} (nor its shards): it was cut short while saving, or comes from a run "
            "without this model. Resume from another checkpoint."
        )
    wanted = None if names is None else set(names)
    state = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as handle:
            state.update({k: handle.get_tensor(k) for k in handle.keys() if wanted is None or k in wanted})
    return state


def restore(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copies every tensor of `state` (as written by `save_pretrained`, renamed weights included) into `model` in
    place, keeping its parameters (an optimizer's references stay valid). Refuses a saved name the model lacks, a
    shape that differs, and any of the model's weights left without a value, except those `save_pretrained` leaves
    out (tied copies, `_keys_to_ignore_on_save`). `where` names the file or setting in the messages."""
    mine = model.state_dict()
    renamed = own_names(model)
    state = {renamed.get(name, name): tensor for name, tensor in state.items()}
    unknown = sorted(state.keys() - mine.keys())
    if unknown:
        raise ValueError(
            f"The weights in {where} do not fit this model (unknown names {unknown[:5]}); wrong checkpoint?"
        )
    missing = _not_left_out(model, mine, mine.keys() - state.keys())
    if missing:
        raise ValueError(
            f"The weights in {where} lack {missing[:5]}; the checkpoint was cut short, or is another model's?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(mine[name].shape):
                raise ValueError(
                    f"The weights in {where} give {name} the shape {tuple(tensor.shape)}, but this model's is "
                    f"{tuple(mine[name].shape)}; the checkpoint was made with another model."
                )
            copy_whole(mine[name], tensor)  # a sharded (FSDP2) weight keeps this process's part


def complete_load(model: torch.nn.Module, folder: str, missing, unexpected, setting: str) -> None:
    """After `Trainer` loaded `folder`'s weights into `model` with `load_state_dict(strict=False)` and got these
    `missing` and `unexpected` names: copies in each weight `save_pretrained` had renamed; raises when any weight is
    still without its saved value, or any saved weight fits none (a checkpoint that does not load is a wrong result,
    not a warning). `setting` (`resume_from_checkpoint`, `load_best_model_at_end`) names the load in the message."""
    mine = model.state_dict()
    missing = set(_not_left_out(model, mine, set(missing)))
    unexpected = set(unexpected)
    if not missing and not unexpected:
        return
    renamed, converted = _saved_layout(model)
    renamed = {saved: own for saved, own in renamed.items() if saved in unexpected and own in missing}
    if renamed:
        with torch.no_grad():
            for saved, tensor in read_weights(folder, renamed).items():
                mine[renamed[saved]].copy_(tensor)  # same name pair as save_pretrained's, so the same shape
        missing -= set(renamed.values())
        unexpected -= set(renamed)
    if missing or unexpected:
        found = (
            f"{setting}: the student's weights in {folder} do not load into this student ({type(model).__name__}): "
            f"{len(missing)} of its weights are not in the checkpoint (e.g. {sorted(missing)[:3]}) and "
            f"{len(unexpected)} saved weights fit none of them (e.g. {sorted(unexpected)[:3]}), so training would go "
            "on from weights the checkpoint does not hold."
        )
        if unexpected & converted:
            raise ValueError(
                f"{found} save_pretrained converted them (fused or split) for this architecture, and transformers' "
                "Trainer loads checkpoints without the conversion back that from_pretrained applies (transformers "
                "issue #48805); hfkd can only undo renaming. Start a new run from the checkpoint's weights, loaded "
                "with from_pretrained, or resume with a transformers version that converts them."
            )
        raise ValueError(f"{found} Load it with the student class and config that wrote it, or start without it.")


def _not_left_out(model: torch.nn.Module, mine: dict[str, torch.Tensor], missing) -> list[str]:
    """The `missing` names that `save_pretrained` does write: not a tied copy of a present one (sharing its
    storage: it writes one of a group of tied weights, and loading that one fills them all), nor one of the model's
    `_keys_to_ignore_on_save` (e.g. Marian's sinusoidal positions, which the model builds itself)."""
    present = {mine[name].data_ptr() for name in mine.keys() - set(missing)}
    never_saved = set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    return sorted(name for name in missing if mine[name].data_ptr() not in present and name not in never_saved)
