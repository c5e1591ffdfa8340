"""End-to-end distillation on tiny models of every supported family.

Each family test trains a narrow, shallow student from a wider, deeper teacher for a few steps with every term that
makes sense for it switched on, then checks that the student learnt, the teacher did not move, every term was logged,
evaluation reports every term, and the checkpoint keeps the projections out of the student's weights. The exported
students are all reloaded with plain transformers in one subprocess that never imports hfkd.
"""

import json
import logging
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors import safe_open

from hfkd import DistillationConfig, DistillationTrainer, student_from_teacher

TERMS_FILE = "hfkd_terms.safetensors"  # the terms' state, the hidden term's projections included
MAX_STEPS = 3
TERM_WEIGHTS = {
    "task": "task_weight",
    "distill/logit": "logit_weight",
    "distill/hidden": "hidden_weight",
    "distill/attention": "attention_weight",
}
LINEAR = ("linear", tiny_models.STUDENT_WIDTH, tiny_models.TEACHER_WIDTH)
# Every hidden_states entry of a 2-layer student (embeddings + 2 layers) is matched and needs a projection.
ALL_MAIN = {f"main.{i}": LINEAR for i in range(3)}


@dataclass(frozen=True)
class Family:
    auto_class: str
    # Expected projections: feature key -> (kind, student width, teacher width).
    projections: dict = field(default_factory=lambda: ALL_MAIN)
    attention: bool = True
    # Loss choices and layer maps vary across families so that every option runs end to end somewhere.
    options: dict = field(default_factory=dict)


# Conv students (hidden_sizes 8, 16) of conv teachers (16, 32, 64): stem 8 -> 16 channels at 8x8; 'uniform' pairs
# student stage 1 (8 ch, 8x8) with teacher stage 2 (32 ch, 4x4) and student stage 2 (16 ch, 4x4) with teacher stage 3
# (64 ch, 2x2), so the 1x1 convolutions also meet feature maps of other spatial sizes.
CONV = {"main.0": ("conv", 8, 16), "main.1": ("conv", 8, 32), "main.2": ("conv", 16, 64)}


