"""hfkd.compare against references written from the definitions: exact binomial sums (math.comb, float64), scipy's
binomial test and t quantiles where scipy is there, and bootstrap intervals recomputed by plain row resampling."""

import math
from fractions import Fraction

import numpy as np
import pytest

from hfkd.compare import (
    HELPED,
    HURT,
    NO_DIFFERENCE,
    gain_text,
    hierarchical_interval,
    mcnemar_exact,
    paired_accuracy,
    paired_blocks,
    seeds_interval,
    t_quantile,
    verdict,
)


def _binomial_p(b: int, c: int) -> float:
    """Two-sided exact binomial test of b in b + c trials at 1/2, from the definition (exact rationals)."""
    n = b + c
    return min(1.0, float(Fraction(2 * sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2**n))) if n else 1.0


def _rows(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    ours = np.array([1] * b + [0] * c + [1] * both + [0] * neither, dtype=bool)
    theirs = np.array([0] * b + [1] * c + [1] * both + [0] * neither, dtype=bool)
    order = np.random.default_rng(3).permutation(ours.size)  # the order of the rows must not matter
    return ours[order], theirs[order]


@pytest.mark.parametrize("b,c", [(0, 0), (0, 5), (10, 3), (3, 10), (7, 7), (40, 60), (12, 2), (700, 800)])
def test_mcnemar_exact_is_the_two_sided_binomial_test_on_the_discordant_rows(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_binomial_p(b, c), rel=1e-10)
    scipy_stats = pytest.importorskip("scipy.stats")
    if b + c:
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_identical_predictions_give_an_interval_of_exactly_zero_and_p_one():
    ours, _ = _rows(0, 0, 700, 300)
    result = paired_accuracy(ours, ours.copy())
    assert result["interval"] == [0.0, 0.0] and result["gain"] == 0.0 and result["p_value"] == 1.0
    assert (result["only_ours"], result["only_theirs"], result["both"], result["neither"]) == (0, 0, 700, 300)
    assert result["verdict"] == NO_DIFFERENCE
    loss, count = [2.0, 3.5, 1.25], [10.0, 12.0, 9.0]
    for metric in ("perplexity", "bits_per_byte"):
        lm = paired_blocks(loss, count, list(loss), list(count), metric=metric)
        assert lm["interval"] == [0.0, 0.0] and lm["gain"] == 0.0 and lm["p_value"] == 1.0 and lm["ties"] == 3


def test_paired_accuracy_counts_p_and_a_row_bootstrap_by_hand():
    ours, theirs = _rows(28, 12, 660, 300)
    result = paired_accuracy(ours, theirs, resamples=4000)
    assert (result["only_ours"], result["only_theirs"], result["both"], result["neither"]) == (28, 12, 660, 300)
    assert result["gain"] == pytest.approx((28 - 12) / 1000) and result["rows"] == 1000
    assert result["p_value"] == pytest.approx(_binomial_p(28, 12), rel=1e-10)
    # A paired bootstrap by plain row resampling (another generator, other draws) agrees to within resampling error.
    rng = np.random.default_rng(123)
    diff = ours.astype(float) - theirs.astype(float)
    boot = np.array([diff[rng.integers(0, diff.size, diff.size)].mean() for _ in range(4000)])
    reference = np.quantile(boot, [0.025, 0.975])
    assert result["interval"] == pytest.approx(reference.tolist(), abs=0.002)
    assert result["interval"][0] > 0 and result["verdict"] == HELPED
    # The same scores give the same interval (fixed seed); the row order does not matter.
    assert paired_accuracy(ours, theirs, resamples=4000) == result
    assert paired_accuracy(ours[::-1], theirs[::-1], resamples=4000) == result


def test_paired_accuracy_refuses_rows_that_do_not_pair():
    with pytest.raises(ValueError, match="equally long"):
        paired_accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="confidence"):
        paired_accuracy([1], [0], confidence=95)


