"""What `hfkd distill` and `hfkd cache` run: the checks, then the stages in order over one `RunState`.

`run_recipe(recipe_args, data_args, config)` is what `hfkd distill` runs; every stage is a plain transformers or
hfkd trainer, so a recipe is only a sequence of what a user could write by hand.
"""

import os
import time

from transformers import set_seed

from ..cache import build_teacher_cache
from ..config import DistillationConfig
from ..data import DataArguments
from ..run_folder import CONFIG_FILE, check_output_dir, cleaned_on_failure, resume_target, run_values, write_config
from .arguments import RecipeArguments
from .data import collator, load_data
from .evaluation import early_exits, evaluate_models, latency
from .models import (
    TeacherLocation,
    check_student_processor,
    load_peers,
    load_teacher,
    make_student,
    student_model_config,
)
from .preflight import (
    check_cache_run,
    check_cache_settings,
    check_cache_tokenizer,
    check_run_settings,
    check_search_data,
    check_student_plan,
    check_transfer_settings,
)
from .results import build_metrics, write_outputs
from .stages import (
    born_again,
    build_student,
    distill,
    finetune_teacher,
    heading,
    reuse_finished_teacher,
    search,
    train_labels_only,
)
from .state import RunState


def run_recipe(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> dict:
    """Runs every stage and writes the output folder; returns the metrics written to metrics.json.

    Everything that can be checked without training is checked first; a run that fails leaves no folder behind
    unless it holds finished stages, which `resume_from_checkpoint=true` then reuses.
    """
    resume = resume_target(config)
    values = run_values(recipe, data_args, config)
    check_output_dir(config.output_dir, config.overwrite_output_dir, resume, values)
    check_run_settings(recipe, config)
    check_transfer_settings(recipe, data_args)
    check_cache_settings(recipe, config)
    main_process = config.process_index == 0
    with cleaned_on_failure(config.output_dir, main_process):
        if main_process:
            os.makedirs(config.output_dir, exist_ok=True)
            write_config(os.path.join(config.output_dir, CONFIG_FILE), values)
        return run_stages(recipe, data_args, config)


def prepare(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> RunState:
    """The data, the teacher and the peers, with every check that needs them, before any stage trains."""
    source = TeacherLocation.from_config(config)
    data = load_data(recipe, data_args, config, source)
    check_search_data(recipe, len(data.distill_train_ds), data.transfer_rows)
    teacher = load_teacher(recipe, config, source, data)
    # A student built from student_config: its config checked now (vocab_size, layer maps), before stage 1.
    student_config = student_model_config(recipe, config, data, teacher) if recipe.student_config else None
    check_student_plan(recipe, config, teacher, student_config)
    check_student_processor(recipe, data, student_config)  # a student of another modality: its features fit it
    peers, peer_sources = load_peers(recipe, config, data)  # before the teacher is fine-tuned: fails now
    return RunState(
        recipe=recipe,
        data_args=data_args,
        config=config,
        source=source,
        resume=resume_target(config),
        data=data,
        teacher=teacher,
        peers=peers,
        peer_sources=peer_sources,
    )


def _timed(state: RunState, name: str, stage) -> None:
    """Runs `stage(state)`, its wall time kept under `name` (metrics.json's wall_time_s)."""
    tick = time.perf_counter()
    stage(state)
    state.times[name] = time.perf_counter() - tick


def run_stages(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> dict:
    """The stages in order over one RunState, then evaluation and the output folder (written by the main process;
    other processes return {})."""
    start = time.perf_counter()
    set_seed(config.seed)
    tick = time.perf_counter()
    state = prepare(recipe, data_args, config)
    state.times["data"] = time.perf_counter() - tick
    if recipe.finetune_teacher:
        if reuse_finished_teacher(state):
            heading(config, "stage 1/2: teacher fine-tuning, already done in this run (teacher/): skipped")
        else:
            _timed(state, "teacher fine-tuning", finetune_teacher)
    build_student(state)
    if recipe.search_trials:
        _timed(state, "search", search)
    _timed(state, "distillation", distill)
    if recipe.generations > 1:
        _timed(state, "born-again generations", born_again)
    if recipe.compare_without_distillation:
        _timed(state, "labels-only comparison", train_labels_only)

    tick = time.perf_counter()
    models = "teacher, student and peers" if state.peers else "teacher and student"
    heading(config, f"evaluation of {models} on {len(state.data.student_eval_ds)} held-out examples, latency")
    scores = evaluate_models(state)
    if config.process_index != 0:
        return {}  # under `accelerate launch` the main process measures and writes
    latencies = latency(state)
    exits = early_exits(state) if state.early_exit else None
    state.times["evaluation"] = time.perf_counter() - tick

    metrics = build_metrics(state, scores, latencies)
    if exits is not None:
        metrics["early_exit"] = exits
    metrics["wall_time_s"] = {**state.times, "total": time.perf_counter() - start}
    write_outputs(state, scores, metrics)
    return metrics


def run_cache(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig, cache_args) -> dict:
    """What `hfkd cache` runs: the recipe's data, teacher and student, then the teacher once over the training data.

    The teacher must be final: a recipe that fine-tunes it (finetune_teacher=true) is cached from the fine-tuned
    folder instead (`teacher_model_name_or_path: <output_dir>/teacher`, `finetune_teacher: false`).
    """
    check_cache_run(recipe, config)
    check_transfer_settings(recipe, data_args)
    set_seed(config.seed)
    source = TeacherLocation.from_config(config)
    data = load_data(recipe, data_args, config, source)
    check_cache_tokenizer(recipe, data.across)
    teacher = load_teacher(recipe, config, source, data)
    # On this process's device (its GPU under a launcher; the CPU with use_cpu=True or none): `accelerate launch -m
    # hfkd cache` splits the rows over the processes (hfkd.cache_parts).
    # A teacher dispatched over devices (device_map) or quantized stays where its loader put it.
    if getattr(teacher, "hf_device_map", None) is None and not getattr(teacher, "is_quantized", False):
        teacher.to(config.device)
    # A student only when hidden states are cached: its depth resolves the hidden layer map.
    student = make_student(recipe, config, data, teacher)[0] if config.hidden_weight > 0 else None
    cache = build_teacher_cache(
        teacher,
        data.distill_train_ds,  # what distillation reads: transfer rows too
        cache_args.cache_dir,
        args=config,
        student=student,
        data_collator=collator(data, recipe.task, data_args, "teacher"),
        processing_class=data.processor,
        top_k=cache_args.top_k,
        topk_encoding=cache_args.topk_encoding,
        batch_size=cache_args.cache_batch_size,
        max_shard_size=cache_args.max_shard_size,
        dtype=cache_args.cache_dtype,
        hidden_dtype=cache_args.cache_hidden_dtype,
        overwrite=cache_args.overwrite_cache,
        progress=not config.disable_tqdm,
    )
    size = sum(os.path.getsize(os.path.join(cache.path, name)) for name in os.listdir(cache.path))
    return {
        "rows": len(cache),
        "transfer_rows": data.transfer_rows,
        "bytes": size,
        "seconds": cache.meta["seconds"],
        "logits": cache.logits,
        "hidden_layers": cache.hidden_layers,
        "path": cache.path,
    }
