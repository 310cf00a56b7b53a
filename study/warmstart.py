"""Warm start: a new study's Optuna search seeded with the finished trials of another study.

``study run --warm-start OTHER`` reads OTHER's trials from the MLflow store the new
study records into (the same ``--tracking-uri``): every trial run of OTHER that ran
its full budget (status FINISHED, not stopped early) and has a finite value of each
objective. MLflow, not OTHER's Optuna storage, because every study has its trials
there: a study has a persistent Optuna storage only when it was given
``--optuna-storage``; by default (the embedded study included) its Optuna study lives
in memory, inside Tune's searcher state. A run keeps the values its trial was
sampled with (params; a float's text gives the float back exactly) and its final
metrics (the last value, the one the searcher told Optuna).

Each such run becomes a COMPLETE trial of the new study's Optuna study
(:func:`optuna.trial.create_trial`, :meth:`optuna.study.Study.add_trials`) before its
first trial, with the new space's distributions, its objective value(s), the new
study's constraint values (from the run's metrics) and two user attributes naming
where it came from (:data:`SOURCE_ATTR`, :data:`TRIAL_ATTR`). TPE then starts from
them (they count towards its start-up trials). A run is skipped, and counted in the
printed summary with the reason, when it did not run its full budget, lacks an
objective, has a searched parameter the new space does not have (or has but not for
these values of the others), lacks one that the new space samples, or has a value
outside the new space's distribution (a float out of range, a choice no longer
offered). OTHER must have the same objectives (metrics and modes) as the new study.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from reports.ranking import is_result, run_metrics
from reports.vocabulary import (
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_STUDY,
    TAG_TRIAL,
    TAG_WARM_START,
    TAG_WARM_START_TRIALS,
)
from search_spaces import SearchSpace
from search_spaces.space import ParamSpec
from study.spec import StudySpec
from trainables.errors import UserError

#: user attribute of a seeded Optuna trial: the study it came from
SOURCE_ATTR = "warm_start_from"
#: user attribute of a seeded Optuna trial: its trial id in that study
TRIAL_ATTR = "warm_start_trial"

# why a run of the other study is not seeded (the printed summary counts each)
NOT_COMPLETE = (
    "did not run their full budget (stopped early without a kept ΔE result, failed or unfinished)"
)
NO_OBJECTIVE = "lack a finite value of the objective"
NOT_IN_SPACE = "have a parameter the new space does not search (for these values)"
MISSING = "lack a parameter the new space searches"
OUTSIDE = "have a value outside the new space's distributions"


class Skip(Exception):
    """A run that cannot seed the new study: ``reason`` (one of this module's reasons)
    and ``detail`` (the parameter and value at fault)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class WarmStart:
    """The trials that seed a new study, and what was left out.

    Attributes:
        source: the other study's name.
        trials: the COMPLETE trials to add to the new Optuna study, in the order the
            other study's runs started.
        skipped: reason -> the skipped runs' descriptions (``trial id`` or ``trial id
            (param = value)``).
    """

    source: str
    trials: list[FrozenTrial]
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        """The tags of the new study's parent run: the source study and the trials seeded."""
        return {TAG_WARM_START: self.source, TAG_WARM_START_TRIALS: str(len(self.trials))}

    def summary(self) -> str:
        """One line: how many trials were seeded, and how many were skipped and why."""
        total = len(self.trials) + sum(len(v) for v in self.skipped.values())
        text = f"warm start from study {self.source}: {len(self.trials)} of its {total} trials"
        text += " seed the search"
        if self.skipped:
            parts = []
            for reason, runs in self.skipped.items():
                example = next((r for r in runs if "(" in r), runs[0])
                parts.append(f"{len(runs)} {reason}, e.g. {example}")
            text += "; skipped: " + "; ".join(parts)
        return text


def load_warm_start(spec: StudySpec) -> WarmStart:
    """The finished trials of study ``spec.warm_start`` that fit ``spec``'s space, read
    from the MLflow store at ``spec.tracking_uri`` (see the module's docstring).

    Raises:
        UserError: the store has no such study (nothing is created looking for it),
            its objectives differ from ``spec``'s, or none of its trials fits.
    """
    from study.export import study_objectives, trial_runs
    from study.tracking import MlflowTracker

    source = str(spec.warm_start)
    _check_recorded(spec, source)
    tracker = MlflowTracker(spec.tracking_uri, source)  # the experiment exists: nothing made
    metrics, modes = study_objectives(tracker, source)
    if (metrics, modes) != (list(spec.metrics), list(spec.modes)):
        raise UserError(
            f"--warm-start {source}: that study's objectives are "
            f"{_objectives(metrics, modes)}, this one's {_objectives(spec.metrics, spec.modes)};"
            " a warm start needs the same objectives"
        )
    space = spec.load_space()
    old_names = _logged_space_names(tracker, source)
    runs = sorted(trial_runs(tracker, source), key=lambda r: r.info.start_time or 0)
    warm = WarmStart(source, [])
    for run in runs:
        trial_id = run.data.tags.get(TAG_TRIAL, run.info.run_id)
        try:
            warm.trials.append(seed_trial(spec, space, run, old_names, source))
        except Skip as skip:
            label = f"{trial_id} ({skip.detail})" if skip.detail else trial_id
            warm.skipped.setdefault(skip.reason, []).append(label)
    if not warm.trials:
        raise UserError(f"--warm-start {source}: no trial of it can seed this study: " + (
            warm.summary().split("; skipped: ", 1)[-1] if warm.skipped else "it has none"
        ))  # fmt: skip
    return warm


def seed_trial(
    spec: StudySpec,
    space: SearchSpace,
    run: Any,
    old_names: set[str] | None,
    source: str,
) -> FrozenTrial:
    """The COMPLETE Optuna trial that an MLflow trial run of another study gives ``spec``.

    Args:
        spec: the new study (objectives, constraints).
        space: its search space.
        run: the other study's trial run (``mlflow.entities.Run``).
        old_names: the parameters the other study's space searched (None: unknown, then
            only the new space's parameters are read from the run).
        source: the other study's name (recorded on the trial).

    Raises:
        Skip: the run cannot seed the new study (the reason says why).
    """
    data = run.data
    if run.info.status != "FINISHED" or not is_result(run):
        raise Skip(NOT_COMPLETE)
    metrics = run_metrics(run)  # a ΔE-stopped trial: the epoch it kept
    values = [metrics.get(m, math.nan) for m in spec.metrics]
    if not all(math.isfinite(v) for v in values):
        raise Skip(NO_OBJECTIVE)
    searched = [k for k in data.tags.get(TAG_SEARCHED, "").split(",") if k]
    known = old_names if old_names is not None else set(space.names)
    sampled = {k: data.params[k] for k in searched if k in known and k in data.params}
    params, distributions = fit_params(space, sampled)
    constraints = {c.text: c.violation(metrics) for c in spec.constraint_list}
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        values=values,
        params=params,
        distributions=distributions,
        user_attrs={SOURCE_ATTR: source, TRIAL_ATTR: data.tags.get(TAG_TRIAL, "")},
        constraints=constraints or None,
    )


