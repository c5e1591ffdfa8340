"""Did distillation help? Paired comparisons of two models scored on the same held-out rows, blocks or seeds.

The distilled student and the student trained on the labels alone are scored on the *same* held-out rows, so the
question is about the rows on which they differ: the rows both get right (or both get wrong) carry no information
about which is better. Every function here compares paired scores and returns a JSON-ready dict; the verdict always
follows the interval of the gain (`verdict`), never the p-value alone.

Which variance each interval covers:

- `paired_accuracy`, `paired_blocks` (one run): the sampling of the held-out rows (blocks), i.e. how much the gain
  would move on another held-out set drawn like this one, for these two trained models. Not the training's own
  randomness (initial weights, data order): one run says nothing about it.
- `seeds_interval` (several runs, per-seed gains only): the spread of the gain across seeds (training randomness,
  and whatever of the row sampling shows up as a different gain per seed), on this fixed held-out set.
- `hierarchical_interval` (several runs with per-row scores): both, by resampling seeds and then rows.

Gains are signed so that positive means distillation helped: accuracy gained, or perplexity (bits per byte) lowered.
"""

import math
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 0  # a fixed bootstrap seed: the same scores always give the same interval
_CHUNK = 1_000  # resamples drawn at once (bounds the memory of a resample matrix)

HELPED, NO_DIFFERENCE, HURT = "helped", "no measurable difference", "hurt"


def verdict(low: float, high: float) -> str:
    """ "helped" when the interval of the gain lies above 0, "hurt" when below, else "no measurable difference"."""
    if low > 0:
        return HELPED
    if high < 0:
        return HURT
    return NO_DIFFERENCE


