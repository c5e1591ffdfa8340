"""Teacher-output caching: cached training equals online training, top-k folding, fingerprints and refusals."""

import copy
import json
import math
import os
import re

import datasets
import numpy as np
import pytest
import torch
from tiny_models import COMMON, dataset_for, llama, lm_data, parameters_of, projector_of, teacher_student_pair
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from hfkd import DistillationConfig, DistillationTrainer, TeacherCache, build_teacher_cache
from hfkd.cache import (
    CACHE_FILE,
    FORMAT_VERSION,
    CacheArguments,
    TeacherCacheError,
    decode_topk_logprobs,
    encode_topk_logprobs,
    id_bytes,
    pack_ids,
    unpack_ids,
)
from hfkd.cache import parse_size as hfkd_parse
from hfkd.losses import LOGIT_LOSSES
from hfkd.losses.topk import fold_teacher, topk_logit_loss


def _config(tmp_path, name="run", **terms):
    values = dict(
        max_steps=2,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        task_weight=0.5,
        logit_weight=1.0,
        **COMMON,
    )
    values.update(terms)
    return DistillationConfig(output_dir=str(tmp_path / name), **values)


class _Counter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def _train(config, student, teacher, data, **kwargs):
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data, **kwargs)
    trainer.train()
    return trainer, [e for e in trainer.state.log_history if "loss" in e], parameters_of(student)


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("chunk", [0, 5])
def test_cached_training_equals_online_training_and_runs_no_teacher(tmp_path, chunk):
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    terms = dict(hidden_weight=1.0, logit_chunk_size=chunk)
    cache = build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, **terms),
        student=llama(hidden=16, layers=2, seed=1),
        top_k=0,
        hidden_dtype="float32",  # exactness; the default bfloat16 is measured in benchmarks/README.md
        batch_size=3,
        max_shard_size=1,  # bytes: every batch of 3 rows makes its own shard
        progress=False,
    )
    assert len(cache) == 8 and len(cache.meta["shards"]) == 3 and cache.logits["mode"] == "dense"
    assert cache.hidden_layers == [0, 2, 4]  # uniform map for a 2-layer student of a 4-layer teacher
    # A shard is a plain Arrow file that datasets can open.
    assert datasets.Dataset.from_file(str(tmp_path / "cache" / "data-00000.arrow")).num_rows == 3

    _, online_logs, online = _train(_config(tmp_path, "a", **terms), llama(hidden=16, layers=2, seed=1), teacher, data)
    counter = _Counter(teacher)
    trainer, cached_logs, cached = _train(
        _config(tmp_path, "b", teacher_cache_dir=str(tmp_path / "cache"), **terms),
        llama(hidden=16, layers=2, seed=1),
        teacher,  # given as well: it must not run in training
        data,
    )
    assert counter.calls == 0
    assert (trainer.step.plan.head is not None) == (chunk > 0)
    for a, b in zip(online_logs, cached_logs, strict=True):
        for key in ("loss", "task", "distill/logit", "distill/hidden"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    for name in online:
        torch.testing.assert_close(cached[name], online[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["bert_sequence", "vit"])
def test_cached_classification_and_vision_equal_online_without_any_teacher(tmp_path, family):
    """Small label spaces keep every logit; ViT tokens have no mask; widths differ, so projections train."""
    teacher, student = teacher_student_pair(family)
    data = dataset_for(family)
    terms = dict(hidden_weight=1.0, max_steps=2, per_device_train_batch_size=4, learning_rate=0.1)
    build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, **terms),
        student=student,
        hidden_dtype="float32",
        progress=False,
    )
    _, online_logs, online = _train(_config(tmp_path, "a", **terms), copy.deepcopy(student), teacher, data)
    trainer, cached_logs, cached = _train(
        _config(tmp_path, "b", teacher_cache_dir=str(tmp_path / "cache"), **terms), student, None, data
    )
    assert trainer.teacher_model is None and projector_of(trainer) is not None
    for a, b in zip(online_logs, cached_logs, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for name in online:
        torch.testing.assert_close(cached[name], online[name], rtol=1e-5, atol=1e-6, msg=name)
    # Without a teacher, evaluation reports the student's own loss only.
    metrics = trainer.evaluate(dataset_for(family))
    assert "eval_loss" in metrics and "eval_distill/logit" not in metrics


def test_topk_cache_stores_the_teachers_own_log_probabilities_at_the_configured_temperature(tmp_path):
    """Each stored value against a float64 forward of the teacher: log softmax(logits / T) at the k stored ids, which
    are the k most likely, and log(1 - their mass) in the last column. Every row, real positions only. (The 'float'
    encoding, format version 1's columns; the compact one is checked against the same reference below.)"""
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    temperature, k = 2.0, 8
    cache = build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, temperature=temperature),
        top_k=k,
        topk_encoding="float",
        progress=False,
    )
    assert cache.logits["temperature"] == temperature
    stored = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(tmp_path / "cache" / name)) for name in cache.meta["shards"]]
    )
    assert stored["row"] == list(range(len(data)))
    reference_teacher = copy.deepcopy(teacher).double().eval()
    checked = 0
    for row in range(len(data)):
        length = sum(data[row]["attention_mask"])
        assert stored[row]["length"] == length
        ids = np.asarray(stored[row]["topk_ids"]).reshape(length, k)
        log_probs = np.asarray(stored[row]["topk_logprobs"], dtype=np.float64).reshape(length, k + 1)
        if length == 0:  # a row that is all padding stores nothing
            continue
        with torch.no_grad():
            logits = reference_teacher(
                input_ids=torch.tensor([data[row]["input_ids"][:length]]),
                attention_mask=torch.ones(1, length, dtype=torch.long),
            ).logits[0]
        for position in range(length):
            scaled = [float(v) / temperature for v in logits[position]]
            top = max(scaled)
            log_norm = top + math.log(sum(math.exp(v - top) for v in scaled))
            reference = [v - log_norm for v in scaled]  # log softmax(logits / T)
            chosen = [int(i) for i in ids[position]]
            assert len(set(chosen)) == k
            rest = [reference[i] for i in range(len(reference)) if i not in chosen]
            assert min(reference[i] for i in chosen) >= max(rest) - 1e-6, "not the k most likely ids"
            np.testing.assert_allclose(log_probs[position, :k], [reference[i] for i in chosen], rtol=0, atol=1e-5)
            rest_mass = math.log(sum(math.exp(v) for v in rest))
            assert log_probs[position, k] == pytest.approx(rest_mass, abs=1e-5)
            checked += 1
    assert checked == sum(sum(m) for m in data["attention_mask"])


