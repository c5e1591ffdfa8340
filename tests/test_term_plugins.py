"""Distillation terms as plugins: configuration, registration, state handled like the student's, logging."""

import dataclasses

import pytest
import torch
from tiny_models import COMMON, bert, classification_data, parameters_of

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.terms import TERMS, Needs, Term, pooled, register_term
from hfkd.terms.pooling import PooledFeatureOptions
from hfkd.terms.runner import TERMS_FILE


@dataclasses.dataclass
class _ProbeOptions(PooledFeatureOptions):
    scale: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}.")


@register_term("test_embedding_head")
class _EmbeddingHead(Term):
    """A user's own term with a trainable head and a buffer: MSE between a learned map of the student's pooled
    features and the teacher's, per example."""

    unit = "examples"
    Options = _ProbeOptions

    def needs(self) -> Needs:
        return self.options.pooled_needs()

    def setup(self, student, teacher, batch):
        s = pooled(student, batch, self.options, "student", self.name)
        t = pooled(teacher, batch, self.options, "teacher", self.name)
        self.head = torch.nn.Linear(s.shape[-1], t.shape[-1])
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, student, teacher, batch):
        if batch.training:
            self.calls += 1
        s = pooled(student, batch, self.options, "student", self.name)
        t = pooled(teacher, batch, self.options, "teacher", self.name).detach()
        return self.options.scale * (self.head(s) - t).pow(2).mean(-1).sum()


def _trainer(tmp_path, terms, **overrides):
    values = {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1}
    args = DistillationConfig(output_dir=str(tmp_path / "out"), terms=terms, **{**COMMON, **values, **overrides})
    student = bert(hidden=16, layers=2, heads=2, dropout=0.0, seed=1)
    teacher = bert(hidden=32, layers=4, heads=4, dropout=0.0, seed=0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data())


def test_term_config_errors_name_the_term_the_option_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"no term named 'rdk'.*Known terms: \["):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "rdk"}])
    with pytest.raises(ValueError, match=r"term 'sp' has no option 'layers'; its options are \['layer'"):
        DistillationConfig(output_dir="x", report_to=[], terms='[{"name": "sp", "layers": 2}]')
    with pytest.raises(ValueError, match=r"term 'test_embedding_head': scale must be > 0"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "test_embedding_head", "scale": 0}])
    with pytest.raises(ValueError, match=r"sp.weight must be a finite number >= 0"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "sp", "weight": -1}])
    with pytest.raises(ValueError, match="given twice"):
        DistillationConfig(output_dir="x", report_to=[], terms=[{"name": "sp"}, {"name": "sp"}])
    with pytest.raises(ValueError, match="must be a JSON list"):
        DistillationConfig(output_dir="x", report_to=[], terms="[{name: sp}]")
    # Only terms weighted: not "nothing would be trained".
    config = DistillationConfig(output_dir="x", report_to=[], task_weight=0, logit_weight=0, terms=[{"name": "sp"}])
    assert config.terms == [{"name": "sp", "weight": 1.0}] and config.total_weight == 1.0


def test_register_term_refuses_clashes_and_non_terms():
    assert TERMS["test_embedding_head"] is _EmbeddingHead
    with pytest.raises(ValueError, match="already registered"):

        @register_term("sp")
        class Other(Term):
            def forward(self, student, teacher, batch):
                return torch.zeros(())

    with pytest.raises(TypeError, match="subclass of hfkd.terms.Term"):
        register_term("not_a_term")(object)


def test_a_term_with_state_trains_logs_and_stays_out_of_the_student(tmp_path):
    terms = [{"name": "test_embedding_head", "weight": 0.5, "pooling": "cls"}, {"name": "sp", "weight": 100.0}]
    trainer = _trainer(tmp_path, terms, save_strategy="steps", save_steps=3)
    head = trainer.term_set.terms["test_embedding_head"].head
    before = head.weight.detach().clone()
    in_optimizer = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert id(head.weight) in in_optimizer and id(head.bias) in in_optimizer
    trainer.train()
    assert not torch.equal(head.weight, before)  # trained by the same optimizer
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logs:
        assert {"task", "distill/logit", "distill/test_embedding_head", "distill/sp"} <= set(entry)
        total = (
            0.5 * entry["task"]
            + 0.5 * entry["distill/logit"]
            + 0.5 * entry["distill/test_embedding_head"]
            + 100.0 * entry["distill/sp"]
        )
        assert entry["loss"] == pytest.approx(total, rel=1e-4)
    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / TERMS_FILE).is_file()
    trainer.save_model(str(tmp_path / "student"))
    from safetensors.torch import load_file

    saved = set(load_file(str(tmp_path / "student" / "model.safetensors")))
    assert saved == set(trainer.model.state_dict())  # the student's own tensors, no term state


def test_term_state_is_restored_exactly_on_resume(tmp_path):
    terms = [{"name": "test_embedding_head", "weight": 1.0}]
    whole = _trainer(tmp_path / "a", terms, max_steps=4)
    whole.train()
    first = _trainer(tmp_path / "b", terms, max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed = _trainer(tmp_path / "b", terms, max_steps=4, save_strategy="steps", save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-2"))
    for a, b in ((whole, resumed),):
        torch.testing.assert_close(
            a.term_set.terms["test_embedding_head"].head.weight,
            b.term_set.terms["test_embedding_head"].head.weight,
            rtol=1e-6,
            atol=1e-7,
        )
        assert float(b.term_set.terms["test_embedding_head"].calls) == 4.0  # the buffer came back from step 2
        for name, value in parameters_of(a.model).items():
            torch.testing.assert_close(value, parameters_of(b.model)[name], rtol=1e-6, atol=1e-7)


def test_example_terms_accumulate_exactly_and_batch_terms_average(tmp_path):
    """Examples terms: 8 x 1 equals 2 x 4. Batch terms: the logged value is the mean of the micro-batch values."""
    terms = [{"name": "test_embedding_head", "weight": 1.0}]
    one = _trainer(tmp_path / "one", terms, max_steps=2, per_device_train_batch_size=8, optim="sgd")
    one.train()
    four = _trainer(
        tmp_path / "four",
        terms,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        optim="sgd",
    )
    four.train()
    for name, value in parameters_of(one.model).items():
        torch.testing.assert_close(value, parameters_of(four.model)[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        one.term_set.terms["test_embedding_head"].head.weight,
        four.term_set.terms["test_embedding_head"].head.weight,
        rtol=1e-5,
        atol=1e-6,
    )


def test_the_readme_example_of_a_users_own_term_runs(tmp_path):
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("```python", readme.index("**Your own term:**")) + len("```python")
    code = readme[start : readme.index("```", start)]
    if "pooled_cosine" not in TERMS:
        exec(compile(code, "README.md", "exec"), {})
    trainer = _trainer(tmp_path, [{"name": "pooled_cosine", "weight": 1.0, "margin": 0.1}])
    before = trainer.term_set.terms["pooled_cosine"].proj.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, trainer.term_set.terms["pooled_cosine"].proj.weight)
    assert all("distill/pooled_cosine" in e for e in trainer.state.log_history if "loss" in e)
