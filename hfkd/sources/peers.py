"""Peers of deep mutual learning (hfkd.peers): models that train beside the student and teach it, detached.

Each peer is a teacher of the student whose forward runs with gradients; it has its own task loss and its own
`TermSet` against the student and the other peers (response terms only, mixed with equal weights), and its own
gradient clipping, optimizer groups, checkpoint folder and saved model.

Under DDP each peer has a DDP wrapper of its own. Under FSDP2 each peer is sharded by the student's plugin (each
process holds a part of it, its gradients reduce-scattered by its own units); its optimizer groups join after the
student's FSDP preparation and are saved beside FSDP's optimizer state (hfkd.sharding), and its weights are gathered
whole for every save, and split again on loading.
"""

from __future__ import annotations

import contextlib

import torch

from .. import checks
from ..fingerprint import model_fingerprint
from ..mixing import TeacherMixer
from ..models import accepts_loss_kwargs, call_model, load_teacher, unwrap_peft
from ..peers import check_peer_settings, detached, load_peer, named_peers, peer_folder, save_peer
from ..sharding import clip_norm, prepare_sharded, reshard, whole_state
from ..terms.base import Features, logits_of
from ..terms.runner import TermSet
from .base import TeacherSource, Teaching


def load_peers(model, args, peer_models, teacher_model) -> dict[str, torch.nn.Module]:
    """The peers by name, loaded and checked; {} without any."""
    peers = peer_models if peer_models is not None else args.peer_model_name_or_path
    if peers is None:
        return {}
    check_peer_settings(args, teacher_given=teacher_model is not None)
    if model is None:
        raise ValueError("peer_models learn beside the student: pass the student as `model=`.")
    peers = named_peers(peers)
    for name, one in peers.items():
        checks.check_teacher_argument(one, role="peer")
        if isinstance(one, str):
            peers[name] = one = load_teacher(one, model, None, role="peer")
        if one is model:
            raise ValueError(
                f"The peer {name!r} is the student itself: mutual learning needs separate models. Pass another "
                "model (e.g. the same architecture built with another seed), or set teacher_ema_decay to teach "
                "the student with a moving average of itself."
            )
    return peers