def test_topk_cache_trains_and_logs_the_folded_divergence(tmp_path):
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    cache = build_teacher_cache(
        teacher, data, str(tmp_path / "cache"), args=_config(tmp_path, temperature=2.0), top_k=8, progress=False
    )
    assert cache.logits["mode"] == "topk" and cache.logits["top_k"] == 8
    assert 0 < cache.logits["mean_top_k_mass"] < 1
    for chunk in (0, 3):
        trainer, logs, _ = _train(
            _config(tmp_path, f"r{chunk}", teacher_cache_dir=str(tmp_path / "cache"), logit_chunk_size=chunk),
            llama(hidden=16, layers=2, seed=1),
            None,
            data,
        )
        assert all(torch.isfinite(torch.tensor(log["distill/logit"])) for log in logs)
        if chunk == 0:
            unchunked = logs
    assert [log["loss"] for log in logs] == pytest.approx([log["loss"] for log in unchunked], rel=1e-5)


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd"])
def test_topk_folding_is_exact_with_one_class_left_and_never_exceeds_the_full_divergence(name):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 20, generator=g) * 2, torch.randn(6, 20, generator=g) * 2
    full = LOGIT_LOSSES[name](student, teacher, temperature=1.5, beta=0.3)
    ids, log_probs = fold_teacher(teacher, 19, 1.5)  # the "rest" bucket is the one class left out
    exact = topk_logit_loss(name, student, ids, log_probs, temperature=1.5, beta=0.3)
    torch.testing.assert_close(exact, full, rtol=1e-5, atol=1e-6)
    for k in (1, 4, 10):
        ids, log_probs = fold_teacher(teacher, k, 1.5)
        folded = topk_logit_loss(name, student, ids, log_probs, temperature=1.5, beta=0.3)
        # Merging classes never increases an f-divergence (data processing inequality).
        assert (folded <= full + 1e-5).all()
    with pytest.raises(ValueError, match="top_k=0"):
        topk_logit_loss("mse", student, ids, log_probs, temperature=1.0)


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.fixture
def lm_cache(tmp_path):
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    build_teacher_cache(
        teacher, data, str(tmp_path / "cache"), args=_config(tmp_path, temperature=2.0), top_k=8, progress=False
    )
    return data, teacher, str(tmp_path / "cache")


def test_a_cache_that_does_not_match_the_run_is_refused(tmp_path, lm_cache):
    data, teacher, path = lm_cache
    student = llama(hidden=16, layers=2, seed=1)

    def make(data=data, teacher=None, **terms):
        config = _config(tmp_path, "run", teacher_cache_dir=path, **{"temperature": 2.0, **terms})
        return DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data)

    changed = data.map(
        lambda row, i: {"input_ids": [7, *row["input_ids"][1:]] if i == 3 else row["input_ids"]}, with_indices=True
    )
    with pytest.raises(TeacherCacheError, match="not the data"):
        make(data=changed)
    with pytest.raises(TeacherCacheError, match="not the data"):
        make(data=data.shuffle(seed=1))
    with pytest.raises(TeacherCacheError, match="not the one"):
        make(teacher=llama(hidden=32, layers=4, seed=3))
    with pytest.raises(TeacherCacheError, match="temperature=1.0 but"):
        config = _config(tmp_path, "run", teacher_cache_dir=path, temperature=1.0)
        DistillationTrainer(model=student, args=config, train_dataset=data)
    with pytest.raises(TeacherCacheError, match="needs full logits"):
        make(logit_loss="mse")
    with pytest.raises(TeacherCacheError, match="holds no hidden states"):
        make(hidden_weight=1.0)
    with pytest.raises(TeacherCacheError, match="attention maps are not cached"):
        make(attention_weight=1.0)
    with pytest.raises(TeacherCacheError, match="holds no hfkd_cache.json"):
        DistillationTrainer(
            model=student, args=_config(tmp_path, "run", teacher_cache_dir=str(tmp_path)), train_dataset=data
        )
    assert not (tmp_path / "run").exists()  # no refused trainer left its output_dir behind
    make(teacher=teacher)  # the right teacher, data and settings are accepted
    assert (tmp_path / "run").is_dir()


