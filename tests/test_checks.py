"""Bad input gets a clear error before the first training step, and nothing is written to output_dir.

One test per kind of bad input: each asserts the exception type, that the message names the field or argument and
the fix, that no training step ran, and that output_dir was neither created nor changed. A property-based test then
draws valid and invalid DistillationConfig values on a fixed tiny BERT pair: valid ones train one step with a finite
loss, invalid ones raise ValueError or TypeError, never anything else.
"""

import copy
import math
import os

import datasets
import numpy as np
import pytest
import tiny_models
import torch
import transformers
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from tiny_models import (
    NUM_LABELS,
    VOCAB_SIZE,
    bert_with,
    image_dataset,
    text_dataset,
    tiny_bert,
    tiny_resnet,
    tiny_vit,
    vit_with,
)
from transformers import BertConfig, BertForSequenceClassification

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.losses import ATTENTION_LOSSES, HIDDEN_LOSSES, LOGIT_LOSSES

COMMON = {
    "report_to": [],
    "use_cpu": True,
    "disable_tqdm": True,
    "save_strategy": "no",
    "seed": 0,
    "max_steps": 1,
    "per_device_train_batch_size": 2,
}


# ---------------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread is several times faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bert_pair():
    """(teacher, student): BERT sequence classifiers, 32 wide / 4 layers and 16 wide / 2 layers, 2 heads each."""
    return tiny_models.teacher_student_pair("bert_sequence")


@pytest.fixture
def steps(monkeypatch):
    """Counts training steps of any Trainer (hfkd's or a recipe's plain one)."""
    calls = []

    def counting(original):
        def training_step(self, *args, **kwargs):
            calls.append(type(self).__name__)
            return original(self, *args, **kwargs)

        return training_step

    originals = {cls: cls.training_step for cls in (DistillationTrainer, transformers.Trainer)}
    for cls, original in originals.items():
        monkeypatch.setattr(cls, "training_step", counting(original))
    return calls


def _snapshot(path) -> tuple[bool, list]:
    if not os.path.exists(path):
        return False, []
    return True, sorted(
        (os.path.relpath(os.path.join(root, name), path), os.path.getmtime(os.path.join(root, name)))
        for root, dirs, files in os.walk(path)
        for name in dirs + files
    )


def expect_error(build, exc_type, *fragments, out, steps):
    """Runs `build` (which may create a trainer and train); it must fail with `exc_type` before any step, with a
    message holding every fragment, leaving `out` as it was. Returns the message."""
    before = _snapshot(out)
    with pytest.raises(exc_type) as info:
        result = build()
        if isinstance(result, DistillationTrainer):
            result.train()
    message = str(info.value)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert steps == [], f"training steps ran before the error: {steps}"
    assert _snapshot(out) == before, f"output_dir {out} changed"
    if not before[0]:
        assert not os.path.exists(out)
    return message


def trainer(out, student, teacher, data, data_collator=None, eval_dataset=None, **config):
    args = DistillationConfig(output_dir=str(out), **{**COMMON, **config})
    return DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=data,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
    )


def list_collator(features):
    """A custom collator: hfkd cannot predict its output from the columns, so only the probe batch is checked."""
    return {key: torch.tensor([f[key] for f in features]) for key in features[0]}


# ---------------------------------------------------------------------------------------------------- models
def test_vocabulary_mismatch_with_a_logit_term(tmp_path, steps):
    teacher, student = tiny_bert("mlm", 32, 4, seed=0), bert_with("mlm", vocab=80)
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, text_dataset("mlm", 4)),
        ValueError,
        "logit_weight > 0",
        "same vocabulary: the student has 80 outputs, the teacher 100",
        "logit_weight=0",
        out=tmp_path / "out",
        steps=steps,
    )


def test_num_labels_mismatch(tmp_path, steps, bert_pair):
    teacher, _ = bert_pair
    expect_error(
        lambda: trainer(tmp_path / "out", bert_with(labels=2), teacher, text_dataset("sequence", 4)),
        ValueError,
        "same number of labels: the student has 2 outputs, the teacher 3",
        "logit_weight=0",
        out=tmp_path / "out",
        steps=steps,
    )


