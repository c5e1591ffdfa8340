"""Early exit: a student trained with exit heads (the `byot` term) answers from an intermediate layer, without running
the layers above it.

The heads are the term's state while training (checkpointed with the terms, trained by the trainer's optimizer) and
are saved beside the student, never inside its weights: `early_exit_heads.safetensors` (each head's weights under
`<layer>.`) and `early_exit.json` (the layers with a head, the student's number of layers, the pooling and widths).

    from hfkd.early_exit import EarlyExitModel

    model = EarlyExitModel.from_pretrained("out")  # the student saved by DistillationTrainer, and its heads
    model.exits                                    # e.g. (1, 2, 3, 4): the layers with a head, then the last
    logits = model(**inputs, exit_layer=2)         # embeddings and layers 1-2 only, then the head of layer 2

An exit at layer k runs the student's own forward and stops it once its k-th layer has run (a forward hook on that
layer raises; nothing above it runs), then pools that layer's output (the student's `hidden_states[k]`) and applies
the head. The deepest exit, k = the number of layers, is the student's own classifier. An exit at a layer without a
head is refused, naming the exits there are.

The layers are found as the student's `nn.ModuleList` with one entry per layer (BERT-like encoders' `encoder.layer`,
ViT's `layers`, ResNet's `encoder.stages`: a ResNet's "layers" are its stages); give `layers_module=` where another
list comes first. `measure_exits` gives each exit's accuracy on a data set and its latency on one batch (the model
card's early-exit table).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .terms.base import logits_of
from .terms.pooling import POOLINGS, pool

HEADS_FILE = "early_exit_heads.safetensors"
EXITS_FILE = "early_exit.json"
_FORMAT = 1


class ExitHead(nn.Module):
    """The classifier of one exit: a layer's hidden state, pooled to one vector per example (`pooling`, see
    hfkd.terms.pooling; global average pooling for conv maps), then LayerNorm, a linear bottleneck to the width of the
    deepest layer's pooled feature, and a linear classifier. Returns (the bottleneck's feature, the logits).

    For conv nets the paper's bottleneck is a stack of convolutions before the pooling; a pooled LayerNorm + Linear
    head is the transformer counterpart used here for every model kind."""

    def __init__(self, width: int, feature_width: int, num_labels: int, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r} is not known; choose one of {list(POOLINGS)}.")
        self.pooling = pooling
        self.norm = nn.LayerNorm(width)
        self.bottleneck = nn.Linear(width, feature_width)
        self.classifier = nn.Linear(feature_width, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = pool(hidden, mask, self.pooling).to(self.norm.weight.dtype)
        feature = self.bottleneck(self.norm(pooled))
        return feature, self.classifier(feature)


def save_exit_heads(directory: str, heads: dict[int, ExitHead], num_layers: int) -> list[str]:
    """Writes the heads (by layer) and `early_exit.json` into `directory` (the saved student's folder); returns the
    two file names."""
    state = {
        f"{layer}.{key}": value.detach().contiguous().cpu()
        for layer, head in heads.items()
        for key, value in head.state_dict().items()
    }
    save_file(state, os.path.join(directory, HEADS_FILE))
    first = next(iter(heads.values()))
    record = {
        "format": _FORMAT,
        "layers": sorted(int(layer) for layer in heads),
        "num_layers": int(num_layers),
        "pooling": first.pooling,
        "widths": {str(layer): head.norm.normalized_shape[0] for layer, head in heads.items()},
        "feature_width": first.bottleneck.out_features,
        "num_labels": first.classifier.out_features,
    }
    with open(os.path.join(directory, EXITS_FILE), "w") as handle:
        json.dump(record, handle, indent=1)
    return [HEADS_FILE, EXITS_FILE]


def load_exit_heads(directory: str) -> tuple[dict[int, ExitHead], int]:
    """The heads saved in `directory` by layer, and the student's number of layers."""
    path = os.path.join(directory, EXITS_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(directory, HEADS_FILE)):
        raise ValueError(
            f"{directory} holds no exit heads ({EXITS_FILE} and {HEADS_FILE}): train the student with the byot term "
            "(terms=[{'name': 'byot'}]), whose heads DistillationTrainer saves beside it."
        )
    with open(path) as handle:
        record = json.load(handle)
    if record.get("format") != _FORMAT:
        raise ValueError(f"{path} has format {record.get('format')!r}; this hfkd reads format {_FORMAT}.")
    state = load_file(os.path.join(directory, HEADS_FILE))
    heads = {}
    for layer in record["layers"]:
        head = ExitHead(record["widths"][str(layer)], record["feature_width"], record["num_labels"], record["pooling"])
        prefix = f"{layer}."
        head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        heads[int(layer)] = head
    return heads, int(record["num_layers"])


class _Stop(Exception):
    """Raised by the hook on the exit layer: carries its output out of the student's forward."""

    def __init__(self, output):
        super().__init__()
        self.output = output


def _stop(_module, _inputs, output):
    raise _Stop(output[0] if isinstance(output, (tuple, list)) else output)


def layer_list(model: nn.Module, num_layers: int, name: str | None = None) -> nn.ModuleList:
    """The student's list of layers whose k-th entry's output is `hidden_states[k]` (see the module docstring)."""
    modules = dict(model.named_modules())
    if name is not None:
        found = modules.get(name)
        if not isinstance(found, nn.ModuleList) or len(found) != num_layers:
            raise ValueError(
                f"layers_module={name!r} is not an nn.ModuleList of {num_layers} layers in {type(model).__name__}; "
                "name the list whose entries are the student's layers (see model.named_modules())."
            )
        return found
    for found in modules.values():
        if isinstance(found, nn.ModuleList) and len(found) == num_layers:
            return found
    raise ValueError(
        f"{type(model).__name__} has no nn.ModuleList of {num_layers} layers (its hidden_states entries after the "
        "embeddings) to stop after; pass layers_module= the name of the list of its layers."
    )


class EarlyExitModel(nn.Module):
    """The student and its exit heads (see the module docstring).

    Args:
        model: the student (a transformers classifier whose `hidden_states[k]` is its k-th layer's output).
        heads: the exit heads by layer (`load_exit_heads`).
        num_layers: the student's layers (the deepest exit).
        layers_module: the name of the student's list of layers, where another list of that length comes first.
    """

    def __init__(
        self, model: nn.Module, heads: dict[int, ExitHead], num_layers: int, layers_module: str | None = None
    ):
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict({str(layer): head for layer, head in sorted(heads.items())})
        self.num_layers = num_layers
        self.layers = layer_list(model, num_layers, layers_module)
        self.exit_layer = num_layers  # the default exit of a call that names none
        param = next(model.parameters(), None)
        if param is not None:
            self.heads.to(param.device)

    @classmethod
    def from_pretrained(
        cls, directory: str, model: nn.Module | None = None, layers_module: str | None = None, **kwargs
    ) -> EarlyExitModel:
        """The student saved in `directory` (a folder or a Hub id), or `model` when given, with the heads saved beside
        it; `kwargs` go to the student's `from_pretrained`, whose class is its config's `architectures[0]`."""
        if not os.path.isdir(directory):  # a Hub id: the student's repository, heads included
            from huggingface_hub import snapshot_download

            directory = snapshot_download(directory)
        heads, num_layers = load_exit_heads(directory)
        if model is None:
            import transformers

            config = transformers.AutoConfig.from_pretrained(directory)
            architecture = (getattr(config, "architectures", None) or [None])[0]
            model_cls = getattr(transformers, architecture, None) if architecture else None
            if model_cls is None:
                raise ValueError(
                    f"{directory}'s config names no transformers class in `architectures` ({architecture!r}); load "
                    "the student yourself and pass it as model=."
                )
            model = model_cls.from_pretrained(directory, **kwargs)
        return cls(model, heads, num_layers, layers_module)

    @property
    def exits(self) -> tuple[int, ...]:
        """The layers one can exit at: those with a head, then the last (the student's own classifier)."""
        return (*(int(layer) for layer in self.heads), self.num_layers)

    def _checked(self, exit_layer) -> int:
        layer = self.exit_layer if exit_layer is None else exit_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or layer not in self.exits:
            raise ValueError(
                f"exit_layer={layer!r} has no exit head: this student's exits are {list(self.exits)} (the layers "
                f"with a head, then {self.num_layers}, its own classifier). Pick one of them, or train a head at that "
                "layer with the byot term's `layers` option."
            )
        return layer

    def forward(self, exit_layer: int | None = None, **inputs) -> torch.Tensor:
        """The logits `[batch, classes]` of exit `exit_layer` (default `self.exit_layer`); layers above it never run."""
        layer = self._checked(exit_layer)
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if layer == self.num_layers:
            return logits_of(self.model(**inputs))
        handle = self.layers[layer - 1].register_forward_hook(_stop)
        try:
            self.model(**inputs)
        except _Stop as stopped:
            hidden = stopped.output
        else:
            raise RuntimeError(f"The student's forward never ran its layer {layer}; pass layers_module=.")
        finally:
            handle.remove()
        return self.heads[str(layer)](hidden, _mask(inputs))[1]

    def all_exits(self, **inputs) -> dict[int, torch.Tensor]:
        """Every exit's logits from one forward through all layers (what each exit gives on its own, at the cost of
        the whole student: for evaluation)."""
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = self.model(**inputs, output_hidden_states=True)
        states, mask = outputs.hidden_states, _mask(inputs)
        logits = {int(layer): head(states[int(layer)], mask)[1] for layer, head in self.heads.items()}
        logits[self.num_layers] = logits_of(outputs)
        return logits


def _mask(inputs: dict) -> torch.Tensor | None:
    """The positions pooling may read: the attention mask, as the term saw it in training."""
    mask = inputs.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


@torch.inference_mode()
def measure_exits(
    model: EarlyExitModel, dataset, collator, batch_size: int = 64, latency_rows: int = 32, repeats: int = 10
) -> list[dict]:
    """Each exit's accuracy on `dataset` (rows whose label is not -100) and its median latency in milliseconds on a
    batch of its first `latency_rows` rows (eval mode, no gradients, the exit's own early-stopped forward):
    `[{"layer": k, "accuracy": ..., "latency_ms": ...}, ...]`, shallowest first."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = dict.fromkeys(model.exits, 0)
    counted = 0
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            labels = inputs.pop("labels")
            kept = labels.ne(-100)
            counted += int(kept.sum())
            for layer, logits in model.all_exits(**inputs).items():
                correct[layer] += int((logits.argmax(-1).eq(labels) & kept).sum())
        batch = collator([dataset[i] for i in range(min(latency_rows, len(dataset)))])
        inputs = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "labels"}
        rounds = {layer: [] for layer in model.exits}
        for _ in range(max(1, repeats)):  # the exits in turn within each round, so that drift hits all alike
            for layer in model.exits:
                model(**inputs, exit_layer=layer)  # warm-up
                tick = time.perf_counter()
                model(**inputs, exit_layer=layer)
                rounds[layer].append((time.perf_counter() - tick) * 1000.0)
    finally:
        model.train(was_training)
    return [
        {"layer": layer, "accuracy": correct[layer] / max(counted, 1), "latency_ms": statistics.median(rounds[layer])}
        for layer in model.exits
    ]
