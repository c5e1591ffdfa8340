"""On-policy distillation (GKD, lmbda=1): hfkd against TRL 1.16's on-policy trainer. Prints tables, writes JSON.

    python benchmarks/bench_onpolicy.py --rounds 20 --json benchmarks/onpolicy.json   # SmolLM2 (make bench-onpolicy)
    python benchmarks/bench_onpolicy.py --tiny --rounds 2                              # tiny Llama models, seconds

Both sides distil the same student from the same teacher on the same prompts with the same divergence: the
generalised JSD (beta 0.5 by default) at temperature 1, taken on the completion tokens the student samples before
each step (sampling temperature 1, no top-p / top-k cut), AdamW at the same learning rate, no task loss.

**Which TRL trainer.** TRL 1.16 has two on-policy distillers: the stable ``trl.DistillationTrainer`` (what the issue
names "TRL 1.16's DistillationTrainer (on-policy)") and ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=1``. This
benchmark uses ``trl.DistillationTrainer``: it is on-policy only (every step generates; there is no ``lmbda``), it is
TRL's maintained API (``trl.experimental.distillation`` is a deprecated alias of it, GKDTrainer lives in
``experimental``), and it runs here on CPU: it takes a ``"prompt"`` column of texts and a tokenizer, tokenizes the
prompts every step, samples with ``model.generate`` (``max_completion_length``, ``temperature``, ``top_p``,
``top_k``, optional ``generation_kwargs``), cuts each completion after its first EOS, and trains on
``_chunked_divergence_loss``, which projects the student's and teacher's last hidden states through their output
heads tile by tile (never holding the full logits) and on CPU computes every position, masking the padding.
``trl_side.make_trl_onpolicy_trainer`` builds it; the tiny mode gives it a word-level tokenizer built offline.

**How TRL's loss maps onto hfkd's** (TRL source: ``DistillationTrainer._compute_loss`` / ``_chunked_divergence_loss``
and ``kernels/chunked_divergence.py``; hfkd: ``hfkd.losses.logits.generalized_jsd``, see also TRL_NOTES.md):

- positions: both take the logits that predict the completion tokens (the last prompt token's through the
  second-to-last completion token's), EOS included, padding excluded; prompt tokens never count;
- normalisation: both divide the sum over those positions by their number (TRL: ``num_items_in_batch`` = the
  completion mask's sum, counted after generation; hfkd: the window's units, counted after generation in
  ``get_batch_samples``), so with one micro-batch per step both are the mean over the batch's completion tokens;
- beta: the same convention on both sides, not mirrored: mixture M = beta p_teacher + (1 - beta) p_student,
  JSD_beta = beta KL(teacher || M) + (1 - beta) KL(student || M), beta = 0 forward KL, beta = 1 reverse KL
  (``jsd_beta`` = TRL's ``beta``). The check below runs beta 0.1 and 0.9 besides the benchmark's beta, where a
  mirrored convention would show;
- temperature: TRL's ``temperature`` is both the sampling and the loss temperature and its loss has no T^2 factor;
  hfkd's ``generation_temperature`` samples and its ``temperature`` softens the logit term, scaled by T^2. At T = 1
  (used here) the two losses are the same number; at T != 1 set hfkd's ``generation_temperature`` = T and divide its
  loss by T^2.

**1. Losses on the same completions.** Generation is random, so the losses are compared on one set of sequences:
the student (hfkd's generation: ``get_batch_samples`` with a fixed seed) samples completions for the first batch's
prompts once; hfkd's ``DistillationTrainer.compute_loss`` runs on that batch and TRL's
``DistillationTrainer.compute_loss`` on the same tokens laid out as TRL lays out a generated batch (prompts
left-padded, completions right-padded, ``num_items_in_batch`` = completion tokens). Two sets: "sampled" (as
generated) and "ragged" (the same completions cut to different lengths per row, each ending in EOS, so the masks and
the token count are exercised). Each also against a float64 computation from the definition on both models' full
logits, and the student's gradients from the two libraries are compared too. Agreement is expected to float32
rounding (~1e-6 relative).

**2. Step time and peak memory.** A step is what ``Trainer``'s loop does per optimizer step with no accumulation,
generation included: hfkd collates the pre-tokenized prompt rows (labels -100), ``get_batch_samples`` replaces them
by the student's completions (prompt + completion, labels on the completion), ``training_step``; TRL's identity
collator passes ``{"prompt": text}`` rows, ``get_batch_samples``, ``training_step`` (whose ``_prepare_inputs``
tokenizes, generates and pads); then on both ``optimizer.step()``, ``zero_grad()`` and the loss read on the host.
The two trainers start from the same student weights and take turns on the same prompts (bench_distill's
``take_turns``: rotating order, round 0 a warm-up), for ``--rounds`` timed rounds. Times: each side's median, and
hfkd/TRL as the median of the per-round ratios (what the target is judged on, bench_distill's JUDGED_ON) and as the
ratio of the medians. Peak memory as bench_distill.py measures it: each side in a fresh process, one warm-up step,
then the peak resident memory during a second step above what was resident before it.

A step's cost depends on how many tokens are generated, and sampled completions end at different lengths on the two
sides. By default the length is fixed on both: ``min_new_tokens = max_new_tokens`` (TRL: ``generation_kwargs``;
hfkd, which has no such option: the student's ``generation_config.min_new_tokens``, which ``generate`` reads beside
hfkd's arguments), so EOS is suppressed and every completion is ``max_new_tokens`` long; ``--free-length`` lets EOS
end them. Either way the mean number of completion tokens per step is reported for each side. Both sides use the
same EOS ids (the tokenizer's and the model's, set on the student's generation config before it is copied) and the
same pad id.

Target (the project's issue): hfkd no slower (step time ratio <= 1.0) and no more memory (peak ratio <= 1.0) than
TRL.
"""

