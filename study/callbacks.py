"""Driver-side Tune callbacks: the MLflow writer and the console progress.

Both run in the driver process, so the SQLite store has exactly one writer (the
MLflow callback's background thread) no matter how many trials run at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import yaml
from ray.tune import Callback

from reports.constraints import verdict
from reports.vocabulary import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    CONFIG_FILE,
    ENERGIES_FILE,
    ENERGY_HIST,
    FINAL_FILE,
    GENERATION_DIR,
    GENERATION_FILES,
    KEPT_PREFIX,
    LAST_CHECKPOINT,
    METRICS_LOG,
    PARENT_TAG,
    ROLE_TRIAL,
    TAG_ARTIFACT_ERROR,
    TAG_CONSTRAINT_OK,
    TAG_CONSTRAINTS,
    TAG_EARLY,
    TAG_FAILURE,
    TAG_METHOD,
    TAG_METRICS_ERROR,
    TAG_PROCESS,
    TAG_RESUMED,
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_STUDY,
    TAG_TRIAL,
)
from study.credentials import redact
from study.spec import StudySpec
from study.stopper import energy_stop, read_metrics_log
from study.stopper import stop_tags as energy_stop_tags
from study.tracking import BackgroundWriter, LostWrites, MlflowTracker, flatten
from study.trial import checkpoint_files, trial_checkpoint
from study.ui import energy_histogram, searched_values, trial_run_name
from trainables.files import FINISHED_RUN_FILES, STOPPED_RUN_FILES

#: Result keys that are ours (the loop's namespaced metrics), as opposed to Tune's.
PLAIN_METRICS = {"lr", "epoch", "best_epoch"}
#: A finished trial's files logged into its run: (path in its checkpoint, artifact folder).
TRIAL_ARTIFACTS = (
    (BEST_CHECKPOINT, CHECKPOINT_DIR),
    (LAST_CHECKPOINT, CHECKPOINT_DIR),
    (ENERGIES_FILE, None),
    (METRICS_LOG, None),
    (CONFIG_FILE, None),
    (FINAL_FILE, None),
    (ENERGY_HIST, None),  # drawn on the worker (else here, from energies.npz)
    # a study over training and generation: what the trial sampled after training
    *((f"{GENERATION_DIR}/{name}", GENERATION_DIR) for name in GENERATION_FILES),
)
#: Metric points (and params, tags) a trial's run lacks because their ``log_batch`` still
#: failed after the writer's retries: :meth:`study.tracking.LostWrites.describe`.
#: (Declared here until it joins its neighbour in ``reports/vocabulary.py``.)
#: Per study name, the spec and parent run of the MLflow callback this process made last:
#: what a callback unpickled by ``Tuner.restore`` takes (``MlflowCallback.__setstate__``).
_CURRENT: dict[str, tuple[StudySpec, str]] = {}
#: Tries of one artifact upload (MLflow's own retries are inside each), and the first
#: wait between two, seconds (doubling).
UPLOAD_ATTEMPTS = 3
UPLOAD_WAIT_S = 0.5


def our_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The loop's metrics in a Tune result (``train/…``, ``val/…``, ``test/…``, ``lr`` …)."""
    return {
        k: float(v)
        for k, v in result.items()
        if ("/" in k or k in PLAIN_METRICS)
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    }


def constraint_tags(spec: StudySpec, last: dict[str, Any]) -> dict[str, str]:
    """The tags of an ended trial's run saying whether it met the study's constraints
    (:data:`TAG_CONSTRAINT_OK` ``true``/``false``) and how it fared on each
    (:data:`TAG_CONSTRAINTS`); none for a study without constraints.

    Args:
        spec: the study.
        last: the trial's result (the values the constraints are judged on, the same
            that Optuna is given: :class:`study.search.StudySearch`): its last result,
            or the metrics of a ΔE-stopped trial's kept epoch.
    """
    constraints = spec.constraint_list
    if not constraints:
        return {}
    ok, text = verdict(constraints, last)
    return {TAG_CONSTRAINT_OK: str(ok).lower(), TAG_CONSTRAINTS: text}


def kept_metrics(log: Path, epoch: int) -> dict[str, float]:
    """The metrics of epoch ``epoch`` in a trial's ``metrics.jsonl`` (its last row for
    that epoch), without ``test/*`` (a checkpoint's test comes after the search: the
    kept one is tested by :func:`study.finals.evaluate_kept`); empty when the log lacks
    the epoch.

    Args:
        log: the ``metrics.jsonl`` of the trial's last checkpoint.
        epoch: the kept epoch (from 1).
    """
    rows = [r for r in read_metrics_log(log) if r.get("epoch") == epoch]
    if not rows:
        return {}
    return {k: v for k, v in our_metrics(rows[-1]).items() if not k.startswith("test/")}


def trial_error_text(trial: Any) -> str:
    """The last lines of a failed trial's error (what to tell the user)."""
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "Exception" in line or "diverged" in line:
            return line.strip()[:1000]
    return (lines[-1] if lines else "unknown error")[:1000]


