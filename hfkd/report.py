"""What a recipe run leaves beside the student: metrics.json, report.png, the model card and the summary."""

import json
import os

from huggingface_hub import ModelCard, ModelCardData

_PIPELINE_TAGS = {
    "text-classification": "text-classification",
    "image-classification": "image-classification",
    "causal-lm": "text-generation",
}

_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

{{ intro }}

```python
from transformers import {{ auto_class }}
model = {{ auto_class }}.from_pretrained("{{ repo_id }}")
```

## Lineage
{{ lineage_rows }}

## Training
{{ training_note }}

## Results (same held-out split, measured by this run)
{{ results_rows }}

{{ retained_line }}
{{ comparison_line }}
{{ generations_line }}{{ peers_line }}

## Distillation
| term | weight | loss |
|---|---|---|
{{ terms_rows }}
{{ early_exit_section }}
Temperature {{ temperature }}. Layer maps (student index -> teacher index): {{ layer_maps }}.
{{ search_line }}

Wall time on this machine: {{ wall_time }}. The exact configuration is in `hfkd_config.yaml`; all figures are in
`metrics.json` and `report.png`.
"""


def write_metrics(path: str, metrics: dict) -> None:
    with open(path, "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=False)
        handle.write("\n")


# Metrics where lower is better (language models): perplexity per token, and bits per byte across tokenizers.
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


def _readable(metric: str) -> str:
    return metric.replace("_", " ")


def _text_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """Causal LMs: the held-out text evaluation beside the headline metric, as (row name, teacher, student)."""
    teacher, student = metrics["teacher"], metrics["student"]
    if "bits_per_byte" not in teacher or "bits_per_byte" not in student:
        return []
    plain = metrics.get("labels_only") or {}

    def name(text: str, key: str) -> str:
        return f"{text} (same student on the labels alone: {_fmt(plain[key])})" if key in plain else text

    if metrics["metric"] == "bits_per_byte":  # across tokenizers: perplexity is per each model's own tokens
        key, text = "own_token_perplexity", "perplexity per own token (not comparable across tokenizers)"
    else:
        key, text = "bits_per_byte", "bits per byte (held-out text)"
    return [(name(text, key), _fmt(teacher[key]), _fmt(student[key]))]


def _fmt(value, digits=4):
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def model_card(metrics: dict, repo_id: str, auto_class: str) -> ModelCard:
    """The Hub model card: metadata for the Hub's lineage view, then what was distilled and what it kept."""
    teacher, student, task = metrics["teacher"], metrics["student"], metrics["task"]
    peers = metrics.get("peers") or {}
    data = _card_data(metrics, repo_id, teacher, student, task, peers)
    results_rows = _results_rows(metrics, teacher, student, peers)
    distill = metrics["distillation"]
    terms = [(name, _fmt(term["weight"]), term.get("loss", "-")) for name, term in distill["terms"].items()]
    retained_line = _retained_line(metrics, teacher, student)
    intro = _intro(teacher, peers)
    lineage = _lineage(metrics, teacher, student, peers)
    return ModelCard.from_template(
        data,
        template_str=_CARD_TEMPLATE,
        model_name=os.path.basename(repo_id),
        repo_id=repo_id,
        auto_class=auto_class,
        intro=intro,
        lineage_rows="\n".join(lineage),
        training_note=training_note(metrics),
        results_rows="\n".join(results_rows),
        retained_line=retained_line,
        comparison_line=" ".join(comparison_lines(metrics)),
        generations_line=generations_line(metrics),
        search_line=search_line(metrics),
        peers_line=peers_line(metrics),
        early_exit_section=early_exit_section(metrics, repo_id),
        terms_rows="\n".join(f"| {a} | {b} | {c} |" for a, b, c in terms),
        temperature=distill["temperature"],
        layer_maps=json.dumps(distill["layer_maps"]) if distill["layer_maps"] else "none (no feature terms)",
        wall_time=", ".join(f"{k} {v:.0f} s" for k, v in metrics["wall_time_s"].items()),
    )


