"""Deep mutual learning: peers trained beside the student, each learning from the labels and from the others.

Zhang, Xiang, Hospedales & Lu (CVPR 2018), "Deep Mutual Learning". K models learn together; model k minimises

    L_k = L_C(p_k, y) + 1 / (K - 1) * sum_{l != k} KL(p_l || p_k),

with the other models' predictions p_l held fixed (detached) in model k's loss. No pre-trained teacher is needed.
The paper uses the plain softmax (temperature 1), equal weights, and (for the same architecture) different random
initialisations; two peers already help, more help a little more.

In hfkd, `DistillationTrainer(model=student, peer_models=[peer, ...])` (or `peer_model_name_or_path`) trains the
student and every peer in the same step on the same batch:
- the student's loss is its task loss plus the configured response terms (those that read only logits: `logit`,
  `dkd`) against its peers, exactly as against several teachers (hfkd.mixing: for forward KL, the mixture of the
  peers' distributions gives the gradient of the mean of the per-peer KLs);
- each peer's loss is the same, against the student and the other peers;
- all of them are summed into one backward pass. Each model's gradient is that of its own loss alone, since every
  other model's outputs are detached in it. One optimizer holds every model's parameters with the same settings
  (an AdamW or SGD update is per parameter, so this is K optimizers in one), and gradients are clipped per model.

Each peer is logged as `<peer>/task` and `<peer>/distill/<term>`, saved with the student in every checkpoint and at
the end in `output_dir/peers/<name>/` (`save_pretrained`: loadable without hfkd), and restored exactly on resume.
Under FSDP2 each peer is sharded like the student, and gathered whole for saving (hfkd.sources.peers).
"""

import os

import torch
from safetensors.torch import save_file
from safetensors.torch import save_model as save_safetensors_model

from .names import named_models
from .saved_weights import WEIGHTS_FILE, read_weights, restore

PEERS_FOLDER = "peers"


def peer_folder(output_dir: str, name: str) -> str:
    """Where peer `name` is saved under a run's (or checkpoint's) folder."""
    return os.path.join(output_dir, PEERS_FOLDER, name)


def named_peers(peers) -> dict[str, object]:
    """`peer_models` as {name: model or name_or_path}: one model is {"peer": it}; a list gets `peer0`, `peer1`, ...;
    a dict keeps its names. Refuses an empty list, a bad name and a peer given twice."""
    return named_models(peers, "peer", "peer_models", "build another model for another peer, e.g. with another seed")


def check_peer_settings(args, teacher_given: bool = False, teacher_path_allowed: bool = False) -> None:
    """Peers are the student's only teachers, weighted equally: refuse the settings of frozen teachers beside them.

    `teacher_path_allowed`: the config alone, where `teacher_model_name_or_path` may be a recipe's teacher (loaded,
    evaluated and described, never given to the trainer); the trainer refuses it."""
    clashes = ["teacher_model"] if teacher_given else []
    names = ("teacher_cache_dir", "teacher_ema_decay", "teacher_weights")
    if not teacher_path_allowed:
        names = ("teacher_model_name_or_path", *names)
    clashes += [name for name in names if getattr(args, name) is not None]
    if args.teacher_combine != "weights":
        clashes.append("teacher_combine")
    if clashes:
        raise ValueError(
            f"Peers (deep mutual learning) teach the student and each other with equal weights, and no frozen teacher "
            f"runs beside them, but {', '.join(clashes)} {'is' if len(clashes) == 1 else 'are'} set; unset "
            f"{'it' if len(clashes) == 1 else 'them'}, or drop the peers to distil from a teacher."
        )


def save_peer(model: torch.nn.Module, folder: str, processing_class=None, state: dict | None = None) -> None:
    """Saves a peer loadable without hfkd: `save_pretrained` (config + safetensors) for a transformers model, else
    its state dict in model.safetensors (load it into the same class); the tokenizer or processor beside it.
    `state`: the peer's whole weights, gathered beforehand where it is sharded (hfkd.sharding.whole_state)."""
    os.makedirs(folder, exist_ok=True)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(folder, state_dict=state)
    elif state is None:
        save_safetensors_model(model, os.path.join(folder, WEIGHTS_FILE))  # drops tied copies, as save_pretrained
    else:  # gathered copies share no storage: each name is written
        save_file(state, os.path.join(folder, WEIGHTS_FILE))
    if processing_class is not None and hasattr(processing_class, "save_pretrained"):
        processing_class.save_pretrained(folder)


def load_peer(model: torch.nn.Module, folder: str) -> None:
    """Restores a peer saved by `save_peer` in place, every tensor exactly, under the names `save_pretrained` wrote
    (hfkd.saved_weights). Only tied copies of a saved weight may be missing."""
    restore(model, read_weights(folder), f"the peer's {folder}")


def detached(outputs):
    """A model's outputs with every tensor detached (what another model learns from), of the same type."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach()
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(detached(v) for v in outputs)
    if isinstance(outputs, dict):  # ModelOutput is a dict too; its constructor takes its fields by name
        return type(outputs)(**{k: detached(v) for k, v in outputs.items()})
    return outputs
