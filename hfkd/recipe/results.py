"""What a recipe run leaves in its output folder: the student, metrics.json (one function per section), the per-row
scores of the paired comparison, the training log, report.png, the exact config and the model card; and the push
of the finished folder to the Hub."""

import json
import os

import torch

from ..cache import TeacherCache
from ..compare import paired_accuracy, paired_blocks
from ..config import DistillationConfig
from ..data import DataArguments
from ..measure import count_parameters
from ..peers import peer_folder, save_peer
from ..report import model_card, plot_report, write_metrics
from ..run_folder import CONFIG_FILE, WORK_DIRS, run_values, write_config
from ..terms import TERMS
from .arguments import RecipeArguments
from .data import data_note
from .evaluation import Scores, text_fields
from .models import student_auto_class, teacher_lineage
from .stages import distill_config
from .state import RunState

# Beside metrics.json with compare_without_distillation: both students' per-row scores on the same held-out rows.
EVAL_ROWS_FILE = "eval_rows.json"


def metric_name(state: RunState) -> str:
    """The metric metrics.json reports. Across tokenizers perplexities are per different tokens: bits per byte of
    the same text ranks the models."""
    if state.recipe.task == "causal-lm":
        return "bits_per_byte" if state.data.across else "perplexity"
    return "accuracy"


def build_metrics(state: RunState, scores: Scores, latency: tuple[float, float]) -> dict:
    """metrics.json without its wall times, section by section."""
    lm = state.recipe.task == "causal-lm"
    teacher_metric, student_metric = scores.teacher_metric, scores.student_metric
    # Lower is better for perplexity and bits per byte: retained = teacher / student there, student / teacher
    # otherwise.
    retained = teacher_metric / student_metric if lm else student_metric / max(teacher_metric, 1e-12)
    t_params, s_params = count_parameters(state.teacher), count_parameters(state.student)
    t_latency, s_latency = latency
    return {
        "task": state.recipe.task,
        "metric": metric_name(state),
        "teacher": {
            **_teacher_lineage(state),
            "params": t_params,
            "metric": teacher_metric,
            "latency_ms": t_latency,
            **text_fields(scores.teacher_text),
        },
        "student": _student_section(state, scores, s_params, s_latency),
        **({"text_eval": _text_eval_note(state)} if lm else {}),
        **_comparison_section(state, scores),
        **({"generations": state.generations} if state.generations else {}),
        **({"search": state.search} if state.search is not None else {}),
        **({"peers": _peer_section(state, scores)} if state.peers else {}),
        "retained": retained,
        "size_ratio": s_params / t_params,
        "speedup": t_latency / s_latency,
        "latency_batch_size": min(state.recipe.latency_batch_size, len(state.data.student_eval_ds)),
        "device": f"{state.config.device.type}, {torch.get_num_threads()} threads",
        "data": _data_section(state),
        "training": _training_section(state),
        "distillation": _distillation_section(state),
    }


def _teacher_lineage(state: RunState) -> dict:
    """Where the teacher came from, its fine-tuning here and the cache of its outputs."""
    config = state.config
    teacher = teacher_lineage(state.recipe, config, state.source)
    # The search changes weights, never which terms run: the configuration as given says who reads a teacher.
    if state.peers or not config.reads_teacher:
        # Deep mutual learning (the student learnt from its peers) or self-distillation: the teacher is compared.
        teacher["taught"] = False
    if state.teacher_finetune is not None:
        teacher["finetune"] = state.teacher_finetune
        teacher["data"] = data_note(state.data, state.recipe, state.data_args, config)
        teacher["finetuned_here"] = True
    if config.teacher_cache_dir:
        cache = TeacherCache(config.teacher_cache_dir)
        teacher["cache"] = {
            "path": config.teacher_cache_dir,
            "rows": len(cache),
            "logits": cache.logits,
            "hidden_layers": cache.hidden_layers,
        }
    return teacher


