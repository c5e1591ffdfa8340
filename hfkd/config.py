"""`DistillationConfig`: `TrainingArguments` plus the fields that say what the student learns from the teacher."""

import dataclasses
import json
import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .augment import parse_augment
from .layer_map import parse_layer_map_spec
from .losses import ATTENTION_LOSSES, HIDDEN_LOSSES, LOGIT_LOSSES
from .mixing import COMBINE_MODES, fixed_weights
from .names import named_teachers
from .peers import check_peer_settings, named_peers
from .terms import TERMS, TermSpec, parse_term_specs

logger = logging.getLogger(__name__)


def _has_accelerator() -> bool:
    """Whether torch sees a GPU or other accelerator (CUDA, XPU, MPS, ... or an XLA device)."""
    import torch
    from transformers.utils import is_torch_xla_available

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        return True
    return torch.cuda.is_available() or is_torch_xla_available()


@dataclass
class DistillationConfig(TrainingArguments):
    """Training arguments for [`DistillationTrainer`].

    The total loss is `task_weight * task + logit_weight * logit + hidden_weight * hidden + attention_weight *
    attention`, where `task` is the student's own loss on the labels and the other terms compare the student with
    the teacher. Every field has a `help` text, so `HfArgumentParser` turns this class into a command line.
    """

    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the teacher, used when no `teacher_model` instance is given to the "
            "trainer. It is loaded with the Auto class of the student's task."
        },
    )
    teacher_weights: list | str | dict | None = field(  # str second: the command line passes JSON text
        default=None,
        metadata={
            "help": "Several teachers (teacher_model a list or dict): fixed weight of each, a list in teacher order or "
            "a dict by name, or JSON, e.g. '[2, 1]'; normalised to sum to 1. Default: equal."
        },
    )
    teacher_combine: str = field(
        default="weights",
        metadata={
            "help": "How several teachers combine (hfkd.mixing): 'weights' (fixed, teacher_weights), 'confidence' "
            "(per example, from each teacher's cross-entropy on the label: CA-MKD, Zhang et al. 2022), or "
            "'teacher_id' (a `teacher_id` column names each row's teacher). Response terms (logit, dkd) read the "
            "weighted mixture of the teachers' distributions; the others are the weighted sum of per-teacher terms."
        },
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for the teacher's `from_pretrained`, as a dict or a JSON string, e.g. "
            '\'{"dtype": "bfloat16", "revision": "main"}\'.'
        },
    )
    teacher_processing_class: str | None = field(
        default=None,
        metadata={
            "help": "The teacher's own tokenizer (Hub id or local path, loaded with AutoTokenizer), for a teacher and "
            "student that do not share one (hfkd.two_tokenizers); the trainer's `teacher_processing_class=` argument "
            "takes a tokenizer instance instead. Rows then stay text (tokenize_text_column, tokenize_text_pair_column; "
            "or prompt and completion for causal LMs) and each batch carries both tokenizations and the spans between them. "
            "Causal LMs distil with the span_kd or uld terms; classifiers with logit, hidden (over spans) and the "
            "relation terms."
        },
    )
    tokenize_text_column: str = field(
        default="text",
        metadata={
            "help": "teacher_processing_class, or word augmentations (augment): the column of raw text rows that "
            "are tokenized on the fly."
        },
    )
    tokenize_text_pair_column: str | None = field(
        default=None,
        metadata={"help": "teacher_processing_class or word augmentations: the second text column of pair tasks."},
    )
    tokenize_max_length: int | None = field(
        default=None,
        metadata={
            "help": "teacher_processing_class or word augmentations: tokens per model at most for text rows (None: no cut)."
        },
    )
    teacher_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder written by `hfkd cache` (hfkd.build_teacher_cache): training reads the teacher's logits "
            "and hidden states from it and runs no teacher forward. Data, teacher (if also given) and tokenizer must "
            "be the ones it was built from. Evaluation uses the teacher if one is given, else reports the task loss."
        },
    )
    teacher_ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Self-distillation with a mean teacher (Tarvainen & Valpola, 2017): the teacher is an exponential "
            "moving average of the student with this decay in (0, 1) (the paper: 0.99, then 0.999), updated after "
            "every optimizer step, ramped as min(decay, 1 - 1/(t+1)). Give no teacher_model; it starts as a copy of "
            "the student, is saved in each checkpoint and never exported."
        },
    )
    teacher_memory_limit: str | None = field(
        default=None,
        metadata={
            "help": "The most bytes each process may give the teachers' parameters at rest, e.g. '20GB' or '8GiB' "
            "(None: no check). Checked before anything is written, against the teachers' parameter bytes as loaded, "
            "split over the processes where the run shards them (FSDP, DeepSpeed ZeRO-3: each tensor's rows, "
            "rounded up) and whole otherwise. A sharded teacher also gathers one wrapped layer at a time during its "
            "forward, which comes on top."
        },
    )
    peer_model_name_or_path: list | str | dict | None = field(  # str second: the command line passes JSON text
        default=None,
        metadata={
            "help": "Deep mutual learning (Zhang et al., 2018; hfkd.peers): peers trained beside the student, each "
            "learning from the labels and from the others, with no pre-trained teacher. Hub ids or local paths, one "
            "or a list or dict (JSON on the command line), used when no `peer_models` are given to the trainer; "
            "loaded with the Auto class of the student's task. The DML paper: temperature 1, task_weight 1, "
            "logit_weight 1. Each peer is saved in output_dir/peers/<name>."
        },
    )
    task_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of the student's own loss on the labels (0 for label-free distillation)."},
    )
    logit_weight: float = field(default=0.5, metadata={"help": "Weight of the logit (response) distillation term."})
    hidden_weight: float = field(default=0.0, metadata={"help": "Weight of the hidden-state (feature) term."})
    attention_weight: float = field(default=0.0, metadata={"help": "Weight of the attention-map term."})
    terms: list | str | None = field(
        default=None,
        metadata={
            "help": "More distillation terms, each {'name': ..., 'weight': ..., <its options>}, as a list (Python, "
            'YAML) or JSON (command line), e.g. \'[{"name": "rkd", "weight": 1.0}, {"name": "dkd", "beta": 8}]\'. '
            "Each is logged as distill/<name> and added to the loss as weight x term. hfkd.terms.TERMS lists "
            "the known names; hfkd.register_term adds your own."
        },
    )
    logit_standardize: bool = field(
        default=False,
        metadata={
            "help": "Z-score both models' logits over the classes before the temperature (Sun et al., CVPR 2024, "
            "'Logit Standardization in KD'; the paper uses temperature 2 on CIFAR-100 and a larger logit weight, e.g. "
            "9 with task weight 0.1). Needs the teacher's full logits (a top-k cache cannot serve it)."
        },
    )
    eval_with_teacher: bool = field(
        default=True,
        metadata={
            "help": "Evaluation runs the teacher too and reports every term; eval_loss is then the weighted "
            "distillation objective (what load_best_model_at_end with metric 'loss' selects by). False: evaluation "
            "runs the student alone and eval_loss is its own loss on the labels. predict() always runs the student "
            "alone."
        },
    )
    temperature: float = field(
        default=2.0,
        metadata={
            "help": "Softmax temperature of the divergence-based logit losses (> 0). Those losses are multiplied by "
            "temperature**2 so that their gradients keep the same scale across temperatures (Hinton et al., 2015)."
        },
    )
    logit_loss: str = field(
        default="kl",
        metadata={
            "help": "Logit loss: 'kl' = T^2 KL(teacher_T || student_T); 'reverse_kl' = T^2 KL(student_T || teacher_T); "
            "'jsd' = T^2 generalised Jensen-Shannon divergence with `jsd_beta`; 'mse' = mean squared error of the raw "
            "logits; or the name of a loss registered with `hfkd.losses.register_logit_loss`."
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "Interpolation of the 'jsd' logit loss in [0, 1]: 0 is forward KL, 1 is reverse KL, 0.5 the "
            "symmetric Jensen-Shannon divergence (as in GKD)."
        },
    )
    logit_chunk_size: int = field(
        default=128,
        metadata={
            "help": "Causal LMs: compute the logit term (and the student's own loss) from the two models' final hidden "
            "states and output heads this many positions at a time, so the full [batch, sequence, vocabulary] logits "
            "are never held; loss and gradients equal the full computation. 0 uses the models' full logits. Models "
            "whose head is not a plain linear layer (soft-capping, LoRA on the head), DeepSpeed and FSDP1 runs always "
            "use the full logits; under FSDP2 the heads are gathered for the chunks."
        },
    )
    hidden_loss: str = field(
        default="mse",
        metadata={"help": "Hidden-state loss per position: 'mse' (mean over features) or 'cosine' (1 - cosine)."},
    )
    hidden_layer_map: str = field(
        default="uniform",
        metadata={
            "help": "Which teacher `hidden_states` entry each student entry is matched to: 'uniform' (student entry "
            "k -> teacher entry round(k * L_teacher / L_student), embeddings to embeddings, last to last), 'last', or "
            "an explicit comma-separated list with one teacher index per student entry, e.g. '0,2,4,6' for a 3-layer "
            "student (index 0 is the embeddings output, as in transformers' `hidden_states`)."
        },
    )
    attention_loss: str = field(
        default="kl",
        metadata={
            "help": "Attention-map loss over attention probabilities: 'kl' (KL(teacher || student) per query row) "
            "or 'mse'. Needs eager attention; sdpa/flash models are switched to eager with a warning."
        },
    )
    attention_heads: str = field(
        default="auto",
        metadata={
            "help": "How attention maps are compared head by head: 'match' (head h with head h; the head counts must "
            "be equal), 'mean' (the maps averaged over heads, so any head counts work), or 'auto' (match when the "
            "counts are equal, else mean)."
        },
    )
    attention_layer_map: str = field(
        default="uniform",
        metadata={
            "help": "Which teacher `attentions` entry each student layer is matched to: 'uniform' (student layer k "
            "-> teacher layer round((k + 1) * L_teacher / L_student) - 1, last to last), 'last', or an explicit "
            "comma-separated list with one teacher layer index per student layer, e.g. '1,3,5'."
        },
    )

    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation (GKD, Agarwal et al., ICLR 2024; hfkd.on_policy): the probability in [0, 1] "
            "that a micro-batch's completions are replaced by ones the student samples from its prompts (labels -100 "
            "on the prompt) before the step; the terms are then taken on those. 0 = ordinary (off-policy) KD; TRL's "
            "GKD default is 0.5. Causal LMs only. GKD trains on the divergence alone: set task_weight=0 (and e.g. "
            "logit_loss='jsd', jsd_beta=0.5)."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD (Kim & Rush, EMNLP 2016): the micro-batches that are not on-policy get "
            "completions the teacher samples from their prompts, so the task loss learns the teacher's outputs. "
            "Causal LMs with one teacher model only."
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={
            "help": "lmbda > 0 or seq_kd: the most tokens generated per completion (>= 1; TRL's GKD default 128). "
            "Generation stops at EOS and at the models' max_position_embeddings."
        },
    )
    generation_temperature: float = field(
        default=0.9,
        metadata={
            "help": "lmbda > 0 or seq_kd: the sampling temperature of the generated completions (> 0; TRL's GKD "
            "default 0.9). Not the KD `temperature`, which softens both distributions inside the logit term."
        },
    )
    generation_top_p: float = field(
        default=1.0,
        metadata={"help": "lmbda > 0 or seq_kd: nucleus sampling of the completions, in (0, 1]; 1 = no cut."},
    )
    generation_top_k: int = field(
        default=0,
        metadata={"help": "lmbda > 0 or seq_kd: sample among the k most likely tokens only (>= 0; 0 = no cut)."},
    )

    augment: str | None = field(
        default=None,
        metadata={
            "help": "Augmentation with consistent teaching (Beyer et al., CVPR 2022; hfkd.augment): a comma-separated "
            "list of operations drawn afresh for every training batch, which the student and an online teacher "
            "(teacher model, mean teacher, peers) both see. Images (`pixel_values`): 'crop' (random resized crop), "
            "'flip' (horizontal), 'mixup', 'cutmix', e.g. 'crop,flip,mixup'. Text, word-level before tokenizing "
            "(also across two tokenizers): 'word_mask' or 'word_replace'; rows keep their raw text "
            "(tokenize_text_column) and are tokenized on the fly. Draws are seeded by (seed, step, micro-batch, "
            "process), so a resumed run sees the same views. A teacher cache cannot serve it."
        },
    )
    augment_crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0],
        metadata={
            "help": "augment 'crop': the range of the crop's share of the image area (the Inception crop's "
            "(0.08, 1), as torchvision's RandomResizedCrop); aspect ratios lie in (3/4, 4/3)."
        },
    )
    augment_mixup_alpha: float = field(
        default=0.2,
        metadata={"help": "augment 'mixup': lam ~ Beta(alpha, alpha) (> 0; Zhang et al. 2018 used 0.2 on ImageNet)."},
    )
    augment_cutmix_alpha: float = field(
        default=1.0,
        metadata={"help": "augment 'cutmix': lam ~ Beta(alpha, alpha) (> 0; Yun et al. 2019 used 1, uniform)."},
    )
    augment_word_prob: float = field(
        default=0.1,
        metadata={
            "help": "augment 'word_mask' / 'word_replace': each word's probability in [0, 1] of being masked (the "
            "student tokenizer's mask token, else its unknown token) or replaced by a word of the same batch."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Allow an output_dir that holds another run's checkpoints (they are deleted) or outputs; "
            "without it hfkd stops before writing anything there."
        },
    )

    def __post_init__(self):
        if (self.bf16 or self.bf16_full_eval) and not self.use_cpu and not _has_accelerator():
            # TrainingArguments refuses bf16 without an accelerator unless use_cpu is set, though torch runs bf16
            # autocast on the CPU. With no accelerator the run is on the CPU anyway, so use_cpu changes nothing else;
            # a GPU without bf16 support still gets transformers' own refusal.
            logger.info("bf16 on a machine without an accelerator: use_cpu=True, bf16 autocast on the CPU.")
            self.use_cpu = True
            # Not a choice of the user's: a run's saved configuration leaves it out, so that it uses a GPU elsewhere.
            self._use_cpu_for_bf16 = True
        super().__post_init__()
        # In this order: a check may rely on fields the earlier ones parsed (JSON strings, `terms`).
        self._check_teachers()
        self._check_teacher_memory_limit()
        self._check_teacher_tokenizer()
        if self.peer_model_name_or_path is not None:
            named_peers(self.peer_model_name_or_path)  # an empty or repeated entry fails here
            check_peer_settings(self, teacher_path_allowed=True)
        self._check_batch_sizes_and_weights()
        self._parse_terms()
        self._check_logit_options()
        self._check_generation()
        self._check_losses_and_layer_maps()
        self._check_augment()
        self.term_specs = self._built_in_term_specs() + self.term_specs

    def _refresh_terms(self) -> None:
        """Checks the weights, temperature, losses and `terms` again and derives `term_specs` from them anew: for
        fields set after construction, as `Trainer.hyperparameter_search` sets each trial's values on the arguments
        (DistillationTrainer calls this before it builds a trial's terms)."""
        self._check_batch_sizes_and_weights()
        self._parse_terms()
        self._check_logit_options()
        self._check_losses_and_layer_maps()
        self.term_specs = self._built_in_term_specs() + self.term_specs

    def _check_teachers(self) -> None:
        """The teacher's loading kwargs, several teachers (JSON on the command line), their combination, the EMA."""
        if isinstance(self.teacher_model_init_kwargs, str):
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"teacher_model_init_kwargs must be a dict or a JSON object string, got "
                    f"{self.teacher_model_init_kwargs!r} ({err})."
                ) from err
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ValueError(
                f"teacher_model_init_kwargs must be a dict or a JSON object string, got "
                f"{type(self.teacher_model_init_kwargs).__name__}."
            )

        for name in ("teacher_model_name_or_path", "teacher_weights", "teacher_cache_dir", "peer_model_name_or_path"):
            value = getattr(self, name)
            if isinstance(value, str) and value.strip()[:1] in ("[", "{"):  # several, as JSON on the command line
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{name} looks like JSON but is not ({err}): {value!r}.") from err
        if self.teacher_combine not in COMBINE_MODES:
            raise ValueError(f"teacher_combine must be one of {list(COMBINE_MODES)}, got {self.teacher_combine!r}.")
        if isinstance(self.teacher_model_name_or_path, (list, dict)):
            names = named_teachers(self.teacher_model_name_or_path)  # an empty or repeated entry fails here
            if self.teacher_weights is not None:
                fixed_weights(self.teacher_weights, list(names))
        decay = self.teacher_ema_decay
        if decay is not None:
            if not _is_number(decay) or not 0.0 < decay < 1.0:
                raise ValueError(
                    f"teacher_ema_decay must lie strictly between 0 and 1 (e.g. 0.999), got {decay!r}; unset it for a "
                    "frozen teacher."
                )
            if self.teacher_model_name_or_path:
                raise ValueError(
                    "teacher_ema_decay makes the teacher a moving average of the student, but "
                    f"teacher_model_name_or_path={self.teacher_model_name_or_path!r} names another teacher; set one "
                    "of them."
                )
            if self.teacher_cache_dir:
                raise ValueError(
                    "teacher_ema_decay makes the teacher change after every step, so a teacher cache (which stores "
                    "one fixed teacher's outputs) cannot stand for it; unset teacher_cache_dir or teacher_ema_decay."
                )

    def _check_teacher_memory_limit(self) -> None:
        if self.teacher_memory_limit is not None:
            from .cache import parse_size

            parse_size(self.teacher_memory_limit, "teacher_memory_limit")

    def _check_teacher_tokenizer(self) -> None:
        """tokenize_max_length, and what a teacher with its own tokenizer cannot be combined with yet."""
        cut = self.tokenize_max_length
        if cut is not None and (not isinstance(cut, int) or isinstance(cut, bool) or cut < 2):
            raise ValueError(f"tokenize_max_length must be an integer >= 2 (or None for no cut), got {cut!r}.")
        if self.teacher_processing_class is None:
            return
        for name, value in (
            ("teacher_cache_dir", self.teacher_cache_dir),
            ("peer_model_name_or_path", self.peer_model_name_or_path),
        ):
            if value:
                raise ValueError(
                    f"teacher_processing_class (a teacher with its own tokenizer) cannot be combined with {name} "
                    "yet; unset one of them."
                )
        if self.lmbda > 0 or self.seq_kd:
            raise ValueError(
                "teacher_processing_class (a teacher with its own tokenizer) cannot be combined with on-policy "
                "generation (lmbda > 0) or seq_kd yet: generated tokens would need the teacher's tokenization. "
                "Set lmbda=0 and seq_kd=False."
            )

    def _check_batch_sizes_and_weights(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}.")
        for name in ("task_weight", "logit_weight", "hidden_weight", "attention_weight"):
            value = getattr(self, name)
            if not _is_number(value) or value != value or value < 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")

    def _parse_terms(self) -> None:
        """`terms`: built-in entries set their short-form fields; the others become `term_specs`. Then the weights."""
        # Checked against the registry and each term's options now, so that a typo fails before any model loads.
        extra = parse_term_specs(self.terms)
        for spec in extra:
            if TERMS[spec.name].short_form:
                self._set_short_form(spec)
        self.term_specs = [spec for spec in extra if not TERMS[spec.name].short_form]
        self.terms = [spec.as_dict() for spec in self.term_specs] or None
        if self.total_weight == 0:
            raise ValueError(
                "task_weight, logit_weight, hidden_weight and attention_weight are all 0: nothing would be trained. "
                "Set at least one of them > 0 (defaults: task_weight=0.5, logit_weight=0.5)."
            )

    def _check_logit_options(self) -> None:
        if not _is_number(self.temperature) or not 0 < self.temperature < float("inf"):
            raise ValueError(
                f"temperature must be > 0 (and finite), got {self.temperature!r}; 1.0 leaves the logits as they are."
            )
        if not _is_number(self.jsd_beta) or not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must lie in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.jsd_beta!r}.")
        if (
            not isinstance(self.logit_chunk_size, int)
            or isinstance(self.logit_chunk_size, bool)
            or self.logit_chunk_size < 0
        ):
            raise ValueError(
                f"logit_chunk_size must be an integer >= 0 (0 = full logits), got {self.logit_chunk_size!r}."
            )

    def _check_losses_and_layer_maps(self) -> None:
        _check_choice("logit_loss", self.logit_loss, LOGIT_LOSSES)
        _check_choice("hidden_loss", self.hidden_loss, HIDDEN_LOSSES)
        _check_choice("attention_loss", self.attention_loss, ATTENTION_LOSSES)
        if self.attention_heads not in ("auto", "match", "mean"):
            raise ValueError(f"attention_heads must be 'auto', 'match' or 'mean', got {self.attention_heads!r}.")
        # Parsed here so that a typo fails before any model is loaded; lengths are checked once models are known.
        self.hidden_layer_map = parse_layer_map_spec(self.hidden_layer_map, "hidden_layer_map")
        self.attention_layer_map = parse_layer_map_spec(self.attention_layer_map, "attention_layer_map")

    def _check_augment(self) -> None:
        """The augmentation fields (hfkd.augment), and what cannot teach augmented views."""
        ops = parse_augment(self.augment)
        if isinstance(self.augment_crop_scale, (int, float)) or len(self.augment_crop_scale) != 2:
            raise ValueError(
                f"augment_crop_scale must be two numbers (low, high), e.g. [0.08, 1.0], got {self.augment_crop_scale!r}."
            )
        low, high = self.augment_crop_scale
        if not (_is_number(low) and _is_number(high) and 0 < low <= high <= 1):
            raise ValueError(
                f"augment_crop_scale must satisfy 0 < low <= high <= 1 (shares of the image area; the paper's "
                f"(0.08, 1)), got {self.augment_crop_scale!r}."
            )
        for name in ("augment_mixup_alpha", "augment_cutmix_alpha"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0 (Beta(alpha, alpha)), got {value!r}.")
        if not _is_number(self.augment_word_prob) or not 0 <= self.augment_word_prob <= 1:
            raise ValueError(f"augment_word_prob must lie in [0, 1] (e.g. 0.1), got {self.augment_word_prob!r}.")
        if not ops:
            return
        if self.teacher_cache_dir:
            raise ValueError(
                f"augment={self.augment!r} draws a new view of every batch, but a teacher cache "
                "(teacher_cache_dir) holds the teacher's outputs on one view of each row, which would teach the "
                "student about other inputs than it sees. Unset teacher_cache_dir (the teacher then runs on each "
                "augmented batch) or unset augment."
            )
        if self.lmbda > 0 or self.seq_kd:
            raise ValueError(
                f"augment={self.augment!r} with on-policy generation (lmbda > 0) or seq_kd: generated sequences "
                "replace the batches, so there is nothing to augment. Unset augment, or set lmbda=0 and seq_kd=False."
            )

    def _built_in_term_specs(self) -> list[TermSpec]:
        """Built-in terms from their short-form fields (weight > 0), in the order of their weight fields; they come
        before the other `terms`."""
        order = [f.name for f in dataclasses.fields(self)]
        return sorted(
            (
                TermSpec(name, getattr(self, cls.short_form["weight"]), self._short_form_options(cls))
                for name, cls in TERMS.items()
                if cls.short_form and getattr(self, cls.short_form["weight"]) > 0
            ),
            key=lambda spec: order.index(TERMS[spec.name].short_form["weight"]),
        )

    def _check_generation(self) -> None:
        """The fields of on-policy distillation and sequence-level KD (hfkd.on_policy)."""
        if not _is_number(self.lmbda) or not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(
                f"lmbda must lie in [0, 1] (the share of micro-batches the student generates; 0 = off-policy KD, "
                f"GKD's default 0.5), got {self.lmbda!r}."
            )
        if not isinstance(self.seq_kd, bool):
            raise ValueError(f"seq_kd must be true or false, got {self.seq_kd!r}.")
        if (
            not isinstance(self.max_new_tokens, int)
            or isinstance(self.max_new_tokens, bool)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be an integer >= 1 (e.g. 128), got {self.max_new_tokens!r}.")
        value = self.generation_temperature
        if not _is_number(value) or not 0 < value < float("inf"):
            raise ValueError(
                f"generation_temperature must be > 0 (and finite), got {value!r}; 1.0 samples from the model's own "
                "distribution, lower values come closer to greedy decoding."
            )
        if not _is_number(self.generation_top_p) or not 0.0 < self.generation_top_p <= 1.0:
            raise ValueError(f"generation_top_p must lie in (0, 1] (1 = no cut), got {self.generation_top_p!r}.")
        top_k = self.generation_top_k
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError(f"generation_top_k must be an integer >= 0 (0 = no cut), got {top_k!r}.")
        if not (self.lmbda > 0 or self.seq_kd):
            return
        which = "lmbda > 0" if self.lmbda > 0 else "seq_kd"
        if self.teacher_cache_dir:
            raise ValueError(
                f"{which} trains on sequences generated during training, which a teacher cache cannot hold (it stores "
                "the teacher's outputs on the data set as it is); unset teacher_cache_dir, or set lmbda=0 and "
                "seq_kd=False."
            )
        if self.peer_model_name_or_path is not None:
            raise ValueError(
                f"{which} with peers (deep mutual learning) is not supported: the peers would train on the student's "
                "or no teacher's generations. Unset peer_model_name_or_path, or set lmbda=0 and seq_kd=False."
            )
        if self.lmbda > 0 and self.task_weight > 0:
            logger.warning(
                "lmbda=%s with task_weight=%s: on on-policy micro-batches the task loss is the student's "
                "cross-entropy on its own samples, which reinforces them. GKD trains on the divergence alone "
                "(task_weight=0).",
                self.lmbda,
                self.task_weight,
            )

    def _set_short_form(self, spec: TermSpec) -> None:
        """A `terms` entry for a built-in term sets its short-form fields (one source of truth for the cache and the
        card); a field already set to another value than the entry's is a conflict."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        for option, value in {"weight": spec.weight, **spec.options}.items():
            name = TERMS[spec.name].short_form[option]
            current, default = getattr(self, name), fields[name].default
            if current != default and current != value:
                raise ValueError(
                    f"terms: the {spec.name!r} entry sets {option}={value!r}, but {name}={current!r} is set too; "
                    f"give it in one place ({name} is the short form of the entry's {option})."
                )
            setattr(self, name, value)

    def _short_form_options(self, cls) -> dict:
        return {option: getattr(self, name) for option, name in cls.short_form.items() if option != "weight"}

    @property
    def reads_teacher(self) -> bool:
        """Whether any configured term reads a teacher (False: every term reads the student alone, as `byot` does, and
        the trainer needs no teacher)."""
        return any(TERMS[spec.name].reads_teacher for spec in getattr(self, "term_specs", []))

    @property
    def total_weight(self) -> float:
        built_in = {cls.short_form.get("weight") for cls in TERMS.values()}
        extra = sum(spec.weight for spec in getattr(self, "term_specs", []) if not TERMS[spec.name].short_form)
        return self.task_weight + sum(getattr(self, name) for name in built_in if name) + extra


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choice(name: str, value: str, registry: dict) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a loss name (a string such as {sorted(registry)[0]!r}), got {value!r}.")
    if value not in registry:
        raise ValueError(
            f"{name}={value!r} is not known. Choose one of {sorted(registry)} or register your own loss under that "
            "name (see hfkd.losses)."
        )
