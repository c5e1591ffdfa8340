"""Learned projections from student features to the teacher's width (FitNets' regressors).

They are trained with the student but are not part of it: they are saved in each checkpoint in their own file and
never in the student's weights, so the exported student loads with plain transformers.
"""

import json
import os

import torch
from safetensors.torch import load_file, save_file
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

    def save(self, directory: str) -> str:
        """Writes the weights and the layout to `directory/hfkd_projector.safetensors`; returns the path."""
        path = os.path.join(directory, PROJECTOR_FILE)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        save_file(state, path, metadata={"specs": json.dumps(self.specs)})
        return path

    def load(self, directory: str) -> None:
        """Restores weights written by `save`; the layout must match this run's."""
        path = os.path.join(directory, PROJECTOR_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"{directory} holds no {PROJECTOR_FILE}, but this run trains feature projections: the checkpoint "
                "comes from a run with other hidden-state settings or was cut short while saving. Resume from "
                "another checkpoint or start without `resume_from_checkpoint`."
            )
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            saved_specs = json.loads((handle.metadata() or {}).get("specs", "{}"))
        if {k: tuple(v) for k, v in saved_specs.items()} != {k: tuple(v) for k, v in self.specs.items()}:
            raise ValueError(
                f"The projections in {path} ({saved_specs}) do not match this run's ({self.specs}); the checkpoint "
                "was made with other models or layer maps."
            )
        first = next(iter(self.parameters()), None)
        state = load_file(path, device=str(first.device) if first is not None else "cpu")
        self.load_state_dict(state)
