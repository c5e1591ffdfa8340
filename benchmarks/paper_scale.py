"""Memory and speed at scale, on paper: a 70B teacher and an 8B student on 8 and 64 GPUs. Prints a table, writes JSON.

    python benchmarks/paper_scale.py                      # the markdown table and its assumptions
    python benchmarks/paper_scale.py --json record.json   # the same, with every input and every figure, as JSON

Nothing here ran on a GPU. The table is arithmetic on the two models' shapes, on figures this project measured on
its CPU machine (read from the benchmarks' JSON records each time the script runs, so the table follows the
measurements), and on the assumptions listed below. Plain Python: no torch, it runs in well under a second.

**Models** (the public `config.json` of each; the parameter counts are computed from these shapes, embedding +
layers + untied output head + norms, and land on the published counts):

- teacher Llama-3-70B (meta-llama/Meta-Llama-3-70B): hidden 8192, 80 layers, 64 attention heads of 128, 8
  key/value heads, intermediate 28672, vocabulary 128,256, untied head: 70,553,706,496 parameters (published 70.6B);
- student Llama-3.1-8B (meta-llama/Llama-3.1-8B): hidden 4096, 32 layers, 32 heads of 128, 8 key/value heads,
  intermediate 14336, vocabulary 128,256, untied head: 8,030,261,248 parameters (published 8.03B).

**Measured here, read from the JSON records:**

- `benchmarks/results.json` (bench_distill.py), the causal-LM pair with the chunked head (SmolLM2): the online
  distillation step / (student-only step + teacher forward), hfkd's overhead factor; the cached-teacher step /
  student step; the full-logits online step's ratio (quoted, not used: it measures element-wise passes over
  [tokens, 49,152] on a CPU, which on a GPU are a small share of a 70B + 8B step). All as the median of per-round
  ratios (`judged_on`).
- `benchmarks/scaling.json` (bench_scaling.py): bytes per logit element, `[tokens, vocabulary]`, of hfkd's step.
  *Full logits*: the growth of a full-logits step's memory above resident with length, less the chunked step's
  growth over the same lengths, per token and vocabulary entry (each pair's shortest to longest length that both
  variants finished; the larger of the pairs): about 48 bytes in the committed record, twelve float32 copies of
  `[tokens, vocabulary]` (both models' logits, log-probabilities, the divergence's intermediates and gradients). *One chunk*: the chunked
  step's whole memory above resident on the pair with the largest vocabulary (the 256,000-word head, which is
  nearly all of that pair's parameters), at its longest length, divided by chunk x vocabulary: an upper bound, as
  it includes that step's other transients. Both were measured in float32 on CPU with the JSD; they are used as
  they are for bf16 on GPU (the losses compute in float32: `hfkd.losses.fused` promotes to float32), which
  overstates the bf16 logits themselves.
- `benchmarks/cache.json` (bench_cache.py): bytes per token on disk of the default top-k cache (compact, k 48):
  its layout's bytes, k * (id bytes + 1) + 4, plus the measured framing per token (Arrow, JSON). With a vocabulary of
  128,256 the ids take 3 bytes instead of 2 (`hfkd.cache.id_bytes`: 2 up to 65,536 classes, 3 up to 2**24).
- `hfkd/config.py`: the default `logit_chunk_size` (parsed from the source, not imported).

**Assumptions** (not measured anywhere in this project):

- GPUs: H100 SXM 80 GB (compared with 80 GiB), 989 TFLOP/s dense bf16, at 40% model FLOPs utilisation (MFU) for the whole step; the
  micro-batch is 1 row of 4,096 tokens per GPU; no gradient accumulation needed for the figures (each micro-batch
  does its own all-gathers under FSDP2 either way).
- FSDP2 full sharding over all N GPUs (accelerate's plugin, as hfkd's CPU tests run it), layers wrapped per decoder
  layer; the root unit (embedding, final norm, head) is gathered whole. Mixed precision as accelerate sets it for
  `bf16`: parameters gathered in bf16, gradients reduced in bf16, trainable parameters kept as float32 shards.
  Student, bytes per parameter, sharded over N: 4 (float32 parameter, the master weight) + 4 (float32 gradient) + 8
  (AdamW's two float32 moments) = 16. Student, unsharded while in use: the root unit and two decoder layers (the
  one running and the one prefetched) in bf16, 2 bytes per parameter, and their bf16 gradients before the
  reduce-scatter, 2 more. Teacher: bf16 shards, 2 bytes per parameter over N (hfkd shards the teacher with the
  student's plugin; tested on CPU: each of 2 processes held 53% of the teacher's parameters), plus its root unit
  and two layers gathered in bf16.
- Student activations: activation checkpointing per decoder layer. Saved: each layer's input, hidden x 2 bytes per
  token per layer (bf16); plus one layer's full set while it is recomputed in its backward, counted as Korthikanti
  et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", section 4) count a GPT layer's
  34 s b h bytes, adapted to a Llama layer (no dropout, RMSNorm, grouped key/values, SwiGLU, flash attention so no
  s x s scores): per token the elements 6 h (two norm inputs and outputs, the query, the attention output) +
  2 h_kv (keys, values) + 4 i (gate, up, SiLU(gate), their product), 2 bytes each: 41 s b h for the 8B (Korthikanti's
  GPT count is 34). The gradients flowing through the recomputed layer are transient and not counted.
- Teacher forward (no gradients): one layer's working set, counted with the same per-layer formula (an upper
  bound: nothing is kept for a backward), plus its last hidden states kept for the chunked head (hidden x 2 bytes
  per token).
- The chunked head: one chunk of both models' logits and the loss's float32 intermediates and gradient
  (chunk x vocabulary x the measured bytes per element), the float32 accumulator of the student head's weight
  gradient (vocabulary x hidden x 4, `hfkd.losses.chunked`), and the gradient of the student's last hidden states
  (tokens x hidden x 2). Full logits: tokens x vocabulary x the measured bytes per element.
- The total is the sum of the columns: an upper bound, since the teacher's forward transients and the student's
  forward/backward transients are not alive at the same time. The CUDA context, NCCL buffers and allocator
  fragmentation (a few GiB) are not counted.
- Speed: model FLOPs per token, student training 6 N_s + 12 L_s h_s s, teacher forward 2 N_t + 4 L_t h_t s (the
  attention term as in PaLM, Chowdhery et al. 2022, appendix B, without halving for the causal mask); N counts the
  matmul parameters (all but the input embedding); recomputation under checkpointing is not counted (the assumed
  MFU must absorb it). Time per token = FLOPs / (MFU x peak) x hfkd's measured overhead factor.
- Communication, per GPU per micro-batch: the teacher's bf16 all-gather (2 N_t bytes), the student's bf16
  all-gathers in forward and again in backward (2 x 2 N_s) and its bf16 reduce-scatter (2 N_s); time = (N - 1) / N x
  bytes / bus bandwidth, with bus bandwidths of 360 GB/s inside one 8-GPU node (NVLink 4: 450 GB/s per direction,
  80% achieved) and 320 GB/s across 8 such nodes (one 400 Gb/s NIC per GPU, 8 per node: NCCL's rings spread the
  inter-node hops over the 8 NICs, 80% achieved). Assumed overlapped with compute (FSDP2 prefetches the next
  layer) where it takes less time than the compute it can hide behind, checked per phase: the teacher's all-gathers
  against the teacher's forward, the student's collectives against its forward and backward. The table gives the
  times; the notes and the JSON give the smallest micro-batch (tokens) and the lowest bus bandwidth at which it
  still hides.

**What hfkd does under FSDP:** under FSDP2 the logit term runs by chunks (the teacher's head unit is gathered for
the chunks, the student's root and head units stay gathered from its forward to its backward; tested with 2 CPU
processes against one, tests/test_sharding.py). The full-logits figures are what `logit_chunk_size=0`, DeepSpeed
and FSDP1 runs need, and what hfkd needed under FSDP2 before that change.
"""

