"""The recipe's own arguments (`RecipeArguments`: its stages, task and student) and how they read."""

import json
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .. import data as hfkd_data
from ..config import DistillationConfig

# What a student may read besides what its teacher reads (cross-modal distillation, hfkd.cross_modal).
STUDENT_MODALITIES = ("audio",)


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
    teacher_num_train_epochs: float = field(
        default=1.0,
        metadata={"help": "Epochs of teacher fine-tuning (num_train_epochs applies to distillation only)."},
    )
    teacher_max_steps: int = field(
        default=-1,
        metadata={
            "help": "Caps teacher fine-tuning steps (-1: teacher_num_train_epochs rules). --max_steps does not bound "
            "this stage: it caps distillation only."
        },
    )
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
        default=None,
        metadata={
            "help": "A ready student (Hub id or path); else one is built from the teacher. A student whose tokenizer "
            "(saved beside it) differs from the teacher's is trained and evaluated with its own, saved with it, and "
            "distilled on text tokenized for both (hfkd.two_tokenizers): span_kd or uld for causal LMs, whose text is "
            "then cut into pieces instead of packed blocks and compared in bits per byte."
        },
    )
    student_num_layers: int | None = field(
        default=None,
        metadata={"help": "Layers of the student built from the teacher's own layers (student_from_teacher)."},
    )
    student_layers: str | None = field(
        default=None, metadata={"help": "Explicit teacher layers to keep, comma-separated, e.g. '0,2,5'."}
    )
    student_config: str | None = field(
        default=None,
        metadata={
            "help": "Build the student from this config with random initial weights (seeded by seed) instead of from "
            "the teacher's layers: a JSON object with 'model_type' and config fields, e.g. '{\"model_type\": "
            '"bert", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": '
            "1024}'. It reads the teacher's tokenizer: vocab_size defaults to its length, pad_token_id to its pad "
            "token, max_position_embeddings to the teacher's; the labels come from the data; image tasks take num_channels and "
            "image_size from the image processor. Not with student_model_name_or_path, student_num_layers or "
            "student_layers."
        },
    )
    student_modality: str | None = field(
        default=None,
        metadata={
            "help": "Cross-modal distillation (hfkd.cross_modal): the student reads another modality of the same rows "
            "than the teacher. 'audio': with task=text-classification the teacher reads text_column through its "
            "tokenizer, the student audio_column (arrays at audio_sampling_rate) through student_processor, and it is "
            "an audio classifier (AutoModelForAudioClassification) over the same labels; rows without a label are "
            "transfer rows. None: the student reads what the teacher reads.",
            "choices": list(STUDENT_MODALITIES),
        },
    )
    student_processor: str | None = field(
        default=None,
        metadata={
            "help": "The student's own processor when it reads another modality (student_modality): a folder or Hub "
            "id holding one (preprocessor_config.json), or a JSON object of a feature extractor's arguments with its "
            'class in \'feature_extractor_type\', e.g. \'{"feature_extractor_type": "WhisperFeatureExtractor", '
            '"feature_size": 80, "chunk_length": 8}\'. Default: the one saved beside '
            "student_model_name_or_path. Saved with the student."
        },
    )
    image_processor_kwargs: str | None = field(
        default=None,
        metadata={
            "help": "For image tasks whose teacher has no saved image processor: JSON arguments of a "
            "ViTImageProcessor (size, image_mean, image_std, do_resize, ...)."
        },
    )
    compare_without_distillation: bool = field(
        default=False,
        metadata={
            "help": "Also train the same student (same initial weights, data, steps, learning rate and batches) on "
            "the labels alone, and report it beside the distilled one: did distillation help? A paired test on "
            "the same held-out rows decides (hfkd.compare; both students' per-row scores in eval_rows.json). "
            "Doubles the distillation stage's time."
        },
    )
    generations: int = field(
        default=1,
        metadata={
            "help": "Born-again networks (Furlanello et al., ICML 2018): after the student learns from the teacher "
            "(generation 1), train this many generations in all, each a student from the same initial weights taught "
            "by the generation before it, with the same terms and budget. The last generation is saved; each "
            "generation's metric goes to metrics.json, the card and report.png. Later generations run their "
            "teacher online and are not checkpointed."
        },
    )
    early_stopping_patience: int = field(
        default=0,
        metadata={
            "help": "Stop distillation after this many evaluations without improvement of metric_for_best_model "
            "(0: off). Needs eval_strategy, load_best_model_at_end=true and metric_for_best_model (e.g. accuracy)."
        },
    )
    early_stopping_threshold: float = field(
        default=0.0, metadata={"help": "Smallest change of metric_for_best_model that counts as an improvement."}
    )
    search_trials: int = field(
        default=0,
        metadata={
            "help": "Search the temperature and the term weights first (hfkd.search.kd_space, Optuna: pip install "
            "hfkd[search]): this many trials, each distilling a new student on the training rows less a validation "
            "part (search_validation_fraction, carved with the seed) and scored on that part, never on the "
            "held-out split the final figures come from: accuracy, or the student's own loss for causal LMs. The "
            "distillation then runs with the best trial's values on all training rows; each trial's values and "
            "score go to metrics.json and the card. Trials run the teacher online (not the teacher cache), "
            "evaluate the student alone and save no checkpoints. 0: no search."
        },
    )
    search_validation_fraction: float = field(
        default=0.1,
        metadata={"help": "search_trials > 0: the share of the training rows the trials are scored on, in (0, 1)."},
    )
    search_max_steps: int = field(
        default=-1,
        metadata={
            "help": "search_trials > 0: optimizer steps of each trial (-1: the distillation's own budget, max_steps "
            "or num_train_epochs, over the trials' smaller training part)."
        },
    )
    latency_batch_size: int = field(default=16, metadata={"help": "Batch size of the latency measurement."})
    latency_repeats: int = field(default=10, metadata={"help": "Rounds of the latency measurement (median kept)."})

    def __post_init__(self):
        if self.task not in hfkd_data.TASKS:
            raise ValueError(f"task={self.task!r} is not known; choose one of {list(hfkd_data.TASKS)}.")
        if self.student_config:
            others = [
                name
                for name in ("student_model_name_or_path", "student_num_layers", "student_layers")
                if getattr(self, name)
            ]
            if others:
                raise ValueError(
                    f"student_config builds a new student with random weights, but {' and '.join(others)} "
                    f"{'is' if len(others) == 1 else 'are'} also set; keep student_config, or unset it."
                )
            spec = json_arg(self.student_config, "student_config")  # a malformed config fails before any loading
            if "model_type" not in spec:
                raise ValueError(
                    'student_config needs a \'model_type\' key, e.g. \'{"model_type": "bert", "hidden_size": 256}\'.'
                )
        self._check_modality()
        if self.student_model_name_or_path and (self.student_num_layers or self.student_layers):
            raise ValueError("Give either student_model_name_or_path or student_num_layers/student_layers, not both.")
        if not (
            self.student_config or self.student_model_name_or_path or self.student_num_layers or self.student_layers
        ):
            raise ValueError(
                "No student: set student_num_layers (a student built from the teacher's layers), student_layers, "
                "student_model_name_or_path, or student_config (a new student with random weights)."
            )
        if self.teacher_lora_r < 0:
            raise ValueError(f"teacher_lora_r must be >= 0, got {self.teacher_lora_r}.")
        if self.teacher_lora_r and not self.finetune_teacher:
            raise ValueError("teacher_lora_r > 0 needs finetune_teacher=true: LoRA is how the teacher is fine-tuned.")
        if self.latency_batch_size < 1 or self.latency_repeats < 1:
            raise ValueError("latency_batch_size and latency_repeats must be >= 1.")
        if isinstance(self.generations, bool) or not isinstance(self.generations, int) or self.generations < 1:
            raise ValueError(
                f"generations must be an integer >= 1 (1: no born-again generations), got {self.generations!r}."
            )
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0 (0: off), got {self.early_stopping_patience}.")
        self._check_search()
        if self.student_layers is not None:
            self.layer_list()  # a typo fails here, before any model is loaded

    def _check_modality(self) -> None:
        if self.student_modality is None:
            if self.student_processor is not None:
                raise ValueError(
                    "student_processor is the processor of a student that reads another modality than its teacher; "
                    "set student_modality (e.g. audio), or unset student_processor."
                )
            return
        if self.student_modality not in STUDENT_MODALITIES:
            raise ValueError(
                f"student_modality={self.student_modality!r} is not offered; choose one of {list(STUDENT_MODALITIES)} "
                "(or None: the student reads what the teacher reads)."
            )
        if self.task != "text-classification":
            raise ValueError(
                f"student_modality={self.student_modality!r} with task={self.task}: recipes offer a text teacher "
                "teaching an audio student (task=text-classification); for other pairs use CrossModalCollator with "
                "DistillationTrainer in Python."
            )
        built = [name for name in ("student_num_layers", "student_layers") if getattr(self, name)]
        if built:
            raise ValueError(
                f"student_modality={self.student_modality!r} with {' and '.join(built)}: a student built from the "
                "teacher's layers reads the teacher's modality; give student_config (an audio classifier from a "
                "config) or student_model_name_or_path."
            )
        if self.student_processor is None and not self.student_model_name_or_path:
            raise ValueError(
                f"student_modality={self.student_modality!r}: give student_processor, the student's feature "
                'extractor (a folder, or a JSON object of its arguments), e.g. \'{"feature_extractor_type": '
                '"WhisperFeatureExtractor", "feature_size": 80, "chunk_length": 8}\'.'
            )
        if self.student_processor is not None and self.student_processor.lstrip().startswith("{"):
            spec = json_arg(self.student_processor, "student_processor")
            if "feature_extractor_type" not in spec:
                raise ValueError(
                    "student_processor needs a 'feature_extractor_type' key naming the class, e.g. "
                    '\'{"feature_extractor_type": "WhisperFeatureExtractor", "chunk_length": 8}\'.'
                )

    def _check_search(self) -> None:
        trials, fraction = self.search_trials, self.search_validation_fraction
        if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
            raise ValueError(f"search_trials must be an integer >= 0 (0: no search), got {trials!r}.")
        if trials and not (isinstance(fraction, (int, float)) and 0.0 < fraction < 1.0):
            raise ValueError(
                f"search_validation_fraction={fraction!r}: the search scores its trials on this share of the training "
                "rows, which must lie in (0, 1), e.g. 0.1. The held-out split the final figures come from is never "
                "used to select; set search_trials=0 to distil without a search."
            )
        steps = self.search_max_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps == 0 or steps < -1:
            raise ValueError(
                f"search_max_steps must be a positive number of steps, or -1 for the distillation's own budget; got "
                f"{steps!r}."
            )

    def layer_list(self) -> list[int] | None:
        if self.student_layers is None:
            return None
        try:
            return [int(x) for x in str(self.student_layers).split(",")]
        except ValueError:
            raise ValueError(
                f"student_layers={self.student_layers!r} must be comma-separated teacher layer indices, e.g. '0,2,5'."
            ) from None


def json_arg(value, name: str) -> dict:
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


def stage_args(config: DistillationConfig, output_dir: str, **overrides) -> TrainingArguments:
    """TrainingArguments for a non-distillation stage, sharing the run's batch sizes, seed and precision."""
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
        # The optimizer choice (e.g. adamw_torch_fused, a third faster per step on CPU) applies to every stage.
        "optim",
    )
    kwargs = {name: getattr(config, name) for name in keep}
    kwargs.update(report_to=[], save_strategy="no", output_dir=output_dir)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
