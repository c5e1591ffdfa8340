"""The chunked large-vocabulary logit loss: same loss and gradients as the full logits, without the full logits."""

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_models import COMMON, dataset_for, llama, lm_data, parameters_of, tiny_gpt2
from transformers import LlamaForCausalLM

import hfkd.probe as probe_module
from hfkd import DistillationConfig, DistillationTrainer
from hfkd.batch import PROBE_POSITIONS, probe_window
from hfkd.losses import LOGIT_LOSSES
from hfkd.losses.chunked import chunked_head_loss
from hfkd.losses.fused import kl_ce_with_grad
from hfkd.losses.topk import fold_teacher, topk_logit_loss


@pytest.mark.parametrize("loss_name", ["kl", "reverse_kl", "jsd", "mse"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_loss_equals_full_logits(loss_name, with_bias):
    g = torch.Generator().manual_seed(0)
    rows, width, vocab = 37, 8, 50
    hidden = torch.randn(rows, width, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(vocab, width, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_() if with_bias else None
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[::5] = -100
    loss_fn = LOGIT_LOSSES[loss_name]

    def loss_of(logits, start, end):
        divergence = loss_fn(logits, teacher[start:end], temperature=2.0, beta=0.3).sum()
        task = F.cross_entropy(logits.float(), targets[start:end], ignore_index=-100, reduction="sum")
        return 0.7 * divergence + 0.3 * task

    params = [p for p in (hidden, weight, bias) if p is not None]
    full = loss_of(F.linear(hidden, weight, bias), 0, rows)
    full_grads = torch.autograd.grad(full * 1.5, params)
    for chunk in (1, 8, rows, 100):
        chunked = chunked_head_loss(hidden, weight, bias, loss_of, chunk)
        grads = torch.autograd.grad(chunked * 1.5, params)  # an upstream factor reaches every gradient
        torch.testing.assert_close(chunked.double(), full.float().double(), rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, full_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the losses work in float32


def test_chunked_head_loss_without_gradients_and_bad_chunk():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    with torch.no_grad():
        value = chunked_head_loss(hidden, weight, None, lambda logits, s, e: logits.sum(), 2)
    assert value.item() == pytest.approx((hidden @ weight.T).sum().item(), rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_head_loss(hidden, weight, None, lambda logits, s, e: logits.sum(), 0)


def _run(tmp_path, name, student, teacher, data, chunk, batch=8, accumulation=1, **config):
    args = DistillationConfig(
        output_dir=str(tmp_path / name),
        max_steps=2,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        logging_steps=1,
        logit_chunk_size=chunk,
        **{**COMMON, **config},
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    shapes = []
    head = student.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    trainer.train()
    handle.remove()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return trainer, logs, parameters_of(student), shapes


@pytest.mark.parametrize(
    "terms",
    [
        {"task_weight": 0.5, "logit_weight": 1.0, "logit_loss": "kl"},
        {"task_weight": 0.0, "logit_weight": 1.0, "logit_loss": "jsd", "jsd_beta": 0.2, "temperature": 1.0},
        {"task_weight": 1.0, "logit_weight": 0.3, "hidden_weight": 1.0, "logit_loss": "reverse_kl"},
    ],
)
@pytest.mark.parametrize("batch,accumulation", [(8, 1), (2, 4)])
def test_chunked_training_matches_full_logits(tmp_path, terms, batch, accumulation):
    """Two SGD steps (ragged padding, accumulation): losses, terms and weights as with full logits."""
    results = {}
    for chunk in (0, 5):
        trainer, logs, params, shapes = _run(
            tmp_path,
            f"c{chunk}",
            llama(hidden=16, layers=2, seed=1),
            llama(hidden=32, layers=4, seed=2),
            lm_data(),
            chunk,
            batch,
            accumulation,
            **terms,
        )
        assert (trainer.step.plan.head is not None) == (chunk > 0)
        if chunk:  # the student's head ran on one position per row only: the full logits never existed
            assert shapes and all(shape[1] == 1 for shape in shapes)
        results[chunk] = logs, params
    (logs_full, params_full), (logs_chunked, params_chunked) = results[0], results[5]
    for full, chunked in zip(logs_full, logs_chunked, strict=True):
        for key in ("loss", "task", "distill/logit", "distill/hidden"):
            if key in full:
                assert chunked[key] == pytest.approx(full[key], rel=1e-5, abs=1e-6), key  # float32 sums, other order
    for name in params_full:
        torch.testing.assert_close(params_chunked[name], params_full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_chunked_training_with_tied_embeddings_matches_full_logits(tmp_path):
    """GPT-2 ties its head to the input embeddings: both uses of the weight add up their gradients."""
    data = dataset_for("gpt2", num_rows=8)
    results = []
    for chunk in (0, 4):
        student, teacher = tiny_gpt2(hidden_size=16, num_layers=2, seed=1), tiny_gpt2(seed=2)
        assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
        _, logs, params, _ = _run(tmp_path, f"g{chunk}", student, teacher, data, chunk, task_weight=0.5)
        results.append((logs, params))
    for key in ("loss", "task", "distill/logit"):
        assert results[1][0][-1][key] == pytest.approx(results[0][0][-1][key], rel=1e-5), key
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, rtol=1e-5, atol=1e-6, msg=name)


class _ScaledLlama(LlamaForCausalLM):
    """Logits that are not a plain linear head of the hidden states (like soft-capping or logit scaling)."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids, attention_mask, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_heads_that_do_more_than_a_matmul_keep_the_full_logits(tmp_path, caplog):
    student = llama(hidden=16, layers=2, seed=1)
    teacher = _ScaledLlama(copy.deepcopy(llama(hidden=32, layers=4, seed=2).config))
    with caplog.at_level("WARNING", logger="hfkd.trainer"):
        trainer, logs, _, shapes = _run(tmp_path, "scaled", student, teacher, lm_data(), 5, task_weight=0.5)
    assert trainer.step.plan.head is None
    assert "not a plain linear head" in caplog.text
    assert shapes and all(shape[1] > 1 for shape in shapes)
    assert all(torch.isfinite(torch.tensor(log["distill/logit"])) for log in logs)


def test_evaluation_uses_chunks_only_when_logits_are_not_returned(tmp_path):
    for loss_only in (True, False):
        student = llama(hidden=16, layers=2, seed=1)
        args = DistillationConfig(
            output_dir=str(tmp_path / str(loss_only)),
            per_device_eval_batch_size=4,
            prediction_loss_only=loss_only,
            logit_chunk_size=3,
            **COMMON,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=llama(hidden=32, layers=4, seed=2), args=args, eval_dataset=lm_data()
        )
        shapes = []
        student.get_output_embeddings().register_forward_hook(lambda m, a, out, seen=shapes: seen.append(out.shape[1]))
        metrics = trainer.evaluate()
        assert torch.isfinite(torch.tensor(metrics["eval_distill/logit"]))
        if loss_only:
            chunked = metrics
            assert all(length == 1 for length in shapes)
        else:
            assert all(length > 1 for length in shapes)
            for key in ("eval_loss", "eval_task", "eval_distill/logit"):
                assert chunked[key] == pytest.approx(metrics[key], rel=1e-5), key


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("teacher_kind", ["dense", "topk"])
def test_closed_form_kl_and_cross_entropy_gradient_equals_autograd(temperature, teacher_kind):
    """The closed-form path (used for logit_loss='kl') against autograd on the registered losses, in float64."""
    g = torch.Generator().manual_seed(0)
    rows, vocab = 9, 40
    student = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[2] = -100
    topk = fold_teacher(teacher, 6, temperature) if teacher_kind == "topk" else None
    if topk is not None:
        topk = (topk[0], topk[1].double())
        kl = topk_logit_loss("kl", student, *topk, temperature=temperature).sum()
    else:
        kl = LOGIT_LOSSES["kl"](student, teacher, temperature=temperature).sum()
    ce = F.cross_entropy(student, targets, ignore_index=-100, reduction="sum")
    (expected_grad,) = torch.autograd.grad(0.3 * kl + 0.7 * ce, student)
    kl_sum, ce_sum, grad = kl_ce_with_grad(
        student.detach(),
        temperature=temperature,
        kl_scale=0.3,
        teacher_logits=teacher if topk is None else None,
        topk=topk,
        targets=targets,
        ce_scale=0.7,
    )
    torch.testing.assert_close(kl_sum, kl.detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ce_sum, ce.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("loss,beta", [("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0), ("reverse_kl", 0.5)])
def test_closed_form_jsd_and_reverse_kl_gradient_equals_autograd(temperature, loss, beta):
    """The closed form of reverse KL and GKD's JSD (hfkd.losses.fused) against autograd on the registered losses, in
    float64, with a masked class (-inf teacher logit) and the cross-entropy beside it."""
    g = torch.Generator().manual_seed(1)
    rows, vocab = 7, 30
    student = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 3
    if loss == "jsd" and beta < 1.0:  # the mixture keeps the student's mass: a masked teacher class is finite
        teacher[:, 4] = float("-inf")
    targets = torch.randint(0, vocab, (rows,), generator=g)
    targets[1] = -100
    value = LOGIT_LOSSES[loss](student, teacher, temperature=temperature, beta=beta).sum()
    ce = F.cross_entropy(student, targets, ignore_index=-100, reduction="sum")
    (expected_grad,) = torch.autograd.grad(0.4 * value + 0.6 * ce, student)
    value_sum, ce_sum, grad = kl_ce_with_grad(
        student.detach(),
        temperature=temperature,
        kl_scale=0.4,
        teacher_logits=teacher,
        targets=targets,
        ce_scale=0.6,
        loss=loss,
        beta=beta,
    )
    torch.testing.assert_close(value_sum, value.detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ce_sum, ce.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="no closed form"):
        kl_ce_with_grad(student.detach(), temperature=1.0, kl_scale=1.0, teacher_logits=teacher, loss="mse")


def _long_rows(n: int, length: int, prompt: int, vocab: int = 64):
    """Rows longer than the probe's window, the first `prompt` labels masked (a prompt)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(), "labels": labels.tolist()}
    )


def test_probe_window_cuts_plain_token_batches_only():
    ids = torch.arange(2 * 200).view(2, 200)
    plain = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "teacher_id": torch.tensor([0, 1]),
    }
    cut = probe_window(plain)
    assert {k: tuple(v.shape) for k, v in cut.items()} == {
        "input_ids": (2, PROBE_POSITIONS),
        "attention_mask": (2, PROBE_POSITIONS),
        "labels": (2, PROBE_POSITIONS),
        "teacher_id": (2,),
    }
    torch.testing.assert_close(cut["input_ids"], ids[:, :PROBE_POSITIONS])
    left_padded = dict(plain, attention_mask=torch.ones_like(ids).index_fill(1, torch.arange(150), 0))
    for kept in (
        {"input_ids": ids[:, :PROBE_POSITIONS]},  # short rows
        dict(plain, teacher_input_ids=ids),  # the teacher's own tokens
        dict(plain, hfkd_row=torch.tensor([0, 1])),  # a cache's rows are stored at full length
        dict(plain, labels=ids[:, :7]),  # an encoder-decoder's labels
        dict(plain, pixel_values=torch.zeros(2, 3, 8, 8)),  # anything else of two or more dimensions
        left_padded,  # a row with nothing to attend to in the window
    ):
        assert probe_window(kept) is kept


@pytest.mark.parametrize("prompt", [0, 150])
def test_probe_reads_a_window_of_long_rows_and_changes_nothing(tmp_path, prompt, monkeypatch):
    """Building a trainer runs both models on PROBE_POSITIONS tokens of long rows, not on the whole rows; the task
    normalisation is measured on whole rows when the window holds no label. Training is as with a whole-row probe."""
    runs = {}
    for whole in (False, True):
        if whole:
            monkeypatch.setattr(probe_module, "probe_window", lambda batch: batch)
        student, teacher = llama(hidden=16, layers=2, seed=1), llama(hidden=32, layers=4, seed=2)
        lengths = []
        hooks = [
            model.register_forward_pre_hook(
                lambda module, args, kwargs, name=name, lengths=lengths: lengths.append(
                    (name, kwargs["input_ids"].shape[1])
                ),
                with_kwargs=True,
            )
            for name, model in (("student", student), ("teacher", teacher))
        ]
        args = DistillationConfig(
            output_dir=str(tmp_path / f"w{whole}"),
            max_steps=2,
            per_device_train_batch_size=2,
            optim="sgd",
            learning_rate=0.5,
            logging_steps=1,
            logit_chunk_size=16,
            task_weight=0.5,
            hidden_weight=1.0,
            **COMMON,
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=_long_rows(4, 200, prompt)
        )
        for hook in hooks:
            hook.remove()
        assert trainer.step.plan.head is not None
        assert trainer.step.plan.task_uses_num_items  # Llama's loss divides by num_items_in_batch
        if not whole:
            measured = PROBE_POSITIONS if prompt < PROBE_POSITIONS else 200
            assert (
                lengths == [("student", PROBE_POSITIONS), ("teacher", PROBE_POSITIONS)] + [("student", measured)] * 2
            )
        trainer.train()
        runs[whole] = [e for e in trainer.state.log_history if "loss" in e], parameters_of(student)
    (logs, params), (logs_whole, params_whole) = runs[False], runs[True]
    assert logs == logs_whole
    for name in params:
        torch.testing.assert_close(params[name], params_whole[name], rtol=0, atol=0, msg=name)