def test_hidden_layers_missing_from_the_cache_are_refused(tmp_path):
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, hidden_weight=1.0, hidden_layer_map="0,4"),
        student=llama(hidden=16, layers=1, seed=1),
        progress=False,
    )
    config = _config(tmp_path, "run", teacher_cache_dir=str(tmp_path / "cache"), hidden_weight=1.0)
    with pytest.raises(TeacherCacheError, match=r"hidden_states\[2\], but the teacher cache holds \[0, 4\]"):
        DistillationTrainer(model=llama(hidden=16, layers=2, seed=1), args=config, train_dataset=data)


def _tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(64)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w1")))
    tokenizer.pad_token, tokenizer.mask_token = "w0", "w2"
    return tokenizer


def test_random_augmentation_and_left_padding_are_refused(tmp_path):
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    args = _config(tmp_path)
    augmented = copy.deepcopy(data)
    augmented.set_transform(lambda batch: batch)
    with pytest.raises(TeacherCacheError, match="transform"):
        build_teacher_cache(teacher, augmented, str(tmp_path / "c1"), args=args, progress=False)
    masking = DataCollatorForLanguageModeling(_tokenizer(), mlm=True, mlm_probability=0.5)
    with pytest.raises(TeacherCacheError, match="random masks or augmentations"):
        build_teacher_cache(teacher, data, str(tmp_path / "c2"), args=args, data_collator=masking, progress=False)
    left = data.map(lambda row: {"attention_mask": row["attention_mask"][::-1], "input_ids": row["input_ids"][::-1]})
    with pytest.raises(TeacherCacheError, match="padded on the left"):
        build_teacher_cache(teacher, left, str(tmp_path / "c3"), args=args, progress=False)
    assert not any((tmp_path / name).exists() for name in ("c1", "c2", "c3", "c3.partial"))

    # The same refusals at training time, if the cache was built otherwise.
    build_teacher_cache(teacher, data, str(tmp_path / "ok"), args=args, progress=False)
    with pytest.raises(TeacherCacheError, match="random masks or augmentations"):
        DistillationTrainer(
            model=llama(hidden=16, layers=2, seed=1),
            args=_config(tmp_path, "run", teacher_cache_dir=str(tmp_path / "ok")),
            train_dataset=data,
            data_collator=masking,
        )


def test_an_existing_cache_is_kept_until_a_new_one_is_complete(tmp_path, lm_cache):
    data, teacher, path = lm_cache
    before = open(os.path.join(path, CACHE_FILE)).read()
    # The refusal names the command line's flag as well as the Python argument.
    with pytest.raises(TeacherCacheError, match=r"already exists(.|\n)*--overwrite_cache true(.|\n)*overwrite=True"):
        build_teacher_cache(teacher, data, path, args=_config(tmp_path), progress=False)

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.calls = teacher, 0

        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("teacher crashed")
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_teacher_cache(Broken(), data, path, args=_config(tmp_path), batch_size=2, overwrite=True, progress=False)
    assert open(os.path.join(path, CACHE_FILE)).read() == before
    assert not os.path.exists(path + ".partial")
    TeacherCache(path)  # still readable