import argparse
import ast
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 1024**3

# Public configs (config.json on the Hugging Face Hub).
TEACHER = {
    "name": "Llama-3-70B",
    "source": "meta-llama/Meta-Llama-3-70B config.json",
    "hidden": 8192,
    "layers": 80,
    "heads": 64,
    "kv_heads": 8,
    "intermediate": 28672,
    "vocab": 128256,
    "published_params": 70.6e9,
}
STUDENT = {
    "name": "Llama-3.1-8B",
    "source": "meta-llama/Llama-3.1-8B config.json",
    "hidden": 4096,
    "layers": 32,
    "heads": 32,
    "kv_heads": 8,
    "intermediate": 14336,
    "vocab": 128256,
    "published_params": 8.03e9,
}

# Assumptions (the module docstring gives the reasons).
ASSUMED = {
    "gpu": "H100 SXM 80 GB",
    "gpu_memory_gib": 80,
    "peak_flops": 989e12,  # dense bf16, H100 SXM data sheet
    "mfu": 0.40,
    "micro_batch_rows": 1,
    "sequence": 4096,
    "gpu_counts": [8, 64],
    "gpus_per_node": 8,
    "bus_bandwidth_in_node": 360e9,  # NVLink 4, 450 GB/s per direction, 80% achieved
    "bus_bandwidth_across_nodes": 320e9,  # 8 x 400 Gb/s NICs per node, 80% achieved
    "student_sharded_bytes_per_param": {"parameter_fp32": 4, "gradient_fp32": 4, "adamw_moments_fp32": 8},
    "gathered_bytes_per_param": 2,  # bf16 parameters gathered by FSDP2 (and the student's bf16 gradients)
    "teacher_sharded_bytes_per_param": 2,  # bf16
    "activation_bytes": 2,  # bf16
    "gathered_layers": 2,  # the running layer and the prefetched one
    "cache_tokens": 1e9,
}