def _card_data(metrics: dict, repo_id: str, teacher: dict, student: dict, task: str, peers: dict) -> ModelCardData:
    """The card's YAML metadata: base model, data set, tags and the headline metric."""
    metric_name = metrics["metric"]
    dataset_id = metrics["data"].get("hub_id")
    # With peers the teacher did not teach: it is the student's base model only when the student is made from it.
    base_model = teacher.get("hub_id") if not peers or student.get("built_from_teacher", True) else None
    # A student of another modality than its teacher (hfkd.cross_modal) does the task on its own input.
    modality = student.get("modality")
    pipeline_tag = f"{modality}-classification" if modality else _PIPELINE_TAGS.get(task)
    extra = [*(["deep-mutual-learning"] if peers else []), *(["cross-modal-distillation"] if modality else [])]
    return ModelCardData(
        base_model=base_model or None,
        datasets=[dataset_id] if dataset_id else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["knowledge-distillation", "hfkd", "distillation", *extra, pipeline_tag if modality else task],
        metrics=[metric_name],
        model_name=os.path.basename(repo_id),
    )


def _results_rows(metrics: dict, teacher: dict, student: dict, peers: dict) -> list[str]:
    """The results table (teacher, student, each peer): metric, text evaluation, parameters, latency."""
    metric_name = metrics["metric"]
    results = [
        (
            _readable(metric_name),
            _fmt(teacher["metric"]),
            _fmt(student["metric"]),
            *(_fmt(p["metric"]) for p in peers.values()),
        ),
        (
            "parameters",
            f"{teacher['params']:,}",
            f"{student['params']:,}",
            *(f"{p['params']:,}" for p in peers.values()),
        ),
        (
            "forward latency (ms/batch)",
            _fmt(teacher["latency_ms"]),
            _fmt(student["latency_ms"]),
            *("-" for _ in peers),
        ),
    ]
    if "labels_only" in metrics:
        results[0] = (
            f"{_readable(metric_name)} (same student on the labels alone: {_fmt(metrics['labels_only']['metric'])})",
        ) + (results[0][1:])
    for row in _text_rows(metrics):
        results.insert(1, (*row, *("-" for _ in peers)))
    header = ["", "teacher", "student", *(f"peer `{name}`" for name in peers)]
    results_rows = [f"| {' | '.join(header)} |".replace("|  |", "| |", 1), "|" + "---|" * len(header)]
    results_rows += [f"| {' | '.join(row)} |" for row in results]
    return results_rows


def _retained_line(metrics: dict, teacher: dict, student: dict) -> str:
    """What the student kept of the teacher's metric, at what share of its size and what speed-up."""
    metric_name = metrics["metric"]
    retained = metrics["retained"]
    kept = (
        f"has **{student['metric'] / teacher['metric']:.2f}x** the teacher's {_readable(metric_name)} "
        f"(teacher/student {retained:.1%})"
        if metric_name in LOWER_IS_BETTER
        else f"keeps **{retained:.1%}** of the teacher's {metric_name}"
    )
    return (
        f"The student {kept} "
        f"with {metrics['size_ratio']:.1%} of its parameters, and runs **{metrics['speedup']:.2f}x** faster "
        f"(median forward latency on a batch of {metrics['latency_batch_size']}, {metrics['device']})."
    )


def _intro(teacher: dict, peers: dict) -> str:
    """The card's opening sentence: distilled from the teacher, or trained by mutual learning with peers."""
    teacher_hub = teacher.get("hub_id")
    teacher_url = f"https://huggingface.co/{teacher_hub}" if teacher_hub else "#lineage"
    teacher_link = f"[{teacher_hub or teacher['name']}]({teacher_url})"
    hfkd_link = "[hfkd](https://pypi.org/project/hfkd/)"
    if teacher.get("taught") is False and not peers:
        return (
            f"A student trained by self-distillation through its own exit heads (Be Your Own Teacher, Zhang et al. "
            f"2019) with {hfkd_link} (knowledge distillation for the Hugging Face stack): no teacher taught it; it is "
            f"compared below with {teacher_link}. It loads with plain transformers:"
        )
    if peers:
        return (
            f"A student trained by deep mutual learning (Zhang et al. 2018) together with {len(peers)} peer "
            f"model{'s' if len(peers) > 1 else ''}, with {hfkd_link} (knowledge distillation for the Hugging Face "
            f"stack): no teacher taught it; it is compared below with {teacher_link}. It loads with plain transformers:"
        )
    return (
        f"A student distilled from {teacher_link} with {hfkd_link}\n(knowledge distillation for the Hugging Face "
        "stack). It loads with plain transformers:"
    )