FAMILIES = {
    "bert_sequence": Family("AutoModelForSequenceClassification"),
    "bert_token": Family(
        "AutoModelForTokenClassification", options={"logit_loss": "reverse_kl", "hidden_loss": "cosine"}
    ),
    "bert_mlm": Family(
        "AutoModelForMaskedLM", options={"logit_loss": "jsd", "attention_loss": "mse", "hidden_layer_map": "0,2,4"}
    ),
    "llama": Family("AutoModelForCausalLM", options={"gradient_accumulation_steps": 2}),
    "gpt2": Family(
        "AutoModelForCausalLM",
        options={"logit_loss": "mse", "hidden_loss": "cosine", "attention_layer_map": "last", "temperature": 1.0},
    ),
    "t5": Family(
        "AutoModelForSeq2SeqLM", projections={f"{s}.{i}": LINEAR for s in ("encoder", "decoder") for i in range(3)}
    ),
    "bart": Family(
        "AutoModelForSeq2SeqLM",
        projections={"encoder.2": LINEAR, "decoder.2": LINEAR},
        options={"logit_loss": "jsd", "jsd_beta": 0.3, "hidden_layer_map": "last"},
    ),
    "vit": Family("AutoModelForImageClassification", options={"hidden_loss": "cosine", "attention_layer_map": "1,3"}),
    "resnet": Family("AutoModelForImageClassification", projections=CONV, attention=False),
    "convnext": Family(
        "AutoModelForImageClassification", projections=CONV, attention=False, options={"logit_loss": "reverse_kl"}
    ),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine several threads spin against each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config(output_dir, **overrides) -> DistillationConfig:
    kwargs = {
        "output_dir": str(output_dir),
        "max_steps": MAX_STEPS,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 1e-2,
        "use_cpu": True,
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": MAX_STEPS,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "task_weight": 1.0,
        "logit_weight": 1.0,
    }
    kwargs.update(overrides)
    return DistillationConfig(**kwargs)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _configured_terms(args: DistillationConfig) -> list[str]:
    return [term for term, weight in TERM_WEIGHTS.items() if getattr(args, weight) > 0]


def _safetensors_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _assert_finite_terms(log_history: list[dict], args: DistillationConfig, num_steps: int = MAX_STEPS) -> None:
    """Every configured term at every logged step is a finite float, and the loss is their weighted sum."""
    terms = _configured_terms(args)
    train_logs = [entry for entry in log_history if "loss" in entry]
    assert len(train_logs) == num_steps, log_history
    for entry in train_logs:
        assert math.isfinite(entry["loss"]), entry
        for term in terms:
            assert term in entry, f"{term} missing from {entry}"
            assert isinstance(entry[term], float) and math.isfinite(entry[term]), entry
        weighted = sum(getattr(args, TERM_WEIGHTS[term]) * entry[term] for term in terms)
        assert entry["loss"] == pytest.approx(weighted, rel=1e-4, abs=1e-6), entry
    unexpected = {k for entry in train_logs for k in entry if k.startswith("distill/")} - set(terms)
    assert not unexpected, f"terms with weight 0 were logged: {unexpected}"


# ---------------------------------------------------------------------------------------------------- family runs
@dataclass
class Run:
    family: str
    student_class: str
    export_dir: Path
    student_sums: dict[str, float]


_RUNS: dict[str, Run] = {}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def _train_family(name: str, root: Path) -> Run:
    """Trains one family (once per module) and checks everything that can be checked in this process."""
    if name in _RUNS:
        return _RUNS[name]
    family = FAMILIES[name]
    teacher, student = tiny_models.teacher_student_pair(name)
    dataset = tiny_models.dataset_for(name)
    options = {"hidden_weight": 1.0, **({"attention_weight": 1.0} if family.attention else {}), **family.options}
    args = _config(root / name / "out", **options)

    teacher_before, student_before = _snapshot(teacher), _snapshot(student)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, eval_dataset=dataset
    )
    projector = tiny_models.projector_of(trainer)
    assert projector is not None, "student and teacher widths differ, so projections must be built"
    assert {k: tuple(v) for k, v in projector.specs.items()} == family.projections
    projector_before = _snapshot(projector)
    trainer.train()

    # (a) the student learnt: every parameter tensor moved, and so did the projections (which stay outside it).
    assert student.state_dict().keys() == student_before.keys(), "training added or removed student tensors"
    unchanged = [n for n, p in student.named_parameters() if torch.equal(p.detach(), student_before[n])]
    assert not unchanged, f"{name}: student parameters did not change: {unchanged}"
    moved = [n for n, p in projector.state_dict().items() if not torch.equal(p, projector_before[n])]
    assert moved, "the projections were not trained"

    # (b) the teacher did not move (buffers such as BatchNorm statistics included) and is frozen in eval mode.
    teacher_after = teacher.state_dict()
    assert teacher_after.keys() == teacher_before.keys()
    changed = [k for k, v in teacher_after.items() if not torch.equal(v, teacher_before[k])]
    assert not changed, f"teacher tensors changed: {changed}"
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(m.training for m in teacher.modules())

    # (c) every configured term is logged at every step as a finite float, and no other term is.
    terms = _configured_terms(args)
    assert len(terms) == (4 if family.attention else 3)
    _assert_finite_terms(trainer.state.log_history, args)

    # (e) the checkpoint holds the projections with the terms' state, never in the student's weights.
    checkpoint = Path(args.output_dir) / f"checkpoint-{MAX_STEPS}"
    assert (checkpoint / TERMS_FILE).is_file()
    weight_keys = _safetensors_keys(checkpoint / "model.safetensors")
    assert not [k for k in weight_keys if "projector" in k or "teacher" in k]
    projector_keys = _safetensors_keys(checkpoint / TERMS_FILE)
    assert set(projector_keys) == {f"terms.hidden.projector.{k}" for k in projector.state_dict()}

    # The exported student (checked in a subprocess by test_exported_students_reload_with_plain_transformers).
    export_dir = root / name / "export"
    trainer.save_model(str(export_dir))
    exported_keys = _safetensors_keys(export_dir / "model.safetensors")
    assert not [k for k in exported_keys if "projector" in k or "teacher" in k]

    # evaluate() reports each term's mean next to the loss.
    metrics = trainer.evaluate()
    for term in terms:
        value = metrics.get(f"eval_{term}")
        assert isinstance(value, float) and math.isfinite(value), (term, metrics)
    assert {k for k in metrics if k.startswith(("eval_distill/", "eval_task"))} == {f"eval_{t}" for t in terms}
    weighted = sum(getattr(args, TERM_WEIGHTS[term]) * metrics[f"eval_{term}"] for term in terms)
    assert metrics["eval_loss"] == pytest.approx(weighted, rel=1e-4, abs=1e-6), metrics

    run = Run(
        family=name,
        student_class=type(student).__name__,
        export_dir=export_dir,
        student_sums={k: float(v.double().sum()) for k, v in student.state_dict().items()},
    )
    _RUNS[name] = run
    return run


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_distils_end_to_end(name, runs_root):
    """(a) student changes, (b) teacher bit-identical and frozen, (c) terms logged, (e) projector checkpointing."""
    _train_family(name, runs_root)


