"""Loading and preparing the teacher: frozen, in eval mode, placed by Accelerate."""

import copy
import inspect
import logging

import torch
from transformers import AutoModel, PreTrainedModel
from transformers.models.auto import modeling_auto

logger = logging.getLogger(__name__)

# Auto class per task, in the order a student class is looked up; the teacher is loaded for the student's task.
_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", "AutoModelForMultipleChoice"),
)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def auto_class_for(student: torch.nn.Module):
    """The transformers Auto class for the student's task, used to load a teacher by name."""
    import transformers

    name = type(unwrap_peft(student)).__name__
    for mapping_name, auto_name in _AUTO_CLASSES:
        mapping = getattr(modeling_auto, mapping_name)
        if any(name == v or (not isinstance(v, str) and name in v) for v in mapping.values()):
            return getattr(transformers, auto_name)
    return AutoModel


def load_teacher(
    name_or_path: str, student: torch.nn.Module | None, init_kwargs: dict | None, role: str = "teacher"
) -> PreTrainedModel:
    """Loads the teacher (or a peer: `role`) from the Hub or a local folder with the Auto class of the student's
    task."""
    return load_teacher_with_info(name_or_path, student, init_kwargs, role)[0]


def load_teacher_with_info(
    name_or_path: str, student: torch.nn.Module | None, init_kwargs: dict | None, role: str = "teacher"
) -> tuple[PreTrainedModel, dict]:
    """`load_teacher`, and transformers' loading info (`missing_keys`, `mismatched_keys`, ...: the weights it
    initialised instead of loading, see `newly_initialised`)."""
    if student is None:
        raise ValueError(
            "teacher_model_name_or_path needs the student to pick the teacher's Auto class; pass `model=` or give "
            "`teacher_model=` as a model instance."
        )
    kwargs = dict(init_kwargs or {})
    kwargs.pop("output_loading_info", None)  # asked for below
    dtype = kwargs.get("dtype", kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"teacher_model_init_kwargs['dtype']={dtype!r} is not a torch dtype (e.g. 'bfloat16').")
        kwargs["dtype"] = getattr(torch, dtype)
    elif dtype is not None:
        kwargs["dtype"] = dtype
    auto_cls = auto_class_for(student)
    try:
        return auto_cls.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        # RuntimeError: a head of another size without ignore_mismatched_sizes=True.
        raise ValueError(
            f"Could not load the {role} {name_or_path!r} with {auto_cls.__name__}: {err}\nCheck the Hub id or "
            "path, your network (HF_HUB_OFFLINE=1 allows only cached models) and `teacher_model_init_kwargs`."
        ) from err


def newly_initialised(model: torch.nn.Module, loading_info: dict | None) -> tuple[list[str], list[str]]:
    """The weights `from_pretrained` initialised at random instead of loading (missing from the checkpoint, or of
    another shape there with `ignore_mismatched_sizes=True`), as (head keys, other keys): head keys lie outside the
    base model (`classifier.*`, `score.*`, `lm_head.*`: what the logits come from). A model that is its own base
    model has no head keys."""
    info = loading_info or {}
    keys = set(info.get("missing_keys") or ())
    keys.update(entry[0] if isinstance(entry, (tuple, list)) else entry for entry in info.get("mismatched_keys") or ())
    base = unwrap_peft(model)
    prefix = getattr(base, "base_model_prefix", "") or ""
    has_head = bool(prefix) and isinstance(getattr(base, prefix, None), torch.nn.Module)
    head = sorted(k for k in keys if has_head and not k.startswith(prefix + "."))
    return head, sorted(k for k in keys if k not in head)


def check_teacher_head(
    model: torch.nn.Module, loading_info: dict | None, source: str, readers: list[str], role: str = "teacher"
) -> None:
    """Refuses a teacher whose output head was initialised at random on loading when terms (`readers`) read its
    logits: they would teach noise. Weights initialised elsewhere in the model get a warning."""
    head, other = newly_initialised(model, loading_info)
    if other:
        logger.warning(
            "The %s %r was loaded with %d weights initialised at random, not from the checkpoint (e.g. %s): the "
            "features they compute are noise until trained.",
            role,
            source,
            len(other),
            ", ".join(other[:3]),
        )
    if head and readers:
        raise ValueError(
            f"The {role} {source!r} ({type(unwrap_peft(model)).__name__}) has an output head that transformers "
            f"initialised at random on loading ({', '.join(head)}: missing from the checkpoint, or of another size, "
            f"e.g. through num_labels), and the terms {readers} read its logits: they would teach noise. Fine-tune "
            "the teacher on the task first (with `hfkd distill`: --finetune_teacher true) and distil from that "
            "checkpoint, or pass one whose head is trained for these labels."
        )