def _lineage(metrics: dict, teacher: dict, student: dict, peers: dict) -> list[str]:
    """Where each model and the data came from, one bullet each."""
    return [
        (f"- Teacher (did not teach: the reference the results compare with): {teacher_line(teacher)}")
        if peers or teacher.get("taught") is False
        else f"- Teacher: {teacher_line(teacher)}",
        f"- Student: {student['note']}",
        *(
            f"- Peer `{name}`: `{peer['source']}`, trained here with the student, saved in `{peer['folder']}/`"
            for name, peer in peers.items()
        ),
        f"- Data: {metrics['data']['note']}",
    ]


def _finetune_text(finetune: dict) -> str:
    text = (
        f"{finetune['steps']} steps ({finetune['epochs']:g} epochs) at learning rate {finetune['learning_rate']:g}, "
        f"batch size {finetune['batch_size']}, on {finetune['train_examples']} "
        # With transfer rows the teacher learnt from the labelled rows alone, fewer than distillation reads.
        + ("labelled examples" if finetune.get("transfer_rows") else "examples")
    )
    return text + (f", with LoRA r={finetune['lora_r']}, merged" if finetune.get("lora_r") else "")


def teacher_line(teacher: dict) -> str:
    """Where the teacher came from, as far back as hfkd knows: a Hub id, a folder an earlier run fine-tuned, a cache."""
    name, hub_id = teacher["name"], teacher.get("hub_id")
    origin = teacher.get("origin")
    if teacher.get("finetuned_here"):
        line = f"`{hub_id or name}`, fine-tuned on the task here first: {_finetune_text(teacher['finetune'])}"
    elif origin is not None:
        line = (
            f"`{name}`, which an earlier hfkd run fine-tuned from `{origin.get('hub_id') or origin.get('name')}`"
            + (f" ({_finetune_text(teacher['finetune'])}" if teacher.get("finetune") else " (")
            + (f"; data: {teacher['data']})" if teacher.get("data") else ")")
        )
    else:
        line = f"`{name}`" + (f" (Hub: `{hub_id}`)" if hub_id and hub_id != name else "")
    cache = teacher.get("cache")
    if cache:
        logits = cache.get("logits") or {}
        stored = []
        if logits:
            stored.append(
                f"top-{logits['top_k']} of {logits['num_classes']} logits at T={logits['temperature']:g} plus the rest "
                "of the mass"
                if logits.get("mode") == "topk"
                else f"all {logits.get('num_classes')} logits"
            )
        if cache.get("hidden_layers"):
            stored.append(f"hidden states of layers {cache['hidden_layers']}")
        line += (
            f". Its outputs were read from the teacher cache `{cache['path']}` ({cache['rows']} rows; "
            f"{' and '.join(stored) or 'no logits'}), built by `hfkd cache`: no teacher forward ran in training"
        )
    return line


def training_note(metrics: dict) -> str:
    t = metrics.get("training")
    if not t:
        return "Not recorded."
    lines = [
        f"- {'Deep mutual learning (student and peers)' if metrics.get('peers') else 'Distillation'}: "
        f"{t['steps']} steps ({t['epochs']:g} epochs), learning rate {t['learning_rate']:g} "
        f"({t['lr_scheduler']}), batch size {t['batch_size']} ({t['per_device_batch_size']} per device x "
        f"{t['gradient_accumulation_steps']} accumulation x {t['processes']} process(es)), seed {t['seed']}, "
        f"{t['precision']}" + ("; resumed from a checkpoint" if t.get("resumed") else "") + ".",
        f"- Evaluated on {metrics['data']['eval_examples']} held-out examples"
        + (f", {t['evaluations']} times during training" if t.get("evaluations") else "")
        + (
            f"; the student is the best checkpoint by eval {t.get('best_by')} = {t['best_metric']:.4g} "
            f"({t['best_checkpoint']})"
            if t.get("best_checkpoint") and t.get("best_metric") is not None
            else ""
        )
        + ".",
    ]
    return "\n".join(lines)


def generations_line(metrics: dict) -> str:
    """Born-again generations (recipe `generations`): each one's metric, in a sentence ("" without them)."""
    generations = metrics.get("generations")
    if not generations:
        return ""
    parts = [f"generation {g['generation']} (taught by {g['teacher']}) {_fmt(g['metric'])}" for g in generations]
    return (
        f"Born-again generations (Furlanello et al. 2018; the same student from the same initial weights, each taught "
        f"by the one before, same budget), {metrics['metric']}: {'; '.join(parts)}. The saved student is generation "
        f"{generations[-1]['generation']}."
    )


