"""Constraints on a study's trials: ``--constraint "val/clean_acc>=0.80"``.

A constraint is a bound on one metric a trial reports. A trial that violates any of
its study's constraints is *infeasible*: Optuna's TPE keeps it apart from the
feasible ones (:meth:`optuna.trial.Trial.set_constraint`, one value per constraint,
feasible when ``<= 0``), and it is never "best" (``study export``, ``study show``,
the report: :mod:`reports.ranking`). Each trial's verdict is recorded on its MLflow
run (:data:`~reports.vocabulary.TAG_CONSTRAINT_OK`), so that everything reading a
study back needs MLflow only.

Plain data only (no MLflow, no Ray), so that ``study/`` and ``reports/`` both import it.

>>> c = parse_constraint("val/clean_acc>=0.8")
>>> c.metric, c.op, c.bound, c.violation({"val/clean_acc": 0.75}) > 0
('val/clean_acc', '>=', 0.8, True)
>>> c.satisfied({"val/clean_acc": 0.8})
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from trainables.errors import ConfigError

#: the comparison operators a constraint may use (two-character ones first: matched in order)
OPERATORS = (">=", "<=", ">", "<")
_FORM = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(>=|<=|>|<)\s*(\S+)\s*$")
#: the smallest positive float: the violation of a strict bound met with equality
_TINY = math.nextafter(0.0, 1.0)


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``: the trial's last value of ``metric`` must satisfy it.

    Attributes:
        metric: a metric the trials report (``val/clean_acc``).
        op: one of :data:`OPERATORS`.
        bound: the threshold, in the metric's units (accuracies are fractions: 0.80).
    """

    metric: str
    op: str
    bound: float

    @property
    def text(self) -> str:
        """The constraint as written in a spec: ``val/clean_acc>=0.8``."""
        return f"{self.metric}{self.op}{self.bound:g}"

    def violation(self, metrics: Mapping[str, Any]) -> float:
        """How far ``metrics`` miss the bound: ``<= 0`` when satisfied (Optuna's
        convention), else the gap (the smallest positive float for a strict bound met
        with equality); ``inf`` when the metric is missing or not a finite number.

        Args:
            metrics: a trial's metrics by name (its last result, or an MLflow run's).
        """
        try:
            value = float(metrics[self.metric])
        except (KeyError, TypeError, ValueError):
            return math.inf
        if not math.isfinite(value):
            return math.inf
        gap = self.bound - value if self.op in (">=", ">") else value - self.bound
        if gap == 0 and self.op in (">", "<"):
            return _TINY
        return gap

    def satisfied(self, metrics: Mapping[str, Any]) -> bool:
        """Whether ``metrics`` satisfy this constraint (a missing metric does not)."""
        return self.violation(metrics) <= 0


def parse_constraint(text: str) -> Constraint:
    """One constraint from its text, ``METRIC OP BOUND`` (spaces allowed around ``OP``).

    Args:
        text: e.g. ``"val/clean_acc>=0.80"``; ``OP`` is one of :data:`OPERATORS`.

    Raises:
        ConfigError: the text is not of that form, or the bound is not a finite number.
    """
    found = _FORM.match(str(text))
    if found is None:
        raise ConfigError(
            f"constraint {text!r}: write METRIC OP BOUND with OP one of "
            f"{', '.join(OPERATORS)}, e.g. 'val/clean_acc>=0.80'"
        )
    metric, op, raw = found.groups()
    try:
        bound = float(raw)
    except ValueError:
        bound = math.nan
    if not math.isfinite(bound):
        raise ConfigError(f"constraint {text!r}: the bound {raw!r} is not a finite number")
    return Constraint(metric, op, bound)


def parse_constraints(texts: Iterable[str] | None) -> list[Constraint]:
    """Every constraint of a spec (``None``: none); see :func:`parse_constraint`."""
    return [parse_constraint(t) for t in texts or ()]


def verdict(constraints: Iterable[Constraint], metrics: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether ``metrics`` satisfy every constraint, and a line saying how each fared
    (``val/clean_acc>=0.8: 0.7500 violated``); ``(True, "")`` without constraints."""
    ok, parts = True, []
    for c in constraints:
        good = c.satisfied(metrics)
        ok = ok and good
        value = metrics.get(c.metric)
        shown = f"{float(value):.4f}" if isinstance(value, int | float) else "missing"
        parts.append(f"{c.text}: {shown} {'met' if good else 'violated'}")
    return ok, "; ".join(parts)
