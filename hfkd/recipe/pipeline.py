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
import statistics
import sys
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
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from .. import data as hfkd_data
from ..batch import SPANS, TEACHER_PREFIX, TEACHER_SPANS
from ..cache import TeacherCache, build_teacher_cache
from ..checkpoints import describe_skipped, last_complete_checkpoint
from ..compare import paired_accuracy, paired_blocks
from ..config import DistillationConfig
from ..data import DataArguments
from ..layer_map import resolve_layer_map
from ..lm_eval import bits_per_byte
from ..measure import compare_latency, count_parameters, forward_latency_ms
from ..metrics import load_metric
from ..models import check_teacher_head
from ..paths import resolve_path
from ..peers import named_peers, peer_folder, save_peer
from ..report import model_card, plot_report, write_metrics
from ..run_folder import (
    CONFIG_FILE,
    TEACHER_RECORD,
    WORK_DIRS,
    check_output_dir,
    cleaned_on_failure,
    resume_target,
    run_values,
    write_config,
)
from ..student import student_from_teacher, student_layers
from ..terms import TERMS
from ..terms.runner import TermSet
from ..trainer import DistillationTrainer
from ..two_tokenizers import TwoTokenizerCollator

logger = logging.getLogger(__name__)

_AUTO = {
    "text-classification": AutoModelForSequenceClassification,
    "image-classification": AutoModelForImageClassification,
    "causal-lm": AutoModelForCausalLM,
}

# Beside metrics.json with compare_without_distillation: both students' per-row scores on the same held-out rows.
EVAL_ROWS_FILE = "eval_rows.json"


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
        if isinstance(self.generations, bool) or not isinstance(self.generations, int) or self.generations < 1:
            raise ValueError(
                f"generations must be an integer >= 1 (1: no born-again generations), got {self.generations!r}."
            )
        if self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be >= 0 (0: off), got {self.early_stopping_patience}.")
        if self.student_layers is not None:
            self.layer_list()  # a typo fails here, before any model is loaded

    def layer_list(self) -> list[int] | None:
        if self.student_layers is None:
            return None
        try:
            return [int(x) for x in str(self.student_layers).split(",")]
        except ValueError:
            raise ValueError(
                f"student_layers={self.student_layers!r} must be comma-separated teacher layer indices, e.g. '0,2,5'."
            ) from None


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


def _planned_steps(args: TrainingArguments, num_rows: int) -> int:
    """The optimizer steps Trainer will take (its own formula), for the stage headings."""
    if args.max_steps > 0:
        return args.max_steps
    batches = math.ceil(num_rows / (args.per_device_train_batch_size * max(args.world_size, 1)))
    per_epoch = max(
        batches // args.gradient_accumulation_steps + int(batches % args.gradient_accumulation_steps > 0), 1
    )
    return math.ceil(args.num_train_epochs * per_epoch)


def _heading(config: DistillationConfig, text: str) -> None:
    if config.process_index == 0:
        print(f"\n== hfkd: {text}", file=sys.stderr, flush=True)


def eval_metric_names(recipe: RecipeArguments, config: DistillationConfig) -> list[str]:
    """What the recipe's evaluation during distillation reports (without the `eval_` prefix)."""
    lm = recipe.task == "causal-lm"
    names = ["loss"]
    if config.task_weight > 0:
        names += ["task", "perplexity"] if lm else ["task"]
    if not lm:
        names.append("accuracy")  # compute_metrics, whatever the weights
    if config.eval_with_teacher:  # otherwise evaluation runs the student alone and reports no term
        names += [f"distill/{spec.name}" for spec in config.term_specs]
    return names


def _check_peers(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """Mutual learning (peer_model_name_or_path) in a recipe: what it cannot take, and peers that cannot be found,
    refused before the teacher is fine-tuned."""
    peers = config.peer_model_name_or_path
    if peers is None:
        return
    if recipe.generations > 1:
        raise ValueError(
            f"peer_model_name_or_path with generations={recipe.generations}: born-again generations are taught by "
            "the generation before, and mutual learning trains the student with its peers instead of a teacher; "
            "set --generations 1, or drop --peer_model_name_or_path."
        )
    if config.teacher_cache_dir:
        raise ValueError(
            "peer_model_name_or_path with teacher_cache_dir: in mutual learning the student learns from its peers, "
            "which train beside it, so no teacher outputs are read; unset --teacher_cache_dir, or drop the peers."
        )
    features = [spec.name for spec in config.term_specs if _reads_features(spec)]
    if features:
        fixes = [
            f"--{TERMS[n].short_form['weight']} 0" if TERMS[n].short_form else f"drop {n!r} from --terms"
            for n in features
        ]
        raise ValueError(
            f"peer_model_name_or_path: the peers and the student learn from each other's logits, but the terms "
            f"{features} read features (hidden states, attentions or submodules); {', '.join(fixes)} (logit and dkd "
            "remain), or drop the peers."
        )
    if not config.term_specs:
        raise ValueError(
            "peer_model_name_or_path with logit_weight=0 and no `terms`: nothing would compare the student with its "
            "peers; set --logit_weight 1 (the DML paper's, with --temperature 1 --task_weight 1), or drop the peers."
        )
    for name, source in named_peers(peers).items():
        _check_peer_source(name, source)


def _reads_features(spec) -> bool:
    """Whether a term reads more than the models' logits (TermSet.feature_terms), known without the models: a term
    that cannot bind without module names reads submodules."""
    terms = TermSet([spec])
    try:
        terms.bind_module_names((), {})
    except ValueError:
        return True
    return bool(terms.feature_terms())


def _reads_logits(spec) -> bool:
    """Whether a term reads the teacher's logits, known without the models (a term that cannot bind without module
    names reads submodules)."""
    terms = TermSet([spec])
    try:
        terms.bind_module_names((), {})
    except ValueError:
        return False
    return terms.needs().logits


def _check_peer_source(name: str, source) -> None:
    """A peer is a folder or a Hub id: a missing folder, or a name neither on disk nor reachable, fails now."""
    if not isinstance(source, str):
        raise ValueError(
            f"peer_model_name_or_path: the peer {name!r} is {source!r}; give a folder written by save_pretrained or "
            "a Hub id."
        )
    try:
        path = resolve_path(source)  # a `pkg:` path whose package or folder is missing fails here
    except ValueError as err:
        raise ValueError(f"peer_model_name_or_path: the peer {name!r}: {err}") from err
    if os.path.isdir(path):
        return
    if os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path):
        raise ValueError(
            f"peer_model_name_or_path: the peer {name!r} ({source!r}) is no folder"
            f"{' (it is a file)' if os.path.exists(path) else ': there is no such directory'}. Give a folder written "
            "by save_pretrained (or a Hub id)."
        )
    try:  # not a folder here: a Hub id, whose config is fetched (or read from the cache) now
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"peer_model_name_or_path: the peer {name!r} ({source!r}) is neither a folder nor a model hfkd can reach "
            f"on the Hub ({reason}). Check the path or id (HF_HUB_OFFLINE=1 allows only local or cached models)."
        ) from err