import argparse
import copy
import glob
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_distill import (  # noqa: E402  (sets HF_HUB_OFFLINE etc. before transformers is imported by it)
    FORMS,
    JUDGED_ON,
    _load_text,
    _smollm2_teacher,
    _status,
    _verdict,
    finish_run,
    load_between,
    load_summary,
    machine,
    ratios,
    run_header,
    take_turns,
    train_step,
)
from transformers import default_data_collator  # noqa: E402

from hfkd import DistillationConfig, DistillationTrainer, student_from_teacher  # noqa: E402

warnings.filterwarnings("ignore")

TARGETS = {"time": 1.0, "memory": 1.0}
IGNORE = -100
LEARNING_RATE = 1e-5
TEMPERATURE = 1.0  # both the sampling and the loss temperature (TRL ties them; see the docstring)
CHECK_BETAS = (0.1, 0.9)  # besides --beta: a mirrored beta convention would show here
# (prompts, prompt tokens, max_new_tokens, batch) for each mode
SHAPES = {"tiny": (16, 12, 12, 4), "smollm2": (32, 32, 32, 4)}


# ---------------------------------------------------------------------------------------------------- setup
def word_tokenizer(vocab_size: int, pad_id: int = 0, bos_id: int = 1, eos_id: int = 2, unk_id: int = 3):
    """A tokenizer built offline for the tiny models: "w17 w42" -> [17, 42] (specials are <pad> <s> </s> <unk>, named
    so that no word contains them), no special tokens added."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    specials = {pad_id: "<pad>", bos_id: "<s>", eos_id: "</s>", unk_id: "<unk>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny_models():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,  # sharper than the default 0.02: distributions far from uniform, losses far from 0
    )
    teacher = LlamaForCausalLM(config)
    return teacher, student_from_teacher(teacher, num_layers=2), word_tokenizer(config.vocab_size)


def _tiny_prompts(count: int, length: int, vocab_size: int) -> list[str]:
    g = torch.Generator().manual_seed(0)
    return [
        " ".join(f"w{i}" for i in torch.randint(4, vocab_size, (length,), generator=g).tolist()) for _ in range(count)
    ]


def _fortune_prompts(tokenizer, count: int, length: int) -> list[str]:
    """`count` fortunes' first `length` tokens, as texts that the tokenizer turns back into exactly `length` tokens
    (so that both sides, hfkd from token ids and TRL from text, get the same prompts of the same length)."""
    paths = sorted(glob.glob("/usr/share/games/fortunes/*.u8")) or sorted(glob.glob("/usr/share/games/fortunes/*"))
    prompts = []
    for path in paths:
        if not os.path.isfile(path) or path.endswith(".dat"):
            continue
        with open(path, encoding="utf-8", errors="ignore") as handle:
            fortunes = handle.read().split("\n%\n")
        for fortune in fortunes:
            ids = tokenizer(fortune.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) < length:
                continue
            text = tokenizer.decode(ids[:length])
            if len(tokenizer(text)["input_ids"]) == length:
                prompts.append(text)
            if len(prompts) == count:
                return prompts
    raise SystemExit(f"Not enough fortunes of {length} tokens for {count} prompts (apt-get install fortunes).")


def build(tiny: bool, max_new_tokens: int | None = None, prompt_tokens: int | None = None, batch: int | None = None):
    """The pair, the tokenizer, the prompts (texts) and hfkd's rows for them (the same token ids)."""
    count, length, new, size = SHAPES["tiny" if tiny else "smollm2"]
    length, new, size = prompt_tokens or length, max_new_tokens or new, batch or size
    count = max(count, 2 * size)
    if tiny:
        teacher, student, tokenizer = _tiny_models()
        prompts = _tiny_prompts(count, length, teacher.config.vocab_size)
    else:
        teacher, tokenizer = _smollm2_teacher()
        torch.manual_seed(0)
        student = student_from_teacher(teacher, num_layers=6)
        prompts = _fortune_prompts(tokenizer, count, length)
    teacher.eval()
    # One EOS set and one pad id for both sides: TRL stops at the tokenizer's EOS and the model's; so does hfkd,
    # which reads them from the student's generation config (each side gets a copy of this student).
    eos = student.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    eos = sorted({tokenizer.eos_token_id, *eos})
    student.generation_config.eos_token_id = eos
    student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.config.pad_token_id = tokenizer.pad_token_id
    ids = tokenizer(prompts)["input_ids"]  # what TRL's _tokenize_prompts computes from the same texts
    rows = [{"input_ids": x, "attention_mask": [1] * len(x), "labels": [IGNORE] * len(x)} for x in ids]
    return {
        "pair": "tiny" if tiny else "smollm2",
        "teacher": teacher,
        "student": student,
        "tokenizer": tokenizer,
        "prompts": prompts,
        "rows": rows,
        "batch": size,
        "prompt_tokens": sorted({len(x) for x in ids}),
        "max_new_tokens": new,
        "eos_token_ids": eos,
        "pad_token_id": tokenizer.pad_token_id,
    }


