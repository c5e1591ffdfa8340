"""Fine-tune-and-distill recipes: fine-tune the teacher, distil it into a student, evaluate both, write the report.

`run_recipe(recipe_args, data_args, config)` is what `hfkd distill` runs; every stage is a plain transformers or
hfkd trainer, so a recipe is only a sequence of what a user could write by hand.
"""

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from . import data as hfkd_data
from .cache import build_teacher_cache
from .config import DistillationConfig
from .data import DataArguments
from .measure import compare_latency, count_parameters
from .metrics import load_metric
from .paths import resolve_path
from .report import model_card, plot_report, write_metrics
from .student import student_from_teacher
from .trainer import DistillationTrainer

logger = logging.getLogger(__name__)

_AUTO = {
    "text-classification": AutoModelForSequenceClassification,
    "image-classification": AutoModelForImageClassification,
    "causal-lm": AutoModelForCausalLM,
}
CONFIG_FILE = "hfkd_config.yaml"
WORK_DIRS = ("teacher", "checkpoints")  # kept locally, never pushed


@dataclass
class RecipeArguments:
    """The stages of a recipe: which task, how the teacher is made ready, how the student is built."""

    task: str = field(default="text-classification", metadata={"help": f"One of {', '.join(hfkd_data.TASKS)}."})
    teacher_config: str | None = field(
        default=None,
        metadata={
            "help": "Build the teacher from this config instead of loading weights: a JSON object with "
            '\'model_type\' and config fields, e.g. \'{"model_type": "vit", "hidden_size": 128}\'. Use with '
            "finetune_teacher to train it here."
        },
    )
    teacher_hub_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id recorded as the card's base_model; defaults to teacher_model_name_or_path when that is "
            "not a local path (set it when the teacher is a local copy of a Hub model)."
        },
    )
    finetune_teacher: bool = field(
        default=False, metadata={"help": "Fine-tune the teacher on the task before distilling (stage 1)."}
    )
    teacher_num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs of teacher fine-tuning."})
    teacher_max_steps: int = field(default=-1, metadata={"help": "Caps teacher fine-tuning steps (-1: epochs rule)."})
    teacher_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of teacher fine-tuning."})
    teacher_lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank for teacher fine-tuning through peft (0: full fine-tuning); merged before distillation."
        },
    )
    teacher_lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha for teacher fine-tuning."})
    teacher_lora_target_modules: str | None = field(
        default=None,
        metadata={"help": "Comma-separated module names LoRA adapts (default: peft's choice for the architecture)."},
    )
    student_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A ready student (Hub id or path); else one is built from the teacher."}
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Layers of the student built from the teacher's own layers (student_from_teacher)."},
    )
    student_layers: str | None = field(
        default=None, metadata={"help": "Explicit teacher layers to keep, comma-separated, e.g. '0,2,5'."}
    )
    image_processor_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "For image tasks whose teacher has no saved image processor: JSON arguments of a "
            "ViTImageProcessor (size, image_mean, image_std, do_resize, ...)."
        },
    )
    latency_batch_size: int = field(default=16, metadata={"help": "Batch size of the latency measurement."})
    latency_repeats: int = field(default=10, metadata={"help": "Rounds of the latency measurement (median kept)."})

    def __post_init__(self):
        if self.task not in hfkd_data.TASKS:
            raise ValueError(f"task={self.task!r} is not known; choose one of {list(hfkd_data.TASKS)}.")
        if self.student_model_name_or_path and (self.student_num_layers or self.student_layers):
            raise ValueError("Give either student_model_name_or_path or student_num_layers/student_layers, not both.")
        if not self.student_model_name_or_path and not self.student_num_layers and not self.student_layers:
            raise ValueError(
                "No student: set student_num_layers (a student built from the teacher's layers), student_layers, "
                "or student_model_name_or_path."
            )
        if self.teacher_lora_r < 0:
            raise ValueError(f"teacher_lora_r must be >= 0, got {self.teacher_lora_r}.")
        if self.teacher_lora_r and not self.finetune_teacher:
            raise ValueError("teacher_lora_r > 0 needs finetune_teacher=true: LoRA is how the teacher is fine-tuned.")
        if self.latency_batch_size < 1 or self.latency_repeats < 1:
            raise ValueError("latency_batch_size and latency_repeats must be >= 1.")