def mcnemar_exact(b: int, c: int) -> float:
    """McNemar's exact test: the two-sided binomial test of b successes in b + c trials with p = 1/2.

    b and c are the discordant rows (only the first model right, only the second). Under "neither model is better" each
    discordant row is equally likely to go either way, so p = min(1, 2 P(X <= min(b, c))) with X ~ Bin(b + c, 1/2).
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: discordant counts must be >= 0, got b={b}, c={c}.")
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    # The tail in log space: 2^-n underflows float64 beyond ~1,070 discordant rows.
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * math.fsum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def _percentile_interval(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(low), float(high)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}.")


def paired_accuracy(
    ours: Sequence[bool],
    theirs: Sequence[bool],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict:
    """Paired comparison of two classifiers' correctness on the same held-out rows.

    The gain is accuracy(ours) - accuracy(theirs) = (b - c) / n, with b the rows only `ours` got right and c the rows
    only `theirs` got right. Its interval is the percentile interval of a paired bootstrap over rows: each resample
    draws n rows with replacement, keeping each row's pair of outcomes together (drawn as one multinomial over the
    four kinds of row, which is the same distribution and much faster). The p-value is McNemar's exact test
    (`mcnemar_exact`). Covers: the sampling of the held-out rows, for these two trained models.

    Args:
        ours: per row, whether the distilled student was right.
        theirs: per row, whether the compared student (the labels-only one) was right, in the same row order.

    Returns:
        {"test", "rows", "only_ours", "only_theirs", "both", "neither", "gain", "interval", "confidence", "p_value",
        "verdict", "covers"}; gain and interval in accuracy units (x100 for points).
    """
    _check_confidence(confidence)
    a, b_ = np.asarray(ours, dtype=bool), np.asarray(theirs, dtype=bool)
    if a.shape != b_.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"paired_accuracy needs two equally long, non-empty per-row vectors of the same rows; got {a.shape} and "
            f"{b_.shape}."
        )
    n = int(a.size)
    b, c = int((a & ~b_).sum()), int((~a & b_).sum())
    both, neither = int((a & b_).sum()), int((~a & ~b_).sum())
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, resamples, _CHUNK):
        draws = rng.multinomial(n, [b / n, c / n, 1.0 - (b + c) / n], size=min(_CHUNK, resamples - start))
        samples.append((draws[:, 0] - draws[:, 1]) / n)
    low, high = _percentile_interval(np.concatenate(samples), confidence)
    return {
        "test": "paired bootstrap over rows (interval), McNemar's exact test (p)",
        "rows": n,
        "only_ours": b,
        "only_theirs": c,
        "both": both,
        "neither": neither,
        "gain": (b - c) / n,
        "interval": [low, high],
        "confidence": confidence,
        "p_value": mcnemar_exact(b, c),
        "verdict": verdict(low, high),
        "covers": "the sampling of the held-out rows (one run: not the training's seed-to-seed spread)",
    }


_LM_METRICS = {"perplexity": math.exp, "bits_per_byte": lambda x: x}


def paired_blocks(
    ours_loss: Sequence[float],
    ours_count: Sequence[float],
    theirs_loss: Sequence[float],
    theirs_count: Sequence[float],
    metric: str,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict:
    """Paired comparison of two language models on the same held-out blocks (or text pieces).

    Each model's metric pools its blocks: perplexity = exp(sum loss / sum count) with loss the summed negative
    log-likelihood in nats and count the predicted tokens; bits per byte = sum loss / sum count with loss in bits and
    count the bytes. The gain is metric(theirs) - metric(ours) (positive: ours is lower, so better). Its interval is
    the percentile interval of a paired bootstrap over blocks: each resample draws the blocks with replacement, the
    same blocks for both models, and pools each model's sums over them. The p-value is the exact sign test
    (`mcnemar_exact`) on the blocks where one model's loss per count is lower than the other's (ties count for
    neither). Covers: the sampling of the held-out blocks, for these two trained models.

    Returns:
        {"test", "blocks", "only_ours" (blocks where ours is lower), "only_theirs", "ties", "gain", "interval",
        "confidence", "p_value", "verdict", "covers"}.
    """
    _check_confidence(confidence)
    if metric not in _LM_METRICS:
        raise ValueError(f"paired_blocks: metric must be one of {sorted(_LM_METRICS)}, got {metric!r}.")
    arrays = [np.asarray(v, dtype=np.float64) for v in (ours_loss, ours_count, theirs_loss, theirs_count)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
        raise ValueError(
            "paired_blocks needs four equally long, non-empty per-block vectors of the same blocks; got shapes "
            f"{[a.shape for a in arrays]}."
        )
    ol, oc, tl, tc = arrays
    if (oc <= 0).any() or (tc <= 0).any():
        raise ValueError("paired_blocks: every block's count (tokens or bytes) must be > 0.")
    f = _LM_METRICS[metric]
    gain = f(tl.sum() / tc.sum()) - f(ol.sum() / oc.sum())
    n = ol.size
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, resamples, _CHUNK):
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=min(_CHUNK, resamples - start)).astype(np.float64)
        ours_metric = (weights @ ol) / (weights @ oc)
        theirs_metric = (weights @ tl) / (weights @ tc)
        if metric == "perplexity":
            ours_metric, theirs_metric = np.exp(ours_metric), np.exp(theirs_metric)
        samples.append(theirs_metric - ours_metric)
    low, high = _percentile_interval(np.concatenate(samples), confidence)
    per_ours, per_theirs = ol / oc, tl / tc
    b, c = int((per_ours < per_theirs).sum()), int((per_theirs < per_ours).sum())
    return {
        "test": "paired bootstrap over blocks (interval), exact sign test on per-block loss (p)",
        "blocks": int(n),
        "only_ours": b,
        "only_theirs": c,
        "ties": int(n - b - c),
        "gain": float(gain),
        "interval": [low, high],
        "confidence": confidence,
        "p_value": mcnemar_exact(b, c),
        "verdict": verdict(low, high),
        "covers": "the sampling of the held-out blocks (one run: not the training's seed-to-seed spread)",
    }


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _incomplete_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(q: float, df: int) -> float:
    """The q-quantile of Student's t with df degrees of freedom (bisection on its CDF; no scipy needed)."""
    if df < 1 or not 0.0 < q < 1.0:
        raise ValueError(f"t_quantile needs df >= 1 and 0 < q < 1; got df={df}, q={q}.")

    def cdf(t: float) -> float:
        tail = 0.5 * _incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
        return 1.0 - tail if t > 0 else tail

    low, high = -1e3, 1e3
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if cdf(mid) < q else (low, mid)
    return (low + high) / 2.0


