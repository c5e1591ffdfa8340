"""Checkpoints of students whose modules transformers 5 renamed (ViT: `vit.layers.*` in the model, the original
`vit.encoder.layer.*` on disk): resume and load_best_model_at_end restore them exactly, with a teacher, a peer or a
mean teacher beside them (hfkd.saved_weights). A checkpoint whose weights do not fit the student, or that only
from_pretrained can convert back (a mixture of experts), is refused, not warned about."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import COMMON, PAD_ID, VOCAB_SIZE, image_dataset, parameters_of, text_dataset, tiny_llama, tiny_vit
from transformers import (
    MarianConfig,
    MarianMTModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    TrainerCallback,
    ViTForImageClassification,
)

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.saved_weights import complete_load


class _StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _config(out, **kwargs):
    defaults = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=2,
        **{**COMMON, "save_strategy": "steps"},
    )
    return DistillationConfig(**{**defaults, **kwargs})


def _trainer(mode, out, callbacks=(), **kwargs):
    """A ViT student (16 wide, 2 layers) distilled from a wider ViT teacher (hidden term: projections in the
    checkpoint too), trained beside a ViT peer, or taught by its own mean teacher."""
    student = tiny_vit(16, 2, seed=1)
    data = image_dataset(8)
    extra = {}
    if mode == "teacher":
        extra = {"teacher_model": tiny_vit(32, 4, seed=0)}
        kwargs = {"hidden_weight": 1.0, **kwargs}
    elif mode == "peer":
        extra = {"peer_models": [tiny_vit(16, 2, seed=2)]}
    else:
        kwargs = {"teacher_ema_decay": 0.9, **kwargs}
    return DistillationTrainer(
        model=student, args=_config(out, **kwargs), train_dataset=data, callbacks=list(callbacks), **extra
    )


@pytest.mark.parametrize("mode", ["teacher", "peer", "ema"])
def test_a_vit_student_resumes_exactly(tmp_path, mode):
    full = _trainer(mode, tmp_path / "full")
    start = parameters_of(full.model)
    full.train()
    _trainer(mode, tmp_path / "cut", callbacks=[_StopAt(2)]).train()
    resumed = _trainer(mode, tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))

    # The encoder trained (an untouched layer would compare equal however the checkpoint loads).
    layer = "vit.layers.0.attention.q_proj.weight"
    assert not torch.equal(full.model.state_dict()[layer], start[layer])
    pairs = [(full.model, resumed.model)]
    if mode == "peer":
        pairs.append((full.peers["peer0"], resumed.peers["peer0"]))
    if mode == "ema":
        pairs.append((full.teacher_model, resumed.teacher_model))
    if mode == "teacher":
        pairs.append((full.term_set, resumed.term_set))
    for a, b in pairs:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=f"{type(a).__name__}: {name}")


def test_load_best_model_at_end_brings_back_the_vit_of_the_best_checkpoint(tmp_path):
    data = image_dataset(8)
    trainer = DistillationTrainer(
        model=tiny_vit(16, 2, seed=1),
        teacher_model=tiny_vit(32, 4, seed=0),
        args=_config(
            tmp_path,
            max_steps=3,
            save_steps=1,
            eval_strategy="steps",
            eval_steps=1,
            load_best_model_at_end=True,
            metric_for_best_model="loss",
            greater_is_better=True,  # the worst loss: an early checkpoint, so the load has to change the weights
        ),
        train_dataset=data,
        eval_dataset=data,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert not best.endswith("checkpoint-3")
    saved = ViTForImageClassification.from_pretrained(best).state_dict()  # from_pretrained maps the names itself
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    last = ViTForImageClassification.from_pretrained(tmp_path / "checkpoint-3").state_dict()
    assert not torch.equal(last["vit.layers.0.attention.q_proj.weight"], saved["vit.layers.0.attention.q_proj.weight"])


@pytest.mark.parametrize("change", ["drop", "add"])
def test_a_checkpoint_whose_weights_do_not_fit_is_refused(tmp_path, change):
    _trainer("teacher", tmp_path, max_steps=2).train()
    weights = tmp_path / "checkpoint-2" / "model.safetensors"
    state = load_file(str(weights))
    if change == "drop":
        del state["vit.encoder.layer.1.output.dense.weight"]
    else:
        state["vit.encoder.layer.2.output.dense.weight"] = torch.zeros(16, 32)
    save_file(state, str(weights), metadata={"format": "pt"})
    listed = r"1 of its weights are not in the checkpoint" if change == "drop" else r"1 saved weights fit none"
    with pytest.raises(
        ValueError, match=rf"resume_from_checkpoint: the student's weights in .*checkpoint-2.*{listed}"
    ):
        _trainer("teacher", tmp_path, max_steps=3).train(resume_from_checkpoint=True)


def _tiny_moe(seed=1):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_experts=2,
        num_experts_per_tok=1,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=PAD_ID,
    )
    return Qwen3MoeForCausalLM(config)


def test_a_student_whose_saved_weights_are_converted_is_refused_on_resume(tmp_path):
    """A mixture of experts keeps its experts stacked and save_pretrained splits them per expert; Trainer loads them
    without stacking them back, and hfkd cannot either: resuming is refused, naming the cause, instead of going on
    with fresh experts."""

    def trainer(max_steps):
        return DistillationTrainer(
            model=_tiny_moe(),
            teacher_model=tiny_llama(),
            args=_config(tmp_path, max_steps=max_steps),
            train_dataset=text_dataset("causal"),
        )

    trainer(2).train()
    with pytest.raises(ValueError, match=r"mlp\.experts.*save_pretrained converted them.*#48805"):
        trainer(3).train(resume_from_checkpoint=True)


def test_weights_save_pretrained_leaves_out_are_not_asked_for(tmp_path):
    """Tied copies and `_keys_to_ignore_on_save` (Marian's sinusoidal positions) are not in the file: their absence
    is no error, and every other weight is restored."""
    config = MarianConfig(
        vocab_size=VOCAB_SIZE,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        pad_token_id=PAD_ID,
        decoder_start_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    saved = MarianMTModel(config)
    saved.save_pretrained(tmp_path)
    torch.manual_seed(1)
    model = MarianMTModel(config)
    result = model.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=False)
    assert result.missing_keys and not result.unexpected_keys  # what Trainer would have warned about
    complete_load(model, str(tmp_path), result.missing_keys, result.unexpected_keys, "resume_from_checkpoint")
    for (name, x), y in zip(saved.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