_RELOAD_SCRIPT = r"""
import json, sys
import transformers

results = []
for auto_name, path in json.loads(sys.argv[1]):
    model, info = getattr(transformers, auto_name).from_pretrained(path, output_loading_info=True)
    results.append({
        "class": type(model).__name__,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
        "sums": {k: float(v.double().sum()) for k, v in model.state_dict().items()},
    })
assert "hfkd" not in sys.modules
print("RESULT " + json.dumps({"hfkd_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "hfkd"),
                              "results": results}))
"""


def test_exported_students_reload_with_plain_transformers(runs_root, tmp_path):
    """(d) every family's `save_model` output loads with its plain Auto class in a python that never imports hfkd."""
    runs = [_train_family(name, runs_root) for name in FAMILIES]
    specs = [(FAMILIES[run.family].auto_class, str(run.export_dir)) for run in runs]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, json.dumps(specs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    payload = json.loads(line[len("RESULT ") :])
    assert payload["hfkd_loaded"] == []
    for run, result in zip(runs, payload["results"], strict=True):
        where = f"{run.family} ({run.export_dir})"
        assert result["class"] == run.student_class, where
        assert not result["missing"] and not result["unexpected"] and not result["mismatched"], (where, result)
        keys = set(result["sums"])
        assert not [k for k in keys if "projector" in k or "teacher" in k], where
        assert keys == set(run.student_sums), (where, keys ^ set(run.student_sums))
        for key, value in result["sums"].items():
            assert value == pytest.approx(run.student_sums[key], rel=1e-6, abs=1e-6), (where, key)


# ---------------------------------------------------------------------------------------------------- edge cases
def test_all_masked_causal_batch_gives_zero_logit_term(tmp_path):
    """A causal LM batch whose labels are all -100 gives a logit term of exactly 0 (not 0/0) and no NaN anywhere."""
    teacher, student = tiny_models.teacher_student_pair("llama")
    dataset = tiny_models.text_dataset("causal_all_masked")
    # task_weight=0: transformers' own loss is 0/0 = NaN on such a batch, with or without hfkd.
    args = _config(tmp_path, max_steps=2, save_strategy="no", task_weight=0.0, logit_weight=1.0, hidden_weight=1.0)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=dataset, eval_dataset=dataset
    )
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert entry["distill/logit"] == 0.0, entry
        assert math.isfinite(entry["distill/hidden"]) and entry["distill/hidden"] > 0, entry
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]), entry
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert all(torch.isfinite(p).all() for p in tiny_models.projector_of(trainer).parameters())

    metrics = trainer.evaluate()
    assert metrics["eval_distill/logit"] == 0.0, metrics
    assert math.isfinite(metrics["eval_distill/hidden"]) and math.isfinite(metrics["eval_loss"]), metrics