def fit_params(
    space: SearchSpace, sampled: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, optuna.distributions.BaseDistribution]]:
    """The values of another study's trial as the new ``space`` samples them.

    Args:
        space: the new study's space.
        sampled: the trial's searched parameters and their values (MLflow's text, or
            Python values).

    Returns:
        ``(params, distributions)`` for :func:`optuna.trial.create_trial`: the new space's
        active parameters (conditional ones only when their condition holds), each
        value converted to its parameter's type.

    Raises:
        Skip: a parameter of ``sampled`` that the new space does not search for these
            values, one it searches that ``sampled`` lacks, or a value outside its
            distribution.
    """
    params: dict[str, Any] = {}
    distributions: dict[str, optuna.distributions.BaseDistribution] = {}
    active: dict[str, Any] = {}  # what `ParamSpec.active` sees, as DefineByRun builds it
    for p in space.params:
        if not p.active(active):
            continue
        if p.type == "fixed":
            active[p.name] = p.value
            continue
        if p.name not in sampled:
            raise Skip(MISSING, p.name)
        value = convert(p, sampled[p.name])
        active[p.name] = params[p.name] = value
        distributions[p.name] = p.distribution()  # type: ignore[assignment]
    constants = {p.name for p in space.params if p.type == "fixed"}
    extra = sorted(set(sampled) - set(params) - constants)
    if extra:
        raise Skip(NOT_IN_SPACE, ", ".join(f"{k} = {sampled[k]}" for k in extra))
    return params, distributions


def convert(param: ParamSpec, raw: Any) -> Any:
    """``raw`` (a value, or MLflow's text of it) as a value of ``param``'s distribution.

    Raises:
        Skip: it is not one (:data:`OUTSIDE`).
    """
    outside = Skip(OUTSIDE, f"{param.name} = {raw}")
    if param.type == "categorical":
        for choice in param.choices:
            if choice == raw or str(choice) == str(raw):
                return choice
        raise outside
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise outside from None
    low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
    if not (math.isfinite(number) and low <= number <= high):
        raise outside
    if param.step:
        steps = (number - low) / float(param.step)
        if not math.isclose(steps, round(steps), abs_tol=1e-8):
            raise outside
    if param.type == "int":
        if not number.is_integer():
            raise outside
        return int(number)
    return number


def add_seeds(study: optuna.Study, seeds: Sequence[FrozenTrial]) -> int:
    """Add a warm start's trials to a new search's Optuna study; returns how many. A study
    that holds seeded trials already (an RDB storage, a study started again before Tune
    saved anything) gets none again."""
    if any(SOURCE_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False)):
        return 0
    study.add_trials(list(seeds))
    return len(seeds)


def _check_recorded(spec: StudySpec, source: str) -> None:
    """Fail, creating nothing, unless the MLflow store holds trial runs of ``source``."""
    from study.credentials import redact
    from study.tracking import recorded_study

    found, known = recorded_study(spec.tracking_uri, source)
    if not found:
        raise UserError(
            f"--warm-start {source}: no study {source!r} with trials in the MLflow store "
            f"{redact(spec.tracking_uri)} (--tracking-uri); studies there: "
            f"{', '.join(known) or 'none'}"
        )


def _logged_space_names(tracker: Any, source: str) -> set[str] | None:
    """The parameters of the space file the other study's parent run logged (None: none)."""
    import tempfile

    from reports.data import space_params
    from reports.vocabulary import ROLE_STUDY

    parents = tracker.find_runs(**{TAG_STUDY: source, TAG_ROLE: ROLE_STUDY})
    if not parents:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return space_params(tracker.client, parents[-1].info.run_id, Path(tmp))


def _objectives(metrics: Sequence[str], modes: Sequence[str]) -> str:
    return ", ".join(f"{m} ({o})" for m, o in zip(metrics, modes))
