"""What the search learns from: the Optuna searcher, its TPE sampler and the trial scheduler.

Tune's :class:`~ray.tune.search.optuna.OptunaSearch` tells Optuna that a trial the
scheduler stopped early is COMPLETE, with the value of the epoch it reached, so TPE
takes an epoch-3 score for a final one. :class:`StudySearch` tells Optuna what
happened instead: every epoch is an intermediate value at step = ``epoch``, a trial
stopped before its full budget is PRUNED, a failed one FAIL, and only a trial that
ran its full budget is COMPLETE, with its final value(s), or one the ΔE stopper
stopped, with the values of the epoch it kept (:mod:`study.stopper`). A study with constraints
(``--constraint``) gives every COMPLETE or PRUNED trial one value per constraint
(:meth:`optuna.trial.Trial.set_constraint`, the API of Optuna 5 that replaces the
sampler's deprecated ``constraints_func``), computed from the trial's last result (a
ΔE-stopped trial's: from its kept epoch); TPE then keeps violating trials apart from
the feasible ones.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    TrialScheduler,
)
from ray.tune.search.optuna import OptunaSearch

from reports.constraints import Constraint
from study.spec import SearchSpec, StudySpec

logger = logging.getLogger(__name__)

#: ``(config, metrics) -> bool``: whether a trial ran its full budget.
Finished = Callable[[dict[str, Any], dict[str, Any]], bool]
#: ``(config, per-epoch results) -> study.stopper.KeptResult | None``: the result the ΔE
#: stopper kept of a trial it stopped.
Kept = Callable[[dict[str, Any], list[dict[str, Any]]], Any]


class StudySearch(OptunaSearch):
    """Tune's OptunaSearch, telling Optuna which trials ran to the end.

    Args:
        finished: ``(config, metrics) -> bool``: whether a trial that reported
            ``metrics`` (its last result) with Tune config ``config`` ran its full
            budget (COMPLETE) rather than being stopped early (PRUNED); None: every
            trial without an error did (a search without a scheduler). It is saved
            with the searcher (``study resume``), so it must pickle: a bound method
            of a spec, not a lambda.
        constraints: the study's constraints (:mod:`reports.constraints`): each ended
            trial but a failed one gets their values from its last result, under the
            constraint's text (``val/clean_acc>=0.8``) as Optuna's key.
        kept: with the ΔE stopper on (:meth:`study.spec.StudySpec.kept_result`): the
            epoch a trial it stopped keeps as its result. Such a trial is COMPLETE with
            that epoch's values (and constraint values), its kept and stop epochs in the
            trial's user attributes; one with no eligible epoch before the fall is
            PRUNED. None: no stopper. It must pickle like ``finished``.
        **kwargs: the arguments of :class:`~ray.tune.search.optuna.OptunaSearch`.
    """

    def __init__(
        self,
        *,
        finished: Finished | None = None,
        constraints: Sequence[Constraint] = (),
        kept: Kept | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._finished = finished
        self._kept = kept
        # running trial -> its epochs' numbers (only with ``kept``: what the ΔE rule,
        # the kept epoch's selection, the objectives and the constraints read)
        self._rows: dict[str, dict[int, dict[str, float]]] = {}
        self._constraints = tuple(constraints)
        self._configs: dict[str, dict[str, Any]] = {}  # Tune trial id -> its config
        self._last_step: dict[str, int] = {}  # Tune trial id -> last epoch told to Optuna
        self._last: dict[str, dict[str, Any]] = {}  # running trial -> its last result's numbers

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        """The next config (Optuna asks TPE); kept for the trial's end."""
        config = super().suggest(trial_id)
        if config is not None:
            self._configs[trial_id] = config
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """One epoch's result: kept (its numbers) for the trial's end, and the objective
        told as an intermediate value at step ``epoch`` (see :meth:`_report`)."""
        if trial_id in self._completed_trials:
            return
        self._last[trial_id] = {k: v for k, v in result.items() if isinstance(v, int | float)}
        self._keep_row(trial_id, result)
        self._report(trial_id, result)

    def _keep_row(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keep the numbers of one epoch that a ΔE-stopped trial's end reads (``kept``)."""
        epoch = result.get("epoch")
        if getattr(self, "_kept", None) is None or not isinstance(epoch, int | float):
            return
        from study.stopper import DELTA_ENERGY

        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        wanted = {"epoch", "val/pgd_acc", DELTA_ENERGY, *metrics}
        wanted.update(c.metric for c in getattr(self, "_constraints", ()))
        row = {k: float(result[k]) for k in wanted if isinstance(result.get(k), int | float)}
        self._rows.setdefault(trial_id, {})[int(epoch)] = row

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Tell Optuna how the trial ended: FAIL, PRUNED or COMPLETE (see the class).

        The result a scheduler stops a trial on reaches the searcher here only (not
        through :meth:`on_trial_result`); a trial stopped while paused (HyperBand)
        comes without one, and its last result counts.
        """
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        result = result or self._last.get(trial_id) or {}
        if not error:
            self._keep_row(trial_id, result)
            self._report(trial_id, result)
        state, values = self._ending(trial_id, result, error)
        ran = result.get("epoch")
        kept = self._kept_of(trial_id, result) if state == TrialState.PRUNED else None
        if kept is not None:
            result = kept  # its constraints are the kept epoch's
            state, values = self._ending(trial_id, kept, error, kept=True)
        if isinstance(self.metric, list) and ran is not None:
            # no intermediate values with several objectives: the epochs it ran, told apart
            self._ot_trials[trial_id].set_user_attr("epochs_run", int(ran))
        if state != TrialState.FAIL:
            self._tell_constraints(trial_id, result)
        try:
            self._ot_study.tell(self._ot_trials[trial_id], values, state=state)
        except Exception as exc:  # e.g. a NaN value: Optuna refuses it; Tune goes on
            logger.warning("Optuna refused trial %s's end (%s): %s", trial_id, state.name, exc)
        self._completed_trials.add(trial_id)
        self._last.pop(trial_id, None)
        self._last_step.pop(trial_id, None)
        getattr(self, "_rows", {}).pop(trial_id, None)

    def _kept_of(self, trial_id: str, result: dict[str, Any]) -> dict[str, Any] | None:
        """The kept epoch's numbers of a trial the ΔE stopper stopped (None: it did not,
        or no epoch before the fall was eligible); the stop and kept epochs go into the
        Optuna trial's user attributes."""
        if getattr(self, "_kept", None) is None or trial_id not in self._rows:
            return None
        config = self._configs.get(trial_id) or result.get("config") or {}
        rows = [self._rows[trial_id][e] for e in sorted(self._rows[trial_id])]
        try:
            kept = self._kept(config, rows)
        except Exception as exc:  # noqa: BLE001 - told PRUNED as before; Tune goes on
            logger.warning("trial %s: its ΔE stop could not be read: %s", trial_id, exc)
            return None
        if kept is None:
            return None
        trial = self._ot_trials[trial_id]
        trial.set_user_attr("stop_epoch", kept.found.epoch)
        if kept.epoch is None:
            return None
        trial.set_user_attr("kept_epoch", kept.epoch)
        return dict(kept.metrics)

    def _tell_constraints(self, trial_id: str, result: dict[str, Any]) -> None:
        """Give the trial each constraint's value (:meth:`Constraint.violation` of its last
        result: ``<= 0`` feasible, ``inf`` when the metric is missing), before its end is
        told: Optuna keeps them in the trial's system attributes (``constraints:<text>``)."""
        for constraint in getattr(self, "_constraints", ()):  # a searcher pickled before them
            try:
                value = constraint.violation(result)
                self._ot_trials[trial_id].set_constraint(constraint.text, value)
            except Exception as exc:  # noqa: BLE001 - Tune goes on; the trial is told its end
                logger.warning("Optuna refused trial %s's constraint value: %s", trial_id, exc)

    def _report(self, trial_id: str, result: dict[str, Any]) -> None:
        """The objective as an intermediate value at step ``epoch``, once per epoch (a
        restored trial reports its last epoch again); single objective only: Optuna
        keeps no intermediate values for several; nothing for a trial it did not suggest
        (:func:`study.callbacks.align_search_state`)."""
        if isinstance(self.metric, list) or trial_id not in self._ot_trials:
            return  # not one it suggested: restored from an older search state
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None:  # a result without an epoch (study generate)
            return
        if int(epoch) > self._last_step.get(trial_id, 0):
            self._ot_trials[trial_id].report(float(value), int(epoch))
            self._last_step[trial_id] = int(epoch)

    def _ending(
        self, trial_id: str, result: dict[str, Any], error: bool, *, kept: bool = False
    ) -> tuple[TrialState, float | list[float] | None]:
        """The Optuna state of an ended trial and the values to tell with it (``kept``:
        ``result`` is the epoch the ΔE stopper kept, a complete result)."""
        if error:
            return TrialState.FAIL, None
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [result.get(m) for m in metrics]
        config = self._configs.get(trial_id) or result.get("config") or {}
        if any(v is None for v in values):
            return TrialState.PRUNED, None
        if not kept and self._finished is not None and not self._finished(config, result):
            return TrialState.PRUNED, None  # Optuna keeps its last intermediate value
        floats = [float(v) for v in values]
        return TrialState.COMPLETE, floats if len(floats) > 1 else floats[0]


