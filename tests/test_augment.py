"""Augmentation with consistent teaching (hfkd.augment): each image operation by hand in float64, the teacher reading
the student's augmented view, word augmentations across two tokenizers, the mixed-label task loss, seeding, an exact
resume, and the refusals."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from datasets import Dataset
from tiny_models import COMMON, dataset_for, teacher_student_pair, text_dataset
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, PreTrainedTokenizerFast

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.augment import (
    MIX_LABELS,
    MIX_LAMBDA,
    Augmenter,
    RawRows,
    TextCollator,
    crop_boxes,
    cutmix,
    cutmix_box,
    flip,
    generator,
    mixed_cross_entropy,
    mixup,
    resized_crop,
)
from hfkd.cli import main
from hfkd.two_tokenizers import TwoTokenizerCollator

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "a distilled student learns from its teacher",
    "students and teachers read the same text",
    "hello world again and again",
]


def _args(tmp_path, name="out", **kwargs):
    return DistillationConfig(output_dir=str(tmp_path / name), **{**COMMON, **kwargs})


# ---------------------------------------------------------------------------------------------------- image ops
def test_flip_mirrors_exactly_the_chosen_images():
    x = torch.arange(12, dtype=torch.float64).view(2, 1, 2, 3)
    out = flip(x, torch.tensor([True, False]))
    assert out[0, 0].tolist() == [[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]
    assert torch.equal(out[1], x[1])


def test_mixup_is_lam_x_plus_one_minus_lam_partner_with_the_drawn_lam():
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, -100])
    view = Augmenter(ops=("mixup",), mixup_alpha=0.4).view(
        {"pixel_values": x, "labels": labels}, generator(3, 7, 1, 0)
    )
    rng = generator(3, 7, 1, 0)  # the same draws, in the same order: the permutation, then lam
    perm = torch.from_numpy(rng.permutation(4))
    lam = float(rng.beta(0.4, 0.4))
    assert view["pixel_values"].dtype == torch.float64
    torch.testing.assert_close(view["pixel_values"], lam * x + (1 - lam) * x[perm], rtol=0, atol=1e-15)
    assert torch.equal(view[MIX_LABELS], labels[perm])
    assert view[MIX_LAMBDA].tolist() == [lam] * 4
    torch.testing.assert_close(mixup(x, perm, 0.25), 0.25 * x + 0.75 * x[perm], rtol=0, atol=0)


def test_cutmix_pastes_the_clipped_box_and_lam_is_its_complement():
    x = torch.arange(2 * 64, dtype=torch.float64).view(2, 1, 8, 8)
    perm = torch.tensor([1, 0])
    out, lam = cutmix(x, perm, (0, 3, 5, 8))  # a box at the corner: 3 x 3 of 64 pixels
    assert lam == 1 - 9 / 64
    assert torch.equal(out[0, :, 0:3, 5:8], x[1, :, 0:3, 5:8])
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[0:3, 5:8] = False
    assert torch.equal(out[0, 0][outside], x[0, 0][outside])
    # Drawn boxes: clipped to the image, and lam after clipping is the pasted share, whatever the centre.
    for seed in range(50):
        rng = generator(seed, 0, 0, 0)
        y1, y2, x1, x2 = cutmix_box(rng, 8, 8, float(rng.beta(1.0, 1.0)))
        assert 0 <= y1 <= y2 <= 8 and 0 <= x1 <= x2 <= 8
        out, lam = cutmix(x, perm, (y1, y2, x1, x2))
        changed = (out != x).any(dim=1)[0].sum().item()  # every pasted pixel differs (x[1] = x[0] + 64)
        assert changed == (y2 - y1) * (x2 - x1)
        assert lam == pytest.approx(1 - changed / 64, abs=1e-12)


def test_resized_crop_of_a_ramp_by_hand():
    ramp = torch.arange(8, dtype=torch.float64).expand(1, 1, 8, 8).clone()  # value = column index
    out = resized_crop(ramp, [(2, 3, 4, 4)])  # rows 2..5, columns 3..6, resized back to 8 x 8
    assert out.shape == ramp.shape and out.dtype == torch.float64
    # Bilinear, align_corners=False: output column j reads input column 3 + clamp((j + 0.5) / 2 - 0.5, 0, 3).
    expected = [3 + min(max((j + 0.5) / 2 - 0.5, 0.0), 3.0) for j in range(8)]
    for row in out[0, 0]:
        torch.testing.assert_close(row, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # Drawn boxes lie in the image, with the area share and aspect ratio in range (or the centre fallback).
    boxes = crop_boxes(generator(0, 0, 0, 0), 200, 16, 12, (0.08, 1.0))
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 12 and h > 0 and w > 0
    assert len({b for b in boxes}) > 100  # one box per image, not one per batch
    full = crop_boxes(generator(0, 0, 0, 0), 5, 8, 8, (1.0, 1.0))
    assert all(h * w >= 49 for _, _, h, w in full)


def test_mixed_cross_entropy_by_hand_with_transfer_rows():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, -100, 2])
    partner = torch.tensor([2, 0, -100])
    lam = torch.full((3,), 0.7, dtype=torch.float64)
    per_row = mixed_cross_entropy(logits, labels, partner, lam)
    ce = -torch.log_softmax(logits, dim=-1)
    expected = [0.7 * ce[0, 0] + 0.3 * ce[0, 2], 0.3 * ce[1, 0], 0.7 * ce[2, 2]]
    torch.testing.assert_close(per_row.double(), torch.stack(expected), rtol=1e-6, atol=1e-6)


def test_draws_depend_on_seed_step_micro_batch_and_process():
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    aug = Augmenter(ops=("crop", "flip", "mixup"))
    views = {
        key: aug.view({"pixel_values": x}, generator(*key))["pixel_values"]
        for key in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]
    }
    again = aug.view({"pixel_values": x}, generator(0, 0, 0, 0))["pixel_values"]
    assert torch.equal(again, views[(0, 0, 0, 0)])
    first = views.pop((0, 0, 0, 0))
    assert all(not torch.equal(first, other) for other in views.values())


# ---------------------------------------------------------------------------------------------------- the trainer
def _spy(model, seen: list) -> None:
    def hook(module, args, kwargs):
        seen.append(kwargs.get("pixel_values", kwargs.get("input_ids")).detach().clone())

    model.register_forward_pre_hook(hook, with_kwargs=True)


def test_teacher_reads_the_students_augmented_pixels(tmp_path):
    teacher, student = teacher_student_pair("vit")
    data = dataset_for("vit", 8)
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=4, augment="crop,flip,cutmix", learning_rate=0.01)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    seen_s, seen_t = [], []
    _spy(student, seen_s)
    _spy(teacher, seen_t)
    trainer.train()
    assert len(seen_s) == len(seen_t) == 3
    originals = torch.tensor(data["pixel_values"])
    for s, t in zip(seen_s, seen_t, strict=True):
        assert torch.equal(s, t)
        assert not any(torch.allclose(s[0], o) for o in originals)  # an augmented view, not a data row
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(e["loss"]) for e in logs)


def test_mixup_task_loss_is_the_mixed_cross_entropy_over_labelled_rows(tmp_path):
    """One step: the logged task loss equals lam CE(y) + (1 - lam) CE(y[perm]) over the labelled rows, computed
    from the student's own logits on the view (a row labelled -100 contributes only its partner's share)."""
    teacher, student = teacher_student_pair("vit")
    rows = dataset_for("vit", 4).to_dict()
    rows["labels"][1] = -100
    data = Dataset.from_dict(rows)
    args = _args(
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=4,
        augment="mixup",
        learning_rate=0.0,
        logging_steps=1,
        augment_mixup_alpha=1.0,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    captured = {}

    def keep_logits(module, args, out):
        captured.setdefault("logits", out.logits.detach())

    student.register_forward_hook(keep_logits)
    original = trainer.augmenter.view

    def view(batch, rng, collate=None):
        out = original(batch, rng, collate)
        captured.update(labels=out["labels"], partner=out[MIX_LABELS], lam=out[MIX_LAMBDA])
        return out

    object.__setattr__(trainer, "augmenter", type("A", (), {"view": staticmethod(view), "text": False})())
    trainer.train()
    logged = next(e for e in trainer.state.log_history if "task" in e)["task"]
    per_row = mixed_cross_entropy(captured["logits"], captured["labels"], captured["partner"], captured["lam"])
    assert logged == pytest.approx((per_row.sum() / 3).item(), rel=1e-5)
    # Against the unmixed loss: the test can fail.
    plain = F.cross_entropy(captured["logits"], captured["labels"], ignore_index=-100).item()
    assert abs(logged - plain) > 1e-4


def test_resumed_run_draws_the_views_of_an_uninterrupted_one(tmp_path):
    """ResNet: a ViT checkpoint here reloads under other key names (transformers), which no resume survives."""
    data = dataset_for("resnet", 16)

    def run(name, resume=None, seed=0):
        teacher, student = teacher_student_pair("resnet")
        args = _args(
            tmp_path,
            name,
            max_steps=4,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=0.05,
            augment="crop,flip,mixup,cutmix",
            save_strategy="steps",
            save_steps=2,
            seed=seed,
        )
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return student

    full = run("full")
    resumed = run("resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    other = run("other_seed", seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(full.parameters(), other.parameters(), strict=True))


# ---------------------------------------------------------------------------------------------------- text
def _byte_bpe(vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        TEXTS,
        trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _wordpiece(vocab: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _classifier(vocab: int, seed: int, width: int = 16) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * width,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def toks():
    return {"wordpiece": _wordpiece(200), "bpe": _byte_bpe(400)}


def _text_rows(n=8):
    return Dataset.from_dict({"text": [TEXTS[i % len(TEXTS)] for i in range(n)], "labels": [i % 2 for i in range(n)]})


def test_word_augmentation_gives_both_tokenizers_the_same_words(toks):
    student, teacher = toks["wordpiece"], toks["bpe"]
    collate = TwoTokenizerCollator(student, teacher)
    aug = Augmenter(ops=("word_replace",), word_prob=0.5)
    batch = aug.view(RawRows(_text_rows(4)), generator(0, 0, 0, 0), collate)
    changed = 0
    for i in range(4):
        s_words = student.decode(batch["input_ids"][i], skip_special_tokens=True).split()
        t_words = teacher.decode(batch["teacher_input_ids"][i], skip_special_tokens=True).split()
        assert s_words == t_words
        changed += s_words != TEXTS[i].split()
    assert changed > 0  # the words did change
    masked = Augmenter(ops=("word_mask",), word_prob=0.5, mask_token=student.mask_token)
    batch = masked.view(RawRows(_text_rows(4)), generator(0, 0, 0, 0), collate)
    s_masks = (batch["input_ids"] == student.mask_token_id).sum(1)
    t_masks = [
        teacher.decode(ids, skip_special_tokens=True).split().count("[MASK]") for ids in batch["teacher_input_ids"]
    ]
    assert s_masks.tolist() == t_masks and sum(t_masks) > 0


def test_trainer_across_tokenizers_teaches_on_the_same_augmented_text(tmp_path, toks):
    s_tok, t_tok = toks["wordpiece"], toks["bpe"]
    student, teacher = _classifier(len(s_tok), 1), _classifier(len(t_tok), 0, 32)
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4, augment="word_mask", augment_word_prob=0.5)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=_text_rows(8),
        processing_class=s_tok,
        teacher_processing_class=t_tok,
    )
    seen_s, seen_t = [], []
    _spy(student, seen_s)
    _spy(teacher, seen_t)
    trainer.train()
    assert len(seen_s) == len(seen_t) == 2
    masks = 0
    for s_ids, t_ids in zip(seen_s, seen_t, strict=True):
        for s_row, t_row in zip(s_ids, t_ids, strict=True):
            s_text = s_tok.decode(s_row, skip_special_tokens=False).replace("[CLS]", "").replace("[SEP]", "")
            s_words = s_text.replace("[PAD]", "").split()
            t_words = t_tok.decode(t_row, skip_special_tokens=True).split()
            assert s_words == t_words
            masks += s_words.count("[MASK]")
    assert masks > 0


def test_one_tokenizer_keeps_the_text_and_tokenizes_on_the_fly(tmp_path, toks):
    tok = toks["wordpiece"]
    student, teacher = _classifier(len(tok), 1), _classifier(len(tok), 0, 32)
    args = _args(tmp_path, max_steps=2, per_device_train_batch_size=4, augment="word_replace", augment_word_prob=0.3)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=_text_rows(8), processing_class=tok
    )
    assert isinstance(trainer.data_collator, TextCollator)
    seen_s, seen_t = [], []
    _spy(student, seen_s)
    _spy(teacher, seen_t)
    trainer.train()
    assert len(seen_s) == 2 and all(torch.equal(s, t) for s, t in zip(seen_s, seen_t, strict=True))
    originals = {tuple(tok(t)["input_ids"]) for t in TEXTS}
    rows = [tuple(r[r != tok.pad_token_id].tolist()) for ids in seen_s for r in ids]
    assert any(r not in originals for r in rows)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"augment": "crop,rotate"}, "names \\['rotate'\\], which is no augmentation"),
        ({"augment": "crop,word_mask"}, "mixes image operations"),
        ({"augment": "flip", "teacher_cache_dir": "somewhere"}, "teacher cache \\(teacher_cache_dir\\) holds"),
        ({"augment": "crop", "augment_crop_scale": [0.5, 0.1]}, "augment_crop_scale must satisfy"),
        ({"augment": "mixup", "augment_mixup_alpha": 0}, "augment_mixup_alpha must be a finite number > 0"),
        ({"augment": "word_mask", "augment_word_prob": 1.5}, "augment_word_prob must lie in"),
    ],
)
def test_config_refusals_name_the_field(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _args(tmp_path, **kwargs)


def test_trainer_refusals_come_before_anything_is_written(tmp_path, toks):
    out = tmp_path / "out"
    teacher, student = teacher_student_pair("bert_sequence")
    with pytest.raises(ValueError, match="augment='mixup' works on images.*word_mask"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_args(tmp_path, augment="mixup"),
            train_dataset=text_dataset("sequence", 8),
        )
    with pytest.raises(
        ValueError, match="augment='word_mask' changes words of text, but the training batches are images"
    ):
        t, s = teacher_student_pair("vit")
        DistillationTrainer(
            model=s,
            teacher_model=t,
            args=_args(tmp_path, augment="word_mask"),
            train_dataset=dataset_for("vit", 4),
            processing_class=toks["wordpiece"],
        )
    with pytest.raises(ValueError, match="train_dataset has no 'text' column.*tokenize_text_column"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_args(tmp_path, augment="word_replace"),
            train_dataset=text_dataset("sequence", 8),
            processing_class=toks["wordpiece"],
        )
    with pytest.raises(ValueError, match="pass the student's tokenizer as processing_class"):
        DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=_args(tmp_path, augment="word_replace"),
            train_dataset=_text_rows(4),
        )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- the recipe
def _write_recipe(tmp_path, **values) -> str:
    common = {
        "output_dir": str(tmp_path / "run"),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "latency_repeats": 2,
        "latency_batch_size": 4,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**common, **values}))
    return str(path)


def test_image_recipe_with_augmentation(tmp_path):
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
    processor = {"size": {"height": 8, "width": 8}, "do_resize": False, "image_mean": [0.5], "image_std": [0.5]}
    path = _write_recipe(
        tmp_path,
        task="image-classification",
        dataset_name="imagefolder",
        data_files=json.dumps({"train": str(images / "train" / "**")}),
        teacher_config=json.dumps(teacher),
        image_processor_kwargs=json.dumps(processor),
        finetune_teacher=True,
        teacher_max_steps=2,
        student_num_layers=2,
        label_column="label",
        eval_fraction=0.25,
        augment="crop,flip,mixup",
    )
    assert main(["distill", "--config", path]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "hfkd_config.yaml").read_text())
    assert saved["augment"] == "crop,flip,mixup"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["student"]["metric"])


def test_text_recipe_with_word_augmentation(tmp_path):
    vocab_words = "good bad fine great awful okay love hate the a movie film was is very not".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab_words]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab_words) + 5, hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
    config.update(dict(intermediate_size=64, max_position_embeddings=64, num_labels=2))
    BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(tmp_path / "teacher")
    rng = np.random.default_rng(0)
    rows = ["review,sentiment"]
    for i in range(40):
        words = " ".join(rng.choice(vocab_words, size=5))
        rows.append(f"{words} {'great' if i % 2 else 'awful'},{'positive' if i % 2 else 'negative'}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    path = _write_recipe(
        tmp_path,
        task="text-classification",
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        finetune_teacher=True,
        teacher_max_steps=2,
        student_num_layers=2,
        dataset_name="csv",
        data_files=str(tmp_path / "data.csv"),
        text_column="review",
        label_column="sentiment",
        max_length=16,
        augment="word_mask",
        augment_word_prob=0.3,
    )
    assert main(["distill", "--config", path]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["student"]["metric"])


# ---------------------------------------------------------------------------------------------------- the comparison
def _tiny_images(tmp_path) -> dict:
    """The recipe fields of a tiny image task: 24 grey 8x8 images of two classes and a ViT teacher built here."""
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
    processor = {"size": {"height": 8, "width": 8}, "do_resize": False, "image_mean": [0.5], "image_std": [0.5]}
    return dict(
        task="image-classification",
        dataset_name="imagefolder",
        data_files=json.dumps({"train": str(images / "train" / "**")}),
        teacher_config=json.dumps(teacher),
        image_processor_kwargs=json.dumps(processor),
        finetune_teacher=True,
        teacher_max_steps=2,
        student_num_layers=2,
        label_column="label",
        eval_fraction=0.25,
    )


@pytest.fixture
def views(monkeypatch):
    """Every augmented view a run draws, in order: (the trainer's class, the view)."""
    seen = []
    original = Augmenter.view

    def view(self, batch, rng, collate=None):
        out = original(self, batch, rng, collate)
        seen.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()})
        return out

    monkeypatch.setattr(Augmenter, "view", view)
    return seen


