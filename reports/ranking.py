"""The one order of a study's trials: who is "best", with ties broken the same way everywhere.

``study export`` (which config is written), ``study show`` (the order it prints)
and the report (leaderboard order, best trial per method) all rank trials with
:func:`rank_runs`. The rules, each deciding only among trials tied on every rule
before it:

0. trials that meet the study's constraints (``--constraint``; see
   :mod:`reports.constraints`) before those that violate one: a trial whose
   :data:`~reports.vocabulary.TAG_CONSTRAINT_OK` tag is ``"false"`` (or, for a
   trial outcome, whose ``feasible`` is False) is never "best", and ``study
   export`` leaves it out altogether (:func:`is_feasible`);
1. the study's objectives, in the order the study lists them, each in its
   mode (``max``: larger first; ``min``: smaller first);
2. ``val/clean_acc``, larger first (skipped when it already is an objective);
3. the trial id, ascending: by its number where it ends with Tune's 5-digit
   index (``abc12_00003`` is trial 3; Tune's basic variant generator names
   trials so), else by its text. Trials of a study (Optuna searcher, Ray 2.60)
   have random 8-hex ids (``f72adc73``): their text order is arbitrary but
   fixed, the same in Tune's outcome and in MLflow, so the order is
   deterministic. Ids without an index come after those with one; last the
   MLflow run id, so that two runs are never tied.

A trial the ΔE stopper stopped is ranked by the epoch it kept (its ``kept/``
metrics, :func:`result_metrics`), not by the epoch of the fall.

A trial without a finite value of a rule's metric (missing, NaN) comes after
every trial that has one, for that rule. Values are compared exactly: two
accuracies of 13/16 = 0.8125 tie, and rule 2 decides.

>>> class T:
...     def __init__(self, trial_id, **metrics):
...         self.trial_id, self.metrics = trial_id, metrics
>>> a = T("x_00002", **{"val/pgd_acc": 0.8125, "val/clean_acc": 0.9})
>>> b = T("x_00001", **{"val/pgd_acc": 0.8125, "val/clean_acc": 0.9})
>>> [t.trial_id for t in rank_runs([a, b], ["val/pgd_acc"], ["max"])]
['x_00001', 'x_00002']

This module reads plain data only (no MLflow, no Ray) so that ``study/`` and
``reports/`` can both import it; ``reports/`` never imports ``study/``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from reports.vocabulary import KEPT_PREFIX, TAG_CONSTRAINT_OK, TAG_EARLY, TAG_TRIAL

#: The tie-break metric after the objectives (maximised).
TIE_METRIC = "val/clean_acc"
TIE_MODE = "max"
MODES = ("max", "min")

_INDEX = re.compile(r"_(\d{5})$")
R = TypeVar("R")


def ranking_rules(objectives: Sequence[str], modes: Sequence[str]) -> list[tuple[str, str]]:
    """The metric rules of the ranking: ``(metric, mode)`` pairs, most important first.

    Args:
        objectives: the study's objective metric names, in the study's order (the
            first decides; a later one only breaks ties of the earlier ones).
        modes: ``max`` or ``min`` for each objective.

    Returns:
        The objectives with their modes, then ``(val/clean_acc, max)`` unless it
        is an objective already.

    Raises:
        ValueError: lengths differ, or a mode is neither ``max`` nor ``min``.
    """
    if len(objectives) != len(modes):
        raise ValueError(f"{len(objectives)} objective(s) but {len(modes)} mode(s)")
    rules: list[tuple[str, str]] = []
    for metric, mode in zip(objectives, modes):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} of {metric!r}; allowed: max, min")
        if metric not in (m for m, _ in rules):
            rules.append((metric, mode))
    if TIE_METRIC not in (m for m, _ in rules):
        rules.append((TIE_METRIC, TIE_MODE))
    return rules


def trial_number(trial_id: str) -> int | None:
    """The index ending a Tune trial id (``"abc12_00003"`` → 3), else None."""
    found = _INDEX.search(trial_id or "")
    return int(found.group(1)) if found else None


def trial_order(trial_id: str, run_id: str = "") -> tuple[int, int, str, str]:
    """Sort key of the last rule: the id's trial number, else its text; then the run id."""
    number = trial_number(trial_id)
    return (0 if number is not None else 1, number or 0, trial_id or "", run_id or "")


