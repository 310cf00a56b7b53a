"""Accuracies with their sample size and 95 % Wilson interval, read from a run's metrics.

An accuracy ``<ns>/<name>_acc`` (``val/pgd_acc``, ``test/aa_acc``,
``final/robust_acc`` …) was measured on ``<ns>/n`` points. Trials log its
interval bounds as ``<metric>_ci_low`` / ``<metric>_ci_high``
(:mod:`trainables.stats`); when a store has the ``n`` but not the bounds (or
the bounds but not the ``n``) the missing part is recomputed or left out here.
Stores written before ``test/n`` existed have ``test/aa_n`` for the AutoAttack
accuracy only; it is used for ``test/aa_acc`` when ``test/n`` is missing.

Used by ``study show`` and by the report; no MLflow or Ray calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from trainables.stats import HIGH_SUFFIX, LOW_SUFFIX, wilson_interval

#: Accuracies shown first, in this order, within a namespace; the rest follow sorted.
ORDER = ("clean_acc", "pgd_acc", "aa_acc", "robust_acc")
#: Old stores: the sample size of ``test/aa_acc`` before ``test/n`` existed.
LEGACY_N = {"test/aa_acc": "test/aa_n"}


@dataclass(frozen=True)
class Measured:
    """An accuracy and what is known of its uncertainty.

    Attributes:
        key: the metric name (``val/pgd_acc``).
        value: the accuracy, a fraction in [0, 1].
        n: the number of points it was measured on (None when not logged).
        low: lower bound of its 95 % Wilson interval (None when neither the
            bounds nor ``n`` were logged); high likewise.
    """

    key: str
    value: float
    n: int | None
    low: float | None
    high: float | None

    @property
    def has_interval(self) -> bool:
        """Whether both interval bounds are known."""
        return self.low is not None and self.high is not None

    def bracket(self, digits: int = 3) -> str:
        """``[0.710, 0.787]`` (empty when the interval is unknown)."""
        if not self.has_interval:
            return ""
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def text(self, digits: int = 4, ci_digits: int = 3, with_n: bool = False) -> str:
        """``0.7500 [0.710, 0.787]`` (plus `` n=512`` with ``with_n`` when known)."""
        out = f"{self.value:.{digits}f}"
        if self.has_interval:
            out += " " + self.bracket(ci_digits)
        if with_n and self.n is not None:
            out += f" n={self.n}"
        return out


def _finite(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def sample_size(metrics: Mapping[str, float], key: str) -> int | None:
    """The number of points ``key`` was measured on: ``<ns>/n`` (``test/aa_n`` for old stores).

    Args:
        metrics: a run's metrics by name.
        key: an accuracy's metric name, ``<namespace>/<name>``.
    """
    namespace = key.split("/", 1)[0]
    for candidate in (f"{namespace}/n", LEGACY_N.get(key)):
        if candidate is None:
            continue
        n = _finite(metrics, candidate)
        if n is not None and n > 0:
            return int(round(n))
    return None


def measured(metrics: Mapping[str, float], key: str) -> Measured | None:
    """``key``'s value with its ``n`` and 95 % Wilson interval, or None when it has no value.

    A metric that is not an accuracy (:func:`is_accuracy`) gets neither ``n`` nor bounds.

    The bounds the run logged (``<key>_ci_low`` / ``<key>_ci_high``) are used when
    both are there; else they are computed from the value and ``n``; else unknown.
    """
    value = _finite(metrics, key)
    if value is None:
        return None
    if not is_accuracy(key):  # a loss, an energy: no binomial interval
        return Measured(key, value, None, None, None)
    n = sample_size(metrics, key)
    low, high = _finite(metrics, key + LOW_SUFFIX), _finite(metrics, key + HIGH_SUFFIX)
    if low is None or high is None:
        low, high = wilson_interval(value, n) if n is not None else (None, None)
    return Measured(key, value, n, low, high)


def is_accuracy(key: str) -> bool:
    """Whether ``key`` names an accuracy (``<ns>/<name>_acc``), not one of its bounds."""
    return "/" in key and key.endswith("_acc")


def _order(key: str) -> tuple[int, str]:
    name = key.split("/", 1)[1]
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


def accuracies(metrics: Mapping[str, float], namespace: str) -> list[Measured]:
    """Every accuracy ``<namespace>/*_acc`` of a run, clean, PGD, AutoAttack, robust first."""
    keys = [k for k in metrics if k.startswith(namespace + "/") and is_accuracy(k)]
    found = [measured(metrics, k) for k in sorted(keys, key=_order)]
    return [m for m in found if m is not None]


def group_interval(
    values: list[float], ns: list[int | None], single: Measured | None = None
) -> tuple[int | None, float | None, float | None]:
    """``(n, low, high)`` for the mean accuracy of a group of trials.

    The trials of a group (seeds of one configuration) are scored on the same
    points, so averaging them does not shrink the test-set part of the
    uncertainty: the interval is the Wilson interval of the mean accuracy on
    ``n`` points, ``n`` the smallest of the trials' (conservative when they
    differ). One trial with logged bounds keeps them.

    Args:
        values: the trials' accuracies (fractions).
        ns: each trial's number of points (None when unknown).
        single: the one trial's :class:`Measured`, when the group has one trial.
    """
    if not values:
        return None, None, None
    known = [n for n in ns if n is not None]
    n = min(known) if known and len(known) == len(ns) else None
    if single is not None and single.has_interval:
        return single.n, single.low, single.high
    if n is None:
        return None, None, None
    low, high = wilson_interval(sum(values) / len(values), n)
    return n, low, high
