"""The length/vocabulary scaling benchmark runs end to end on tiny models, one process per cell, and records a child
killed above the memory cap instead of failing (its figures come from the real pairs: `make bench-scaling`).

Every cell is a fresh Python process (about 10 s each, mostly imports), so the full run takes the large-vocabulary
pair only (8 cells); the SmolLM2 pair's tiny stand-in is bench_distill's, and the cap test runs it too."""

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_scaling.py")
STEP_VARIANTS = {"hfkd", "full-logits", "trl"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, "--tiny", "--threads", "1", *args],  # one thread: the machine may be shared
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=900,
        check=False,
    )


def test_bench_scaling_tiny(tmp_path):
    out, png = tmp_path / "scaling.json", tmp_path / "scaling.png"
    done = _run("--pairs", "llama-256k", "--steps", "2", "--json", str(out), "--plot", str(png))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    s = results["settings"]
    assert s["pairs"] == ["llama-256k"] and s["lengths"] == [16, 64] and s["batch"] == 1
    assert s["divergence"]["logit_loss"] == "jsd" and s["divergence"]["jsd_beta"] == 0.5
    cells = results["cells"]
    assert {(c["pair"], c["variant"], c["length"]) for c in cells} == {
        (p, v, n) for p in s["pairs"] for v in [*STEP_VARIANTS, "hfkd-build"] for n in s["lengths"]
    }
    for c in cells:
        assert c["status"] == "ok", c
        assert c["vocab"] == s["vocab"][c["pair"]] and c["batch"] == 1
        assert c["peak_rss_mib"] > 0 and c["watched_max_rss_mib"] > 0
        assert "other_processes_cores" in c["load_whole_child"]
        if c["variant"] == "hfkd-build":
            assert "times_s" not in c
            continue
        assert len(c["times_s"]) == 2 and all(t > 0 for t in c["times_s"]) and c["median_s"] > 0
        assert len(c["losses"]) == 3 and all(math.isfinite(x) for x in c["losses"])
        assert set(c["peak_mib"]) == {"load", "build", "warm-up", "steps"}
        assert c["peak_rss_mib"] >= c["resident_mib"] > 0
        assert c.get("chunked", c["variant"] == "hfkd") == (c["variant"] == "hfkd")
    # The three variants distil with the same divergence from the same weights on the same rows: the same first loss.
    for p in s["pairs"]:
        for n in s["lengths"]:
            first = [c["losses"][0] for c in cells if (c["pair"], c["length"]) == (p, n) and "losses" in c]
            assert len(first) == 3 and max(first) - min(first) <= 1e-4 * max(abs(x) for x in first), (p, n, first)
    assert "| pair (vocabulary) | variant | peak RSS 16 | peak RSS 64 | step 16 | step 64 |" in done.stdout
    assert "| llama-256k (4,096) | hfkd (chunked) |" in done.stdout
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bench_scaling_cap(tmp_path):
    """A child above the cap (0.1 GiB: less than Python with torch) is killed and recorded; the longer length of that
    pair and variant is not run."""
    out = tmp_path / "capped.json"
    done = _run(
        "--pairs",
        "smollm2,llama-256k",
        "--variants",
        "trl",
        "--memory-cap-gib",
        "0.1",
        "--json",
        str(out),
        "--plot",
        "",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    cells = json.loads(out.read_text())["cells"]
    assert [(c["pair"], c["length"], c["status"]) for c in cells] == [
        ("smollm2", 16, "over the cap"),
        ("llama-256k", 16, "over the cap"),
        ("smollm2", 64, "not run"),
        ("llama-256k", 64, "not run"),
    ]
    for c in cells[:2]:
        assert c["watched_max_rss_mib"] > 0.1 * 1024 and c["phase"] and c["cap_mib"] == 0.1 * 1024
    assert "> cap" in done.stdout