def _values_text(values: dict) -> str:
    """A trial's values in a line: fields as name=value, each `terms` entry as <name>_weight."""
    parts = [f"{name}={_fmt(value)}" for name, value in values.items() if name != "terms"]
    parts += [f"{entry['name']}_weight={_fmt(entry['weight'])}" for entry in values.get("terms") or []]
    return ", ".join(parts)


def search_line(metrics: dict) -> str:
    """The search (recipe `search_trials`): what it scored on, the chosen values and each trial ("" without one)."""
    search = metrics.get("search")
    if not search:
        return ""
    trials = "; ".join(f"#{t['trial']} {_fmt(t['objective'])} ({_values_text(t['values'])})" for t in search["trials"])
    return (
        f"\nThese values were chosen by a search (hfkd.search.kd_space, Optuna): {len(search['trials'])} trials of "
        f"{search['steps_per_trial']} steps, each distilling a new student on {search['train_rows']} training rows "
        f"and scored by {search['objective']} on {search['validation_rows']} validation rows carved from the "
        f"training data (seed {search['seed']}), never on the held-out split of the results above; the distillation "
        f"then ran on all training rows. Best trial #{search['best_trial']}: {_values_text(search['chosen'])}. "
        f"Trials: {trials}.\n"
    )


def early_exit_section(metrics: dict, repo_id: str) -> str:
    """A student with exit heads (the byot term): each exit's accuracy and latency, and how to exit early ("" without
    heads)."""
    exits = metrics.get("early_exit")
    if not exits:
        return ""
    deepest = exits[-1]["layer"]
    rows = "\n".join(
        f"| {e['layer']}{' (its own classifier)' if e['layer'] == deepest else ''} | {_fmt(e['accuracy'])} | "
        f"{_fmt(e['latency_ms'])} |"
        for e in exits
    )
    return (
        f"\n### Early exit\nThe student carries exit heads after some of its {deepest} layers (self-distillation "
        "through auxiliary heads, Zhang et al. 2019), saved beside it in `early_exit_heads.safetensors` and "
        "`early_exit.json`, never in its weights. An exit at layer k runs the layers up to k only. Measured by this "
        f"run on the {metrics['data']['eval_examples']} held-out examples ({_readable(metrics['metric'])}) and on a "
        f"batch of {metrics['latency_batch_size']} ({metrics['device']}):\n\n"
        f"| exit (layer) | {_readable(metrics['metric'])} | forward latency (ms/batch) |\n|---|---|---|\n{rows}\n\n"
        "```python\nfrom hfkd.early_exit import EarlyExitModel\n"
        f'model = EarlyExitModel.from_pretrained("{repo_id}")  # the student and its exit heads\n'
        f"logits = model(**inputs, exit_layer={exits[0]['layer']})  # exits: {[e['layer'] for e in exits]}\n```\n"
    )


def peers_line(metrics: dict) -> str:
    """Deep mutual learning (peer_model_name_or_path): the method, each peer's metric and folder ("" without peers)."""
    peers = metrics.get("peers")
    if not peers:
        return ""
    parts = [
        f"`{name}` (from `{p['source']}`) {_fmt(p['metric'])}, saved in `{p['folder']}/`" for name, p in peers.items()
    ]
    return (
        f"Deep Mutual Learning (Zhang et al. 2018): the student trained together with {len(peers)} peer"
        f"{'s' if len(peers) > 1 else ''}, each model learning from the labels and from the others' predictions, "
        f"with no teacher (the teacher above is only compared with). The peers' {metrics['metric']}: "
        f"{'; '.join(parts)}."
    )


def _paired_text(metrics: dict, scale: float, digits: int, unit: str) -> str:
    """The paired comparison's interval, counts and p-value (hfkd.compare), as one parenthesis."""
    paired = metrics["paired"]
    low, high = paired["interval"]
    peers = bool(metrics.get("peers"))
    ours = "the student trained with its peers" if peers else "the distilled student"
    if "rows" in paired:
        where = f"the {paired['rows']} held-out rows"
        counts = (
            f"{paired['only_ours']} rows only {ours} got right, {paired['only_theirs']} only the labels-only one, "
            f"{paired['both']} both, {paired['neither']} neither; McNemar's exact p = {paired['p_value']:.3g}"
        )
    else:
        where = f"the {paired['blocks']} held-out blocks"
        counts = (
            f"{paired['only_ours']} blocks lower for {ours}, {paired['only_theirs']} for the labels-only one; "
            f"sign test p = {paired['p_value']:.3g}"
        )
    return (
        f"{paired['confidence']:.0%} interval of the gain {low * scale:+.{digits}f} to "
        f"{high * scale:+.{digits}f}{unit} "
        f"(paired bootstrap over {where}, both students scored on the same ones: {counts}; it covers the held-out "
        "sample, not the spread between training seeds)"
    )


