"""On-policy distillation (GKD, `lmbda`) and sequence-level KD (`seq_kd`): hfkd.on_policy and its trainer hooks.

The data are causal-LM rows with labels -100 on the prompt and padding. Tests check what the trained batches hold
(prompt + the generating model's sampled tokens), that the logged terms equal a float64 computation on those
sequences, that units are counted after generation, that a resumed run draws the same, and the early errors.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tiny_models import COMMON, EOS_ID, PAD_ID, parameters_of, text_dataset, tiny_bert, tiny_llama
from transformers import PreTrainedTokenizerFast, default_data_collator

from hfkd import DistillationConfig, DistillationTrainer
from hfkd.data import completion_collator, tokenize_prompt_completion
from hfkd.on_policy import GenerationSettings, left_padded, prompt_positions, rebuilt_batch

SEQ = 10


def prompt_rows(n: int = 8, *, seed: int = 0) -> Dataset:
    """Rows of SEQ tokens: a prompt of 2-5 tokens, a completion of 1-5, right padding; labels on the completion."""
    g = torch.Generator().manual_seed(seed)
    ids, mask, labels = [], [], []
    for i in range(n):
        prompt, completion = 2 + i % 4, 1 + (3 * i) % 5
        tokens = torch.randint(5, 100, (prompt + completion,), generator=g).tolist()
        pad = SEQ - len(tokens)
        ids.append(tokens + [PAD_ID] * pad)
        mask.append([1] * len(tokens) + [0] * pad)
        labels.append([-100] * prompt + tokens[prompt:] + [-100] * pad)
    return Dataset.from_dict({"input_ids": ids, "attention_mask": mask, "labels": labels})


def prompts_of(data: Dataset) -> set[tuple[int, ...]]:
    """Each row's prompt: its tokens before the first label."""
    prompts = set()
    for row in data:
        first = next(k for k, label in enumerate(row["labels"]) if label != -100)
        prompts.add(tuple(row["input_ids"][:first]))
    return prompts


def models():
    return tiny_llama(16, 2, seed=1), tiny_llama(32, 4, seed=0)


class Recorder(DistillationTrainer):
    """Keeps each trained micro-batch and, per window, the batches, num_items_in_batch and the counted units."""

    def __init__(self, *args, **kwargs):
        self.trained, self.windows = [], []
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.trained.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self.windows.append((batches, num_items, dict(self.step.units.window or {})))
        return batches, num_items


def record_generate(model) -> list:
    """Wraps `model.generate`: each call's (kwargs, returned sequences); asserts it runs in eval mode."""
    calls, original = [], model.generate

    def generate(*args, **kwargs):
        assert not model.training  # no dropout while sampling
        out = original(*args, **kwargs)
        calls.append((kwargs, out.clone()))
        return out

    model.generate = generate
    return calls


def forbid_generate(model) -> None:
    def generate(*args, **kwargs):
        raise AssertionError(f"{type(model).__name__}.generate must not run here")

    model.generate = generate


def train(tmp_path, name, student, teacher, data, **config):
    settings = dict(
        max_steps=1,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        **COMMON,
    )
    settings.update(config)
    args = DistillationConfig(output_dir=str(tmp_path / name), **settings)
    trainer = Recorder(model=student, teacher_model=teacher, args=args, train_dataset=data)
    trainer.train()
    return trainer, [e for e in trainer.state.log_history if "loss" in e]


def check_rebuilt(trained: dict, call, data: Dataset) -> None:
    """The trained rows are each prompt given to generate + the tokens it sampled (up to EOS), right-padded."""
    kwargs, sequences = call
    prompts, prompt_mask = kwargs["input_ids"], kwargs["attention_mask"].bool()
    width = prompts.shape[1]
    known = prompts_of(data)
    ids, labels, mask = trained["input_ids"], trained["labels"], trained["attention_mask"]
    assert len(ids) == len(prompts)
    for row in range(len(ids)):
        prompt = prompts[row][prompt_mask[row]]
        assert tuple(prompt.tolist()) in known  # a prompt of the data set, as it was
        completion = sequences[row, width:].tolist()
        if EOS_ID in completion:
            completion = completion[: completion.index(EOS_ID) + 1]
        p, c = len(prompt), len(completion)
        assert ids[row, :p].tolist() == prompt.tolist()
        assert ids[row, p : p + c].tolist() == completion
        assert labels[row, p : p + c].tolist() == completion
        assert (labels[row, :p] == -100).all() and (labels[row, p + c :] == -100).all()
        assert mask[row].tolist() == [1] * (p + c) + [0] * (ids.shape[1] - p - c)