@pytest.mark.parametrize(
    "config,fragments",
    [
        ({"hidden_weight": 1.0, "hidden_layer_map": "0,4"}, ["hidden_layer_map has 2 entries", "3 hidden_states"]),
        ({"hidden_weight": 1.0, "hidden_layer_map": "0,2,9"}, ["hidden_layer_map refers to teacher index 9", "0..4"]),
        (
            {"attention_weight": 1.0, "attention_layer_map": "1,2,3"},
            ["attention_layer_map has 3 entries", "'uniform'"],
        ),
        ({"attention_weight": 1.0, "attention_layer_map": "1,4"}, ["attention_layer_map refers to teacher index 4"]),
    ],
)
def test_layer_map_out_of_range_or_of_the_wrong_length(tmp_path, steps, bert_pair, config, fragments):
    teacher, student = bert_pair
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, text_dataset("sequence", 4), **config),
        ValueError,
        *fragments,
        out=tmp_path / "out",
        steps=steps,
    )


class _NoEagerBert(BertForSequenceClassification):
    def set_attn_implementation(self, attn_implementation):
        raise ValueError(f"{type(self).__name__} does not support {attn_implementation!r} attention")


class _Wrapped(torch.nn.Module):
    """A plain torch module around a transformers model: hfkd cannot switch its attention."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


@pytest.mark.parametrize("kind", ["cannot_switch", "not_a_transformers_model"])
def test_attention_term_with_attention_that_cannot_be_made_eager(tmp_path, steps, bert_pair, kind):
    teacher, _ = bert_pair
    if kind == "cannot_switch":
        torch.manual_seed(1)
        config = BertConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
            num_labels=NUM_LABELS,
            attn_implementation="sdpa",
        )
        student, fragments = _NoEagerBert(config), ["cannot switch to it", "attention_weight=0"]
    else:
        student, fragments = _Wrapped(bert_with()), ["not a transformers model", "attention_weight=0"]
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, text_dataset("sequence", 4), attention_weight=1.0),
        ValueError,
        "attention_weight > 0",
        *fragments,
        out=tmp_path / "out",
        steps=steps,
    )


def test_attention_head_mismatch(tmp_path, steps, bert_pair):
    teacher, _ = bert_pair
    expect_error(
        lambda: trainer(
            tmp_path / "out",
            bert_with(heads=4),
            teacher,
            text_dataset("sequence", 4),
            attention_weight=1,
            attention_heads="match",
        ),
        ValueError,
        "Attention maps differ in shape",
        "same number of heads",
        "attention_weight=0",
        out=tmp_path / "out",
        steps=steps,
    )


def test_feature_shapes_no_projector_can_bridge(tmp_path, steps):
    # A ViT student gives token features [batch, tokens, width], a ResNet teacher conv maps [batch, c, h, w].
    teacher, student = tiny_resnet((16, 32, 64), seed=0), tiny_vit(16, 2, seed=1)
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, image_dataset(4, 16), hidden_weight=1.0),
        ValueError,
        "hidden_layer_map pairs features no projection can bridge",
        "hidden_weight=0",
        out=tmp_path / "out",
        steps=steps,
    )


# ---------------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_temperature_not_above_zero(tmp_path, steps, temperature):
    expect_error(
        lambda: DistillationConfig(output_dir=str(tmp_path / "out"), temperature=temperature, **COMMON),
        ValueError,
        "temperature must be > 0",
        out=tmp_path / "out",
        steps=steps,
    )


@pytest.mark.parametrize("name", ["task_weight", "logit_weight", "hidden_weight", "attention_weight"])
def test_negative_weight(tmp_path, steps, name):
    expect_error(
        lambda: DistillationConfig(output_dir=str(tmp_path / "out"), **{name: -0.5}, **COMMON),
        ValueError,
        f"{name} must be a finite number >= 0, got -0.5",
        out=tmp_path / "out",
        steps=steps,
    )


def test_every_weight_zero(tmp_path, steps):
    expect_error(
        lambda: DistillationConfig(output_dir=str(tmp_path / "out"), task_weight=0.0, logit_weight=0.0, **COMMON),
        ValueError,
        "are all 0: nothing would be trained",
        "Set at least one of them > 0",
        out=tmp_path / "out",
        steps=steps,
    )


# ---------------------------------------------------------------------------------------------------- the teacher
@pytest.mark.parametrize(
    "name,fragments",
    [
        ("no-such-org/no-such-teacher", ["Check the Hub id or path", "HF_HUB_OFFLINE=1"]),
        ("missing-local-folder", ["there is no such folder", "Check the path given as teacher_model"]),
        ("empty-local-folder", ["Check the Hub id or path"]),
    ],
)
def test_teacher_that_cannot_be_loaded_offline(tmp_path, steps, name, fragments):
    if name == "empty-local-folder":
        (tmp_path / name).mkdir()
    name = str(tmp_path / name) if "local" in name else name
    expect_error(
        lambda: trainer(tmp_path / "out", bert_with(), name, text_dataset("sequence", 4)),
        ValueError,
        f"Could not load the teacher {name!r}",
        *fragments,
        out=tmp_path / "out",
        steps=steps,
    )


def test_teacher_of_the_wrong_type(tmp_path, steps):
    expect_error(
        lambda: trainer(tmp_path / "out", bert_with(), 42, text_dataset("sequence", 4)),
        TypeError,
        "teacher_model must be a model (torch.nn.Module), a Hub id or a local path, got int",
        out=tmp_path / "out",
        steps=steps,
    )


# ---------------------------------------------------------------------------------------------------- data: recipe
WORDS = "good bad fine great awful okay the a movie film was very not".split()


@pytest.fixture(scope="module")
def recipe_files(tmp_path_factory):
    """A tiny BERT teacher with its tokenizer, a labelled CSV and an image folder, on disk."""
    from PIL import Image
    from transformers import BertTokenizerFast

    root = tmp_path_factory.mktemp("recipe_files")
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    # vocab_file= builds an empty vocabulary in transformers 5; vocab= reads the file.
    tokenizer = BertTokenizerFast(vocab=str(root / "vocab.txt"))
    names = ["negative", "neutral", "positive"]
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    BertForSequenceClassification(config).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    rows = ["text,sentiment"] + [
        f"{WORDS[i % len(WORDS)]} {WORDS[(i * 3) % len(WORDS)]},{names[i % 3]}" for i in range(24)
    ]
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "no_text.csv").write_text("\n".join(["text,sentiment"] + [f",{names[i % 3]}" for i in range(24)]) + "\n")
    for label in ("dark", "light"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(4):
            pixels = np.full((8, 8), 40 if label == "dark" else 200, dtype="uint8")
            Image.fromarray(pixels, mode="L").save(root / "images" / label / f"{i}.png")
    return root


def _run_recipe(out, **fields):
    from hfkd.data import DataArguments
    from hfkd.recipe import RecipeArguments, run_recipe

    recipe_fields = {k: fields.pop(k) for k in list(fields) if k in RecipeArguments.__dataclass_fields__}
    data_fields = {k: fields.pop(k) for k in list(fields) if k in DataArguments.__dataclass_fields__}
    recipe = RecipeArguments(student_num_layers=1, **recipe_fields)
    data_args = DataArguments(**data_fields)
    config = DistillationConfig(output_dir=str(out), **{**COMMON, **fields})
    return run_recipe(recipe, data_args, config)


@pytest.mark.parametrize(
    "field,fragment",
    [
        ({"text_column": "sentence"}, "text_column='sentence' is not a column of the data set"),
        ({"label_column": "label"}, "label_column='label' is not a column of the data set"),
        ({"image_column": "img"}, "image_column='img' is not a column of the data set"),
    ],
)
def test_data_set_missing_its_text_label_or_image_column(tmp_path, steps, recipe_files, field, fragment):
    if "image_column" in field:
        vit = {"model_type": "vit", "image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 16}
        fields = {
            "task": "image-classification",
            "teacher_config": str(vit).replace("'", '"'),
            "image_processor_kwargs": '{"size": {"height": 8, "width": 8}, "image_mean": [0.5], "image_std": [0.5]}',
            "dataset_name": "imagefolder",
            "data_files": str(recipe_files / "images" / "**"),
            "eval_fraction": 0.25,
        }
    else:
        fields = {
            "teacher_model_name_or_path": str(recipe_files / "teacher"),
            "dataset_name": "csv",
            "data_files": str(recipe_files / "data.csv"),
            "text_column": "text",
            "label_column": "sentiment",
        }
    fields.update(field)
    expect_error(
        lambda: _run_recipe(tmp_path / "out", **fields),
        ValueError,
        fragment,
        f"set --{next(iter(field))} to the right one",
        out=tmp_path / "out",
        steps=steps,
    )


def test_recipe_data_empty_once_rows_without_text_are_dropped(tmp_path, steps, recipe_files):
    expect_error(
        lambda: _run_recipe(
            tmp_path / "out",
            teacher_model_name_or_path=str(recipe_files / "teacher"),
            dataset_name="csv",
            data_files=str(recipe_files / "no_text.csv"),
            label_column="sentiment",
        ),
        ValueError,
        "No row has both a 'text' text (text_column) and a 'sentiment' label (label_column)",
        out=tmp_path / "out",
        steps=steps,
    )


# ---------------------------------------------------------------------------------------------------- data: trainer
@pytest.mark.parametrize("which", ["train_dataset", "eval_dataset"])
@pytest.mark.parametrize("weights", [{}, {"task_weight": 1.0, "logit_weight": 0.0}], ids=["distil", "task_only"])
def test_empty_data_set(tmp_path, steps, bert_pair, which, weights):
    teacher, student = bert_pair
    empty, full = text_dataset("sequence", 4).select([]), text_dataset("sequence", 4)
    data, held_out = (empty, full) if which == "train_dataset" else (full, empty)
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data, eval_dataset=held_out, **weights),
        ValueError,
        f"{which} is empty (0 rows)",
        "Check the split",
        out=tmp_path / "out",
        steps=steps,
    )


def test_missing_label_column_when_the_task_loss_is_on(tmp_path, steps, bert_pair):
    teacher, student = bert_pair
    data = text_dataset("sequence", 4).remove_columns("labels")
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data),
        ValueError,
        "task_weight > 0 needs labels, but train_dataset has no label column",
        "set task_weight=0 for label-free distillation",
        out=tmp_path / "out",
        steps=steps,
    )


def test_missing_image_column(tmp_path, steps):
    teacher, student = tiny_vit(32, 4, seed=0), tiny_vit(16, 2, seed=1)
    data = image_dataset(4, 16).rename_column("pixel_values", "image")
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data),
        ValueError,
        "The student (ViTForImageClassification) needs `pixel_values`, but train_dataset has no such column",
        "image_column",
        out=tmp_path / "out",
        steps=steps,
    )


def _labels_at(data, row, value):
    labels = list(data["labels"])
    labels[row] = value
    return data.remove_columns("labels").add_column("labels", labels)


@pytest.mark.parametrize(
    "where,weights",
    [
        ("whole_train_set", {}),  # row 7: beyond the probe's two rows, found by scanning the column
        ("whole_train_set", {"task_weight": 1.0, "logit_weight": 0.0}),  # no teacher forward, still checked
        ("probe_batch", {}),  # a custom collator: the collated first batch is checked
    ],
)
def test_labels_out_of_range(tmp_path, steps, bert_pair, where, weights):
    teacher, student = bert_pair
    data = text_dataset("sequence", 8)
    if where == "whole_train_set":
        data = _labels_at(data, 7, 5).shuffle(seed=0)  # behind an index: the exact pass confirms the bad row
        collator, place = None, "Column 'labels' in train_dataset holds 5"
    else:
        data, collator, place = _labels_at(data, 0, 5), list_collator, "labels in the first batch holds 5"
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data, data_collator=collator, **weights),
        ValueError,
        place,
        "predicts 3 classes (config.num_labels=3): labels must lie in 0..2",
        "Re-encode the labels",
        out=tmp_path / "out",
        steps=steps,
    )


@pytest.mark.parametrize("where", ["whole_train_set", "probe_batch"])
def test_sequences_longer_than_the_models_positions(tmp_path, steps, bert_pair, where):
    teacher, student = bert_pair  # both have max_position_embeddings=32
    if where == "whole_train_set":
        short, long = text_dataset("sequence", 7), text_dataset("sequence", 1, seq_len=40)
        data = datasets.concatenate_datasets([short, long])  # the long row is the last one
        collator, place = None, "Column 'input_ids' in train_dataset is 40 tokens long"
    else:

        def collator(features):  # pads every batch to 40 tokens
            batch = list_collator(features)
            pad = 40 - batch["input_ids"].shape[1]
            for key in ("input_ids", "attention_mask"):
                batch[key] = torch.nn.functional.pad(batch[key], (0, pad))
            return batch

        data, place = text_dataset("sequence", 4), "input_ids in the first batch is 40 tokens long"
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data, data_collator=collator),
        ValueError,
        place,
        "only 32 positions (config.max_position_embeddings)",
        "truncation=True, max_length=32",
        out=tmp_path / "out",
        steps=steps,
    )


def test_token_ids_beyond_the_vocabulary(tmp_path, steps, bert_pair):
    teacher, student = bert_pair
    data = text_dataset("sequence", 4)
    ids = [list(row) for row in data["input_ids"]]
    ids[3][2] = VOCAB_SIZE + 7
    data = data.remove_columns("input_ids").add_column("input_ids", ids)
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data),
        ValueError,
        f"Column 'input_ids' in train_dataset holds token id {VOCAB_SIZE + 7}",
        f"vocabulary of {VOCAB_SIZE}",
        "teacher_input_ids",
        out=tmp_path / "out",
        steps=steps,
    )


@pytest.mark.parametrize(
    "student_kwargs,fragment",
    [
        ({"image_size": 32}, "The student (ViTForImageClassification) takes 32x32 images with 3 channels and the "),
        ({"num_channels": 1}, "takes 16x16 images with 1 channel and the teacher"),
    ],
)
def test_teacher_and_student_images_differ_without_teacher_pixel_values(tmp_path, steps, student_kwargs, fragment):
    teacher, student = tiny_vit(32, 4, seed=0), vit_with(**student_kwargs)
    size, channels = student_kwargs.get("image_size", 16), student_kwargs.get("num_channels", 3)
    data = image_dataset(4, size)
    if channels == 1:
        data = data.map(lambda row: {"pixel_values": row["pixel_values"][:1]})
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data),
        ValueError,
        fragment,
        "Add a `teacher_pixel_values` column preprocessed with the teacher's image processor",
        out=tmp_path / "out",
        steps=steps,
    )


@pytest.mark.parametrize(
    "case,fragments",
    [
        (
            "channels",
            [
                "pixel_values in the first batch have 1 channel, but the student",
                "takes 3 channels (config.num_channels)",
            ],
        ),
        (
            "size",
            ["pixel_values in the first batch are 32x32, but the student", "takes 16x16 images (config.image_size)"],
        ),
    ],
)
def test_images_the_models_cannot_take(tmp_path, steps, case, fragments):
    teacher, student = tiny_vit(32, 4, seed=0), tiny_vit(16, 2, seed=1)
    data = image_dataset(4, 32 if case == "size" else 16)
    if case == "channels":
        data = data.map(lambda row: {"pixel_values": row["pixel_values"][:1]})
    expect_error(
        lambda: trainer(tmp_path / "out", student, teacher, data),
        ValueError,
        *fragments,
        "image processor" if case == "size" else "convert them to RGB",
        out=tmp_path / "out",
        steps=steps,
    )


def test_teacher_pixel_values_make_different_image_sizes_work(tmp_path):
    """The fix the message names: the teacher gets its own `teacher_pixel_values`."""
    teacher, student = tiny_vit(32, 4, seed=0), vit_with(image_size=32)
    data = image_dataset(4, 32).add_column("teacher_pixel_values", image_dataset(4, 16)["pixel_values"])
    result = trainer(tmp_path / "out", student, teacher, data).train()
    assert math.isfinite(result.training_loss)


def _with_transform_images():
    """Images turned into pixel_values on the fly (set_transform), as transformers' image examples do."""
    raw = image_dataset(4, 16).rename_column("pixel_values", "image")

    def transform(batch):
        return {"pixel_values": torch.tensor(batch["image"]), "labels": batch["labels"]}

    return raw.with_transform(transform)


