"""The trainer's loss terms on hand-built padded batches, against float64 references written from the definitions.

Other tests compare the trainer with itself (chunked with full logits, cached with online, accumulated with one big
batch), which a mistake made on both sides passes. Here the models are run directly, in float64, and every term is
recomputed from its definition with explicit loops over the positions that count:

- causal LM: position t predicts token t + 1, so it counts when label t + 1 is not -100 (or, without labels, when
  token t + 1 is real); the logit term is the mean over those positions of T^2 D(teacher_T, student_T), the task term
  the mean of the student's cross-entropy there;
- hidden and attention terms: the mean over real (unpadded) positions of each layer pair's loss, averaged over the
  pairs; the student's hidden states go through the learned projection first when the widths differ.
"""

import math

import pytest
import torch
from datasets import Dataset
from tiny_models import COMMON, llama, projector_of, tiny_bert

from hfkd import DistillationConfig, DistillationTrainer

TEMPERATURE = 2.0
BETA = 0.3

# Right padding (id 0, attention 0, label -100) of 0, 3 and 2 positions; the third row also masks its two-token
# prompt, so "label t + 1 counts" and "label t counts" pick different positions in every padded row.
CAUSAL_ROWS = {
    "input_ids": [[5, 17, 33, 8, 41, 12, 60], [9, 22, 47, 3, 0, 0, 0], [14, 6, 51, 28, 39, 0, 0]],
    "attention_mask": [[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]],
    "labels": [
        [5, 17, 33, 8, 41, 12, 60],
        [9, 22, 47, 3, -100, -100, -100],
        [-100, -100, 51, 28, 39, -100, -100],
    ],
}

# A sequence-classification batch padded by 0, 2 and 5 positions.
CLASSIFICATION_ROWS = {
    "input_ids": [[2, 17, 33, 8, 41, 12, 60, 3], [2, 22, 47, 71, 90, 3, 0, 0], [2, 51, 3, 0, 0, 0, 0, 0]],
    "attention_mask": [[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]],
    "labels": [0, 2, 1],
}


# ---------------------------------------------------------------------------------------------------- references
def _softmax(logits, temperature=1.0):
    scaled = [float(v) / temperature for v in logits]
    top = max(scaled)
    weights = [math.exp(v - top) for v in scaled]
    total = sum(weights)
    return [w / total for w in weights]