def _value_key(value: Any, mode: str) -> tuple[int, float]:
    """``(0, ±value)`` for a finite value (smaller sorts first), ``(1, 0)`` when missing."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return (1, 0.0)
    if not math.isfinite(number):
        return (1, 0.0)
    return (0, -number if mode == "max" else number)


def rank_key(
    metrics: Mapping[str, Any],
    trial_id: str,
    rules: Sequence[tuple[str, str]],
    run_id: str = "",
    feasible: bool = True,
) -> tuple:
    """The sort key of one trial (ascending order = best first).

    Args:
        metrics: the trial's metric values by name (the last value of each).
        trial_id: its Tune trial id (``abc12_00003``), or any id.
        rules: ``(metric, mode)`` pairs from :func:`ranking_rules`.
        run_id: its MLflow run id (the very last tie-break), if known.
        feasible: whether it meets the study's constraints (rule 0: False sorts after True).
    """
    return (
        0 if feasible else 1,
        *(_value_key(metrics.get(m), mode) for m, mode in rules),
        trial_order(trial_id, run_id),
    )


def result_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's metrics as its result: ``metrics`` with each ``kept/<name>`` value
    (:data:`~reports.vocabulary.KEPT_PREFIX`: the epoch a ΔE-stopped trial keeps) in
    place of ``<name>``'s latest one; the ``kept/`` keys stay.

    >>> result_metrics({"val/pgd_acc": 0.2, "kept/val/pgd_acc": 0.4})["val/pgd_acc"]
    0.4
    """
    kept = {k[len(KEPT_PREFIX) :]: v for k, v in metrics.items() if k.startswith(KEPT_PREFIX)}
    return {**metrics, **kept} if kept else dict(metrics)


def run_metrics(run: Any) -> Mapping[str, Any]:
    """The metrics of an MLflow run (``run.data.metrics``) or of an object with
    ``.metrics``, as the trial's result (:func:`result_metrics`)."""
    data = getattr(run, "data", None)
    if data is not None and hasattr(data, "metrics"):
        return result_metrics(data.metrics)
    return result_metrics(getattr(run, "metrics", None) or {})


def is_result(run: Any) -> bool:
    """Whether a finished trial run stands for a trained configuration: it ran its full
    budget (not tagged :data:`~reports.vocabulary.TAG_EARLY` ``"true"``), or the ΔE
    stopper stopped it and kept an epoch before the fall (its ``kept/`` metrics); a
    trial a scheduler stopped early is not one."""
    if run_tags(run).get(TAG_EARLY, "false") != "true":
        return True
    data = getattr(run, "data", None)
    metrics = data.metrics if data is not None else getattr(run, "metrics", None) or {}
    return any(k.startswith(KEPT_PREFIX) for k in metrics)


def run_tags(run: Any) -> Mapping[str, str]:
    """The tags of an MLflow run (``run.data.tags``) or of an object with ``.tags``."""
    data = getattr(run, "data", None)
    if data is not None and hasattr(data, "tags"):
        return data.tags
    return getattr(run, "tags", None) or {}


def is_feasible(run: Any) -> bool:
    """Whether a trial meets its study's constraints: False only when its MLflow run is
    tagged :data:`~reports.vocabulary.TAG_CONSTRAINT_OK` ``"false"`` or the object's
    ``feasible`` attribute (``study.runner.TrialOutcome``) is False; a study without
    constraints has no such tag, and every trial of it is feasible."""
    tag = run_tags(run).get(TAG_CONSTRAINT_OK)
    if tag is not None:
        return str(tag).lower() != "false"
    return bool(getattr(run, "feasible", True))


def run_ids(run: Any) -> tuple[str, str]:
    """``(trial id, run id)`` of an MLflow run, a report's run or a Tune trial outcome.

    The trial id is the :data:`TAG_TRIAL` tag, else a ``trial_id`` attribute; the
    run id is ``run.info.run_id``, else a ``run_id`` attribute ("" when neither).
    """
    info = getattr(run, "info", None)
    run_id = str(getattr(info, "run_id", None) or getattr(run, "run_id", None) or "")
    trial_id = run_tags(run).get(TAG_TRIAL) or getattr(run, "trial_id", None) or ""
    return str(trial_id), run_id


def rank_runs(runs: Iterable[R], metrics: Sequence[str], modes: Sequence[str]) -> list[R]:
    """``runs`` best first by the rules of this module (see its docstring).

    Args:
        runs: MLflow runs (``mlflow.entities.Run``), report runs
            (``reports.data.RunData``) or anything with ``metrics`` and
            ``trial_id`` attributes (``study.runner.TrialOutcome``).
        metrics: the study's objective metric names, most important first.
        modes: ``max`` or ``min`` for each of ``metrics``.

    Returns:
        A new list; runs without the objectives are kept, after those with them.
    """
    rules = ranking_rules(metrics, modes)

    def key(run: R) -> tuple:
        trial_id, run_id = run_ids(run)
        return rank_key(run_metrics(run), trial_id, rules, run_id, is_feasible(run))

    return sorted(runs, key=key)