def seeds_interval(gains: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Several seeds, per-seed gains only: a Student-t interval of the mean per-seed paired gain.

    Each gain is one seed's paired difference (distilled minus labels-only trained with the same seed, on the same
    held-out rows). Interval: mean +- t_{(1+confidence)/2, k-1} * sd / sqrt(k) over the k seeds. Covers: the spread
    of the gain across seeds (the training's randomness) on this fixed held-out set; the sampling of the held-out
    rows enters only as far as it makes the per-seed gains differ (all seeds share the same rows). Needs k >= 2.
    """
    _check_confidence(confidence)
    values = [float(g) for g in gains]
    k = len(values)
    if k < 2:
        raise ValueError(f"seeds_interval needs the gains of at least 2 seeds, got {k}.")
    mean = math.fsum(values) / k
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (k - 1))
    half = t_quantile((1.0 + confidence) / 2.0, k - 1) * sd / math.sqrt(k)
    low, high = mean - half, mean + half
    return {
        "test": f"t-interval over {k} per-seed paired gains",
        "seeds": k,
        "gain": mean,
        "gain_std": sd,
        "interval": [low, high],
        "confidence": confidence,
        "verdict": verdict(low, high),
        "covers": "the seed-to-seed spread of the gain on this fixed held-out set (not a new held-out sample)",
    }


def hierarchical_interval(
    ours: Sequence[Sequence[bool]],
    theirs: Sequence[Sequence[bool]],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> dict:
    """Several seeds with per-row correctness: a hierarchical paired bootstrap, seeds then rows.

    ours[s] and theirs[s] are seed s's per-row correctness of the distilled and the labels-only student, on the same
    rows for every seed. Each resample draws k seeds with replacement, then n rows with replacement (the same rows for
    every seed, since all seeds are scored on one held-out set), and takes the mean over the drawn seeds of the
    paired accuracy difference on the drawn rows. Covers: the seed-to-seed spread and the sampling of the held-out
    rows together.
    """
    _check_confidence(confidence)
    a, t = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if a.shape != t.shape or a.ndim != 2 or a.shape[0] < 2 or a.shape[1] == 0:
        raise ValueError(
            "hierarchical_interval needs [seeds, rows] correctness of both models, at least 2 seeds, the same rows; "
            f"got {a.shape} and {t.shape}."
        )
    diff = a - t  # [k, n], each entry -1, 0 or 1
    k, n = diff.shape
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        seed_weights = rng.multinomial(k, np.full(k, 1.0 / k), size=size).astype(np.float64)  # [R, k]
        row_weights = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)  # [R, n]
        per_seed = row_weights @ diff.T  # [R, k]: each seed's summed difference on the drawn rows
        samples.append((seed_weights * per_seed).sum(1) / (k * n))
    low, high = _percentile_interval(np.concatenate(samples), confidence)
    gains = diff.mean(1)
    return {
        "test": f"hierarchical paired bootstrap over {k} seeds, then {n} rows",
        "seeds": int(k),
        "rows": int(n),
        "gain": float(gains.mean()),
        "gain_std": float(gains.std(ddof=1)),
        "interval": [low, high],
        "confidence": confidence,
        "verdict": verdict(low, high),
        "covers": "the seed-to-seed spread and the sampling of the held-out rows",
    }


def gain_text(result: dict, scale: float = 100.0, digits: int = 2, unit: str = " pt") -> str:
    """One line for tables: the gain, its interval and the verdict, e.g. "+0.60 pt [-1.1, +2.3] (95%), no
    measurable difference"."""
    low, high = result["interval"]
    return (
        f"{result['gain'] * scale:+.{digits}f}{unit} [{low * scale:+.{digits}f}, {high * scale:+.{digits}f}] "
        f"({result['confidence']:.0%}), {result['verdict']}"
    )


def compare_seeds(
    gains: Sequence[float],
    ours: Sequence[Sequence[bool]] | None = None,
    theirs: Sequence[Sequence[bool]] | None = None,
    confidence: float = CONFIDENCE,
) -> dict | None:
    """The gain over the labels-only baseline from whatever a table has, one seed or several (None with nothing).

    gains: per seed, the paired accuracy difference (same seed, same held-out rows). ours / theirs: per seed, the
    per-row correctness behind it, where kept. Several seeds with rows: `hierarchical_interval` (seeds and rows);
    several seeds without rows: `seeds_interval` (seeds only, on this held-out set); one seed with rows:
    `paired_accuracy` (rows only); one seed without rows: None (nothing to judge the gain by). The result's "covers"
    says which.
    """
    rows = ours is not None and theirs is not None and len(ours) == len(theirs) == len(gains) and len(gains) > 0
    if len(gains) >= 2:
        return hierarchical_interval(ours, theirs, confidence) if rows else seeds_interval(gains, confidence)
    if len(gains) == 1 and rows:
        return paired_accuracy(ours[0], theirs[0], confidence)
    return None
