"""A teacher cache built by several processes: each runs the teacher over its own block of rows, one merges.

`accelerate launch -m hfkd cache ...` (or `build_teacher_cache` under any launcher that joins its processes in one
`torch.distributed` group) splits the data set into as many contiguous blocks as there are processes. The blocks
are cut at batch boundaries of the one-process build (`cache_batch_size` rows each), so every process runs the
teacher on exactly the batches, with exactly the padding, that one process would: the rows' records come out the
same, byte for byte. Each process writes its own Arrow shards into `<cache_dir>.partial/part-<rank>/` and, once its
last shard is on disk, a marker `done.json` with its layout and the top-k statistics of each batch. After a barrier,
process 0 checks that every part is marked done, moves the shards into `<cache_dir>.partial` in row order
(`data-00000.arrow`, ...), writes `hfkd_cache.json` as one process would (adding `processes`), and renames the folder
to `cache_dir`. A reader cannot tell the merged cache from one process's, except by shard boundaries (each process
starts a new shard) and that field.

A part without its marker means its process did not finish (killed, out of memory, or an error): the merge refuses
it and names the processes, and so does a reader pointed at the unfinished folder. The next build removes the
unfinished folder and starts again. `cache_dir` must be on a file system every process sees (one machine, or a
shared file system across machines).
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from .errors import TeacherCacheError

PART_PREFIX = "part-"
DONE_FILE = "done.json"
STEPS_FILE = "steps.npy"


class Processes(NamedTuple):
    """This process's place in the build: its rank and the number of processes."""

    rank: int
    count: int

    def barrier(self) -> None:
        if self.count > 1:
            import torch.distributed as dist

            dist.barrier()


def cache_processes(args) -> Processes:
    """The processes the build is split over: the `torch.distributed` group when one joins them, else one.

    A launch of several processes that no group joins is refused, as hfkd.launch refuses it for training: each
    process would run the teacher over all the rows and write the same folder."""
    import torch.distributed as dist

    from .launch import check_launch, launched_processes

    if launched_processes() > 1 and not (dist.is_available() and dist.is_initialized()):
        # TrainingArguments joins the launcher's processes when its device is first asked for (Accelerate's
        # PartialState, gloo on CPU with use_cpu=True).
        getattr(args, "device", None)
    if dist.is_available() and dist.is_initialized():
        processes = Processes(dist.get_rank(), dist.get_world_size())
    else:
        processes = Processes(0, 1)
    state = getattr(args, "distributed_state", None)
    kind = state.distributed_type if state is not None else ("MULTI_CPU" if processes.count > 1 else "NO")
    try:
        check_launch(args, processes=processes.count, distributed_type=kind, fsdp_applied=True)
    except ValueError as error:
        raise TeacherCacheError(str(error).replace("train alone", "cache alone")) from None
    return processes


def row_block(num_rows: int, batch_size: int, processes: Processes) -> range:
    """The rows this process caches: a contiguous block of whole batches of the one-process build (the last batch
    may be short), the batches split as evenly as the count allows."""
    batches = -(-num_rows // batch_size)
    first = processes.rank * batches // processes.count
    last = (processes.rank + 1) * batches // processes.count
    return range(first * batch_size, min(last * batch_size, num_rows))


def part_folder(partial: str, rank: int) -> str:
    return os.path.join(partial, f"{PART_PREFIX}{rank:05d}")


def mark_done(folder: str, layout: dict | None, rows: range, files: list[str], shard_rows: list[int], stats) -> None:
    """Records that this process's part is complete (written last, after its shards)."""
    covered, covered_n, steps = stats
    if steps:
        np.save(os.path.join(folder, STEPS_FILE), np.concatenate(steps))
    record = {
        "layout": layout,
        "rows": [rows.start, rows.stop],
        "shards": files,
        "shard_rows": shard_rows,
        # Per batch, so the merge sums them in the one-process order (float sums depend on it).
        "covered": covered,
        "covered_n": covered_n,
        "steps": bool(steps),
    }
    with open(os.path.join(folder, DONE_FILE), "w") as handle:
        json.dump(record, handle)


def unfinished_parts(partial: str) -> tuple[list[str], list[str]]:
    """(all part folders, those without their done marker) under an unfinished build's folder."""
    if not os.path.isdir(partial):
        return [], []
    parts = sorted(name for name in os.listdir(partial) if name.startswith(PART_PREFIX))
    missing = [name for name in parts if not os.path.isfile(os.path.join(partial, name, DONE_FILE))]
    return parts, missing


def merge_parts(partial: str, count: int) -> tuple[list[str], list[int], dict, tuple]:
    """Moves every part's shards into `partial` in row order and returns (shard files, rows per shard, layout,
    (per-batch top-k masses, their count, the compact steps)), as one process's build would have them."""
    records = []
    for rank in range(count):
        marker = os.path.join(part_folder(partial, rank), DONE_FILE)
        if not os.path.isfile(marker):
            records.append(None)
            continue
        with open(marker) as handle:
            records.append(json.load(handle))
    missing = [rank for rank, record in enumerate(records) if record is None]
    if missing:
        raise TeacherCacheError(
            f"The teacher cache in {partial} was built by {count} processes, but processes {missing} did not finish "
            "their part (no done marker): the cache is incomplete and was not written. If cache_dir is on a file "
            "system the other processes do not see, put it on a shared one; otherwise run the build again (it "
            "starts anew)."
        )
    layouts = [r["layout"] for r in records if r["layout"] is not None]
    if any(layout != layouts[0] for layout in layouts[1:]):
        raise TeacherCacheError(
            f"The processes that built {partial} planned different layouts ({layouts}); they must run the same "
            "teacher, data and settings."
        )
    files, shard_rows, covered, covered_n, steps = [], [], [], 0, []
    expected = 0
    for rank, record in enumerate(records):
        start, stop = record["rows"]
        if start != expected and stop > start:
            raise TeacherCacheError(f"Process {rank} cached rows from {start}, where row {expected} was next.")
        expected = max(expected, stop)
        folder = part_folder(partial, rank)
        for name, rows in zip(record["shards"], record["shard_rows"]):
            merged = f"data-{len(files):05d}.arrow"
            os.replace(os.path.join(folder, name), os.path.join(partial, merged))
            files.append(merged)
            shard_rows.append(rows)
        covered += record["covered"]
        covered_n += record["covered_n"]
        if record["steps"]:
            steps.append(np.load(os.path.join(folder, STEPS_FILE)))
    for rank in range(count):
        folder = part_folder(partial, rank)
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    return files, shard_rows, (layouts[0] if layouts else None), (covered, covered_n, steps)
