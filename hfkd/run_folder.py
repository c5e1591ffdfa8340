"""The output folder of a recipe run: what may be written into it, resuming it, and what a failed run leaves.

A folder is new, empty, or holds an hfkd run (its `hfkd_config.yaml`, written when the run starts, says so) or
someone else's files. hfkd writes into the first two; an hfkd run only to resume it (with its own configuration)
or when told to overwrite; anything else only when told to overwrite. Every refusal happens before anything is
written or deleted.
"""

import contextlib
import dataclasses
import glob
import os
import shutil
import sys

import yaml

from .checkpoints import check_complete

CONFIG_FILE = "hfkd_config.yaml"  # written when a run starts: it also marks the folder as an hfkd run
WORK_DIRS = ("teacher", "checkpoints")  # kept locally, never pushed
RUN_MARKERS = ("metrics.json", CONFIG_FILE, *WORK_DIRS)
TEACHER_RECORD = "hfkd_teacher.json"  # written into teacher/ once the fine-tuned teacher is saved whole
SCRATCH_DIRS = (
    os.path.join("teacher", "_trainer"),
    os.path.join("checkpoints", "_eval"),
    os.path.join("checkpoints", "_search"),
)
# Fields that say how a run is watched, published or placed, not what it computes: a resumed run may change them.
RUN_CONTROL_FIELDS = frozenset(
    {
        "output_dir",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        "report_to",
        "run_name",
        "project",
        "logging_dir",
        "disable_tqdm",
        "dataloader_num_workers",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "latency_repeats",
        "latency_batch_size",
    }
)
SECRET_FIELDS = frozenset({"hub_token"})


def resume_target(config) -> bool | str | None:
    """`resume_from_checkpoint` as the command line gives it: True for 'true' (the last checkpoint), a path, or None."""
    value = config.resume_from_checkpoint
    if value is None or value is False:
        return None
    if value is True:
        return True
    text = str(value).strip()
    if text.lower() in ("", "false", "no", "0", "none"):
        return None
    if text.lower() in ("true", "yes", "1", "last"):
        return True
    return text


def check_output_dir(output_dir: str, overwrite: bool, resume: bool | str | None = None, values=None) -> None:
    """Refuses, before any work, a folder that would lose files or mix runs; nothing is written or deleted.

    A new or empty folder is fine. A folder holding an hfkd run is refused unless the run is resumed (with the same
    configuration, `values`) or `overwrite` is set; a folder holding anything else is refused unless `overwrite`.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir} is a file, not a folder. Give --output_dir a folder path.")
    if resume and overwrite:
        raise ValueError(
            "resume_from_checkpoint and overwrite_output_dir=true contradict each other: resuming continues the run "
            f"in {output_dir}, overwriting starts it again. Give one of them."
        )
    if resume:
        _check_resume(output_dir, resume, values)
        return
    if overwrite or not os.path.isdir(output_dir):
        return
    entries = sorted(os.listdir(output_dir))
    if not entries:
        return
    markers = [m for m in RUN_MARKERS if m in entries]
    if markers:
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(markers)}). Continue it with "
            "--resume_from_checkpoint true, choose another output_dir, or pass --overwrite_output_dir true to write "
            "over it."
        )
    shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
    raise ValueError(
        f"output_dir {output_dir} is not empty and holds no hfkd run ({shown}); hfkd would write its student "
        "(model.safetensors, config.json, README.md, ...) over such files. Choose a new or empty output_dir, or pass "
        "--overwrite_output_dir true to write into it anyway."
    )


def _check_resume(output_dir: str, resume: bool | str, values: dict | None) -> None:
    if isinstance(resume, str) and not os.path.isdir(resume):
        what = "does not exist" if not os.path.exists(resume) else "is not a checkpoint folder"
        raise ValueError(
            f"resume_from_checkpoint={resume!r} {what}. Give a checkpoint-<step> folder of this run (they are in "
            f"{os.path.join(output_dir, 'checkpoints')}), or --resume_from_checkpoint true for its last one."
        )
    if isinstance(resume, str):
        check_complete(resume)  # one cut short while saving is refused, naming the newest complete one
    stored_path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(stored_path):
        raise ValueError(
            f"resume_from_checkpoint: {output_dir} holds no hfkd run to resume (no {CONFIG_FILE}). Start without "
            "resume_from_checkpoint, or give the output_dir of the run to continue."
        )
    if values is None:
        return
    with open(stored_path) as handle:
        stored = yaml.safe_load(handle) or {}
    changed = [
        name
        for name in sorted(set(stored) | set(values))
        if name not in RUN_CONTROL_FIELDS and stored.get(name) != values.get(name)
    ]
    if changed:
        shown = "; ".join(f"{name}: {stored.get(name)!r} -> {values.get(name)!r}" for name in changed[:8])
        raise ValueError(
            f"resume_from_checkpoint: this configuration differs from the run in {output_dir} ({shown}"
            f"{'; ...' if len(changed) > 8 else ''}). A resumed run continues exactly: rerun with the same values "
            f"(`hfkd distill --config {stored_path} --resume_from_checkpoint true`), or start a new run elsewhere."
        )


def run_values(recipe, data_args, config) -> dict:
    """Every field of the run, as `hfkd_config.yaml` holds them (secrets left out; never overwrite or resume)."""
    values = {}
    for obj in (recipe, data_args):
        values.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    for name, value in config.to_dict().items():
        if not name.startswith("_") and name not in SECRET_FIELDS:
            values[name] = value
    if getattr(config, "_use_cpu_for_bf16", False):
        values["use_cpu"] = False  # set for bf16 on this machine without an accelerator, not by the user
    # Running the file again must ask before it overwrites anything, and start rather than resume.
    values["overwrite_output_dir"] = False
    values["resume_from_checkpoint"] = None
    return yaml.safe_load(yaml.safe_dump(values, sort_keys=False))  # plain YAML values, as the file holds them


def _resumable(output_dir: str) -> bool:
    return os.path.isfile(os.path.join(output_dir, "teacher", TEACHER_RECORD)) or bool(
        glob.glob(os.path.join(output_dir, "checkpoints", "checkpoint-*"))
    )


@contextlib.contextmanager
def cleaned_on_failure(output_dir: str, is_main: bool):
    """A failed run leaves behind only what can be resumed (a finished teacher, checkpoints), never scratch folders.

    What it created in a new or empty folder goes when nothing in it can be resumed; files that were there before
    are never touched.
    """
    existed = os.path.isdir(output_dir)
    before = set(os.listdir(output_dir)) if existed else set()
    try:
        yield
    except BaseException:
        if is_main and os.path.isdir(output_dir):
            for scratch in SCRATCH_DIRS:
                shutil.rmtree(os.path.join(output_dir, scratch), ignore_errors=True)
            if _resumable(output_dir):
                print(
                    f"hfkd: the run stopped; {output_dir} keeps its finished stages and checkpoints. Continue it with "
                    "the same command and --resume_from_checkpoint true.",
                    file=sys.stderr,
                )
            elif not existed:
                shutil.rmtree(output_dir, ignore_errors=True)
            else:
                for name in set(os.listdir(output_dir)) - before:
                    path = os.path.join(output_dir, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        raise


def write_config(path: str, values: dict) -> None:
    with open(path, "w") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
