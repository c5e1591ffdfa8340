"""Data-free distillation (hfkd.synthesis): DeepInversion's losses against float64 references written here from the
paper's definitions and hand-computed values; a synthesis run on a tiny ResNet; `hfkd synthesize` end to end, its
output read back by a recipe and by the Python API as transfer rows; the adversarial generator loop; and the
refusals (a teacher without batch norm, num_images 0, an occupied output folder), with nothing written."""

import json
import math

import datasets
import numpy as np
import pytest
import torch
import transformers
import yaml
from recipe_runs import _error, _recipe
from tiny_models import COMMON, parameters_of, tiny_resnet
from transformers import ViTConfig, ViTForImageClassification

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.cli import main
from hfkd.synthesis import (
    AdversarialConfig,
    DeepInversionConfig,
    ImageSpace,
    adversarial_distill,
    batch_norm_layers,
    batch_norm_statistics_loss,
    deep_inversion,
    discrepancy,
    l2_prior,
    synthesized_dataset,
    total_variation,
    transfer_rows,
)

SIZE = 16
SPACE = ImageSpace(channels=1, height=SIZE, width=SIZE, mean=(0.3,), std=(0.4,))
PROCESSOR = {"size": {"height": SIZE, "width": SIZE}, "image_mean": [0.3], "image_std": [0.4]}


def _resnet(widths=(8, 16), labels=3, seed=0, calibrated=True):
    """A grey ResNet whose BatchNorm layers have seen data (running statistics other than the initial 0 and 1)."""
    model = tiny_resnet(widths, seed=seed, channels=1, labels=labels)
    if calibrated:
        model.train()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _ in range(4):
                model(pixel_values=torch.rand(16, 1, SIZE, SIZE, generator=generator) * 2 - 0.5)
    return model.eval()


def _grey_vit(seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=SIZE,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


# ---------------------------------------------------------------------------------------------------- the losses
def _bn_reference(features: np.ndarray, running_mean: np.ndarray, running_var: np.ndarray) -> float:
    """The paper's per-layer R_feature in float64: per channel, the mean and the biased variance over the batch and
    every position, then the two Euclidean distances to the running statistics."""
    channels = features.shape[1]
    means, variances = np.zeros(channels), np.zeros(channels)
    for c in range(channels):
        values = features[:, c].reshape(-1).astype(np.float64)
        means[c] = values.sum() / values.size
        variances[c] = ((values - means[c]) ** 2).sum() / values.size
    return math.sqrt(((means - running_mean) ** 2).sum()) + math.sqrt(((variances - running_var) ** 2).sum())


def test_batch_norm_statistics_loss_hand_computed():
    # Channel 0 holds 1, 3, 5, 7 (mean 4, biased variance 5), channel 1 only 2s (mean 2, variance 0).
    features = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]], [[[5.0, 7.0]], [[2.0, 2.0]]]], dtype=torch.float64)
    loss = batch_norm_statistics_loss(features, torch.tensor([4.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(6.0)  # ||(0, 2)|| + ||(4, 0)||
    assert batch_norm_statistics_loss(features, torch.tensor([4.0, 2.0]), torch.tensor([5.0, 0.0])).item() == 0.0


@pytest.mark.parametrize("shape", [(5, 3, 4, 6), (7, 4), (3, 2, 5)])
def test_batch_norm_statistics_loss_against_float64_reference(shape):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 0.5
    running_mean = torch.randn(shape[1], generator=generator, dtype=torch.float64)
    running_var = torch.rand(shape[1], generator=generator, dtype=torch.float64) + 0.5
    expected = _bn_reference(features.numpy(), running_mean.numpy(), running_var.numpy())
    assert batch_norm_statistics_loss(features, running_mean, running_var).item() == pytest.approx(expected, rel=1e-12)
    half = batch_norm_statistics_loss(features.bfloat16(), running_mean.float(), running_var.float())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, rel=2e-2)


def test_total_variation_and_l2_prior_hand_computed():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 4.0]]]], dtype=torch.float64)
    # right: -1, -2; down: -2, -3; anti-diagonal (lower left - upper right): 2 - 1; diagonal: 0 - 4
    tv_l1, tv_l2 = total_variation(image)
    assert tv_l1.item() == pytest.approx(1.5 + 2.5 + 1.0 + 4.0)
    assert tv_l2.item() == pytest.approx(math.sqrt(5) + math.sqrt(13) + 1.0 + 4.0)
    two = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 0.0]]]], dtype=torch.float64)
    assert l2_prior(two).item() == pytest.approx(2.5)  # norms 5 and 0