def divergence64(student, teacher, batch: dict, loss: str, temperature: float, beta: float) -> float:
    """The logit term by hand in float64: per position KL(teacher_T || student_T) or the generalised JSD, T^2-scaled,
    over the shifted positions whose label counts, divided by their number."""
    s64, t64 = copy.deepcopy(student).double().eval(), copy.deepcopy(teacher).double().eval()
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        log_s = torch.log_softmax(s64(**inputs).logits[:, :-1] / temperature, -1)
        log_t = torch.log_softmax(t64(**inputs).logits[:, :-1] / temperature, -1)
    p_s, p_t = log_s.exp(), log_t.exp()
    if loss == "kl":
        per_position = (p_t * (log_t - log_s)).sum(-1)
    else:
        log_m = torch.log(beta * p_t + (1 - beta) * p_s)
        per_position = beta * (p_t * (log_t - log_m)).sum(-1) + (1 - beta) * (p_s * (log_s - log_m)).sum(-1)
    mask = batch["labels"][:, 1:] != -100
    return float((per_position * temperature**2)[mask].sum() / mask.sum())


# ---------------------------------------------------------------------------------------------------- pure functions
def test_prompts_are_left_padded_and_rows_rebuilt_up_to_eos():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, 10, 11, -100, -100]]),
        "teacher_id": torch.tensor([0, 1]),
    }
    prompt = prompt_positions(batch)
    assert prompt.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    ids, mask = left_padded(batch["input_ids"], prompt, PAD_ID)
    assert ids.tolist() == [[5, 6], [0, 9]] and mask.tolist() == [[1, 1], [0, 1]]
    settings = GenerationSettings(4, 1.0, 1.0, 0, PAD_ID, (EOS_ID,), 64)
    completions = torch.tensor([[20, EOS_ID, 0, 0], [21, 22, 23, 24]])  # row 0 stopped: padding follows its EOS
    new = rebuilt_batch(batch, prompt, completions, settings)
    assert new["input_ids"].tolist() == [[5, 6, 20, EOS_ID, 0], [9, 21, 22, 23, 24]]
    assert new["labels"].tolist() == [[-100, -100, 20, EOS_ID, -100], [-100, 21, 22, 23, 24]]
    assert new["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert new["teacher_id"].tolist() == [0, 1]  # per-row keys stay


# ---------------------------------------------------------------------------------------------------- training
def test_lmbda_zero_is_todays_training(tmp_path):
    """Off by default (lmbda=0, seq_kd=False): nothing generates; and a scheme that draws no on-policy micro-batch
    (the window taken apart and put back) trains exactly as today, to the bit."""
    data = prompt_rows()
    runs = {}
    for name, config in (("default", {}), ("never", {"lmbda": 1e-12})):
        student, teacher = models()
        forbid_generate(student)
        forbid_generate(teacher)
        trainer, logs = train(
            tmp_path, name, student, teacher, data, max_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=0.5, task_weight=0.5, logit_weight=1.0, **config,
        )  # fmt: skip
        runs[name] = logs, parameters_of(student)
        assert ("on_policy" in logs[0]) == (name == "never")
    (logs, params), (other_logs, other_params) = runs["default"], runs["never"]
    for a, b in zip(logs, other_logs, strict=True):
        for key in ("loss", "task", "distill/logit", "grad_norm"):
            assert a[key] == b[key], key
    for key in params:
        assert torch.equal(params[key], other_params[key]), key
    assert [e["on_policy"] for e in runs["never"][0]] == [0.0, 0.0]


@pytest.mark.parametrize("chunk,loss", [(0, "jsd"), (128, "jsd"), (128, "kl")])
def test_on_policy_trains_on_the_students_samples(tmp_path, chunk, loss):
    """lmbda=1: the student samples completions for the batch's prompts; the logged term is the divergence on those
    completion tokens only (float64 by hand), on the full-logits and the chunked paths."""
    data = prompt_rows()
    student, teacher = models()
    calls = record_generate(student)
    forbid_generate(teacher)
    trainer, logs = train(
        tmp_path, "run", student, teacher, data, lmbda=1.0, task_weight=0.0, logit_weight=1.0, logit_loss=loss,
        jsd_beta=0.5, temperature=0.9, generation_temperature=1.0, logit_chunk_size=chunk, max_new_tokens=5,
    )  # fmt: skip
    assert (trainer.step.plan.head is not None) == (chunk > 0)
    assert len(calls) == 1 and len(trainer.trained) == 1
    kwargs, _ = calls[0]
    assert kwargs["do_sample"] and kwargs["temperature"] == 1.0 and kwargs["max_new_tokens"] == 5
    batch = trainer.trained[0]
    check_rebuilt(batch, calls[0], data)
    original = sum(sum(lab != -100 for lab in row[1:]) for row in data["labels"])  # what the data would have counted
    assert logs[0]["on_policy"] == 1.0
    expected = divergence64(student, teacher, batch, loss, 0.9, 0.5)
    assert logs[0]["distill/logit"] == pytest.approx(expected, rel=1e-5, abs=1e-8)
    assert int((batch["labels"][:, 1:] != -100).sum()) == int(trainer.windows[0][2]["logit"]) != original


def test_units_are_counted_after_generation(tmp_path):
    """Near-greedy sampling gives the same completions for 4 x 1 and 2 x 2 micro-batches; then loss and update are
    the same, which holds only if the window's units (and num_items_in_batch) count the generated tokens."""
    data = prompt_rows(4, seed=3)
    runs = []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        student, teacher = models()
        trainer, logs = train(
            tmp_path, f"b{batch_size}", student, teacher, data, lmbda=1.0, per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation, learning_rate=0.5, task_weight=0.5, logit_weight=1.0,
            generation_temperature=1e-3, max_new_tokens=4,
        )  # fmt: skip
        (batches, num_items, counts) = trainer.windows[0]
        generated = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        assert int(counts["logit"]) == generated and int(num_items) == generated
        rows = {
            tuple(ids[m.bool()].tolist())
            for b in trainer.trained
            for ids, m in zip(b["input_ids"], b["attention_mask"])
        }
        runs.append((logs[0], parameters_of(student), rows))
    (log_a, params_a, rows_a), (log_b, params_b, rows_b) = runs
    assert rows_a == rows_b  # the precondition: the same sequences, batched otherwise
    for key in ("loss", "task", "distill/logit"):
        assert log_a[key] == pytest.approx(log_b[key], rel=1e-5, abs=1e-6), key  # float32, other padding widths
    for name in params_a:
        torch.testing.assert_close(params_a[name], params_b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_seq_kd_trains_on_the_teachers_completions(tmp_path):
    """Kim & Rush: the teacher's sampled completions become the targets of the student's own loss."""
    data = prompt_rows()
    student, teacher = models()
    forbid_generate(student)
    calls = record_generate(teacher)
    trainer, logs = train(
        tmp_path, "run", student, teacher, data, seq_kd=True, task_weight=1.0, logit_weight=0.0, max_new_tokens=5
    )
    assert len(calls) == 1 and "on_policy" not in logs[0]
    batch = trainer.trained[0]
    check_rebuilt(batch, calls[0], data)
    with torch.no_grad():
        s64 = copy.deepcopy(student).double().eval()
        logits = s64(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    expected = F.cross_entropy(logits[targets != -100], targets[targets != -100])
    assert logs[0]["task"] == pytest.approx(float(expected), rel=1e-5)


def test_resume_repeats_the_draws(tmp_path):
    """The draws depend on the seed and the step only: a resumed run has the uninterrupted run's pattern of on- and
    off-policy micro-batches, and (sampling seeded the same way) ends with the same student."""
    data = prompt_rows(16, seed=1)

    def run(name, resume=None):
        student, teacher = models()
        args = DistillationConfig(
            output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, lmbda=0.5, max_new_tokens=3,
            task_weight=0.0, logit_weight=1.0, **{**COMMON, "save_strategy": "steps"}, save_steps=2,
        )  # fmt: skip
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        pattern = {e["step"]: e["on_policy"] for e in trainer.state.log_history if "on_policy" in e}
        return pattern, parameters_of(student)

    full, full_params = run("full")
    assert len(set(full.values())) > 1  # a mix of on- and off-policy windows, so the comparison means something
    resumed, resumed_params = run("resumed", str(tmp_path / "full" / "checkpoint-2"))
    assert resumed == full  # steps 1-2 come from checkpoint-2's history, 3-4 were drawn after the resume
    for name in full_params:
        torch.testing.assert_close(resumed_params[name], full_params[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------- data helper
def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>", "<unk>", "<system>", "<user>", "<assistant>", "be", "brief", "how", "are", "you"]
    words += ["fine", "thanks", "hello", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% if m['role'] == 'assistant' %}<eos> "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return fast, {w: i for i, w in enumerate(words)}


def test_prompt_completion_and_messages_rows_mask_the_prompt():
    tok, v = word_tokenizer()
    row = tokenize_prompt_completion({"prompt": "hello there", "completion": " how are you"}, tok)
    assert row["input_ids"] == [v["hello"], v["there"], v["how"], v["are"], v["you"], v["<eos>"]]
    assert row["labels"] == [-100, -100, v["how"], v["are"], v["you"], v["<eos>"]]
    assert row["attention_mask"] == [1] * 6

    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "how are you"},
        {"role": "assistant", "content": "fine thanks"},
    ]
    chat = Dataset.from_dict({"messages": [messages, messages[1:]]})
    chat = chat.map(tokenize_prompt_completion, fn_kwargs={"tokenizer": tok}, remove_columns=["messages"])
    prompt = ["<system>", "be", "brief", "<user>", "how", "are", "you", "<assistant>"]
    answer = ["fine", "thanks", "<eos>"]
    assert chat[0]["input_ids"] == [v[w] for w in prompt + answer]
    assert chat[0]["labels"] == [-100] * len(prompt) + [v[w] for w in answer]
    assert chat[1]["labels"] == [-100] * (len(prompt) - 3) + [v[w] for w in answer]
    # Conversational prompt/completion columns give the same rows.
    same = tokenize_prompt_completion({"prompt": messages[:-1], "completion": messages[-1:]}, tok)
    assert same == {k: chat[0][k] for k in same}

    # transformers' DataCollatorForSeq2Seq pads on the right: pad id, mask 0, labels -100.
    batch = completion_collator(tok)([chat[1], chat[0]])
    short = len(chat[1]["input_ids"])
    assert batch["input_ids"][0].tolist() == chat[1]["input_ids"] + [v["<pad>"]] * 3
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * 3
    assert batch["labels"][0].tolist() == chat[1]["labels"] + [-100] * 3
    assert prompt_positions(dict(batch))[0].sum() == len(prompt) - 3

    with pytest.raises(ValueError, match="must end with the assistant's answer"):
        tokenize_prompt_completion({"messages": messages[:-1]}, tok)
    tok.padding_side = "left"
    with pytest.raises(ValueError, match="padding_side = 'right'"):
        completion_collator(tok)
    tok.chat_template = None  # chat data needs the template that writes the turns
    with pytest.raises(ValueError, match="need the tokenizer's chat template"):
        tokenize_prompt_completion({"messages": messages}, tok)


# ---------------------------------------------------------------------------------------------------- early errors
@pytest.mark.parametrize(
    "config,match",
    [
        ({"lmbda": 1.5}, "lmbda must lie in"),
        ({"lmbda": -0.1}, "lmbda must lie in"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"generation_temperature": 0.0}, "generation_temperature must be > 0"),
        ({"generation_top_p": 0.0}, "generation_top_p"),
        ({"lmbda": 0.5, "teacher_cache_dir": "cache"}, "unset teacher_cache_dir"),
        ({"seq_kd": True, "teacher_cache_dir": "cache"}, "unset teacher_cache_dir"),
    ],
)
def test_bad_config_fails_naming_the_field(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        DistillationConfig(output_dir=str(tmp_path / "out"), **COMMON, **config)
    assert not (tmp_path / "out").exists()


def _long_prompts() -> Dataset:
    ids = [[5 + (i + j) % 90 for j in range(64)] for i in range(4)]  # tiny_llama has 64 positions
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * 64] * 4, "labels": [[-100] * 64] * 4})


