"""Tests for `hfkd.student.student_from_teacher` on tiny randomly initialised models of each supported family."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tf

from hfkd.student import student_from_teacher

VOCAB = 99


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # The models here are tiny: thread start-up and contention with other processes (parallel test runs on a
    # small machine) cost far more than they gain, and can make a forward pass take a hundred times longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _token_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))}


def _seq2seq_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, VOCAB, (2, 7), generator=generator),
        "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=generator),
    }


def _image_inputs(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))}


def _bert_config(num_layers: int = 4) -> tf.BertConfig:
    return tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4, intermediate_size=37
    )


def _decoder_kwargs() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )


@dataclass(frozen=True)
class Arch:
    """A tiny teacher and what the tests need to know about it, written independently of the implementation."""

    build: Callable[[], tf.PreTrainedModel]
    inputs: Callable[[], dict[str, torch.Tensor]]
    stacks: tuple[str, ...]  # dotted paths of the layer lists, in the function's stack order
    count_attrs: tuple[str, ...]  # config attribute(s) holding the stack lengths
    auto_class: type


ARCHS: dict[str, Arch] = {
    "bert-seq-cls": Arch(
        lambda: tf.BertForSequenceClassification(_bert_config()),
        _token_inputs,
        ("bert.encoder.layer",),
        ("num_hidden_layers",),
        tf.AutoModelForSequenceClassification,
    ),
    "bert-mlm": Arch(
        lambda: tf.BertForMaskedLM(_bert_config()),
        _token_inputs,
        ("bert.encoder.layer",),
        ("num_hidden_layers",),
        tf.AutoModelForMaskedLM,
    ),
    "bert-token-cls": Arch(
        lambda: tf.BertForTokenClassification(_bert_config()),
        _token_inputs,
        ("bert.encoder.layer",),
        ("num_hidden_layers",),
        tf.AutoModelForTokenClassification,
    ),
    "roberta-seq-cls": Arch(
        lambda: tf.RobertaForSequenceClassification(
            tf.RobertaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=37,
                max_position_embeddings=32,
            )
        ),
        _token_inputs,
        ("roberta.encoder.layer",),
        ("num_hidden_layers",),
        tf.AutoModelForSequenceClassification,
    ),
    "vit-img-cls": Arch(
        lambda: tf.ViTForImageClassification(
            tf.ViTConfig(
                image_size=8,
                patch_size=4,
                hidden_size=32,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=37,
                num_labels=3,
            )
        ),
        _image_inputs(8),
        ("vit.layers",),
        ("num_hidden_layers",),
        tf.AutoModelForImageClassification,
    ),
    "llama-causal-lm": Arch(
        lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_kwargs())),
        _token_inputs,
        ("model.layers",),
        ("num_hidden_layers",),
        tf.AutoModelForCausalLM,
    ),
    "llama-tied-causal-lm": Arch(
        lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_decoder_kwargs(), tie_word_embeddings=True)),
        _token_inputs,
        ("model.layers",),
        ("num_hidden_layers",),
        tf.AutoModelForCausalLM,
    ),
    "qwen2-sliding-causal-lm": Arch(
        # Layers 2 and 3 use sliding-window attention: `layer_types` must follow the kept layers.
        lambda: tf.Qwen2ForCausalLM(
            tf.Qwen2Config(**_decoder_kwargs(), use_sliding_window=True, sliding_window=3, max_window_layers=2)
        ),
        _token_inputs,
        ("model.layers",),
        ("num_hidden_layers",),
        tf.AutoModelForCausalLM,
    ),
    "mistral-causal-lm": Arch(
        lambda: tf.MistralForCausalLM(tf.MistralConfig(**_decoder_kwargs(), sliding_window=3)),
        _token_inputs,
        ("model.layers",),
        ("num_hidden_layers",),
        tf.AutoModelForCausalLM,
    ),
    "gpt2-lm-head": Arch(
        lambda: tf.GPT2LMHeadModel(
            tf.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
            )
        ),
        _token_inputs,
        ("transformer.h",),
        ("n_layer",),
        tf.AutoModelForCausalLM,
    ),
    "t5-cond-gen": Arch(
        # A decoder shallower than the encoder, to check that the stacks are shrunk separately.
        lambda: tf.T5ForConditionalGeneration(
            tf.T5Config(
                vocab_size=VOCAB,
                d_model=32,
                d_ff=37,
                d_kv=8,
                num_heads=4,
                num_layers=4,
                num_decoder_layers=3,
                decoder_start_token_id=0,
            )
        ),
        _seq2seq_inputs,
        ("encoder.block", "decoder.block"),
        ("num_layers", "num_decoder_layers"),
        tf.AutoModelForSeq2SeqLM,
    ),
    "bart-cond-gen": Arch(
        lambda: tf.BartForConditionalGeneration(
            tf.BartConfig(
                vocab_size=VOCAB,
                d_model=32,
                encoder_layers=4,
                decoder_layers=3,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                encoder_ffn_dim=37,
                decoder_ffn_dim=37,
                max_position_embeddings=32,
            )
        ),
        _seq2seq_inputs,
        ("model.encoder.layers", "model.decoder.layers"),
        ("encoder_layers", "decoder_layers"),
        tf.AutoModelForSeq2SeqLM,
    ),
    "resnet-img-cls": Arch(
        lambda: tf.ResNetForImageClassification(
            tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[3, 2], layer_type="basic", num_labels=3)
        ),
        _image_inputs(32),
        ("resnet.encoder.stages.0.layers", "resnet.encoder.stages.1.layers"),
        ("depths",),
        tf.AutoModelForImageClassification,
    ),
    "convnext-img-cls": Arch(
        lambda: tf.ConvNextForImageClassification(
            tf.ConvNextConfig(hidden_sizes=[8, 16], depths=[3, 2], num_stages=2, num_labels=3)
        ),
        _image_inputs(32),
        ("convnext.encoder.stages.0.layers", "convnext.encoder.stages.1.layers"),
        ("depths",),
        tf.AutoModelForImageClassification,
    ),
}


def make_teacher(name: str) -> tf.PreTrainedModel:
    torch.manual_seed(0)
    teacher = ARCHS[name].build()
    # Random LayerNorm/BatchNorm statistics and biases start at 1/0; perturb every tensor so that copying the
    # wrong layer (or not copying at all) cannot go unnoticed.
    with torch.no_grad():
        for tensor in teacher.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor) * 0.1)
    return teacher.eval()


def stack_lengths(model: torch.nn.Module, arch: Arch) -> list[int]:
    return [len(model.get_submodule(path)) for path in arch.stacks]


def config_counts(config: tf.PreTrainedConfig, arch: Arch) -> list[int]:
    counts = [getattr(config, attr) for attr in arch.count_attrs]
    return list(counts[0]) if isinstance(counts[0], list) else counts


def expected_source(key: str, selections: dict[str, list[int]], teacher_keys: set[str]) -> str:
    """The teacher key a student key must be copied from, given each stack's kept teacher layers.

    A weight only some positions of a stack have (T5's relative attention bias in block 0) comes from the teacher's
    same position when the copied layer has none.
    """
    for path, kept in selections.items():
        if key.startswith(f"{path}."):
            index, _, rest = key[len(path) + 1 :].partition(".")
            source = f"{path}.{kept[int(index)]}.{rest}"
            return source if source in teacher_keys else key
    return key


def assert_copied(teacher: torch.nn.Module, student: torch.nn.Module, selections: dict[str, list[int]]) -> None:
    """Every student tensor equals the teacher tensor it should come from: same name outside the stacks, and
    teacher layer `kept[j]` for student layer `j`."""
    teacher_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        source = expected_source(key, selections, set(teacher_state))
        assert torch.equal(value, teacher_state[source]), f"{key} != teacher {source}"


def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", ARCHS)
def test_keeping_all_layers_reproduces_teacher_exactly(name: str) -> None:
    arch, teacher = ARCHS[name], make_teacher(name)
    all_layers = [list(range(n)) for n in stack_lengths(teacher, arch)]
    student = student_from_teacher(teacher, layers=all_layers if len(all_layers) > 1 else all_layers[0])

    assert type(student) is type(teacher)
    inputs = arch.inputs()
    assert torch.equal(outputs(student, inputs), outputs(teacher, inputs))


@pytest.mark.parametrize("name", ARCHS)
def test_fewer_layers_copies_embeddings_head_and_chosen_layers(name: str) -> None:
    arch, teacher = ARCHS[name], make_teacher(name)
    teacher_lengths = stack_lengths(teacher, arch)

    student = student_from_teacher(teacher, num_layers=2)

    # Evenly spread with first and last kept: [0, 3] of 4, [0, 2] of 3, [0, 1] of 2.
    selections = {path: [0, n - 1] for path, n in zip(arch.stacks, teacher_lengths)}
    assert stack_lengths(student, arch) == [2] * len(arch.stacks)
    assert config_counts(student.config, arch) == [2] * len(arch.stacks)
    assert config_counts(teacher.config, arch) == teacher_lengths  # the teacher's config is left alone
    assert_copied(teacher, student, selections)
    assert outputs(student, arch.inputs()).shape == outputs(teacher, arch.inputs()).shape


@pytest.mark.parametrize("name", ARCHS)
def test_student_is_independent_of_teacher(name: str) -> None:
    teacher = make_teacher(name)
    before = {key: value.clone() for key, value in teacher.state_dict().items()}

    student = student_from_teacher(teacher, num_layers=2)

    teacher_storages = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    assert not teacher_storages & {t.untyped_storage().data_ptr() for t in student.state_dict().values()}
    with torch.no_grad():
        for tensor in student.state_dict().values():
            tensor.add_(1)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", ARCHS)
def test_save_and_reload_with_auto_class(name: str, tmp_path) -> None:
    arch, teacher = ARCHS[name], make_teacher(name)
    student = student_from_teacher(teacher, num_layers=2)
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")

    reloaded = arch.auto_class.from_pretrained(tmp_path / "student").eval()

    assert type(reloaded) is type(teacher)
    inputs = arch.inputs()
    assert torch.equal(outputs(reloaded, inputs), outputs(student, inputs))
    # No provenance or other extra keys: the config is one transformers writes for this class anyway.
    teacher_config = json.loads((tmp_path / "teacher" / "config.json").read_text())
    student_config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert set(student_config) <= set(teacher_config)
    assert "hfkd" not in (tmp_path / "student" / "config.json").read_text()


@pytest.mark.parametrize(
    ("teacher_layers", "num_layers", "expected"),
    [
        (6, 3, [0, 2, 5]),
        (4, 2, [0, 3]),
        (4, 1, [3]),
        (4, 4, [0, 1, 2, 3]),
        (12, 6, [0, 2, 4, 7, 9, 11]),
        (5, 3, [0, 2, 4]),
    ],
)
def test_default_layer_choice_spreads_evenly_keeping_first_and_last(
    teacher_layers: int, num_layers: int, expected: list[int]
) -> None:
    torch.manual_seed(0)
    teacher = tf.BertForSequenceClassification(_bert_config(teacher_layers)).eval()

    student = student_from_teacher(teacher, num_layers=num_layers)

    assert student.config.num_hidden_layers == num_layers
    assert_copied(teacher, student, {"bert.encoder.layer": expected})


def test_explicit_layers_are_copied_in_order() -> None:
    teacher = make_teacher("bert-seq-cls")
    student = student_from_teacher(teacher, layers=[1, 2])
    assert_copied(teacher, student, {"bert.encoder.layer": [1, 2]})


def test_per_stack_counts_and_layers_for_encoder_decoder() -> None:
    teacher = make_teacher("t5-cond-gen")

    student = student_from_teacher(teacher, num_layers=[3, 1])
    assert stack_lengths(student, ARCHS["t5-cond-gen"]) == [3, 1]
    assert_copied(teacher, student, {"encoder.block": [0, 2, 3], "decoder.block": [2]})

    # A single list applies to both stacks.
    student = student_from_teacher(teacher, layers=[0, 2])
    assert_copied(teacher, student, {"encoder.block": [0, 2], "decoder.block": [0, 2]})


def test_t5_relative_attention_bias_stays_with_the_first_position() -> None:
    # Only block 0 of each T5 stack owns the relative position bias. A student that drops teacher block 0 still
    # needs it in its own block 0, and it must be the teacher's (it is the same positions, just other layers).
    teacher = make_teacher("t5-cond-gen")
    student = student_from_teacher(teacher, layers=[[1, 3], [1, 2]])

    bias = "layer.0.SelfAttention.relative_attention_bias.weight"
    for stack in ("encoder", "decoder"):
        student_block = student.get_submodule(f"{stack}.block.0")
        assert torch.equal(student_block.get_parameter(bias), teacher.get_parameter(f"{stack}.block.0.{bias}"))
        assert torch.equal(
            student_block.get_parameter("layer.0.SelfAttention.q.weight"),
            teacher.get_parameter(f"{stack}.block.1.layer.0.SelfAttention.q.weight"),
        )


def test_resnet_stages_shrink_separately() -> None:
    teacher = make_teacher("resnet-img-cls")
    student = student_from_teacher(teacher, layers=[[0, 2], [0]])
    assert student.config.depths == [2, 1]
    assert_copied(teacher, student, {"resnet.encoder.stages.0.layers": [0, 2], "resnet.encoder.stages.1.layers": [0]})


def test_per_layer_config_lists_follow_the_kept_layers() -> None:
    teacher = make_teacher("qwen2-sliding-causal-lm")
    assert teacher.config.layer_types == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]

    student = student_from_teacher(teacher, layers=[1, 2])

    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert teacher.config.layer_types[2] == "sliding_attention"  # not modified in place


@pytest.mark.parametrize(
    ("name", "pairs", "tied"),
    [
        ("gpt2-lm-head", ("transformer.wte.weight", "lm_head.weight"), True),
        ("bert-mlm", ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"), True),
        ("llama-tied-causal-lm", ("model.embed_tokens.weight", "lm_head.weight"), True),
        ("llama-causal-lm", ("model.embed_tokens.weight", "lm_head.weight"), False),
    ],
)
def test_tied_weights_stay_tied_and_untied_stay_untied(name: str, pairs: tuple[str, str], tied: bool) -> None:
    teacher = make_teacher(name)
    student = student_from_teacher(teacher, num_layers=2)
    first, second = (student.get_parameter(key) for key in pairs)
    assert (first.data_ptr() == second.data_ptr()) is tied
    assert torch.equal(first, teacher.get_parameter(pairs[0]))
    assert torch.equal(second, teacher.get_parameter(pairs[1]))


@pytest.mark.parametrize("training", [True, False])
def test_student_has_teachers_train_eval_mode(training: bool) -> None:
    teacher = make_teacher("bert-seq-cls").train(training)
    student = student_from_teacher(teacher, num_layers=2)
    assert all(module.training is training for module in student.modules())


def test_student_has_teachers_dtype() -> None:
    teacher = make_teacher("llama-causal-lm").to(torch.bfloat16)
    student = student_from_teacher(teacher, num_layers=2)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert_copied(teacher, student, {"model.layers": [0, 3]})


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"exactly one of `num_layers`.*`layers`.*neither"),
        ({"num_layers": 2, "layers": [0, 3]}, r"exactly one of `num_layers`.*`layers`.*both"),
        ({"num_layers": 0}, r"`num_layers` must be between 1 and the teacher's 4 layers"),
        ({"num_layers": 5}, r"`num_layers` must be between 1 and the teacher's 4 layers"),
        ({"num_layers": 2.0}, r"`num_layers` must be an int"),
        ({"num_layers": True}, r"`num_layers` must be an int"),
        ({"layers": [0, 0, 3]}, r"`layers` has duplicate indices"),
        ({"layers": [3, 0]}, r"`layers` must be strictly increasing.*\[0, 3\]"),
        ({"layers": [0, 4]}, r"`layers` has indices \[4\] out of range.*0 to 3"),
        ({"layers": [-1, 2]}, r"`layers` has indices \[-1\] out of range"),
        ({"layers": []}, r"`layers` is empty"),
        ({"layers": [0, "1"]}, r"`layers` must be a list of teacher layer indices"),
        ({"layers": [[0], [1]]}, r"`layers` has 2 per-stack entries but the teacher has 1 stack"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, match: str) -> None:
    teacher = make_teacher("bert-seq-cls")
    with pytest.raises(ValueError, match=match):
        student_from_teacher(teacher, **kwargs)


def test_count_too_large_for_one_stack_suggests_per_stack_counts() -> None:
    teacher = make_teacher("t5-cond-gen")
    with pytest.raises(ValueError, match=r"3 layers \(`num_decoder_layers`\).*one value per stack"):
        student_from_teacher(teacher, num_layers=4)


class _NoLayersConfig(tf.PreTrainedConfig):
    model_type = "hfkd-test-no-layers"
    hidden_size: int = 8


class _NoLayersModel(tf.PreTrainedModel):
    config_class = _NoLayersConfig

    def __init__(self, config: _NoLayersConfig) -> None:
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()


def test_unknown_architecture_names_model_type_and_suggests_own_student() -> None:
    with pytest.raises(ValueError, match=r"model_type 'hfkd-test-no-layers'.*Build the student yourself"):
        student_from_teacher(_NoLayersModel(_NoLayersConfig()), num_layers=1)


def test_ambiguous_architecture_is_refused() -> None:
    # Swin's config has both `num_layers` (stages) and `depths` (blocks per stage), and its blocks alternate
    # shifted windows by position, so it is left to the user.
    teacher = tf.SwinForImageClassification(
        tf.SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=2)
    )
    with pytest.raises(ValueError, match=r"model_type 'swin'.*several candidate layer counts"):
        student_from_teacher(teacher, num_layers=1)


def test_layers_built_differently_by_position_are_refused() -> None:
    # ResNet's first block of a stage downsamples; the last one cannot take its place.
    teacher = make_teacher("resnet-img-cls")
    with pytest.raises(ValueError, match=r"model_type 'resnet'.*differ by position.*layers=\[0, \.\.\.\]"):
        student_from_teacher(teacher, num_layers=1)


def test_untied_weights_under_a_tying_config_are_refused() -> None:
    teacher = make_teacher("gpt2-lm-head")
    teacher.lm_head.weight = torch.nn.Parameter(teacher.lm_head.weight.detach() + 1)
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*ties .* differ"):
        student_from_teacher(teacher, num_layers=2)


def test_non_transformers_teacher_is_refused() -> None:
    with pytest.raises(ValueError, match=r"`teacher` must be a transformers PreTrainedModel"):
        student_from_teacher(torch.nn.Linear(2, 2), num_layers=1)


def test_student_does_not_claim_the_teachers_checkpoint(tmp_path):
    # A peft adapter saved on the student records the student's name_or_path as its base model; the teacher's
    # would make it reload onto the wrong network.
    config = tf.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37
    )
    tf.BertForSequenceClassification(config).save_pretrained(tmp_path / "teacher")
    teacher = tf.BertForSequenceClassification.from_pretrained(tmp_path / "teacher")
    student = student_from_teacher(teacher, num_layers=2)
    assert str(tmp_path) not in student.name_or_path
    assert teacher.name_or_path == str(tmp_path / "teacher")
