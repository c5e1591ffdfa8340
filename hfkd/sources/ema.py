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
        self._trainer = None
        self._gathered: dict | None = None

    def check_tokenizers(self, student_tokenizer, student) -> None:
        """A copy of the student reads the student's ids."""

    def attach(self, trainer) -> None:
        if trainer.is_deepspeed_enabled:
            raise ValueError(
                "teacher_ema_decay with DeepSpeed: ZeRO keeps the student's weights in its engine's own partitions, "
                "which hfkd does not reach to average (and ZeRO-3 would need the teacher partitioned the same way). "
                "Use FSDP instead (recipes/accelerate/fsdp.yaml: each process averages its own shard), DDP, or one "
                "device."
            )
        # Under FSDP2 the copy is sharded by the student's plugin here: the same layer classes, the same rows per
        # process, so that each process can average its shard of the teacher with its shard of the student.
        super().attach(trainer)
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
        self._trainer = trainer
        if not trainer.is_fsdp_enabled:
            self._bound()
        trainer.add_callback(EMAUpdate(self._bound, lambda: trainer.accelerator.optimizer_step_was_skipped))

    def _bound(self) -> EMATeacher:
        """The teacher and student weights paired, once both are final: under FSDP2 the Trainer shards the student
        when training starts, replacing its parameters with sharded ones, so the pairs are made at first use."""
        if self.ema is None:
            accelerator = self._trainer.accelerator
            teacher = accelerator.unwrap_model(self.teachers["teacher"])
            self.ema = EMATeacher(teacher, accelerator.unwrap_model(self._trainer.model), self.decay)
        return self.ema

    def gather_checkpoint(self) -> None:
        if self._trainer.is_fsdp_enabled:
            state = self._bound().gather_state()  # a collective: every process takes part
            self._gathered = state if self._trainer.args.should_save else None

    def save_checkpoint(self, folder: str) -> None:
        self._bound().save(folder, self._gathered)
        self._gathered = None

    def load_checkpoint(self, folder: str) -> None:
        self._bound().load(folder)
