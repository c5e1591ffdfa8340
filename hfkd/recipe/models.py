"""The recipe's models: where the teacher comes from, loading it (or building it from a config), the student built
from it or loaded, and the peers of deep mutual learning."""

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoConfig,
    AutoModelForAudioClassification,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    set_seed,
)

from ..config import DistillationConfig
from ..models import check_teacher_head
from ..paths import resolve_path
from ..peers import named_peers
from ..run_folder import TEACHER_RECORD
from ..student import student_from_teacher
from .arguments import RecipeArguments, json_arg
from .preflight import reads_logits

if TYPE_CHECKING:
    from .data import RecipeData

# The Auto class that loads each task's models (the teacher, a ready student, the peers).
AUTO_CLASSES = {
    "text-classification": AutoModelForSequenceClassification,
    "image-classification": AutoModelForImageClassification,
    "causal-lm": AutoModelForCausalLM,
}
# The Auto class of a student that reads another modality than its teacher (student_modality).
STUDENT_AUTO_CLASSES = {"audio": AutoModelForAudioClassification}


def student_auto_class(recipe: RecipeArguments):
    """The Auto class that builds or loads the student: the task's, or its modality's (student_modality)."""
    if recipe.student_modality is not None:
        return STUDENT_AUTO_CLASSES[recipe.student_modality]
    return AUTO_CLASSES[recipe.task]


def read_teacher_record(folder: str | None) -> dict | None:
    """What a teacher folder written by an hfkd run says of its own making (None for any other folder)."""
    path = os.path.join(folder, TEACHER_RECORD) if folder and os.path.isdir(folder) else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


@dataclass
class TeacherLocation:
    """Where the recipe's teacher comes from, known before any model is loaded."""

    path: str | None
    """teacher_model_name_or_path with `pkg:` resolved (None: the teacher is built from teacher_config)."""
    kwargs: dict = field(default_factory=dict)
    """teacher_model_init_kwargs, their `pkg:` paths resolved."""
    record: dict | None = None
    """What the teacher folder says of its own making: a teacher fine-tuned by an earlier hfkd run (else None)."""

    @classmethod
    def from_config(cls, config: DistillationConfig) -> "TeacherLocation":
        path = resolve_path(config.teacher_model_name_or_path)
        init = dict(config.teacher_model_init_kwargs or {})
        kwargs = {k: resolve_path(v) if isinstance(v, str) else v for k, v in init.items()}
        return cls(path=path, kwargs=kwargs, record=read_teacher_record(path))

    def gguf_kwargs(self) -> dict:
        """The GGUF file to read the tokenizer and config from, when the teacher is one."""
        return {"gguf_file": self.kwargs["gguf_file"]} if "gguf_file" in self.kwargs else {}


def teacher_lineage(recipe: RecipeArguments, config: DistillationConfig, source: TeacherLocation) -> dict:
    """Where the teacher came from, following a teacher folder written by an earlier hfkd run to its origin."""
    name = config.teacher_model_name_or_path or "built from teacher_config"
    hub_id = recipe.teacher_hub_id
    if source.record is not None:  # a teacher fine-tuned by an earlier hfkd run: its own origin
        base = source.record["base"]
        return {
            "name": name,
            "hub_id": hub_id or base.get("hub_id"),
            "origin": base,
            "finetune": source.record.get("finetune"),
            "data": source.record.get("data"),
        }
    if hub_id is None and name and not name.startswith("pkg:") and not os.path.exists(name):
        hub_id = name if "/" in name or name.isidentifier() else None
    return {"name": name, "hub_id": hub_id}


def label_kwargs(task: str, labels: list[str] | None) -> dict:
    """The config fields that give a classifier the data's labels, in the data's order ({} for causal LMs)."""
    if task == "causal-lm":
        return {}
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }


def pad_like(model, task: str, tokenizer) -> None:
    """A causal LM without a pad token id pads with its tokenizer's (batches of several lengths need one)."""
    if task == "causal-lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_teacher(recipe: RecipeArguments, config: DistillationConfig, source: TeacherLocation, data: "RecipeData"):
    """The teacher as the recipe says: built from teacher_config, or loaded (a new head when it is fine-tuned)."""
    auto = AUTO_CLASSES[recipe.task]
    if recipe.teacher_config:
        spec = json_arg(recipe.teacher_config, "teacher_config")
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise ValueError("teacher_config needs a 'model_type' key, e.g. 'vit' or 'convnext'.")
        model_config = AutoConfig.for_model(model_type, **spec, **label_kwargs(recipe.task, data.labels))
        set_seed(config.seed)
        teacher = auto.from_config(model_config)
    elif source.path:
        kwargs = {**source.kwargs, **label_kwargs(recipe.task, data.labels)}
        if recipe.finetune_teacher and recipe.task != "causal-lm":
            kwargs["ignore_mismatched_sizes"] = True  # a new head for these labels, trained in stage 1
        try:
            teacher, info = auto.from_pretrained(source.path, output_loading_info=True, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load the teacher {config.teacher_model_name_or_path!r}: {err}\nCheck the id or "
                "path and your network (HF_HUB_OFFLINE=1 allows only local or cached models)."
            ) from err
        if not recipe.finetune_teacher:
            # Distilled from as loaded: a head transformers initialised at random would teach noise (and be
            # evaluated as the teacher). A teacher fine-tuned in stage 1 trains its new head first.
            readers = [spec.name for spec in config.term_specs if reads_logits(spec)]
            check_teacher_head(teacher, info, config.teacher_model_name_or_path, readers)
    else:
        raise ValueError("No teacher: set teacher_model_name_or_path or teacher_config.")
    # A GGUF checkpoint is dequantised on load into dense weights, but the model keeps its quantizer, which
    # makes Trainer refuse it and save_pretrained fail; the dense weights are all the recipe needs.
    quantizer = getattr(teacher, "hf_quantizer", None)
    if quantizer is not None and "gguf_file" in source.kwargs:
        quantizer.remove_quantization_config(teacher)
    pad_like(teacher, recipe.task, data.processor)
    return teacher


def load_saved_teacher(recipe: RecipeArguments, source: TeacherLocation, folder: str, teacher, data: "RecipeData"):
    """The teacher this run fine-tuned and saved whole in `folder`, standing in for `teacher` (the original)."""
    kwargs = {k: v for k, v in source.kwargs.items() if k != "gguf_file"}
    saved = AUTO_CLASSES[recipe.task].from_pretrained(folder, **kwargs)
    # The same teacher as before the stop (the run's checkpoints name it): the one fine-tuned from the original.
    saved.config._name_or_path = teacher.config._name_or_path
    pad_like(saved, recipe.task, data.processor)
    return saved


def _image_input_fields(processor) -> dict:
    """num_channels and image_size of the pixel values an image processor makes (the fields it does not tell: none)."""
    fields = {}
    mean = getattr(processor, "image_mean", None)
    if isinstance(mean, (list, tuple)) and mean:
        fields["num_channels"] = len(mean)
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    size = dict(size) if size is not None and not isinstance(size, int) else {"height": size}
    side = size.get("height") or size.get("shortest_edge")
    if isinstance(side, int):
        fields["image_size"] = side
    return fields


def student_model_config(recipe: RecipeArguments, config: DistillationConfig, data: "RecipeData", teacher):
    """The config of the student built from student_config: its fields as given, and what it reads from the run where
    not given (the teacher's tokenizer or image processor, the data's labels); checked before anything trains."""
    spec = json_arg(recipe.student_config, "student_config")
    model_type = spec.pop("model_type")
    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError as err:
        raise ValueError(f"student_config: model_type={model_type!r} is not known to transformers ({err}).") from None
    text = defaults.get_text_config() if hasattr(defaults, "get_text_config") else defaults
    filled = {}
    if recipe.task == "image-classification":
        inputs = _image_input_fields(data.processor)
        filled.update({k: v for k, v in inputs.items() if hasattr(defaults, k)})
    elif recipe.student_modality is not None:
        pass  # it reads its own processor's features, which student_config describes (checked by a forward)
    else:
        tokens = len(data.student_processor)
        given = spec.get("vocab_size")
        if given is not None and (not isinstance(given, int) or given < tokens):
            raise ValueError(
                f"student_config: vocab_size={given!r} is smaller than the teacher's tokenizer ({tokens} tokens), "
                "whose ids the student reads; leave vocab_size out (it defaults to the tokenizer's length) or give "
                f"at least {tokens}."
            )
        filled["vocab_size"] = tokens
        positions = getattr(teacher.config.get_text_config(), "max_position_embeddings", None)
        if hasattr(text, "max_position_embeddings") and isinstance(positions, int):
            filled["max_position_embeddings"] = positions  # the rows the teacher reads fit the student too
        if hasattr(text, "pad_token_id") and data.student_processor.pad_token_id is not None:
            filled["pad_token_id"] = data.student_processor.pad_token_id
    values = {**filled, **spec, **label_kwargs(recipe.task, data.labels)}
    try:
        return AutoConfig.for_model(model_type, **values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"student_config: {err}") from None


def make_student(recipe: RecipeArguments, config: DistillationConfig, data: "RecipeData", teacher):
    """The student as the recipe says, and how it was made; the same weights every time it is called."""
    student, note = _make_student(recipe, config, data, teacher)
    if data.cross_modal:
        note += (
            f"; it reads {recipe.student_modality} through its own {type(data.student_processor).__name__} while the "
            "teacher reads the same rows' text (cross-modal distillation, hfkd.cross_modal)"
        )
    return student, note