def _student_section(state: RunState, scores: Scores, params: int, latency_ms: float) -> dict:
    data = state.data
    return {
        "note": state.student_note,
        "params": params,
        "metric": scores.student_metric,
        "latency_ms": latency_ms,
        "built_from_teacher": not (state.recipe.student_model_name_or_path or state.recipe.student_config),
        **(
            {"random_init": True, "config": state.student.config.to_diff_dict()} if state.recipe.student_config else {}
        ),
        **text_fields(scores.student_text),
        **(
            {"own_tokenizer": {"vocab": len(data.student_processor), "teacher_vocab": len(data.processor)}}
            if data.across
            else {}
        ),
        **(
            {"modality": state.recipe.student_modality, "processor": type(data.student_processor).__name__}
            if data.cross_modal
            else {}
        ),
    }


def _text_eval_note(state: RunState) -> dict:
    """How the causal LMs' bits per byte were measured."""
    return {
        "texts": len(state.data.lm_texts),
        "max_length": state.data_args.max_length,
        "note": (
            "every model on the same held-out text, cut at whitespace into pieces of at most max_length tokens of "
            "each tokenizer; bits per byte = the summed negative log2-likelihood of the predicted tokens over the "
            "UTF-8 bytes they spell (a piece's first token is not predicted, so each model's byte count differs "
            "slightly); own_token_perplexity is per the model's own tokens and does not compare across tokenizers"
        ),
    }


def _comparison_section(state: RunState, scores: Scores) -> dict:
    """The labels-only comparison (compare_without_distillation): labels_only, gain and paired ({} without it)."""
    if state.labels_only is None:
        return {}
    plain, student_metric = state.labels_only["metric"], scores.student_metric
    return {
        "labels_only": {
            **state.labels_only,
            "note": (
                "the same student, steps, learning rate and batches, on the labelled rows alone (distillation's "
                f"{state.data.transfer_rows} transfer rows have no label; its data loops over the labelled rows)"
                if state.data.transfer_rows
                else "the same student, data, steps, learning rate and batches, on the labels alone"
            ),
        },
        # Positive when distillation helped: accuracy points gained, or perplexity (bits per byte) lowered.
        "gain": (plain - student_metric) if state.recipe.task == "causal-lm" else (student_metric - plain),
        # The same rows scored for both students: the verdict follows this paired interval of the gain.
        "paired": paired_comparison(metric_name(state), scores.student_rows, state.labels_only_rows),
    }


def _peer_section(state: RunState, scores: Scores) -> dict:
    """Each peer of deep mutual learning: where it came from, its metric on the held-out split, its size, where saved."""
    return {
        name: {
            "source": state.peer_sources[name],
            "metric": scores.peer_metrics[name],
            "params": count_parameters(peer),
            "folder": os.path.relpath(peer_folder(state.out, name), state.out),
        }
        for name, peer in state.peers.items()
    }


def _data_section(state: RunState) -> dict:
    data_args = state.data_args
    return {
        "hub_id": data_args.dataset_name if data_args.data_files is None else None,
        "note": data_note(state.data, state.recipe, data_args, state.config),
        "train_examples": len(state.data.distill_train_ds),
        # Distillation's training rows: those with a label, and the transfer rows (distillation terms alone).
        "labelled_examples": len(state.data.distill_train_ds) - state.data.transfer_rows,
        "transfer_examples": state.data.transfer_rows,
        "eval_examples": len(state.data.student_eval_ds),
    }


def _training_section(state: RunState) -> dict:
    """How distillation trained: steps, schedule, batches, precision, evaluations and the best checkpoint."""
    trainer_state, args = state.distillation.state, state.distillation.args
    evals = [e for e in state.distillation.log_history if any(k.startswith("eval_") for k in e)]
    best = args.load_best_model_at_end
    return {
        "steps": trainer_state.global_step,
        "epochs": round(trainer_state.epoch or 0.0, 4),
        "learning_rate": args.learning_rate,
        "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
        "per_device_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": max(args.world_size, 1),
        "batch_size": args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1),
        "seed": args.seed,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "evaluations": len(evals),
        "best_checkpoint": trainer_state.best_model_checkpoint if best else None,
        "best_metric": trainer_state.best_metric if best else None,
        "best_by": args.metric_for_best_model if best else None,
        "resumed": bool(state.resume),
    }


