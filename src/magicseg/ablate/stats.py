"""Statistics of ``magicseg ablate``, standard library only (no scipy).

Every cell of a grid runs on the same seeds, and a seed fixes the data (held-out classes,
prompts, samples), the initial weights and the batch order. An effect (a contrast of cells,
``{cell: coefficient}`` with coefficients summing to 0) is therefore measured per seed, and its
estimate is the mean of the per-seed contrasts d_s = sum_c coef_c * x_{c,s}, with the 95%
Student t-interval mean ± t_{0.975, n-1} * sd(d) / sqrt(n) (:func:`paired_contrast`). The
seed-to-seed spread that cells share cancels in d_s. "Beyond the noise" means the interval
excludes 0.

Only where the cells share fewer than 2 seeds (a failed experiment, cells run on other seeds)
is the effect a contrast of unpaired cell means with sqrt(sum c^2 s^2 / n) and a Welch-
Satterthwaite t-interval (:func:`unpaired_contrast`, ``paired: false``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """``n``, ``mean`` and the sample standard deviation ``std`` (ddof 1; None below 2)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "std": None}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std}


def t_central(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` (an integer >= 1) degrees of freedom: the finite
    series of Abramowitz & Stegun 26.7.3-4 in theta = atan(t / sqrt(df))."""
    if df < 1:
        raise ValueError(f"df: must be >= 1 (got {df})")
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        total, term = 0.0, math.cos(theta)
        # cos + (2/3) cos^3 + (2*4)/(3*5) cos^5 + ... up to cos^(df-2)
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total) if df > 1 else 2 * theta / math.pi
    total, term = 0.0, 1.0
    # 1 + (1/2) cos^2 + (1*3)/(2*4) cos^4 + ... up to cos^(df-2)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` critical value of Student's t (t_{(1+level)/2, df}): 12.706 for
    df 1, 4.303 for 2, 2.776 for 4; found by bisection on :func:`t_central` to 1e-10."""
    if not 0 < level < 1:
        raise ValueError(f"level: must be in (0, 1) (got {level})")
    lo, hi = 0.0, 1.0
    while t_central(hi, df) < level:
        hi *= 2
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central(mid, df) < level else (lo, mid)
    return (lo + hi) / 2


def _interval(diff: float, se: float, df: int) -> dict[str, Any]:
    half = t_quantile(df) * se
    lo, hi = diff - half, diff + half
    return {"se": se, "df": df, "ci95": [lo, hi], "exceeds_noise": lo > 0 or hi < 0}


def paired_contrast(
    terms: Mapping[str, float], values: Mapping[str, Mapping[str, float]]
) -> dict[str, Any]:
    """The contrast ``terms`` ({cell: coefficient}) over the seeds every cell has.

    ``values``: cell -> seed -> value. Returns ``paired`` True, ``n`` (shared seeds), ``diff``
    (mean of the per-seed contrasts), ``se`` (their sd / sqrt(n)), ``df`` (n - 1), ``ci95``
    ([low, high], the t-interval), ``exceeds_noise`` (the interval excludes 0) and ``seeds``.
    With one shared seed: diff only; with none: diff None."""
    shared = None
    for cell in terms:
        seeds = set((values.get(cell) or {}).keys())
        shared = seeds if shared is None else shared & seeds
    seeds = sorted(shared or (), key=lambda s: (len(str(s)), str(s)))
    per_seed = [math.fsum(c * values[cell][s] for cell, c in terms.items()) for s in seeds]
    out: dict[str, Any] = {"paired": True, "n": len(seeds), "seeds": seeds}
    if not per_seed:
        return out | {"diff": None, "se": None, "df": None, "ci95": None, "exceeds_noise": None}
    s = summarize(per_seed)
    if s["n"] < 2:
        return out | {"diff": s["mean"], "se": None, "df": None, "ci95": None,
                      "exceeds_noise": None}  # fmt: skip
    return (
        out | {"diff": s["mean"]} | _interval(s["mean"], s["std"] / math.sqrt(s["n"]), s["n"] - 1)
    )


def unpaired_contrast(
    terms: Mapping[str, float], stats: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """The contrast of cell means (``stats``: cell -> :func:`summarize`), for cells that do not
    share seeds: ``diff``, ``se`` = sqrt(sum c^2 s^2 / n), a Welch-Satterthwaite t-interval
    (df rounded down, at least 1), ``paired`` False and ``n`` (the smallest cell's)."""
    parts = [stats.get(cell) or {"n": 0} for cell in terms]
    n = min((p["n"] for p in parts), default=0)
    out: dict[str, Any] = {"paired": False, "n": n}
    if n == 0:
        return out | {"diff": None, "se": None, "df": None, "ci95": None, "exceeds_noise": None}
    coefs = list(terms.values())
    diff = math.fsum(c * p["mean"] for c, p in zip(coefs, parts, strict=True))
    if n < 2:
        return out | {"diff": diff, "se": None, "df": None, "ci95": None, "exceeds_noise": None}
    var = [c * c * p["std"] ** 2 / p["n"] for c, p in zip(coefs, parts, strict=True)]
    se = math.sqrt(math.fsum(var))
    denom = math.fsum(v * v / (p["n"] - 1) for v, p in zip(var, parts, strict=True))
    df = max(1, int(se**4 / denom)) if denom > 0 else n - 1
    return out | {"diff": diff} | _interval(diff, se, df)


def contrast(
    terms: Mapping[str, float], values: Mapping[str, Mapping[str, float]]
) -> dict[str, Any]:
    """An effect from per-seed values (cell -> seed -> value): paired over the shared seeds
    where at least 2 are shared (:func:`paired_contrast`), else unpaired
    (:func:`unpaired_contrast`) where every cell has 2 values or more."""
    paired = paired_contrast(terms, values)
    if paired["n"] >= 2:
        return paired
    stats = {c: summarize(list((values.get(c) or {}).values())) for c in terms}
    if all(stats[c]["n"] >= 2 for c in terms):
        return unpaired_contrast(terms, stats)
    return paired
