"""Print the README's results table from the metrics.json of finished recipe runs.

    python recipes/results_table.py outputs/minilm-tweets outputs/fashion-mnist-vit outputs/smollm2-fortunes

Every figure comes from a run's metrics.json (written by `hfkd distill`); nothing is typed in by hand. The gain over
the same student on the labels alone (runs with `compare_without_distillation`) is the paired comparison the run
wrote (`paired`, hfkd.compare), printed by hfkd.compare.gain_text as the method table prints its gains: one run, so
its interval covers the sampling of the held-out rows, not the seed-to-seed spread.
"""

import json
import os
import sys

from hfkd.compare import gain_text


def _metric(value: float, name: str) -> str:
    if name == "perplexity":
        return f"{value:.1f}"
    return f"{value:.3f}" if name == "bits_per_byte" else f"{value:.1%}"


def _gain(m: dict) -> str:
    paired = m.get("paired")
    if paired is None:
        return "n/a"
    if m["metric"] == "accuracy":
        return gain_text(paired)
    digits = 3 if m["metric"] == "bits_per_byte" else 2
    unit = " bpb" if m["metric"] == "bits_per_byte" else ""
    return gain_text(paired, scale=1.0, digits=digits, unit=unit)


def _train_rows(data: dict) -> str:
    """The training rows; with transfer rows, how many of them had a label."""
    transfer = data.get("transfer_examples") or 0
    if transfer:
        return f"{data['labelled_examples']:,} labelled + {transfer:,} transfer rows"
    return f"{data['train_examples']:,} train"


def row(folder: str) -> str:
    with open(os.path.join(folder, "metrics.json")) as handle:
        m = json.load(handle)
    t, s = m["teacher"], m["student"]
    recipe = os.path.basename(os.path.normpath(folder))
    data = m["data"]
    return (
        f"| {recipe} | {t.get('hub_id') or t['name']} ({t['params'] / 1e6:.1f}M) | {s['params'] / 1e6:.1f}M "
        f"| {_train_rows(data)} / {data['eval_examples']:,} held-out | {m['metric']} "
        f"| {_metric(t['metric'], m['metric'])} | {_metric(s['metric'], m['metric'])} | {m['retained']:.1%} "
        f"| {_gain(m)} | {m['speedup']:.2f}x | {m['wall_time_s']['total'] / 60:.1f} min |"
    )


def main(folders: list[str]) -> None:
    print(
        "| recipe | teacher (params) | student params | data | metric | teacher | student | retained "
        "| gain vs labels only (95% interval) | speed-up | wall time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in folders:
        print(row(folder))


if __name__ == "__main__":
    main(sys.argv[1:])
