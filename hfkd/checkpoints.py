"""Which checkpoints are whole: a run killed while it saves one leaves a folder that cannot be resumed from.

transformers' `Trainer._save_checkpoint` (5.x) writes a checkpoint's model, optimizer, scheduler, scaler and RNG state
first and `trainer_state.json` last (the folder is neither written elsewhere and renamed, nor marked by another file);
`DistillationTrainer` then adds its terms' and mean teacher's state and writes its run file (`hfkd_run.json`) after
them, last of all. A checkpoint is therefore complete when its `trainer_state.json` reads as JSON and, in a folder of
DistillationTrainer checkpoints (one that holds a run file itself), its own run file does too. Sizes say nothing.
"""

import glob
import json
import logging
import os
import re
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

logger = logging.getLogger(__name__)

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


def read_run_file(directory: str) -> dict | None:
    """The fingerprint a run wrote into `directory` (hfkd_run.json), or None."""
    path = os.path.join(directory, RUN_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def write_run_file(directory: str, fingerprint: dict) -> None:
    """Writes hfkd_run.json whole (a temporary file renamed into place)."""
    path = os.path.join(directory, RUN_FILE)
    with open(path + ".tmp", "w") as handle:  # renamed into place: the file is there whole or not at all
        json.dump(fingerprint, handle, indent=1)
    os.replace(path + ".tmp", path)


def describe_run(fingerprint: dict | None) -> str:
    """The models of a run fingerprint, for messages."""
    if not fingerprint:
        return "unknown models"
    teacher, student = fingerprint.get("teacher", {}), fingerprint.get("student", {})
    if "peers" in fingerprint:
        return f"peers {sorted(fingerprint['peers'])}, student {student.get('class', '?')}"
    if "teachers" in fingerprint:
        return f"teachers {sorted(fingerprint['teachers'])}, student {student.get('class', '?')}"
    name = teacher.get("name_or_path") or teacher.get("class", "?")
    return f"teacher {name} [{teacher.get('config_sha256', '?')}], student {student.get('class', '?')} [{student.get('config_sha256', '?')}]"


def resume_target(output_dir: str, resume_from_checkpoint):
    """`True` becomes the newest complete checkpoint, passing over any the run was killed while saving (Trainer
    would take the newest folder and fail on its missing trainer_state.json); an incomplete one given by path is
    refused."""
    if resume_from_checkpoint is True:
        path, skipped = last_complete_checkpoint(output_dir)
        if skipped:
            if path is None:
                raise ValueError(
                    f"resume_from_checkpoint=True: {output_dir} holds no complete checkpoint, only "
                    f"{describe_skipped(skipped)}, cut short while saving. Start without resume_from_checkpoint."
                )
            logger.warning(
                "Resuming from %s, the newest complete checkpoint; skipped %s: the run stopped while saving it.",
                path,
                describe_skipped(skipped),
            )
        return path if path is not None else True  # none at all: Trainer says so
    if isinstance(resume_from_checkpoint, str) and os.path.isdir(resume_from_checkpoint):
        check_complete(resume_from_checkpoint)
    return resume_from_checkpoint


def check_run_folder(args, fingerprint: dict, resume_from_checkpoint) -> None:
    """Refuses to mix a run's checkpoints with another run's (told apart by their hfkd_run.json), before anything
    is written; then writes this run's into `args.output_dir`."""
    out = args.output_dir
    if resume_from_checkpoint:
        path = get_last_checkpoint(out) if resume_from_checkpoint is True else resume_from_checkpoint
        stored = read_run_file(path) if path else None
        if stored is not None and stored != fingerprint:
            raise ValueError(
                f"{path} was written by another run (teacher/student {describe_run(stored)}; this run: "
                f"{describe_run(fingerprint)}). Resume with the models that made it, or start without "
                "resume_from_checkpoint."
            )
    elif glob.glob(os.path.join(out, f"{PREFIX_CHECKPOINT_DIR}-*")):
        stored = read_run_file(out)
        if stored != fingerprint:
            if not args.overwrite_output_dir:
                raise ValueError(
                    f"output_dir {out} holds checkpoints of another run ({describe_run(stored)}; this run: "
                    f"{describe_run(fingerprint)}). Choose another output_dir, resume that run, or set "
                    "overwrite_output_dir=True to delete its checkpoints."
                )
            if args.should_save:
                for folder in glob.glob(os.path.join(out, f"{PREFIX_CHECKPOINT_DIR}-*")):
                    shutil.rmtree(folder)
    if args.should_save:
        os.makedirs(out, exist_ok=True)
        write_run_file(out, fingerprint)