def check_run_settings(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """Settings that would only fail during training (at the first evaluation, or in a callback): checked now."""
    if config.teacher_ema_decay is not None:
        raise ValueError(
            "teacher_ema_decay (a mean teacher made from the student) is not offered by the `hfkd distill` recipes "
            "yet: they distil from the recipe's teacher. Unset it, or use it from Python: "
            "DistillationTrainer(model=student, args=DistillationConfig(teacher_ema_decay=0.999, ...))."
        )
    if config.teacher_processing_class is not None:
        raise ValueError(
            "teacher_processing_class: a recipe reads the teacher's tokenizer from teacher_model_name_or_path and the "
            "student's from student_model_name_or_path, and tokenizes for both when they differ; unset "
            "teacher_processing_class (it is for DistillationTrainer in Python)."
        )
    # A recipe has one teacher: settings for several are refused now, not after the teacher is fine-tuned.
    several = [
        name
        for name, given in (
            ("teacher_model_name_or_path", isinstance(config.teacher_model_name_or_path, (list, dict))),
            ("teacher_cache_dir", isinstance(config.teacher_cache_dir, (list, dict))),
            ("teacher_weights", config.teacher_weights is not None),
            ("teacher_combine", config.teacher_combine != "weights"),
        )
        if given
    ]
    if several:
        raise ValueError(
            f"{', '.join(several)} set for several teachers, but a recipe distils from one (it fine-tunes, evaluates "
            "and describes it); for several teachers use DistillationTrainer(teacher_model=[...]) in Python."
        )
    metric = config.metric_for_best_model
    if metric:
        name = metric[len("eval_") :] if metric.startswith("eval_") else metric
        valid = eval_metric_names(recipe, config)
        if name not in valid:
            raise ValueError(
                f"metric_for_best_model={metric!r} is not reported by this recipe's evaluation; it reports "
                f"{valid}. Set --metric_for_best_model to one of them."
            )
        if name == "perplexity" and config.greater_is_better:
            raise ValueError(
                "metric_for_best_model=perplexity: lower is better, but greater_is_better is true (transformers' "
                "default for names not ending in 'loss'). Pass --greater_is_better false."
            )
    if recipe.early_stopping_patience:
        missing = [
            need
            for need, ok in (
                ("--eval_strategy steps (or epoch)", config.eval_strategy != "no"),
                ("--load_best_model_at_end true", config.load_best_model_at_end),
                ("--metric_for_best_model <name>", bool(metric)),
            )
            if not ok
        ]
        if missing:
            raise ValueError(
                f"early_stopping_patience={recipe.early_stopping_patience} needs {', '.join(missing)}: early "
                "stopping watches the metric at each evaluation."
            )
    _check_task_fields(recipe, config)
    from transformers import integrations

    for name in config.report_to or []:
        available = getattr(integrations, f"is_{name}_available", None)
        if available is not None and not available():
            extra = "pip install 'hfkd[tensorboard]'" if name == "tensorboard" else f"pip install {name}"
            raise ValueError(
                f"report_to includes {name!r}, which is not installed: {extra}, or drop it from report_to."
            )
    _check_peers(recipe, config)


def _term_fix(name: str) -> str:
    """The command-line change that turns a term off."""
    short = TERMS[name].short_form
    return f"--{short['weight']} 0" if short else f"drop {name!r} from --terms"


def _check_task_fields(recipe: RecipeArguments, config: DistillationConfig) -> None:
    """Fields the recipe's task cannot use, which DistillationTrainer would refuse only after the teacher is
    fine-tuned (stage 1): refused now, with the command-line fix."""
    lm = recipe.task == "causal-lm"
    if not lm:
        generation = [f for f, on in (("--lmbda", config.lmbda > 0), ("--seq_kd", config.seq_kd)) if on]
        if generation:
            raise ValueError(
                f"{' and '.join(generation)}: on-policy distillation (lmbda) and sequence-level KD (seq_kd) make a "
                f"model generate text, which needs task=causal-lm; this recipe's task is {recipe.task}. Pass "
                f"{' and '.join(f'{f} 0' if f == '--lmbda' else f'{f} false' for f in generation)}."
            )
        lm_terms = [spec.name for spec in config.term_specs if spec.name in ("span_kd", "uld")]
        if lm_terms:
            raise ValueError(
                f"--terms {lm_terms}: these compare next-token distributions of causal LMs (task=causal-lm), and "
                f"this recipe's task is {recipe.task}; {', '.join(_term_fix(n) for n in lm_terms)}. A classifier "
                "distils with logit (--logit_weight), hidden (--hidden_weight) and the relation terms, also across "
                "tokenizers."
            )
    # DistillationTrainer's fields for tokenizing text rows in Python: a recipe tokenizes its own data.
    ignored = [
        (name, flag)
        for name, flag in (
            ("tokenize_text_column", "--text_column"),
            ("tokenize_text_pair_column", "--text_pair_column"),
            ("tokenize_max_length", "--max_length"),
        )
        if getattr(config, name) != DistillationConfig.__dataclass_fields__[name].default
    ]
    if ignored:
        raise ValueError(
            f"{', '.join('--' + n for n, _ in ignored)}: these are for DistillationTrainer with "
            "teacher_processing_class in Python; a recipe tokenizes its data itself, for both models when the "
            f"student has its own tokenizer. Unset them, and use {', '.join(f for _, f in ignored)}."
        )


def _read_teacher_record(folder: str | None) -> dict | None:
    path = os.path.join(folder, TEACHER_RECORD) if folder and os.path.isdir(folder) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _accuracy(prediction) -> dict:
    """The recipe's classification metric during training, the same `evaluate` accuracy as the final evaluation."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    result = load_metric("accuracy").compute(
        predictions=np.argmax(logits, -1).tolist(), references=prediction.label_ids.tolist()
    )
    return {"accuracy": result["accuracy"]}


class _RecipeTrainer(DistillationTrainer):
    """The recipe's distillation trainer: a causal LM's evaluation also reports the student's perplexity."""

    report_perplexity = False

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, **kwargs):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        task = output.metrics.get(f"{prefix}_task")
        if self.report_perplexity and task is not None:
            output.metrics[f"{prefix}_perplexity"] = math.exp(min(task, 50.0))
        return output