@pytest.mark.parametrize(
    "case", ["with_transform", "unlabelled_eval_set", "label_free_with_odd_labels", "bad_row_left_out_by_select"]
)
def test_valid_inputs_pass_the_checks(tmp_path, bert_pair, case):
    """No false alarms: columns made on the fly, an eval set without labels, labels unused without the task loss."""
    if case == "with_transform":
        teacher, student = tiny_vit(32, 4, seed=0), tiny_vit(16, 2, seed=1)
        run = trainer(tmp_path / "out", student, teacher, _with_transform_images(), remove_unused_columns=False)
    elif case == "unlabelled_eval_set":
        teacher, student = bert_pair
        held_out = text_dataset("sequence", 4).remove_columns("labels")
        run = trainer(
            tmp_path / "out", copy.deepcopy(student), teacher, text_dataset("sequence", 4), eval_dataset=held_out
        )
    elif case == "bad_row_left_out_by_select":  # the stored table still holds the bad row; the data set does not
        teacher, student = bert_pair
        data = _labels_at(text_dataset("sequence", 8), 5, 7).select([0, 1, 2, 3])
        run = trainer(tmp_path / "out", copy.deepcopy(student), teacher, data)
    else:
        teacher, student = bert_pair
        data = _labels_at(text_dataset("sequence", 4), 0, 7)
        run = trainer(tmp_path / "out", copy.deepcopy(student), teacher, data, task_weight=0.0, logit_weight=1.0)
    assert math.isfinite(run.train().training_loss)


