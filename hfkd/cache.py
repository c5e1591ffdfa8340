"""Teacher-output cache: run the teacher once over a data set, store what the terms need, then train without it.

`build_teacher_cache` (CLI: `hfkd cache`) runs the teacher over a `datasets.Dataset` in order and writes, per row,
what the configured terms read:

- logits: all of them when there are at most `top_k` classes (classification heads), else the `top_k` most likely
  ids with their log-probabilities at the configured temperature plus the remaining mass as one more bucket
  (see `hfkd.losses.topk`), in the `topk_encoding` chosen (below);
- hidden states: the teacher layers the hidden layer map pairs with the student's.

Only real positions are stored (those the attention mask keeps), so any padding at training time lines up. The
folder holds Arrow stream shards (`data-00000.arrow`, ... readable with `datasets.Dataset.from_file`), memory-mapped
when read, and `hfkd_cache.json`: the layout and fingerprints of the teacher (config and sampled weights), the
tokenizer or image processor, the data (its bytes) and the terms. `DistillationConfig.teacher_cache_dir` points the
trainer at it; a cache that does not match the run is refused with the reason.

Several processes (`accelerate launch -m hfkd cache ...`, or this function under any launcher whose processes join
one `torch.distributed` group) split the rows between them and process 0 merges their parts into the cache one
process would have written (hfkd.cache_parts).

Not cached: attention maps (`[heads, query, key]` per layer is larger than the models' inputs by orders of
magnitude) and encoder-decoder teachers.

On-disk format, version 3 (`FORMAT_VERSION`; `hfkd_cache.json` holds it as `format_version`)
---------------------------------------------------------------------------------------------
Version 3 sizes shards in bytes (`max_shard_size`) and lists each shard's rows as `shard_rows`; version 2 had a
fixed `rows_per_shard` and is still read (`READ_VERSIONS`). A cache in any other version (version 1: hfkd before
the compact encoding) is refused when opened, naming the version found and the ones read; rebuild it with `hfkd
cache`. Each shard is one Arrow IPC stream; each of its rows is one data row, and every per-row array is a
`large_list` column holding that row's values flat, real positions in order (`length` of them), so position p of a
row with k values per position is `values[p * k : (p + 1) * k]`.

    row             int64            index of the data row (shards hold consecutive rows, `shard_rows` of them)
    length          int32            real positions stored (-1: the row was cached without an attention mask and
                                     its arrays are not per position)
    logits          float32/float16  dense mode: every logit, [length, num_classes] (`cache_dtype`)
    hidden_<t>      bfloat16 (as its uint16 bits) | float16 | float32 (`hidden.dtype`; version 2: `dtype`)
                                     teacher hidden_states[t], [length, hidden] or the state's own shape
    ... top-k logits, topk_encoding 'compact' (the default):
    topk_ids        uint16 | uint32 | uint8  [length, k] the teacher's k most likely ids, most likely first, in
                                     `id_bytes` (in hfkd_cache.json) bytes each: uint16 when the vocabulary has at
                                     most 65,536 classes; 3 little-endian uint8 bytes per id up to 2**24; uint32 above
    topk_codes      uint8            [length, k] code c_i = round((l_1 - l_i) / step): how far the i-th log-probability
                                     l_i lies below the position's top one l_1, in steps (0 for the top id; 255 for
                                     the k-th, so the codes span exactly l_1 - l_k; gaps capped at 100 nats)
    topk_step       float16          [length] step = (l_1 - l_k) / 255, rounded up to a float16 (0: all k equal)
    topk_rest       float16          [length] log of the mass outside the k ids, log R (at least float16's lowest;
                                     log(1 - their mass) when the k hold less than half, which keeps 1 - R precise)
    ... top-k logits, topk_encoding 'float' (the layout of format version 1):
    topk_ids        int32            [length, k] the k most likely ids, most likely first
    topk_logprobs   float32/float16  [length, k + 1] their log-probabilities at T, then log R (`cache_dtype`)

Decoding 'compact' (`decode_topk_logprobs`): the relative log-probabilities -c_i * step are shifted so that the k
probabilities sum to 1 - R: l_i' = -c_i * step - logsumexp_j(-c_j * step) + log(1 - exp(log R)), and log R is taken
as stored. The losses then read (ids, [l_1' ... l_k', log R]) exactly as they read the 'float' layout. Error bound:
every decoded top-k log-probability is within step + 2**-11 of the teacher's (step / 2 from each code's rounding,
step / 2 at most from the shift, 2**-11 from the float16 tail while the top k hold more than 6e-5 of the mass), and
log R within 2**-11 * |log R| (float16 rounding). Size: k * (id_bytes + 1) + 4 bytes per position: 148 at k = 48
with a vocabulary up to 65,536 (the 'float' layout: k * 4 + (k + 1) * 2 = 770 at k = 128 in float16).
"""

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from . import __version__
from .batch import LABEL_KEYS, ROW_COLUMN, TEACHER_PREFIX, teacher_inputs
from .batch import student_inputs as batch_student_inputs
from .cache_parts import cache_processes, mark_done, merge_parts, part_folder, row_block, unfinished_parts
from .checks import ModelLimits, model_limits
from .errors import TeacherCacheError
from .fingerprint import dataset_fingerprint, model_fingerprint, processor_fingerprint
from .losses.topk import TOPK_LOSSES, fold_teacher
from .models import unwrap_peft
from .terms.base import build_term

logger = logging.getLogger(__name__)

CACHE_FILE = "hfkd_cache.json"
# 2: top-k logits in the compact encoding by default ('float' keeps version 1's columns); see the module docstring.
# 3: shards sized in bytes (hfkd_cache.json lists each shard's rows), hidden states in bfloat16 by default.
FORMAT_VERSION = 3
# Versions this hfkd reads: version 2 differs only in its fixed rows per shard (`rows_per_shard`).
READ_VERSIONS = (2, 3)
# Batch keys that carry cached teacher outputs to the loss (never passed to a model).
CACHED_PREFIX = "hfkd_cached_"


def cached_prefix(teacher: str | None = None) -> str:
    """Batch-key prefix of a teacher's cached outputs: `hfkd_cached_` for one teacher, `hfkd_cached_<name>/` for
    each of several (one cache per teacher)."""
    return CACHED_PREFIX if teacher is None else f"{CACHED_PREFIX}{teacher}/"


_FLOAT_TYPES = {"float32": np.float32, "float16": np.float16}
# Hidden-state dtypes and their bytes. bfloat16 (stored as its uint16 bits: numpy and Arrow have no bfloat16) is the
# default: float32's exponent range, so no teacher's activations overflow (Llama residual streams carry values in the
# hundreds to thousands; float16 ends at 65,504), at half float32's size; benchmarks/README.md measures its effect.
HIDDEN_DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEFAULT_HIDDEN_DTYPE = "bfloat16"
# Records per shard file, in bytes: the shard being filled is held in memory.
DEFAULT_SHARD_SIZE = "256MB"

# How top-k logits are stored (module docstring): 'compact' quantises, 'float' is format version 1's layout.
TOPK_ENCODINGS = ("compact", "float")
# top_k when none is given, per encoding: 48 keeps 'compact' at 148 bytes per position (benchmarks/bench_cache.py).
DEFAULT_TOP_K = {"compact": 48, "float": 128}
CODE_LEVELS = 255  # uint8 codes 0 ... 255
MAX_GAP = 100.0  # nats below a position's top log-probability that the codes can reach (e^-100: nothing in float32)
_HALF_LOWEST = float(np.finfo(np.float16).min)