class _Run:
    """One recipe run; each method is a stage."""

    def __init__(self, recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig):
        self.recipe, self.data_args, self.config = recipe, data_args, config
        self.out = config.output_dir
        self.times: dict[str, float] = {}
        self.teacher_path = resolve_path(config.teacher_model_name_or_path)
        init = dict(config.teacher_model_init_kwargs or {})
        self.teacher_kwargs = {k: resolve_path(v) if isinstance(v, str) else v for k, v in init.items()}
        self.resume = resume_target(config)
        # What the teacher folder says of its own making (a teacher fine-tuned by an earlier hfkd run).
        self.teacher_record = _read_teacher_record(self.teacher_path)
        self.teacher_finetune: dict | None = None  # this run's teacher fine-tuning, when it has one
        # Deep mutual learning (peer_model_name_or_path): the peers by name, and each one's source as given.
        self.peers: dict[str, torch.nn.Module] = {}
        self.peer_sources: dict[str, str] = {}
        # A student with its own tokenizer (`across`): its tokenizer, and each model's held-out text evaluation.
        self.student_processor = None
        self.across = False
        self.text_evals: dict[str, dict] = {}

    # -- data and processors
    def load_data(self):
        self.train_raw, self.eval_raw = hfkd_data.load_splits(self.data_args, self.config.seed)
        task = self.recipe.task
        self.dropped_rows = self.unseen_eval_rows = None
        if task != "causal-lm":
            self.train_raw, self.eval_raw, self.dropped_rows = hfkd_data.drop_unlabelled(
                self.train_raw, self.eval_raw, self.data_args
            )
            names = hfkd_data.label_names(self.train_raw, self.eval_raw, self.data_args)
            self.eval_raw, self.unseen_eval_rows = hfkd_data.drop_unseen_eval_labels(
                self.eval_raw, names, self.data_args
            )
            self.labels = self._teacher_label_order(names)
        if task == "image-classification":
            self.processor = self._image_processor()
        else:
            if self.teacher_path is None:
                raise ValueError(f"task={task} needs teacher_model_name_or_path for its tokenizer.")
            self.processor = AutoTokenizer.from_pretrained(self.teacher_path, **self._gguf_kwargs())
            if self.processor.pad_token is None:
                self.processor.pad_token = self.processor.eos_token
        self.student_processor = self._student_tokenizer()
        self.across = self.student_processor is not self.processor
        if self.across:
            self.check_across()
            self._preprocess_across()
        else:
            self.check_one_tokenizer()
            self.train_ds, self.eval_ds = (self._preprocess(d) for d in (self.train_raw, self.eval_raw))
            # One tokenization serves every stage.
            self.student_train_ds, self.student_eval_ds = self.train_ds, self.eval_ds
            self.distill_train_ds, self.distill_eval_ds = self.train_ds, self.eval_ds
        if task == "causal-lm":
            # The texts every model's bits per byte is measured on: the held-out text cut at whitespace into pieces
            # each tokenizer holds in max_length tokens (the held-out rows of a run across tokenizers).
            tokenizers = [self.processor] + ([self.student_processor] if self.across else [])
            texts = [t for t in self.eval_raw[self.data_args.text_column] if t]
            self.lm_texts = hfkd_data.split_text(texts, tokenizers, self.data_args.max_length)

    def _student_tokenizer(self):
        """The student's own tokenizer when it has one that differs from the teacher's, else the teacher's."""
        r = self.recipe
        if not r.student_model_name_or_path or r.task == "image-classification":
            return self.processor
        path = resolve_path(r.student_model_name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, TypeError, KeyError):
            tokenizer = None
        if tokenizer is None:
            # No tokenizer beside the student: it must read the teacher's ids, as students built from the teacher do.
            try:
                config = AutoConfig.from_pretrained(path)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"Could not load the student {r.student_model_name_or_path!r} (student_model_name_or_path): {err}\n"
                    "Check the id or path (HF_HUB_OFFLINE=1 allows only local or cached models)."
                ) from err
            vocab = getattr(config, "vocab_size", None) or getattr(config.get_text_config(), "vocab_size", None)
            if vocab is not None and vocab < len(self.processor):
                raise ValueError(
                    f"student_model_name_or_path={r.student_model_name_or_path!r} has no tokenizer, and its vocabulary "
                    f"({vocab} tokens) is smaller than the teacher's tokenizer ({len(self.processor)}): it cannot read "
                    "the teacher's ids. Save the student's own tokenizer in its folder (tokenizer.save_pretrained("
                    "folder)); hfkd then tokenizes the text for both models."
                )
            return self.processor
        if tokenizer.get_vocab() == self.processor.get_vocab():
            return self.processor  # the teacher's tokenizer: the run is the same as with a student built from it
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"student_model_name_or_path={r.student_model_name_or_path!r}: its tokenizer "
                f"({type(tokenizer).__name__}) differs from the teacher's and is not a fast tokenizer, but lining up "
                "two tokenizations needs each token's character offsets. Save a fast tokenizer (tokenizer.json) with "
                "the student."
            )
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(
                    f"student_model_name_or_path={r.student_model_name_or_path!r}: its tokenizer has neither a pad "
                    "nor an EOS token to pad batches with; set tokenizer.pad_token and save it with the student."
                )
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def check_across(self):
        """What cannot run when the student has its own tokenizer, refused before anything is tokenized or trained."""
        c, r = self.config, self.recipe
        own = (
            f"student_model_name_or_path={r.student_model_name_or_path!r} has its own tokenizer "
            f"({len(self.student_processor)} tokens; the teacher's has {len(self.processor)})"
        )
        if c.teacher_cache_dir:
            raise ValueError(
                f"teacher_cache_dir: {own}, but a teacher cache stores outputs over the teacher's tokenization alone, "
                "without the spans that line it up with the student's. Unset --teacher_cache_dir (the teacher runs "
                "online), or use a student with the teacher's tokenizer."
            )
        if c.peer_model_name_or_path is not None:
            raise ValueError(
                f"peer_model_name_or_path: {own}; deep mutual learning needs the peers and the student to share one "
                "tokenizer. Drop --peer_model_name_or_path, or use a student with the teacher's tokenizer."
            )
        if r.generations > 1:
            raise ValueError(
                f"generations={r.generations}: {own}; born-again generations are not offered across tokenizers yet. "
                "Set --generations 1."
            )
        if c.lmbda > 0 or c.seq_kd:
            raise ValueError(
                f"{'--lmbda' if c.lmbda > 0 else '--seq_kd'}: {own}; on-policy distillation and sequence-level KD "
                "are not offered across tokenizers yet. Set --lmbda 0 --seq_kd false, or use a student with the "
                "teacher's tokenizer."
            )
        lm = r.task == "causal-lm"
        names = [spec.name for spec in c.term_specs]
        positional = [n for n in names if not TERMS[n].across_tokenizers or (lm and n in ("logit", "dkd"))]
        lm_only = [n for n in names if not lm and n in ("span_kd", "uld")]
        usable = (
            'span_kd or uld (--terms \'[{"name": "span_kd"}]\') with the task loss'
            if lm
            else "logit, hidden (over aligned spans) and the relation terms (rkd, sp, pkt, crd, pkd)"
        )
        for refused, why in (
            (positional, "compare the two models token position by token position or id by id"),
            (lm_only, "compare next-token distributions of causal LMs, and this task has class logits"),
        ):
            if refused:
                fixes = [
                    f"--{TERMS[n].short_form['weight']} 0" if TERMS[n].short_form else f"drop {n!r} from --terms"
                    for n in refused
                ]
                raise ValueError(
                    f"{own}, and the terms {refused} {why}; {', '.join(fixes)}. Across tokenizers use {usable}."
                )

    def check_one_tokenizer(self):
        """The cross-tokenizer terms, when the student reads the teacher's tokens: refused before stage 1."""
        names = [spec.name for spec in self.config.term_specs if spec.name in ("span_kd", "uld")]
        if names:
            raise ValueError(
                f"--terms {names}: these line up two different tokenizations, but the student reads the teacher's "
                f"tokens (it is built from the teacher, or its tokenizer is the teacher's); "
                f"{', '.join(_term_fix(n) for n in names)} and distil with --logit_weight, or give "
                "--student_model_name_or_path a student with its own tokenizer."
            )

    def _preprocess_across(self):
        """Teacher stages keep the teacher's tokenization; distillation reads both (the student's view is its part)."""
        task, args = self.recipe.task, self.data_args
        student_tok, teacher_tok = self.student_processor, self.processor
        if task == "text-classification":
            both = [
                hfkd_data.preprocess_text_classification_for_both(d, student_tok, teacher_tok, args, self.labels)
                for d in (self.train_raw, self.eval_raw)
            ]
            self.eval_ds = self._preprocess(self.eval_raw)  # the teacher's evaluation
        else:
            both = [
                hfkd_data.preprocess_causal_lm_for_both(d, student_tok, teacher_tok, args)
                for d in (self.train_raw, self.eval_raw)
            ]
            self.eval_ds = None  # every causal LM is evaluated on the same held-out text, in bits per byte
        # The teacher's own tokenization of the training data serves its fine-tuning only.
        self.train_ds = self._preprocess(self.train_raw) if self.recipe.finetune_teacher else None
        self.distill_train_ds, self.distill_eval_ds = both
        self.student_train_ds, self.student_eval_ds = (
            d.remove_columns(
                [c for c in d.column_names if c.startswith(TEACHER_PREFIX) or c in (SPANS, TEACHER_SPANS)]
            )
            for d in both
        )

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

    def collator(self, role: str = "student"):
        """Batches for `role`: 'teacher' (its own tokenization), 'student', or 'distill' (both, when they differ)."""
        task = self.recipe.task
        if role == "distill" and self.across:
            return TwoTokenizerCollator(
                self.student_processor,
                self.processor,
                max_length=self.data_args.max_length,
                text_column=self.data_args.text_column,
                text_pair_column=self.data_args.text_pair_column,
                causal_lm=task == "causal-lm",
            )
        tokenizer = self.processor if role == "teacher" else self.student_processor
        if task == "text-classification":
            return DataCollatorWithPadding(tokenizer)
        if task == "causal-lm":
            if self.across and role != "teacher":  # rows of text pieces, their labels already made
                return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
            return DataCollatorForLanguageModeling(tokenizer, mlm=False)
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
                teacher, info = auto.from_pretrained(self.teacher_path, output_loading_info=True, **kwargs)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"Could not load the teacher {self.config.teacher_model_name_or_path!r}: {err}\nCheck the id or "
                    "path and your network (HF_HUB_OFFLINE=1 allows only local or cached models)."
                ) from err
            if not self.recipe.finetune_teacher:
                # Distilled from as loaded: a head transformers initialised at random would teach noise (and be
                # evaluated as the teacher). A teacher fine-tuned in stage 1 trains its new head first.
                readers = [spec.name for spec in self.config.term_specs if _reads_logits(spec)]
                check_teacher_head(teacher, info, self.config.teacher_model_name_or_path, readers)
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

    def check_student_plan(self):
        """The student's layers against the teacher's depth, before the teacher is fine-tuned."""
        r = self.recipe
        if not r.student_model_name_or_path:
            layers = r.layer_list()
            kept = student_layers(self.teacher, num_layers=None if layers else r.student_num_layers, layers=layers)
            if len(kept) == 1:  # one stack of layers (not an encoder-decoder's two)
                self._check_layer_maps(len(kept[0]))

    def _check_layer_maps(self, student_depth: int) -> None:
        """Explicit hidden/attention layer maps against both depths (a student built from the teacher's layers, of
        a model with one stack of layers), which the trainer would check only after stage 1."""
        teacher_depth = getattr(self.teacher.config, "num_hidden_layers", None)
        if not isinstance(teacher_depth, int) or getattr(self.teacher.config, "is_encoder_decoder", False):
            return
        for spec in self.config.term_specs:
            layer_map = spec.options.get("layer_map")
            if spec.name not in ("hidden", "attention") or isinstance(layer_map, str) or layer_map is None:
                continue
            field_name = f"{spec.name}_layer_map"
            # hidden_states hold the embeddings' output first: one entry more than layers.
            extra = 1 if spec.name == "hidden" else 0
            try:
                resolve_layer_map(
                    layer_map,
                    student_depth + extra,
                    teacher_depth + extra,
                    field_name=f"--{field_name}",
                    has_embeddings=bool(extra),
                )
            except ValueError as err:
                raise ValueError(
                    f"{str(err).rstrip('.')} (the student keeps {student_depth} of the teacher's {teacher_depth} "
                    "layers)."
                ) from None

    def finished_teacher(self) -> bool:
        """On resume, a teacher this run already fine-tuned and saved whole is loaded instead of trained again."""
        folder = os.path.join(self.out, "teacher")
        record = _read_teacher_record(folder)
        if not self.resume or record is None:
            return False
        kwargs = {k: v for k, v in self.teacher_kwargs.items() if k != "gguf_file"}
        teacher = _AUTO[self.recipe.task].from_pretrained(folder, **kwargs)
        # The same teacher as before the stop (the run's checkpoints name it): the one fine-tuned from the original.
        teacher.config._name_or_path = self.teacher.config._name_or_path
        if self.recipe.task == "causal-lm" and teacher.config.pad_token_id is None:
            teacher.config.pad_token_id = self.processor.pad_token_id
        self.teacher = teacher
        self.teacher_finetune = record["finetune"]
        return True

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
        steps = _planned_steps(args, len(self.train_ds))
        _heading(
            self.config,
            f"stage 1/2: teacher fine-tuning, {steps} steps (teacher_max_steps / teacher_num_train_epochs; "
            "--max_steps bounds distillation only)",
        )
        trainer = Trainer(
            model=teacher,
            args=args,
            train_dataset=self.train_ds,
            data_collator=self.collator("teacher"),
            processing_class=self.processor,
        )
        trainer.train()
        if r.teacher_lora_r:
            teacher = teacher.merge_and_unload()
        self.teacher_finetune = {
            "steps": trainer.state.global_step,
            "epochs": round(trainer.state.epoch or 0.0, 4),
            "learning_rate": r.teacher_learning_rate,
            "batch_size": args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1),
            "train_examples": len(self.train_ds),
            "lora_r": r.teacher_lora_r,
        }
        if self.config.process_index == 0:  # one writer under `accelerate launch`
            shutil.rmtree(args.output_dir, ignore_errors=True)
            folder = os.path.join(self.out, "teacher")
            teacher.save_pretrained(folder)
            self.processor.save_pretrained(folder)
            # Written last: its presence says the folder holds a whole fine-tuned teacher (resume skips the stage),
            # and it carries the lineage to any later run that distils from this folder.
            record = {"base": self._teacher_lineage(), "finetune": self.teacher_finetune, "data": self.data_note()}
            with open(os.path.join(folder, TEACHER_RECORD), "w") as handle:
                json.dump(record, handle, indent=1)
        self.teacher = teacher

    def _teacher_lineage(self) -> dict:
        """Where the teacher came from, following a teacher folder written by an earlier hfkd run to its origin."""
        name = self.config.teacher_model_name_or_path or "built from teacher_config"
        hub_id = self.recipe.teacher_hub_id
        if self.teacher_record is not None:  # a teacher fine-tuned by an earlier hfkd run: its own origin
            base = self.teacher_record["base"]
            return {
                "name": name,
                "hub_id": hub_id or base.get("hub_id"),
                "origin": base,
                "finetune": self.teacher_record.get("finetune"),
                "data": self.teacher_record.get("data"),
            }
        if hub_id is None and name and not name.startswith("pkg:") and not os.path.exists(name):
            hub_id = name if "/" in name or name.isidentifier() else None
        return {"name": name, "hub_id": hub_id}

    def data_note(self) -> str:
        data_args = self.data_args
        return (
            f"`{data_args.dataset_name}`"
            + (f" ({data_args.dataset_config_name})" if data_args.dataset_config_name else "")
            + (f" from {data_args.data_files}" if data_args.data_files else "")
            + f"; {len(self.distill_train_ds)} training and {len(self.student_eval_ds)} held-out examples"
            + (
                f" (pieces of text of at most {data_args.max_length} tokens for both tokenizers, not packed)"
                if self.across and self.recipe.task == "causal-lm"
                else ""
            )
            + (
                ""
                if data_args.eval_split
                else f" (held-out {data_args.eval_fraction:.0%} carved from train, seed {self.config.seed})"
            )
            + (f"; {self.dropped_rows}" if getattr(self, "dropped_rows", None) else "")
            + (f"; {self.unseen_eval_rows}" if getattr(self, "unseen_eval_rows", None) else "")
        )

    def build_student(self):
        self.student, self.student_note = self._make_student()

    def _make_student(self):
        """The student as the recipe says, and how it was made; the same weights every time it is called."""
        r = self.recipe
        if r.student_model_name_or_path:
            path = resolve_path(r.student_model_name_or_path)
            set_seed(self.config.seed)  # a head the checkpoint lacks starts the same way each time
            student = _AUTO[r.task].from_pretrained(path, **self._label_kwargs())
            note = f"`{r.student_model_name_or_path}`"
            if self.across:
                if student.config.pad_token_id is None:
                    student.config.pad_token_id = self.student_processor.pad_token_id
                note += (
                    f", with its own tokenizer ({len(self.student_processor):,} tokens; the teacher's has "
                    f"{len(self.processor):,}), saved with it: distillation read the text tokenized for both and "
                    "lined up by character spans (hfkd.two_tokenizers)"
                )
            return student, note
        layers = r.layer_list()
        student = student_from_teacher(
            self.teacher, num_layers=None if layers else r.student_num_layers, layers=layers
        )
        kept = layers or "evenly spread, first and last kept"
        note = (
            f"{type(student).__name__} built from the teacher's own embeddings, head and layers ({kept}); "
            f"{self._num_layers(student)} of the teacher's {self._num_layers(self.teacher)} layers"
        )
        return student, note

    def load_peers(self):
        """The peers of deep mutual learning, each loaded with the task's Auto class and the run's labels; peer i is
        seeded with seed + 1 + i, so that heads a checkpoint lacks start differently in each peer and the student."""
        sources = self.config.peer_model_name_or_path
        if sources is None:
            return
        auto = _AUTO[self.recipe.task]
        for i, (name, source) in enumerate(named_peers(sources).items()):
            set_seed(self.config.seed + 1 + i)
            try:
                peer = auto.from_pretrained(resolve_path(source), **self._label_kwargs())
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"Could not load the peer {name!r} ({source!r}) with {auto.__name__}: {err}\nA peer must solve the "
                    "recipe's task with its tokenizer or processor and labels; check peer_model_name_or_path."
                ) from err
            if self.recipe.task == "causal-lm" and peer.config.pad_token_id is None:
                peer.config.pad_token_id = self.processor.pad_token_id
            self.peers[name], self.peer_sources[name] = peer, source

    def _side_run(self, name: str) -> dict:
        """Training arguments of a run beside the distillation (comparison, generations): no checkpoints, no
        evaluation during training, no logging integrations, nothing pushed, a scratch folder under checkpoints/."""
        return dict(
            output_dir=os.path.join(self.out, "checkpoints", name),
            save_strategy="no",
            eval_strategy="no",
            load_best_model_at_end=False,
            metric_for_best_model=None,
            report_to=[],
            push_to_hub=False,
            resume_from_checkpoint=None,
        )

    def _train_beside(self, trainer_cls, student, args, **kwargs):
        """Trains `student` on the recipe's data in a run beside the distillation; its scratch folder goes after."""
        trainer = trainer_cls(
            model=student,
            args=args,
            train_dataset=self.student_train_ds,
            data_collator=self.collator("student"),
            processing_class=self.student_processor,
            **kwargs,
        )
        trainer.train()
        shutil.rmtree(args.output_dir, ignore_errors=True)
        return trainer

    def train_labels_only(self):
        """The same student, data and budget on the labels alone, with plain transformers.Trainer."""
        c = self.config
        student, _ = self._make_student()
        kwargs = {f.name: getattr(c, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        kwargs.update(**self._side_run("_labels_only"), greater_is_better=None)
        args = TrainingArguments(**kwargs)
        _heading(
            c,
            f"comparison: the same student on the labels alone, {_planned_steps(args, len(self.student_train_ds))} "
            "steps",
        )
        trainer = self._train_beside(Trainer, student, args)
        metric, text, self.labels_only_rows = self.evaluate_all(student)
        self.labels_only = {"steps": trainer.state.global_step, "metric": metric, **_text_fields(text)}

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
            overwrite_output_dir=c.overwrite_output_dir,
            resume_from_checkpoint=None,  # given to train() below, after the run's own checks
            push_to_hub=False,  # the recipe pushes the finished folder itself
            teacher_model_name_or_path=None,
            teacher_model_init_kwargs=None,
            peer_model_name_or_path=None,  # the trainer gets the peers this run loaded
            teacher_processing_class=None,  # given below as a tokenizer when the student has its own
            report_to=c.report_to,
        )
        callbacks = []
        if self.recipe.early_stopping_patience:
            callbacks.append(
                EarlyStoppingCallback(self.recipe.early_stopping_patience, self.recipe.early_stopping_threshold)
            )
        lm = self.recipe.task == "causal-lm"
        trainer = _RecipeTrainer(
            model=self.student,
            teacher_model=None if self.peers else self.teacher,
            peer_models=self.peers or None,
            args=args,
            train_dataset=self.distill_train_ds,
            eval_dataset=self.distill_eval_ds,
            data_collator=self.collator("distill"),
            processing_class=self.student_processor,
            teacher_processing_class=self.processor if self.across else None,
            compute_metrics=None if lm else _accuracy,
            callbacks=callbacks,
        )
        trainer.report_perplexity = lm
        resume = self.resume
        skipped_note = ""
        if resume is True:
            # The newest complete checkpoint: one the run was killed while saving is passed over, and said so.
            resume, skipped = last_complete_checkpoint(args.output_dir)
            if skipped:
                skipped_note = f" (skipped {describe_skipped(skipped)}: the run stopped while saving it)"
                logger.warning(
                    "resume_from_checkpoint=true: skipped %s, cut short while saving; %s.",
                    describe_skipped(skipped),
                    f"resuming from {resume}, the newest complete checkpoint"
                    if resume
                    else "no distillation checkpoint is complete, so distillation starts again",
                )
            # None: the run stopped before its first complete distillation checkpoint; distillation starts again.
        from_step = f", resuming from {resume}{skipped_note}" if isinstance(resume, str) else skipped_note
        stage = f"stage {2 if self.recipe.finetune_teacher else 1}/{2 if self.recipe.finetune_teacher else 1}"
        steps = _planned_steps(args, len(self.distill_train_ds))
        if self.peers:
            _heading(
                self.config,
                f"{stage}: deep mutual learning, the student and {len(self.peers)} peer(s) ({', '.join(self.peers)}) "
                f"learn from the labels and from each other, {steps} steps{from_step}; the teacher does not teach "
                "(it is evaluated for comparison)",
            )
        else:
            tokenized = ", text tokenized for both tokenizers" if self.across else ""
            _heading(self.config, f"{stage}: distillation, {steps} steps{from_step}{tokenized}")
        trainer.train(resume_from_checkpoint=resume)
        self.trainer = trainer
        self.log_history = trainer.state.log_history
        # The terms that pair layers per stream (hidden, attention) say how they paired them.
        self.layer_maps = {
            name: dict(term.pairs)
            for name, term in trainer.term_set.terms.items()
            if isinstance(getattr(term, "pairs", None), dict) and term.pairs
        }

    def born_again(self):
        """Generations 2..N (Furlanello et al. 2018): each a student from the same initial weights, taught by the
        generation before it, with the same terms and budget; the last one becomes the run's student."""
        c = self.config
        self.generations = [
            {
                "generation": 1,
                "teacher": "the teacher",
                "steps": self.trainer.state.global_step,
                "metric": self.evaluate(self.student),
            }
        ]
        for generation in range(2, self.recipe.generations + 1):
            teacher = self.student
            student, _ = self._make_student()
            args = dataclasses.replace(
                c,
                **self._side_run(f"_generation-{generation}"),
                overwrite_output_dir=True,
                teacher_model_name_or_path=None,
                teacher_model_init_kwargs=None,
                teacher_cache_dir=None,  # the cache holds the first teacher's outputs, not this generation's
            )
            _heading(
                c,
                f"born-again generation {generation}/{self.recipe.generations}: the same student, taught by "
                f"generation {generation - 1}, {_planned_steps(args, len(self.student_train_ds))} steps",
            )
            trainer = self._train_beside(DistillationTrainer, student, args, teacher_model=teacher)
            self.student = student
            self.generations.append(
                {
                    "generation": generation,
                    "teacher": f"generation {generation - 1}",
                    "steps": trainer.state.global_step,
                    "metric": self.evaluate(student),
                }
            )

    def evaluate(self, model) -> float:
        """The recipe's metric on the held-out split, each model reading its own tokenization (the teacher its
        tokenizer's, every other model the student's): accuracy; for causal LMs perplexity over the packed blocks, or
        bits per byte when the student has its own tokenizer."""
        return self.score(model)[0]

    def score(self, model) -> tuple[float, dict]:
        """`evaluate`'s metric and the per-row scores behind it, which a paired comparison of two models on the same
        rows needs (hfkd.compare): {"correct": [...]} per row for classifiers; {"loss": [...], "count": [...]} per
        packed block for causal LMs (summed negative log-likelihood in nats, predicted tokens), or per held-out text
        piece across tokenizers (bits, bytes)."""
        if self.recipe.task == "causal-lm" and self.across:
            return _text_score(self.text_eval(model))
        args = self._stage_args(os.path.join(self.out, "checkpoints", "_eval"))
        teacher = model is self.teacher
        role = "teacher" if teacher else "student"
        tokenizer = self.processor if teacher else self.student_processor
        lm = self.recipe.task == "causal-lm"
        eval_ds = self.eval_ds if teacher else self.student_eval_ds
        try:
            trainer = Trainer(
                model=model,
                args=args,
                data_collator=self.collator(role),
                processing_class=tokenizer,
                preprocess_logits_for_metrics=_block_nll if lm else None,
            )
            prediction = trainer.predict(eval_ds)
        finally:
            # Trainer makes its output_dir, which evaluation never writes into: a scratch folder, not left behind.
            if self.config.process_index == 0:
                shutil.rmtree(args.output_dir, ignore_errors=True)
        outputs = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        if lm:
            loss, count = np.asarray(outputs[:, 0], np.float64), np.asarray(outputs[:, 1], np.float64)
            perplexity = math.exp(min(loss.sum() / max(count.sum(), 1.0), 50.0))
            return perplexity, {"loss": loss.tolist(), "count": count.tolist()}
        predicted = np.argmax(outputs, -1)
        metric = load_metric("accuracy")
        accuracy = metric.compute(predictions=predicted.tolist(), references=prediction.label_ids.tolist())["accuracy"]
        return accuracy, {"correct": (predicted == prediction.label_ids).astype(int).tolist()}

    def text_eval(self, model) -> dict:
        """Bits per byte and perplexity per own token on the held-out text pieces (hfkd.lm_eval), the same text for
        every model whatever its tokenizer."""
        tokenizer = self.processor if model is self.teacher else self.student_processor
        return bits_per_byte(
            model,
            tokenizer,
            self.lm_texts,
            max_length=self.data_args.max_length,
            batch_size=self.config.per_device_eval_batch_size,
        )

    def evaluate_all(self, model) -> tuple[float, dict | None, dict]:
        """The recipe's metric, for causal LMs the held-out text's bits per byte (None for classifiers), and the
        metric's per-row scores (`score`)."""
        if self.recipe.task != "causal-lm":
            metric, rows = self.score(model)
            return metric, None, rows
        text = self.text_eval(model)
        metric, rows = _text_score(text) if self.across else self.score(model)
        return metric, text, rows

    def latency(self) -> tuple[float, float]:
        """Median forward latencies of teacher and student on one batch of held-out rows, each model reading its own
        tokenization of the same examples (hfkd.measure.compare_latency when they share one)."""
        n = min(self.recipe.latency_batch_size, len(self.student_eval_ds))
        repeats = self.recipe.latency_repeats
        if not self.across:
            return compare_latency(
                self.teacher, self.student, self.collator("teacher")([self.eval_ds[i] for i in range(n)]), repeats
            )
        batch = self.collator("distill")([self.distill_eval_ds[i] for i in range(n)])
        teacher_batch = {k[len(TEACHER_PREFIX) :]: v for k, v in batch.items() if k.startswith(TEACHER_PREFIX)}
        student_batch = {
            k: v for k, v in batch.items() if not k.startswith(TEACHER_PREFIX) and k not in (SPANS, TEACHER_SPANS)
        }
        teacher_times, student_times = [], []
        for _ in range(max(1, repeats // 2)):  # alternating rounds, as compare_latency: drift hits both alike
            teacher_times.append(forward_latency_ms(self.teacher, teacher_batch, repeats=2, warmup=1))
            student_times.append(forward_latency_ms(self.student, student_batch, repeats=2, warmup=1))
        return statistics.median(teacher_times), statistics.median(student_times)


def run_cache(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig, cache_args) -> dict:
    """What `hfkd cache` runs: the recipe's data, teacher and student, then the teacher once over the training data.

    The teacher must be final: a recipe that fine-tunes it (finetune_teacher=true) is cached from the fine-tuned
    folder instead (`teacher_model_name_or_path: <output_dir>/teacher`, `finetune_teacher: false`).
    """
    if config.peer_model_name_or_path is not None:
        raise ValueError(
            "peer_model_name_or_path: in deep mutual learning the student learns from its peers, which train beside "
            "it, so there are no teacher outputs to cache; drop --peer_model_name_or_path, or run hfkd distill with "
            "the peers (no cache)."
        )
    if recipe.finetune_teacher:
        raise ValueError(
            "finetune_teacher=true: the cache must hold the fine-tuned teacher's outputs. Fine-tune it first (e.g. "
            "`hfkd distill` with this recipe), then cache with --teacher_model_name_or_path <output_dir>/teacher "
            "--finetune_teacher false."
        )
    set_seed(config.seed)
    run = _Run(recipe, data_args, config)
    run.load_data()
    if run.across:
        raise ValueError(
            f"student_model_name_or_path={recipe.student_model_name_or_path!r} has its own tokenizer: a teacher cache "
            "stores outputs over the teacher's tokenization alone, which cannot teach it. Distil without a cache "
            "(hfkd distill runs the teacher online), or use a student with the teacher's tokenizer."
        )
    run.load_teacher()
    if config.hidden_weight > 0:
        run.build_student()  # its depth resolves the hidden layer map
    cache = build_teacher_cache(
        run.teacher,
        run.train_ds,
        cache_args.cache_dir,
        args=config,
        student=getattr(run, "student", None),
        data_collator=run.collator("teacher"),
        processing_class=run.processor,
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
        "bytes": size,
        "seconds": cache.meta["seconds"],
        "logits": cache.logits,
        "hidden_layers": cache.hidden_layers,
        "path": cache.path,
    }


def run_recipe(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> dict:
    """Runs every stage and writes the output folder; returns the metrics written to metrics.json.

    Everything that can be checked without training is checked first; a run that fails leaves no folder behind
    unless it holds finished stages, which `resume_from_checkpoint=true` then reuses.
    """
    resume = resume_target(config)
    values = run_values(recipe, data_args, config)
    check_output_dir(config.output_dir, config.overwrite_output_dir, resume, values)
    check_run_settings(recipe, config)
    if config.teacher_cache_dir and recipe.finetune_teacher:
        raise ValueError(
            "teacher_cache_dir with finetune_teacher=true: the cache holds the outputs of a teacher that is final. "
            "Fine-tune first (a run without the cache), cache its teacher/ folder with hfkd cache, then distil with "
            "--teacher_model_name_or_path <run>/teacher --finetune_teacher false --teacher_cache_dir <cache>."
        )
    main_process = config.process_index == 0
    with cleaned_on_failure(config.output_dir, main_process):
        if main_process:
            os.makedirs(config.output_dir, exist_ok=True)
            write_config(os.path.join(config.output_dir, CONFIG_FILE), values)
        return _run_stages(recipe, data_args, config)


def _run_stages(recipe: RecipeArguments, data_args: DataArguments, config: DistillationConfig) -> dict:
    start = time.perf_counter()
    set_seed(config.seed)
    run = _Run(recipe, data_args, config)

    tick = time.perf_counter()
    run.load_data()
    run.load_teacher()
    run.check_student_plan()
    run.load_peers()  # before the teacher is fine-tuned: a peer that does not load fails now
    run.times["data"] = time.perf_counter() - tick
    if recipe.finetune_teacher:
        if run.finished_teacher():
            _heading(config, "stage 1/2: teacher fine-tuning, already done in this run (teacher/): skipped")
        else:
            tick = time.perf_counter()
            run.finetune_teacher()
            run.times["teacher fine-tuning"] = time.perf_counter() - tick
    run.build_student()
    tick = time.perf_counter()
    run.distill()
    run.times["distillation"] = time.perf_counter() - tick
    if recipe.generations > 1:
        tick = time.perf_counter()
        run.born_again()
        run.times["born-again generations"] = time.perf_counter() - tick
    if recipe.compare_without_distillation:
        tick = time.perf_counter()
        run.train_labels_only()
        run.times["labels-only comparison"] = time.perf_counter() - tick

    tick = time.perf_counter()
    models = "teacher, student and peers" if run.peers else "teacher and student"
    _heading(config, f"evaluation of {models} on {len(run.student_eval_ds)} held-out examples, latency")
    teacher_metric, run.text_evals["teacher"], _ = run.evaluate_all(run.teacher)
    student_metric, run.text_evals["student"], run.student_rows = run.evaluate_all(run.student)
    run.peer_metrics = {name: run.evaluate(peer) for name, peer in run.peers.items()}
    if config.process_index != 0:
        return {}  # under `accelerate launch` the main process measures and writes
    t_latency, s_latency = run.latency()
    run.times["evaluation"] = time.perf_counter() - tick

    metrics = _metrics(run, teacher_metric, student_metric, t_latency, s_latency)
    metrics["wall_time_s"] = {**run.times, "total": time.perf_counter() - start}
    write_outputs(run, metrics)
    return metrics


def _metrics(run: _Run, teacher_metric, student_metric, t_latency, s_latency) -> dict:
    recipe, config, data_args = run.recipe, run.config, run.data_args
    lm = recipe.task == "causal-lm"
    # Across tokenizers perplexities are per different tokens: bits per byte of the same text ranks the models.
    metric = ("bits_per_byte" if run.across else "perplexity") if lm else "accuracy"
    # Lower is better for perplexity and bits per byte: retained = teacher / student there, student / teacher
    # otherwise.
    retained = teacher_metric / student_metric if lm else student_metric / max(teacher_metric, 1e-12)
    t_params, s_params = count_parameters(run.teacher), count_parameters(run.student)
    last = {}
    for entry in run.log_history:
        last.update({k: v for k, v in entry.items() if k == "task" or k.startswith("distill/")})
    weights = {"task": (config.task_weight, "cross-entropy on the labels")}
    for spec in config.term_specs:
        if TERMS[spec.name].short_form:  # a built-in term: its loss says what it is (its fields are in the card)
            weights[f"distill/{spec.name}"] = (spec.weight, spec.options["loss"])
            continue
        options = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        weights[f"distill/{spec.name}"] = (spec.weight, spec.name + (f" ({options})" if options else ""))
    dataset_hub = data_args.dataset_name if data_args.data_files is None else None
    teacher = run._teacher_lineage()
    if run.peers:
        teacher["taught"] = False  # deep mutual learning: the student learnt from its peers; the teacher is compared
    if run.teacher_finetune is not None:
        teacher["finetune"] = run.teacher_finetune
        teacher["data"] = run.data_note()
        teacher["finetuned_here"] = True
    if config.teacher_cache_dir:
        cache = TeacherCache(config.teacher_cache_dir)
        teacher["cache"] = {
            "path": config.teacher_cache_dir,
            "rows": len(cache),
            "logits": cache.logits,
            "hidden_layers": cache.hidden_layers,
        }
    state, args = run.trainer.state, run.trainer.args
    evals = [e for e in run.log_history if any(k.startswith("eval_") for k in e)]
    comparison = {}
    if getattr(run, "labels_only", None) is not None:
        plain = run.labels_only["metric"]
        comparison = {
            "labels_only": {
                **run.labels_only,
                "note": "the same student, data, steps, learning rate and batches, on the labels alone",
            },
            # Positive when distillation helped: accuracy points gained, or perplexity (bits per byte) lowered.
            "gain": (plain - student_metric) if lm else (student_metric - plain),
            # The same rows scored for both students: the verdict follows this paired interval of the gain.
            "paired": paired_comparison(metric, run.student_rows, run.labels_only_rows),
        }
    return {
        "task": recipe.task,
        "metric": metric,
        "teacher": {
            **teacher,
            "params": t_params,
            "metric": teacher_metric,
            "latency_ms": t_latency,
            **_text_fields(run.text_evals.get("teacher")),
        },
        "student": {
            "note": run.student_note,
            "params": s_params,
            "metric": student_metric,
            "latency_ms": s_latency,
            "built_from_teacher": not recipe.student_model_name_or_path,
            **_text_fields(run.text_evals.get("student")),
            **(
                {"own_tokenizer": {"vocab": len(run.student_processor), "teacher_vocab": len(run.processor)}}
                if run.across
                else {}
            ),
        },
        **({"text_eval": _text_eval_note(run)} if lm else {}),
        **comparison,
        **({"generations": run.generations} if getattr(run, "generations", None) else {}),
        **({"peers": _peer_metrics(run)} if run.peers else {}),
        "retained": retained,
        "size_ratio": s_params / t_params,
        "speedup": t_latency / s_latency,
        "latency_batch_size": min(recipe.latency_batch_size, len(run.student_eval_ds)),
        "device": f"{config.device.type}, {torch.get_num_threads()} threads",
        "data": {
            "hub_id": dataset_hub,
            "note": run.data_note(),
            "train_examples": len(run.distill_train_ds),
            "eval_examples": len(run.student_eval_ds),
        },
        "training": {
            "steps": state.global_step,
            "epochs": round(state.epoch or 0.0, 4),
            "learning_rate": args.learning_rate,
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "per_device_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "processes": max(args.world_size, 1),
            "batch_size": args.train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1),
            "seed": args.seed,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "evaluations": len(evals),
            "best_checkpoint": state.best_model_checkpoint if args.load_best_model_at_end else None,
            "best_metric": state.best_metric if args.load_best_model_at_end else None,
            "best_by": args.metric_for_best_model if args.load_best_model_at_end else None,
            "resumed": bool(run.resume),
        },
        "distillation": {
            "temperature": config.temperature,
            "terms": {
                name: {"weight": w, "loss": loss, **({"last_logged": last[name]} if name in last else {})}
                for name, (w, loss) in weights.items()
                if w > 0
            },
            "layer_maps": run.layer_maps,
            "steps": state.global_step,
        },
    }


def _block_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per packed block: [summed next-token negative log-likelihood in nats, predicted tokens] (the causal LM's
    loss before its mean), so that blocks can be paired across models (hfkd.compare.paired_blocks)."""
    logits = logits[0] if isinstance(logits, tuple) else logits
    target = labels[:, 1:]
    keep = target != -100
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -log_probs.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
    return torch.stack([torch.where(keep, nll.double(), 0.0).sum(-1), keep.sum(-1).double()], dim=-1)


def _text_score(text: dict) -> tuple[float, dict]:
    """Across tokenizers: the bits per byte of hfkd.lm_eval.bits_per_byte and its per-piece sums (bits, bytes)."""
    return text["bits_per_byte"], {"loss": text["text_bits"], "count": text["text_bytes"]}


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


def _text_fields(text: dict | None) -> dict:
    """A model's held-out text evaluation (hfkd.lm_eval.bits_per_byte) as metrics.json holds it ({} without one)."""
    if text is None:
        return {}
    return {
        "bits_per_byte": text["bits_per_byte"],
        "own_token_perplexity": text["perplexity"],
        "eval_tokens": text["tokens"],
        "eval_bytes": text["bytes"],
    }


def _text_eval_note(run: _Run) -> dict:
    """How the causal LMs' bits per byte were measured."""
    return {
        "texts": len(run.lm_texts),
        "max_length": run.data_args.max_length,
        "note": (
            "every model on the same held-out text, cut at whitespace into pieces of at most max_length tokens of "
            "each tokenizer; bits per byte = the summed negative log2-likelihood of the predicted tokens over the "
            "UTF-8 bytes they spell (a piece's first token is not predicted, so each model's byte count differs "
            "slightly); own_token_perplexity is per the model's own tokens and does not compare across tokenizers"
        ),
    }


def _peer_metrics(run: _Run) -> dict:
    """Each peer of deep mutual learning: where it came from, its metric on the held-out split, its size, where saved."""
    return {
        name: {
            "source": run.peer_sources[name],
            "metric": run.peer_metrics[name],
            "params": count_parameters(peer),
            "folder": os.path.relpath(peer_folder(run.out, name), run.out),
        }
        for name, peer in run.peers.items()
    }


def write_outputs(run: _Run, metrics: dict) -> None:
    """The student with its processor, each peer in peers/<name>/ with it, metrics.json, report.png, the exact config
    and the model card."""
    out = run.out
    run.student.save_pretrained(out)
    run.student_processor.save_pretrained(out)  # the student's own tokenizer when it has one, never the teacher's
    for name, peer in run.peers.items():
        save_peer(peer, peer_folder(out, name), run.processor)
    write_metrics(os.path.join(out, "metrics.json"), metrics)
    if "paired" in metrics:  # the per-row scores behind the paired comparison, to check or recombine it
        rows = {"metric": metrics["metric"], "student": run.student_rows, "labels_only": run.labels_only_rows}
        write_metrics(os.path.join(out, EVAL_ROWS_FILE), rows)
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
    """Every field of this run, loadable again with `hfkd distill --config` (which then starts it anew)."""
    write_config(path, run_values(recipe, data_args, config))