def ensure_eager_attention(model: torch.nn.Module, role: str) -> None:
    """Attention maps exist only with eager attention: switch sdpa/flash models to eager, or fail clearly."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current == "eager":
        return
    if not isinstance(base, PreTrainedModel):
        raise ValueError(
            f"attention_weight > 0 needs attention maps, but the {role} is not a transformers model hfkd can switch "
            "to eager attention. Return `attentions` from it yourself or set attention_weight=0."
        )
    logger.warning(
        "The %s runs %r attention, which returns no attention maps; switching it to 'eager' for attention_weight "
        "> 0 (slower and heavier; load it with attn_implementation='eager' to silence this).",
        role,
        current,
    )
    try:
        base.set_attn_implementation("eager")
    except Exception as err:  # noqa: BLE001 - any failure here means the term cannot be computed
        raise ValueError(
            f"attention_weight > 0 needs eager attention, and the {role} ({type(base).__name__}) cannot switch to it: "
            f"{err}. Set attention_weight=0."
        ) from err


def prepare_teacher(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Freezes the teacher and places it as Accelerate intends (its own engine under DeepSpeed)."""
    teacher.requires_grad_(False)
    teacher.eval()
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        return _prepare_deepspeed(teacher, accelerator)
    if accelerator.is_fsdp2:
        # FSDP2 shards through accelerate.prepare (prepare_model refuses it): the teacher is sharded by the same
        # plugin as the student, each process holding its share of the teacher's parameters.
        from .sharding import prepare_sharded

        return prepare_sharded(teacher, accelerator)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


def _prepare_deepspeed(teacher: torch.nn.Module, accelerator) -> torch.nn.Module:
    # The teacher gets an inference engine of its own: under ZeRO-3 its weights are sharded like the student's,
    # under ZeRO-1/2 (which shard only optimizer state and gradients, which a teacher lacks) it is replicated.
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if stage != 3:
        config["zero_optimization"] = {"stage": 0}
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine


# Batch keys that hold a model's main input, for modules whose forward takes it positionally (`forward(self, x)`).
_MAIN_INPUTS = ("pixel_values", "input_ids", "inputs_embeds", "input_values", "input_features")


def forward_keywords(model: torch.nn.Module) -> tuple[frozenset[str], bool]:
    """The parameter names of `model.forward`, and whether it also takes **kwargs (True when its signature cannot
    be read: then everything is passed, as to a transformers model)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return frozenset(), True
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return frozenset(parameters), takes_kwargs


def call_model(model: torch.nn.Module, inputs: dict, extra: dict | None = None):
    """Runs `model` on a batch: keyword arguments for transformers models, the main input alone for a plain
    `nn.Module` whose forward takes one tensor (a timm-style CNN). Flags it does not accept are left out."""
    extra = extra or {}
    base = unwrap_peft(model.module if hasattr(model, "module") and not hasattr(model, "config") else model)
    parameters, takes_kwargs = forward_keywords(base)
    if takes_kwargs or set(inputs) <= set(parameters):
        return model(**inputs, **{k: v for k, v in extra.items() if takes_kwargs or k in parameters})
    main = next((key for key in _MAIN_INPUTS if key in inputs), None)
    if main is None:
        raise ValueError(
            f"{type(base).__name__}.forward takes {list(parameters)} but the batch holds {sorted(inputs)}; give the "
            "model a forward that takes the batch's keys, or one input named like pixel_values or input_ids."
        )
    return model(inputs[main])


def accepts_loss_kwargs(model: torch.nn.Module) -> bool:
    """Whether Trainer would pass `num_items_in_batch` to this model's forward (its own rule, for a peer)."""
    declared = getattr(model, "accepts_loss_kwargs", None)
    if declared is not None:
        return bool(declared)
    return forward_keywords(model)[1]


def output_value(outputs, key: str):
    """`outputs[key]` of a ModelOutput or dict, or the attribute of another output; None where absent."""
    if isinstance(outputs, dict):
        return outputs.get(key)
    return getattr(outputs, key, None)


_ATTENTION_DROPOUT_FIELDS = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop", "dropout_rate")


def warn_attention_dropout(model: torch.nn.Module) -> None:
    # Eager attention returns its maps *after* dropout, so in training the student's maps carry zeros and rescaled
    # entries that the teacher's lack; the attention term then measures dropout noise as much as disagreement.
    config = getattr(model, "config", None)
    for name in _ATTENTION_DROPOUT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and value > 0:
            logger.warning(
                "A term reads attention maps and the student has %s=%s: its attention maps are taken after dropout "
                "in training, which inflates such terms. Build the student with %s=0 for clean maps.",
                name,
                value,
                name,
            )
            return