def _late_row_without_prompt() -> Dataset:
    data = prompt_rows(6).to_dict()
    data["labels"][5] = list(data["input_ids"][5])  # a plain LM row, after the two the probe reads
    return Dataset.from_dict(data)


@pytest.mark.parametrize(
    "case,match",
    [
        ("classifier", "needs a decoder-only causal language model"),
        ("long_prompts", "no generated token fits"),
        ("no_prompt", "train_dataset row 0 has no prompt: no real token comes before its first label"),
        ("late_no_prompt", "train_dataset row 5 has no prompt"),  # the whole column is read, not the first rows
        ("collator_labels", "row 0 of the first batch of train_dataset has no prompt"),  # data the scan cannot read
        ("seq_kd_classifier", "seq_kd makes the teacher generate"),
    ],
)
def test_bad_input_fails_before_the_first_step(tmp_path, case, match):
    out = tmp_path / "out"
    student, teacher = models()
    data, config = prompt_rows(), {"lmbda": 1.0}
    if case in ("classifier", "seq_kd_classifier"):
        student, teacher = tiny_bert("sequence", 16, 2, seed=1), tiny_bert("sequence", seed=0)
        data = text_dataset("sequence")
        config = {"seq_kd": True} if case == "seq_kd_classifier" else config
    elif case == "long_prompts":
        data = _long_prompts()
    elif case == "no_prompt":
        data = text_dataset("causal")  # labels = input_ids: language-model data has no prompts
    elif case == "late_no_prompt":
        data = _late_row_without_prompt()
    collator = None
    if case == "collator_labels":  # a collator of its own that labels every token, as language-model collators do
        collator = lambda rows: {**default_data_collator(rows), "labels": default_data_collator(rows)["input_ids"]}  # noqa: E731
        data = data.remove_columns("labels")
    args = DistillationConfig(output_dir=str(out), max_steps=1, per_device_train_batch_size=2, **COMMON, **config)
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(
            model=student, teacher_model=teacher, args=args, train_dataset=data, data_collator=collator
        )
    assert not out.exists()