def _json_arg(value, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} must be a JSON object, got {value!r} ({err}).") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}.")
    return parsed


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuses, before any work, to write into a folder that holds another run (nothing is deleted)."""
    if not os.path.isdir(output_dir) or overwrite:
        return
    markers = [m for m in ("metrics.json", CONFIG_FILE, *WORK_DIRS) if os.path.exists(os.path.join(output_dir, m))]
    if markers:
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(markers)}). Choose another output_dir or pass "
            "--overwrite_output_dir true to write over it."
        )


class _Run:
    """One recipe run; each method is a stage."""

    def __init__(self, recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig):
        self.recipe, self.data_args, self.config = recipe, data_args, config
        self.out = config.output_dir
        self.times: dict[str, float] = {}
        self.teacher_path = resolve_path(config.teacher_model_name_or_path)
        init = dict(config.teacher_model_init_kwargs or {})
        self.teacher_kwargs = {k: resolve_path(v) if isinstance(v, str) else v for k, v in init.items()}

    # -- data and processors
    def load_data(self):
        self.train_raw, self.eval_raw = hfkd_data.load_splits(self.data_args, self.config.seed)
        task = self.recipe.task
        if task != "causal-lm":
            self.labels = self._teacher_label_order(
                hfkd_data.label_names(self.train_raw, self.eval_raw, self.data_args)
            )
        if task == "image-classification":
            self.processor = self._image_processor()
        else:
            if self.teacher_path is None:
                raise ValueError(f"task={task} needs teacher_model_name_or_path for its tokenizer.")
            self.processor = AutoTokenizer.from_pretrained(self.teacher_path, **self._gguf_kwargs())
            if self.processor.pad_token is None:
                self.processor.pad_token = self.processor.eos_token
        self.train_ds, self.eval_ds = (self._preprocess(d) for d in (self.train_raw, self.eval_raw))

    def _teacher_label_order(self, labels: list[str]) -> list[str]:
        """A teacher that is not fine-tuned here keeps its own label ids; the data must be encoded the same way."""
        if self.recipe.finetune_teacher or self.recipe.teacher_config or not self.teacher_path:
            return labels
        config = AutoConfig.from_pretrained(self.teacher_path, **self._gguf_kwargs())
        names = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else []
        if sorted(names) == sorted(labels):
            return names
        raise ValueError(
            f"The teacher {self.config.teacher_model_name_or_path!r} predicts {names} but the data's "
            f"{self.data_args.label_column!r} column holds {labels}. Give a teacher trained on these labels, or set "
            "finetune_teacher=true to fine-tune it (with a new head) first."
        )

    def _gguf_kwargs(self) -> dict:
        return {"gguf_file": self.teacher_kwargs["gguf_file"]} if "gguf_file" in self.teacher_kwargs else {}

    def _image_processor(self):
        if self.teacher_path and os.path.isfile(os.path.join(self.teacher_path, "preprocessor_config.json")):
            return AutoImageProcessor.from_pretrained(self.teacher_path)
        if self.teacher_path and not os.path.isdir(self.teacher_path) and not self.recipe.teacher_config:
            return AutoImageProcessor.from_pretrained(self.teacher_path)
        processor_cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)
        return processor_cls(**_json_arg(self.recipe.image_processor_kwargs, "image_processor_kwargs"))

    def _preprocess(self, dataset):
        task, args = self.recipe.task, self.data_args
        if task == "text-classification":
            return hfkd_data.preprocess_text_classification(dataset, self.processor, args, self.labels)
        if task == "image-classification":
            return hfkd_data.preprocess_image_classification(dataset, self.processor, args, self.labels)
        return hfkd_data.preprocess_causal_lm(dataset, self.processor, args)

    def collator(self):
        if self.recipe.task == "text-classification":
            return DataCollatorWithPadding(self.processor)
        if self.recipe.task == "causal-lm":
            return DataCollatorForLanguageModeling(self.processor, mlm=False)
        return default_data_collator

    # -- models
    def _label_kwargs(self) -> dict:
        if self.recipe.task == "causal-lm":
            return {}
        return {
            "num_labels": len(self.labels),
            "id2label": dict(enumerate(self.labels)),
            "label2id": {name: i for i, name in enumerate(self.labels)},
        }

    def load_teacher(self):
        auto = _AUTO[self.recipe.task]
        if self.recipe.teacher_config:
            spec = _json_arg(self.recipe.teacher_config, "teacher_config")
            model_type = spec.pop("model_type", None)
            if model_type is None:
                raise ValueError("teacher_config needs a 'model_type' key, e.g. 'vit' or 'convnext'.")
            config = AutoConfig.for_model(model_type, **spec, **self._label_kwargs())
            set_seed(self.config.seed)
            teacher = auto.from_config(config)
        elif self.teacher_path:
            kwargs = {**self.teacher_kwargs, **self._label_kwargs()}
            if self.recipe.finetune_teacher and self.recipe.task != "causal-lm":
                kwargs["ignore_mismatched_sizes"] = True  # a new head for these labels, trained in stage 1
            try:
                teacher = auto.from_pretrained(self.teacher_path, **kwargs)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"Could not load the teacher {self.config.teacher_model_name_or_path!r}: {err}\nCheck the id or "
                    "path and your network (HF_HUB_OFFLINE=1 allows only local or cached models)."
                ) from err
        else:
            raise ValueError("No teacher: set teacher_model_name_or_path or teacher_config.")
        # A GGUF checkpoint is dequantised on load into dense weights, but the model keeps its quantizer, which
        # makes Trainer refuse it and save_pretrained fail; the dense weights are all the recipe needs.
        quantizer = getattr(teacher, "hf_quantizer", None)
        if quantizer is not None and "gguf_file" in self.teacher_kwargs:
            quantizer.remove_quantization_config(teacher)
        if self.recipe.task == "causal-lm" and teacher.config.pad_token_id is None:
            teacher.config.pad_token_id = self.processor.pad_token_id
        self.teacher = teacher

    def _stage_args(self, output_dir: str, **overrides) -> TrainingArguments:
        """TrainingArguments for a non-distillation stage, sharing the run's batch sizes, seed and precision."""
        c = self.config
        keep = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "seed",
            "use_cpu",
            "bf16",
            "fp16",
            "logging_steps",
            "disable_tqdm",
            "dataloader_num_workers",
            "weight_decay",
            "warmup_steps",
            "train_sampling_strategy",
        )
        kwargs = {name: getattr(c, name) for name in keep}
        kwargs.update(report_to=[], save_strategy="no", output_dir=output_dir)
        kwargs.update(overrides)
        return TrainingArguments(**kwargs)

    def finetune_teacher(self):
        r = self.recipe
        teacher = self.teacher
        if r.teacher_lora_r:
            from peft import LoraConfig, TaskType, get_peft_model

            task_type = TaskType.CAUSAL_LM if r.task == "causal-lm" else TaskType.SEQ_CLS
            targets = r.teacher_lora_target_modules.split(",") if r.teacher_lora_target_modules else None
            lora = LoraConfig(
                task_type=task_type, r=r.teacher_lora_r, lora_alpha=r.teacher_lora_alpha, target_modules=targets
            )
            if r.task == "image-classification":
                lora.task_type = None
                lora.modules_to_save = ["classifier"]
            teacher = get_peft_model(teacher, lora)
        args = self._stage_args(
            os.path.join(self.out, "teacher", "_trainer"),
            num_train_epochs=r.teacher_num_train_epochs,
            max_steps=r.teacher_max_steps,
            learning_rate=r.teacher_learning_rate,
        )
        trainer = Trainer(
            model=teacher,
            args=args,
            train_dataset=self.train_ds,
            data_collator=self.collator(),
            processing_class=self.processor,
        )
        trainer.train()
        if r.teacher_lora_r:
            teacher = teacher.merge_and_unload()
        if self.config.process_index == 0:  # one writer under `accelerate launch`
            shutil.rmtree(args.output_dir, ignore_errors=True)
            teacher.save_pretrained(os.path.join(self.out, "teacher"))
            self.processor.save_pretrained(os.path.join(self.out, "teacher"))
        self.teacher = teacher
        self.teacher_finetune_log = trainer.state.log_history

    def build_student(self):
        r = self.recipe
        if r.student_model_name_or_path:
            path = resolve_path(r.student_model_name_or_path)
            self.student = _AUTO[r.task].from_pretrained(path, **self._label_kwargs())
            self.student_note = f"`{r.student_model_name_or_path}`"
            return
        layers = [int(x) for x in r.student_layers.split(",")] if r.student_layers else None
        self.student = student_from_teacher(
            self.teacher, num_layers=None if layers else r.student_num_layers, layers=layers
        )
        kept = layers or "evenly spread, first and last kept"
        self.student_note = (
            f"{type(self.student).__name__} built from the teacher's own embeddings, head and layers ({kept}); "
            f"{self._num_layers(self.student)} of the teacher's {self._num_layers(self.teacher)} layers"
        )

    @staticmethod
    def _num_layers(model) -> int | str:
        config = model.config
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(config, name, None), int):
                return getattr(config, name)
        depths = getattr(config, "depths", None)
        return sum(depths) if depths else "?"

    # -- distillation and evaluation
    def distill(self):
        c = self.config
        args = dataclasses.replace(
            c,
            output_dir=os.path.join(self.out, "checkpoints"),
            push_to_hub=False,  # the recipe pushes the finished folder itself
            teacher_model_name_or_path=None,
            teacher_model_init_kwargs=None,
            report_to=c.report_to,
        )
        trainer = DistillationTrainer(
            model=self.student,
            teacher_model=self.teacher,
            args=args,
            train_dataset=self.train_ds,
            eval_dataset=self.eval_ds,
            data_collator=self.collator(),
            processing_class=self.processor,
        )
        trainer.train()
        self.trainer = trainer
        self.log_history = trainer.state.log_history
        self.layer_maps = {
            kind: {stream: pairs for stream, pairs in (p or {}).items()}
            for kind, p in (("hidden", trainer._hidden_pairs), ("attention", trainer._attention_pairs))
            if p
        }

    def evaluate(self, model) -> float:
        args = self._stage_args(os.path.join(self.out, "checkpoints", "_eval"))
        trainer = Trainer(model=model, args=args, data_collator=self.collator(), processing_class=self.processor)
        if self.recipe.task == "causal-lm":
            loss = trainer.evaluate(self.eval_ds)["eval_loss"]
            return math.exp(min(loss, 50.0))
        prediction = trainer.predict(self.eval_ds)
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        metric = load_metric("accuracy")
        return metric.compute(predictions=np.argmax(logits, -1).tolist(), references=prediction.label_ids.tolist())[
            "accuracy"
        ]

    def latency_batch(self) -> dict:
        rows = [self.eval_ds[i] for i in range(min(self.recipe.latency_batch_size, len(self.eval_ds)))]
        return self.collator()(rows)


