"""Learned projections from student features to the teacher's width (FitNets' regressors).

They are the `hidden` term's state: trained with the student, saved in each checkpoint with the terms' state
(`hfkd_terms.safetensors`), never in the student's weights, so the exported student loads with plain transformers.
Checkpoints written before terms were plugins kept them in `hfkd_projector.safetensors`; resuming reads that too.
"""

import json
import os

import torch
from safetensors.torch import load_file
from torch import nn

PROJECTOR_FILE = "hfkd_projector.safetensors"


def _module_key(key: str) -> str:
    # nn.ModuleDict keys cannot hold dots.
    return key.replace(".", "__")


class FeatureProjector(nn.Module):
    """One projection per matched feature, keyed like 'main.3' (stream, student index).

    Args:
        specs: key -> (kind, in_features, out_features), kind 'linear' for `[..., features]` tensors or 'conv' for
            `[B, C, H, W]` feature maps (a 1x1 convolution).
    """

    def __init__(self, specs: dict[str, tuple[str, int, int]]):
        super().__init__()
        self.specs = dict(specs)
        layers = {}
        for key, (kind, in_features, out_features) in self.specs.items():
            if kind == "linear":
                layers[_module_key(key)] = nn.Linear(in_features, out_features)
            elif kind == "conv":
                layers[_module_key(key)] = nn.Conv2d(in_features, out_features, kernel_size=1)
            else:
                raise ValueError(f"Unknown projection kind {kind!r} for {key}; expected 'linear' or 'conv'.")
        self.layers = nn.ModuleDict(layers)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # One call for all features, so that a DDP wrapper around this module sees every parameter used each step.
        out = {}
        for key, value in features.items():
            layer = self.layers[_module_key(key)] if _module_key(key) in self.layers else None
            out[key] = layer(value.to(layer.weight.dtype)) if layer is not None else value
        return out


def read_legacy_projections(directory: str, specs: dict[str, tuple[str, int, int]]) -> dict[str, torch.Tensor] | None:
    """Projection weights from a checkpoint of hfkd before terms were plugins (`hfkd_projector.safetensors`), or None
    when the folder holds none; refuses projections of another layout."""
    path = os.path.join(directory, PROJECTOR_FILE)
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        saved_specs = json.loads((handle.metadata() or {}).get("specs", "{}"))
    if {k: tuple(v) for k, v in saved_specs.items()} != {k: tuple(v) for k, v in specs.items()}:
        raise ValueError(
            f"The projections in {path} ({saved_specs}) do not match this run's ({specs}); the checkpoint was made "
            "with other models or layer maps."
        )
    return load_file(path)