def comparison_lines(metrics: dict) -> list[str]:
    """Did distillation (or mutual learning, with peers) help? Plain sentences from the labels-only comparison (empty
    without one). The verdict follows the paired interval of the gain in `metrics["paired"]` (hfkd.compare)."""
    if "labels_only" not in metrics:
        return []
    lm = metrics["metric"] in LOWER_IS_BETTER
    teacher, student = metrics["teacher"]["metric"], metrics["student"]["metric"]
    plain, gain = metrics["labels_only"]["metric"], metrics["gain"]
    bpb = metrics["metric"] == "bits_per_byte"
    unit = " bits per byte" if bpb else "" if lm else " points"
    scale = 1.0 if lm else 100.0
    digits = 3 if bpb else 2
    peers = bool(metrics.get("peers"))
    method = "Mutual learning" if peers else "Distillation"
    ours = "the student trained with its peers" if peers else "the distilled student"
    name = _readable(metrics["metric"])
    ours_metric = f"the {name} of {ours}" if peers else f"{ours}'s {name}"
    how = "with its peers" if peers else "distilled"
    gap = f"{abs(gain) * scale:.{digits}f}{unit}"
    if "paired" not in metrics:  # a metrics.json from before per-row scores were kept: no test to judge the gap by
        return [
            f"{method}: the same student trained on the labels alone reached {_fmt(plain)} against {_fmt(student)} "
            f"{how}, a gap of {gap}, untested (no per-row scores were kept)."
        ]
    verdict = metrics["paired"]["verdict"]
    paired = _paired_text(metrics, scale, digits, unit)
    if verdict == "helped":
        lines = [
            f"{method} helped: {ours_metric} is {gap} {'lower' if lm else 'higher'} than the same student's trained "
            f"on the labels alone ({_fmt(plain)}); {paired}."
        ]
    elif verdict == "hurt":
        lines = [
            f"{method} hurt here: the same student trained on the labels alone reached {_fmt(plain)} against "
            f"{_fmt(student)} {how} ({gap} {'lower' if lm else 'better'}); {paired}."
        ]
    else:
        lines = [
            f"{method} made no measurable difference here: the same student trained on the labels alone reached "
            f"{_fmt(plain)} against {_fmt(student)} {how}, a gap of {gap}; {paired}, which contains 0."
        ]
    if not peers and ((plain <= teacher) if lm else (plain >= teacher)):  # with peers the teacher does not teach
        lines.append(
            "The student on the labels alone matches or beats the teacher, so the teacher has little to teach: it is "
            "probably undertrained. Fine-tune it longer (teacher_num_train_epochs, teacher_learning_rate) or use a "
            "stronger teacher before distilling."
        )
    return lines