def test_lm_blocks_known_values():
    """Three blocks with known per-block losses: the gain pools sums, and the interval is the percentile interval of
    a block bootstrap (recomputed here by drawing block indices)."""
    ours_loss, theirs_loss = np.array([20.0, 30.0, 45.0]), np.array([24.0, 33.0, 45.0])
    count = np.array([10.0, 15.0, 15.0])
    ppl = paired_blocks(ours_loss, count, theirs_loss, count, metric="perplexity", resamples=3000)
    assert ppl["gain"] == pytest.approx(math.exp(102 / 40) - math.exp(95 / 40), rel=1e-12)
    assert (ppl["only_ours"], ppl["only_theirs"], ppl["ties"]) == (2, 0, 1)
    assert ppl["p_value"] == pytest.approx(_binomial_p(2, 0))  # 0.5: two blocks cannot show a difference alone
    # Every resample pools some blocks, none of which is worse for ours: the interval is >= 0 but its lower end is 0
    # (the resample of the tied block alone), so the verdict is "no measurable difference".
    assert ppl["interval"][0] == pytest.approx(0.0, abs=1e-12) and ppl["interval"][1] > 0
    assert ppl["verdict"] == NO_DIFFERENCE
    rng = np.random.default_rng(7)
    draws = rng.integers(0, 3, size=(3000, 3))
    boot = np.exp(theirs_loss[draws].sum(1) / count[draws].sum(1)) - np.exp(
        ours_loss[draws].sum(1) / count[draws].sum(1)
    )
    assert ppl["interval"][1] == pytest.approx(float(np.quantile(boot, 0.975)), rel=0.05)
    # Bits per byte: sum of bits over sum of bytes, each model its own byte count.
    bpb = paired_blocks([8.0, 16.0], [4.0, 8.0], [9.0, 20.0], [4.0, 9.0], metric="bits_per_byte")
    assert bpb["gain"] == pytest.approx(29 / 13 - 24 / 12)
    with pytest.raises(ValueError, match="metric"):
        paired_blocks([1.0], [1.0], [1.0], [1.0], metric="accuracy")
    with pytest.raises(ValueError, match="count"):
        paired_blocks([1.0], [0.0], [1.0], [1.0], metric="bits_per_byte")


def test_many_blocks_consistently_lower_is_a_gain_and_higher_a_loss():
    rng = np.random.default_rng(0)
    theirs, count = rng.uniform(2.0, 4.0, 200) * 100, np.full(200, 100.0)
    better = paired_blocks(theirs * 0.98, count, theirs, count, metric="bits_per_byte")
    worse = paired_blocks(theirs * 1.02, count, theirs, count, metric="bits_per_byte")
    assert better["verdict"] == HELPED and better["interval"][0] > 0 and better["p_value"] < 1e-50
    assert worse["verdict"] == HURT and worse["interval"][1] < 0


def test_the_verdict_follows_the_interval():
    assert verdict(0.001, 0.02) == HELPED
    assert verdict(-0.02, -0.001) == HURT
    assert verdict(-0.01, 0.02) == verdict(0.0, 0.02) == verdict(-0.02, 0.0) == verdict(0.0, 0.0) == NO_DIFFERENCE
    for b, c in ((40, 10), (10, 40), (20, 20)):
        result = paired_accuracy(*_rows(b, c, 700, 1000 - 700 - b - c))
        assert result["verdict"] == verdict(*result["interval"])
    assert paired_accuracy(*_rows(10, 40, 700, 250))["verdict"] == HURT


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29])
def test_t_quantile_matches_the_t_distribution(df):
    known = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642}
    assert t_quantile(0.975, df) == pytest.approx(known[df], rel=1e-8)
    assert t_quantile(0.025, df) == pytest.approx(-known[df], rel=1e-8)
    scipy_stats = pytest.importorskip("scipy.stats")
    for q in (0.9, 0.995):
        assert t_quantile(q, df) == pytest.approx(scipy_stats.t.ppf(q, df), rel=1e-8)


