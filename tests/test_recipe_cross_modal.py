"""Cross-modal recipes (`student_modality: audio`): a text teacher fine-tuned on the rows' text teaches an audio
student built from a config on the same rows' audio, against the same student on the labels alone; what cannot run
is refused before anything is written. Tiny BERT teacher on disk, a tiny Whisper classifier from a config, synthetic
audio."""

import json
import os

import numpy as np
import pytest
import torch
from recipe_runs import _error, _recipe
from tiny_models import spoken_rows
from transformers import AutoConfig, AutoFeatureExtractor, AutoModelForAudioClassification

from hfkd.cli import main, parse_distill_args
from hfkd.cross_modal import check_processor
from hfkd.recipe.data import _student_processor

WHISPER = {
    "model_type": "whisper",
    "d_model": 16,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 32,
    "num_mel_bins": 16,
    "max_source_positions": 50,  # 100 frames: a 1 s window
    "classifier_proj_size": 16,
    "vocab_size": 100,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 1,
    "decoder_start_token_id": 1,
}
FEATURES = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 16, "chunk_length": 1}


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """30 rows of text, audio and a label (half of them kept unlabelled below: transfer rows), as a parquet file."""
    path = tmp_path_factory.mktemp("spoken") / "spoken.parquet"
    spoken_rows(30).to_parquet(str(path))
    return path


def _cross_modal(tmp_path, tiny_text, spoken, **extra):
    values = dict(
        dataset_name="parquet",
        label_column="label",
        student_num_layers=None,
        student_modality="audio",
        student_config=json.dumps(WHISPER),
        student_processor=json.dumps(FEATURES),
        hidden_weight=0.0,
        logit_weight=0.5,
        labelled_train_samples=12,
        eval_fraction=0.2,
        max_steps=3,
    )
    return _recipe(tmp_path, tiny_text[0], spoken, **{**values, **extra})


def test_a_text_teacher_teaches_an_audio_student_against_the_labels_alone(tmp_path, tiny_text, spoken):
    assert (
        main(
            ["distill", "--config", str(_cross_modal(tmp_path, tiny_text, spoken, compare_without_distillation=True))]
        )
        == 0
    )
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["student"]["modality"] == "audio"
    assert metrics["student"]["processor"] == "WhisperFeatureExtractor"
    assert "it reads audio through its own WhisperFeatureExtractor" in metrics["student"]["note"]
    assert metrics["data"]["transfer_examples"] == 12 and metrics["data"]["labelled_examples"] == 12
    assert metrics["labels_only"]["steps"] == 3 and "paired" in metrics
    log = json.loads((run / "training_log.json").read_text())
    assert any("distill/logit" in entry for entry in log)
    # The saved student is a plain audio classifier with its own feature extractor, loadable without hfkd.
    student = AutoModelForAudioClassification.from_pretrained(run)
    features = AutoFeatureExtractor.from_pretrained(run)
    heard = features([spoken_rows(1)["audio"][0]], sampling_rate=16_000, return_tensors="pt")
    assert student(**heard).logits.shape == (1, 3) and torch.isfinite(student(**heard).logits).all()
    card = (run / "README.md").read_text()
    assert "AutoModelForAudioClassification" in card and "pipeline_tag: audio-classification" in card
    assert "- cross-modal-distillation" in card
    assert not (run / "vocab.txt").exists()  # never the teacher's tokenizer


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"hidden_weight": 1.0}, "the terms ['hidden'] compare positions (tokens, audio frames)"),
        ({"generations": 2}, "not offered across modalities yet; set --generations 1"),
        ({"audio_column": "speech"}, "audio_column='speech' is not a column of the data set"),
        (
            {"student_processor": json.dumps({**FEATURES, "feature_size": 8})},
            "student_processor (WhisperFeatureExtractor) makes 8 features per frame (feature_size), but the student "
            "(WhisperForAudioClassification) reads 16 (num_mel_bins)",
        ),
        (
            {"student_processor": json.dumps({**FEATURES, "chunk_length": 2})},
            "student_processor (WhisperFeatureExtractor) makes inputs the student (WhisperForAudioClassification) "
            "cannot read",
        ),
        (
            {"student_processor": json.dumps({**FEATURES, "sampling_rate": 8000})},
            "audio_sampling_rate=16000: the data's audio is at 16000 Hz, but student_processor",
        ),
        ({"student_processor": None}, "student_modality='audio': give student_processor"),
        ({"task": "image-classification"}, "student_modality='audio' with task=image-classification"),
        ({"student_modality": None}, "student_processor is the processor of a student that reads another modality"),
    ],
)
def test_what_cannot_run_across_modalities_is_refused_before_anything_is_written(
    tmp_path, tiny_text, spoken, capsys, change, expected
):
    path = _cross_modal(tmp_path, tiny_text, spoken, **change)
    assert main(["distill", "--config", str(path)]) == 2
    assert expected in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_rows_missing_their_audio_are_refused_naming_the_column(tmp_path, tiny_text, capsys):
    rows = spoken_rows(20).map(lambda r, i: {"audio": None if i % 7 == 3 else r["audio"]}, with_indices=True)
    path = tmp_path / "holes.parquet"
    rows.to_parquet(str(path))
    assert main(["distill", "--config", str(_cross_modal(tmp_path, tiny_text, path))]) == 2
    assert "rows have no value in the 'audio' column (audio_column): each row must hold both modalities" in _error(
        capsys
    )
    assert not (tmp_path / "run").exists()


