"""The ΔE stopper: stop a trial when its training-probe energy gap falls steeply.

The paper (Sec. 3.2, Fig. 3) sees robust overfitting as a steep fall of the energy
gap ΔE(x) = E(x) − E(x*) on training points. The loop reports that gap every epoch
as ``train_probe/delta_energy`` (the mean over ``probe_n`` fixed training points,
:func:`trainables.loop.probe_metrics`). :func:`divergence_at` is the rule, a pure
function of a trial's ΔE history up to an epoch:

* the window of epoch ``t`` is the ``window`` epochs before it, ``t − window`` …
  ``t − 1`` (those the history has); its peak ``M`` is the largest ΔE in it, at
  epoch ``p`` (the latest such epoch);
* the fall is ``M − ΔE_t`` and the relative fall ``(M − ΔE_t) / |M|`` (infinite for
  a fall from exactly 0);
* the rule holds at ``t`` when ``t ≥ min_epoch`` (never before epoch 2: one epoch
  has nothing to fall from), the relative fall is at least ``threshold`` and the
  fall itself at least ``min_drop`` (energy units): while natural and adversarial
  energies are still comparable (the paper's first two phases) ΔE wanders around 0,
  where any wobble is a large fraction of the peak.

The onset (:func:`divergence_onset`) is the first epoch where the rule holds; the
stopper (:class:`EnergyDivergenceStopper`) stops the trial on that epoch's result,
so replaying the rule on a finished run's history gives exactly the epoch where it
would have fired. The trial's result is the checkpoint of the best epoch before the
fall: the ``best.pt`` that the loop had written when epoch ``p`` ended (its
selection rule, the highest ``val/pgd_acc`` from ``select_from`` on, over epochs
``≤ p``), never one from the fall itself (:func:`energy_stop`).

A ΔE-stopped trial's result is its kept epoch (:func:`kept_result`, the same
replay on the epochs Tune recorded): Optuna is told COMPLETE with that epoch's
objective values (:class:`study.search.StudySearch`); its run is tagged
``energy_study.early_stopped = true`` with the stop (:func:`stop_tags`), logs the kept
epoch's metrics again under ``kept/`` (what ranking reads for it,
:func:`reports.ranking.result_metrics`), and after the search its kept ``best.pt`` is
tested like a finished trial's (:func:`study.finals.evaluate_kept`). A stopped trial
with no eligible epoch before the fall keeps nothing and is PRUNED.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.stopper import Stopper

from reports.vocabulary import TAG_KEPT_EPOCH, TAG_STOP_EPOCH, TAG_STOP_REASON
from trainables.errors import ConfigError

#: the per-epoch metric the rule watches
DELTA_ENERGY = "train_probe/delta_energy"
#: the reason recorded on a ΔE-stopped trial's run (:data:`TAG_STOP_REASON`)
REASON = "energy_divergence"
#: the earliest epoch the rule may hold at (an epoch needs one before it to fall from)
FIRST_EPOCH = 2


@dataclass(frozen=True)
class DivergenceRule:
    """The parameters of the ΔE rule (see the module).

    Attributes:
        window: how many epochs before the current one the peak is taken over (epochs).
        threshold: the least relative fall ``(M − ΔE_t) / |M|`` that stops (a fraction:
            0.25 = a fall of a quarter of the peak's magnitude).
        min_epoch: the first epoch (from 1) at which the rule may hold; at least 2.
        min_drop: the least fall ``M − ΔE_t`` that stops, in energy units (the units of
            E(x), logits); 0: the relative fall alone decides.
    """

    window: int = 5
    threshold: float = 0.25
    min_epoch: int = 5
    min_drop: float = 0.1

    def check(self) -> None:
        """Refuse bad parameters (a ConfigError naming the value and what is allowed)."""
        if self.window < 1:
            raise ConfigError(f"divergence_window = {self.window}; must be >= 1 epoch")
        if not (self.threshold > 0 and math.isfinite(self.threshold)):
            raise ConfigError(
                f"divergence_threshold = {self.threshold}; must be a relative fall > 0 "
                "(0.25: a quarter of the window's peak)"
            )
        if not (self.min_drop >= 0 and math.isfinite(self.min_drop)):
            raise ConfigError(
                f"divergence_min_drop = {self.min_drop}; must be a fall >= 0 in energy units"
            )
        if self.min_epoch < FIRST_EPOCH:
            raise ConfigError(
                f"divergence_min_epoch = {self.min_epoch}; must be >= {FIRST_EPOCH} (the first "
                "epoch has no earlier ΔE to fall from)"
            )


@dataclass(frozen=True)
class Divergence:
    """Where the rule held.

    Attributes:
        epoch: the epoch whose ΔE fell (the stop epoch).
        peak_epoch: the epoch of the window's peak ``M`` (the last epoch before the fall).
        peak: ``M``, the window's largest ΔE.
        value: ΔE at ``epoch``.
        fall: the relative fall ``(M − ΔE) / |M|``.
    """

    epoch: int
    peak_epoch: int
    peak: float
    value: float
    fall: float


def divergence_at(
    history: Mapping[int, float], epoch: int, rule: DivergenceRule
) -> Divergence | None:
    """The rule at ``epoch`` of a ΔE history: a :class:`Divergence` when it holds, else None.

    Args:
        history: ΔE by epoch (from 1); epochs after ``epoch`` are not looked at.
        epoch: the epoch judged (it must be in ``history``).
        rule: the window, threshold and first epoch.
    """
    if epoch < max(rule.min_epoch, FIRST_EPOCH) or epoch not in history:
        return None
    window = [(history[e], e) for e in range(epoch - rule.window, epoch) if e in history]
    if not window:
        return None
    peak, peak_epoch = max(window)  # ties: the later epoch
    value = float(history[epoch])
    drop = peak - value
    if not (math.isfinite(drop) and drop > 0) or drop < rule.min_drop:
        return None
    fall = drop / abs(peak) if peak != 0 else math.inf
    if fall < rule.threshold:
        return None
    return Divergence(epoch, peak_epoch, float(peak), value, fall)


def divergence_onset(history: Mapping[int, float], rule: DivergenceRule) -> Divergence | None:
    """The first epoch at which the rule holds (where the stopper fires), or None."""
    for epoch in sorted(history):
        found = divergence_at(history, epoch, rule)
        if found is not None:
            return found
    return None


def history_from_rows(rows: list[Mapping[str, Any]]) -> dict[int, float]:
    """ΔE by epoch from per-epoch metric rows (``metrics.jsonl``'s lines; a row
    without ΔE or epoch is skipped; an epoch told twice keeps its last value)."""
    out: dict[int, float] = {}
    for row in rows:
        epoch, value = row.get("epoch"), row.get(DELTA_ENERGY)
        if isinstance(epoch, int | float) and isinstance(value, int | float):
            out[int(epoch)] = float(value)
    return out


def kept_epoch(
    rows: Mapping[int, Mapping[str, Any]], peak_epoch: int, select_from: int, epochs: int
) -> int | None:
    """The epoch of the ``best.pt`` the loop had written when epoch ``peak_epoch`` ended:
    the highest ``val/pgd_acc`` from epoch ``min(select_from, epochs)`` on, the first
    one on ties (the rule of :meth:`trainables.loop._Progress.record`); None when no
    epoch up to the peak was eligible (or the run has no validation set: then only the
    last epoch, never reached before a fall, is).

    Args:
        rows: each epoch's metrics by epoch (from 1).
        peak_epoch: the last epoch looked at (the peak before the ΔE fall).
        select_from: the run's ``select_from`` (first epoch eligible for ``best.pt``).
        epochs: the run's epochs (its budget).
    """
    best, best_score = None, -math.inf
    first = min(select_from, epochs)
    for epoch in sorted(e for e in rows if e <= peak_epoch):
        score = rows[epoch].get("val/pgd_acc")
        if isinstance(score, int | float) and epoch >= first and score > best_score:
            best, best_score = epoch, float(score)
    return best


@dataclass(frozen=True)
class KeptResult:
    """The result of a trial the ΔE rule stopped: its kept epoch and that epoch's metrics.

    Attributes:
        found: where the rule held.
        epoch: the kept epoch (:func:`kept_epoch`), None when none was eligible (the
            trial then has no result).
        metrics: the kept epoch's per-epoch metrics (empty with ``epoch`` None).
    """

    found: Divergence
    epoch: int | None
    metrics: Mapping[str, float]


def kept_result(
    rule: DivergenceRule | None,
    rows: list[Mapping[str, Any]],
    select_from: int,
    epochs: int,
) -> KeptResult | None:
    """Whether the ΔE rule stopped a trial with per-epoch results ``rows`` (it holds
    somewhere in their ΔE history: the stopper would have stopped it there), and the
    epoch and metrics kept as its result; None when it did not (or ``rule`` is None).

    Args:
        rule: the study's rule (:func:`rule_of`).
        rows: the trial's per-epoch results (dicts with ``epoch``), any order.
        select_from: the trial's ``select_from``.
        epochs: the trial's epochs.
    """
    if rule is None:
        return None
    found = divergence_onset(history_from_rows(rows), rule)
    if found is None:
        return None
    by_epoch: dict[int, dict[str, float]] = {}
    for row in rows:
        epoch = row.get("epoch")
        if isinstance(epoch, int | float):
            numbers = {k: float(v) for k, v in row.items() if isinstance(v, int | float)}
            by_epoch.setdefault(int(epoch), {}).update(numbers)
    kept = kept_epoch(by_epoch, found.peak_epoch, select_from, epochs)
    return KeptResult(found, kept, by_epoch.get(kept, {}) if kept is not None else {})


def read_metrics_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (unreadable lines skipped; none for no file)."""
    return _json_rows(path.read_text()) if path.is_file() else []


def _json_rows(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a ``metrics.jsonl`` text (other lines skipped)."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class EnergyDivergenceStopper(Stopper, Callback):
    """Ray Tune stopper of :func:`divergence_at`: stops a trial on the result of the
    epoch where the rule first holds.

    It keeps each trial's ΔE by epoch (a restored trial that reports an epoch again
    overwrites it). It is also a Tune callback only so that this history is saved with
    Tune's experiment state (:meth:`get_state`) and comes back on ``study resume``: the
    study passes the same object as ``RunConfig.stop`` and among its callbacks, and
    both come back as one object from the saved Tuner. It composes with the study's
    scheduler: Tune asks the stopper first and the scheduler only when it lets the
    trial go on.

    Args:
        rule: the window, threshold and first epoch.
    """

    def __init__(self, rule: DivergenceRule) -> None:
        self.rule = rule
        self.history: dict[str, dict[int, float]] = {}
        self.stopped: dict[str, Divergence] = {}

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        epoch, value = result.get("epoch"), result.get(DELTA_ENERGY)
        if not isinstance(epoch, int | float) or not isinstance(value, int | float):
            return False
        epoch = int(epoch)
        history = self.history.setdefault(str(trial_id), {})
        history[epoch] = float(value)
        # the first onset up to this epoch: a history that came back shorter than the
        # trial's (restored past its onset) still stops it, as the replay at its end
        # (:func:`energy_stop`) reads it
        found = divergence_onset({e: v for e, v in history.items() if e <= epoch}, self.rule)
        if found is not None:
            self.stopped[str(trial_id)] = found
        return found is not None

    def stop_all(self) -> bool:
        return False

    def get_state(self) -> dict[str, Any]:
        """Each trial's ΔE history (plain data, saved with Tune's experiment state)."""
        return {"history": {t: dict(h) for t, h in self.history.items()}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`get_state` returned (``study resume``)."""
        for trial_id, history in (state.get("history") or {}).items():
            self.history.setdefault(trial_id, {}).update(history)


def rule_of(spec: Any) -> DivergenceRule | None:
    """The study's ΔE rule, or None when ``--stop-on-energy-divergence`` is off (or the
    spec is not a training study's)."""
    if not getattr(spec, "stop_on_energy_divergence", False):
        return None
    return DivergenceRule(
        spec.divergence_window,
        spec.divergence_threshold,
        spec.divergence_min_epoch,
        spec.divergence_min_drop,
    )


def make_stopper(spec: Any) -> EnergyDivergenceStopper | None:
    """The study's stopper (:func:`rule_of`), or None."""
    rule = rule_of(spec)
    return None if rule is None else EnergyDivergenceStopper(rule)


def checkpoints_to_keep(spec: Any, default: int = 2) -> int:
    """How many checkpoints of a trial Ray keeps: ``default``, or with the stopper on
    enough that the checkpoint of the window's peak is still there when it fires
    (``window + 1``: the stop epoch's and the ``window`` before it)."""
    rule = rule_of(spec)
    if rule is None:
        return default
    from study.trial import uses_train_backend

    # Train's workers do not wait for Tune's decision: one more epoch may be saved
    # before the trial is stopped
    extra = 2 if uses_train_backend(spec) else 1
    return max(default, rule.window + extra)


def stop_tags(found: Divergence, kept_epoch: int | None) -> dict[str, str]:
    """The tags of a ΔE-stopped trial's run: the stop epoch, the reason (with the peak
    and the fall) and the kept checkpoint's epoch (empty: no epoch before the fall was
    eligible for ``best.pt``)."""
    reason = (
        f"{REASON}: ΔE {found.value:.4g} at epoch {found.epoch} fell {found.fall:.3g} of its "
        f"peak {found.peak:.4g} at epoch {found.peak_epoch}"
    )
    return {
        TAG_STOP_EPOCH: str(found.epoch),
        TAG_STOP_REASON: reason,
        TAG_KEPT_EPOCH: "" if kept_epoch is None else str(kept_epoch),
    }


@dataclass
class EnergyStop:
    """A trial the ΔE rule stopped, as its run records it.

    Attributes:
        found: where the rule held (its ``epoch`` is the stop epoch).
        kept_epoch: the epoch of the kept ``best.pt`` (None: no epoch up to the peak was
            eligible for selection, so the run gets no ``best.pt``).
        best: the kept ``best.pt``, copied to a local file (None with ``kept_epoch``
            None, or when it could not be read: ``error`` says why).
        error: why the kept checkpoint is missing, for the run's artifact-error tag.
    """

    found: Divergence
    kept_epoch: int | None = None
    best: Path | None = None
    error: str | None = None


def energy_stop(spec: Any, trial_id: str, folder: Path, into: Path) -> EnergyStop | None:
    """Whether the ΔE rule stopped a trial that ended early, and its kept ``best.pt``.

    Stateless: the rule is replayed on the trial's ΔE history from its last
    checkpoint's ``metrics.jsonl``; it stopped the trial when its onset is that
    history's last epoch (Tune asks the stopper before the scheduler, so a trial
    the rule and ASHA would both stop on the same epoch was stopped by the rule).
    The kept ``best.pt`` is the one in the trial's stored checkpoint of the peak's
    epoch (:func:`checkpoints_to_keep` keeps it), copied into ``into``.

    Args:
        spec: the study (its rule, storage and name).
        trial_id: the Tune trial id.
        folder: the trial's last checkpoint as a local folder.
        into: a local folder for the copy of the kept ``best.pt``.
    """
    from trainables.files import METRICS_LOG

    rule = rule_of(spec)
    if rule is None:
        return None
    history = history_from_rows(read_metrics_log(folder / METRICS_LOG))
    found = divergence_onset(history, rule)  # a trial that did not run its budget and
    if found is None:  # holds an onset was stopped by it (Tune asks the stopper first)
        return None
    try:
        best = _kept_best(spec, trial_id, found.peak_epoch, into)
    except FileNotFoundError as exc:
        return EnergyStop(found, error=str(exc))
    if best is None:
        return EnergyStop(found)
    from trainables.checkpoint import load_checkpoint

    return EnergyStop(found, int(load_checkpoint(best)["epoch"]), best)


def _kept_best(spec: Any, trial_id: str, epoch: int, into: Path) -> Path | None:
    """Copy ``checkpoints/best.pt`` of the trial's stored checkpoint whose run had ended
    epoch ``epoch`` (its ``metrics.jsonl`` ends there) into ``into``; None when that
    checkpoint has no ``best.pt`` (no eligible epoch yet).

    Raises:
        FileNotFoundError: the study's storage holds no checkpoint of that epoch.
    """
    from pyarrow.fs import FileType

    from study.trial import stored_checkpoint_folders
    from trainables.files import BEST_CHECKPOINT, METRICS_LOG

    fs, places = stored_checkpoint_folders(spec, trial_id)
    for path in (folder for kept in places for folder in kept):
        log = f"{path}/{METRICS_LOG}"
        if fs.get_file_info(log).type != FileType.File:
            continue
        with fs.open_input_stream(log) as stream:
            rows = history_from_rows(_json_rows(stream.read().decode()))
        if not rows or max(rows) != epoch:
            continue
        best = f"{path}/{BEST_CHECKPOINT}"
        if fs.get_file_info(best).type != FileType.File:
            return None
        target = into / f"kept-{Path(BEST_CHECKPOINT).name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(best) as stream:
            target.write_bytes(stream.read())
        return target
    raise FileNotFoundError(
        f"no stored checkpoint of trial {trial_id} at epoch {epoch} (the peak before the "
        f"ΔE fall) in {spec.location()}"
    )
