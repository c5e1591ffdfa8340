"""Logit standardisation (Sun et al., CVPR 2024) as an option of the logit term, against a float64 reference."""

import numpy as np
import pytest
import torch
from tiny_models import COMMON, bert, classification_data, llama, lm_data

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.losses.logits import standardize_logits


def _zscore(row: np.ndarray) -> np.ndarray:
    """(z - mean) / (unbiased std + 1e-7), from the paper's definition."""
    n = row.shape[0]
    mean = sum(row) / n
    std = (sum((x - mean) ** 2 for x in row) / (n - 1)) ** 0.5
    return np.array([(x - mean) / (std + 1e-7) for x in row])


def _kl_reference(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 KL(softmax(Z(t)/T) || softmax(Z(s)/T)) for one pair of logit vectors."""
    zs, zt = _zscore(student) / temperature, _zscore(teacher) / temperature
    ps = np.exp(zs - zs.max()) / np.exp(zs - zs.max()).sum()
    pt = np.exp(zt - zt.max()) / np.exp(zt - zt.max()).sum()
    return temperature**2 * sum(p * (np.log(p) - np.log(q)) for p, q in zip(pt, ps, strict=True))


def test_standardize_matches_the_definition_and_ignores_scale_and_shift():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    expected = np.stack([_zscore(row) for row in logits.numpy()])
    np.testing.assert_allclose(standardize_logits(logits).numpy(), expected, rtol=1e-12)
    # A student whose logits are the teacher's scaled and shifted has nothing left to learn.
    torch.testing.assert_close(standardize_logits(5 * logits + 2), standardize_logits(logits), rtol=1e-6, atol=1e-6)


def _config(tmp_path, **overrides):
    values = {"per_device_eval_batch_size": 16, "logit_weight": 1.0, "task_weight": 0.0, "temperature": 2.0}
    return DistillationConfig(
        output_dir=str(tmp_path / "out"), logit_standardize=True, **{**COMMON, **values, **overrides}
    )


def test_classification_term_equals_the_reference(tmp_path):
    data = classification_data(n=8)
    student, teacher = bert(layers=2, dropout=0.0, seed=1), bert(dropout=0.0)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), eval_dataset=data)
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        s, t = student.eval()(**batch).logits.double().numpy(), teacher.eval()(**batch).logits.double().numpy()
    expected = np.mean([_kl_reference(s[i], t[i], 2.0) for i in range(len(s))])
    metrics = trainer.evaluate()
    assert metrics["eval_distill/logit"] == pytest.approx(expected, rel=1e-4)
    # The student's logit range does not matter: scaling its classifier leaves the term where it was.
    with torch.no_grad():
        student.classifier.weight.mul_(10.0)
        student.classifier.bias.mul_(10.0)
    assert trainer.evaluate()["eval_distill/logit"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("loss", ["kl", "jsd"])
def test_chunked_language_model_path_equals_the_full_logits(tmp_path, loss):
    """The chunked path standardises each position's full row too (and leaves the task loss on raw logits)."""
    data = lm_data()
    rows = [data[i] for i in range(8)]
    batch = {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
    values = {}
    for chunk in (0, 4):
        trainer = DistillationTrainer(
            model=llama(seed=1),
            teacher_model=llama(layers=3),
            args=_config(tmp_path / str(chunk), logit_chunk_size=chunk, task_weight=0.5, logit_loss=loss),
            train_dataset=data,
        )
        assert (trainer.step.plan.head is not None) == (chunk > 0)
        trainer.model.train()
        values[chunk] = trainer.compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(values[4], values[0], rtol=1e-5, atol=1e-6)