def test_total_variation_against_float64_reference():
    x = torch.randn(3, 2, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = x.numpy()
    l1 = l2 = 0.0
    for dy, dx in ((0, 1), (1, 0), (1, -1), (1, 1)):  # right, down, down-left, down-right neighbours
        diffs = []
        for i in range(a.shape[2]):
            for j in range(a.shape[3]):
                if 0 <= i + dy < a.shape[2] and 0 <= j + dx < a.shape[3]:
                    diffs.append(a[:, :, i, j] - a[:, :, i + dy, j + dx])
        d = np.stack(diffs)
        l1 += np.abs(d).mean()
        l2 += math.sqrt((d**2).sum())
    tv_l1, tv_l2 = total_variation(x)
    assert tv_l1.item() == pytest.approx(l1, rel=1e-12) and tv_l2.item() == pytest.approx(l2, rel=1e-12)
    per_image = np.sqrt((a.reshape(3, -1) ** 2).sum(1)).mean()
    assert l2_prior(x).item() == pytest.approx(per_image, rel=1e-12)


def test_discrepancy_against_float64_reference():
    generator = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 5, generator=generator, dtype=torch.float64), torch.randn(4, 5, generator=generator)
    assert discrepancy(s, t, "l1").item() == pytest.approx(np.abs(s.numpy() - t.double().numpy()).mean(), rel=1e-6)
    p_t = np.exp(t.double().numpy()) / np.exp(t.double().numpy()).sum(1, keepdims=True)
    p_s = np.exp(s.numpy()) / np.exp(s.numpy()).sum(1, keepdims=True)
    kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(1).mean()
    assert discrepancy(s, t, "kl").item() == pytest.approx(kl, rel=1e-5)
    assert discrepancy(t, t, "kl").item() == pytest.approx(0.0, abs=1e-6) and discrepancy(t, t, "l1").item() == 0.0


def test_image_space_round_trip_and_bounds():
    x = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    clipped = SPACE.clip(x)
    low, high = SPACE.bounds(x)
    assert low.item() == pytest.approx(-0.3 / 0.4) and high.item() == pytest.approx(0.7 / 0.4)
    assert torch.all(clipped >= low) and torch.all(clipped <= high)
    back = SPACE.from_uint8(SPACE.to_uint8(clipped))
    assert torch.allclose(back, clipped, atol=0.5 / 255 / 0.4 + 1e-6)
    images = SPACE.to_images(x)
    assert images[0].mode == "L" and images[0].size == (SIZE, SIZE)
    rgb = ImageSpace(3, 4, 4, mean=(0.5, 0.4, 0.3), std=(0.2,))
    assert rgb.std == (0.2, 0.2, 0.2) and rgb.to_images(torch.zeros(1, 3, 4, 4))[0].mode == "RGB"
    with pytest.raises(ValueError, match="image_mean has 3 values for a model of 1 channel"):
        ImageSpace(1, 4, 4, mean=(0.5, 0.4, 0.3))
    processor = transformers.ViTImageProcessorPil(**PROCESSOR)
    assert ImageSpace.from_processor(processor, _resnet().config) == SPACE