def is_conditional(spec: SearchSpec) -> bool:
    """Whether some parameter of ``spec``'s space exists only for some values (``when:``)."""
    return any(p.when for p in spec.load_space().params)


def tpe_options(spec: SearchSpec) -> dict[str, Any]:
    """The keywords of the study's :class:`optuna.samplers.TPESampler`.

    ``multivariate`` + ``group`` when the space is conditional (TPE then models the
    parameters that occur together jointly, one group per branch); ``constant_liar``
    only when trials can run at once (``max_concurrent != 1``), so that trials still
    running count as bad ones and concurrent proposals spread out.
    """
    options: dict[str, Any] = {"seed": spec.seed, "constant_liar": spec.max_concurrent != 1}
    if is_conditional(spec):
        options.update(multivariate=True, group=True)
    return options


def make_sampler(spec: SearchSpec) -> optuna.samplers.TPESampler:
    """The study's TPE sampler (:func:`tpe_options`); Optuna's ExperimentalWarning for
    ``group`` is expected and silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(**tpe_options(spec))


class ResumableASHA(ASHAScheduler):
    """Ray's ASHA whose rungs survive ``study resume``: :meth:`resume_state` and
    :meth:`load_resume_state`, through :class:`study.callbacks.SchedulerState` (saved with
    Tune's experiment state).

    ASHA keys its rungs by trial id, which Tune keeps on restore, so the recorded values
    come back as they were; a restored trial that reports an epoch again is not recorded
    twice (Ray's own rule), and every later trial meets the cut-offs an uninterrupted
    study would have met.
    """

    def resume_state(self) -> dict[str, Any]:
        """The recorded values of every rung, per bracket, and the stop count (picklable)."""
        return {
            "kind": "asha",
            "rungs": [[(m, dict(rec)) for m, rec in b._rungs] for b in self._brackets],
            "num_stopped": self._num_stopped,
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`resume_state` returned (before the restored trials are added)."""
        for bracket, rungs in zip(self._brackets, state["rungs"], strict=False):
            saved = dict(rungs)
            for milestone, recorded in bracket._rungs:
                recorded.update(saved.get(milestone, {}))
        self._num_stopped = state["num_stopped"]


class ResumableMedian(MedianStoppingRule):
    """Ray's median stopping rule whose history survives ``study resume``.

    Ray keys its history by the Trial object, and a restore makes new ones, so
    :meth:`resume_state` keeps it by trial id (the epoch and the objective of every result) and
    :meth:`on_trial_add` hands it to the restored Trial of that id. A restored trial
    that reports an epoch again replaces its older results from that epoch on.
    """

    def resume_state(self) -> dict[str, Any]:
        """Each trial's (epoch, objective) history and the stopped trials' ids."""
        keys = (self._time_attr, self._metric)
        return {
            "kind": "median",
            "results": {
                _trial_id(t): [{k: r[k] for k in keys if k in r} for r in rs]
                for t, rs in self._results.items()
            },
            "stopped": [_trial_id(t) for t in self._stopped_trials],
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Keep the saved history until the restored trials are added (:meth:`on_trial_add`)."""
        self._saved = state
        for trial_id, results in state["results"].items():
            self._results[_SavedTrial(trial_id)] = list(results)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_add(tune_controller, trial)
        saved = getattr(self, "_saved", None)
        if not saved:
            return
        for key in [k for k in self._results if isinstance(k, _SavedTrial)]:
            if key.trial_id == trial.trial_id:
                self._results[trial] = self._results.pop(key) + self._results[trial]
        if trial.trial_id in saved["stopped"]:
            self._stopped_trials.add(trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        when = result.get(self._time_attr)
        if when is not None and self._metric in result and trial in self._results:
            kept = [r for r in self._results[trial] if r.get(self._time_attr, when) < when]
            if kept:  # an epoch reported again: its older results go
                self._results[trial] = kept
            else:
                del self._results[trial]
        return super().on_trial_result(tune_controller, trial, result)


class MultiObjectiveASHA(FIFOScheduler):
    """Asynchronous successive halving on several objectives at once (the idea of
    MO-ASHA, Schmucker et al. 2021): ASHA's rungs, where a trial reaching a rung is
    ranked against the trials recorded there by non-dominated sorting instead of by one
    score.

    At a rung at epoch ``m`` (``grace_period × reduction_factor^k`` below ``max_t``), the
    trial and the ``n − 1`` trials recorded there before it are sorted into Pareto
    fronts (front 0: dominated by none of them; front 1: by none but front 0's; …). The
    fronts are taken best first until they hold at least ``ceil(n / reduction_factor)``
    trials; a trial in a later front is dominated by that many and stops, every trial
    of the fronts taken goes on (no tie-break inside a front, so the rule depends on
    nothing but the scores). The first trial at a rung always goes on, and a trial is
    judged once per rung, when it first reaches it (Ray's ASHA rule). At ``max_t``
    the trial ends (STOP), as Ray's ASHA ends it. Its state survives ``study resume``
    (:meth:`resume_state`).

    Args:
        time_attr: the result field that counts time (``epoch``).
        metrics: the objectives, each a result field.
        modes: ``max`` or ``min`` per objective.
        max_t: the epochs of a full trial.
        grace_period: epochs every trial runs before it can be stopped (the first rung).
        reduction_factor: a rung keeps about the best 1/reduction_factor of its trials.
    """

    def __init__(
        self,
        *,
        time_attr: str,
        metrics: list[str],
        modes: list[str],
        max_t: int,
        grace_period: int,
        reduction_factor: float,
    ) -> None:
        super().__init__()
        if len(metrics) != len(modes) or not metrics:
            raise ValueError(f"one mode per objective: {metrics} / {modes}")
        self._time_attr = time_attr
        self._metrics = list(metrics)
        # Tune checks that every result holds the scheduler's ``metric`` (one name)
        self._metric, self._mode = metrics[0], modes[0]
        self._signs = [1.0 if m == "max" else -1.0 for m in modes]
        self._max_t = max_t
        self._rf = reduction_factor
        milestones, m = [], grace_period
        while m < max_t:
            milestones.append(m)
            m = int(m * reduction_factor)
        self._rungs: list[tuple[int, dict[str, tuple[float, ...]]]] = [(m, {}) for m in milestones]
        self._num_stopped = 0

    def set_search_properties(self, metric: Any, mode: Any, **spec: Any) -> bool:
        return True  # the objectives are the scheduler's own, whatever Tune's default

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if self._time_attr not in result or any(m not in result for m in self._metrics):
            return TrialScheduler.CONTINUE
        when = result[self._time_attr]
        if when >= self._max_t:
            return TrialScheduler.STOP
        scores = tuple(s * float(result[m]) for s, m in zip(self._signs, self._metrics))
        action = TrialScheduler.CONTINUE
        for milestone, recorded in reversed(self._rungs):
            if when < milestone or trial.trial_id in recorded:
                continue
            if recorded and not keeps(scores, list(recorded.values()), self._rf):
                action = TrialScheduler.STOP
                self._num_stopped += 1
            recorded[trial.trial_id] = scores
            break
        return action

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {m}: {len(r)}" for m, r in self._rungs)
        return f"MultiObjectiveASHA: {self._num_stopped} stopped; trials per rung {rungs}"

    def resume_state(self) -> dict[str, Any]:
        """Every rung's recorded scores by trial id, and the stop count (picklable)."""
        return {
            "kind": "mo-asha",
            "rungs": [(m, dict(r)) for m, r in self._rungs],
            "num_stopped": self._num_stopped,
        }

    def load_resume_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`resume_state` returned."""
        saved = dict(state["rungs"])
        for milestone, recorded in self._rungs:
            recorded.update(saved.get(milestone, {}))
        self._num_stopped = state["num_stopped"]


def pareto_fronts(points: list[tuple[float, ...]]) -> list[list[int]]:
    """Non-dominated sorting (Deb et al.'s fast sort, O(objectives × n²)): the indices of
    ``points`` (every objective to maximise) by front, best first; a point dominates
    another when it is at least as good on every objective and better on one."""
    n = len(points)
    beaten_by = [0] * n  # how many points dominate i
    beats: list[list[int]] = [[] for _ in range(n)]  # the points i dominates
    for i in range(n):
        a = points[i]
        for j in range(i + 1, n):
            b = points[j]
            ge = all(x >= y for x, y in zip(a, b))
            le = all(x <= y for x, y in zip(a, b))
            if ge and not le:
                beats[i].append(j)
                beaten_by[j] += 1
            elif le and not ge:
                beats[j].append(i)
                beaten_by[i] += 1
    fronts, front = [], [i for i in range(n) if beaten_by[i] == 0]
    while front:
        fronts.append(sorted(front))
        following = []
        for i in front:
            for j in beats[i]:
                beaten_by[j] -= 1
                if beaten_by[j] == 0:
                    following.append(j)
        front = following
    return fronts


def keeps(scores: tuple[float, ...], others: list[tuple[float, ...]], rf: float) -> bool:
    """Whether a trial with ``scores`` goes on at a rung where ``others`` were recorded:
    its front is among the best ones that together hold ``ceil(n / rf)`` of the n
    trials (:class:`MultiObjectiveASHA`). One pass when no other point dominates it
    (front 0 always goes on), else one non-dominated sort."""
    import math

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    if not any(dominates(other, scores) for other in others):
        return True
    points = [*others, scores]
    quota, taken = math.ceil(len(points) / rf), 0
    for front in pareto_fronts(points):
        if len(points) - 1 in front:
            return True
        taken += len(front)
        if taken >= quota:
            return False
    return True


class _SavedTrial:
    """Stands for a trial of a restored median history until Tune adds its Trial."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id


def _trial_id(trial: Any) -> str:
    return str(trial.trial_id)


def _asha(spec: StudySpec, common: dict[str, Any]) -> Any:
    if spec.multi_objective:
        return MultiObjectiveASHA(
            time_attr="epoch",
            metrics=list(spec.metrics),
            modes=list(spec.modes),
            max_t=spec.default_epochs,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    return ResumableASHA(
        **common,
        max_t=spec.default_epochs,
        grace_period=spec.grace_period,
        reduction_factor=spec.reduction_factor,
    )


def _hyperband(spec: StudySpec, common: dict[str, Any]) -> Any:
    return HyperBandScheduler(
        **common, max_t=spec.default_epochs, reduction_factor=spec.reduction_factor
    )


def _median(spec: StudySpec, common: dict[str, Any]) -> Any:
    return ResumableMedian(**common, grace_period=spec.grace_period)


#: scheduler name (``--scheduler``) -> builder ``(spec, common keywords) -> scheduler``;
#: :data:`study.spec.SCHEDULERS` lists these names and ``none``
SCHEDULER_BUILDERS: dict[str, Callable[[StudySpec, dict[str, Any]], Any]] = {
    "asha": _asha,
    "hyperband": _hyperband,
    "median": _median,
}


def make_scheduler(spec: StudySpec) -> Any:
    """The study's trial scheduler (:meth:`StudySpec.early_stopping`), or None.

    Every scheduler measures time in epochs (``time_attr="epoch"``: the loop's epoch
    counter survives a restored trial, Tune's ``training_iteration`` restarts at 1
    for a resumed TorchTrainer run) and acts on the study's first objective.
    """
    name = spec.early_stopping()
    if name == "none":
        return None
    common = {"time_attr": "epoch", "metric": spec.metrics[0], "mode": spec.modes[0]}
    return SCHEDULER_BUILDERS[name](spec, common)


def make_searcher(spec: SearchSpec, space: Any, storage: Any = None) -> StudySearch:
    """The study's searcher: :class:`StudySearch` with :func:`make_sampler`.

    Args:
        spec: the search (objectives, seed, concurrency, name, space).
        space: the compiled define-by-run space (:func:`search_spaces.compile_space`).
        storage: an Optuna storage (an RDB for optuna-dashboard) or None (in memory).
    """
    multi = spec.multi_objective
    finished = spec.ran_full_budget if isinstance(spec, StudySpec) else None
    constraints = spec.constraint_list if isinstance(spec, StudySpec) else []
    stopper = isinstance(spec, StudySpec) and spec.stop_on_energy_divergence
    return StudySearch(
        finished=finished,
        constraints=constraints,
        kept=spec.kept_result if stopper else None,
        space=space,
        metric=spec.metrics if multi else spec.metrics[0],
        mode=spec.modes if multi else spec.modes[0],
        sampler=make_sampler(spec),
        study_name=spec.name,
        storage=storage,
    )