def test_rotary_positions_beyond_max_position_embeddings_only_warn(tmp_path, caplog):
    """Rotary positions have no table to fall off: longer inputs run (untrained), so hfkd warns instead of failing."""
    teacher, student = tiny_models.teacher_student_pair("llama")  # max_position_embeddings=64
    data = text_dataset("causal", 2, seq_len=70)
    with caplog.at_level("WARNING", logger="hfkd.checks"):
        result = trainer(tmp_path / "out", student, teacher, data).train()
    assert math.isfinite(result.training_loss)
    assert "beyond the student's max_position_embeddings=64" in caplog.text


def test_existing_output_dir_is_left_as_it_was(tmp_path, steps, bert_pair):
    teacher, _ = bert_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    expect_error(
        lambda: trainer(out, bert_with(labels=2), teacher, text_dataset("sequence", 4)),
        ValueError,
        "same number of labels",
        out=out,
        steps=steps,
    )
    assert (out / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------- properties
STUDENT_HIDDEN_ENTRIES, TEACHER_HIDDEN_ENTRIES = 3, 5  # embeddings + 2 layers, embeddings + 4 layers
STUDENT_LAYERS, TEACHER_LAYERS = 2, 4
NAN, INF = float("nan"), float("inf")

_valid_weight = st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 3.0)
_BAD = {
    "task_weight": [-0.5, NAN, INF],
    "logit_weight": [-1e-3, NAN, -INF],
    "hidden_weight": [-2.0, NAN, INF],
    "attention_weight": [-0.1, NAN, INF],
    "temperature": [0.0, -1.0, NAN, INF],
    "jsd_beta": [-0.1, 1.5, NAN],
    "logit_loss": ["kld", "", None],
    "hidden_loss": ["l1", 3],
    "attention_loss": ["js"],
    # Some of these are bad only when their term is on; the oracle knows which.
    "hidden_layer_map": [[0, 1], [0, 2, 9], [0, 1, 2, 3], "0,two", "-1", [], "0,2,5"],
    "attention_layer_map": [[0], [0, 7], [1, 2, 3], "x", [4, 4], [1, 3]],
}


