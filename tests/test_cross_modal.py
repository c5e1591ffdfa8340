"""Cross-modal distillation (hfkd.cross_modal): a text teacher and an audio student (and the other way round) over
paired rows, each reading its own column through its own processor; tiny BERT and Whisper classifiers from configs,
synthetic audio (and espeak-ng speech when it is installed)."""

import importlib.util
import os
import shutil

import numpy as np
import pytest
import torch
from tiny_models import (
    AUDIO_RATE,
    COMMON,
    spoken_rows,
    tiny_bert,
    tiny_whisper_classifier,
    whisper_features,
    word_tokenizer,
)
from transformers import BertForTokenClassification, ViTImageProcessor, Wav2Vec2FeatureExtractor

from hfkd import CrossModalCollator, DistillationConfig, DistillationTrainer
from hfkd.batch import student_inputs, teacher_inputs
from hfkd.cross_modal import modality

TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def features():
    return whisper_features()


def _collator(features, tokenizer, **kwargs):
    values = dict(student_columns="audio", teacher_columns="text", sampling_rate=AUDIO_RATE, **kwargs)
    return CrossModalCollator(features, tokenizer, **values)


def _trainer(tmp_path, features, tokenizer, rows, student=None, collator=None, teacher=None, **config):
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        **{"logit_weight": 1.0, "temperature": TEMPERATURE, **config},
        **COMMON,
    )
    return DistillationTrainer(
        model=student if student is not None else tiny_whisper_classifier(),
        teacher_model=teacher if teacher is not None else tiny_bert(),
        args=args,
        train_dataset=rows,
        eval_dataset=rows,
        data_collator=collator if collator is not None else _collator(features, tokenizer),
        processing_class=features,
    )


def test_each_processor_reads_its_modality(tokenizer, features):
    assert modality(tokenizer) == "text"
    assert modality(features) == "audio"
    assert modality(ViTImageProcessor(size=16)) == "image"
    with pytest.raises(ValueError, match="neither a tokenizer, an audio feature extractor nor an image processor"):
        modality(object())


def test_each_model_gets_its_own_columns_through_its_own_processor(tokenizer, features):
    rows = spoken_rows(5, labelled={0, 2})
    batch = _collator(features, tokenizer)([rows[i] for i in range(5)])
    texts, audio = list(rows["text"]), [np.asarray(a, np.float32) for a in rows["audio"]]
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    heard = features(audio, sampling_rate=AUDIO_RATE, return_tensors="pt")
    assert torch.equal(batch["teacher_input_ids"], tokens["input_ids"])
    assert torch.equal(batch["teacher_attention_mask"], tokens["attention_mask"])
    assert torch.allclose(batch["input_features"], heard["input_features"])
    assert batch["labels"].tolist() == [0, -100, 2, -100, -100]  # `label` stacked as `labels`; transfer rows -100
    # The student gets its features and the labels; the teacher its tokens alone, without the prefix.
    assert set(student_inputs(batch)) == {"input_features", "labels"}
    assert set(teacher_inputs(batch)) == {"input_ids", "token_type_ids", "attention_mask"}


def test_raw_audio_is_padded_to_the_longest_row_or_cut_at_max_seconds(tokenizer):
    raw = Wav2Vec2FeatureExtractor(sampling_rate=AUDIO_RATE, return_attention_mask=True)
    rows = spoken_rows(3)  # 0.20, 0.25 and 0.30 s
    lengths = [len(a) for a in rows["audio"]]
    batch = _collator(raw, tokenizer)([rows[i] for i in range(3)])
    assert batch["input_values"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(-1).tolist() == lengths
    cut = _collator(raw, tokenizer, max_seconds=0.25)([rows[i] for i in range(3)])
    assert cut["input_values"].shape == (3, 4000) and cut["attention_mask"].sum(-1).tolist() == [3200, 4000, 4000]


def test_a_teacher_of_another_modality_never_receives_the_students_inputs(tokenizer, features):
    rows = spoken_rows(3)
    batch = CrossModalCollator(
        tokenizer, features, student_columns="text", teacher_columns="audio", sampling_rate=AUDIO_RATE
    )([rows[i] for i in range(3)])
    assert set(teacher_inputs(batch)) == {"input_features"}  # not the student's input_ids beside its audio
    assert {"input_ids", "attention_mask", "labels"} <= set(student_inputs(batch))
    # Two image processors of one modality keep the merged view that `teacher_pixel_values` always had.
    assert set(teacher_inputs({"pixel_values": 0, "pixel_mask": 1, "teacher_pixel_values": 2})) == {
        "pixel_values",
        "pixel_mask",
    }


def test_the_logit_term_across_modalities_equals_a_float64_reference(tmp_path, tokenizer, features):
    """The term the trainer reports on a batch is T^2 KL(teacher_T || student_T) between the text teacher's class
    distribution on the rows' text and the audio student's on their audio, averaged over the rows."""
    rows = spoken_rows(4)
    teacher, student = tiny_bert(), tiny_whisper_classifier()
    with torch.no_grad():  # sharper heads than random initialisation gives: distributions far from uniform
        teacher.classifier.weight.mul_(40.0)
        student.classifier.weight.mul_(40.0)
    trainer = _trainer(tmp_path, features, tokenizer, rows, student, teacher=teacher, per_device_eval_batch_size=4)
    reported = trainer.evaluate()["eval_distill/logit"]
    trainer.model.eval()
    with torch.no_grad():
        t = trainer.teacher_model(**tokenizer(list(rows["text"]), padding=True, return_tensors="pt")).logits.double()
        heard = features([np.asarray(a, np.float32) for a in rows["audio"]], sampling_rate=AUDIO_RATE)
        s = trainer.model(input_features=torch.as_tensor(np.stack(heard["input_features"]))).logits.double()
    p = torch.softmax(t / TEMPERATURE, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s / TEMPERATURE, -1))).sum(-1)
    expected = float((TEMPERATURE**2 * kl).mean())
    assert expected > 0.01  # the two models disagree: the teacher reading other inputs would show
    assert reported == pytest.approx(expected, rel=1e-4)


