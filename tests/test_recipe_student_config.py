"""A student built from `student_config` in `hfkd distill` recipes: random initial weights, seeded, reading the
teacher's tokenizer or image processor and the data's labels; the labels-only comparison starts from its weights."""

import json

import numpy as np
import pytest
import torch
import transformers
import yaml
from recipe_runs import _error, _recipe
from transformers import AutoTokenizer

from hfkd.cli import main

BERT = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}
BERT["intermediate_size"] = 32


@pytest.fixture
def initial_weights(monkeypatch):
    """Each trainer a run trains: its class and a copy of the model's weights before its first step."""
    runs = []
    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        runs.append({"trainer": type(self).__name__, "weights": weights})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "train", train)
    return runs


def _metrics(tmp_path):
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


def test_text_student_from_a_config_reads_the_teachers_tokenizer_and_starts_as_the_labels_only_one(
    tmp_path, tiny_text, initial_weights
):
    teacher_dir, data = tiny_text
    extra = dict(student_num_layers=None, student_config=json.dumps(BERT), compare_without_distillation=True)
    extra.update(finetune_teacher=False, max_steps=2)
    assert main(["distill", "--config", str(_recipe(tmp_path, teacher_dir, data, **extra))]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    assert saved["vocab_size"] == len(tokenizer) and saved["max_position_embeddings"] == 64  # the teacher's
    assert (saved["hidden_size"], saved["num_hidden_layers"]) == (16, 2)
    assert saved["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    student = _metrics(tmp_path)["student"]
    assert student["built_from_teacher"] is False and student["random_init"] is True
    assert student["config"]["hidden_size"] == 16
    note = f"built from student_config: bert, 2 layers, hidden 16, {student['params']:,} params, random init"
    assert student["note"].startswith(note)
    assert note in (tmp_path / "run" / "README.md").read_text()
    distilled, labels_only = initial_weights
    assert (distilled["trainer"], labels_only["trainer"]) == ("_RecipeTrainer", "Trainer")
    assert distilled["weights"].keys() == labels_only["weights"].keys()
    for name, value in distilled["weights"].items():
        assert torch.equal(value, labels_only["weights"][name]), name


def test_the_seed_makes_the_random_student(tmp_path, tiny_text, initial_weights):
    teacher_dir, data = tiny_text
    firsts = []
    for seed in (1, 1, 2):
        extra = dict(student_num_layers=None, student_config=json.dumps(BERT), finetune_teacher=False, max_steps=1)
        extra.update(seed=seed, output_dir=str(tmp_path / f"run-{len(firsts)}"))
        assert main(["distill", "--config", str(_recipe(tmp_path, teacher_dir, data, **extra))]) == 0
        firsts.append(initial_weights[-1]["weights"]["classifier.weight"])
    assert torch.equal(firsts[0], firsts[1]) and not torch.equal(firsts[0], firsts[2])


def test_image_student_from_a_config_takes_channels_and_size_from_the_image_processor(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in ("dark", "light"):
        (images / "train" / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(40 if label == "dark" else 200, 20, size=(8, 8)), 0, 255).astype("uint8")
            Image.fromarray(pixels, mode="L").save(images / "train" / label / f"{i}.png")
    teacher = {"model_type": "vit", "image_size": 8, "patch_size": 4, "num_channels": 1, "hidden_size": 32}
    teacher.update(num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
    student = {"model_type": "vit", "patch_size": 4, "hidden_size": 16, "num_hidden_layers": 1}
    student.update(num_attention_heads=2, intermediate_size=32)
    processor = {"size": {"height": 8, "width": 8}, "do_resize": False, "image_mean": [0.5], "image_std": [0.5]}
    path = _recipe(
        tmp_path,
        "unused",
        images,
        task="image-classification",
        dataset_name="imagefolder",
        teacher_model_name_or_path=None,
        teacher_config=json.dumps(teacher),
        student_num_layers=None,
        student_config=json.dumps(student),
        image_processor_kwargs=json.dumps(processor),
        label_column="label",
        eval_fraction=0.25,
        teacher_max_steps=1,
        max_steps=2,
    )
    values = yaml.safe_load(path.read_text())
    values["data_files"] = json.dumps({"train": str(images / "train" / "**")})
    path.write_text(yaml.safe_dump(values))
    assert main(["distill", "--config", str(path)]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["num_channels"], saved["image_size"], saved["hidden_size"]) == (1, 8, 16)
    assert sorted(saved["id2label"].values()) == ["dark", "light"]
    assert _metrics(tmp_path)["student"]["note"].startswith("built from student_config: vit, 1 layer, hidden 16")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"student_config": json.dumps({**BERT, "vocab_size": 10})},
            "student_config: vocab_size=10 is smaller than the teacher's tokenizer (21 tokens)",
        ),
        (
            {"student_config": json.dumps(BERT), "student_num_layers": 2},
            "student_config builds a new student with random weights, but student_num_layers is also set",
        ),
        (
            {"student_config": json.dumps(BERT), "student_layers": "0,3", "student_model_name_or_path": "x"},
            "but student_model_name_or_path and student_layers are also set",
        ),
        ({"student_config": json.dumps({"hidden_size": 16})}, "student_config needs a 'model_type' key"),
        ({"student_config": "{hidden"}, "student_config must be a JSON object"),
        ({"student_config": json.dumps({"model_type": "no-such-model"})}, "model_type='no-such-model' is not known"),
    ],
)
def test_bad_student_configs_are_refused_before_anything_is_written(tmp_path, tiny_text, capsys, change, expected):
    extra = {"student_num_layers": None, **change}
    path = _recipe(tmp_path, *tiny_text, **extra)
    assert main(["distill", "--config", str(path)]) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "run").exists()
