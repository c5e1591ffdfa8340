"""The state a recipe run carries from stage to stage: every field is declared here, with what sets it, so no stage
reads a field that an earlier stage may or may not have set (a stage that has not run leaves its default)."""

from dataclasses import dataclass, field

import torch
from transformers import TrainerState

from ..config import DistillationConfig
from ..data import DataArguments
from .arguments import RecipeArguments
from .data import RecipeData
from .models import TeacherLocation


@dataclass
class Distillation:
    """What the distillation stage leaves for the stages after it and for metrics.json."""

    state: TrainerState
    """The trainer's state at the end (global_step, epoch, best checkpoint and metric)."""
    args: DistillationConfig
    """The arguments the distillation trainer ran with (its output_dir is checkpoints/)."""
    log_history: list[dict]
    """Every logged entry (training_log.json, report.png)."""
    layer_maps: dict[str, dict]
    """How the terms that pair layers per stream (hidden, attention) paired them, by term name."""


@dataclass
class RunState:
    """One recipe run. `prepare` (pipeline) fills the fields without defaults; each stage sets its own fields."""

    recipe: RecipeArguments
    data_args: DataArguments
    config: DistillationConfig
    source: TeacherLocation
    """Where the teacher came from (its path, init kwargs, and the record of an earlier hfkd run)."""
    resume: bool | str | None
    """resume_from_checkpoint as the run folder resolved it (run_folder.resume_target)."""
    data: RecipeData
    teacher: torch.nn.Module
    """The teacher as loaded, replaced by the fine-tuned one after stage 1."""
    peers: dict[str, torch.nn.Module] = field(default_factory=dict)
    """Deep mutual learning (peer_model_name_or_path): the peers by name ({} without)."""
    peer_sources: dict[str, str] = field(default_factory=dict)
    """Each peer's source as given."""
    times: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage that ran, in seconds (metrics.json's wall_time_s)."""
    teacher_finetune: dict | None = None
    """Stage 1 (teacher fine-tuning, or its record when resumed): steps, epochs, learning rate, ...; None without."""
    student: torch.nn.Module | None = None
    """The student: set by build_student, replaced by the last born-again generation."""
    student_note: str = ""
    """How the student was made, in a sentence (build_student)."""
    search: dict | None = None
    """The search (search_trials > 0): each trial's values and score, and the chosen values, which the distillation
    and every stage after it run with (stages.distill_config); else None."""
    distillation: Distillation | None = None
    """Set by the distillation stage."""
    generations: list[dict] | None = None
    """Born-again generations (recipe.generations > 1): each generation's teacher, steps and metric; else None."""
    labels_only: dict | None = None
    """The labels-only comparison (compare_without_distillation): its steps and metric; else None."""
    labels_only_rows: dict | None = None
    """The labels-only student's per-row scores on the held-out rows (evaluation.score); else None."""
    early_exit: bool = False
    """The student's exit heads (the byot term) were written beside it by distillation (or the last born-again
    generation), so evaluation measures each exit (hfkd.early_exit)."""

    @property
    def out(self) -> str:
        """The run's output folder."""
        return self.config.output_dir
