"""The mean teacher (hfkd.ema): a copy of the student, kept its exponential moving average after every update."""

from __future__ import annotations

import copy

from ..ema import EMATeacher, EMAUpdate
from .frozen import FrozenTeachers


class MeanTeacher(FrozenTeachers):
    """A frozen teacher that is the moving average of the student (`teacher_ema_decay`); it starts as the student."""

    described_as = "teacher_ema_decay"

    def __init__(self, student, decay: float):
        super().__init__({"teacher": copy.deepcopy(student)})
        self.decay = decay
        self.ema: EMATeacher | None = None

    def check_tokenizers(self, student_tokenizer, student) -> None:
        """A copy of the student reads the student's ids."""

    def attach(self, trainer) -> None:
        super().attach(trainer)
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "teacher_ema_decay with DeepSpeed or FSDP: the student's weights are sharded, so no process holds "
                "them whole to average; train without teacher_ema_decay, or on one device or with DDP."
            )
        student = trainer.accelerator.unwrap_model(trainer.model)
        if trainer.optimizer is not None:  # `optimizers=` gave one: it must own every trainable weight to average
            owned = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
            missing = [n for n, p in student.named_parameters() if p.requires_grad and id(p) not in owned]
            if missing:
                raise ValueError(
                    f"teacher_ema_decay averages the student's weights after each optimizer step, but the optimizer "
                    f"given by `optimizers=` does not update {len(missing)} trainable parameters (e.g. {missing[:3]}). "
                    "Build it over all of model.parameters(), or freeze those (requires_grad=False)."
                )
        teacher = trainer.accelerator.unwrap_model(self.teachers["teacher"])
        self.ema = EMATeacher(teacher, student, self.decay)
        trainer.add_callback(EMAUpdate(self.ema, lambda: trainer.accelerator.optimizer_step_was_skipped))

    def save_checkpoint(self, folder: str) -> None:
        self.ema.save(folder)

    def load_checkpoint(self, folder: str) -> None:
        self.ema.load(folder)
