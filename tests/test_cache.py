"""Teacher-output caching: cached training equals online training, top-k folding, fingerprints and refusals."""

import copy
import math
import os

import datasets
import numpy as np
import pytest
import torch
from tiny_models import COMMON, dataset_for, llama, lm_data, parameters_of, projector_of, teacher_student_pair
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from hfkd import DistillationConfig, DistillationTrainer, TeacherCache, build_teacher_cache
from hfkd.cache import CACHE_FILE, TeacherCacheError
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
        rows_per_shard=3,
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
    assert (trainer._chunk_heads is not None) == (chunk > 0)
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
        teacher, data, str(tmp_path / "cache"), args=_config(tmp_path, **terms), student=student, progress=False
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
    are the k most likely, and log(1 - their mass) in the last column. Every row, real positions only."""
    data, teacher = lm_data(), llama(hidden=32, layers=4, seed=2)
    temperature, k = 2.0, 8
    cache = build_teacher_cache(
        teacher,
        data,
        str(tmp_path / "cache"),
        args=_config(tmp_path, temperature=temperature),
        top_k=k,
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
    with pytest.raises(TeacherCacheError, match="already exists"):
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
        teacher, data, str(tmp_path / "cache"), args=_config(tmp_path, **terms), student=student, progress=False
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
        teacher, data, str(tmp_path / "cache"), args=_config(tmp_path, **terms), student=student, progress=False
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