# ---------------------------------------------------------------------------------------------------- DeepInversion
def test_bn_term_sums_every_layer_with_the_first_multiplied():
    teacher = _resnet()
    layers = batch_norm_layers(teacher)
    inputs = {}  # by layer: a ResNet runs its shortcut's BN after the block's, not in module order
    handles = [layer.register_forward_hook(lambda m, i, o: inputs.__setitem__(m, i[0].numpy())) for layer in layers]
    x = torch.randn(6, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        teacher(pixel_values=x)
    for handle in handles:
        handle.remove()
    per_layer = [
        _bn_reference(inputs[layer], layer.running_mean.double().numpy(), layer.running_var.double().numpy())
        for layer in layers
    ]
    from hfkd.synthesis.deepinversion import _Statistics

    statistics = _Statistics(layers)
    with torch.no_grad():
        teacher(pixel_values=x)
    statistics.remove()
    assert statistics.total(3.0).item() == pytest.approx(3 * per_layer[0] + sum(per_layer[1:]), rel=1e-5)
    assert len(layers) == len([m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]) > 3


def test_deep_inversion_lowers_the_loss_on_a_tiny_resnet():
    teacher = _resnet()
    teacher.train()  # restored afterwards, as the gradients flags
    before = parameters_of(teacher)
    config = DeepInversionConfig(num_images=7, batch_size=4, iterations=60, lr=0.1, seed=3)
    result = deep_inversion(teacher, config, SPACE)
    assert result.pixel_values.shape == (7, 1, SIZE, SIZE) and result.pixel_values.dtype == torch.float32
    assert result.targets.tolist() == [0, 1, 2, 0, 1, 2, 0]  # balanced over the classes
    low, high = SPACE.bounds(result.pixel_values)
    assert torch.all(result.pixel_values >= low - 1e-6) and torch.all(result.pixel_values <= high + 1e-6)
    batches = result.record["batches"]
    assert len(batches) == 2 and all(b["loss"] < 0.8 * b["first_loss"] for b in batches), batches
    assert 0.0 <= result.record["teacher_agrees"] <= 1.0 and result.record["batch_norm_layers"] > 3
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, parameters_of(teacher)[k]) for k, v in before.items())
    again = deep_inversion(teacher, config, SPACE)
    assert torch.equal(again.pixel_values, result.pixel_values)
    other = deep_inversion(teacher, DeepInversionConfig(**{**vars(config), "seed": 4}), SPACE)
    assert not torch.equal(other.pixel_values, result.pixel_values)
    chosen = deep_inversion(teacher, DeepInversionConfig(num_images=3, iterations=1, classes=[2]), SPACE)
    assert chosen.targets.tolist() == [2, 2, 2]


def test_deep_inversion_refuses_a_teacher_without_batch_norm():
    with pytest.raises(ValueError, match=r"has none: it normalises with LayerNorm.*adversarial_distill"):
        deep_inversion(_grey_vit(), DeepInversionConfig(num_images=2, iterations=1), SPACE)
    untracked = _resnet(calibrated=False)
    for module in untracked.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean = module.running_var = None
            module.track_running_stats = False
    with pytest.raises(ValueError, match="keep no running statistics"):
        batch_norm_layers(untracked)


@pytest.mark.parametrize(
    ("field", "value"), [("num_images", 0), ("num_images", -3), ("batch_size", 0), ("iterations", 0)]
)
def test_bad_sizes_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
        DeepInversionConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------- the command