def _make_student(recipe: RecipeArguments, config: DistillationConfig, data: "RecipeData", teacher):
    r = recipe
    if r.student_config:
        model_config = student_model_config(r, config, data, teacher)
        set_seed(config.seed)  # random weights, the same at each call: the labels-only student starts from them too
        student = student_auto_class(r).from_config(model_config)
        pad_like(student, r.task, data.processor)
        text = model_config.get_text_config()
        width = getattr(text, "hidden_size", None) or getattr(text, "hidden_sizes", None)
        depth = _num_layers(student)
        note = (
            f"built from student_config: {model_config.model_type}, {depth} layer{'' if depth == 1 else 's'}, "
            f"hidden {width}, "
            f"{sum(p.numel() for p in student.parameters()):,} params, random init (seed {config.seed})"
        )
        return student, note
    if r.student_model_name_or_path:
        path = resolve_path(r.student_model_name_or_path)
        set_seed(config.seed)  # a head the checkpoint lacks starts the same way each time
        student = student_auto_class(r).from_pretrained(path, **label_kwargs(r.task, data.labels))
        note = f"`{r.student_model_name_or_path}`"
        if data.across:
            if student.config.pad_token_id is None:
                student.config.pad_token_id = data.student_processor.pad_token_id
            note += (
                f", with its own tokenizer ({len(data.student_processor):,} tokens; the teacher's has "
                f"{len(data.processor):,}), saved with it: distillation read the text tokenized for both and "
                "lined up by character spans (hfkd.two_tokenizers)"
            )
        return student, note
    layers = r.layer_list()
    student = student_from_teacher(teacher, num_layers=None if layers else r.student_num_layers, layers=layers)
    kept = layers or "evenly spread, first and last kept"
    note = (
        f"{type(student).__name__} built from the teacher's own embeddings, head and layers ({kept}); "
        f"{_num_layers(student)} of the teacher's {_num_layers(teacher)} layers"
    )
    return student, note


def check_student_processor(recipe: RecipeArguments, data: "RecipeData", student_config=None) -> None:
    """A student that reads another modality (student_modality): its processor must make what it reads. Checked by
    name, then by a forward of a student with the same config on one held-out row, before stage 1."""
    if not data.cross_modal:
        return
    from transformers import DataCollatorWithPadding

    from ..cross_modal import check_processor

    auto = student_auto_class(recipe)
    if student_config is None:
        student_config = AutoConfig.from_pretrained(resolve_path(recipe.student_model_name_or_path))
        student_config = AutoConfig.for_model(
            student_config.model_type, **{**student_config.to_dict(), **label_kwargs(recipe.task, data.labels)}
        )
    try:
        student = auto.from_config(student_config)
    except ValueError as err:
        raise ValueError(
            f"student_modality={recipe.student_modality!r}: {auto.__name__} has no model for the student's config "
            f"({student_config.model_type}): {err}"
        ) from None
    check_processor(data.student_processor, student, "student", "student_processor")
    batch = DataCollatorWithPadding(data.student_processor)([data.student_eval_ds[0]])
    batch.pop("labels", None)
    try:
        with torch.no_grad():
            student.eval()(**batch)
    except Exception as err:  # noqa: BLE001 - any failure means the features do not fit the student
        raise ValueError(
            f"student_processor ({type(data.student_processor).__name__}) makes inputs the student "
            f"({type(student).__name__}) cannot read: {str(err).strip().splitlines()[0]} Give student_processor the "
            "student's own feature extractor (its feature_size, window or sampling rate must match student_config)."
        ) from None


def _num_layers(model) -> int | str:
    config = model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    depths = getattr(config, "depths", None)
    return sum(depths) if depths else "?"


def load_peers(
    recipe: RecipeArguments, config: DistillationConfig, data: "RecipeData"
) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """The peers of deep mutual learning by name, and each one's source as given ({} without peers). Each is loaded
    with the task's Auto class and the run's labels; peer i is seeded with seed + 1 + i, so that heads a checkpoint
    lacks start differently in each peer and the student."""
    peers, sources = {}, {}
    if config.peer_model_name_or_path is None:
        return peers, sources
    auto = AUTO_CLASSES[recipe.task]
    for i, (name, source) in enumerate(named_peers(config.peer_model_name_or_path).items()):
        set_seed(config.seed + 1 + i)
        try:
            peer = auto.from_pretrained(resolve_path(source), **label_kwargs(recipe.task, data.labels))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"Could not load the peer {name!r} ({source!r}) with {auto.__name__}: {err}\nA peer must solve the "
                "recipe's task with its tokenizer or processor and labels; check peer_model_name_or_path."
            ) from err
        pad_like(peer, recipe.task, data.processor)
        peers[name], sources[name] = peer, source
    return peers, sources