def test_seeds_interval_is_a_t_interval_over_per_seed_gains():
    gains = [0.012, 0.004, 0.020]
    result = seeds_interval(gains)
    mean, sd = sum(gains) / 3, float(np.std(gains, ddof=1))
    half = 4.302652730 * sd / math.sqrt(3)
    assert result["gain"] == pytest.approx(mean) and result["gain_std"] == pytest.approx(sd)
    assert result["interval"] == pytest.approx([mean - half, mean + half], rel=1e-8)
    assert result["verdict"] == NO_DIFFERENCE  # mean 0.012 > its std 0.008, but 3 seeds cannot exclude 0
    assert seeds_interval([0.010, 0.011, 0.012])["verdict"] == HELPED
    assert seeds_interval([-0.010, -0.011, -0.012])["verdict"] == HURT
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seeds_interval([0.01])


def test_hierarchical_interval_covers_seeds_and_rows():
    ours_a, theirs_a = _rows(30, 10, 700, 260)
    ours_b, theirs_b = _rows(25, 15, 700, 260)
    result = hierarchical_interval([ours_a, ours_b], [theirs_a, theirs_b], resamples=3000)
    assert result["gain"] == pytest.approx(((30 - 10) + (25 - 15)) / 2000)
    assert result["seeds"] == 2 and result["rows"] == 1000
    # Wider than one seed's row-only interval: it adds the seed-to-seed spread.
    one = paired_accuracy(ours_a, theirs_a, resamples=3000)
    assert result["interval"][1] - result["interval"][0] > 0.5 * (one["interval"][1] - one["interval"][0])
    # Identical seeds and identical models: exactly 0.
    same = hierarchical_interval([ours_a, ours_a], [ours_a, ours_a], resamples=500)
    assert same["interval"] == [0.0, 0.0] and same["verdict"] == NO_DIFFERENCE
    # By hand: draw seeds, then shared rows, mean paired difference.
    rng = np.random.default_rng(5)
    diff = np.stack([ours_a.astype(float) - theirs_a, ours_b.astype(float) - theirs_b])
    boot = []
    for _ in range(3000):
        seeds, rows = rng.integers(0, 2, 2), rng.integers(0, 1000, 1000)
        boot.append(diff[seeds][:, rows].mean())
    assert result["interval"] == pytest.approx(np.quantile(boot, [0.025, 0.975]).tolist(), abs=0.003)


def test_gain_text():
    result = {"gain": 0.006, "interval": [-0.011, 0.023], "confidence": 0.95, "verdict": NO_DIFFERENCE}
    assert gain_text(result) == "+0.60 pt [-1.10, +2.30] (95%), no measurable difference"


def test_the_recipe_table_prints_the_runs_paired_gain(tmp_path):
    """recipes/results_table.py reads the paired comparison a run wrote and prints it with gain_text, as the method
    table does (one function for "gain" everywhere)."""
    import importlib.util
    import json
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "results_table.py")
    spec = importlib.util.spec_from_file_location("results_table", path)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    paired = paired_accuracy(*_rows(40, 10, 700, 250))
    metrics = {
        "metric": "accuracy",
        "teacher": {"name": "t", "params": 2e6, "metric": 0.8},
        "student": {"params": 1e6, "metric": 0.74},
        "data": {"train_examples": 10, "eval_examples": 1000},
        "retained": 0.925,
        "speedup": 2.0,
        "wall_time_s": {"total": 60.0},
        "paired": paired,
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    line = table.row(str(tmp_path / "run"))
    assert f"| {gain_text(paired)} |" in line and "+3.00 pt" in line and line.count("|") == 12
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({**metrics, "paired": None}))
    assert "| n/a |" in table.row(str(tmp_path / "run"))
    transfer = {"train_examples": 110, "labelled_examples": 10, "transfer_examples": 100, "eval_examples": 1000}
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({**metrics, "data": transfer}))
    assert "| 10 labelled + 100 transfer rows / 1,000 held-out |" in table.row(str(tmp_path / "run"))