# ---------------------------------------------------------------------------------------------------- the two sides
def hfkd_onpolicy_trainer(setup: dict, student, out: str, beta: float, fixed_length: bool) -> DistillationTrainer:
    """hfkd's on-policy trainer: lmbda=1, the JSD logit term alone at T=1, sampling at T=1."""
    import datasets

    if fixed_length:  # hfkd has no min_new_tokens option; generate() reads it from the generation config
        student.generation_config.min_new_tokens = setup["max_new_tokens"]
    args = DistillationConfig(
        output_dir=out,
        per_device_train_batch_size=setup["batch"],
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        learning_rate=LEARNING_RATE,
        task_weight=0.0,
        logit_weight=1.0,
        logit_loss="jsd",
        jsd_beta=beta,
        temperature=TEMPERATURE,
        lmbda=1.0,
        max_new_tokens=setup["max_new_tokens"],
        generation_temperature=TEMPERATURE,
    )
    return DistillationTrainer(
        model=student,
        teacher_model=setup["teacher"],
        args=args,
        train_dataset=datasets.Dataset.from_list(setup["rows"]),
        data_collator=default_data_collator,
    )


def trl_trainer(setup: dict, student, out: str, beta: float, fixed_length: bool):
    from trl_side import make_trl_onpolicy_trainer

    return make_trl_onpolicy_trainer(
        student,
        setup["teacher"],
        setup["prompts"],
        setup["tokenizer"],
        output_dir=out,
        beta=beta,
        temperature=TEMPERATURE,
        max_new_tokens=setup["max_new_tokens"],
        fixed_length=fixed_length,
        learning_rate=LEARNING_RATE,
        batch_size=setup["batch"],
        seed=0,
        use_cpu=True,
    )