def run_cache(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig, cache_args) -> dict:
    """What `hfkd cache` runs: the recipe's data, teacher and student, then the teacher once over the training data.

    The teacher must be final: a recipe that fine-tunes it (finetune_teacher=true) is cached from the fine-tuned
    folder instead (`teacher_model_name_or_path: <output_dir>/teacher`, `finetune_teacher: false`).
    """
    if recipe.finetune_teacher:
        raise ValueError(
            "finetune_teacher=true: the cache must hold the fine-tuned teacher's outputs. Fine-tune it first (e.g. "
            "`hfkd distill` with this recipe), then cache with --teacher_model_name_or_path <output_dir>/teacher "
            "--finetune_teacher false."
        )
    set_seed(config.seed)
    run = _Run(recipe, data_args, config)
    run.load_data()
    run.load_teacher()
    if config.hidden_weight > 0:
        run.build_student()  # its depth resolves the hidden layer map
    cache = build_teacher_cache(
        run.teacher,
        run.train_ds,
        cache_args.cache_dir,
        args=config,
        student=getattr(run, "student", None),
        data_collator=run.collator(),
        processing_class=run.processor,
        top_k=cache_args.top_k,
        batch_size=cache_args.cache_batch_size,
        rows_per_shard=cache_args.rows_per_shard,
        dtype=cache_args.cache_dtype,
        overwrite=cache_args.overwrite_cache,
        progress=not config.disable_tqdm,
    )
    size = sum(os.path.getsize(os.path.join(cache.path, name)) for name in os.listdir(cache.path))
    return {
        "rows": len(cache),
        "bytes": size,
        "seconds": cache.meta["seconds"],
        "logits": cache.logits,
        "hidden_layers": cache.hidden_layers,
        "path": cache.path,
    }


