import pytest
from transformers import HfArgumentParser

from hfkd import DistillationConfig


def torch_has_accelerator() -> bool:
    from hfkd.config import _has_accelerator

    return _has_accelerator()


def _config(tmp_path, **kwargs):
    return DistillationConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


def test_defaults(tmp_path):
    c = _config(tmp_path)
    assert (c.task_weight, c.logit_weight, c.hidden_weight, c.attention_weight) == (0.5, 0.5, 0.0, 0.0)
    assert c.temperature == 2.0 and c.logit_loss == "kl" and c.hidden_loss == "mse" and c.attention_loss == "kl"
    assert c.hidden_layer_map == "uniform" and c.attention_layer_map == "uniform"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"task_weight": -0.1}, "task_weight"),
        ({"hidden_weight": float("nan")}, "hidden_weight"),
        ({"task_weight": 0.0, "logit_weight": 0.0}, "all 0"),
        ({"jsd_beta": 1.5}, "jsd_beta"),
        ({"logit_loss": "kld"}, "logit_loss"),
        ({"hidden_loss": "l1"}, "hidden_loss"),
        ({"attention_loss": "js"}, "attention_loss"),
        ({"hidden_layer_map": "0,two"}, "hidden_layer_map"),
        ({"attention_layer_map": "-1"}, "attention_layer_map"),
        ({"teacher_model_init_kwargs": "{not json"}, "teacher_model_init_kwargs"),
    ],
)
def test_bad_values_fail_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        _config(tmp_path, **kwargs)


def test_command_line_parses_every_field(tmp_path):
    parser = HfArgumentParser(DistillationConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--hidden_layer_map",
            "0,2,4,6",
            "--attention_layer_map",
            "last",
            "--logit_loss",
            "jsd",
            "--jsd_beta",
            "0.25",
            "--temperature",
            "4",
            "--hidden_weight",
            "1.5",
            "--teacher_model_name_or_path",
            "bert-base-uncased",
            "--teacher_model_init_kwargs",
            '{"dtype": "bfloat16"}',
            "--report_to",
            "none",
        ]
    )
    assert config.hidden_layer_map == [0, 2, 4, 6]
    assert config.attention_layer_map == "last"
    assert (config.logit_loss, config.jsd_beta, config.temperature, config.hidden_weight) == ("jsd", 0.25, 4.0, 1.5)
    assert config.teacher_model_name_or_path == "bert-base-uncased"
    assert config.teacher_model_init_kwargs == {"dtype": "bfloat16"}


def test_help_texts_are_documented():
    help_text = HfArgumentParser(DistillationConfig).format_help()
    for name in ("--temperature", "--hidden_layer_map", "--attention_loss", "--jsd_beta", "--task_weight"):
        assert name in help_text
    assert "Hinton" in help_text


def test_python_list_layer_map(tmp_path):
    assert _config(tmp_path, hidden_layer_map=[0, 1]).hidden_layer_map == [0, 1]


def test_config_round_trips_through_to_dict(tmp_path):
    c = _config(tmp_path, hidden_layer_map="0,3")
    d = c.to_dict()
    assert d["hidden_layer_map"] == [0, 3] and d["temperature"] == 2.0


def test_the_term_contract_is_importable_from_hfkd(tmp_path):
    """The names the docs give (`hfkd.register_term`) exist; a term registered through them is usable by name."""
    import torch

    from hfkd import Features, Needs, Term, TermBatch, register_term
    from hfkd.terms import TERMS

    @register_term("test_mean_gap")
    class MeanGap(Term):
        unit = "batch"

        def needs(self) -> Needs:
            return Needs(logits=True)

        def forward(self, student: Features, teacher: Features, batch: TermBatch) -> torch.Tensor:
            return (student.logits - teacher.logits).abs().mean()

    try:
        config = _config(tmp_path, terms=[{"name": "test_mean_gap", "weight": 2.0}])
        assert [(s.name, s.weight) for s in config.term_specs if s.name == "test_mean_gap"] == [("test_mean_gap", 2.0)]
    finally:
        TERMS.pop("test_mean_gap")


@pytest.mark.skipif(torch_has_accelerator(), reason="checks a machine without an accelerator")
def test_bf16_on_a_machine_without_an_accelerator(tmp_path):
    """transformers asks for use_cpu with bf16 and no GPU; the README's `--bf16 true` works as given (autocast on
    the CPU), in Python and on the command line."""
    from hfkd.cli import parse_distill_args

    config = _config(tmp_path, bf16=True)
    assert config.bf16 and config.use_cpu and config.device.type == "cpu"
    _, _, config = parse_distill_args(
        ["--student_num_layers", "1", "--dataset_name", "csv", "--output_dir", str(tmp_path), "--bf16", "true"]
    )
    assert config.bf16 and config.use_cpu
    # The saved run configuration does not pin the CPU: the same file uses a GPU on a machine that has one.
    from hfkd.data import DataArguments
    from hfkd.recipe import RecipeArguments
    from hfkd.run_folder import run_values

    recipe = RecipeArguments(student_num_layers=1)
    values = run_values(recipe, DataArguments(dataset_name="csv"), config)
    assert values["bf16"] is True and values["use_cpu"] is False