# ---------------------------------------------------------------------------------------------------- encoding
def check_topk_options(top_k, topk_encoding, error=ValueError) -> None:
    """Refuses a bad `top_k` or `topk_encoding` by name, with the values that are accepted."""
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise error(
            f"top_k must be an integer >= 0 (0 keeps all logits) or unset (None: {DEFAULT_TOP_K['compact']} for "
            f"topk_encoding 'compact', {DEFAULT_TOP_K['float']} for 'float'), got {top_k!r}."
        )
    if topk_encoding not in TOPK_ENCODINGS:
        raise error(
            f"topk_encoding must be 'compact' (ids in 2-4 bytes and log-probabilities as uint8 steps: 148 bytes per "
            f"position at top_k 48) or 'float' (format version 1's layout: int32 ids and cache_dtype "
            f"log-probabilities), got {topk_encoding!r}."
        )


def id_bytes(num_classes: int) -> int:
    """Bytes per stored id in the compact encoding: the narrowest of 2, 3, 4 that holds ids 0 ... num_classes - 1."""
    return 2 if num_classes <= 1 << 16 else 3 if num_classes <= 1 << 24 else 4


def pack_ids(ids: np.ndarray, width: int) -> np.ndarray:
    """Flat ids as stored: uint16 (width 2), uint32 (4), or 3 little-endian uint8 bytes per id (3)."""
    flat = np.asarray(ids).reshape(-1)
    if width == 2:
        return flat.astype(np.uint16)
    as32 = flat.astype("<u4")
    return as32 if width == 4 else as32.view(np.uint8).reshape(-1, 4)[:, :3].reshape(-1)