def test_sdpa_models_switch_to_eager_for_attention_term(tmp_path, caplog):
    """attention_weight > 0 with sdpa models: a warning, both switched to eager, and a finite attention term."""
    teacher, student = tiny_models.teacher_student_pair("llama", attn_implementation="sdpa")
    assert student.config._attn_implementation == "sdpa" and teacher.config._attn_implementation == "sdpa"
    dataset = tiny_models.text_dataset("causal")
    args = _config(tmp_path, max_steps=2, save_strategy="no", attention_weight=1.0)
    with caplog.at_level(logging.WARNING, logger="hfkd"):
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("hfkd") and "'eager'" in r.getMessage()]
    assert any("student" in m for m in warnings), caplog.text
    assert any("teacher" in m for m in warnings), caplog.text
    assert student.config._attn_implementation == "eager"
    assert teacher.config._attn_implementation == "eager"
    trainer.train()
    _assert_finite_terms(trainer.state.log_history, args, num_steps=2)
    assert all(entry["distill/attention"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_same_width_student_from_teacher_needs_no_projector(tmp_path):
    """A student of the teacher's width (here from `student_from_teacher`) trains every term without projections,
    its checkpoint has no projector file, and training it leaves the teacher it was copied from untouched."""
    teacher, _ = tiny_models.teacher_student_pair("llama")
    try:
        student = student_from_teacher(teacher, num_layers=2)
    except (ValueError, NotImplementedError):  # not supported (yet): same width, fewer layers, from a config
        student = tiny_models.tiny_llama(tiny_models.TEACHER_WIDTH, 2, seed=1)
    assert student.config.hidden_size == teacher.config.hidden_size
    shared = {p.data_ptr() for p in teacher.parameters()} & {p.data_ptr() for p in student.parameters()}
    assert not shared, "the student shares storage with the teacher"
    teacher_before = _snapshot(teacher)
    args = _config(tmp_path, hidden_weight=1.0, attention_weight=1.0)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=tiny_models.text_dataset("causal")
    )
    assert tiny_models.projector_of(trainer) is None
    trainer.train()
    _assert_finite_terms(trainer.state.log_history, args)
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    checkpoint = tmp_path / f"checkpoint-{MAX_STEPS}"
    assert (checkpoint / "model.safetensors").is_file()
    assert not (checkpoint / TERMS_FILE).exists()


def _t5_pair_with_dropout():
    return tiny_models.tiny_t5(32, 4, seed=0), tiny_models.tiny_t5(16, 2, seed=1, dropout_rate=0.1)


def _bert_pair_with_dropout():
    return tiny_models.tiny_bert("sequence", 32, 4, seed=0), tiny_models.tiny_bert(
        "sequence", 16, 2, seed=1, attention_dropout=0.1
    )


@pytest.mark.parametrize(
    "make_pair, dataset",
    [
        pytest.param(_bert_pair_with_dropout, "sequence", id="bert"),
        pytest.param(_t5_pair_with_dropout, "seq2seq", id="t5"),
    ],
)
def test_student_attention_dropout_is_warned_about(make_pair, dataset, tmp_path, caplog):
    """Eager attention maps are taken after dropout, so a student with attention dropout deserves a warning."""
    teacher, student = make_pair()
    data = tiny_models.seq2seq_dataset() if dataset == "seq2seq" else tiny_models.text_dataset(dataset)
    args = _config(tmp_path, attention_weight=1.0, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="hfkd"):
        DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
    assert any(r.name.startswith("hfkd") and "dropout" in r.getMessage() for r in caplog.records), caplog.text