def _kl(p, q):
    """KL(p || q), with 0 log 0 = 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def _divergence(name, p_student, p_teacher):
    if name == "kl":
        return _kl(p_teacher, p_student)
    if name == "reverse_kl":
        return _kl(p_student, p_teacher)
    if name == "jsd":  # GKD: M = beta teacher + (1 - beta) student
        mixture = [BETA * t + (1 - BETA) * s for s, t in zip(p_student, p_teacher)]
        return BETA * _kl(p_teacher, mixture) + (1 - BETA) * _kl(p_student, mixture)
    raise ValueError(name)


def _logits(model, rows):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(rows["input_ids"]), attention_mask=torch.tensor(rows["attention_mask"])
        ).logits
    return out.double().numpy()


def _causal_reference(student, teacher, rows, loss_name, with_labels=True):
    """(logit term, task term) of a causal batch, from the definitions."""
    s, t = _logits(student, rows), _logits(teacher, rows)
    logit_sum, task_sum, count = 0.0, 0.0, 0
    for b, ids in enumerate(rows["input_ids"]):
        for position in range(len(ids) - 1):  # the last position predicts nothing
            if with_labels:
                target = rows["labels"][b][position + 1]
                if target == -100:
                    continue
            elif not rows["attention_mask"][b][position + 1]:
                continue
            p_s, p_t = _softmax(s[b, position], TEMPERATURE), _softmax(t[b, position], TEMPERATURE)
            logit_sum += TEMPERATURE**2 * _divergence(loss_name, p_s, p_t)
            if with_labels:
                task_sum += -math.log(_softmax(s[b, position])[target])
            count += 1
    return logit_sum / count, task_sum / count


def _features(model, rows):
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(rows["input_ids"]),
            attention_mask=torch.tensor(rows["attention_mask"]),
            output_hidden_states=True,
            output_attentions=True,
        )
    return [h.double().numpy() for h in out.hidden_states], [a.double().numpy() for a in out.attentions]


def _hidden_loss(name, a, b):
    if name == "mse":
        return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)
    if name == "cosine":
        dot = sum(x * y for x, y in zip(a, b))
        return 1.0 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    raise ValueError(name)


def _attention_loss(name, p_student, p_teacher):
    """One query row of one head."""
    if name == "mse":
        return sum((s - t) ** 2 for s, t in zip(p_student, p_teacher)) / len(p_student)
    if name == "kl":
        return _kl(p_teacher, p_student)
    raise ValueError(name)


def _feature_reference(student, teacher, projector, rows, hidden_pairs, attention_pairs, hidden_loss, attention_loss):
    """(hidden term, attention term): each layer pair's mean over the real positions, averaged over the pairs."""
    s_hidden, s_attention = _features(student, rows)
    t_hidden, t_attention = _features(teacher, rows)
    real = [(b, q) for b, mask in enumerate(rows["attention_mask"]) for q, keep in enumerate(mask) if keep]

    hidden_terms = []
    for s_idx, t_idx in hidden_pairs:
        layer = projector.layers[f"main__{s_idx}"] if projector is not None else None
        total = 0.0
        for b, q in real:
            h = s_hidden[s_idx][b, q]
            if layer is not None:  # the learned projection to the teacher's width: W h + bias
                weight = layer.weight.detach().double().numpy()
                bias = layer.bias.detach().double().numpy()
                h = [sum(weight[o, i] * h[i] for i in range(len(h))) + bias[o] for o in range(weight.shape[0])]
            total += _hidden_loss(hidden_loss, h, t_hidden[t_idx][b, q])
        hidden_terms.append(total / len(real))

    attention_terms = []
    for s_idx, t_idx in attention_pairs:
        heads = s_attention[s_idx].shape[1]
        total = 0.0
        for b, q in real:
            per_head = [
                _attention_loss(attention_loss, s_attention[s_idx][b, h, q], t_attention[t_idx][b, h, q])
                for h in range(heads)
            ]
            total += sum(per_head) / heads
        attention_terms.append(total / len(real))
    return sum(hidden_terms) / len(hidden_terms), sum(attention_terms) / len(attention_terms)


def _trainer(tmp_path, student, teacher, rows, **config):
    data = Dataset.from_dict(rows)
    args = DistillationConfig(
        output_dir=str(tmp_path / "out"),
        per_device_eval_batch_size=len(rows["input_ids"]),  # one batch: the terms are the batch's
        prediction_loss_only=True,  # evaluation may then use the chunked logit term as training does
        temperature=TEMPERATURE,
        jsd_beta=BETA,
        **COMMON,
        **config,
    )
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data, eval_dataset=data)


def _causal_pair():
    """Different widths and depths, in float64: the terms are then exact up to the float32 they are logged in."""
    models = llama(hidden=16, layers=2, seed=1).double(), llama(hidden=32, layers=4, seed=2).double()
    with torch.no_grad():
        for model in models:  # freshly initialised heads give almost uniform distributions: spread them out
            model.lm_head.weight.mul_(30.0)
    return models