def run_recipe(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> dict:
    """Runs every stage and writes the output folder; returns the metrics written to metrics.json."""
    check_output_dir(config.output_dir, config.overwrite_output_dir)
    start = time.perf_counter()
    set_seed(config.seed)
    run = _Run(recipe, data_args, config)

    tick = time.perf_counter()
    run.load_data()
    run.load_teacher()
    run.times["data"] = time.perf_counter() - tick
    if recipe.finetune_teacher:
        tick = time.perf_counter()
        run.finetune_teacher()
        run.times["teacher fine-tuning"] = time.perf_counter() - tick
    run.build_student()
    tick = time.perf_counter()
    run.distill()
    run.times["distillation"] = time.perf_counter() - tick

    tick = time.perf_counter()
    teacher_metric = run.evaluate(run.teacher)
    student_metric = run.evaluate(run.student)
    if config.process_index != 0:
        return {}  # under `accelerate launch` the main process measures and writes
    t_latency, s_latency = compare_latency(run.teacher, run.student, run.latency_batch(), recipe.latency_repeats)
    run.times["evaluation"] = time.perf_counter() - tick

    metrics = _metrics(run, teacher_metric, student_metric, t_latency, s_latency)
    metrics["wall_time_s"] = {**run.times, "total": time.perf_counter() - start}
    write_outputs(run, metrics)
    return metrics


def _metrics(run: _Run, teacher_metric, student_metric, t_latency, s_latency) -> dict:
    recipe, config, data_args = run.recipe, run.config, run.data_args
    lm = recipe.task == "causal-lm"
    metric = "perplexity" if lm else "accuracy"
    # Lower is better for perplexity: retained = teacher / student there, student / teacher otherwise.
    retained = teacher_metric / student_metric if lm else student_metric / max(teacher_metric, 1e-12)
    t_params, s_params = count_parameters(run.teacher), count_parameters(run.student)
    teacher_name = config.teacher_model_name_or_path or "built from teacher_config"
    hub_id = recipe.teacher_hub_id
    if hub_id is None and teacher_name and not teacher_name.startswith("pkg:") and not os.path.exists(teacher_name):
        hub_id = teacher_name if "/" in teacher_name or teacher_name.isidentifier() else None
    last = {}
    for entry in run.log_history:
        last.update(
            {k: v for k, v in entry.items() if k in ("task", "distill/logit", "distill/hidden", "distill/attention")}
        )
    weights = {
        "task": (config.task_weight, "cross-entropy on the labels"),
        "distill/logit": (config.logit_weight, config.logit_loss),
        "distill/hidden": (config.hidden_weight, config.hidden_loss),
        "distill/attention": (config.attention_weight, config.attention_loss),
    }
    dataset_hub = data_args.dataset_name if data_args.data_files is None else None
    return {
        "task": recipe.task,
        "metric": metric,
        "teacher": {
            "name": teacher_name,
            "hub_id": hub_id,
            "note": "fine-tuned on the task here first"
            + (f" with LoRA r={recipe.teacher_lora_r}, merged" if recipe.teacher_lora_r else "")
            if recipe.finetune_teacher
            else "",
            "params": t_params,
            "metric": teacher_metric,
            "latency_ms": t_latency,
        },
        "student": {"note": run.student_note, "params": s_params, "metric": student_metric, "latency_ms": s_latency},
        "retained": retained,
        "size_ratio": s_params / t_params,
        "speedup": t_latency / s_latency,
        "latency_batch_size": min(recipe.latency_batch_size, len(run.eval_ds)),
        "device": f"{config.device.type}, {torch.get_num_threads()} threads",
        "data": {
            "hub_id": dataset_hub,
            "note": (
                f"`{data_args.dataset_name}`"
                + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
                + (f" from {data_args.data_files}" if data_args.data_files else "")
                + f"; {len(run.train_ds)} training and {len(run.eval_ds)} held-out examples"
                + (
                    ""
                    if data_args.eval_split
                    else f" (held-out {data_args.eval_fraction:.0%} carved from train, seed {config.seed})"
                )
            ),
            "train_examples": len(run.train_ds),
            "eval_examples": len(run.eval_ds),
        },
        "distillation": {
            "temperature": config.temperature,
            "terms": {
                name: {"weight": w, "loss": loss, **({"last_logged": last[name]} if name in last else {})}
                for name, (w, loss) in weights.items()
                if w > 0
            },
            "layer_maps": run.layer_maps,
            "steps": run.trainer.state.global_step,
        },
    }


def write_outputs(run: _Run, metrics: dict) -> None:
    """The student with its processor, metrics.json, report.png, the exact config and the model card."""
    out = run.out
    run.student.save_pretrained(out)
    run.processor.save_pretrained(out)
    write_metrics(os.path.join(out, "metrics.json"), metrics)
    with open(os.path.join(out, "training_log.json"), "w") as handle:
        json.dump(run.log_history, handle, indent=1)
    plot_report(os.path.join(out, "report.png"), metrics, run.log_history)
    save_config(os.path.join(out, CONFIG_FILE), run.recipe, run.data_args, run.config)
    repo_id = run.config.hub_model_id or os.path.basename(os.path.normpath(out))
    auto_class = _AUTO[run.recipe.task].__name__
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
    """The flat key/value configuration of this run, loadable again with `hfkd distill --config`."""
    import yaml

    values = {}
    for obj in (recipe, data_args):
        values.update({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
    # to_dict() gives plain values (enums as strings); only what differs from the defaults is kept, so the file
    # reads like a recipe, and secrets never go in.
    defaults = DistillationConfig(output_dir=config.output_dir, report_to=[]).to_dict()
    for name, value in config.to_dict().items():
        if name.startswith("_") or "token" in name or defaults.get(name) == value:
            continue
        values[name] = value
    values["output_dir"] = config.output_dir
    with open(path, "w") as handle:
        yaml.safe_dump(values, handle, sort_keys=False)
