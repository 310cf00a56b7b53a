"""Uncertainty of accuracies measured on a finite set of points.

An accuracy measured on ``n`` points is a binomial proportion; its 95 % Wilson
score interval (Wilson, 1927) stays inside [0, 1] and behaves at 0 and 1, where
the normal approximation does not. Every accuracy the loop logs on a subset
comes with its ``n`` and this interval, under the metric's name plus
:data:`LOW_SUFFIX` / :data:`HIGH_SUFFIX`:

>>> lo, hi = wilson_interval(0.5, 100)
>>> round(lo, 4), round(hi, 4)
(0.4038, 0.5962)
>>> with_intervals({"val/pgd_acc": 0.75}, n=512, keys=["val/pgd_acc"])["val/pgd_acc_ci_high"] < 0.79
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

#: z of a two-sided 95 % interval.
Z95 = 1.959963984540054
LOW_SUFFIX = "_ci_low"
HIGH_SUFFIX = "_ci_high"


def wilson_interval(p: float, n: int | float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion.

    Args:
        p: the observed proportion (an accuracy in [0, 1]).
        n: the number of points it was measured on (``0`` gives ``(0, 1)``).
        z: the normal quantile of the interval (1.96 for 95 %).

    Returns:
        ``(low, high)``, both in [0, 1].
    """
    n = float(n)
    if n <= 0 or not math.isfinite(p):
        return 0.0, 1.0
    p = min(max(p, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def with_intervals(
    metrics: Mapping[str, float], *, n: int, keys: Iterable[str]
) -> dict[str, float]:
    """``metrics`` plus the 95 % Wilson bounds of each accuracy in ``keys``.

    Args:
        metrics: metric name to value; keys absent from it are skipped.
        n: the number of points every accuracy in ``keys`` was measured on.
        keys: the accuracies to bound.
    """
    out = dict(metrics)
    for key in keys:
        if key in metrics:
            lo, hi = wilson_interval(float(metrics[key]), n)
            out[key + LOW_SUFFIX] = lo
            out[key + HIGH_SUFFIX] = hi
    return out


def interval_text(p: float, n: int | float, digits: int = 3) -> str:
    """``0.750 [0.710, 0.787] n=512``: a value with its 95 % Wilson interval."""
    lo, hi = wilson_interval(p, n)
    return f"{p:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}] n={int(n)}"