def test_a_term_that_reads_full_logits_is_served_by_the_cache_and_others_are_refused(tmp_path):
    """dkd reads only the teacher's logits: a dense cache serves it exactly; a relation term is refused by name."""
    teacher, student = teacher_student_pair("bert_sequence")
    data = dataset_for("bert_sequence")
    terms = dict(logit_weight=0.0, task_weight=1.0, terms=[{"name": "dkd", "weight": 1.0}], learning_rate=0.1)
    build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, **terms),
        student=student,
        hidden_dtype="float32",
        progress=False,
    )
    _, online_logs, online = _train(_config(tmp_path, "a", **terms), copy.deepcopy(student), teacher, data)
    _, cached_logs, cached = _train(
        _config(tmp_path, "b", teacher_cache_dir=str(tmp_path / "cache"), **terms), copy.deepcopy(student), None, data
    )
    for a, b in zip(online_logs, cached_logs, strict=True):
        assert b["distill/dkd"] == pytest.approx(a["distill/dkd"], rel=1e-5) and a["distill/dkd"] > 0
    for name in online:
        torch.testing.assert_close(cached[name], online[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(TeacherCacheError, match="The term 'rkd' reads the teacher's hidden states"):
        _train(
            _config(
                tmp_path,
                "c",
                teacher_cache_dir=str(tmp_path / "cache"),
                terms=[{"name": "rkd"}],
                **{k: v for k, v in terms.items() if k != "terms"},
            ),
            copy.deepcopy(student),
            None,
            data,
        )
    assert not (tmp_path / "c").exists()


def test_relation_and_pkd_terms_read_the_hidden_states_the_cache_stored_for_them(tmp_path):
    """rkd (pooled last layer) and pkd (CLS of mapped layers) read teacher hidden states: the cache stores exactly the
    layers they name, and cached training equals online training. A term reading another layer is refused on the
    probe batch, naming the layer, before anything is written."""
    teacher, student = teacher_student_pair("bert_sequence")
    data = dataset_for("bert_sequence")
    terms = dict(terms=[{"name": "rkd", "weight": 1.0}, {"name": "pkd", "weight": 10.0}], learning_rate=0.1)
    cache = build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, **terms),
        student=student,
        hidden_dtype="float32",
        progress=False,
    )
    last = teacher.config.num_hidden_layers
    # pkd-skip of a 2-layer student from a 4-layer teacher reads teacher layer 2; rkd the last layer.
    assert cache.hidden_layers == [2, last]
    _, online_logs, online = _train(_config(tmp_path, "a", **terms), copy.deepcopy(student), teacher, data)
    trainer, cached_logs, cached = _train(
        _config(tmp_path, "b", teacher_cache_dir=str(tmp_path / "cache"), **terms), copy.deepcopy(student), None, data
    )
    assert trainer.teacher_model is None
    for a, b in zip(online_logs, cached_logs, strict=True):
        for key in ("loss", "distill/rkd", "distill/pkd", "distill/logit"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert a["distill/rkd"] > 0 and a["distill/pkd"] > 0
    for name in online:
        torch.testing.assert_close(cached[name], online[name], rtol=1e-5, atol=1e-6, msg=name)

    with pytest.raises(
        TeacherCacheError, match=r"The term 'sp' reads teacher hidden_states\[1\], but the teacher cache"
    ):
        _train(
            _config(tmp_path, "c", teacher_cache_dir=str(tmp_path / "cache"), terms=[{"name": "sp", "layer": 1}]),
            copy.deepcopy(student),
            None,
            data,
        )
    assert not (tmp_path / "c").exists()
    with pytest.raises(TeacherCacheError, match="The term 'minilm' reads the teacher's submodule outputs"):
        build_teacher_cache(
            teacher,
            data,
            str(tmp_path / "cache2"),
            args=_config(tmp_path, terms=[{"name": "minilm"}]),
            student=student,
            progress=False,
        )


def test_crd_reads_its_rows_from_a_teacher_cache_and_equals_online_training(tmp_path):
    """CRD keeps a memory row per training example, so batches carry each row's index; a teacher cache routes rows
    by the same index. Both must agree: a CRD run from a cache was once refused (the row index column made the data
    look unlike the cached data) and now equals the online run."""
    teacher, student = teacher_student_pair("bert_sequence")
    data = dataset_for("bert_sequence")
    terms = dict(terms=[{"name": "crd", "weight": 1.0, "num_negatives": 4}], learning_rate=0.1)
    build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, **terms),
        student=student,
        hidden_dtype="float32",
        progress=False,
    )
    online_trainer, online_logs, online = _train(
        _config(tmp_path, "a", **terms), copy.deepcopy(student), teacher, data
    )
    trainer, cached_logs, cached = _train(
        _config(tmp_path, "b", teacher_cache_dir=str(tmp_path / "cache"), **terms), copy.deepcopy(student), None, data
    )
    assert trainer.teacher_model is None
    for a, b in zip(online_logs, cached_logs, strict=True):
        for key in ("loss", "distill/crd", "distill/logit"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert a["distill/crd"] > 0
    for name in online:
        torch.testing.assert_close(cached[name], online[name], rtol=1e-5, atol=1e-6, msg=name)
    # the memory banks were updated at the same rows
    banks = {k: v for k, v in online_trainer.term_set.state_dict().items() if "memory" in k}
    assert banks
    for key, value in trainer.term_set.state_dict().items():
        if key in banks:
            torch.testing.assert_close(value, banks[key], rtol=1e-5, atol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------------- compact encoding
def _reference_topk(logits: np.ndarray, k: int, temperature: float):
    """float64, written out: (ids of the k largest logits, most likely first; their log softmax(logits / T); the log
    of the mass of all other classes)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    top = scaled.max(-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        log_norm = top + np.log(np.exp(scaled - top).sum(-1, keepdims=True))
    log_p = scaled - log_norm
    ids = np.argsort(-log_p, axis=-1, kind="stable")[..., :k]
    chosen = np.take_along_axis(log_p, ids, -1)
    others = np.ones(log_p.shape, dtype=bool)
    np.put_along_axis(others, ids, False, -1)
    with np.errstate(divide="ignore"):  # a head whose classes outside the k all have probability 0: log 0
        rest = np.log(np.where(others, np.exp(log_p), 0.0).sum(-1))
    return ids, chosen, rest


# The documented bound: each decoded top-k log-probability within step + 2**-11 (the float16 tail) of the teacher's;
# 1e-5 more for float32 arithmetic (the teacher's log-probabilities and the decoding are float32).
def _bound(step):
    return np.asarray(step, dtype=np.float64)[..., None] + 2.0**-11 + 1e-5


def test_compact_encoding_round_trips_within_its_documented_bound():
    g = torch.Generator().manual_seed(0)
    # Flat and peaked rows, at two temperatures, k from 1 to the whole head but one.
    logits = torch.randn(40, 300, generator=g, dtype=torch.float64) * torch.linspace(0.1, 12, 40).unsqueeze(-1)
    logits[0] = 0.5  # all classes equal: step 0
    for temperature in (1.0, 2.0):
        for k in (1, 8, 48, 299):
            ids_ref, top_ref, rest_ref = _reference_topk(logits.numpy(), k, temperature)
            ids, log_probs = fold_teacher(logits.float(), k, temperature)  # float32, as the cache computes them
            codes, step, rest = encode_topk_logprobs(log_probs)
            assert codes.dtype == np.uint8 and step.dtype == rest.dtype == np.float16
            assert codes.shape == (40, k) and step.shape == rest.shape == (40,)
            if k > 1:  # the top id codes 0, the k-th 255 (its gap is the span): the whole uint8 range is used
                spread = step > 0
                assert (codes[:, 0] == 0).all() and (codes[spread, -1] == 255).all()
            decoded = decode_topk_logprobs(codes, step, rest).double().numpy()
            assert decoded.shape == (40, k + 1)
            tied = np.isclose(top_ref[:, :1], top_ref[:, -1:], rtol=0, atol=1e-9)[:, 0]
            same = (ids.numpy() == ids_ref)[~tied]  # ties may be ordered otherwise, values are the same
            assert same.all()
            error = np.abs(decoded[:, :k] - top_ref)
            assert (error <= _bound(step)).all(), (temperature, k, float((error - _bound(step)).max()))
            # ... and that bound is small: the step is the span of the k log-probabilities / 255.
            span = top_ref[:, 0] - top_ref[:, -1]
            assert (step.astype(np.float64) <= span / 255 * (1 + 2**-10) + 1e-7).all()
            np.testing.assert_allclose(decoded[:, k], rest_ref, rtol=2.0**-11 + 1e-6, atol=1e-6)
            # The decoded k + 1 probabilities sum to 1, as the losses expect.
            np.testing.assert_allclose(np.exp(decoded).sum(-1), 1.0, rtol=0, atol=1e-5)

    # A head with masked classes (logit -inf) among the k: their probability stays 0, the others keep the bound.
    masked = torch.randn(3, 10, generator=g)
    masked[:, 4:] = float("-inf")
    ids, log_probs = fold_teacher(masked, 8, 1.0)
    codes, step, rest = encode_topk_logprobs(log_probs)
    decoded = decode_topk_logprobs(codes, step, rest).double().numpy()
    _, top_ref, _ = _reference_topk(masked.double().numpy(), 8, 1.0)
    assert np.isfinite(decoded).all() and (np.exp(decoded[:, 4:]) < 1e-40).all()
    assert (np.abs(decoded[:, :4] - top_ref[:, :4]) <= _bound(step)).all()


@pytest.mark.parametrize("num_classes, width", [(64, 2), (65_536, 2), (65_537, 3), (1 << 24, 3), ((1 << 24) + 1, 4)])
def test_ids_take_the_narrowest_width_that_holds_the_vocabulary(num_classes, width):
    assert id_bytes(num_classes) == width
    ids = np.array([0, 1, 255, 256, 65_535, num_classes - 2, num_classes - 1]).clip(0, num_classes - 1)
    stored = pack_ids(ids, width)
    assert stored.nbytes == width * len(ids)
    assert stored.dtype == {2: np.uint16, 3: np.uint8, 4: np.uint32}[width]
    np.testing.assert_array_equal(unpack_ids(stored, width), ids)


@pytest.mark.parametrize("vocab", [64, 70_000])
def test_compact_cache_stores_the_teachers_top_k_within_the_bound_in_k_times_3_plus_4_bytes(tmp_path, vocab):
    """The compact cache's columns, read with datasets, decode to the float64 teacher's top-k log-probabilities
    within the documented bound; ids are uint16 (or 3 bytes past 65,536 classes); the trainer's reader (gather)
    returns the same decoded values at each row's real positions."""
    data, teacher = lm_data(vocab=vocab), llama(hidden=16, layers=2, vocab=vocab, seed=2)
    temperature, k = 2.0, 8
    cache = build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, temperature=temperature),
        top_k=k,
        progress=False,
    )
    width = 2 if vocab <= 65_536 else 3
    assert cache.meta["format_version"] == FORMAT_VERSION == 3
    assert cache.logits["encoding"] == "compact" and cache.logits["id_bytes"] == width
    stored = datasets.concatenate_datasets(
        [datasets.Dataset.from_file(str(tmp_path / "cache" / name)) for name in cache.meta["shards"]]
    )
    columns = {c: str(stored.features[c].feature.dtype) for c in stored.column_names if c.startswith("topk_")}
    assert columns == {
        "topk_ids": "uint16" if width == 2 else "uint8",
        "topk_codes": "uint8",
        "topk_step": "float16",
        "topk_rest": "float16",
    }
    # k ids and k codes per position, one step and one rest: k * (width + 1) + 4 bytes of values.
    table = stored.data.table
    positions = sum(sum(m) for m in data["attention_mask"])
    value_bytes = sum(table.column(c).combine_chunks().values.nbytes for c in columns)
    assert value_bytes == positions * (k * (width + 1) + 4)

    reference_teacher = copy.deepcopy(teacher).double().eval()
    steps = []
    batch = {key: torch.tensor(data[key]) for key in ("input_ids", "attention_mask")}
    gathered = cache.gather(range(len(data)), batch)
    for row in range(len(data)):
        length = sum(data[row]["attention_mask"])
        if length == 0:
            continue
        with torch.no_grad():
            logits = reference_teacher(input_ids=torch.tensor([data[row]["input_ids"][:length]])).logits[0]
        ids_ref, top_ref, rest_ref = _reference_topk(logits.numpy(), k, temperature)
        ids = unpack_ids(np.asarray(stored[row]["topk_ids"], dtype=np.uint16 if width == 2 else np.uint8), width)
        codes = np.asarray(stored[row]["topk_codes"], dtype=np.uint8).reshape(length, k)
        step = np.asarray(stored[row]["topk_step"], dtype=np.float16)
        rest = np.asarray(stored[row]["topk_rest"], dtype=np.float16)
        np.testing.assert_array_equal(ids.reshape(length, k), ids_ref)
        decoded = decode_topk_logprobs(codes, step, rest).double().numpy()
        assert (np.abs(decoded[:, :k] - top_ref) <= _bound(step)).all()
        np.testing.assert_allclose(decoded[:, k], rest_ref, rtol=2.0**-11 + 1e-6, atol=1e-6)
        # What training reads: the same values, at the row's real positions of the batch.
        np.testing.assert_array_equal(gathered["hfkd_cached_topk_ids"][row, :length].numpy(), ids_ref)
        torch.testing.assert_close(gathered["hfkd_cached_topk_logprobs"][row, :length].double(), torch.tensor(decoded))
        steps.append(step.astype(np.float64))
    steps = np.concatenate(steps)
    assert cache.logits["step_max"] == pytest.approx(steps.max()) and 0 < steps.max() < 0.05