def plot_report(path: str, metrics: dict, log_history: list[dict]) -> None:
    """Loss curves per term, teacher vs student metric, size and latency, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    peers = tuple(f"{name}/" for name in metrics.get("peers") or {})  # each peer's own terms (mutual learning)
    seen = dict.fromkeys(k for e in log_history for k in e if k == "task" or k.startswith(("distill/", *peers)))
    names = [k for k in ("loss", *seen) if any(k in e for e in log_history)]
    for name in names:
        points = [(e["step"], e[name]) for e in log_history if name in e and "step" in e]
        if points:
            ax.plot(*zip(*points, strict=True), label=name, marker="." if len(points) < 30 else None)
    ax.set_title("Distillation loss per term")
    ax.set_xlabel("step")
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training log (fewer steps than logging_steps)", ha="center", transform=ax.transAxes)
    ax.grid(alpha=0.3)

    teacher, student = metrics["teacher"], metrics["student"]
    colors = ["#4C72B0", "#DD8452", "#8C8C8C", "#55A868"]
    for ax, key, title in (
        (axes[0][1], "metric", metrics["metric"]),
        (axes[1][0], "params", "parameters"),
        (axes[1][1], "latency_ms", f"forward latency, ms per batch of {metrics['latency_batch_size']}"),
    ):
        names, values = ["teacher", "student"], [teacher[key], student[key]]
        if key == "metric" and metrics.get("generations"):
            generations = metrics["generations"]
            names = ["teacher", *(f"gen {g['generation']}" for g in generations)]
            values = [teacher[key], *(g["metric"] for g in generations)]
        if key == "metric" and "labels_only" in metrics:
            names, values = [*names, "labels only"], [*values, metrics["labels_only"]["metric"]]
        palette = [colors[0]] + [colors[1]] * (len(values) - 1)  # the teacher, then the students
        if key == "metric" and "labels_only" in metrics:
            palette[-1] = colors[2]
        if key in ("metric", "params") and metrics.get("peers"):
            names = [*names, *(f"peer {n}" for n in metrics["peers"])]
            values = [*values, *(p[key] for p in metrics["peers"].values())]
            palette += [colors[3]] * len(metrics["peers"])
        bars = ax.bar(names, values, color=palette)
        ax.bar_label(bars, labels=[_fmt(v) if isinstance(v, float) else f"{v:,}" for v in values])
        ax.set_title(title)
    fig.suptitle(
        f"{metrics['task']}: student keeps {metrics['retained']:.1%} of the teacher's {metrics['metric']}, "
        f"{metrics['speedup']:.2f}x faster, {metrics['size_ratio']:.1%} of the parameters"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(metrics: dict, output_dir: str, push_message: str | None) -> str:
    """The one-screen summary printed at the end of a run."""
    t, s = metrics["teacher"], metrics["student"]
    lines = [
        "",
        "=" * 72,
        f"hfkd distill: {metrics['task']} done in {metrics['wall_time_s']['total']:.0f} s",
        "=" * 72,
        f"{'':24}{'teacher':>16}{'student':>16}",
        f"{_readable(metrics['metric']):24}{_fmt(t['metric']):>16}{_fmt(s['metric']):>16}",
        f"{'parameters':24}{t['params']:>16,}{s['params']:>16,}",
        f"{'latency (ms/batch)':24}{_fmt(t['latency_ms']):>16}{_fmt(s['latency_ms']):>16}",
        "",
        f"retained {metrics['retained']:.1%} "
        f"({'teacher/student' if metrics['metric'] in LOWER_IS_BETTER else 'student/teacher'}"
        f" {metrics['metric']}) | size {metrics['size_ratio']:.1%} "
        f"| speed-up {metrics['speedup']:.2f}x",
        f"outputs: {output_dir}  (student + tokenizer/processor, README.md card, metrics.json, report.png, "
        f"hfkd_config.yaml{', peers/' if metrics.get('peers') else ''})",
    ]
    text_rows = []
    for _, teacher_value, student_value in _text_rows(metrics):
        key = "own_token_perplexity" if metrics["metric"] == "bits_per_byte" else "bits_per_byte"
        short = "ppl per own token" if key == "own_token_perplexity" else "bits per byte"
        text_rows.append(f"{short:24}{teacher_value:>16}{student_value:>16}")
        if key in metrics.get("labels_only", {}):
            text_rows.append(f"{'(labels only)':24}{'':>16}{_fmt(metrics['labels_only'][key]):>16}")
    lines[6:6] = text_rows
    if "labels_only" in metrics:
        lines.insert(6, f"{'(labels only)':24}{'':>16}{_fmt(metrics['labels_only']['metric']):>16}")
        lines.extend(comparison_lines(metrics))
    if metrics.get("generations"):
        lines.append(generations_line(metrics))
    if metrics.get("early_exit"):
        exits = ", ".join(
            f"layer {e['layer']} {_fmt(e['accuracy'])} ({_fmt(e['latency_ms'], 3)} ms)" for e in metrics["early_exit"]
        )
        lines.append(f"early exit ({metrics['metric']}, latency per batch): {exits}")
    if metrics.get("peers"):
        at = 7 if "labels_only" in metrics else 6  # below the metric's row(s)
        rows = [f"{f'(peer {name})':24}{'':>16}{_fmt(p['metric']):>16}" for name, p in metrics["peers"].items()]
        lines[at:at] = rows
        lines.append(peers_line(metrics))
    if push_message:
        lines.append(push_message)
    lines.append("=" * 72)
    return "\n".join(lines)