def _distillation_section(state: RunState) -> dict:
    """The temperature, each term with a weight (its loss and last logged value) and the layer maps: the values the
    distillation ran with (the search's chosen ones after a search)."""
    config = distill_config(state)
    last = {}
    for entry in state.distillation.log_history:
        last.update({k: v for k, v in entry.items() if k == "task" or k.startswith("distill/")})
    weights = {"task": (config.task_weight, "cross-entropy on the labels")}
    for spec in config.term_specs:
        if TERMS[spec.name].short_form:  # a built-in term: its loss says what it is (its fields are in the card)
            weights[f"distill/{spec.name}"] = (spec.weight, spec.options["loss"])
            continue
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        weights[f"distill/{spec.name}"] = (spec.weight, spec.name + (f" ({options})" if options else ""))
    return {
        "temperature": config.temperature,
        "terms": {
            name: {"weight": w, "loss": loss, **({"last_logged": last[name]} if name in last else {})}
            for name, (w, loss) in weights.items()
            if w > 0
        },
        "layer_maps": state.distillation.layer_maps,
        "steps": state.distillation.state.global_step,
    }


def paired_comparison(metric: str, ours: dict, theirs: dict) -> dict:
    """The distilled student against the labels-only one on the same held-out rows (hfkd.compare): McNemar's exact
    test and a paired bootstrap interval of the accuracy gain, or a paired bootstrap over blocks (text pieces) of the
    perplexity (bits per byte) gain."""
    if metric == "accuracy":
        return paired_accuracy(ours["correct"], theirs["correct"])
    # A piece that no token of a model predicts counts for neither model (both students share one tokenizer, so
    # such pieces are the same for both).
    keep = [i for i, (a, b) in enumerate(zip(ours["count"], theirs["count"], strict=True)) if a > 0 and b > 0]
    return paired_blocks(
        *([side[key][i] for i in keep] for side in (ours, theirs) for key in ("loss", "count")), metric=metric
    )


def write_outputs(state: RunState, scores: Scores, metrics: dict) -> None:
    """The student with its processor, each peer in peers/<name>/ with it, metrics.json, report.png, the exact config
    and the model card."""
    out, data = state.out, state.data
    log_history = state.distillation.log_history
    state.student.save_pretrained(out)
    data.student_processor.save_pretrained(out)  # the student's own tokenizer when it has one, never the teacher's
    for name, peer in state.peers.items():
        save_peer(peer, peer_folder(out, name), data.processor)
    write_metrics(os.path.join(out, "metrics.json"), metrics)
    if "paired" in metrics:  # the per-row scores behind the paired comparison, to check or recombine it
        rows = {"metric": metrics["metric"], "student": scores.student_rows, "labels_only": state.labels_only_rows}
        write_metrics(os.path.join(out, EVAL_ROWS_FILE), rows)
    with open(os.path.join(out, "training_log.json"), "w") as handle:
        json.dump(log_history, handle, indent=1)
    plot_report(os.path.join(out, "report.png"), metrics, log_history)
    save_config(os.path.join(out, CONFIG_FILE), state.recipe, state.data_args, state.config)
    repo_id = state.config.hub_model_id or os.path.basename(os.path.normpath(out))
    auto_class = student_auto_class(state.recipe).__name__
    model_card(metrics, repo_id, auto_class).save(os.path.join(out, "README.md"))


def push_folder(output_dir: str, repo_id: str, token: str | None = None, private: bool | None = None) -> str:
    """Pushes the finished folder (not the teacher or checkpoints) to the Hub; returns the repo URL."""
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, token=token, private=private, exist_ok=True)
    upload_folder(
        repo_id=url.repo_id,
        folder_path=output_dir,
        token=token,
        ignore_patterns=[f"{d}/*" for d in WORK_DIRS],
        commit_message="Distilled with hfkd",
    )
    return str(url)


def save_config(path: str, recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> None:
    """Every field of this run, loadable again with `hfkd distill --config` (which then starts it anew)."""
    write_config(path, run_values(recipe, data_args, config))