class Peers(TeacherSource):
    """Deep mutual learning: every peer trains beside the student with the response terms against the student and
    the other peers (its own TermSet, never with state: those terms read only logits)."""

    described_as = "peer_models"

    def __init__(self, peers: dict[str, torch.nn.Module]):
        self.peers = dict(peers)
        self.names = tuple(peers)
        self.terms: dict[str, TermSet] = {}
        self.wrapped: dict[str, torch.nn.Module] = {}
        # (accepts loss kwargs, its own loss divides by num_items_in_batch): the second measured by the probe
        self.loss_kwargs: dict[str, tuple[bool, bool]] = {}
        self._mixer = TeacherMixer("equal")
        self._args = None
        self._sharded = False  # FSDP2: every peer is sharded (attach)

    def check_terms(self, term_set) -> None:
        if not len(term_set):
            raise ValueError(
                "peer_models are set but no term compares the models (logit_weight=0 and no `terms`): the peers would "
                "train alone beside the student. Set logit_weight > 0 (the DML paper: 1, with temperature 1)."
            )
        features = term_set.feature_terms()
        if features:
            raise ValueError(
                f"Peers learn from each other's outputs (deep mutual learning), so every term must read only the "
                f"logits (such as logit and dkd), but {features} read features; drop them (hidden_weight=0, "
                "attention_weight=0, no such `terms`), or distil from a frozen teacher instead."
            )

    def attach(self, trainer) -> None:
        if trainer.is_deepspeed_enabled:
            raise ValueError(
                "peer_models with DeepSpeed: a DeepSpeed engine owns one model and its optimizer, and each peer "
                "trains with its own; train the peers with DDP, or on one device."
            )
        self._sharded = trainer.is_fsdp_enabled
        if self._sharded and not trainer.accelerator.is_fsdp2:
            raise ValueError(
                "peer_models with FSDP1: hfkd shards peers with FSDP2 only (fully_shard, each peer's optimizer groups "
                "kept apart from the student's); set `fsdp_version: 2` in accelerate's config (or "
                "fsdp_config={'version': 2}), or train the peers with DDP."
            )
        if self._sharded and trainer.optimizer is not None:
            raise ValueError(
                "peer_models with FSDP and an optimizer given by `optimizers=`: each peer is sharded before the "
                "optimizer is made, and its groups must join after the student's FSDP preparation. Let "
                "DistillationTrainer create the optimizer (optimizer_cls_and_kwargs= sets its class and settings)."
            )
        if trainer.optimizer is not None:  # `optimizers=` gave one: it must also update every peer
            owned = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            for name, peer in self.peers.items():
                if any(p.requires_grad and id(p) not in owned for p in peer.parameters()):
                    raise ValueError(
                        f"The optimizer given by `optimizers=` does not update the peer {name!r}, which trains beside "
                        "the student: build it over the student's and every peer's parameters, or let "
                        "DistillationTrainer create it."
                    )
        adapted = [name for name, peer in self.peers.items() if hasattr(peer, "peft_config")]
        if adapted:
            raise ValueError(
                f"The peers {adapted} carry peft adapters, which hfkd does not yet save and restore for peers; merge "
                "them (merge_and_unload()) or pass the plain models."
            )
        self._args = trainer.args
        for name, peer in self.peers.items():
            peer.to(trainer.args.device)
            peer.train()
            others = ("student", *(n for n in self.peers if n != name))
            terms = TermSet(trainer.args.term_specs, others)
            terms.bind_module_names((), {})
            self.terms[name] = terms
            if self._sharded:  # sharded like the student: the same plugin, its layer classes or the peer's own
                self.wrapped[name] = prepare_sharded(peer, trainer.accelerator, frozen=False)
            else:
                self.wrapped[name] = trainer.accelerator.prepare_model(peer)  # DDP: its own gradient all-reduce
            self.loss_kwargs[name] = (accepts_loss_kwargs(unwrap_peft(peer)), True)

    def limits(self):
        # a peer must fit the data and the student's label space as a teacher would
        return {name: checks.model_limits(p, f"peer {name!r}") for name, p in self.peers.items()}

    def learners(self):
        return dict(self.peers)

    def head_parts(self):
        return None  # each peer's terms need the full logits

    @contextlib.contextmanager
    def evaluating(self):
        for peer in self.peers.values():
            peer.eval()
        try:
            yield
        finally:
            for peer in self.peers.values():
                peer.train()

    # ---------------------------------------------------------------- the probe
    def setup_terms(self, step, student_out, teaching: Teaching, batch: dict, full_batch: dict) -> None:
        """Each peer's terms see real outputs once (and each peer's logits must have the student's shape); each
        peer's own loss is measured for how it normalises."""
        s_logits = logits_of(student_out)
        for name, out in teaching.outputs.items():
            p_logits = logits_of(out)
            if s_logits is not None and (p_logits is None or p_logits.shape != s_logits.shape):
                raise ValueError(
                    f"The peer {name!r} gives logits of shape {None if p_logits is None else tuple(p_logits.shape)} "
                    f"where the student's are {tuple(s_logits.shape)}: peers must solve the student's task with "
                    "the same labels (a model of the same task head and label count or vocabulary)."
                )
        sides = {"student": Features(student_out, {}, step.kind)}
        sides.update({name: Features(out, {}, step.kind) for name, out in teaching.outputs.items()})
        term_batch = step.term_batch(batch, training=False)
        for name, terms in self.terms.items():
            others = {other: sides[other] for other in terms.teachers}
            mixed, _ = self._mixer.mix(terms, others, batch)
            terms.setup(sides[name], others, term_batch, mixed)
        for name, peer in self.peers.items():
            accepts, _ = self.loss_kwargs[name]
            self.loss_kwargs[name] = (accepts, step.measure_task_normalisation(peer, full_batch, accepts))

    # ---------------------------------------------------------------- the step
    def outputs(self, batch, teacher_inputs, flags, training, head=None, step=None, student_inputs=None, **kwargs):
        if step is None:  # the probe: no gradients, no task loss
            return Teaching({name: call_model(peer, teacher_inputs) for name, peer in self.peers.items()})
        num_items_in_batch = kwargs.get("num_items_in_batch")
        outs, tasks = {}, {}
        for name, peer in self.wrapped.items():
            self.peers[name].train(training)  # Trainer sets the student's mode each step; the peers follow it
            if self._args.task_weight > 0 and "labels" in student_inputs:
                accepts, uses_num_items = self.loss_kwargs[name]
                tasks[name], outs[name] = step.task_loss(
                    peer, dict(student_inputs), num_items_in_batch, training, accepts, uses_num_items
                )
            else:
                outs[name] = call_model(peer, {k: v for k, v in student_inputs.items() if k != "labels"})

        def learners_loss(student_out, term_batch, scale, training):
            return self._loss(step, student_out, outs, tasks, batch, term_batch, scale, training)

        return Teaching({name: detached(out) for name, out in outs.items()}, learners_loss=learners_loss)

    def _loss(self, step, student_out, outs, tasks, batch, term_batch, scale, training):
        """Each peer's loss (task + its terms against the student and the other peers, all detached) summed, and
        what is logged: `<peer>/task`, `<peer>/distill/<term>` (and per other model with more than one)."""
        sides = {"student": Features(detached(student_out), {}, step.kind)}
        sides.update({name: Features(detached(out), {}, step.kind) for name, out in outs.items()})
        loss, logged = None, {}
        for name, terms in self.terms.items():
            others = {other: sides[other] for other in terms.teachers}
            mixed, teacher_weights = self._mixer.mix(terms, others, batch)
            own = Features(outs[name], {}, step.kind)
            values = step.units.normalise(
                terms(own, others, term_batch, mixed=mixed, teacher_weights=teacher_weights),
                terms,
                term_batch.counts,
                scale,
                training,
                step.accumulation_steps(),
            )
            if name in tasks:
                # An example-level head: the mean over the window's labelled rows, as the student's (hfkd.step).
                own = step.labelled_task_loss(
                    self.peers[name], outs[name], term_batch.labels, term_batch.counts, scale
                )
                values = {"task": own if own is not None else tasks[name], **values}
            weights = {"task": self._args.task_weight, **{f"distill/{t}": w for t, w in terms.weights.items()}}
            for key, value in values.items():
                logged[f"{name}/{key}"] = value
                if key in weights:  # not one other model's share, logged only
                    weighted = value if weights[key] == 1 else weights[key] * value
                    loss = weighted if loss is None else loss + weighted
        return loss, logged

    # ---------------------------------------------------------------- training beside the student
    def trainable_groups(self, weight_decay, decay_names, known):
        groups = []
        for peer in self.peers.values():
            if self._sharded:  # the probe's forwards left the root units gathered: the optimizer takes the shards
                reshard(peer)
            # The settings Trainer gives the student's parameters (no decay on biases and norms), one group each.
            decay = set(decay_names(peer))
            named = [(n, p) for n, p in peer.named_parameters() if p.requires_grad and id(p) not in known]
            for wd, chosen in ((weight_decay, True), (0.0, False)):
                group = [p for n, p in named if (n in decay) == chosen]
                if group:
                    groups.append({"params": group, "weight_decay": wd})
        return groups

    def clip_gradients(self, max_norm: float) -> None:
        for peer in self.peers.values():  # each on its own, as if it trained alone (by its whole norm if sharded)
            clip_norm(peer.parameters(), max_norm)

    def zero_grad(self) -> None:
        for peer in self.peers.values():
            peer.zero_grad(set_to_none=True)

    def save_model(self, folder: str, processing_class=None) -> None:
        for name, peer in self.peers.items():
            state = whole_state(peer) if self._sharded else None  # a collective: every process gathers
            if self._args.should_save:
                save_peer(peer, peer_folder(folder, name), processing_class, state)

    def load_best(self, folder: str) -> None:
        for name, peer in self.peers.items():  # the peers as they were at the student's best checkpoint
            load_peer(peer, peer_folder(folder, name))  # every process reads the whole; a sharded peer keeps its part

    def load_checkpoint(self, folder: str) -> None:
        self.load_best(folder)

    def fingerprint(self, multi: bool) -> dict:
        return {"peers": {n: model_fingerprint(p, with_name=False) for n, p in self.peers.items()}}