@st.composite
def config_fields(draw):
    fields = {
        "task_weight": draw(_valid_weight),
        "logit_weight": draw(_valid_weight),
        "hidden_weight": draw(_valid_weight),
        "attention_weight": draw(_valid_weight),
        "temperature": draw(st.floats(0.25, 8.0)),
        "jsd_beta": draw(st.floats(0.0, 1.0)),
        "logit_loss": draw(st.sampled_from(["kl", "reverse_kl", "jsd", "mse"])),
        "hidden_loss": draw(st.sampled_from(["mse", "cosine"])),
        "attention_loss": draw(st.sampled_from(["kl", "mse"])),
        "hidden_layer_map": draw(
            st.sampled_from(["uniform", "last"])
            | st.lists(st.integers(0, TEACHER_HIDDEN_ENTRIES - 1), min_size=3, max_size=3)
        ),
        "attention_layer_map": draw(
            st.sampled_from(["uniform", "last"])
            | st.lists(st.integers(0, TEACHER_LAYERS - 1), min_size=2, max_size=2).map(lambda v: ",".join(map(str, v)))
        ),
    }
    # At least one term is on in a valid draw (four independent weights are all 0 too often otherwise).
    fields[draw(st.sampled_from(["task_weight", "logit_weight", "hidden_weight", "attention_weight"]))] = draw(
        st.floats(0.1, 3.0)
    )
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2]))):  # break up to two fields
        name = draw(st.sampled_from(sorted(_BAD) + ["all_weights_zero"]))
        if name == "all_weights_zero":
            fields.update(task_weight=0.0, logit_weight=0.0, hidden_weight=0.0, attention_weight=0.0)
        else:
            fields[name] = draw(st.sampled_from(_BAD[name]))
    return fields