def test_a_text_processor_for_the_audio_student_is_refused(tmp_path, tiny_text, spoken, capsys):
    """A folder holding the teacher's tokenizer (no feature extractor) given as the student's processor."""
    path = _cross_modal(tmp_path, tiny_text, spoken, student_processor=str(tiny_text[0]))
    assert main(["distill", "--config", str(path)]) == 2
    assert f"student_processor={str(tiny_text[0])!r}: could not build the student's audio processor" in _error(capsys)
    assert not (tmp_path / "run").exists()


def test_the_shipped_recipes_student_reads_what_its_processor_makes():
    """recipes/audio-classification/tweets-text-to-speech.yaml: its student_config and student_processor fit (a
    forward of the untrained student on 10 s of its features), without the data or the teacher."""
    path = os.path.join(
        os.path.dirname(__file__), "..", "recipes", "audio-classification", "tweets-text-to-speech.yaml"
    )
    recipe, data_args, config = parse_distill_args(["--config", path])
    assert recipe.student_modality == "audio" and config.logit_weight > 0 and data_args.audio_sampling_rate == 16_000
    features = _student_processor(recipe)
    spec = json.loads(recipe.student_config)
    student = AutoModelForAudioClassification.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
    check_processor(features, student, "student", "student_processor")
    heard = features([np.zeros(16_000 * 10, np.float32)], sampling_rate=16_000, return_tensors="pt")
    assert student(**heard).logits.shape == (1, 2)  # transformers' default of 2 labels: the run gives it 3


def test_a_teacher_cache_is_refused_across_modalities(tmp_path, tiny_text, spoken, capsys):
    path = _cross_modal(tmp_path, tiny_text, spoken, finetune_teacher=False)
    assert main(["cache", "--config", str(path), "--cache_dir", str(tmp_path / "cache")]) == 2
    assert "student_modality='audio': a teacher cache is not offered across modalities yet" in _error(capsys)
    assert not (tmp_path / "cache").exists()
    argv = ["--teacher_cache_dir", str(tmp_path / "cache")]
    assert main(["distill", "--config", str(path), *argv]) == 2
    assert "not offered across modalities yet; unset --teacher_cache_dir" in _error(capsys)
    assert not (tmp_path / "run").exists()
