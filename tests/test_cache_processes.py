"""A teacher cache built by several processes (hfkd.cache_parts): the same records as one process's, refusals."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pyarrow as pa
import pytest
from launches import ENV, LAUNCH_TWO
from recipe_runs import _lm_recipe

from hfkd.cache import CACHE_FILE, TeacherCache, TeacherCacheError
from hfkd.cache_parts import DONE_FILE, Processes, cache_processes, merge_parts, part_folder, row_block

# Fields of hfkd_cache.json that say how and when the cache was written, not what it holds.
HOW_WRITTEN = {"created", "seconds", "shards", "shard_rows", "processes"}


def _table(path: str) -> pa.Table:
    with open(os.path.join(path, CACHE_FILE)) as handle:
        meta = json.load(handle)
    tables = []
    for name in meta["shards"]:
        with pa.memory_map(os.path.join(path, name)) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    return pa.concat_tables(tables).combine_chunks()


@pytest.mark.parametrize("processes", [1, 2, 3, 5])
@pytest.mark.parametrize("rows,batch", [(10, 3), (9, 3), (2, 4), (1, 1), (7, 1)])
def test_row_blocks_cover_every_row_once_in_whole_batches_of_the_one_process_build(rows, batch, processes):
    blocks = [row_block(rows, batch, Processes(rank, processes)) for rank in range(processes)]
    assert [r for block in blocks for r in block] == list(range(rows))
    for block in blocks:
        if len(block):
            assert block.start % batch == 0 and (block.stop % batch == 0 or block.stop == rows)
    # As even as whole batches allow: block sizes differ by at most one batch.
    sizes = [-(-len(block) // batch) for block in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_two_processes_write_the_records_one_process_writes(tmp_path, tiny_text):
    """`accelerate launch -m hfkd cache` with 2 CPU processes: every row's stored arrays equal one process's, byte
    for byte, and hfkd_cache.json says the same apart from how it was written; training reads it like any cache."""
    recipe = _lm_recipe(tmp_path, tiny_text, hidden_weight=1.0, hidden_loss="cosine")
    # Small shards and an odd batch size: each process writes several shards, and the blocks end mid-way.
    flags = ["--top_k", "8", "--cache_batch_size", "3", "--max_shard_size", "2KB", "--use_cpu", "true"]
    caches = {}
    for name, launcher in (("one", [sys.executable]), ("two", LAUNCH_TWO)):
        caches[name] = str(tmp_path / name)
        command = [*launcher, "-m", "hfkd", "cache", "--config", str(recipe), "--cache_dir", caches[name], *flags]
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        # One report, from process 0.
        assert result.stdout.count("Teacher cache:") == 1, result.stdout
    one, two = TeacherCache(caches["one"]), TeacherCache(caches["two"])
    assert two.meta["processes"] == 2 and "processes" not in one.meta
    assert len(two.meta["shards"]) > 2 and len(one) == len(two) > 6
    assert {k: v for k, v in one.meta.items() if k not in HOW_WRITTEN} == {
        k: v for k, v in two.meta.items() if k not in HOW_WRITTEN
    }
    first, second = _table(caches["one"]), _table(caches["two"])
    assert first.column_names == second.column_names and "hidden_0" in first.column_names
    for column in first.column_names:
        assert first[column].equals(second[column]), column
    assert not os.path.exists(caches["two"] + ".partial")


def _unfinished(tmp_path, finished: list[int], count: int) -> str:
    """The folder of a 3-process build where only `finished` processes wrote their marker."""
    partial = str(tmp_path / "cache.partial")
    for rank in range(count):
        folder = part_folder(partial, rank)
        os.makedirs(folder)
        if rank in finished:
            with open(os.path.join(folder, DONE_FILE), "w") as handle:
                json.dump(
                    {
                        "layout": None,
                        "rows": [0, 0],
                        "shards": [],
                        "shard_rows": [],
                        "covered": [],
                        "covered_n": 0,
                        "steps": False,
                    },
                    handle,
                )
    return partial


def test_a_cache_whose_processes_did_not_all_finish_is_refused_naming_them(tmp_path):
    partial = _unfinished(tmp_path, finished=[0, 2], count=3)
    with pytest.raises(TeacherCacheError, match=r"3 processes, but processes \[1\] did not finish"):
        merge_parts(partial, 3)
    # A reader pointed at the cache folder (or at the unfinished one itself) is told why, and what to do.
    for path in (str(tmp_path / "cache"), partial):
        with pytest.raises(TeacherCacheError, match=r"3 processes were building, and 1 of them did not finish"):
            TeacherCache(path)


def test_processes_that_no_group_joins_are_refused(monkeypatch):
    # Two processes launched (WORLD_SIZE=2) but never joined: each would cache every row into the same folder.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TeacherCacheError, match=r"2 processes were launched .* joined 1 .* cache alone"):
        cache_processes(SimpleNamespace(use_cpu=False, fsdp=None))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cache_processes(SimpleNamespace(use_cpu=False, fsdp=None)) == Processes(0, 1)