def hfkd_onpolicy_step(trainer: DistillationTrainer, rows: list[dict]) -> tuple[float, int]:
    """One optimizer step as Trainer takes it (bench_distill's `_step`), generation included; (loss, completion
    tokens the loss was taken on, EOS included)."""
    loss, batch = train_step(trainer, rows)
    trainer.state.global_step += 1  # as Trainer's loop does; hfkd seeds each step's sampling from it
    return loss, int(batch["labels"].ne(IGNORE).sum())


def _batches(setup: dict) -> list[tuple[list[dict], list[str]]]:
    """(hfkd rows, TRL prompt texts) of each batch: the same prompts."""
    size = setup["batch"]
    return [
        (setup["rows"][i : i + size], setup["prompts"][i : i + size])
        for i in range(0, len(setup["rows"]) - size + 1, size)
    ]


# ---------------------------------------------------------------------------------------------------- 1. losses
def _ragged(batch: dict, eos_id: int, pad_id: int) -> dict:
    """The batch with row r's completion cut to a different length (row 0 whole, the others shorter, ending in EOS)."""
    ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
    attention = batch["attention_mask"].clone()
    rows = len(ids)
    for r in range(1, rows):
        positions = labels[r].ne(IGNORE).nonzero().flatten()
        keep = max(1, len(positions) * (rows - r) // rows)
        last = int(positions[keep - 1])
        ids[r, last] = labels[r, last] = eos_id
        ids[r, last + 1 :] = pad_id
        labels[r, last + 1 :] = IGNORE
        attention[r, last + 1 :] = 0
    return {**batch, "input_ids": ids, "labels": labels, "attention_mask": attention}


def trl_layout(batch: dict, pad_id: int) -> dict[str, torch.Tensor]:
    """An hfkd batch (prompt + completion, right-padded, labels on the completion) as TRL lays out a generated batch:
    prompts left-padded, completions right-padded, with their masks."""
    real = batch["attention_mask"].bool()
    labelled = batch["labels"].ne(IGNORE)
    prompts, completions = [], []
    for r in range(len(batch["input_ids"])):
        first = int(labelled[r].int().argmax())
        prompts.append(batch["input_ids"][r, :first][real[r, :first]])
        completions.append(batch["input_ids"][r][labelled[r]])
    p_width, c_width = max(map(len, prompts)), max(map(len, completions))
    out = {
        "prompt_ids": torch.full((len(prompts), p_width), pad_id, dtype=torch.long),
        "prompt_mask": torch.zeros((len(prompts), p_width), dtype=torch.long),
        "completion_ids": torch.full((len(prompts), c_width), pad_id, dtype=torch.long),
        "completion_mask": torch.zeros((len(prompts), c_width), dtype=torch.long),
    }
    for r, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        out["prompt_ids"][r, p_width - len(p) :] = p
        out["prompt_mask"][r, p_width - len(p) :] = 1
        out["completion_ids"][r, : len(c)] = c
        out["completion_mask"][r, : len(c)] = 1
    return out


def _gradients(loss: torch.Tensor, model) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None}


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def same_completion_losses(setup: dict, beta: float, fixed_length: bool, work: str) -> dict:
    """Part 1: hfkd's and TRL's losses (and student gradients) on the same student-sampled sequences."""
    from trl_side import _hfkd_definition, trl_onpolicy_loss

    rows, _ = _batches(setup)[0]
    generator = hfkd_onpolicy_trainer(setup, copy.deepcopy(setup["student"]), f"{work}/gen", beta, fixed_length)
    batch = generator._prepare_inputs(default_data_collator(rows))
    samples, _ = generator.get_batch_samples(iter([batch]), 1, generator.args.device)  # hfkd's generation, seeded
    sampled = {k: v for k, v in samples[0].items() if isinstance(v, torch.Tensor)}
    sets = {"sampled": sampled, "ragged": _ragged(sampled, setup["eos_token_ids"][0], setup["pad_token_id"])}
    del generator
    logits = {}  # both models' full logits on each set, for the float64 definition (the same at every beta)
    with torch.no_grad():
        for name, seqs in sets.items():
            inputs = {"input_ids": seqs["input_ids"], "attention_mask": seqs["attention_mask"]}
            logits[name] = (setup["student"](**inputs).logits, setup["teacher"](**inputs).logits)

    cases = []
    for b in dict.fromkeys((beta, *CHECK_BETAS)):
        ours = hfkd_onpolicy_trainer(setup, copy.deepcopy(setup["student"]), f"{work}/h{b}", b, fixed_length)
        theirs = trl_trainer(setup, copy.deepcopy(setup["student"]), f"{work}/t{b}", b, fixed_length)
        for name, seqs in sets.items():
            ours.model.train()
            loss_h = ours.compute_loss(ours.model, dict(seqs))
            grads_h = _gradients(loss_h, ours.model)
            layout = trl_layout(seqs, setup["pad_token_id"])
            loss_t = trl_onpolicy_loss(theirs, **layout)
            grads_t = _gradients(loss_t, theirs.model)
            definition = _hfkd_definition(*logits[name], seqs["labels"], b, 1.0)
            names = sorted(set(grads_h) & set(grads_t))
            g_h = torch.cat([grads_h[n].flatten().double() for n in names])
            g_t = torch.cat([grads_t[n].flatten().double() for n in names])
            completion = layout["completion_mask"].sum(1).tolist()
            cases.append(
                {
                    "completions": name,
                    "beta": b,
                    "completion_tokens": int(sum(completion)),
                    "completion_lengths": completion,
                    "hfkd": float(loss_h),
                    "trl": float(loss_t),
                    "definition_float64": float(definition),
                    "relative_difference": _relative(float(loss_h), float(loss_t)),
                    "hfkd_vs_definition": _relative(float(loss_h), float(definition)),
                    "trl_vs_definition": _relative(float(loss_t), float(definition)),
                    "gradient_relative_difference": float((g_h - g_t).norm() / g_t.norm().clamp_min(1e-30)),
                    "gradient_tensors_compared": len(names),
                    "gradient_tensors": [len(grads_h), len(grads_t)],
                }
            )
        del ours, theirs
    return {
        "cases": cases,
        "max_relative_difference": max(c["relative_difference"] for c in cases),
        "max_gradient_relative_difference": max(c["gradient_relative_difference"] for c in cases),
        "how": "completions sampled once by the student through hfkd's get_batch_samples (seed 0); hfkd: "
        "DistillationTrainer.compute_loss on that batch; TRL: DistillationTrainer.compute_loss on the same tokens "
        "in TRL's layout; definition: float64 JSD from both models' full logits; gradients: the student's, from "
        "each library's loss",
    }