def _same_views(views, keys):
    half = len(views) // 2
    assert len(views) == 2 * half and half == 3  # 3 steps of distillation, then 3 of the comparison
    for distilled, labels_only in zip(views[:half], views[half:], strict=True):
        for key in keys:
            assert torch.equal(distilled[key], labels_only[key]), key


def test_the_labels_only_comparison_sees_the_distilled_students_image_views(tmp_path, views, monkeypatch):
    import hfkd.recipe.stages as stages

    mixed = []
    original = stages.mixed_cross_entropy
    monkeypatch.setattr(stages, "mixed_cross_entropy", lambda *a, **k: mixed.append(a[3]) or original(*a, **k))
    path = _write_recipe(
        tmp_path, **_tiny_images(tmp_path), augment="crop,flip,mixup", compare_without_distillation=True
    )
    assert main(["distill", "--config", path]) == 0
    _same_views(views, ["pixel_values", "labels", MIX_LABELS, MIX_LAMBDA])
    # The comparison's task loss mixes the labels with each step's lam.
    assert [lam[0].item() for lam in mixed] == [v[MIX_LAMBDA][0].item() for v in views[3:]]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["labels_only"]["steps"] == 3


def test_the_labels_only_comparison_sees_the_distilled_students_masked_words(tmp_path, views):
    vocab_words = "good bad fine great awful okay love hate the a movie film was is very not".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocab_words]) + "\n")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab_words) + 5, hidden_size=32, num_hidden_layers=4, num_attention_heads=4)
    config.update(dict(intermediate_size=64, max_position_embeddings=64, num_labels=2))
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    BertTokenizerFast(vocab=str(vocab)).save_pretrained(tmp_path / "teacher")
    rng = np.random.default_rng(0)
    rows = ["review,sentiment"]
    for i in range(40):
        rows.append(f"{' '.join(rng.choice(vocab_words, size=5))},{'positive' if i % 2 else 'negative'}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    path = _write_recipe(
        tmp_path,
        task="text-classification",
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        finetune_teacher=False,
        student_num_layers=2,
        dataset_name="csv",
        data_files=str(tmp_path / "data.csv"),
        text_column="review",
        label_column="sentiment",
        max_length=16,
        augment="word_mask",
        augment_word_prob=0.3,
        compare_without_distillation=True,
    )
    assert main(["distill", "--config", path]) == 0
    _same_views(views, ["input_ids", "attention_mask", "labels"])
    assert any((v["input_ids"] == 4).any() for v in views[3:])  # [MASK]: the comparison's words were masked