def unpack_ids(stored: np.ndarray, width: int) -> np.ndarray:
    """`pack_ids` undone: flat int64 ids."""
    if width != 3:
        return stored.astype(np.int64)
    padded = np.zeros((len(stored) // 3, 4), dtype=np.uint8)
    padded[:, :3] = stored.reshape(-1, 3)
    return padded.view("<u4").reshape(-1).astype(np.int64)


def encode_topk_logprobs(log_probs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [..., k], step float16 [...], rest float16 [...]) of top-k log-probabilities `[..., k + 1]`
    (k of them, most likely first, then the log of the rest of the mass), as the compact encoding stores them."""
    values = torch.as_tensor(log_probs).detach().to("cpu", torch.float64).numpy()
    top, rest = values[..., :-1], values[..., -1]
    if top.shape[-1] == 0:
        return np.zeros(top.shape, np.uint8), np.zeros(rest.shape, np.float16), _half_rest(rest)
    # The decoder scales the top k to mass 1 - R: when they hold less than half, R is taken as 1 - their summed mass,
    # which is as precise as their log-probabilities (a tail summed in float32 is not, relative to 1 - R).
    mass = np.exp(top).sum(-1)
    with np.errstate(divide="ignore"):
        rest = np.where(mass < 0.5, np.log1p(-np.minimum(mass, 0.5)), rest)
    with np.errstate(invalid="ignore"):
        gap = np.nan_to_num(np.minimum(top.max(-1, keepdims=True) - top, MAX_GAP), nan=MAX_GAP).clip(0.0, MAX_GAP)
    span = gap.max(-1)
    step = (span / CODE_LEVELS).astype(np.float16)
    # Rounded up: codes of the largest gap then stay within 255.
    low = step.astype(np.float64) * CODE_LEVELS < span
    step[low] = np.nextafter(step[low], np.float16(np.inf))
    wide = step.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(wide[..., None] > 0, np.rint(gap / wide[..., None]), 0.0)
    return codes.clip(0, CODE_LEVELS).astype(np.uint8), step, _half_rest(rest)


def _half_rest(rest: np.ndarray) -> np.ndarray:
    """log R in float16; log 0 (the top k hold everything) as float16's lowest finite value, so 0 * log R is 0."""
    return np.nan_to_num(rest, neginf=_HALF_LOWEST).clip(_HALF_LOWEST, 0.0).astype(np.float16)


def decode_topk_logprobs(codes, step, rest, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The k + 1 log-probabilities the top-k losses read, from the compact encoding's codes `[..., k]`, step and
    rest `[...]`: the codes' relative log-probabilities shifted so that the k probabilities sum to 1 - R."""
    codes, step, rest = (
        x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x)) for x in (codes, step, rest)
    )
    relative = -codes.to(dtype) * step.to(dtype).unsqueeze(-1)
    log_rest = rest.to(dtype)
    top_mass = torch.log(-torch.expm1(log_rest)).clamp_min(torch.finfo(dtype).min)  # log(1 - R)
    top = relative - relative.logsumexp(-1, keepdim=True) + top_mass.unsqueeze(-1)
    return torch.cat([top, log_rest.unsqueeze(-1)], dim=-1)


# ---------------------------------------------------------------------------------------------------- checks
def _check_deterministic(dataset, collator, name: str) -> None:
    """Refuses inputs that differ from one epoch to the next: a cache would freeze one draw of them."""
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        raise TeacherCacheError(
            f"A teacher cache needs {name} to be a datasets.Dataset (got {type(dataset).__name__}): its rows are "
            "fingerprinted and addressed by index. Convert it with datasets.Dataset.from_list/from_dict."
        )
    if dataset.format.get("type") == "custom":
        raise TeacherCacheError(
            f"{name} has a transform (set_transform/with_transform), which runs anew each time a row is read and is "
            "usually random augmentation; cached teacher outputs would describe other inputs than the student sees. "
            "Apply deterministic preprocessing with .map() before caching, or train with the online teacher."
        )
    if collator is None or len(dataset) == 0:
        return
    features = [dict(dataset[i]) for i in range(min(4, len(dataset)))]
    draws = []
    # The training run's random streams must not notice this check (the sampler draws from them later).
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        for seed in (0, 1):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            draws.append(collator([dict(f) for f in features]))
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    for key, value in draws[0].items():
        other = draws[1].get(key)
        if isinstance(value, torch.Tensor) and not (isinstance(other, torch.Tensor) and torch.equal(value, other)):
            raise TeacherCacheError(
                f"The data collator ({type(collator).__name__}) returned a different {key!r} for the same rows under "
                "another random seed: it draws random masks or augmentations (e.g. DataCollatorForLanguageModeling "
                "with mlm=True). A cache would freeze one draw; use a deterministic collator or the online teacher."
            )


def _teacher_columns(dataset, teacher: torch.nn.Module, student: torch.nn.Module | None) -> list[str]:
    """Columns the models read (as Trainer's remove_unused_columns keeps them); text and ids of other kinds go."""
    import inspect

    wanted = {"label", "label_ids", "labels"}
    for model in (teacher, student):
        if model is not None:
            wanted |= set(inspect.signature(unwrap_peft(model).forward).parameters)
    return [c for c in dataset.column_names if c in wanted or c.startswith(TEACHER_PREFIX)]


# ---------------------------------------------------------------------------------------------------- build
def build_teacher_cache(
    teacher: torch.nn.Module,
    dataset,
    output_dir: str,
    *,
    args,
    student: torch.nn.Module | None = None,
    data_collator=None,
    processing_class=None,
    top_k: int | None = None,
    topk_encoding: str = "compact",
    batch_size: int = 8,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    dtype: str = "float32",
    hidden_dtype: str = DEFAULT_HIDDEN_DTYPE,
    overwrite: bool = False,
    progress: bool = True,
) -> "TeacherCache":
    """Runs `teacher` over `dataset` once and writes what `args`'s terms need to `output_dir`.

    Args:
        teacher: the (trained) teacher; it is run in eval mode without gradients on its own device.
        dataset: the training data as the trainer will get it (a `datasets.Dataset`, preprocessed with `.map`).
        output_dir: a new folder (or an existing cache with `overwrite=True`; it is replaced only once the new one
            is complete).
        args: the `DistillationConfig` of the run: its weights, temperature, logit loss and hidden layer map.
        student: needed when a term reads the teacher's hidden states (`hidden_weight > 0`, or `rkd`, `sp`, `pkt`,
            `crd`, `pkd` on hidden states), to resolve their layers (one forward on two rows).
        data_collator: the trainer's collator (default: `transformers.default_data_collator`); must be
            deterministic.
        processing_class: the tokenizer or image processor, fingerprinted so the trainer can check it.
        top_k: keep this many classes per position when the head has more (0: keep all logits; None: 48 for the
            'compact' encoding, 128 for 'float').
        topk_encoding: how top-k logits are stored: 'compact' (ids in 2, 3 or 4 bytes, log-probabilities as uint8
            steps below the position's top one; 148 bytes per position at top_k 48) or 'float' (format version 1's
            layout: int32 ids, log-probabilities in `dtype`). The module docstring gives both layouts.
        batch_size: rows per teacher forward.
        max_shard_size: bytes of records per Arrow shard, as an int or a string such as "256MB" or "1GiB"; a shard
            is written once its records reach it (it may exceed it by one batch's records). The records of the shard
            being filled are held in memory, so this bounds the build's memory beside the model and one batch.
        dtype: 'float32' or 'float16' for dense logits and 'float' top-k log-probabilities (float16 halves them,
            ~1e-3 relative error).
        hidden_dtype: 'bfloat16' (default), 'float16' or 'float32' for hidden states; see `CacheArguments`.
        progress: show a progress bar.
    """
    from transformers import default_data_collator

    collator = data_collator if data_collator is not None else default_data_collator
    max_shard_bytes, top_k = _check_storage(dtype, hidden_dtype, max_shard_size, top_k, topk_encoding)
    hidden_terms = _check_what_to_cache(args, teacher, student, top_k)
    _check_output_and_data(output_dir, overwrite, dataset, collator)

    processes = cache_processes(args)
    progress = progress and processes.rank == 0

    started = time.perf_counter()
    data_digest = dataset_fingerprint(dataset)
    rows_view = dataset.select_columns(_teacher_columns(dataset, teacher, student))
    device = next(teacher.parameters()).device
    plan = _BuildPlan(args, student, hidden_terms, top_k, topk_encoding, dtype, hidden_dtype, output_dir)
    rows = row_block(len(rows_view), batch_size, processes)
    was_training = teacher.training
    teacher.eval()
    if processes.rank == 0:
        _new_partial_folder(output_dir)
    processes.barrier()  # the others write into the folder process 0 has just made
    partial = output_dir.rstrip("/") + ".partial"
    # Several processes: each writes its own part, which process 0 merges (hfkd.cache_parts).
    folder = partial if processes.count == 1 else part_folder(partial, processes.rank)
    os.makedirs(folder, exist_ok=True)
    writer = _ShardWriter(folder, max_shard_bytes, first_row=rows.start)
    try:
        layout, topk_stats = _write_records(
            teacher, rows_view, rows, collator, device, writer, plan, batch_size, progress
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        teacher.train(was_training)
    if processes.count > 1:
        mark_done(folder, layout, rows, writer.files, writer.shard_rows, topk_stats)
        processes.barrier()
        if processes.rank == 0:
            files, shard_rows, layout, topk_stats = merge_parts(partial, processes.count)
            writer.files, writer.shard_rows = files, shard_rows

    if processes.rank == 0:
        _add_topk_stats(layout, *topk_stats, topk_encoding)
        meta = _cache_meta(
            started, dataset, max_shard_bytes, writer, dtype, teacher, processing_class, data_digest, layout
        )
        if processes.count > 1:
            meta["processes"] = processes.count
        with open(os.path.join(partial, CACHE_FILE), "w") as handle:
            json.dump(meta, handle, indent=1)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(partial, output_dir)
        logger.info("Teacher cache of %d rows written to %s in %.1f s.", len(dataset), output_dir, meta["seconds"])
    processes.barrier()  # every process returns the finished cache
    return TeacherCache(output_dir)


def _check_storage(dtype, hidden_dtype, max_shard_size, top_k, topk_encoding) -> tuple[int, int]:
    """`build_teacher_cache`'s storage options: (max shard bytes, top_k with its default)."""
    if dtype not in _FLOAT_TYPES:
        raise TeacherCacheError(f"dtype must be one of {list(_FLOAT_TYPES)}, got {dtype!r}.")
    if hidden_dtype not in HIDDEN_DTYPES:
        raise TeacherCacheError(f"hidden_dtype must be one of {list(HIDDEN_DTYPES)}, got {hidden_dtype!r}.")
    max_shard_bytes = parse_size(max_shard_size, "max_shard_size", TeacherCacheError)
    check_topk_options(top_k, topk_encoding, TeacherCacheError)
    if top_k is None:
        top_k = DEFAULT_TOP_K[topk_encoding]
    return max_shard_bytes, top_k


def _check_what_to_cache(args, teacher, student, top_k: int) -> list:
    """What the run's terms read from the teacher can be cached; returns the terms that read its hidden states."""
    if args.attention_weight > 0:
        raise TeacherCacheError(
            "attention_weight > 0, but attention maps are not cached ([heads, query, key] per layer per row would "
            "dwarf the data); set attention_weight=0 for a cached run, or train with the online teacher."
        )
    hidden_terms = _hidden_terms(args, teacher, student)
    if not _wants_logits(args) and not hidden_terms:
        raise TeacherCacheError(
            "logit_weight and hidden_weight are 0 and no term reads the teacher's logits or hidden states: the cache "
            "would hold nothing. Set one > 0."
        )
    if getattr(getattr(unwrap_peft(teacher), "config", None), "is_encoder_decoder", False):
        raise TeacherCacheError("Encoder-decoder teachers are not cached yet; train with the online teacher.")
    if hidden_terms and student is None:
        raise TeacherCacheError(
            f"The terms {[t.name for t in hidden_terms]} read the teacher's hidden states: pass `student=` so that "
            "their layers can be resolved."
        )
    if args.logit_weight > 0 and top_k and args.logit_loss not in TOPK_LOSSES:
        raise TeacherCacheError(
            f"logit_loss={args.logit_loss!r} needs the teacher's full logits, and a head with more than top_k={top_k} "
            f"classes keeps only its top-k: pass top_k=0, or use one of {list(TOPK_LOSSES)}."
        )
    return hidden_terms


def _check_output_and_data(output_dir: str, overwrite: bool, dataset, collator) -> None:
    if os.path.exists(output_dir) and os.listdir(output_dir) and not overwrite:
        raise TeacherCacheError(
            f"{output_dir} already exists and is not empty; choose another folder or replace it: `hfkd cache ... "
            "--overwrite_cache true` (Python: build_teacher_cache(..., overwrite=True)); the old cache is replaced only "
            "once the new one is complete."
        )
    _check_deterministic(dataset, collator, "the dataset")
    if len(dataset) == 0:
        raise TeacherCacheError("The dataset is empty: there is nothing to cache.")


def _new_partial_folder(output_dir: str) -> str:
    """The empty folder the cache is written to, `<output_dir>.partial`; it becomes `output_dir` once complete."""
    partial = output_dir.rstrip("/") + ".partial"
    if os.path.exists(partial):
        # Exceptions remove the folder (build_teacher_cache), so a leftover one means the process was ended from
        # outside.
        logger.warning(
            "Found %s, left by an earlier cache build into %s that did not finish: it was probably killed (out of "
            "memory, or a signal such as SIGKILL) before it could clean up. Removing it and building anew.",
            partial,
            output_dir,
        )
        shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    return partial


class _BuildPlan(NamedTuple):
    """What `build_teacher_cache` stores and how, as its checks settled it."""

    args: Any
    student: torch.nn.Module | None
    hidden_terms: list
    top_k: int
    topk_encoding: str
    dtype: str
    hidden_dtype: str
    output_dir: str


def _write_records(
    teacher, rows_view, block: range, collator, device, writer, plan: _BuildPlan, batch_size: int, progress: bool
):
    """Runs the teacher over the rows of `block` a batch at a time and hands each batch's records to `writer`
    (closed at the end). The layout is planned, and the disk checked, on the first batch's outputs.

    Returns:
        (layout (None for an empty block), (the summed top-k mass of each batch, its number of rows, the compact
        encoding's steps per batch)).
    """
    from tqdm.auto import tqdm

    layout, bar = None, None
    covered, covered_n, steps = [], 0, []
    for start in range(block.start, block.stop, batch_size):
        rows = list(range(start, min(start + batch_size, block.stop)))
        batch = collator([dict(rows_view[i]) for i in rows])
        inputs = _teacher_inputs(batch, device)
        with torch.no_grad():
            out = teacher(**inputs, **_flags(teacher, bool(plan.hidden_terms)))
        if layout is None:
            layout = _first_layout(out, batch, collator, rows_view, plan)
            bar = tqdm(total=len(block), desc="teacher cache", unit="row", disable=not progress)
        lengths, columns, stats = _batch_records(out, batch, layout, plan.args.temperature, plan.dtype)
        del out  # the batch's full outputs go before the next forward; the records are copies
        covered.append(stats[0])
        covered_n += stats[1]
        if stats[2] is not None:
            steps.append(stats[2])
        writer.add(rows, lengths, columns)
        bar.update(len(rows))
    if bar is not None:
        bar.close()
    writer.close()
    return layout, (covered, covered_n, steps)


def _first_layout(out, batch, collator, rows_view, plan: _BuildPlan) -> dict:
    """The stored layout, planned from the first batch's outputs with the chosen encodings; the disk must hold it."""
    layout = _plan_layout(out, batch, plan.args, plan.hidden_terms, plan.student, collator, rows_view, plan.top_k)
    if layout["logits"] is not None and layout["logits"]["mode"] == "topk":
        layout["logits"]["encoding"] = plan.topk_encoding
        if plan.topk_encoding == "compact":
            layout["logits"]["id_bytes"] = id_bytes(layout["logits"]["num_classes"])
    if layout["hidden"] is not None:
        layout["hidden"]["dtype"] = plan.hidden_dtype
    _check_size(layout, batch, rows_view, plan.output_dir, plan.dtype)
    return layout


def _add_topk_stats(layout: dict, covered: list, covered_n: int, steps: list, topk_encoding: str) -> None:
    """Top-k logits: the mean mass the kept classes hold, and the compact encoding's error bounds, in the layout."""
    if layout["logits"] is not None and layout["logits"]["mode"] == "topk":
        layout["logits"]["mean_top_k_mass"] = sum(covered) / max(covered_n, 1)  # batch by batch, in row order
        if topk_encoding == "compact":
            # The quantisation's error bound per position is its step (+ 2**-11): its largest and mean over the data.
            steps = np.concatenate(steps) if steps else np.zeros(0)
            layout["logits"]["step_max"] = float(steps.max()) if steps.size else 0.0
            layout["logits"]["step_mean"] = float(steps.mean()) if steps.size else 0.0


def _cache_meta(
    started, dataset, max_shard_bytes, writer, dtype, teacher, processing_class, data_digest, layout
) -> dict:
    """The cache's description (CACHE_FILE): versions, shards, fingerprints of teacher, processor and data, layout."""
    return {
        "format_version": FORMAT_VERSION,
        "hfkd_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 2),
        "num_rows": len(dataset),
        "max_shard_bytes": max_shard_bytes,
        "shards": writer.files,
        "shard_rows": writer.shard_rows,
        "dtype": dtype,
        "teacher": model_fingerprint(teacher, with_weights=True),
        "teacher_limits": asdict(model_limits(teacher, "teacher")),
        "processor": processor_fingerprint(processing_class),
        "data": data_digest,
        "logits": layout["logits"],
        "hidden": layout["hidden"],
    }


def _flags(teacher, hidden_states: bool) -> dict:
    import inspect

    flags = {"output_hidden_states": True} if hidden_states else {}
    if "use_cache" in inspect.signature(unwrap_peft(teacher).forward).parameters:
        flags["use_cache"] = False
    return flags


def _teacher_inputs(batch: dict, device) -> dict:
    """What the teacher reads from a collated batch (as in training: `hfkd.batch.teacher_inputs`), on its device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in teacher_inputs(batch).items()}


def _positions(batch: dict, b: int) -> torch.Tensor | None:
    """Real positions of row b (attention mask), checked to be a prefix: left padding is refused."""
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    keep = mask[b].bool()
    n = int(keep.sum())
    if not bool(keep[:n].all()):
        raise TeacherCacheError(
            "The batch is padded on the left. Models that number positions from the first column (Llama, ...) "
            "then give outputs that depend on how much padding a batch has, which a cache cannot store. Pad on the "
            "right for caching and training (tokenizer.padding_side = 'right')."
        )
    return keep


def _wants_logits(args) -> bool:
    """The logit term, or a configured term that reads the teacher's logits (e.g. dkd), needs them cached."""
    return args.logit_weight > 0 or any(build_term(spec).needs().logits for spec in args.term_specs)


def _hidden_terms(args, teacher, student) -> list:
    """The configured terms that read the teacher's hidden states; one the cache cannot serve is refused by name."""

    def names(model):
        return tuple(name for name, _ in unwrap_peft(model).named_modules()) if model is not None else ()

    terms = []
    for spec in args.term_specs:
        term = build_term(spec)
        term.bind_module_names(names(student), names(teacher))  # as in training: some terms pick modules by name
        needs = term.needs()
        if needs.attentions or needs.teacher_modules:
            what = "attention maps" if needs.attentions else f"submodule outputs {list(needs.teacher_modules)}"
            raise TeacherCacheError(
                f"The term {spec.name!r} reads the teacher's {what}, which a teacher cache does not store; drop the "
                "term from the cached run, or train with the online teacher."
            )
        if needs.hidden_states:
            terms.append(term)
    return terms


def _plan_layout(out, batch, args, hidden_terms, student, collator, rows_view, top_k) -> dict:
    layout = {"logits": None, "hidden": None}
    if _wants_logits(args):
        logits = getattr(out, "logits", None)
        if logits is None:
            raise TeacherCacheError("The logit term (or a term that reads logits), but the teacher returns none.")
        classes = logits.shape[-1]
        token_level = logits.dim() >= 3
        mode = "topk" if top_k and classes > top_k else "dense"
        layout["logits"] = {"mode": mode, "num_classes": classes, "token_level": token_level}
        if mode == "topk":
            layout["logits"].update(top_k=top_k, temperature=args.temperature)
    if hidden_terms:
        t_states = getattr(out, "hidden_states", None)
        if not t_states:
            names = [t.name for t in hidden_terms]
            raise TeacherCacheError(
                f"The terms {names} read hidden states, but the teacher returns no `hidden_states`."
            )
        probe = collator([dict(rows_view[i]) for i in range(min(2, len(rows_view)))])
        student_inputs = {
            k: v.to(next(student.parameters()).device) if isinstance(v, torch.Tensor) else v
            for k, v in batch_student_inputs(probe).items()
            if k not in LABEL_KEYS
        }
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                s_states = student(**student_inputs, output_hidden_states=True).hidden_states
        finally:
            student.train(was_training)
        layers = set()
        for term in hidden_terms:
            wanted = term.teacher_hidden_layers(len(s_states), len(t_states))
            if wanted is None:
                raise TeacherCacheError(
                    f"The term {term.name!r} cannot say which teacher hidden states it reads, so a cache cannot store "
                    "them; train with the online teacher."
                )
            layers.update(wanted)
        layers = sorted(layers)
        positional = {t: t_states[t].dim() == 3 and _positions(batch, 0) is not None for t in layers}
        layout["hidden"] = {
            "layers": layers,
            "num_hidden_states": len(t_states),
            "positional": {str(t): positional[t] for t in layers},
            "shapes": {str(t): list(t_states[t].shape[2 if positional[t] else 1 :]) for t in layers},
        }
    return layout


def _batch_records(out, batch, layout: dict, temperature: float, dtype: str) -> tuple[list[int], dict, tuple]:
    """A batch's stored arrays: (per-row `length`s, {column: (the batch's values flat, in their stored dtype and row
    order; the count of values of each row)}, (summed per-row top-k mass, rows counted, the compact steps or None)).

    The values are fresh arrays that share no memory with `out`, and each is computed over the whole batch at once:
    a view would keep the batch's full outputs alive, and per-row temporaries as large as a row's logits (25 MB for
    128 positions of a 49k vocabulary) interleaved with small long-lived allocations fragment the heap, which then
    grows by about one row's logits per row (issue 25).
    """
    rows = out.logits.shape[0] if getattr(out, "logits", None) is not None else out.hidden_states[0].shape[0]
    keeps = [_positions(batch, b) for b in range(rows)]
    mask = torch.stack(keeps) if keeps[0] is not None else None
    lengths = [int(k.sum()) for k in keeps] if mask is not None else [-1] * rows

    def flat(x: torch.Tensor, positional: bool) -> tuple[torch.Tensor, list[int]]:
        """x `[rows, ...]` as `[values, *trailing]` (the kept positions of each row when positional) and the count of
        entries each row contributes."""
        if positional and mask is not None:
            return x[mask.to(x.device)], lengths
        per_row = x.shape[1] if positional else 1
        return x.reshape(rows * per_row, *x.shape[(2 if positional else 1) :]), [per_row] * rows

    columns, stats = {}, (0.0, 0, None)
    logits_layout = layout["logits"]
    if logits_layout is not None:
        logits, counts = flat(out.logits, logits_layout["token_level"])
        if logits_layout["mode"] == "dense":
            columns["logits"] = (_owned(logits, dtype), _times(counts, logits.shape[-1]))
        else:
            k = logits_layout["top_k"]
            ids, log_probs = fold_teacher(logits, k, temperature)
            del logits
            if logits_layout["encoding"] == "compact":
                codes, steps, rest = encode_topk_logprobs(log_probs)
                width = logits_layout["id_bytes"]
                stored = 3 if width == 3 else 1  # entries per id: 3 uint8 bytes, else one uint16/uint32
                columns["topk_ids"] = (_owned(pack_ids(ids.cpu().numpy(), width)), _times(counts, k * stored))
                columns["topk_codes"] = (_owned(codes), _times(counts, k))
                columns["topk_step"] = (_owned(steps), counts)
                columns["topk_rest"] = (_owned(rest), counts)
                steps = steps.reshape(-1).astype(np.float64)
            else:
                columns["topk_ids"] = (_owned(ids.to(torch.int32)), _times(counts, k))
                columns["topk_logprobs"] = (_owned(log_probs, dtype), _times(counts, k + 1))
                steps = None
            mass = log_probs[..., :-1].exp().sum(-1).double()
            per_row = [part.mean().item() for part in mass.split(counts) if part.numel()]
            stats = (sum(per_row), len(per_row), steps)
    if layout["hidden"] is not None:
        for t in layout["hidden"]["layers"]:
            positional = layout["hidden"]["positional"][str(t)]
            state, counts = flat(out.hidden_states[t], positional)
            columns[f"hidden_{t}"] = (_owned(state, layout["hidden"]["dtype"]), _times(counts, state[0].numel()))
    return lengths, columns, stats


def _times(counts: list[int], per_entry: int) -> list[int]:
    return [c * per_entry for c in counts]


def _owned(values, dtype: str | None = None) -> np.ndarray:
    """`values` (tensor or array) flat, in `dtype` ('bfloat16': its bits as uint16), as a new numpy array that owns
    its memory."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if dtype == "bfloat16":
            values = values.to(torch.bfloat16).view(torch.int16)
        elif dtype is not None:
            values = values.to(getattr(torch, dtype))
        values = values.numpy()
        if dtype == "bfloat16":
            values = values.view(np.uint16)
    elif dtype is not None:
        values = values.astype(_FLOAT_TYPES[dtype], copy=False)
    return np.array(values.reshape(-1), copy=True)


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as their uint16 bits (hidden_dtype 'bfloat16') as float32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def parse_size(value, name: str = "max_shard_size", error=ValueError) -> int:
    """Bytes of a size given as an int or a string: "500MB", "1.5GB", "256MiB", "4096" (KB/MB/GB are powers of
    1000, KiB/MiB/GiB of 1024, as in transformers' `max_shard_size`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        for unit, factor in _SIZE_UNITS:
            if text.endswith(unit):
                try:
                    number = int(float(text[: len(text) - len(unit)]) * factor)  # [:-0] would be empty
                except ValueError:
                    number = 0
                break
    if number < 1:
        raise error(
            f"{name} must be a positive size in bytes, an int or a string such as '256MB' or '1GiB', got {value!r}."
        )
    return number


_SIZE_UNITS = (
    ("KIB", 2**10), ("MIB", 2**20), ("GIB", 2**30), ("TIB", 2**40),
    ("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12), ("B", 1), ("", 1),
)  # fmt: skip


def _human(n: float) -> str:
    for unit, factor in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n:.0f} B"


def expected_sizes(layout: dict, dtype: str) -> dict[str, tuple[int, bool]]:
    """Bytes each stored column takes, {column group: (bytes, per position (True) or per row (False))}: the logits
    (all their columns together) and each hidden state; Arrow's offsets (8 bytes per row and column) not counted."""
    sizes = {}
    logits = layout["logits"]
    if logits is not None:
        width = np.dtype(_FLOAT_TYPES[dtype]).itemsize
        k, classes = logits.get("top_k"), logits["num_classes"]
        if logits["mode"] == "dense":
            per = classes * width
        elif logits["encoding"] == "compact":
            per = k * (logits["id_bytes"] + 1) + 4
        else:
            per = k * 4 + (k + 1) * width
        sizes["logits"] = (per, logits["token_level"])
    hidden = layout["hidden"]
    if hidden is not None:
        width = HIDDEN_DTYPES[hidden["dtype"]]
        for t in hidden["layers"]:
            sizes[f"hidden_{t}"] = (math.prod(hidden["shapes"][str(t)]) * width, hidden["positional"][str(t)])
    return sizes


def _count_positions(rows_view, batch) -> int:
    """Real positions (tokens) in the data: the attention masks' sum, else the input ids' lengths, else the first
    batch's count per row times the rows."""
    import pyarrow.compute as pc

    for column, measure in (("attention_mask", pc.list_flatten), ("input_ids", pc.list_value_length)):
        if column in rows_view.column_names:
            total = 0
            for table in rows_view.select_columns([column]).with_format("arrow").iter(batch_size=4096):
                total += pc.sum(measure(table.column(column))).as_py() or 0
            return int(total)
    mask = batch.get("attention_mask")
    ids = batch.get("input_ids")
    per_row = mask.sum() / mask.shape[0] if isinstance(mask, torch.Tensor) else ids.shape[1] if ids is not None else 1
    return int(round(float(per_row) * len(rows_view)))


def _check_size(layout: dict, batch, rows_view, output_dir: str, dtype: str) -> int:
    """Logs what the cache will take (per token and in all, logits and each hidden state apart) and refuses when the
    disk that holds `output_dir` has less free space; returns the expected bytes."""
    sizes = expected_sizes(layout, dtype)
    rows = len(rows_view)
    positions = _count_positions(rows_view, batch) if any(p for _, p in sizes.values()) else 0
    totals = {name: size * (positions if per_position else rows) for name, (size, per_position) in sizes.items()}
    total = sum(totals.values()) + rows * (12 + 8 * len(sizes))  # row, length and offsets
    per_token = sum(size for size, per_position in sizes.values() if per_position)
    parts = ", ".join(
        f"{name} {size:,} B per {'token' if per_position else 'row'} ({_human(totals[name])})"
        for name, (size, per_position) in sizes.items()
    )
    parent = os.path.dirname(os.path.abspath(output_dir.rstrip("/"))) or "."
    free = shutil.disk_usage(parent).free
    logger.info(
        "Teacher cache expected size: %s B per token, %s in all for %s rows (%s tokens): %s. Free on %s: %s.",
        f"{per_token:,}",
        _human(total),
        f"{rows:,}",
        f"{positions:,}",
        parts,
        parent,
        _human(free),
    )
    if total > free:
        raise TeacherCacheError(
            f"The teacher cache needs about {_human(total)} ({total:,} bytes: {parts}), but {parent} has only "
            f"{_human(free)} ({free:,} bytes) free. Free some space, choose a cache_dir on another disk, or store "
            "less: a smaller top_k, cache_hidden_dtype bfloat16 or float16, fewer rows (max_train_samples)."
        )
    return total


class _ShardWriter:
    """Copies each batch's records into one growing buffer per column and writes them as an Arrow stream file once
    they reach `max_bytes`; the buffers are reused, so memory stays at one shard's records (plus growth slack)."""

    def __init__(self, folder: str, max_bytes: int, first_row: int = 0):
        self.folder, self.max_bytes = folder, max_bytes
        self.files: list[str] = []
        self.shard_rows: list[int] = []
        self.next_row = first_row
        self._columns: dict[str, _Column] = {}
        self._rows: list[int] = []
        self._lengths: list[int] = []

    def add(self, rows: list[int], lengths: list[int], columns: dict) -> None:
        if rows[0] != self.next_row:
            raise AssertionError("rows must be added in order")  # internal invariant, not user input
        self.next_row = rows[-1] + 1
        self._rows += rows
        self._lengths += lengths
        for key, (values, counts) in columns.items():
            self._columns.setdefault(key, _Column()).add(values, counts)
        if sum(c.used for c in self._columns.values()) >= self.max_bytes:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self._rows:
            return
        arrays = [pa.array(self._rows, type=pa.int64()), pa.array(self._lengths, type=pa.int32())]
        names = ["row", "length"]
        for key, column in self._columns.items():
            arrays.append(column.arrow())
            names.append(key)
        table = pa.Table.from_arrays(arrays, names=names)
        name = f"data-{len(self.files):05d}.arrow"
        with pa.OSFile(os.path.join(self.folder, name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
            out.write_table(table)
        del table, arrays
        self.files.append(name)
        self.shard_rows.append(len(self._rows))
        self._rows, self._lengths = [], []
        for column in self._columns.values():
            column.clear()

    def close(self) -> None:
        self._flush()


class _Column:
    """One column of the shard being filled: its values in one buffer (grown by doubling, kept between shards) and
    each row's offset."""

    def __init__(self):
        self.buffer = None
        self.count = 0
        self.offsets = [0]

    @property
    def used(self) -> int:
        return self.count * self.buffer.itemsize if self.buffer is not None else 0

    def add(self, values: np.ndarray, counts: list[int]) -> None:
        end = self.count + len(values)
        if self.buffer is None or end > len(self.buffer):
            grown = np.empty(max(end, 2 * (len(self.buffer) if self.buffer is not None else 0)), values.dtype)
            if self.buffer is not None:
                grown[: self.count] = self.buffer[: self.count]
            self.buffer = grown
        self.buffer[self.count : end] = values
        self.count = end
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)

    def arrow(self):
        import pyarrow as pa

        offsets = pa.array(np.asarray(self.offsets, dtype=np.int64))
        return pa.LargeListArray.from_arrays(offsets, pa.array(self.buffer[: self.count]))

    def clear(self) -> None:
        self.count, self.offsets = 0, [0]


# ---------------------------------------------------------------------------------------------------- read
class TeacherCache:
    """A teacher cache on disk, memory-mapped; `gather` turns rows into batch tensors that line up with a batch."""

    def __init__(self, path: str):
        meta_path = os.path.join(path, CACHE_FILE)
        if not os.path.isfile(meta_path):
            for folder in (path, path.rstrip("/") + ".partial"):
                parts, unfinished = unfinished_parts(folder)
                if unfinished:
                    raise TeacherCacheError(
                        f"teacher_cache_dir={path!r}: {folder} holds a teacher cache that {len(parts)} processes were "
                        f"building, and {len(unfinished)} of them did not finish ({', '.join(unfinished)} hold no "
                        "done marker): it is incomplete. Build it again with `hfkd cache` (the unfinished folder is "
                        "removed first)."
                    )
            raise TeacherCacheError(
                f"teacher_cache_dir={path!r} holds no {CACHE_FILE}; build the cache first with `hfkd cache` (or "
                "hfkd.build_teacher_cache)."
            )
        with open(meta_path) as handle:
            self.meta = json.load(handle)
        found = self.meta.get("format_version")
        if found not in READ_VERSIONS:
            version = found if found is not None else "unknown (none recorded)"
            by = self.meta.get("hfkd_version") or "an unknown version"
            raise TeacherCacheError(
                f"{path} is a teacher cache in format version {version} (its {CACHE_FILE}, written by hfkd {by}), "
                f"but this hfkd ({__version__}) reads format versions "
                f"{' and '.join(map(str, READ_VERSIONS))} only (version 2 stores top-k logits in the compact encoding "
                "by default, version 3 sizes shards in bytes). Rebuild "
                f"it with `hfkd cache` and the flags it was built with, plus --cache_dir {path} --overwrite_cache true "
                "(Python: build_teacher_cache(..., overwrite=True))."
            )
        logits = self.meta.get("logits")
        if logits and logits.get("mode") == "topk" and logits.get("encoding") not in TOPK_ENCODINGS:
            raise TeacherCacheError(
                f"{path} stores top-k logits in the encoding {logits.get('encoding')!r}, which this hfkd "
                f"({__version__}) cannot decode (it reads {list(TOPK_ENCODINGS)}); rebuild it with `hfkd cache`."
            )
        self.path = path
        hidden = self.meta.get("hidden") or {}
        bits = [f"hidden_{t}" for t in hidden.get("layers", [])] if hidden.get("dtype") == "bfloat16" else []
        self._shards = [_open_shard(os.path.join(path, name), bits) for name in self.meta["shards"]]
        # First row of each shard: format 3 records each shard's rows (shards are sized in bytes), format 2 had a
        # fixed rows_per_shard.
        counts = self.meta.get("shard_rows")
        if counts is None:
            per = self.meta["rows_per_shard"]
            counts = [min(per, len(self) - i * per) for i in range(len(self._shards))]
        self._starts = np.concatenate([[0], np.cumsum(counts)])[:-1].astype(np.int64)

    # -- what it holds
    @property
    def teacher(self) -> dict:
        return self.meta["teacher"]

    @property
    def logits(self) -> dict | None:
        return self.meta["logits"]

    @property
    def hidden_layers(self) -> list[int]:
        return self.meta["hidden"]["layers"] if self.meta["hidden"] else []

    def teacher_limits(self) -> ModelLimits:
        values = dict(self.meta["teacher_limits"])
        for key in ("image_size", "label_names"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return ModelLimits(**values)

    def __len__(self) -> int:
        return self.meta["num_rows"]

    # -- checks against a run
    def check_config(self, args) -> None:
        """The run's terms must be computable from what is stored."""
        where = f"teacher_cache_dir={self.path!r}"
        rebuild = "rebuild it with `hfkd cache` for this configuration"
        if args.attention_weight > 0:
            raise TeacherCacheError(
                f"attention_weight > 0, but attention maps are not cached ({where}); set attention_weight=0 or train "
                "with the online teacher (teacher_cache_dir unset)."
            )
        logits = self.logits
        if args.logit_weight > 0:
            if logits is None:
                raise TeacherCacheError(f"logit_weight > 0, but {where} holds no logits; {rebuild}.")
            if logits["mode"] == "topk":
                if args.logit_loss not in TOPK_LOSSES:
                    raise TeacherCacheError(
                        f"logit_loss={args.logit_loss!r} needs full logits, but {where} holds the top "
                        f"{logits['top_k']}; use one of {list(TOPK_LOSSES)} or rebuild with top_k=0."
                    )
                if not math.isclose(args.temperature, logits["temperature"]):
                    raise TeacherCacheError(
                        f"temperature={args.temperature} but {where} stores top-k probabilities at temperature "
                        f"{logits['temperature']}; set temperature={logits['temperature']} or {rebuild}."
                    )
        if args.hidden_weight > 0 and self.meta["hidden"] is None:
            raise TeacherCacheError(f"hidden_weight > 0, but {where} holds no hidden states; {rebuild}.")

    def check_run(self, dataset, collator, teacher: torch.nn.Module | None, processing_class) -> None:
        """Data, teacher and processor must be the ones the cache was built from."""
        where = f"teacher_cache_dir={self.path!r}"
        _check_deterministic(dataset, collator, "train_dataset")
        digest = dataset_fingerprint(dataset)
        if digest != self.meta["data"]:
            raise TeacherCacheError(
                f"train_dataset (rows:digest {digest}) is not the data {where} was built from ({self.meta['data']}); "
                "rows, order or preprocessing differ. Rebuild the cache with `hfkd cache` on this data."
            )
        if teacher is not None:
            mine = model_fingerprint(teacher, with_weights=True)
            keys = ("class", "config_sha256", "weights_sha256")
            if any(mine.get(k) != self.teacher.get(k) for k in keys):
                raise TeacherCacheError(
                    f"The teacher given to the trainer ({mine.get('name_or_path', mine['class'])}, weights "
                    f"{mine.get('weights_sha256')}) is not the one {where} was built with "
                    f"({self.teacher.get('name_or_path', self.teacher['class'])}, weights "
                    f"{self.teacher.get('weights_sha256')}). Pass that teacher, none at all, or rebuild the cache."
                )
        stored = self.meta.get("processor")
        mine = processor_fingerprint(processing_class)
        if stored and mine and stored != mine:
            raise TeacherCacheError(
                f"processing_class differs from the tokenizer/processor {where} was built with (vocabulary, special "
                "tokens or settings); use the same one or rebuild the cache."
            )

    # -- reading
    def gather(self, rows, batch: dict, prefix: str = CACHED_PREFIX) -> dict[str, torch.Tensor]:
        """Cached outputs for `rows`, placed at the real positions of `batch` (zeros elsewhere), under `prefix`."""
        rows = [int(r) for r in rows]
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        located = [(self._shards[s], r - int(self._starts[s])) for s, r in zip(shard, rows, strict=True)]
        mask = batch.get("attention_mask")
        mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        main = batch.get("input_ids")
        seq_len = mask.shape[1] if mask is not None else (main.shape[1] if isinstance(main, torch.Tensor) else None)
        keeps = [self._keep(shard["length"][i], mask, b, seq_len, rows[b]) for b, (shard, i) in enumerate(located)]
        out = {}
        logits = self.logits
        if logits is not None:
            if logits["mode"] == "dense":
                trailing = (logits["num_classes"],)
                out["logits"] = self._place(located, "logits", trailing, keeps, logits["token_level"])
            elif logits["encoding"] == "float":
                k = logits["top_k"]
                out["topk_ids"] = self._place(located, "topk_ids", (k,), keeps, True, torch.long)
                out["topk_logprobs"] = self._place(located, "topk_logprobs", (k + 1,), keeps, True)
            else:
                k, width = logits["top_k"], logits["id_bytes"]
                ids = [unpack_ids(shard["topk_ids"](i), width).reshape(-1, k) for shard, i in located]
                out["topk_ids"] = self._put(ids, (k,), keeps, torch.long)
                codes, steps, rests = (
                    np.concatenate([shard[name](i) for shard, i in located])
                    for name in ("topk_codes", "topk_step", "topk_rest")
                )
                log_probs = decode_topk_logprobs(codes.reshape(-1, k), steps, rests)
                out["topk_logprobs"] = self._put(log_probs, (k + 1,), keeps, torch.float32, [len(v) for v in ids])
        hidden = self.meta["hidden"]
        if hidden is not None:
            for t in hidden["layers"]:
                positional = hidden["positional"][str(t)]
                shape = tuple(hidden["shapes"][str(t)])
                out[f"hidden_{t}"] = self._place(located, f"hidden_{t}", shape, keeps, positional)
        return {prefix + k: v for k, v in out.items()}

    def _keep(self, length: int, mask, b: int, seq_len, row: int):
        if length < 0:
            return None
        keep = mask[b] if mask is not None else torch.ones(seq_len or length, dtype=torch.bool)
        if int(keep.sum()) != length:
            raise TeacherCacheError(
                f"Cached row {row} has {length} positions, but the batch has {int(keep.sum())}: the data changed "
                f"since the cache was built ({self.path}). Rebuild it with `hfkd cache`."
            )
        return keep

    @classmethod
    def _place(cls, located, column: str, trailing: tuple, keeps, positional: bool, dtype=torch.float32):
        """Stacks rows; per-position arrays go to the kept positions of a zero `[batch, seq, *trailing]`."""
        shape = (-1, *trailing) if positional else trailing
        values = [shard[column](i).reshape(shape) for shard, i in located]
        if not positional:
            return torch.from_numpy(np.stack(values)).to(dtype)
        return cls._put(values, trailing, keeps, dtype)

    @staticmethod
    def _put(values, trailing: tuple, keeps, dtype, lengths=None) -> torch.Tensor:
        """Per-position rows (a list of `[positions, *trailing]` arrays, or their concatenation as a tensor with the
        rows' `lengths`) at the kept positions of a zero `[batch, seq, *trailing]` (stacked when rows have no mask)."""
        if isinstance(values, list):
            lengths = [len(v) for v in values]
            values = torch.from_numpy(np.concatenate(values))
        values = values.to(dtype)
        if keeps[0] is None:
            if len(set(lengths)) > 1:
                raise TeacherCacheError(f"Cached rows of {sorted(set(lengths))} positions cannot be stacked unpadded.")
            return values.reshape(len(lengths), -1, *trailing)
        # Rows hold their real positions in order, so one masked assignment places the whole batch (row-major).
        out = torch.zeros((len(lengths), keeps[0].shape[0], *trailing), dtype=dtype)
        out[torch.stack(keeps)] = values
        return out


def _open_shard(path: str, bfloat16_columns=()) -> dict:
    """Memory-maps one shard; each list column becomes a function row -> flat numpy view (no copy; columns stored as
    bfloat16 bits are converted to float32)."""
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.memory_map(path, "r")).read_all().combine_chunks()
    shard = {"length": table.column("length").to_numpy()}
    for name in table.column_names:
        if name in ("row", "length"):
            continue
        array = table.column(name).chunk(0)
        offsets = array.offsets.to_numpy()
        values = array.values.to_numpy(zero_copy_only=False)
        if name in bfloat16_columns:
            shard[name] = lambda i, v=values, o=offsets: bfloat16_to_float32(v[o[i] : o[i + 1]])
        else:
            shard[name] = lambda i, v=values, o=offsets: v[o[i] : o[i + 1]]
    return shard


class CachedTeacherCollator:
    """Wraps a collator: rows carrying `hfkd_row` get their cached teacher outputs added to the batch (each cache's
    under its prefix, see `cached_prefix`)."""

    def __init__(self, collator, caches: "TeacherCache | dict[str, TeacherCache]"):
        self.collator = collator
        # Set by hfkd.terms.runner.with_row_ids when a term keeps a memory per row (CRD): the batch also gets the
        # rows' indices under this key.
        self.row_ids_key: str | None = None
        if isinstance(caches, TeacherCache):
            self.caches = {CACHED_PREFIX: caches}
        else:
            self.caches = {cached_prefix(n if len(caches) > 1 else None): c for n, c in caches.items()}

    def __call__(self, features):
        rows = None
        if features and isinstance(features[0], dict) and ROW_COLUMN in features[0]:
            rows = [f[ROW_COLUMN] for f in features]
            features = [{k: v for k, v in f.items() if k != ROW_COLUMN} for f in features]
        batch = self.collator(features)
        if rows is not None:
            batch = dict(batch)
            for prefix, cache in self.caches.items():
                batch.update(cache.gather(rows, batch, prefix))
            if self.row_ids_key is not None:
                batch[self.row_ids_key] = torch.tensor([int(r) for r in rows], dtype=torch.long)
        return batch


class CachedTeacherOutput:
    """A batch's cached teacher outputs in the shape of a model output (`logits`, `hidden_states`).

    Top-k logits come as `topk = (ids, log_probs)` with `logits` None; hidden states the cache does not hold are
    None in the tuple.
    """

    def __init__(self, batch: dict, cache: TeacherCache, prefix: str = CACHED_PREFIX):
        self.logits = batch.get(prefix + "logits")
        ids = batch.get(prefix + "topk_ids")
        self.topk = (ids, batch[prefix + "topk_logprobs"]) if ids is not None else None
        self.num_classes = cache.logits["num_classes"] if cache.logits else None
        self.hidden_states = None
        hidden = cache.meta["hidden"]
        if hidden is not None:
            states = [None] * hidden["num_hidden_states"]
            for t in hidden["layers"]:
                states[t] = batch[f"{prefix}hidden_{t}"]
            self.hidden_states = tuple(states)


def has_cached_outputs(batch: dict) -> bool:
    return any(isinstance(k, str) and k.startswith(CACHED_PREFIX) for k in batch)


@dataclass
class CacheArguments:
    """What `hfkd cache` writes, next to the recipe's fields (teacher, data, terms)."""

    cache_dir: str = field(
        default=None,
        metadata={"help": "Folder to write the cache to; then run `hfkd distill --teacher_cache_dir` on it."},
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "Per position, keep the teacher's top_k classes and the rest of the probability mass as one bucket "
            "when its head has more classes (language models); 0 keeps all logits. Default: 48 with topk_encoding "
            "compact (148 bytes per token), 128 with float."
        },
    )
    topk_encoding: str = field(
        default="compact",
        metadata={
            "help": "How top-k logits are stored. 'compact': ids in the narrowest unsigned integer that holds the "
            "vocabulary (uint16 up to 65,536 classes, then 3 or 4 bytes), log-probabilities as uint8 steps below "
            "the position's top one (error <= step + 2**-11, step = their span / 255), the rest of the mass in "
            "float16: k * 3 + 4 bytes per token. 'float': format version 1's layout, int32 ids and cache_dtype "
            "log-probabilities (770 bytes per token at top_k 128 in float16). See hfkd/cache.py's docstring."
        },
    )
    cache_batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward while caching."})
    cache_dtype: str = field(
        default="float32",
        metadata={
            "help": "'float32' or 'float16' for the stored logits: full logits (top_k 0 or small heads) and top-k "
            "log-probabilities with topk_encoding float."
        },
    )
    cache_hidden_dtype: str = field(
        default=DEFAULT_HIDDEN_DTYPE,
        metadata={
            "help": "'bfloat16' (default), 'float16' or 'float32' for the stored hidden states. bfloat16 halves "
            "float32's size with its exponent range (no overflow; float16 overflows above 65,504); its effect on the "
            "hidden term is measured in benchmarks/README.md."
        },
    )
    max_shard_size: str = field(
        default=DEFAULT_SHARD_SIZE,
        metadata={
            "help": "Bytes of records per Arrow shard file, e.g. '256MB', '1GB', '512MiB' or a number of bytes. The "
            "shard being filled is held in memory: this bounds the build's memory beside the model and one batch."
        },
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Replace an existing cache in cache_dir (once the new one is complete)."}
    )

    def __post_init__(self):
        if not self.cache_dir:
            raise ValueError("cache_dir is required: the folder to write the teacher cache to.")
        if self.cache_batch_size < 1:
            raise ValueError(f"cache_batch_size must be >= 1, got {self.cache_batch_size}.")
        parse_size(self.max_shard_size, "max_shard_size")
        check_topk_options(self.top_k, self.topk_encoding)
        if self.cache_dtype not in _FLOAT_TYPES:
            raise ValueError(f"cache_dtype must be one of {list(_FLOAT_TYPES)}, got {self.cache_dtype!r}.")
        if self.cache_hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(
                f"cache_hidden_dtype must be one of {list(HIDDEN_DTYPES)}, got {self.cache_hidden_dtype!r}."
            )