# ---------------------------------------------------------------------------------------------------- 2. steps
def timed_steps(setup: dict, beta: float, fixed_length: bool, rounds: int, work: str) -> dict:
    from trl_side import trl_onpolicy_step

    batches = _batches(setup)
    ours = hfkd_onpolicy_trainer(setup, copy.deepcopy(setup["student"]), f"{work}/hfkd", beta, fixed_length)
    theirs = trl_trainer(setup, copy.deepcopy(setup["student"]), f"{work}/trl", beta, fixed_length)
    variants = {
        "hfkd": lambda i: hfkd_onpolicy_step(ours, batches[i % len(batches)][0]),
        "trl": lambda i: trl_onpolicy_step(theirs, batches[i % len(batches)][1]),
    }
    times, results, loads = take_turns(variants, rounds, label="on-policy")
    out = {"rounds": rounds}
    for key in variants:
        tokens = [t for _, t in results[key][1:]]  # the timed rounds
        out[key] = {
            "median_s": statistics.median(times[key]),
            "times_s": times[key],
            "losses": [loss for loss, _ in results[key]],
            "generated_tokens": tokens,
            "mean_generated_tokens": statistics.fmean(tokens),
        }
    out["ratio_hfkd_to_trl"] = ratios(times["hfkd"], times["trl"])
    out["load_per_round"] = loads
    out["load"] = load_summary(loads)
    return out