def test_a_few_steps_train_the_audio_student_from_the_text_teacher(tmp_path, tokenizer, features):
    rows = spoken_rows(8, labelled={0, 1, 2})
    trainer = _trainer(tmp_path, features, tokenizer, rows, logging_steps=1)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.teacher_model.state_dict().items()}
    trainer.train()
    logged = [h for h in trainer.state.log_history if "distill/logit" in h]
    assert len(logged) == 3 and all(np.isfinite(h["distill/logit"]) and h["distill/logit"] > 0 for h in logged)
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(teacher_before[k], v) for k, v in trainer.teacher_model.state_dict().items())


def test_an_audio_teacher_teaches_a_text_student(tmp_path, tokenizer, features):
    rows = spoken_rows(8)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, **COMMON)
    collator = CrossModalCollator(
        tokenizer, features, student_columns="text", teacher_columns="audio", sampling_rate=AUDIO_RATE
    )
    trainer = DistillationTrainer(
        model=tiny_bert(hidden_size=16, num_layers=2, seed=1),
        teacher_model=tiny_whisper_classifier(hidden_size=32),
        args=args,
        train_dataset=rows,
        data_collator=collator,
        processing_class=tokenizer,
    )
    assert trainer.train().global_step == 2


# ------------------------------------------------------------------------------------------------ refusals
def _refused(tmp_path, match, build):
    with pytest.raises(ValueError, match=match):
        build()
    assert not os.path.exists(tmp_path / "out")  # refused before Trainer made the output folder


def test_a_row_missing_a_modality_is_refused_naming_the_column_and_the_field(tmp_path, tokenizer, features):
    collator = _collator(features, tokenizer)
    rows = spoken_rows(2)
    with pytest.raises(ValueError, match=r"no 'audio' column, which the student reads \(student_columns"):
        collator([{"text": "good", "label": 0}, rows[1]])
    with pytest.raises(ValueError, match=r"no value in its 'text' column, which the teacher reads \(teacher_columns"):
        collator([{**rows[0], "text": None}, rows[1]])
    _refused(
        tmp_path,
        r"train_dataset has no 'audio' column, which the student reads \(student_columns=\['audio'\].*set "
        "student_columns",
        lambda: _trainer(tmp_path, features, tokenizer, spoken_rows(4).remove_columns("audio")),
    )
    silent = spoken_rows(4).map(lambda r, i: {"audio": None if i == 2 else r["audio"]}, with_indices=True)
    _refused(
        tmp_path,
        r"1 row\(s\) have no value in the 'audio' column, which the student reads",
        lambda: _trainer(tmp_path, features, tokenizer, silent),
    )


def test_a_processor_for_another_model_is_refused_before_anything_is_written(tmp_path, tokenizer, features):
    rows = spoken_rows(4)
    # The tokenizer handed to the audio student (and the feature extractor to the text teacher).
    swapped = CrossModalCollator(
        tokenizer, features, student_columns="text", teacher_columns="audio", sampling_rate=AUDIO_RATE
    )
    _refused(
        tmp_path,
        r"student_processor \(BertTokenizer\w*, a text processor\) makes .*but the student "
        r"\(WhisperForAudioClassification\) reads `input_features`",
        lambda: _trainer(tmp_path, features, tokenizer, rows, collator=swapped),
    )
    # A feature extractor of another model: 8 mel bins for a student that reads 16.
    _refused(
        tmp_path,
        r"student_processor \(WhisperFeatureExtractor\) makes 8 features per frame.*reads 16 \(num_mel_bins\)",
        lambda: _trainer(tmp_path, features, tokenizer, rows, collator=_collator(whisper_features(8), tokenizer)),
    )