class MlflowCallback(Callback):
    """Logs every trial as a child run of the study's parent run.

    Every MLflow write happens in one background thread (:class:`BackgroundWriter`),
    in the order the Tune events came: the hooks only queue work, so a slow or remote
    tracking server never holds up the Tune loop; a trial's epochs go out as batched
    ``log_batch`` calls (a new run's params wait for its first metrics and go out with
    them and its process tags); the queue is emptied (nothing lost) when the experiment
    ends. A finished trial's files are read from its last checkpoint in the study's
    storage (:func:`study.trial.trial_checkpoint`), never from a node's disk, and
    uploaded in one call (file by file only when that fails); its energy histogram is
    the one the worker drew into the checkpoint (drawn here only for a checkpoint that
    lacks it). A file it must have and lacks, or whose upload fails, is tagged
    :data:`TAG_ARTIFACT_ERROR` on its run, metric points whose batch still failed after
    the writer's retries :data:`TAG_METRICS_ERROR` (epochs that its checkpoint's
    ``metrics.jsonl`` holds are filled in from there instead); both printed as warnings.
    A callback unpickled by ``Tuner.restore`` (``study resume``) writes to the tracking
    URI of the resuming driver (:meth:`__setstate__`).

    Args:
        spec: the study spec as plain data.
        parent_run_id: the study's parent MLflow run.
    """

    #: False: every write in the Tune loop's thread (the synchronous baseline of
    #: bench/ and of the measurement in tests; same writes, same order).
    BACKGROUND = True

    def __init__(self, spec: StudySpec, parent_run_id: str) -> None:
        self.spec = spec
        self.parent_run_id = parent_run_id
        _CURRENT[spec.name] = (spec, parent_run_id)
        self._tracker: MlflowTracker | None = None
        self._runs: dict[str, str] = {}
        # last epoch logged per trial: a trial resumed from an older checkpoint
        # repeats epochs the store already holds, and those are not logged twice
        self._logged: dict[str, int] = {}
        # per run: the epochs sent to the store (or found there), so that the end of a
        # trial knows which epochs of its checkpoint the run lacks without asking it
        self._epochs: dict[str, set[int]] = {}
        self._config_logged: set[str] = set()  # runs given config.yaml by this process
        self._lost_tagged: dict[str, str] = {}  # run → the TAG_METRICS_ERROR value it got
        self._complete: set[str] = set()
        self._process: dict[str, str] = {}
        # the study's trial runs in the store when this driver first needed one, by
        # trial id (newest first): one search instead of one per trial, whose cost grew
        # with the runs already in the store
        self._stored: dict[str, Any] | None = None
        self.writer = BackgroundWriter(background=self.BACKGROUND)
        self.hook_s = 0.0  #: driver seconds spent in this callback's Tune hooks
        self.results = 0  #: trial results seen

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "parent_run_id": self.parent_run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled from Tune's saved Tuner (``study resume``): the spec and parent run of
        the resuming driver win over those saved with the study, when that driver made
        a callback for the same study first (:func:`study.runner.study_tuner` does, before
        ``Tuner.restore``): its tracking URI (``--tracking-uri``: the server moved), its
        storage and address are the ones in force now."""
        saved = StudySpec(**state["spec"])
        spec, parent = _CURRENT.get(saved.name, (saved, state["parent_run_id"]))
        if spec.tracking_uri != saved.tracking_uri:
            print(
                f"study {spec.name} resumes with the MLflow tracking URI "
                f"{redact(spec.tracking_uri)} (it ran with {redact(saved.tracking_uri)} "
                "before): its trial runs are written there",
                file=sys.stderr,
                flush=True,
            )
        self.__init__(spec, parent)  # type: ignore[misc]

    @property
    def tracker(self) -> MlflowTracker:
        if self._tracker is None:
            self._tracker = MlflowTracker(self.spec.tracking_uri, self.spec.name)
        return self._tracker

    # --- Tune hooks (driver thread): queue the work, return at once ----------------------
    def _queue(self, what: str, fn: Any, *, metrics_only: bool = False) -> None:
        t0 = time.perf_counter()
        self.writer.submit(what, fn, metrics_only=metrics_only)
        self.hook_s += time.perf_counter() - t0

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        self._queue(f"open the run of trial {trial_id}", partial(self.run_id, trial_id, config))

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.results += 1
        trial_id, config = trial.trial_id, dict(trial.config)
        log = partial(self._log_result, trial_id, config, dict(result))
        self._queue(f"a result of trial {trial_id}", log, metrics_only=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id, config = trial.trial_id, dict(trial.config)
        last = dict(trial.last_result or {})
        end = partial(self._finish, trial_id, config, trial.checkpoint, last)
        self._queue(f"the end of trial {trial_id}", end)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        trial_id, config, reason = trial.trial_id, dict(trial.config), trial_error_text(trial)
        self._queue(
            f"the failure of trial {trial_id}", partial(self._fail, trial_id, config, reason)
        )

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Write everything still queued, then end the writer thread; a run that lost
        metric points and was not tagged for it at its end (its trial had not ended) is
        tagged now."""
        self.writer.close()
        for run_id, lost in self.writer.lost.items():
            if lost and self._lost_tagged.get(run_id) != lost.describe():
                try:
                    self.tracker.set_tags(run_id, self._lost_tags(run_id))
                except Exception as exc:  # noqa: BLE001 - the store refuses: said, not raised
                    print(
                        f"warning: could not tag MLflow run {run_id} with what it lost: "
                        f"{redact(str(exc))}",
                        file=sys.stderr,
                        flush=True,
                    )
        _CURRENT.pop(self.spec.name, None)  # a later restore in this process finds no stale spec
        if self.writer.errors:
            print(
                f"warning: {len(self.writer.errors)} MLflow write(s) of study {self.spec.name} "
                "failed (printed above)",
                file=sys.stderr,
                flush=True,
            )

    def _lost_tags(self, run_id: str) -> dict[str, str]:
        """``{TAG_METRICS_ERROR: what the run lost}`` when its batched writes failed for
        good, else nothing; the value is printed as a warning and remembered."""
        lost = self.writer.lost.get(run_id) or LostWrites()
        if not lost:
            return {}
        text = lost.describe()
        if self._lost_tagged.get(run_id) != text:
            print(f"warning: MLflow run {run_id} lacks {text}", file=sys.stderr, flush=True)
        self._lost_tagged[run_id] = text
        return {TAG_METRICS_ERROR: text}

    # --- the writer thread: MLflow calls -------------------------------------------------
    def run_id(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run (found again after a resume, never duplicated).

        Args:
            trial_id: Tune's trial id.
            config: the trial's Tune config (what Optuna sampled + constants).
        """
        if trial_id in self._runs:
            return self._runs[trial_id]
        key_tags = {TAG_STUDY: self.spec.name, TAG_TRIAL: trial_id}
        stored = self._stored_run(trial_id)
        if stored is not None:  # as it is now (the ended-trials pass reopens runs)
            stored = self.tracker.get_run(stored.info.run_id)
        if stored and stored.info.status == "FINISHED" and "test/clean_acc" in stored.data.metrics:
            # complete before the driver was killed; Tune's snapshot missed it:
            # the run stays as it is (the trial only reports its stored result)
            self._complete.add(trial_id)
            self._runs[trial_id] = stored.info.run_id
            return stored.info.run_id
        if stored is not None:  # a resumed study: the run goes on
            run_id = stored.info.run_id
            self.tracker.reopen_run(run_id)
            full = flatten(self.spec.trial_config(config).to_dict())
            if lacking := {k: v for k, v in full.items() if k not in stored.data.params}:
                # its driver was killed before they (or some of their batches) went out
                self.writer.buffer(self.tracker, run_id, [], params=lacking)
            history = self.tracker.client.get_metric_history(run_id, "epoch")
            self._epochs[run_id] = {int(m.step) for m in history}
            self._logged[trial_id] = max(self._epochs[run_id], default=0)
            self._runs[trial_id] = run_id
            return run_id
        cfg = self.spec.trial_config(config)
        full = cfg.to_dict()
        # what the trial tried; its id stays in the TAG_TRIAL tag
        name = self.run_name(cfg.method, config)
        tags = {
            **self.run_tags(trial_id, config),
            **key_tags,
            TAG_SEARCHED: ",".join(sorted(config)),
            TAG_METHOD: cfg.method,
        }
        run_id = self.tracker.create_run(name, tags)
        self._runs[trial_id] = run_id
        self._epochs[run_id] = set()
        # the params go with the run's first metrics, in one log_batch; a trial that
        # samples after training has its sampler's too (generation.*)
        params = flatten(full)
        if (sampler := self.spec.template.sampler(config)) is not None:
            params |= flatten({"generation": sampler})
        self.writer.buffer(self.tracker, run_id, [], params=params)
        self.tracker.log_text(run_id, yaml.safe_dump(full, sort_keys=False), CONFIG_FILE)
        self._config_logged.add(run_id)
        return run_id

    def run_name(self, method: str, config: dict[str, Any]) -> str:
        """A new trial run's name: its method and searched values (:func:`trial_run_name`).

        Args:
            method: the trial's training method.
            config: the trial's Tune config.
        """
        return trial_run_name(method, searched_values(self.spec.load_space(), config))

    def run_tags(self, trial_id: str, config: dict[str, Any]) -> dict[str, str]:
        """The role and nesting of a new trial run: a child of the study's parent run with
        role :data:`ROLE_TRIAL` (``study replicate`` nests its runs elsewhere).

        Args:
            trial_id: Tune's trial id.
            config: the trial's Tune config.
        """
        return {PARENT_TAG: self.parent_run_id, TAG_ROLE: ROLE_TRIAL}

    def _stored_run(self, trial_id: str) -> Any:
        """The newest run of this study's trial ``trial_id`` that the store held when this
        driver first asked (a resumed study's), or None; its id is what counts (the
        snapshot's status and data may be older: :meth:`run_id` reads the run again).
        Runs made since are in ``_runs``: this driver is the study's only writer."""
        if self._stored is None:
            self._stored = {}
            for run in self.tracker.find_runs(**{TAG_STUDY: self.spec.name}):  # newest first
                tid = run.data.tags.get(TAG_TRIAL)
                if tid is not None and tid not in self._stored:
                    self._stored[tid] = run
        return self._stored.get(trial_id)

    def _log_result(self, trial_id: str, config: dict[str, Any], result: dict[str, Any]) -> None:
        metrics = our_metrics(result)
        step = int(metrics.get("epoch", result.get("training_iteration", 0)))
        run_id = self.run_id(trial_id, config)
        if trial_id in self._complete:
            return
        process = f"{result.get('hostname', '?')}:{result.get('pid', '?')}"
        tags: dict[str, str] = {}
        if self._process.get(trial_id) != process:
            # where the trial runs now (it changes when a failed trial is restarted)
            self._process[trial_id] = process
            tags[TAG_PROCESS] = process
            since = result.get("iterations_since_restore")
            if isinstance(since, int) and step - since > 0:
                # this process continued the trial from its checkpoint of that epoch
                tags[TAG_RESUMED] = str(step - since)
        logged = self._logged.get(trial_id, 0)
        if step <= logged:  # an epoch the store already holds (resumed from an older checkpoint)
            if not any(k.startswith("test/") for k in metrics):
                metrics = {}
            metrics = {k: v for k, v in metrics.items() if k.startswith(("test/", "best"))}
        elif "epoch" in metrics:
            self._epochs.setdefault(run_id, set()).add(step)
        points = [(k, v, step) for k, v in metrics.items()]
        if points or tags:  # with the run's other waiting points: one log_batch
            self.writer.buffer(self.tracker, run_id, points, tags=tags)
        self._logged[trial_id] = max(step, logged)

    def _finish(
        self, trial_id: str, config: dict[str, Any], checkpoint: Any, last: dict[str, Any]
    ) -> None:
        run_id = self.run_id(trial_id, config)
        if trial_id in self._complete:
            return
        done = self.spec.ran_full_budget(config, last)
        stop_tags: dict[str, str] = {}
        kept: dict[str, Any] = {}
        missing = self._upload_files(run_id, trial_id, checkpoint, last, done, stop_tags, kept)
        # a ΔE-stopped trial's result is its kept epoch: its constraints are judged there,
        # as Optuna is told (study.search.StudySearch)
        judged = kept or last
        tags = {TAG_EARLY: str(not done).lower(), **constraint_tags(self.spec, judged), **stop_tags}
        if missing:
            tags[TAG_ARTIFACT_ERROR] = "; ".join(f"{k}: {v}" for k, v in missing.items())
            print(
                f"warning: trial {trial_id}: its MLflow run lacks {tags[TAG_ARTIFACT_ERROR]}",
                file=sys.stderr,
                flush=True,
            )
        self.tracker.set_tags(run_id, {**tags, **self._lost_tags(run_id)})
        self.tracker.end_run(run_id, "FINISHED")

    def _upload_files(
        self,
        run_id: str,
        trial_id: str,
        checkpoint: Any,
        last: dict[str, Any],
        done: bool,
        stop_tags: dict[str, str] | None = None,
        kept_row: dict[str, Any] | None = None,
    ) -> dict[str, str]:
        """Log the files of the trial's last checkpoint (in storage) into its run;
        returns ``{file: reason}`` for each file it must have and could not log.

        A trial the ΔE stopper stopped (:func:`study.stopper.energy_stop`) gets the
        ``best.pt`` of its epoch before the fall instead of its last checkpoint's, its
        stop tags go into ``stop_tags``, and the metrics of its kept epoch (its result)
        into ``kept_row``."""
        required = FINISHED_RUN_FILES if done else STOPPED_RUN_FILES
        missing: dict[str, str] = {}
        try:
            stored = trial_checkpoint(self.spec.storage, checkpoint, last)
            if stored is None:
                return {"checkpoint": "the trial reported none"}
            with (
                checkpoint_files(stored) as folder,
                tempfile.TemporaryDirectory(prefix="energy-study-upload-") as tmp,
                tempfile.TemporaryDirectory(prefix="energy-study-kept-") as kept,
            ):
                self._backfill_epochs(run_id, folder / METRICS_LOG)
                try:
                    stopped = None if done else energy_stop(self.spec, trial_id, folder, Path(kept))
                except Exception as exc:  # noqa: BLE001 - its other files still go up
                    stopped = None
                    missing[BEST_CHECKPOINT] = f"the ΔE stop could not be read: {exc}"
                    print(f"warning: trial {trial_id}: {missing[BEST_CHECKPOINT]}",
                          file=sys.stderr, flush=True)  # fmt: skip
                if stopped is not None and stop_tags is not None:
                    stop_tags.update(energy_stop_tags(stopped.found, stopped.kept_epoch))
                row: dict[str, float] = {}
                if stopped is not None and stopped.kept_epoch is not None:
                    row = kept_metrics(folder / METRICS_LOG, stopped.kept_epoch)
                    if kept_row is not None:
                        kept_row.update(row)
                if stopped is not None and stopped.error:
                    missing[BEST_CHECKPOINT] = stopped.error
                staged: list[tuple[str, str | None]] = []
                for rel, artifact_dir in TRIAL_ARTIFACTS:
                    if rel == CONFIG_FILE and run_id in self._config_logged:
                        continue  # logged when the run was made
                    path, into = folder / rel, Path(tmp, artifact_dir or "", Path(rel).name)
                    if rel == BEST_CHECKPOINT and stopped is not None:
                        if stopped.best is None:
                            continue  # never a best.pt from the fall itself
                        path = stopped.best
                    if rel == ENERGY_HIST and not path.is_file():
                        # a checkpoint from before the worker drew it: drawn here
                        into.parent.mkdir(parents=True, exist_ok=True)
                        if energy_histogram(folder / ENERGIES_FILE, into, f"trial {trial_id}"):
                            staged.append((rel, artifact_dir))
                        continue
                    if not path.is_file():
                        if rel in required:
                            missing[rel] = "not in the trial's checkpoint"
                        continue
                    _stage(path, into)
                    staged.append((rel, artifact_dir))
                missing.update(_upload_all(self.tracker, run_id, Path(tmp), staged))
                kept_up = stopped is not None and stopped.best is not None
                if row and kept_up and BEST_CHECKPOINT not in missing:
                    # the kept epoch stands for the trial (kept/*) only with its best.pt
                    try:
                        self._log_kept(run_id, row, stopped.kept_epoch)
                    except Exception as exc:  # noqa: BLE001 - recorded on the run
                        missing["kept"] = f"the kept epoch's metrics could not be logged: {exc}"
        except Exception as exc:  # noqa: BLE001 - recorded on the run, the study goes on
            missing["checkpoint"] = f"could not be read from storage: {exc}"
        return missing

    def _log_kept(self, run_id: str, metrics: dict[str, float], epoch: int) -> None:
        """Log the kept epoch of a ΔE-stopped trial as its result: that epoch's metrics
        again under ``kept/`` (:data:`~reports.vocabulary.KEPT_PREFIX`), with
        ``best_epoch`` and ``best/val_pgd_acc`` as a finished trial has them, all at
        step ``epoch``. Called once the kept ``best.pt`` is in the run: a run with
        ``kept/`` metrics has the checkpoint that stands for it
        (:func:`reports.ranking.is_result`).

        Args:
            run_id: the trial's MLflow run.
            metrics: the kept epoch's metrics (:func:`kept_metrics`).
            epoch: the kept epoch (from 1).
        """
        points = [(KEPT_PREFIX + k, float(v), epoch) for k, v in metrics.items()]
        points.append(("best_epoch", float(epoch), epoch))
        if "val/pgd_acc" in metrics:
            points.append(("best/val_pgd_acc", float(metrics["val/pgd_acc"]), epoch))
        self.tracker.log_points(run_id, points)

    def _backfill_epochs(self, run_id: str, log: Path) -> list[int]:
        """Log the epochs of the trial's ``metrics.jsonl`` (from its checkpoint in storage)
        that its run lacks, in one ``log_batch``; returns them. A driver killed while its
        writer still held an epoch's metrics lost them, and the resumed trial went on from
        its checkpoint past that epoch; a batch the writer could not send lost them too
        (those points are then no longer :attr:`BackgroundWriter.lost`). The writer sends
        every earlier point before this runs, so an epoch the store lacks here is one that
        was lost, never one still on its way. Which epochs the run holds is known without
        asking the store when this callback made or found the run.

        Args:
            run_id: the trial's MLflow run.
            log: the ``metrics.jsonl`` of the trial's last checkpoint (one JSON object per
                epoch, with its ``epoch``).
        """
        if not log.is_file():
            return []
        lost = self.writer.lost.get(run_id) or LostWrites()
        if run_id in self._epochs:
            stored = self._epochs[run_id] - {step for key, step in lost.points if key == "epoch"}
        else:
            history = self.tracker.client.get_metric_history(run_id, "epoch")
            stored = {int(m.step) for m in history}
        points: list[tuple[str, float, int]] = []
        added: list[int] = []
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            epoch = int(row.get("epoch", 0))
            if epoch < 1 or epoch in stored:
                continue
            metrics = {k: v for k, v in our_metrics(row).items() if not k.startswith("test/")}
            points += [(k, v, epoch) for k, v in {**metrics, "epoch": float(epoch)}.items()]
            stored.add(epoch)
            added.append(epoch)
        self.tracker.log_points(run_id, points)
        lost.points -= {(key, step) for key, _, step in points}
        self._epochs[run_id] = stored
        return added

    def _fail(self, trial_id: str, config: dict[str, Any], reason: str) -> None:
        run_id = self.run_id(trial_id, config)
        self.tracker.set_tags(run_id, {TAG_FAILURE: reason, **self._lost_tags(run_id)})
        self.tracker.end_run(run_id, "FAILED")


def _upload(tracker: MlflowTracker, run_id: str, path: Path, artifact_dir: str | None) -> str:
    """Log one file, tried :data:`UPLOAD_ATTEMPTS` times; returns the last error ('' if
    it went through)."""
    error = ""
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            tracker.log_artifact(run_id, path, artifact_dir)
            return ""
        except Exception as exc:  # noqa: BLE001 - the caller records it
            error = f"{type(exc).__name__}: {str(exc)[:300]}"
            if attempt + 1 < UPLOAD_ATTEMPTS:
                time.sleep(UPLOAD_WAIT_S * 2**attempt)
    return error


def _stage(path: Path, into: Path) -> None:
    """Put the file ``path`` at ``into`` for an upload: a hard link where the file system
    allows, else a copy (the checkpoint's own files are never moved or changed)."""
    into.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(path, into)
    except OSError:
        shutil.copy2(path, into)


#: most files of one trial uploaded at once to a tracking server (one PUT each)
UPLOAD_THREADS = 4


def _upload_all(
    tracker: MlflowTracker, run_id: str, folder: Path, files: list[tuple[str, str | None]]
) -> dict[str, str]:
    """Log the files staged in ``folder`` (in their artifact layout) into the run.

    On a tracking server (an ``http(s)://`` URI) every file is one request, and MLflow's
    ``log_artifacts`` sends them one after another; they go up to
    :data:`UPLOAD_THREADS` at once instead, each with :func:`_upload`'s retries. A local
    store copies them in one ``log_artifacts`` call; if that fails, file by file, so that
    each file that still fails is named. Returns ``{file: reason}`` for those.

    Args:
        tracker: the study's tracker.
        run_id: the trial's run.
        folder: the staging folder: each file at ``<artifact folder>/<name>``.
        files: ``(file in the checkpoint, artifact folder or None)`` of each staged file.
    """
    if not files:
        return {}

    def one(item: tuple[str, str | None]) -> str:
        rel, artifact_dir = item
        return _upload(
            tracker, run_id, Path(folder, artifact_dir or "", Path(rel).name), artifact_dir
        )

    if tracker.tracking_uri.startswith(("http://", "https://")) and len(files) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(UPLOAD_THREADS, len(files))) as pool:
            errors = list(pool.map(one, files))
    else:
        try:
            tracker.log_artifact(run_id, folder)
            return {}
        except Exception:  # noqa: BLE001 - tried again file by file, each error recorded
            pass
        errors = [one(item) for item in files]
    return {rel: f"upload failed: {e}" for (rel, _), e in zip(files, errors, strict=True) if e}


class ProgressCallback(Callback):
    """One console line per trial epoch and per finished trial."""

    def __init__(self, metrics: list[str], trials: int, stream: TextIO | None = None) -> None:
        self.metrics = metrics
        self.trials = trials
        self.stream = stream
        self.t0 = time.time()
        self._done = 0

    def __getstate__(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "trials": self.trials}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["metrics"], state["trials"])  # type: ignore[misc]

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(f"[{time.time() - self.t0:6.0f}s] {text}", file=stream, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        values = sorted(trial.config.items())
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values)
        self._print(f"trial {trial.trial_id} started: {shown}")

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        values = "  ".join(f"{m} {result[m]:.3f}" for m in self.metrics if m in result)
        self._print(f"trial {trial.trial_id} epoch {result.get('epoch', '?')}: {values}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done += 1
        self._print(f"trial {trial.trial_id} finished ({self._done}/{self.trials} done)")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done += 1
        self._print(f"trial {trial.trial_id} FAILED: {trial_error_text(trial)}")


def remove_orphaned_placement_groups(*, all_of_this_job: bool = False) -> int:
    """Remove the worker placement groups this study's trials left behind; returns how many.

    When Tune stops a trial (ASHA, or ASHA's stop at ``max_t``) while its
    function is inside ``TorchTrainer.fit``, the Train controller dies with the
    trial but the placement group of its workers stays reserved: Ray Core does
    not free a group when its creator actor dies, and Ray Train's own cleaner
    needs the dashboard's state API, which this platform does not start. The
    leaked CPUs then starve every later trial.

    Only groups created by an actor of this driver's job are considered (never
    another job's on a shared cluster, never Tune's own trial bundles, which the
    driver creates, never detached ones).

    Args:
        all_of_this_job: also remove groups whose creator is still alive (only
            right after a study ended, when every trial of the job is over).

    Uses Ray's GCS table (a private API); on any failure nothing is removed.
    """
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    try:
        job = bytes.fromhex(ray.get_runtime_context().get_job_id())
        accessor = ray._private.state.state._connect_and_get_accessor()
        table = accessor.get_placement_group_table()
    except Exception:  # noqa: BLE001 - a best-effort sweep must never end a study
        return 0
    removed = 0
    for raw in table:
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        by_actor = pg.creator_actor_id not in (b"", b"\xff" * len(pg.creator_actor_id))
        ours = by_actor and pg.creator_job_id == job and not pg.is_detached
        ended = pg.creator_actor_dead or all_of_this_job
        if ours and ended and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            with contextlib.suppress(Exception):
                pg_id = ray.PlacementGroupID(pg.placement_group_id)
                ray.util.remove_placement_group(PlacementGroup(pg_id))
                removed += 1
    return removed


class PlacementGroupSweeper(Callback):
    """Frees the worker placement groups of TorchTrainer runs whose trial Tune stopped.

    Args:
        every_s: seconds between two sweeps of the placement-group table.
    """

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self._last = 0.0
        self.removed = 0

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self.removed += remove_orphaned_placement_groups()


class SchedulerState(Callback):
    """Saves the trial scheduler's state with Tune's experiment state, so that
    ``study resume`` (and ``study extend``) goes on with the rungs an uninterrupted study
    would have: Tune saves its searcher on every experiment save but not its scheduler.

    The state is this callback's (Tune's ``callback-states-*.pkl``, written in the same
    save as the trial list and restored before the restored trials are added). Schedulers
    that can say their state (:class:`study.search.ResumableASHA`,
    :class:`study.search.ResumableMedian`) have it; others (HyperBand) start empty on
    resume, with a warning.

    Args:
        scheduler: the scheduler Tune runs (after ``Tuner.restore``, :func:`study.runner.
            study_tuner` points this at the restored one).
    """

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self.restored = False

    def get_state(self) -> dict[str, Any] | None:
        state = getattr(self.scheduler, "resume_state", None)
        return {"scheduler": state()} if callable(state) else None

    def set_state(self, state: dict[str, Any]) -> None:
        load = getattr(self.scheduler, "load_resume_state", None)
        saved = state.get("scheduler")
        if saved and callable(load):
            load(saved)
            self.restored = True


#: Our last readable copy of Tune's experiment state, beside it in the Tune folder.
STATE_BACKUP = "experiment_state.backup.json"


class StateBackup(Callback):
    """Keeps a readable copy of Tune's experiment state for ``study resume``.

    Tune rewrites ``experiment_state-<time>.json`` in place (no temporary file and
    rename), so a driver killed in the middle of a write leaves it empty or cut
    short, and ``Tuner.restore`` then silently starts the whole study again (seen
    once in tests/test_study.py: five trial runs for four trials). At most once a
    second, when the file has changed and parses as JSON, it is copied to
    :data:`STATE_BACKUP` through a temporary file and an atomic rename;
    :func:`repair_experiment_state` puts it back before a restore.

    Args:
        tune_dir: the study's Tune folder (``<storage>/<name>/tune``).
        every_s: least seconds between two checks.
    """

    def __init__(self, tune_dir: Path, every_s: float = 1.0) -> None:
        self.tune_dir = Path(tune_dir)
        self.every_s = every_s
        self._checked = 0.0
        self._seen: tuple[str, int, int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"tune_dir": self.tune_dir, "every_s": self.every_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tune_dir"], state["every_s"])  # type: ignore[misc]

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._checked >= self.every_s:
            self._checked = time.monotonic()
            self.backup()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.backup()

    def backup(self) -> None:
        """Copy the newest experiment state if it changed and is whole
        (:func:`state_is_whole`); a kernel copy, never parsed: the file holds every trial,
        megabytes in a study of hundreds."""
        states = sorted(self.tune_dir.glob("experiment_state-*.json"))
        if not states:
            return
        with contextlib.suppress(OSError):
            stat = states[-1].stat()
            seen = (states[-1].name, stat.st_mtime_ns, stat.st_size)
            if seen == self._seen or not state_is_whole(states[-1]):
                return  # unchanged, or cut short (a write in progress): keep the last copy
            tmp = self.tune_dir / f".{STATE_BACKUP}.tmp"
            shutil.copyfile(states[-1], tmp)
            after = states[-1].stat()
            if (
                (after.st_mtime_ns, after.st_size) != (stat.st_mtime_ns, stat.st_size)
                or tmp.stat().st_size != stat.st_size
                or not state_is_whole(tmp)
            ):  # rewritten while copied (Tune's syncer truncates, then writes)
                return
            os.replace(tmp, self.tune_dir / STATE_BACKUP)
            self._seen = seen


#: How Tune's experiment state ends: ``json.dump`` of ``{"trial_data": …, "runner_data":
#: …, "stats": {"start_time": <seconds>}}``. The trials are JSON strings inside it (their
#: quotes escaped), so only the last bytes of a whole file can match.
_STATE_END = re.compile(rb'"stats": \{"start_time": [-+0-9.eEinfaNI]+\}\}\s*$')


def state_is_whole(path: Path) -> bool:
    """Whether a Tune experiment-state file was written to its end (its last bytes are
    the end of the document, :data:`_STATE_END`), without parsing the whole of it; a
    file in another layout falls back on parsing."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 256))
        tail = f.read()
    if _STATE_END.search(tail):
        return True
    if b'"stats"' in tail:  # Tune's layout, cut short
        return False
    try:  # another Ray version's layout
        json.loads(Path(path).read_bytes())
        return True
    except ValueError:
        return False


def repair_experiment_state(tune_dir: Path) -> bool:
    """Before ``Tuner.restore``: if Tune's newest experiment state does not parse (its
    driver was killed while writing it), put :data:`STATE_BACKUP` in its place.
    Returns whether it did."""
    states = sorted(Path(tune_dir).glob("experiment_state-*.json"))
    backup = Path(tune_dir) / STATE_BACKUP
    if not states or not backup.is_file():
        return False
    try:
        json.loads(states[-1].read_text())
        return False
    except (OSError, ValueError):
        pass
    tmp = states[-1].with_name(f".{states[-1].name}.tmp")
    tmp.write_bytes(backup.read_bytes())
    os.replace(tmp, states[-1])
    print(
        f"the study's last Tune state {states[-1].name} was cut short (its driver was "
        f"killed while writing it); resuming from the copy of a moment before",
        file=sys.stderr,
        flush=True,
    )
    return True


class _TuneFolder:
    """The state files of a study's Tune folder (a path or a URI), read and rewritten
    whole (:func:`study.storage.read_bytes`, :func:`study.storage.write_bytes`), for the
    repairs that must happen before ``Tuner.restore`` reads them."""

    def __init__(self, tune_location: str) -> None:
        import pyarrow.fs as pafs

        from study.storage import filesystem

        self.location = tune_location
        fs, where = filesystem(tune_location)
        try:
            infos = fs.get_file_info(pafs.FileSelector(where.rstrip("/"), allow_not_found=True))
        except OSError:
            infos = []
        self.names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def newest(self, prefix: str, suffix: str) -> str | None:
        """The newest file ``<prefix><time><suffix>``: the one Tune reads (its names
        sort by the session's start time, and Tune takes the greatest)."""
        found = [n for n in self.names if n.startswith(prefix) and n.endswith(suffix)]
        return found[-1] if found else None

    def read(self, name: str) -> bytes:
        from study.storage import join, read_bytes

        return read_bytes(join(self.location, name))

    def write(self, name: str, data: bytes) -> None:
        from study.storage import join, write_bytes

        write_bytes(join(self.location, name), data)


def set_saved_save_period(tune_location: str, period: str) -> bool:
    """Before ``Tuner.restore``: Tune takes its state-save period from the saved state,
    not from ``TUNE_GLOBAL_CHECKPOINT_S`` as a new study does; put ``period`` (seconds,
    or ``auto``) there, so that a resumed study saves as often as the variable says.
    Returns whether it changed the state. A state it cannot read or write is left as it
    is (Tune's restore reports an unreadable one)."""
    try:
        folder = _TuneFolder(tune_location)
        name = folder.newest("experiment_state-", ".json")
        if name is None:
            return False
        state = json.loads(folder.read(name))
        runner = state["runner_data"]
        if str(runner.get("_checkpoint_period")) == period:
            return False
        runner["_checkpoint_period"] = period
        folder.write(name, json.dumps(state).encode())
        return True
    except Exception:  # noqa: BLE001 - an old period costs time, never the study
        return False


def align_search_state(tune_location: str) -> int:
    """Before ``Tuner.restore``: make Tune's search state agree with its trial list.

    Tune saves its trial list (``experiment_state-*.json``) and its search state
    (``search_gen_state-*.json``: how many trials the searcher has created, and which
    are running; ``searcher-state-*.pkl``: the Optuna searcher) as separate files, and
    on a URI storage uploads them one by one. A driver killed between them, or a state
    file put back from the backup (:func:`repair_experiment_state`), leaves a search
    state that does not match the list:

    - it counts a trial the list lacks. Restored as is, Tune never creates that trial:
      the study ends one trial short with exit code 0 (seen once in
      tests/test_cluster_storage.py). The count comes down to the list's length, the
      lost trial leaves the concurrency limiter's running set, and its Optuna trial is
      told FAIL (else TPE would count it as running for the rest of the study).
    - it lacks trials of the list (a search state from the save before). The count
      rises to the list's length (no trial beyond the study's number), and the list's
      unfinished trials join the running set, so the concurrency limit holds. Their
      results are not told to Optuna (:class:`study.search.StudySearch` skips a trial
      it did not suggest).

    Args:
        tune_location: the study's Tune folder, a path or a URI (``<storage>/<name>/tune``).

    Returns:
        how many trials the search state counted beyond the trial list (negative: it
        counted fewer; 0: they agreed, or there was nothing it could check or fix).
    """
    import ray.cloudpickle as cloudpickle

    try:
        folder = _TuneFolder(tune_location)
        state_name = folder.newest("experiment_state-", ".json")
        gen_name = folder.newest("search_gen_state-", ".json")
        if state_name is None or gen_name is None:
            return 0
        trials = {}
        for trial_json, _meta in json.loads(folder.read(state_name))["trial_data"]:
            trial = json.loads(trial_json)
            trials[trial["trial_id"]] = trial.get("status")
        search = cloudpickle.loads(folder.read(gen_name))
        extra = int(search["counter"]) - len(trials)
    except Exception:  # noqa: BLE001 - Tune's own restore reports a state it cannot read
        return 0
    if extra == 0:
        return 0
    ids = set(trials)
    unfinished = {t for t, status in trials.items() if status not in ("TERMINATED", "ERROR")}
    search["counter"] = len(trials)
    search["finished"] = False
    for key, wrapper in search.items():
        if key.startswith("name:") and isinstance(wrapper.get("live_trials"), set):
            live = (
                wrapper["live_trials"] & ids if extra > 0 else wrapper["live_trials"] | unfinished
            )
            wrapper["live_trials"] = live
            if "num_unfinished_live_trials" in wrapper:
                wrapper["num_unfinished_live_trials"] = len(live)
    try:
        folder.write(gen_name, cloudpickle.dumps(search))
        failed = _fail_lost_optuna_trials(folder, ids) if extra > 0 else 0
    except Exception as exc:  # noqa: BLE001 - the resume goes on as before
        print(f"the study's search state could not be aligned: {exc}", file=sys.stderr)
        return 0
    if extra > 0:
        what = f"counted {extra} trial(s) that its saved trial list lacks"
        then = f"resuming creates them again ({failed} Optuna trial(s) told FAIL)"
    else:
        what = f"lacked {-extra} trial(s) of its saved trial list"
        then = "resuming counts them, and creates no trial beyond the study's number"
    print(
        f"the study's saved search state {what} (its driver was killed between two saves); {then}",
        file=sys.stderr,
        flush=True,
    )
    return extra


def _fail_lost_optuna_trials(folder: _TuneFolder, ids: set[str]) -> int:
    """Tell FAIL, in the saved Optuna searcher's study, each trial it suggested for a Tune
    trial that the trial list lacks and that it has not told an end; returns how many.
    In an RDB storage that goes to the database; in memory, into the saved searcher."""
    from optuna.trial import TrialState

    name = folder.newest("searcher-state-", ".pkl")
    if name is None:
        return 0
    searcher = pickle.loads(folder.read(name))
    if not isinstance(searcher, dict) or "_ot_trials" not in searcher:
        return 0
    done = searcher.setdefault("_completed_trials", set())
    lost = [t for t in searcher["_ot_trials"] if t not in ids and t not in done]
    for trial_id in lost:
        searcher["_ot_study"].tell(searcher["_ot_trials"][trial_id], state=TrialState.FAIL)
        done.add(trial_id)
    if lost:
        folder.write(name, pickle.dumps(searcher))
    return len(lost)


def add_search_samples(tune_location: str, more: int) -> int:
    """Before ``Tuner.restore`` (``study extend``): let the saved search create ``more``
    trials beyond the ones it was told to; returns the new total. The searcher keeps
    its history (TPE goes on from every trial so far).

    Raises:
        UserError: the study has no search state to extend.
    """
    import ray.cloudpickle as cloudpickle

    from trainables.errors import UserError

    folder = _TuneFolder(tune_location)
    name = folder.newest("search_gen_state-", ".json")
    if name is None:
        raise UserError(f"no search state under {tune_location}: nothing to extend")
    search = cloudpickle.loads(folder.read(name))
    search["total_samples"] = int(search["total_samples"]) + more
    search["finished"] = False
    folder.write(name, cloudpickle.dumps(search))
    return search["total_samples"]