def _layer_map_ok(spec, weight, entries, teacher_entries) -> bool:
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("uniform", "last"):
            return True
        try:
            spec = [int(p) for p in text.strip("[]() ").replace(" ", ",").split(",") if p]
        except ValueError:
            return False
    if not spec or any(v < 0 for v in spec):
        return False  # rejected when the config is parsed, whatever the weight
    return weight == 0 or (len(spec) == entries and max(spec) < teacher_entries)


def is_valid(f: dict) -> bool:
    """The oracle: what DistillationConfig and the trainer's checks must accept."""
    weights = [f[k] for k in ("task_weight", "logit_weight", "hidden_weight", "attention_weight")]
    if not all(isinstance(w, float) and math.isfinite(w) and w >= 0 for w in weights) or sum(weights) == 0:
        return False
    if not (isinstance(f["temperature"], float) and 0 < f["temperature"] < INF):
        return False
    if not (isinstance(f["jsd_beta"], float) and 0 <= f["jsd_beta"] <= 1):
        return False
    for name, table in (
        ("logit_loss", LOGIT_LOSSES),
        ("hidden_loss", HIDDEN_LOSSES),
        ("attention_loss", ATTENTION_LOSSES),
    ):
        if not isinstance(f[name], str) or f[name] not in table:
            return False
    return _layer_map_ok(
        f["hidden_layer_map"], f["hidden_weight"], STUDENT_HIDDEN_ENTRIES, TEACHER_HIDDEN_ENTRIES
    ) and _layer_map_ok(f["attention_layer_map"], f["attention_weight"], STUDENT_LAYERS, TEACHER_LAYERS)