def test_audio_at_another_sampling_rate_is_refused(tokenizer, features):
    with pytest.raises(ValueError, match=r"sampling_rate=22050: the rows' audio is at 22050 Hz, but the student's"):
        CrossModalCollator(features, tokenizer, "audio", "text", sampling_rate=22_050)
    with pytest.raises(ValueError, match="give sampling_rate="):
        CrossModalCollator(features, tokenizer, "audio", "text")
    row = {"text": "good", "audio": {"array": [0.0] * 800, "sampling_rate": 8_000}, "label": 0}
    with pytest.raises(ValueError, match="audio is at 8000 Hz, but sampling_rate=16000"):
        _collator(features, tokenizer)([row])


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"hidden_weight": 1.0}, r"The terms \['hidden'\] compare the two models position by position"),
        ({"terms": [{"name": "rkd"}]}, r"The terms \['rkd'\]"),
        ({"augment": "word_mask"}, "augment cannot be combined with cross-modal distillation"),
        ({"train_sampling_strategy": "group_by_length"}, "group_by_length' cannot be combined with cross-modal"),
    ],
)
def test_what_needs_shared_positions_or_views_is_refused(tmp_path, tokenizer, features, config, match):
    _refused(tmp_path, match, lambda: _trainer(tmp_path, features, tokenizer, spoken_rows(4), **config))


def test_a_student_that_predicts_per_position_is_refused(tmp_path, tokenizer, features):
    collator = CrossModalCollator(
        tokenizer, features, student_columns="text", teacher_columns="audio", sampling_rate=AUDIO_RATE
    )
    student = BertForTokenClassification(tiny_bert(hidden_size=16, num_layers=2).config)
    args = DistillationConfig(output_dir=str(tmp_path / "out"), max_steps=1, **COMMON)
    _refused(
        tmp_path,
        "predicts per position; cross-modal distillation needs classifiers with one prediction per example",
        lambda: DistillationTrainer(
            model=student,
            teacher_model=tiny_whisper_classifier(hidden_size=32),
            args=args,
            train_dataset=spoken_rows(4).remove_columns("label"),
            data_collator=collator,
        ),
    )


def test_columns_beyond_one_per_modality_are_refused(tokenizer, features):
    with pytest.raises(ValueError, match=r"student_columns=\['audio', 'text'\].*name one column"):
        CrossModalCollator(features, tokenizer, ["audio", "text"], "text", sampling_rate=AUDIO_RATE)
    with pytest.raises(ValueError, match="student_columns and teacher_columns both name"):
        CrossModalCollator(features, tokenizer, "audio", "audio", sampling_rate=AUDIO_RATE)


def _prepare_script():
    """recipes/audio-classification/prepare_spoken_tweets.py, loaded as a module (it is a script, not in hfkd)."""
    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "audio-classification", "prepare_spoken_tweets.py")
    spec = importlib.util.spec_from_file_location("prepare_spoken_tweets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resampling_to_16_khz_keeps_a_tone_and_drops_what_16_khz_cannot_hold():
    resample = _prepare_script().resample
    t = np.arange(22_050 + 7) / 22_050  # a length the FFT is slow on: padded inside
    tone = resample(np.sin(2 * np.pi * 1000.0 * t).astype(np.float32), 22_050, 16_000)
    assert len(tone) == round(len(t) * 16_000 / 22_050)
    expected = np.sin(2 * np.pi * 1000.0 * np.arange(len(tone)) / 16_000)
    assert np.abs(tone - expected)[200:-200].max() < 1e-3  # away from the ends, where padding meets the tone
    # Above 8 kHz: dropped, not folded back to 7 kHz at full amplitude (what decimating without a filter gives);
    # what remains is the leakage of a tone cut off by the padding, 0.2% here.
    high = resample(np.sin(2 * np.pi * 9000.0 * t).astype(np.float32), 22_050, 16_000)
    assert np.abs(high)[200:-200].max() < 0.01


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_espeak_speech_becomes_the_students_features(tokenizer, features):
    """Two short strings spoken by espeak-ng (22,050 Hz) as the recipe's preparation speaks them, resampled to
    16 kHz, through the collator."""
    script = _prepare_script()
    texts = ["good film", "very bad movie"]
    audio = []
    for text in texts:
        speech = script.speak(text, voice="en-us", speed=175, pitch=50)
        assert speech.dtype == np.float32 and 0.3 < len(speech) / 22_050 < 3.0 and np.abs(speech).max() > 0.05
        audio.append(script.resample(speech, 22_050, AUDIO_RATE))
        assert len(audio[-1]) == round(len(speech) * AUDIO_RATE / 22_050)
    rows = [{"text": t, "audio": a, "label": i} for i, (t, a) in enumerate(zip(texts, audio))]
    batch = _collator(features, tokenizer)(rows)
    assert batch["input_features"].shape == (2, 16, 100) and torch.isfinite(batch["input_features"]).all()
    assert batch["labels"].tolist() == [0, 1]