def memory_child(variant: str, options: argparse.Namespace) -> dict:
    """One step's peak resident memory above what was resident before it, in this fresh process (bench_distill's
    measure: a warm-up step, then VmHWM reset to the resident size and read after the second step)."""
    from trl_side import trl_onpolicy_step

    setup = build(options.tiny, options.max_new_tokens, options.prompt_tokens, options.batch)
    fixed = not options.free_length
    batches = _batches(setup)
    work = tempfile.mkdtemp()
    if variant == "hfkd":
        trainer = hfkd_onpolicy_trainer(setup, setup["student"], work, options.beta, fixed)
        step = lambda i: hfkd_onpolicy_step(trainer, batches[i][0])  # noqa: E731
    elif variant == "trl":
        trainer = trl_trainer(setup, setup["student"], work, options.beta, fixed)
        step = lambda i: trl_onpolicy_step(trainer, batches[i][1])  # noqa: E731
    else:
        raise SystemExit(f"unknown variant {variant}")
    step(0)  # warm-up: gradients and optimizer state now exist
    resident = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (the peak) to the current resident size
    _, tokens = step(1)
    peak = _status("VmHWM")
    return {
        "variant": variant,
        "resident_mib": resident / 2**20,
        "peak_mib": peak / 2**20,
        "step_mib": (peak - resident) / 2**20,
        "generated_tokens": tokens,
    }


def bench_memory(options: argparse.Namespace) -> dict:
    out = {}
    for variant in ("hfkd", "trl"):
        command = [sys.executable, os.path.abspath(__file__), "--memory-child", variant, *_forwarded(options)]
        before = machine()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{done.stderr[-3000:]}")
        child = json.loads(done.stdout.strip().splitlines()[-1])
        after = machine()
        child["wall_s"] = after["wall"] - before["wall"]
        child["load"] = load_between(before, after)
        out[variant] = child
    out["ratio_hfkd_to_trl"] = out["hfkd"]["step_mib"] / max(out["trl"]["step_mib"], 1e-9)
    return out


def _forwarded(options: argparse.Namespace) -> list[str]:
    args = ["--beta", str(options.beta)]
    for flag in ("max_new_tokens", "prompt_tokens", "batch", "threads"):
        if getattr(options, flag) is not None:
            args += [f"--{flag.replace('_', '-')}", str(getattr(options, flag))]
    return args + (["--tiny"] if options.tiny else []) + (["--free-length"] if options.free_length else [])


