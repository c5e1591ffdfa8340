"""Which checkpoints are whole: a run killed while it saves one leaves a folder that cannot be resumed from.

transformers' `Trainer._save_checkpoint` (5.x) writes a checkpoint's model, optimizer, scheduler, scaler and RNG state
first and `trainer_state.json` last (the folder is neither written elsewhere and renamed, nor marked by another file);
`DistillationTrainer` then adds its terms' and mean teacher's state and writes its run file (`hfkd_run.json`) after
them, last of all. A checkpoint is therefore complete when its `trainer_state.json` reads as JSON and, in a folder of
DistillationTrainer checkpoints (one that holds a run file itself), its own run file does too. Sizes say nothing.
"""

import json
import os
import re

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
RUN_FILE = "hfkd_run.json"  # written last into a DistillationTrainer checkpoint; also in the folder of checkpoints
_STEP = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def _unreadable(path: str) -> str | None:
    """Why a JSON file written last cannot be trusted ('no X', 'X cut short'), or None when it reads."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        return f"no {name}"
    try:
        with open(path) as handle:
            json.load(handle)
    except (OSError, ValueError):
        return f"{name} cut short"
    return None


def incomplete_reason(checkpoint: str) -> str | None:
    """None for a complete checkpoint, else what it lacks (e.g. 'no trainer_state.json')."""
    reason = _unreadable(os.path.join(checkpoint, TRAINER_STATE))
    if reason is None and os.path.isfile(os.path.join(os.path.dirname(os.path.normpath(checkpoint)), RUN_FILE)):
        reason = _unreadable(os.path.join(checkpoint, RUN_FILE))
    return reason


def checkpoint_folders(folder: str) -> list[str]:
    """The `checkpoint-<step>` folders in `folder`, oldest step first."""
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := _STEP.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(found) if os.path.isdir(os.path.join(folder, name))]


def last_complete_checkpoint(folder: str) -> tuple[str | None, dict[str, str]]:
    """The newest complete checkpoint in `folder` (None if there is none), and the newer incomplete ones it passes
    over, each with what it lacks."""
    skipped = {}
    for path in reversed(checkpoint_folders(folder)):
        reason = incomplete_reason(path)
        if reason is None:
            return path, skipped
        skipped[path] = reason
    return None, skipped


def describe_skipped(skipped: dict[str, str]) -> str:
    """'checkpoint-10 (no trainer_state.json)', for a log line or an error."""
    return ", ".join(f"{os.path.basename(path)} ({why})" for path, why in skipped.items())


def check_complete(checkpoint: str) -> None:
    """Refuses an explicit checkpoint that was cut short while saving, naming the newest complete one beside it."""
    reason = incomplete_reason(checkpoint)
    if reason is None:
        return
    newest, _ = last_complete_checkpoint(os.path.dirname(os.path.normpath(checkpoint)))
    instead = (
        f"Resume from the newest complete one, {newest} (resume_from_checkpoint=true takes it)"
        if newest
        else "No complete checkpoint is beside it: start without resume_from_checkpoint"
    )
    raise ValueError(
        f"resume_from_checkpoint={checkpoint!r} is incomplete ({reason}): the run stopped while saving it "
        f"(transformers writes {TRAINER_STATE} last). {instead}."
    )