@pytest.fixture(scope="module")
def property_setup(tmp_path_factory):
    teacher, student = tiny_models.teacher_student_pair("bert_sequence")
    return teacher, student, text_dataset("sequence", 4), tmp_path_factory


# Reproducible: derandomize draws the same 25 examples on every run (from the test's own source, not a clock), and
# database=None keeps no .hypothesis/ store between runs, so a failure is the same failure next time. A failing
# example is printed in full by Hypothesis; add it as an @example below to keep it.
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(fields=config_fields())
@example(
    fields={
        **dict.fromkeys(("task_weight", "logit_weight", "hidden_weight", "attention_weight"), 1.0),
        "temperature": 2.0,
        "jsd_beta": 0.5,
        "logit_loss": "jsd",
        "hidden_loss": "cosine",
        "attention_loss": "mse",
        "hidden_layer_map": [0, 2, 4],
        "attention_layer_map": [1, 3],
    }
)
@example(
    fields={
        **dict.fromkeys(("task_weight", "logit_weight", "attention_weight"), 0.5),
        "hidden_weight": float("nan"),
        "temperature": -1.0,
        "jsd_beta": 2.0,
        "logit_loss": "kld",
        "hidden_loss": "mse",
        "attention_loss": "kl",
        "hidden_layer_map": "uniform",
        "attention_layer_map": [0, 9],
    }
)
def test_config_values_either_train_or_fail_clearly(property_setup, fields):
    teacher, student, data, tmp_path_factory = property_setup
    valid = is_valid(fields)
    event("valid" if valid else "invalid")
    out = tmp_path_factory.mktemp("property") / "out"
    try:
        args = DistillationConfig(output_dir=str(out), **{**COMMON, "logging_steps": 1}, **fields)
        run = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=data)
        result = run.train()
    except (ValueError, TypeError) as err:
        assert not valid, f"a valid configuration was rejected: {type(err).__name__}: {err}"
        assert str(err).strip(), "empty error message"
        assert not out.exists(), "a rejected configuration created output_dir"
        return
    assert valid, f"an invalid configuration trained: {fields}"
    assert run.state.global_step == 1 and math.isfinite(result.training_loss)