def test_the_comparisons_mixed_loss_is_the_models_own_at_lam_one(tmp_path):
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    from hfkd.recipe.stages import _AugmentedTrainer

    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1)
    config.update(dict(num_attention_heads=2, intermediate_size=32, num_labels=3))
    model = ViTForImageClassification(config)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    ours = _AugmentedTrainer(model=model, args=args, augmenter=Augmenter(ops=("mixup",)))
    plain = Trainer(model=model, args=args)
    x, labels, partner = torch.randn(4, 1, 8, 8), torch.tensor([0, 2, 1, 2]), torch.tensor([2, 0, 2, 1])
    batch = {"pixel_values": x, "labels": labels, MIX_LABELS: partner}
    for count in (None, torch.tensor(8)):
        expected = plain.compute_loss(model, {"pixel_values": x, "labels": labels}, num_items_in_batch=count)
        at_one = ours.compute_loss(model, {**batch, MIX_LAMBDA: torch.ones(4)}, num_items_in_batch=count)
        torch.testing.assert_close(at_one, expected)
        mixed = ours.compute_loss(model, {**batch, MIX_LAMBDA: torch.full((4,), 0.3)}, num_items_in_batch=count)
        logits = model(pixel_values=x).logits.double()
        by_hand = 0.3 * F.cross_entropy(logits, labels, reduction="none")
        by_hand = by_hand + 0.7 * F.cross_entropy(logits, partner, reduction="none")
        torch.testing.assert_close(mixed.double(), by_hand.sum() / (4 if count is None else 8), rtol=1e-5, atol=1e-6)