# ---------------------------------------------------------------------------------------------------- causal LM
@pytest.mark.parametrize("chunk", [0, 3], ids=["full_logits", "chunked"])
@pytest.mark.parametrize(
    "loss_name,task_weight",
    [("kl", 0.5), ("kl", 0.0), ("jsd", 0.5), ("reverse_kl", 0.0)],
)
def test_causal_logit_and_task_terms_equal_the_definition(tmp_path, chunk, loss_name, task_weight):
    student, teacher = _causal_pair()
    trainer = _trainer(
        tmp_path,
        student,
        teacher,
        CAUSAL_ROWS,
        logit_chunk_size=chunk,
        logit_loss=loss_name,
        task_weight=task_weight,
        logit_weight=1.0,
    )
    assert (trainer.step.plan.head is not None) == (chunk > 0)
    metrics = trainer.evaluate()
    expected_logit, expected_task = _causal_reference(student, teacher, CAUSAL_ROWS, loss_name)
    # The terms are logged in float32; everything before is float64 (the task loss of the full-logits path is the
    # model's own, which transformers computes in float32).
    assert metrics["eval_distill/logit"] == pytest.approx(expected_logit, rel=1e-6)
    if task_weight:
        assert metrics["eval_task"] == pytest.approx(expected_task, rel=1e-6)
        assert metrics["eval_loss"] == pytest.approx(task_weight * expected_task + expected_logit, rel=1e-6)
    else:
        assert "eval_task" not in metrics
        assert metrics["eval_loss"] == pytest.approx(expected_logit, rel=1e-6)


@pytest.mark.parametrize("chunk", [0, 3], ids=["full_logits", "chunked"])
def test_causal_logit_term_without_labels_counts_the_real_next_tokens(tmp_path, chunk):
    """Without labels, position t counts when token t + 1 is real (the attention mask, shifted)."""
    student, teacher = _causal_pair()
    trainer = _trainer(
        tmp_path, student, teacher, CAUSAL_ROWS, logit_chunk_size=chunk, task_weight=0.0, logit_weight=1.0
    )
    batch = {key: torch.tensor(CAUSAL_ROWS[key]) for key in ("input_ids", "attention_mask")}
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, batch)
    expected, _ = _causal_reference(student, teacher, CAUSAL_ROWS, "kl", with_labels=False)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- features
def _sharpened(model):
    """Freshly initialised attention is almost uniform; larger query weights give maps that differ per position."""
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(30.0)
    return model


@pytest.mark.parametrize("hidden_loss,attention_loss", [("mse", "mse"), ("cosine", "kl")])
def test_hidden_and_attention_terms_equal_the_definition_on_a_padded_batch(tmp_path, hidden_loss, attention_loss):
    # BERT 16 wide / 2 layers and 32 wide / 4 layers, 2 heads each: the hidden term goes through projections.
    student = _sharpened(tiny_bert("sequence", 16, 2, seed=1).double())
    teacher = _sharpened(tiny_bert("sequence", 32, 4, seed=0).double())
    hidden_pairs, attention_pairs = [(0, 0), (1, 2), (2, 4)], [(0, 1), (1, 3)]
    trainer = _trainer(
        tmp_path,
        student,
        teacher,
        CLASSIFICATION_ROWS,
        task_weight=0.0,
        logit_weight=0.0,
        hidden_weight=1.0,
        attention_weight=1.0,
        hidden_loss=hidden_loss,
        attention_loss=attention_loss,
        hidden_layer_map=",".join(str(t) for _, t in hidden_pairs),
        attention_layer_map=",".join(str(t) for _, t in attention_pairs),
    )
    assert projector_of(trainer) is not None
    metrics = trainer.evaluate()
    student.eval()  # as the trainer runs it in evaluation: no dropout
    expected_hidden, expected_attention = _feature_reference(
        student,
        teacher,
        projector_of(trainer),
        CLASSIFICATION_ROWS,
        hidden_pairs,
        attention_pairs,
        hidden_loss,
        attention_loss,
    )
    # The hidden and attention losses compute in float32 (their inputs are cast), hence 1e-5.
    assert metrics["eval_distill/hidden"] == pytest.approx(expected_hidden, rel=1e-5)
    assert metrics["eval_distill/attention"] == pytest.approx(expected_attention, rel=1e-5)
    assert metrics["eval_loss"] == pytest.approx(expected_hidden + expected_attention, rel=1e-5)