# ---------------------------------------------------------------------------------------------------- report
def tables(results: dict) -> str:
    s = results["setup"]
    length = "fixed (min_new_tokens = max_new_tokens on both sides)" if s["fixed_length"] else "free (EOS ends it)"
    lines = [
        f"On-policy distillation (lmbda=1), {s['pair']} pair: hfkd vs TRL {results.get('trl', '?')} "
        f"{s['trl_trainer']}; batch {s['batch']} prompts of {s['prompt_tokens']} tokens, max_new_tokens "
        f"{s['max_new_tokens']}, length {length}; sampling T={s['temperature']}, JSD beta={s['beta']} at "
        f"T={s['temperature']}, no task loss; {results['torch_threads']} torch threads.",
        "",
        "1. Losses on the same completions (sampled once by the student, seed 0):",
        "",
        "| completions | beta | tokens | hfkd | TRL | float64 definition | hfkd vs TRL (rel.) | student gradients "
        "(rel.) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    agreement = results["loss_agreement"]
    for c in agreement["cases"]:
        lines.append(
            f"| {c['completions']} {c['completion_lengths']} | {c['beta']} | {c['completion_tokens']} | "
            f"{c['hfkd']:.7f} | {c['trl']:.7f} | {c['definition_float64']:.7f} | {c['relative_difference']:.1e} | "
            f"{c['gradient_relative_difference']:.1e} |"
        )
    lines.append(
        f"\nlargest relative loss difference {agreement['max_relative_difference']:.1e}, largest relative gradient "
        f"difference {agreement['max_gradient_relative_difference']:.1e}"
    )
    steps = results["steps"]
    memory = results.get("memory") or {}
    lines += [
        "",
        f"2. Full on-policy step (generation included), {steps['rounds']} timed rounds after a warm-up, taking turns:",
        "",
        "| side | median step | mean completion tokens / step | peak above resident (one step) | first losses |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("hfkd", "hfkd DistillationTrainer"), ("trl", f"TRL {s['trl_trainer']}")):
        x = steps[key]
        peak = f"{memory[key]['step_mib']:.0f} MiB" if key in memory else "-"
        losses = ", ".join(f"{v:.5f}" for v in x["losses"][:3])
        lines.append(f"| {label} | {x['median_s']:.3f} s | {x['mean_generated_tokens']:.1f} | {peak} | {losses} |")
    x = steps["ratio_hfkd_to_trl"]
    lines += [
        "",
        f"hfkd / TRL step time: **{x['median_of_round_ratios']:.3f}** ({FORMS[JUDGED_ON]}; quartiles "
        f"{x['round_ratio_quartiles'][0]:.3f}-{x['round_ratio_quartiles'][1]:.3f}, range "
        f"{x['round_ratio_range'][0]:.3f}-{x['round_ratio_range'][1]:.3f}), {x['ratio_of_medians']:.3f} (ratio of "
        f"medians); target <= {TARGETS['time']:.2f}: {_verdict(x, TARGETS['time'])}",
    ]
    if memory:
        ratio = memory["ratio_hfkd_to_trl"]
        verdict = "met" if ratio <= TARGETS["memory"] else "not met"
        lines.append(
            f"hfkd / TRL peak step memory: **{ratio:.2f}** ({memory['hfkd']['step_mib']:.0f} / "
            f"{memory['trl']['step_mib']:.0f} MiB; resident before the step {memory['hfkd']['resident_mib']:.0f} / "
            f"{memory['trl']['resident_mib']:.0f} MiB); target <= {TARGETS['memory']:.2f}: {verdict}"
        )
    lines.append(f"load during the timed rounds: {_load_text(steps.get('load', {}))}")
    run = results.get("run", {})
    if "wall_s" in run:
        lines.append(
            f"run: {run['started']} to {run['finished']}, {run['wall_s'] / 60:.1f} min; commit {run['git_commit']}"
            f"{' (hfkd/ modified)' if run.get('hfkd_modified') else ''}; 1-minute load average "
            f"{run['loadavg_start'][0]:.2f} at the start, {run['loadavg_end'][0]:.2f} at the end"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama models from configs, random prompts (seconds)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds after a warm-up round")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD beta (hfkd jsd_beta = TRL beta)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per step (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="tokens per prompt (default 32; tiny 12)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default 32; tiny 12)")
    parser.add_argument("--free-length", action="store_true", help="let EOS end completions (no min_new_tokens)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.memory_child:
        print(json.dumps(memory_child(options.memory_child, options)))
        return 0

    import trl

    start = machine()
    results = {**run_header("benchmarks/bench_onpolicy.py", argv, TARGETS, start), "trl": trl.__version__}
    setup = build(options.tiny, options.max_new_tokens, options.prompt_tokens, options.batch)
    fixed = not options.free_length
    results["setup"] = {
        "pair": setup["pair"],
        "trl_trainer": "trl.DistillationTrainer",
        "batch": setup["batch"],
        "prompts": len(setup["prompts"]),
        "prompt_tokens": setup["prompt_tokens"][0] if len(setup["prompt_tokens"]) == 1 else setup["prompt_tokens"],
        "max_new_tokens": setup["max_new_tokens"],
        "fixed_length": fixed,
        "temperature": TEMPERATURE,
        "beta": options.beta,
        "learning_rate": LEARNING_RATE,
        "eos_token_ids": setup["eos_token_ids"],
        "pad_token_id": setup["pad_token_id"],
        "teacher_params": setup["teacher"].num_parameters(),
        "student_params": setup["student"].num_parameters(),
        "vocab_size": setup["teacher"].config.vocab_size,
    }
    with tempfile.TemporaryDirectory() as work:
        results["loss_agreement"] = same_completion_losses(setup, options.beta, fixed, work)
        print("[losses on the same completions done]", file=sys.stderr, flush=True)
        results["steps"] = timed_steps(setup, options.beta, fixed, options.rounds, work)
    del setup
    if not options.no_memory:
        results["memory"] = bench_memory(options)
    finish_run(results, start)
    print(tables(results))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(results, handle, indent=1)
    finite = all(math.isfinite(c["hfkd"]) and math.isfinite(c["trl"]) for c in results["loss_agreement"]["cases"])
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())