def _with_decoded_log_probs(float_path: str, compact_path: str) -> None:
    """Rewrites a 'float' cache's top-k log-probabilities with the compact cache's decoded ones (same rows, same ids)."""
    import pyarrow as pa

    meta = json.loads(open(os.path.join(compact_path, CACHE_FILE)).read())
    k = meta["logits"]["top_k"]
    for name in meta["shards"]:
        read = lambda path: pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()  # noqa: E731
        floats, compact = read(os.path.join(float_path, name)), read(os.path.join(compact_path, name))
        rows = []
        for i in range(compact.num_rows):
            codes, step, rest = (
                np.asarray(compact.column(c)[i].values, dtype=dtype)
                for c, dtype in (("topk_codes", np.uint8), ("topk_step", np.float16), ("topk_rest", np.float16))
            )
            rows.append(decode_topk_logprobs(codes.reshape(-1, k), step, rest).numpy().reshape(-1))
        column = pa.array([list(r) for r in rows], type=pa.large_list(pa.float32()))
        table = floats.set_column(floats.column_names.index("topk_logprobs"), "topk_logprobs", column)
        with pa.OSFile(os.path.join(float_path, name + ".new"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as out:
                out.write_table(table)
        del floats, compact, table
        os.replace(os.path.join(float_path, name + ".new"), os.path.join(float_path, name))


def test_training_from_a_compact_cache_equals_training_from_the_float_cache_within_the_quantisation_bound(tmp_path):
    """The same teacher, data and k in both encodings. What training reads from them differs only in the top-k
    log-probabilities, by at most the documented bound; given the decoded values, training from the 'float' layout
    equals training from the compact cache (losses and student), and with the exact values it differs by what that
    bound moves a KL."""
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    terms = dict(temperature=2.0, task_weight=0.0)
    paths = {}
    for encoding in ("float", "compact", "decoded"):
        paths[encoding] = str(tmp_path / encoding)
        build_teacher_cache(
            teacher,
            data,
            paths[encoding],
            args=_config(tmp_path, **terms),
            top_k=8,
            topk_encoding="compact" if encoding == "compact" else "float",
            progress=False,
        )
    _with_decoded_log_probs(paths["decoded"], paths["compact"])
    caches = {e: TeacherCache(p) for e, p in paths.items()}
    batch = {key: torch.tensor(data[key]) for key in ("input_ids", "attention_mask")}
    got = {e: c.gather(range(len(data)), batch) for e, c in caches.items()}
    for encoding in ("compact", "decoded"):
        torch.testing.assert_close(got[encoding]["hfkd_cached_topk_ids"], got["float"]["hfkd_cached_topk_ids"])
    torch.testing.assert_close(
        got["decoded"]["hfkd_cached_topk_logprobs"], got["compact"]["hfkd_cached_topk_logprobs"], rtol=0, atol=0
    )
    bound = caches["compact"].logits["step_max"] + 2.0**-11 + 1e-5
    error = (got["compact"]["hfkd_cached_topk_logprobs"] - got["float"]["hfkd_cached_topk_logprobs"]).abs()
    assert 0 < float(error.max()) <= bound

    runs = {}
    for encoding, path in paths.items():
        config = _config(tmp_path, encoding + "-run", teacher_cache_dir=path, **terms)
        runs[encoding] = _train(config, llama(hidden=16, layers=2, seed=1), None, data)
    for a, b in zip(runs["decoded"][1], runs["compact"][1], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6) and b["distill/logit"] > 0
    for name, value in runs["decoded"][2].items():
        torch.testing.assert_close(runs["compact"][2][name], value, rtol=1e-6, atol=1e-8, msg=name)
    # Against the exact values: teacher log-probabilities off by at most e change a KL by e * sum_j t_j |log t_j -
    # log s_j| to first order, and these near-uniform tiny models keep that sum below 1: at most T^2 * e.
    for a, b in zip(runs["float"][1], runs["compact"][1], strict=True):
        assert abs(b["distill/logit"] - a["distill/logit"]) <= terms["temperature"] ** 2 * bound
        assert b["distill/logit"] != a["distill/logit"]


def test_a_cache_in_another_format_version_is_refused_naming_both_versions_and_the_fix(tmp_path, lm_cache):
    data, _, path = lm_cache
    meta_path = os.path.join(path, CACHE_FILE)
    meta = json.loads(open(meta_path).read())
    for found in (1, 4, None):
        # Version 1's hfkd_cache.json had no top-k encoding (its columns were the 'float' layout's).
        logits = {k: v for k, v in meta["logits"].items() if found != 1 or k not in ("encoding", "id_bytes")}
        written = {k: v for k, v in meta.items() if k != "format_version"}
        written.update(logits=logits, **({"format_version": found} if found is not None else {}))
        with open(meta_path, "w") as handle:
            json.dump(written, handle)
        version = found if found is not None else r"unknown \(none recorded\)"
        fix = re.escape(f"Rebuild it with `hfkd cache` and the flags it was built with, plus --cache_dir {path} ")
        expected = rf"in format version {version} .*reads format versions 2 and 3 only .*{fix}--overwrite_cache true"
        with pytest.raises(TeacherCacheError, match=expected):
            TeacherCache(path)
        config = _config(tmp_path, "run", teacher_cache_dir=path, temperature=2.0)
        with pytest.raises(TeacherCacheError, match=expected):
            DistillationTrainer(model=llama(hidden=16, layers=2, seed=1), args=config, train_dataset=data)
        assert not (tmp_path / "run").exists()
    with open(meta_path, "w") as handle:
        json.dump(dict(meta, logits=dict(meta["logits"], encoding="int4")), handle)
    with pytest.raises(TeacherCacheError, match="encoding 'int4', which this hfkd"):
        TeacherCache(path)


def test_bad_topk_options_are_refused_before_anything_runs(tmp_path):
    from transformers import HfArgumentParser

    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    calls = _Counter(teacher)
    for options, message in (
        (dict(topk_encoding="int4"), r"topk_encoding must be 'compact' .* or 'float' .*got 'int4'"),
        (dict(top_k=-1), r"top_k must be an integer >= 0 .*got -1"),
        (dict(top_k="8"), r"top_k must be an integer >= 0 .*got '8'"),
        (dict(top_k=True), r"top_k must be an integer >= 0 .*got True"),
    ):
        with pytest.raises(TeacherCacheError, match=message):
            build_teacher_cache(teacher, data, str(tmp_path / "c"), args=_config(tmp_path), progress=False, **options)
        with pytest.raises(ValueError, match=message):
            CacheArguments(cache_dir=str(tmp_path / "c"), **options)
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        CacheArguments(cache_dir=str(tmp_path / "c"), cache_dtype="bfloat16")
    assert calls.calls == 0 and not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    # From the command line: the defaults, and the format version 1 layout on request.
    (parsed,) = HfArgumentParser(CacheArguments).parse_args_into_dataclasses(["--cache_dir", "c"])
    assert parsed.top_k is None and parsed.topk_encoding == "compact"
    argv = ["--cache_dir", "c", "--topk_encoding", "float", "--top_k", "128"]
    (parsed,) = HfArgumentParser(CacheArguments).parse_args_into_dataclasses(argv)
    assert parsed.top_k == 128 and parsed.topk_encoding == "float"
    with pytest.raises(ValueError, match="topk_encoding must be"):
        HfArgumentParser(CacheArguments).parse_args_into_dataclasses(["--cache_dir", "c", "--topk_encoding", "x"])


def test_top_k_defaults_to_48_compact_and_128_float(tmp_path):
    data = lm_data(vocab=200)
    teacher = llama(hidden=16, layers=2, vocab=200, seed=2)
    for encoding, k in (("compact", 48), ("float", 128)):
        cache = build_teacher_cache(
            teacher, data, str(tmp_path / encoding), args=_config(tmp_path), topk_encoding=encoding, progress=False
        )
        assert cache.logits["top_k"] == k and cache.logits["encoding"] == encoding


def test_a_leftover_partial_folder_is_reported_and_removed(tmp_path, caplog):
    """A build killed from outside (e.g. by the OOM killer) cannot clean up: the next build into the folder says so."""
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    leftover = tmp_path / "cache.partial"
    leftover.mkdir()
    (leftover / "data-00000.arrow").write_bytes(b"half a shard")
    with caplog.at_level("WARNING", logger="hfkd.cache"):
        cache = build_teacher_cache(teacher, data, str(tmp_path / "cache"), args=_config(tmp_path), progress=False)
    assert re.search(r"cache\.partial, left by an earlier cache build .* probably killed \(out of memory", caplog.text)
    assert not leftover.exists() and len(cache) == len(data)


def test_the_expected_size_is_logged_and_a_disk_without_it_is_refused(tmp_path, caplog, monkeypatch):
    import shutil
    from collections import namedtuple

    import hfkd.cache

    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    args = _config(tmp_path, hidden_weight=1.0)
    student = llama(hidden=16, layers=2, seed=1)
    with caplog.at_level("INFO", logger="hfkd.cache"):
        cache = build_teacher_cache(teacher, data, str(tmp_path / "ok"), args=args, student=student, progress=False)
    # lm_data's real positions; top-48 (the default) of 64 classes in 2-byte ids: 48 * 3 + 4 bytes;
    # 3 hidden states of 32 bfloat16 values: 64 bytes each.
    tokens = sum(len(m) and sum(m) for m in data["attention_mask"])
    assert f"{148 + 3 * 64:,} B per token" in caplog.text and f"({tokens:,} tokens)" in caplog.text
    assert "logits 148 B per token" in caplog.text and "hidden_4 64 B per token" in caplog.text
    stored = sum(os.path.getsize(os.path.join(cache.path, f)) for f in cache.meta["shards"])
    expected = hfkd.cache._check_size(cache.meta, {}, data, str(tmp_path / "x"), "float32")
    assert expected <= stored  # values and offsets; the Arrow framing comes on top
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    with pytest.raises(
        TeacherCacheError, match=rf"needs about .*\({expected:,} bytes.* has only 1.0 kB \(1,000 bytes\)"
    ):
        build_teacher_cache(teacher, data, str(tmp_path / "full"), args=args, student=student, progress=False)
    assert not (tmp_path / "full").exists() and not (tmp_path / "full.partial").exists()


def test_shards_are_sized_in_bytes_and_a_format_2_cache_with_rows_per_shard_still_reads(tmp_path):
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    args = _config(tmp_path, hidden_weight=1.0)
    student = llama(hidden=16, layers=2, seed=1)
    one = build_teacher_cache(teacher, data, str(tmp_path / "one"), args=args, student=student, progress=False)
    path = str(tmp_path / "many")
    many = build_teacher_cache(
        teacher, data, path, args=args, student=student, batch_size=2, max_shard_size="1KB", progress=False
    )
    assert len(one.meta["shards"]) == 1 and many.meta["shard_rows"] == [2, 2, 2, 2]
    batch = {"attention_mask": torch.tensor(data["attention_mask"])}
    expected = one.gather(range(8), batch)
    for key, value in many.gather(range(8), batch).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    # Hidden states in bfloat16 by default: within bfloat16's rounding of float32 (half a unit in the last of its 7
    # mantissa bits: 2**-8 relative).
    exact = build_teacher_cache(
        teacher, data, str(tmp_path / "f32"), args=args, student=student, hidden_dtype="float32", progress=False
    )
    reference = exact.gather(range(8), batch)
    for t in exact.hidden_layers:
        value, want = expected[f"hfkd_cached_hidden_{t}"], reference[f"hfkd_cached_hidden_{t}"]
        assert (value - want).abs().le(want.abs() * 2**-8).all() and not torch.equal(value, want)
    # Format 2 had a fixed number of rows per shard and no shard_rows.
    meta = json.loads(open(os.path.join(path, CACHE_FILE)).read())
    meta.update(format_version=2, rows_per_shard=2)
    del meta["shard_rows"]
    with open(os.path.join(path, CACHE_FILE), "w") as handle:
        json.dump(meta, handle)
    picked = {"attention_mask": batch["attention_mask"][[7, 0, 3]]}
    for key, value in TeacherCache(path).gather([7, 0, 3], picked).items():
        torch.testing.assert_close(value, expected[key][[7, 0, 3]], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="max_shard_size must be a positive size .*got 'big'"):
        CacheArguments(cache_dir="c", max_shard_size="big")
    assert hfkd_parse("1.5GB") == 1_500_000_000 and hfkd_parse("256MiB") == 256 * 2**20 and hfkd_parse(4096) == 4096
    assert hfkd_parse("4096") == 4096 and hfkd_parse(" 12 B ") == 12  # a number as text: bytes


def test_the_data_digest_reads_the_rows_not_how_they_were_made():
    """Equal rows give equal digests whatever `datasets` recorded of their making (its own fingerprint travels in the
    Arrow schema's metadata); a changed value, row order or column does change the digest."""
    from hfkd.fingerprint import dataset_fingerprint

    rows = {"input_ids": [[1, 2, 3], [4, 5], [6]], "labels": [0, -100, 2]}
    plain = datasets.Dataset.from_dict(rows)
    remade = datasets.Dataset.from_dict({**rows, "text": ["a", "b", "c"]}).map(lambda r: r).remove_columns(["text"])
    assert plain._fingerprint != remade._fingerprint  # two histories
    assert dataset_fingerprint(plain) == dataset_fingerprint(remade)
    assert dataset_fingerprint(plain) != dataset_fingerprint(plain.select([1, 0, 2]))
    assert dataset_fingerprint(plain) != dataset_fingerprint(datasets.Dataset.from_dict({**rows, "labels": [0, 1, 2]}))
    assert dataset_fingerprint(plain) != dataset_fingerprint(plain.add_column("extra", [0, 0, 0]))