def _teacher_folder(tmp_path, model=None, name="teacher"):
    folder = tmp_path / name
    model = model if model is not None else _resnet()
    model.config.id2label = {0: "dark", 1: "light", 2: "mid"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(folder)
    transformers.ViTImageProcessorPil(**PROCESSOR).save_pretrained(folder)
    return folder


def _synthesize(teacher, out, *extra):
    argv = ["synthesize", "--teacher", str(teacher), "--output_dir", str(out), "--num_images", "6"]
    return main([*argv, "--batch_size", "4", "--iterations", "5", "--lr", "0.1", "--device", "cpu", *extra])


def test_synthesize_command_writes_a_dataset_folder(tmp_path, capsys):
    teacher = _teacher_folder(tmp_path)
    out = tmp_path / "synthesised"
    assert _synthesize(teacher, out) == 0
    assert "Synthesised 6 images (deepinversion" in capsys.readouterr().out
    loaded = datasets.load_from_disk(str(out))
    assert loaded.num_rows == 6 and loaded.column_names == ["image", "synthesis_target"]
    assert loaded.features["synthesis_target"].names == ["dark", "light", "mid"]
    assert loaded["synthesis_target"] == [0, 1, 2, 0, 1, 2]
    image = loaded[0]["image"]
    assert image.mode == "L" and image.size == (SIZE, SIZE)
    # The teacher's processor (what a recipe reads them with) and transfer_rows give the same tensors.
    processor = transformers.AutoImageProcessor.from_pretrained(teacher)
    seen = torch.as_tensor(np.asarray(processor(loaded["image"][:], return_tensors="np")["pixel_values"]))
    rows = transfer_rows(str(out))
    assert seen.shape == (6, 1, SIZE, SIZE) and torch.allclose(seen, rows["pixel_values"][:], atol=1e-5)
    settings = json.loads((out / "hfkd_synthesis.json").read_text())
    assert settings["method"] == "deepinversion" and settings["rows"] == 6
    assert settings["config"]["iterations"] == 5 and settings["image_space"]["image_std"] == [0.4]
    assert not (tmp_path / "synthesised.partial").exists()

    # An occupied folder is refused and left as it was; --overwrite true replaces it.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert _synthesize(teacher, out, "--seed", "1") == 2
    assert "already exists and is not empty" in _error(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert _synthesize(teacher, out, "--seed", "1", "--overwrite", "true") == 0
    assert json.loads((out / "hfkd_synthesis.json").read_text())["config"]["seed"] == 1


@pytest.mark.parametrize(
    ("extra", "teacher_kind", "expected"),
    [
        ((), "vit", "DeepInversion (method='deepinversion') matches the running statistics"),
        (("--num_images", "0"), "resnet", "num_images must be an integer >= 1"),
        (("--method", "adversarial"), "resnet", "method='adversarial' writes no data set"),
    ],
)
def test_synthesize_refusals_write_nothing(tmp_path, capsys, extra, teacher_kind, expected):
    teacher = _teacher_folder(tmp_path, _grey_vit() if teacher_kind == "vit" else None)
    out = tmp_path / "new"
    assert _synthesize(teacher, out, *extra) == 2
    message = _error(capsys)
    assert expected in message
    if teacher_kind == "vit":
        assert "adversarial_distill" in message
    assert not out.exists() and not (tmp_path / "new.partial").exists()


def test_a_recipe_reads_the_synthesised_folder_as_transfer_rows(tmp_path):
    from PIL import Image

    teacher = _teacher_folder(tmp_path)
    synthesised = tmp_path / "synthesised"
    assert _synthesize(teacher, synthesised) == 0
    images = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label, base in (("dark", 40), ("light", 200), ("mid", 120)):
        (images / "train" / label).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(rng.normal(base, 20, size=(SIZE, SIZE)), 0, 255).astype("uint8")
            Image.fromarray(pixels, mode="L").save(images / "train" / label / f"{i}.png")
    student = {"model_type": "resnet", "num_channels": 1, "embedding_size": 4, "hidden_sizes": [4, 8]}
    student.update(depths=[1, 1], layer_type="basic")
    path = _recipe(
        tmp_path,
        str(teacher),
        images,
        task="image-classification",
        dataset_name="imagefolder",
        finetune_teacher=False,
        student_num_layers=None,
        student_config=json.dumps(student),
        label_column="label",
        eval_fraction=0.25,
        hidden_weight=0.0,
        max_steps=2,
        transfer_data_files=str(synthesised),
    )
    values = yaml.safe_load(path.read_text())
    values["data_files"] = json.dumps({"train": str(images / "train" / "**")})
    path.write_text(yaml.safe_dump(values))
    assert main(["distill", "--config", str(path)]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"]["transfer_examples"] == 6, metrics["data"]


def test_the_python_api_trains_a_student_on_the_synthesised_rows(tmp_path):
    teacher = _resnet()
    result = deep_inversion(teacher, DeepInversionConfig(num_images=8, batch_size=8, iterations=3), SPACE)
    dataset = synthesized_dataset(result.pixel_values, result.targets, SPACE)
    rows = transfer_rows(dataset, SPACE)
    assert rows.column_names == ["pixel_values", "labels"] and set(rows["labels"][:].tolist()) == {-100}
    # Only the rounding to whole pixels separates them from the synthesised tensors.
    assert torch.allclose(rows["pixel_values"][:], result.pixel_values, atol=0.5 / 255 / 0.4 + 1e-6)
    with pytest.raises(ValueError, match="needs the image space"):
        transfer_rows(dataset)
    student = _resnet(widths=(4, 8), seed=1, calibrated=False)
    before = parameters_of(student)
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        task_weight=0.0,
        logit_weight=1.0,
        **COMMON,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "distill/logit" in entry]
    assert logged and all(math.isfinite(entry["distill/logit"]) for entry in logged)
    assert any(not torch.equal(v, parameters_of(student)[k]) for k, v in before.items())


# ---------------------------------------------------------------------------------------------------- adversarial
def _adversarial(teacher, seed=0, loss="l1", iterations=4):
    student = _resnet(widths=(4, 8), seed=1, calibrated=False).train()
    config = AdversarialConfig(
        iterations=iterations, batch_size=8, student_steps=2, noise_dim=8, generator_width=4, seed=seed, loss=loss
    )
    return adversarial_distill(teacher, student, config, SPACE, log_every=1)


def test_adversarial_generator_trains_the_student_deterministically():
    teacher = _grey_vit()  # no batch norm: the adversarial loop needs only the teacher's logits
    frozen = parameters_of(teacher)
    start = parameters_of(_resnet(widths=(4, 8), seed=1, calibrated=False))
    first = _adversarial(teacher)
    assert all(torch.equal(v, parameters_of(teacher)[k]) for k, v in frozen.items())
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())
    trained = parameters_of(first.student)
    assert any(not torch.equal(v, trained[k]) for k, v in start.items())
    history = first.record["history"]
    assert [h["round"] for h in history] == [0, 1, 2, 3] and first.record["student_steps"] == 8
    assert all(math.isfinite(h["student_loss"]) and h["generator_discrepancy"] >= 0 for h in history)
    second = _adversarial(teacher)
    assert all(torch.equal(v, parameters_of(second.student)[k]) for k, v in trained.items())
    assert torch.equal(first.sample(3, seed=5), second.sample(3, seed=5))
    assert first.sample(3).shape == (3, 1, SIZE, SIZE)
    other = _adversarial(teacher, seed=1)
    assert any(not torch.equal(v, parameters_of(other.student)[k]) for k, v in trained.items())


def test_adversarial_student_moves_towards_the_teacher():
    teacher = _resnet()
    student = _resnet(widths=(4, 8), seed=1, calibrated=False)
    probe = torch.randn(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(9))

    def gap(model):
        model.eval()
        with torch.no_grad():
            value = discrepancy(model(pixel_values=probe).logits, teacher(pixel_values=probe).logits).item()
        model.train()
        return value

    before = gap(student)
    config = AdversarialConfig(iterations=15, batch_size=32, student_steps=3, noise_dim=8, generator_width=8)
    adversarial_distill(teacher, student, config, SPACE, log_every=0)
    assert gap(student) < before


def test_adversarial_config_refuses_bad_values():
    with pytest.raises(ValueError, match="loss must be one of"):
        AdversarialConfig(loss="mse")
    with pytest.raises(ValueError, match="student_steps must be an integer >= 1"):
        AdversarialConfig(student_steps=0)
    with pytest.raises(ValueError, match=r"logits \(2, 5\) and the teacher's \(2, 3\)"):
        adversarial_distill(
            _grey_vit(),
            _resnet(labels=5, calibrated=False),
            AdversarialConfig(iterations=1, batch_size=2, noise_dim=4, generator_width=4),
            SPACE,
        )


def test_synthesize_help_and_a_yaml_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["synthesize", "--help"])
    text = capsys.readouterr().out
    assert all(f"--{name}" in text for name in ("teacher", "num_images", "bn_weight", "tv_l2_weight", "overwrite"))
    assert "synthesize" in main.__globals__["USAGE"]
    teacher = _teacher_folder(tmp_path)
    config = tmp_path / "synthesis.yaml"
    config.write_text(yaml.safe_dump({"teacher": str(teacher), "num_images": 3, "iterations": 2, "bn_wieght": 1}))
    assert main(["synthesize", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    assert "unknown field(s) ['bn_wieght'] (did you mean bn_weight?)" in _error(capsys)
    config.write_text(yaml.safe_dump({"teacher": str(teacher), "num_images": 3, "iterations": 2, "device": "cpu"}))
    assert main(["synthesize", "--config", str(config), "--output_dir", str(tmp_path / "out")]) == 0
    assert datasets.load_from_disk(str(tmp_path / "out")).num_rows == 3