def parameters(shape: dict) -> dict:
    """Parameter counts of an untied Llama from its shape: embedding, one decoder layer, head, norms, root unit."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    head_dim = h // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h  # q, k and v, o, gate/up/down, two RMSNorms
    embedding = head = v * h
    root = embedding + head + h  # what FSDP's root unit holds: embedding, head, final norm
    total = shape["layers"] * layer + root
    return {
        "layer": layer,
        "embedding": embedding,
        "head": head,
        "root": root,
        "total": total,
        "matmul": total - embedding,  # the embedding is a lookup, no FLOPs
        "kv_width": kv,
    }


def layer_activation_elements(shape: dict) -> int:
    """Elements per token that one Llama decoder layer keeps for its backward (module docstring): 6 h + 2 h_kv + 4 i."""
    kv = shape["kv_heads"] * (shape["hidden"] // shape["heads"])
    return 6 * shape["hidden"] + 2 * kv + 4 * shape["intermediate"]


def default_chunk_size(config_path: str) -> int:
    """`logit_chunk_size`'s default, read from hfkd/config.py's source (importing hfkd would import torch)."""
    with open(config_path) as handle:
        tree = ast.parse(handle.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "logit_chunk_size":
            for keyword in node.value.keywords:
                if keyword.arg == "default":
                    return ast.literal_eval(keyword.value)
    raise ValueError(f"no default for logit_chunk_size in {config_path}")


def cache_id_bytes(num_classes: int) -> int:
    """Bytes per stored id of the compact top-k cache (as `hfkd.cache.id_bytes`)."""
    return 2 if num_classes <= 1 << 16 else 3 if num_classes <= 1 << 24 else 4


def measured(results_path: str, scaling_path: str, cache_path: str, config_path: str) -> dict:
    """The measured inputs, each with where it was read."""
    with open(results_path) as handle:
        results = json.load(handle)
    with open(scaling_path) as handle:
        scaling = json.load(handle)
    with open(cache_path) as handle:
        cache = json.load(handle)
    judged = results["judged_on"]
    pair = next(p for p in results["pairs"] if p.get("online_chunked"))  # the causal LM, chunked head
    out = {
        "overhead_online": {
            "value": pair["ratios"]["online"][judged],
            "source": f"{os.path.basename(results_path)}: pairs[{pair['pair']}].ratios.online.{judged}",
        },
        "overhead_cached": {
            "value": pair["ratios"]["cached"][judged],
            "source": f"{os.path.basename(results_path)}: pairs[{pair['pair']}].ratios.cached.{judged}",
        },
        "overhead_full_logits_cpu": {
            "value": pair["ratios"]["online_full_logits"][judged],
            "source": f"{os.path.basename(results_path)}: pairs[{pair['pair']}].ratios.online_full_logits.{judged}",
        },
    }

    chunk = default_chunk_size(config_path)
    out["chunk_size"] = {"value": chunk, "source": "hfkd/config.py: logit_chunk_size default"}

    # Bytes per [tokens, vocabulary] element, from the scaling cells (memory above resident during the steps).
    vocab, batch = scaling["settings"]["vocab"], scaling["settings"]["batch"]
    cells = {
        (c["pair"], c["variant"], c["length"]): c["step_above_resident_mib"] * 2**20
        for c in scaling["cells"]
        if c.get("status") == "ok" and c.get("step_above_resident_mib") is not None
    }
    full = []
    for name in scaling["settings"]["pairs"]:
        lengths = sorted(n for (p, v, n) in cells if p == name and v == "full-logits" and (p, "hfkd", n) in cells)
        if len(lengths) < 2:
            continue
        short, long = lengths[0], lengths[-1]
        grown = (cells[name, "full-logits", long] - cells[name, "full-logits", short]) - (
            cells[name, "hfkd", long] - cells[name, "hfkd", short]
        )
        full.append((grown / ((long - short) * batch * vocab[name]), name, short, long))
    per_element, name, short, long = max(full)
    out["full_logits_bytes_per_element"] = {
        "value": per_element,
        "per_pair": {p: v for v, p, _, _ in full},
        "source": f"{os.path.basename(scaling_path)}: cells[{name}], (full-logits - hfkd) growth of "
        f"step_above_resident_mib from {short} to {long} tokens / (tokens x {vocab[name]:,})",
    }
    widest = max(scaling["settings"]["pairs"], key=lambda p: vocab[p])
    lengths = [n for (p, v, n) in cells if p == widest and v == "hfkd"]
    above = max(cells[widest, "hfkd", n] for n in lengths)
    out["chunk_bytes_per_element"] = {
        "value": above / (chunk * vocab[widest]),
        "source": f"{os.path.basename(scaling_path)}: cells[{widest}, hfkd], largest step_above_resident_mib over "
        f"lengths {sorted(lengths)} / ({chunk} x {vocab[widest]:,}); an upper bound",
    }

    default = cache["verdict"]["format"]
    size = cache["sizes"][default]
    out["cache"] = {
        "format": default,
        "top_k": size["top_k"],
        "measured_bytes_per_token": size["bytes_per_token"],
        "measured_layout_bytes_per_token": size["layout_bytes_per_token"],
        "measured_vocab": cache["setup"]["vocab"],
        "framing_bytes_per_token": size["bytes_per_token"] - size["layout_bytes_per_token"],
        "source": f"{os.path.basename(cache_path)}: sizes[{default}] (verdict.format)",
    }
    return out


def memory_row(gpus: int, m: dict, a: dict, teacher: dict, student: dict) -> dict:
    """Bytes per GPU at `gpus` GPUs, by column (module docstring)."""
    ps, pt = parameters(student), parameters(teacher)
    tokens = a["micro_batch_rows"] * a["sequence"]
    gathered_s = ps["root"] + a["gathered_layers"] * ps["layer"]
    gathered_t = pt["root"] + a["gathered_layers"] * pt["layer"]
    g = a["gathered_bytes_per_param"]
    sharded = a["student_sharded_bytes_per_param"]
    act = a["activation_bytes"]
    vocab = student["vocab"]
    chunk = m["chunk_size"]["value"]
    row = {
        "gpus": gpus,
        "student_parameters": {
            "shard": sharded["parameter_fp32"] * ps["total"] / gpus,
            "gathered": g * gathered_s,
        },
        "student_gradients_adamw": {
            "shard": (sharded["gradient_fp32"] + sharded["adamw_moments_fp32"]) * ps["total"] / gpus,
            "gathered": g * gathered_s,
        },
        "student_activations": tokens
        * act
        * (student["layers"] * student["hidden"] + layer_activation_elements(student)),
        "teacher_parameters": {
            "shard": a["teacher_sharded_bytes_per_param"] * pt["total"] / gpus,
            "gathered": g * gathered_t,
        },
        "teacher_activations": tokens * act * (layer_activation_elements(teacher) + teacher["hidden"]),
        "head_chunked": chunk * vocab * m["chunk_bytes_per_element"]["value"]
        + 4 * ps["head"]  # float32 accumulator of the student head's weight gradient
        + tokens * act * student["hidden"],  # gradient of the student's last hidden states
        "head_full_logits": tokens * vocab * m["full_logits_bytes_per_element"]["value"],
    }
    fixed = sum(
        row[k]["shard"] + row[k]["gathered"]
        for k in ("student_parameters", "student_gradients_adamw", "teacher_parameters")
    )
    fixed += row["student_activations"] + row["teacher_activations"]
    row["total_chunked"] = fixed + row["head_chunked"]
    row["total_full_logits"] = fixed + row["head_full_logits"]
    return row


def flops_per_token(a: dict) -> dict:
    """Model FLOPs per token: student training and teacher forward, with the attention terms (module docstring)."""
    ps, pt, s = parameters(STUDENT), parameters(TEACHER), a["sequence"]
    student = 6 * ps["matmul"] + 12 * STUDENT["layers"] * STUDENT["hidden"] * s
    teacher = 2 * pt["matmul"] + 4 * TEACHER["layers"] * TEACHER["hidden"] * s
    return {"student_training": student, "teacher_forward": teacher, "total": student + teacher}


def speed_row(gpus: int, m: dict, a: dict) -> dict:
    """Tokens per second, and the FSDP traffic of one micro-batch against its compute at `gpus` GPUs: the teacher's
    all-gathers can only hide behind the teacher's forward and the student's collectives behind the student's
    forward and backward, so each phase is checked on its own."""
    flops = flops_per_token(a)
    overhead = m["overhead_online"]["value"]
    rate = a["mfu"] * a["peak_flops"] / overhead  # FLOP/s spent on model FLOPs, hfkd's overhead included
    per_gpu = rate / flops["total"]
    tokens = a["micro_batch_rows"] * a["sequence"]
    ps, pt = parameters(STUDENT), parameters(TEACHER)
    traffic = {
        "teacher_all_gather": 2 * pt["total"],
        "student_all_gather_forward_and_backward": 2 * 2 * ps["total"],
        "student_reduce_scatter": 2 * ps["total"],
    }
    across = gpus > a["gpus_per_node"]
    bandwidth = a["bus_bandwidth_across_nodes"] if across else a["bus_bandwidth_in_node"]
    share = (gpus - 1) / gpus
    phases = {
        "teacher_forward": (share * traffic["teacher_all_gather"], flops["teacher_forward"]),
        "student_training": (
            share * (traffic["student_all_gather_forward_and_backward"] + traffic["student_reduce_scatter"]),
            flops["student_training"],
        ),
    }
    checks = {}
    for name, (moved, phase_flops) in phases.items():
        comm_s, compute_s = moved / bandwidth, tokens * phase_flops / rate
        checks[name] = {
            "bytes_moved": moved,
            "communication_s": comm_s,
            "compute_s": compute_s,
            "hidden": comm_s <= compute_s,
            "smallest_micro_batch_tokens_hidden": math.ceil(comm_s * rate / phase_flops),
            "lowest_bus_bandwidth_hidden": moved / compute_s,
        }
    return {
        "gpus": gpus,
        "tokens_per_s_per_gpu": per_gpu,
        "tokens_per_s_job": per_gpu * gpus,
        "tokens_per_step_job": tokens * gpus,
        "traffic_bytes_per_micro_batch": traffic,
        "bus_bandwidth": bandwidth,
        "across_nodes": across,
        "phases": checks,
        "communication_s_per_micro_batch": sum(c["communication_s"] for c in checks.values()),
        "compute_s_per_micro_batch": tokens / per_gpu,
        "hidden_behind_compute": all(c["hidden"] for c in checks.values()),
        "smallest_micro_batch_tokens_hidden": max(c["smallest_micro_batch_tokens_hidden"] for c in checks.values()),
        "lowest_bus_bandwidth_hidden": max(c["lowest_bus_bandwidth_hidden"] for c in checks.values()),
    }


def cached_note(m: dict, a: dict) -> dict:
    """The teacher cache instead of the online teacher: bytes per token at this vocabulary, storage for
    `cache_tokens`, and the student's tokens per second (no teacher on the GPUs)."""
    c = m["cache"]
    ids = cache_id_bytes(STUDENT["vocab"])
    layout = c["top_k"] * (ids + 1) + 4
    per_token = layout + c["framing_bytes_per_token"]
    student = flops_per_token(a)["student_training"]
    return {
        "top_k": c["top_k"],
        "id_bytes": ids,
        "bytes_per_token": per_token,
        "storage_bytes": per_token * a["cache_tokens"],
        "tokens": a["cache_tokens"],
        "tokens_per_s_per_gpu": a["mfu"] * a["peak_flops"] / (student * m["overhead_cached"]["value"]),
    }


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def _split(v: dict) -> str:
    return f"{_gib(v['shard'])} + {_gib(v['gathered'])}"


