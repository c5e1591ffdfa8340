"""`TeacherSource`: where the teachers' outputs for a batch come from, behind one small protocol.

The trainer and the step ask their source; they never ask which kind it is. A new place a teacher's outputs can come
from (a sharded teacher, synthesised data, ...) is one new subclass here:

- `names`: the teachers' names, in order; the terms are built once per name (`TermSet`).
- `outputs(batch, teacher_inputs, ...)`: a `Teaching` for one batch: each teacher's outputs, and optionally the
  input of the chunked head term and a loss of models that learn too (peers).
- `limits()`, `module_names()`, `model(name)`: what each teacher accepts, its submodule names (terms bind to them),
  and the module the hooks capture (None where no model runs).
- `attach(trainer)`: the set-up that needs the built `Trainer` (devices, callbacks, checks against its optimizer).
- `trainable_groups(...)`, `clip_gradients(...)`, `zero_grad()`: models that train beside the student.
- `save_checkpoint` / `load_checkpoint` / `save_model` / `load_best`: the files a source adds to checkpoints.
- `fingerprint()`: which teachers a run's checkpoints belong to (hfkd_run.json).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import ModelLimits


@dataclass
class Teaching:
    """What a source gives for one batch.

    Attributes:
        outputs: each teacher's outputs by name (model outputs, or cached outputs that read like them).
        head_inputs: the teacher side of the chunked head term by name (its final hidden states, or cached outputs),
            when the step asked for it.
        learners_loss: for sources whose models train too (peers): given the student's outputs, the term batch, the
            unit scale and whether this is training, returns (their summed loss or None, what to log).
    """

    outputs: dict[str, Any]
    head_inputs: dict[str, Any] = field(default_factory=dict)
    learners_loss: Callable[..., tuple[torch.Tensor | None, dict[str, torch.Tensor]]] | None = None


class TeacherSource:
    """Base class of teacher sources; every method has the behaviour of a source without models or state."""

    #: the teachers' names, in order
    names: tuple[str, ...] = ("teacher",)
    #: the name of this source in messages that refuse a combination ("a teacher cache (teacher_cache_dir)")
    described_as: str | None = None

    # ---------------------------------------------------------------- set-up and checks
    def attach(self, trainer) -> None:
        """Set-up that needs the built Trainer (its accelerator, optimizer, callbacks); nothing by default."""

    def check_tokenizers(self, student_tokenizer, student: torch.nn.Module) -> None:
        """Before Trainer is built: each teacher reads the student's token ids (no teacher tokenizer given)."""

    def check_terms(self, term_set) -> None:
        """After the terms are built: each term can be served by this source (raises naming the term)."""

    def prepare_data(self, trainer) -> None:
        """Before the first step: routes what the batches must carry (row indices, cached outputs) into the
        trainer's data set and collator; nothing by default."""

    def limits(self) -> dict[str, ModelLimits]:
        """What each teacher accepts (label space, vocabulary, lengths), by name."""
        return {}

    def module_names(self) -> dict[str, tuple[str, ...]]:
        """Each teacher's submodule names (for terms that pick submodules by name patterns)."""
        return {}

    def model(self, name: str) -> torch.nn.Module | None:
        """The module of teacher `name` whose forward runs in the step (hooks capture its submodules), or None."""
        return None

    def models(self) -> dict[str, torch.nn.Module]:
        """Every model that runs, by name."""
        return {}

    def learners(self) -> dict[str, torch.nn.Module]:
        """Models that train beside the student (the peers of deep mutual learning), by name."""
        return {}

    def head_parts(self) -> list[torch.nn.Module] | None:
        """The teacher's (body, linear head) that the chunked head term reads; [] where its logits are stored (the
        cache serves them); None: no chunking."""
        return []

    def setup_terms(self, step, student_out, teaching: Teaching, window: dict, measured: dict) -> None:
        """The probe: terms of models that learn too see real outputs once (peers); nothing by default."""

    def check_probe_outputs(self, term_set, student, teachers: dict) -> None:
        """The probe: the teachers' outputs can serve every term (e.g. the cached layers); nothing by default."""

    # ---------------------------------------------------------------- the step
    def outputs(self, batch: dict, teacher_inputs: dict, flags: dict, training: bool, head=None, **kwargs):
        """A `Teaching` for this batch, or None when there is none (evaluation without a teacher)."""
        raise NotImplementedError

    def serves_head(self, batch: dict, head) -> bool:
        """Whether the teacher side of the chunked head term (`head`, a `probe.HeadPlan`) can come from here."""
        return False

    @contextlib.contextmanager
    def evaluating(self):
        """Models that train beside the student are in eval mode inside the block (the probe)."""
        yield

    # ---------------------------------------------------------------- training beside the student
    def trainable_groups(self, weight_decay: float, decay_names, known: set[int]) -> list[dict]:
        """Optimizer parameter groups of models that train too; [] by default."""
        return []

    def clip_gradients(self, max_norm: float) -> None:
        """Clips the gradients of models that train too, each on its own."""

    def zero_grad(self) -> None:
        """Clears the gradients of models that train too (Trainer clears only the student's)."""

    # ---------------------------------------------------------------- files
    def whole_head(self):
        """A context inside which the teacher's output head can be called outside its forward (sharded teachers
        gather it; hfkd.sharding.gathered). Entered by every process."""
        return contextlib.nullcontext()

    def gather_checkpoint(self) -> None:
        """Called on every process before the main one saves a checkpoint: collectives (gathering sharded state)
        go here, since `save_checkpoint` runs on the main process alone."""

    def save_checkpoint(self, folder: str) -> None:
        """Writes this source's state into a checkpoint folder (main process)."""

    def load_checkpoint(self, folder: str) -> None:
        """Restores this source's state from a checkpoint folder."""

    def save_model(self, folder: str, processing_class=None) -> None:
        """Writes models that trained too beside the saved student. Called on every process (sharded models are
        gathered collectively); only the main one writes."""

    def load_best(self, folder: str) -> None:
        """Restores models that trained too as they were at the best checkpoint (on every process)."""

    def fingerprint(self, multi: bool) -> dict:
        """The teachers part of hfkd_run.json: which models the checkpoints belong to."""
        raise NotImplementedError
