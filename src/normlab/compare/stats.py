"""Summary statistics over seeds: mean, sample std, paired t confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats


def mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and sample standard deviation (n-1); std is None for fewer than two values."""
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of a_i - b_i with a Student-t confidence interval over the n pairs:
    mean +- t_{(1+c)/2, n-1} * sd / sqrt(n). Pairing by seed removes the variance that the
    shared data order and init put into both runs. The interval is None for n < 2."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    summary = mean_std(diffs)
    n, mean, sd = summary["n"], summary["mean"], summary["std"]
    half = None
    if n >= 2:
        half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return {
        "mean": mean, "n": n, "confidence": confidence, "half_width": half,
        "low": None if half is None else mean - half, "high": None if half is None else mean + half,
    }


# ---------------------------------------------------------------- depth profiles
def log_growth(rms: list[float]) -> float:
    """ln(RMS_L / RMS_1): growth of the residual stream from the first block's output to the
    last block's. RMS_0, the embedding output, is left out: its scale is set by the embedding
    init (and DyT's √d scalar), not by depth."""
    return math.log(rms[-1] / rms[1])


def half_means(values: list[float]) -> tuple[float, float]:
    """Mean over the shallower ⌊L/2⌋ layers and mean over the deeper ⌊L/2⌋."""
    half = len(values) // 2
    return sum(values[:half]) / half, sum(values[-half:]) / half


def deep_minus_shallow(values: list[float]) -> float:
    """Mean over the deeper half of the layers minus mean over the shallower half."""
    shallow, deep = half_means(values)
    return deep - shallow