def table(rows: list[dict], speeds: list[dict], a: dict) -> str:
    cap = a["gpu_memory_gib"]
    lines = [
        "| GPUs (GiB per GPU) | student parameters (shard + gathered) | student gradients + AdamW (shard + gathered) "
        "| student activations | teacher parameters (shard + gathered) | teacher activations "
        "| logit head: chunked (full logits) | total: chunked (full logits) | tokens/s per GPU | tokens/s, all GPUs "
        "| FSDP traffic per micro-batch: time (compute time) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, s in zip(rows, speeds):
        lines.append(
            f"| {r['gpus']} | {_split(r['student_parameters'])} | {_split(r['student_gradients_adamw'])} "
            f"| {_gib(r['student_activations'])} | {_split(r['teacher_parameters'])} "
            f"| {_gib(r['teacher_activations'])} | {_gib(r['head_chunked'])} ({_gib(r['head_full_logits'])}) "
            f"| **{_gib(r['total_chunked'])}** ({_gib(r['total_full_logits'])}) of {cap} "
            f"| {s['tokens_per_s_per_gpu']:,.0f} | {s['tokens_per_s_job']:,.0f} "
            f"| {s['communication_s_per_micro_batch']:.2f} s ({s['compute_s_per_micro_batch']:.2f} s): "
            f"{'hidden' if s['hidden_behind_compute'] else 'not hidden'} |"
        )
    return "\n".join(lines)


def assumptions_text(m: dict, a: dict, speeds: list[dict], note: dict) -> list[str]:
    ps, pt = parameters(STUDENT), parameters(TEACHER)
    flops = flops_per_token(a)
    hide = []
    tokens = a["micro_batch_rows"] * a["sequence"]
    for s in speeds:
        hide.append(
            f"at {s['gpus']} GPUs it {'hides' if s['hidden_behind_compute'] else 'does not hide'} at {tokens:,} "
            f"tokens per micro-batch (hidden from {s['smallest_micro_batch_tokens_hidden']:,} tokens up, or at "
            f"{tokens:,} from {s['lowest_bus_bandwidth_hidden'] / 1e9:.0f} GB/s of bus bandwidth up)"
        )
    hide = "; ".join(hide)
    return [
        f"Models: {TEACHER['name']} teacher ({pt['total'] / 1e9:.2f}B parameters from its shapes) and "
        f"{STUDENT['name']} student ({ps['total'] / 1e9:.2f}B), vocabulary {STUDENT['vocab']:,}; micro-batch "
        f"{a['micro_batch_rows']} x {a['sequence']:,} tokens per GPU; GiB per GPU on {a['gpu']}.",
        "FSDP2 full sharding over all GPUs, bf16 mixed precision: student 16 bytes per parameter sharded (float32 "
        "parameter, gradient, two AdamW moments), teacher 2 (bf16); gathered: each model's root unit (embedding, "
        "head) and 2 decoder layers in bf16, and the student's bf16 gradients of the same.",
        "Activations: checkpointing per student layer (each layer's bf16 input kept, one layer recomputed: "
        "6 h + 2 h_kv + 4 i elements per token, Korthikanti et al. 2022's count for a Llama layer); teacher: one "
        "layer's working set by the same count, and its last hidden states.",
        f"Logit head: one chunk of {m['chunk_size']['value']} positions at "
        f"{m['chunk_bytes_per_element']['value']:.1f} bytes per logit element (measured, an upper bound) plus the "
        f"float32 head-gradient accumulator; full logits at {m['full_logits_bytes_per_element']['value']:.1f} bytes "
        "per logit element (measured); both in float32 on CPU (benchmarks/scaling.json). Under FSDP2 hfkd uses the "
        "chunked head (its heads gathered for the chunks); full logits are what DeepSpeed, FSDP1 and "
        "logit_chunk_size=0 need.",
        "Total: the sum of the columns, an upper bound (the teacher's transients and the student's do not coexist); "
        "CUDA context, NCCL buffers and fragmentation not counted.",
        f"Speed: {flops['total'] / 1e9:.0f} GFLOP per token (student 6 N + 12 L h s = "
        f"{flops['student_training'] / 1e9:.0f}, teacher forward 2 N + 4 L h s = "
        f"{flops['teacher_forward'] / 1e9:.0f}) at {a['mfu']:.0%} MFU of {a['peak_flops'] / 1e12:.0f} TFLOP/s, "
        f"times hfkd's measured overhead {m['overhead_online']['value']:.3f} (online step / (student step + teacher "
        "forward), SmolLM2 on CPU, benchmarks/results.json). Full logits measured "
        f"{m['overhead_full_logits_cpu']['value']:.2f} there, where the passes over [tokens, 49,152] weigh far more "
        "than beside a 70B forward: not carried over.",
        "FSDP traffic per micro-batch and GPU: teacher bf16 all-gather, student bf16 all-gathers (forward, backward) "
        f"and reduce-scatter, {sum(speeds[0]['traffic_bytes_per_micro_batch'].values()) / 1e9:.0f} GB x (N-1)/N, at "
        f"{a['bus_bandwidth_in_node'] / 1e9:.0f} GB/s bus bandwidth in one node and "
        f"{a['bus_bandwidth_across_nodes'] / 1e9:.0f} GB/s across 8 nodes (8 x 400 Gb/s NICs each), assumed "
        "overlapped with compute, checked per phase (teacher forward, student step): "
        f"{hide}.",
        f"Teacher cache instead (hfkd cache, top-k {note['top_k']}, {note['id_bytes']}-byte ids at this vocabulary): "
        f"{note['bytes_per_token']:.0f} bytes per token (benchmarks/cache.json's measured layout and framing), "
        f"{note['storage_bytes'] / 1e9:,.0f} GB for {note['tokens'] / 1e9:.0f}B tokens; no teacher on the GPUs, "
        f"{note['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU at the same MFU (measured cached-step overhead "
        f"{m['overhead_cached']['value']:.3f}).",
    ]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write every input and figure here")
    parser.add_argument("--results", default=os.path.join(HERE, "results.json"))
    parser.add_argument("--scaling", default=os.path.join(HERE, "scaling.json"))
    parser.add_argument("--cache", default=os.path.join(HERE, "cache.json"))
    parser.add_argument("--config", default=os.path.join(ROOT, "hfkd", "config.py"))
    options = parser.parse_args(argv)

    a = ASSUMED
    m = measured(options.results, options.scaling, options.cache, options.config)
    rows = [memory_row(n, m, a, TEACHER, STUDENT) for n in a["gpu_counts"]]
    speeds = [speed_row(n, m, a) for n in a["gpu_counts"]]
    note = cached_note(m, a)
    text = table(rows, speeds, a)
    notes = assumptions_text(m, a, speeds, note)
    print(text)
    print()
    for line in notes:
        print(f"- {line}")

    record = {
        "command": "python benchmarks/paper_scale.py",
        "derived_not_measured_on_gpus": True,
        "models": {
            "teacher": {**TEACHER, "computed": parameters(TEACHER)},
            "student": {**STUDENT, "computed": parameters(STUDENT)},
        },
        "measured": m,
        "assumed": a,
        "flops_per_token": flops_per_token(a),
        "memory_bytes_per_gpu": rows,
        "speed": speeds,
        "teacher_cache": note,
        "table": text,
        "notes": notes,
    }
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(record, handle, indent=1)
    return record


if __name__ == "__main__":
    main()
