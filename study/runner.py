"""Building, running and resuming a study on Ray Tune (+ Ray Train, Optuna, MLflow)."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from reports.data import retry
from reports.vocabulary import (
    COMMAND_ARTIFACT,
    PARENT_STUDY,
    ROLE_STUDY,
    ROLE_TRIAL,
    SPEC_ARTIFACT,
    SPEC_DIR,
    TAG_ARTIFACT_ERROR,
    TAG_EARLY,
    TAG_FAILURE,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
)
from search_spaces import compile_space
from study.credentials import redact
from study.spec import SearchSpec, StudySpec
from study.tracking import MlflowTracker, flatten
from study.trial import uses_train_backend
from study.ui import describe_study, name_optuna_study
from trainables.files import FINISHED_RUN_FILES, STOPPED_RUN_FILES
from trainables.metrics import is_epoch_metric

#: Ray Train V2 polls its workers this often (seconds); its default of 2 s adds
#: several seconds to every TorchTrainer start and finish.
HEALTH_CHECK_INTERVAL_S = "0.2"
#: Ray Train V2 actors that a cluster on this one machine has no use for: the
#: preemption watcher (one more actor process per TorchTrainer run, polling for
#: node drains, which a local cluster never has) and the Prometheus metrics
#: callbacks (nothing scrapes them without the dashboard).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
TUNE_DIR = "tune"
#: The file a study writes into its storage folder once it has ended (every trial, the
#: finalists): ``study run --name N --resume`` on a finished study prints it and exits.
OUTCOME_FILE = "outcome.yaml"
#: What ``--working-dir`` does not ship to the cluster's nodes (Ray's ``runtime_env``
#: ``excludes``, gitignore-style): environments, version control, MLflow stores,
#: studies' outputs, data sets and checkpoints.
WORKING_DIR_EXCLUDES = [
    ".venv/", "venv/", ".git/", "__pycache__/", "*.egg-info/", ".pytest_cache/",
    ".ruff_cache/", "mlruns/", "mlartifacts/", "mlflow.db", "*.db", "studies/",
    "data/", "datasets/", "outputs/", "runs/", "*.pt", "*.pth", "*.npz", "*.tar.gz",
]  # fmt: skip


@dataclass
class TrialOutcome:
    """One trial as the study ended it."""

    trial_id: str
    status: str  # FINISHED | FAILED | STOPPED
    config: dict[str, Any]  # the trial's Tune config (what Optuna sampled + constants)
    metrics: dict[str, float]  # its last result's numbers
    error: str | None
    run_id: str | None = None  # its MLflow run (study generate sets it)
    feasible: bool = True  # it met the study's constraints (reports.ranking.is_feasible)
    # STOPPED by the ΔE stopper: the epoch it keeps as its result (``metrics`` are then
    # that epoch's); None otherwise, or when no epoch before the fall was eligible
    kept_epoch: int | None = None

    @property
    def is_result(self) -> bool:
        """Whether it stands for a trained configuration: FINISHED, or ΔE-stopped with a
        kept epoch (:func:`reports.ranking.is_result` for its MLflow run)."""
        return self.status == "FINISHED" or (
            self.status == "STOPPED" and self.kept_epoch is not None
        )


@dataclass
class EndedTrial:
    """A trial that Tune ended (TERMINATED: it ran to its end or the scheduler stopped
    it), as its MLflow run is finished from it (:func:`_reconcile`)."""

    config: dict[str, Any]  # its Tune config
    checkpoint: Any  # Tune's last checkpoint of it (None for the train backend)
    last: dict[str, Any]  # its last result (for the train backend, with the checkpoint's path)


@dataclass
class StudyOutcome:
    """What ``study run`` hands back: every trial, the best ones and the Pareto set."""

    spec: StudySpec
    trials: list[TrialOutcome]
    parent_run_id: str
    finals: list[Any] = field(default_factory=list)  # study.finals.FinalResult, rank order
    search_s: float = 0.0  # wall time of the search (Tune), seconds
    final_s: float = 0.0  # wall time of the finalists' evaluation, seconds

    def ranked(self, metric: str | None = None, mode: str | None = None) -> list[TrialOutcome]:
        """Trials with the metric, best first, by the one ranking that ``study export``,
        ``study show`` and the report use (:func:`reports.ranking.rank_runs`: ties go to
        the study's next objective, then ``val/clean_acc``, then the trial id)."""
        from reports.ranking import rank_runs

        metric = metric or self.spec.metrics[0]
        mode = mode or self.spec.modes[self.spec.metrics.index(metric)]
        metrics, modes = [metric], [mode]
        for m, o in zip(self.spec.metrics, self.spec.modes):
            if m != metric:
                metrics.append(m)
                modes.append(o)
        scored = [t for t in self.trials if metric in t.metrics]
        return rank_runs(scored, metrics, modes)

    def pareto(self) -> list[TrialOutcome]:
        """Trials not dominated on the study's metrics (all objectives at once)."""
        return pareto_front(self.trials, self.spec.metrics, self.spec.modes)


def pareto_front(
    trials: Sequence[TrialOutcome], metrics: Sequence[str], modes: Sequence[str]
) -> list[TrialOutcome]:
    """The non-dominated trials (a trial missing a metric takes no part)."""
    sign = [1.0 if m == "max" else -1.0 for m in modes]
    scored = [t for t in trials if all(m in t.metrics for m in metrics)]
    vec = {t.trial_id: [s * t.metrics[m] for s, m in zip(sign, metrics)] for t in scored}

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [
        t
        for t in scored
        if not any(dominates(vec[o.trial_id], vec[t.trial_id]) for o in scored if o is not t)
    ]


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict[str, str]:
    import mlflow
    import optuna
    import ray
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "optuna": optuna.__version__,
        "mlflow": mlflow.__version__,
        "platform": platform.platform(),
    }


def _hardware() -> dict[str, str]:
    """The driver machine: CPU model, cores, memory and GPUs (for reports)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores": str(os.cpu_count() or "?")}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        out["memory_gib"] = f"{pages / 2**30:.1f}"
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available():
        out["gpus"] = ", ".join(
            torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
        )
    else:
        out["gpus"] = "none"
    return out


def train_env(local: bool) -> dict[str, str]:
    """The Ray Train settings a study runs with (a variable already set wins).

    Args:
        local: whether the cluster is a new one on this machine (no ``--address``);
            only then are the preemption watcher and the metrics callbacks switched off.
    """
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S}
    if local:
        env.update(LOCAL_TRAIN_ENV)
    return {k: os.environ.get(k, v) for k, v in env.items()}


def set_driver_env(local: bool) -> dict[str, str]:
    """Set the study's Ray and Tune settings in this process (a variable already set wins).

    The driver launches TorchTrainers too (``study train --workers``), so it gets
    :func:`train_env` as well. How often Tune saves the experiment's state depends on
    the study's size: :func:`set_state_save_period`. Returns :func:`train_env`, for
    the workers' environment.
    """
    env = train_env(local)
    for key, value in {**env, "RAY_AIR_NEW_OUTPUT": "0"}.items():
        os.environ.setdefault(key, value)
    return env


#: the value :func:`set_state_save_period` last put into ``TUNE_GLOBAL_CHECKPOINT_S``
#: (a value that differs from it was set by the user, and wins)
_SET_PERIOD: str | None = None


def state_save_period(trials: int) -> float:
    """Seconds between two saves of Tune's experiment state for a study of ``trials``.

    Every save encodes every trial, so a fixed period makes the driver's cost grow
    with the square of the study (measured: 1,947 saves, 43 s of driver CPU, in a
    100-trial study at 0.5 s). A period that grows with the study keeps the cost per
    trial flat: 0.5 s up to 10 trials (what a killed driver of a small study loses is
    at most half a second of its state), then 0.05 s per trial, at most 30 s.

    >>> state_save_period(4), state_save_period(100), state_save_period(5000)
    (0.5, 5.0, 30.0)
    """
    return min(30.0, max(0.5, 0.05 * trials))


def set_state_save_period(trials: int) -> float:
    """Set ``TUNE_GLOBAL_CHECKPOINT_S`` (read when Tune's loop starts) to
    :func:`state_save_period` unless the user set it; returns the period in effect
    (seconds), or 0.0 for Ray's own "auto"."""
    global _SET_PERIOD
    current = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")
    if current is None or current == _SET_PERIOD:
        _SET_PERIOD = f"{state_save_period(trials):g}"
        os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = _SET_PERIOD
        current = _SET_PERIOD
    try:
        return float(current)
    except ValueError:
        return 0.0


def runtime_env(env: dict[str, str], working_dir: str | None = None) -> dict[str, Any]:
    """The ``runtime_env`` a study's Ray job runs with.

    Args:
        env: variables every worker gets (:func:`train_env`).
        working_dir: a local folder (the project's checkout) that Ray packs and ships
            to every node, where workers start in it and import from it
            (``--working-dir``; :data:`WORKING_DIR_EXCLUDES` stay behind); None: the
            nodes have the code already.
    """
    out: dict[str, Any] = {"env_vars": env}
    if working_dir:
        folder = Path(working_dir).expanduser().resolve()
        if not folder.is_dir():
            from trainables.errors import UserError

            raise UserError(f"--working-dir {working_dir}: no such folder")
        out["working_dir"] = str(folder)
        out["excludes"] = list(WORKING_DIR_EXCLUDES)
    return out


def init_ray(address: str | None, verbose: bool = False, working_dir: str | None = None) -> None:
    """Join ``address`` or start a local cluster; workers get :func:`train_env` (and the
    code in ``working_dir``, shipped through :func:`runtime_env`, when given)."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    env = set_driver_env(local=target == "local")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "runtime_env": runtime_env(env, working_dir),
        "configure_logging": verbose,
    }
    # no address: RAY_ADDRESS if set, else a new local cluster; never silently
    # join some other cluster that `ray start` left running on this machine
    ray.init(address=target, **kwargs)


def open_parent_run(spec: StudySpec) -> tuple[MlflowTracker, str]:
    """The study's parent MLflow run (found again on resume) with spec, space and versions."""
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    run_id, created = tracker.get_or_create_run(
        run_name=spec.name,
        tags={TAG_ROLE: ROLE_STUDY},
        key_tags={TAG_STUDY: spec.name, TAG_PARENT: PARENT_STUDY},
    )
    if created:
        tracker.log_params(run_id, flatten({k: v for k, v in spec.to_dict().items()}))
        tracker.set_tags(
            run_id,
            {
                "git_commit": _git_commit(),
                **{f"version.{k}": v for k, v in _versions().items()},
                **{f"hardware.{k}": v for k, v in _hardware().items()},
            },
        )
        space_file = spec.load_space().source
        tracker.log_artifact(run_id, space_file, SPEC_DIR)
        tracker.log_text(run_id, yaml.safe_dump(spec.to_dict(), sort_keys=False), SPEC_ARTIFACT)
        # the command line as typed, less any password in it (study.credentials)
        tracker.log_text(run_id, redact(" ".join(sys.argv)), COMMAND_ARTIFACT)
        describe_study(tracker, spec, run_id, ended=False)  # the UI's description
    return tracker, run_id


def build_tuner(
    spec: SearchSpec,
    trainable: Any,
    callbacks: list[Any],
    *,
    scheduler: Any = None,
    resume: bool = False,
    verbose: bool = False,
    seeds: Sequence[Any] = (),
    stopper: Any = None,
) -> Any:
    """A Tuner searching ``spec``'s space with Optuna (TPE), new or restored from its folder.

    The searcher (:func:`study.search.make_searcher`) tells Optuna which trials the
    scheduler stopped early (PRUNED) and which ran to the end (COMPLETE).

    Serves ``study run`` (:func:`study_tuner`) and ``study generate``.

    Args:
        spec: the search: its space (read once per spec), objectives, trials, seed,
            concurrency, retries, Optuna storage and folder (Tune state in ``tune/``).
        trainable: the Tune trainable, its parameters and resources attached.
        callbacks: driver-side Tune callbacks (MLflow writers, console progress).
        scheduler: a trial scheduler (:func:`study.search.make_scheduler`) or None.
        resume: restore the Tuner saved in the folder (callbacks and searcher come back
            with it; ``callbacks`` and ``scheduler`` are then unused).
        verbose: Tune's own console output.
        seeds: finished trials (``optuna.trial.FrozenTrial``) added to a new search's
            Optuna study before its first trial (a warm start, :mod:`study.warmstart`);
            unused on ``resume``.
        stopper: a Tune stopper (the ΔE stopper, :mod:`study.stopper`) or None; unused
            on ``resume`` (it comes back with the Tuner).
    """
    import optuna
    from ray import tune

    from study.callbacks import (
        StateBackup,
        align_search_state,
        repair_experiment_state,
        set_saved_save_period,
    )
    from study.search import make_searcher
    from study.stopper import checkpoints_to_keep

    # Tune's state goes to <storage>/<name>/tune: a folder, or a URI Ray writes through
    # pyarrow.fs. The state backup guards a local file that Tune rewrites in place; on
    # a URI storage Tune writes the state locally and uploads it as one new object, so
    # a killed driver never leaves half a file there, and there is no local file to copy.
    local_tune_dir = None if spec.remote else spec.folder / TUNE_DIR
    period = set_state_save_period(spec.trials)
    if resume:
        if local_tune_dir is not None:
            repair_experiment_state(local_tune_dir)  # a state file cut short by a kill
        align_search_state(spec.location(TUNE_DIR))  # a trial counted but never saved
        set_saved_save_period(spec.location(TUNE_DIR), os.environ["TUNE_GLOBAL_CHECKPOINT_S"])
        return tune.Tuner.restore(
            spec.location(TUNE_DIR), trainable, resume_unfinished=True, resume_errored=False
        )
    storage = None
    if spec.optuna_storage:
        storage = optuna.storages.RDBStorage(spec.optuna_storage)
    searcher = make_searcher(spec, compile_space(spec.load_space()), storage)
    if storage is not None:  # optuna-dashboard: objective and parameter names
        name_optuna_study(searcher._ot_study, spec)
    if seeds:
        from study.warmstart import add_seeds

        add_seeds(searcher._ot_study, seeds)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=spec.trials,
            max_concurrent_trials=spec.max_concurrent or None,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=spec.location(),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=checkpoints_to_keep(spec)),
            stop=stopper,
            callbacks=[
                *callbacks,
                *([StateBackup(local_tune_dir, max(1.0, period))] if local_tune_dir else []),
            ],
            verbose=2 if verbose else 0,
        ),
    )


def study_tuner(
    spec: StudySpec,
    parent_run_id: str,
    *,
    resume: bool,
    verbose: bool = False,
    seeds: Sequence[Any] = (),
):
    """The Tuner of a study: trials get the spec and its :attr:`~StudySpec.template`
    (resolved here, once); the spec's scheduler (:meth:`StudySpec.early_stopping`);
    MLflow and progress callbacks; ``seeds``: a warm start's trials (:func:`build_tuner`)."""
    from ray import tune

    from study.callbacks import (
        MlflowCallback,
        PlacementGroupSweeper,
        ProgressCallback,
        SchedulerState,
    )
    from study.search import make_scheduler
    from study.stopper import make_stopper
    from study.trial import run_trial, trial_resources

    trainable = tune.with_parameters(run_trial, spec=spec, template=spec.template)
    scheduler = make_scheduler(spec)
    if not all(is_epoch_metric(m) for m in spec.metrics):
        # an objective reported once, with the last epoch (test/*, gen/*): Tune's check
        # that every result carries the searcher's metrics would stop the study at the
        # first epoch; the spec has checked the names (StudySpec.validate)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    stopper = make_stopper(spec)  # also a callback: its history is saved with Tune's state
    callbacks = [
        MlflowCallback(spec, parent_run_id),
        ProgressCallback(spec.metrics, spec.trials),
        SchedulerState(scheduler),
        *([stopper] if stopper is not None else []),
    ]
    if uses_train_backend(spec):
        callbacks.append(PlacementGroupSweeper())
    tuner = build_tuner(
        spec,
        tune.with_resources(trainable, trial_resources(spec)),
        callbacks,
        scheduler=scheduler,
        resume=resume,
        verbose=verbose,
        seeds=seeds,
        stopper=stopper,
    )
    if resume:  # the callbacks come back from Tune's state (private fields of Ray's Tuner)
        local = getattr(tuner, "_local_tuner", None)
        run_config = getattr(local, "_run_config", None)
        restored = getattr(getattr(local, "_tune_config", None), "scheduler", None)
        kept = restored is None
        for callback in getattr(run_config, "callbacks", None) or []:
            if isinstance(callback, ProgressCallback):  # `study extend` grew the study
                callback.trials = spec.trials
            if isinstance(callback, SchedulerState) and restored is not None:
                callback.scheduler = restored  # the one Tune runs, whatever the pickle shared
                kept = kept or callable(getattr(restored, "resume_state", None))
        if kept or spec.early_stopping() == "none":
            pass
        elif type(restored).__name__ == "FIFOScheduler":
            print(
                f"warning: study {spec.name!r} started before its early stopping existed "
                f"(the {spec.early_stopping()} scheduler): it goes on without early stopping",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"warning: the {spec.early_stopping()} scheduler of study {spec.name!r} starts "
                "empty on resume (its state is not saved: HyperBand, or a study started "
                "before schedulers were saved); trials after the resume are judged only "
                "against each other",
                file=sys.stderr,
                flush=True,
            )
    return tuner


def trial_outcomes(
    grid: Any,
    finished: Callable[[dict[str, Any], dict[str, float]], bool],
    feasible: Callable[[dict[str, float]], bool] | None = None,
    kept: Callable[[dict[str, Any], list[dict[str, Any]]], Any] | None = None,
) -> list[TrialOutcome]:
    """Every started trial of a Tune result grid, as the search ended it.

    Args:
        grid: what ``Tuner.fit`` returned.
        finished: ``(config, metrics) -> bool``: whether a trial without an error ran
            to its end (FINISHED) rather than being stopped early (STOPPED).
        feasible: ``metrics -> bool``: whether a trial's last result meets the study's
            constraints (:meth:`StudySpec.meets_constraints`); None: every trial does.
        kept: ``(config, per-epoch results) -> KeptResult | None``
            (:meth:`StudySpec.kept_result`): the epoch a STOPPED trial keeps when the
            ΔE stopper stopped it; its metrics (and feasibility) are then that epoch's.
    """
    outcomes = []
    for result in grid:
        if result.config is None:  # a trial that never started (study interrupted)
            continue
        trial_id = _result_trial_id(result)
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        if result.error is not None:
            status = "FAILED"
        else:
            status = "FINISHED" if finished(result.config, metrics) else "STOPPED"
        error = str(result.error).strip().splitlines()[-1][:500] if result.error else None
        stop = _kept_of(result, kept) if status == "STOPPED" else None
        if stop is not None and stop.epoch is not None:
            metrics = {**metrics, **stop.metrics}
        ok = feasible is None or status == "FAILED" or feasible(metrics)
        outcome = TrialOutcome(
            str(trial_id), status, dict(result.config), metrics, error, feasible=ok
        )
        outcome.kept_epoch = None if stop is None else stop.epoch
        outcomes.append(outcome)
    return outcomes


def _kept_of(result: Any, kept: Callable[..., Any] | None) -> Any:
    """The ΔE stopper's kept result of a stopped trial (``kept`` on every epoch Tune
    recorded for it), or None."""
    if kept is None:
        return None
    frame = getattr(result, "metrics_dataframe", None)
    if frame is None or "epoch" not in getattr(frame, "columns", ()):
        return None
    rows = [{k: v for k, v in row.items() if v == v} for row in frame.to_dict("records")]
    try:
        return kept(result.config, rows)
    except Exception as exc:  # noqa: BLE001 - the trial counts as stopped, as before
        print(f"warning: a trial's ΔE stop could not be read: {exc}", file=sys.stderr)
        return None


def ended_trials(grid: Any) -> dict[str, EndedTrial]:
    """The trials of a Tune result grid that Tune ended without an error (TERMINATED:
    they ran to their end or the scheduler stopped them), by id; not the ones an
    interrupt stopped, which ``study resume`` continues.

    Args:
        grid: what ``Tuner.fit`` returned.
    """
    statuses = _tune_statuses(grid)
    ended = {}
    for result in grid:
        if result.config is None or result.error is not None:
            continue
        trial_id, last = _result_trial_id(result), dict(result.metrics or {})
        status = statuses.get(trial_id)
        if status == "TERMINATED" or (status is None and last.get("done")):
            ended[trial_id] = EndedTrial(dict(result.config), result.checkpoint, last)
    return ended


def _tune_statuses(grid: Any) -> dict[str, str]:
    """Tune's status of every trial of a result grid (``TERMINATED``, ``PAUSED`` …), by
    id; empty where the grid does not tell (Ray keeps the trials in a private field; the
    last result's ``done`` is the fallback, which Tune does not always save)."""
    try:
        return {str(t.trial_id): str(t.status) for t in grid._experiment_analysis.trials}
    except Exception:  # noqa: BLE001 - another Ray version: fall back on `done`
        return {}


def _result_trial_id(result: Any) -> str:
    """The trial id of one result of a Tune result grid."""
    return str((result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path))


def can_resume(spec: SearchSpec) -> bool:
    """Whether the study's Tune state exists in its storage (a folder or a URI)."""
    from ray import tune

    return tune.Tuner.can_restore(spec.location(TUNE_DIR))


def save_outcome(outcome: StudyOutcome) -> str:
    """Write :data:`OUTCOME_FILE` into the study's storage folder (the study has ended);
    returns where."""
    from study import storage

    data = {
        "parent_run_id": outcome.parent_run_id,
        "search_s": outcome.search_s,
        "final_s": outcome.final_s,
        "trials": [dataclasses.asdict(t) for t in outcome.trials],
        "finals": [dataclasses.asdict(f) for f in outcome.finals],
    }
    target = outcome.spec.location(OUTCOME_FILE)
    storage.write_text(target, yaml.safe_dump(_plain(data), sort_keys=False))
    return target


def _plain(value: Any) -> Any:
    """``value`` as YAML's safe dumper takes it: NumPy scalars become Python numbers,
    tuples lists, anything else unknown its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or type(value) in (bool, int, float, str):
        return value
    if hasattr(value, "item"):  # a NumPy scalar
        return value.item()
    for kind in (bool, int, float):  # subclasses (an IntEnum...)
        if isinstance(value, kind):
            return kind(value)
    return str(value)


def load_outcome(spec: StudySpec) -> StudyOutcome | None:
    """The outcome a study wrote when it ended (:func:`save_outcome`); None: it has not
    ended (it never started, or it was stopped before its end)."""
    from study import storage
    from study.finals import FinalResult

    try:
        data = yaml.safe_load(storage.read_text(spec.location(OUTCOME_FILE)))
    except FileNotFoundError:
        return None
    return StudyOutcome(
        spec,
        [TrialOutcome(**t) for t in data["trials"]],
        data["parent_run_id"],
        finals=[FinalResult(**f) for f in data.get("finals", [])],
        search_s=float(data.get("search_s", 0.0)),
        final_s=float(data.get("final_s", 0.0)),
    )


def run_study(
    spec: StudySpec,
    *,
    resume: bool = False,
    verbose: bool = False,
    working_dir: str | None = None,
) -> StudyOutcome:
    """Run (or resume) a study to the end and return its trials.

    The spec, space and base config are validated, the storage, the tracking store,
    the Optuna storage and the Ray address checked, and a warm start's trials read
    (:func:`study.warmstart.load_warm_start`), before anything is created.

    Args:
        spec: the study.
        resume: continue the study's Tune state from its storage.
        verbose: Ray's and Tune's own console output.
        working_dir: a folder shipped to every Ray node (:func:`runtime_env`).
    """
    from study import preflight
    from study.warmstart import load_warm_start

    spec.validate()
    # nothing is created before these pass: storage, tracking store, Ray, resources
    # a URI: a probe object at the storage root (pyarrow leaves an empty "folder"
    # marker where it deletes one, which the study's own prefix must not get)
    preflight.check_storage(spec.storage if spec.remote else spec.location(), spec.connect_timeout)
    preflight.check_tracking(spec.tracking_uri, spec.connect_timeout)
    preflight.check_database(spec.optuna_storage, spec.connect_timeout, "the Optuna storage")
    preflight.check_ray_address(spec.address, spec.connect_timeout)
    # a new study's warm start is read from the (reachable) store before Ray starts or
    # anything is created: an unknown name or other objectives stop here
    warm = load_warm_start(spec) if spec.warm_start and not resume else None
    if warm is not None:
        print(warm.summary(), flush=True)
    init_ray(spec.address, verbose, working_dir)
    preflight.check_resources(spec)
    check_nodes(spec)
    spec.save()
    tracker, parent = open_parent_run(spec)
    if warm is not None:
        tracker.set_tags(parent, warm.tags())
    seeds = warm.trials if warm is not None else ()
    tuner = study_tuner(spec, parent, resume=resume, verbose=verbose, seeds=seeds)
    with _Interrupts(spec) as sigint:
        return _fit_and_finish(spec, tuner, tracker, parent, sigint)


def check_nodes(spec: StudySpec) -> None:
    """On a cluster of several nodes, ``study doctor``'s checks (every node imports the
    project, sees the driver's probe in the storage and writes its own, reaches the
    tracking store) before anything of the study is created; one ``UserError``
    paragraph naming what failed where. A one-node cluster has nothing to check that
    preflight did not."""
    import ray

    if sum(1 for node in ray.nodes() if node["Alive"]) < 2:
        return
    from study.doctor import check_cluster
    from trainables.errors import UserError

    report = check_cluster(None, spec.storage, spec.tracking_uri, 4 * spec.connect_timeout)
    if not report.ok:
        raise UserError(
            "the Ray cluster is not ready for this study (`study doctor` tells the same): "
            + "; ".join(report.failures())
        )


def _fit_and_finish(
    spec: StudySpec, tuner: Any, tracker: MlflowTracker, parent: str, sigint: _Interrupts
) -> StudyOutcome:
    t0, fit_started_ms = time.perf_counter(), int(time.time() * 1000)
    grid = tuner.fit()
    search_s = time.perf_counter() - t0
    interrupted = sigint.caught()
    if uses_train_backend(spec):
        from study.callbacks import remove_orphaned_placement_groups

        # the last trials Tune stopped inside TorchTrainer.fit left their workers'
        # placement groups behind; the study is over, so every one of them goes
        remove_orphaned_placement_groups(all_of_this_job=True)
    # the rules the searcher and the MLflow callback use
    kept = spec.kept_result if spec.stop_on_energy_divergence else None
    outcomes = trial_outcomes(grid, spec.ran_full_budget, spec.meets_constraints, kept)
    outcome = StudyOutcome(spec, outcomes, parent, search_s=search_s)
    if not interrupted and len(grid) < spec.trials:  # never silently short
        print(
            f"warning: the search ended with {len(grid)} of the study's {spec.trials} "
            f"trials (Tune created no more)",
            file=sys.stderr,
            flush=True,
        )
    # after an interrupt Tune's cleanup marks every live trial TERMINATED: the trials that
    # really ended in this fit were finished by the callback, earlier ones wait for resume
    ended = {} if interrupted else ended_trials(grid)
    if interrupted:
        _reconcile(tracker, spec, parent, outcomes, ended, fit_started_ms, interrupted=True)
        tracker.end_run(parent, "KILLED")
        raise StudyInterrupted(spec, outcome, sigint.signum)
    _reconcile(tracker, spec, parent, outcomes, ended, fit_started_ms)
    t1 = time.perf_counter()
    test_kept(spec, tracker, outcome)
    outcome.finals = run_finals(spec, tracker, outcome)
    outcome.final_s = time.perf_counter() - t1
    describe_study(tracker, spec, parent, ended=True)  # best trials; the UI's runs view
    tracker.log_metrics(
        parent, {"study/search_s": outcome.search_s, "study/final_s": outcome.final_s}, step=0
    )
    failed = all(t.status == "FAILED" for t in outcomes) and outcomes
    tracker.end_run(parent, "FAILED" if failed else "FINISHED")
    save_outcome(outcome)  # the study has ended: a retried `study run --resume` stops here
    return outcome


def finalists(outcome: StudyOutcome) -> list[TrialOutcome]:
    """The trials of the second stage, best first: the top ``spec.finalists`` finished
    trials by the objective, or the Pareto set (finished trials) of a multi-objective
    study (ordered by its first objective); never a trial that violates a constraint."""
    spec = outcome.spec
    if spec.finalists <= 0:
        return []
    finished = [t for t in outcome.trials if t.is_result and t.feasible]
    if spec.multi_objective:
        front = {t.trial_id for t in pareto_front(finished, spec.metrics, spec.modes)}
        return [t for t in outcome.ranked() if t.trial_id in front]
    return [t for t in outcome.ranked() if t.is_result and t.feasible][: spec.finalists]


def test_kept(spec: StudySpec, tracker: MlflowTracker, outcome: StudyOutcome) -> None:
    """Test the checkpoints the ΔE-stopped trials kept (:func:`study.finals.evaluate_kept`)
    and add their ``test/*`` metrics to the trials' outcomes; a trial whose run or kept
    ``best.pt`` is missing loses its kept epoch in the outcome (no finalist; its run has
    no ``kept/`` metrics then either: :meth:`study.callbacks.MlflowCallback._log_kept`)."""
    from study.finals import evaluate_kept

    kept = [t for t in outcome.trials if t.status == "STOPPED" and t.kept_epoch is not None]
    if not kept:
        return
    untestable: set[str] = set()
    tested = evaluate_kept(
        spec,
        tracker,
        [(t.trial_id, t.kept_epoch, spec.trial_config(t.config).to_dict()) for t in kept],
        untestable=untestable,
    )
    for t in kept:
        t.metrics.update(tested.get(t.trial_id, {}))
        if t.trial_id in untestable:
            t.kept_epoch = None  # no checkpoint stands for it: not a result, not a finalist


def run_finals(spec: StudySpec, tracker: MlflowTracker, outcome: StudyOutcome) -> list[Any]:
    """Evaluate the study's finalists (:mod:`study.finals`); nothing if there are none."""
    from study.finals import evaluate_finalists

    chosen = finalists(outcome)
    if not chosen:
        return []
    return evaluate_finalists(
        spec, tracker, [(t.trial_id, spec.trial_config(t.config).to_dict()) for t in chosen]
    )


class StudyInterrupted(Exception):
    """The study was stopped by Ctrl-C (SIGINT) or SIGTERM; its state is saved for
    ``study resume``.

    Attributes:
        spec: the study.
        outcome: the trials as they stood when it stopped.
        signum: the signal that stopped it (``signal.SIGINT`` for Ctrl-C, ``SIGTERM``).
    """

    def __init__(self, spec: StudySpec, outcome: StudyOutcome, signum: int = signal.SIGINT) -> None:
        super().__init__(f"study {spec.name} interrupted ({signal_text(signum)})")
        self.spec = spec
        self.outcome = outcome
        self.signum = int(signum)

    @property
    def stopped_by(self) -> str:
        """What stopped it, as a person would say it (``Ctrl-C``, ``SIGTERM``)."""
        return signal_text(self.signum)


def resume_command(spec: StudySpec) -> str:
    """The command that continues ``spec`` (credentials stay in the environment)."""
    parts = ["study", "resume", spec.name, "--storage", spec.storage]
    parts += ["--tracking-uri", spec.tracking_uri]
    if spec.address:
        parts += ["--address", spec.address]
    return " ".join(parts)


def signal_text(signum: int) -> str:
    """A stop signal as a person would say it: ``Ctrl-C`` for SIGINT, else its name."""
    if signum == signal.SIGINT:
        return "Ctrl-C"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM (a preempting Slurm, a Kubernetes pod deleted) around a
    study's ``Tuner.fit`` and after it.

    Tune catches the first SIGINT itself (it stops the trials, saves the experiment and
    ends its callbacks, so the MLflow writer's queue is drained) and then puts back the
    handler that was there before it: ours, :meth:`_now`, which ends the process at once
    with the resume command. So ours being back in place after ``fit`` means a stop
    came; after ``fit`` ours stays installed until the study returns, so any later
    signal stops at once. SIGTERM takes the same path: :meth:`_term` hands it to
    whatever handles SIGINT at that moment (Tune's during ``fit``, ours before and
    after), so a preempted study stops as gracefully as a Ctrl-C and a second SIGTERM
    stops it at once. Ours replace the SIGTERM handler ``ray.init`` installs (which
    would end the driver with no state saved) until the study returns.
    """

    def __init__(self, spec: StudySpec, again: str | None = None) -> None:
        self.spec = spec
        self.again = again or resume_command(spec)  #: the command that continues the work
        self.main = threading.current_thread() is threading.main_thread()
        self.tune_catches = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") in ("", "0")
        self.previous: Any = None
        self.previous_term: Any = None
        self.hit = False
        self.signum = int(signal.SIGINT)  #: the signal that stopped the study

    @property
    def stopped_by(self) -> str:
        """What stopped the study (:func:`signal_text`)."""
        return signal_text(self.signum)

    def _now(self, signum: int, frame: Any) -> None:
        print(
            f"\nstopped at once ({signal_text(signum)}); continue with: {self.again}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(128 + signum)

    def _term(self, signum: int, frame: Any) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if handler != self._now and not self.hit:
            self.signum = signum  # Tune's handler: the graceful stop, by this signal
        (handler if callable(handler) else self._now)(signum, frame)

    def __enter__(self) -> _Interrupts:
        if self.main:
            self.previous = signal.getsignal(signal.SIGINT)
            self.previous_term = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGINT, self._now)
            signal.signal(signal.SIGTERM, self._term)
        return self

    def caught(self) -> bool:
        """Call right after ``fit``: whether Tune caught a Ctrl-C or SIGTERM during it."""
        if self.main:
            if self.tune_catches and signal.getsignal(signal.SIGINT) == self._now:
                self.hit = True
            signal.signal(signal.SIGINT, self._now)
        return self.hit

    def __exit__(self, *exc: object) -> None:
        if self.main and not self.hit:  # interrupted: a signal keeps stopping at once
            signal.signal(signal.SIGINT, self.previous)
            signal.signal(signal.SIGTERM, self.previous_term)


def _trial_id_from_path(path: str) -> str:
    """Tune names trial folders ``<trainable>_<trial id>_<index>_<params>``."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path).name)
    return found.group(1) if found else Path(path).name


def _reconcile(
    tracker: MlflowTracker,
    spec: StudySpec,
    parent: str,
    outcomes: list[TrialOutcome],
    ended: dict[str, EndedTrial] | None = None,
    since_ms: int | None = None,
    interrupted: bool = False,
) -> list[str]:
    """Settle the study's MLflow runs against Tune's state once ``fit`` returned; returns
    the trials whose runs were finished here from their checkpoints.

    A trial Tune ended (``ended``) whose run is still RUNNING, or was ended before this
    driver's ``fit`` (``since_ms``) and lacks a file it must have
    (:data:`~trainables.files.FINISHED_RUN_FILES`, or
    :data:`~trainables.files.STOPPED_RUN_FILES` for one stopped early) that no
    ``energy_study.artifact_error`` tag accounts for, or has no run at all, is finished
    through the MLflow callback's own end of a trial, from its last checkpoint in the
    storage: the driver died after Tune saved the trial as ended but before its writer
    had ended the run, and ``study resume`` does not run that trial again. So the files
    are uploaded, the epochs the run lacks are filled in from the checkpoint's
    ``metrics.jsonl``, the test metrics of its last result are logged, and a file truly
    missing is tagged. Then no other child run stays RUNNING: a failed trial's run is
    FAILED with its reason; after an interrupt the unfinished ones are KILLED (``study
    resume`` reopens them), as is a run whose trial Tune does not know.

    Args:
        tracker: the study's tracker.
        spec: the study.
        parent: the study's parent run (a trial run made here nests under it).
        outcomes: every trial as ``fit`` left it (:func:`trial_outcomes`).
        ended: the trials Tune ended (:func:`ended_trials`).
        since_ms: when this driver's ``fit`` started (milliseconds since the epoch): a
            run ended since then was ended by its MLflow callback, which uploaded its
            files or tagged what it lacks, and is not listed again (None: every run is).
        interrupted: ``fit`` was stopped by a signal.
    """
    from study.callbacks import MlflowCallback

    runs = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: ROLE_TRIAL})
    newest: dict[str, Any] = {}
    for run in runs:  # newest first
        newest.setdefault(run.data.tags.get(TAG_TRIAL, ""), run)
    callback: MlflowCallback | None = None
    settled: list[str] = []
    for trial_id, end in (ended or {}).items():
        run = newest.get(trial_id)
        if run is not None and run.info.status != "RUNNING":
            ended_now = since_ms is not None and (run.info.end_time or 0) >= since_ms
            if ended_now or TAG_EARLY in run.data.tags:  # the callback's end went through
                continue
            try:
                if not _unaccounted_files(tracker, spec, run, end):
                    continue
            except Exception as exc:  # noqa: BLE001 - the study goes on; the next resume checks
                print(
                    f"warning: could not check the files of trial {trial_id}'s MLflow run "
                    f"({redact(str(exc))}); a later `study resume` checks again",
                    file=sys.stderr,
                    flush=True,
                )
                continue
        callback = callback or MlflowCallback(spec, parent)
        # through the callback's writer, as its Tune hooks do: what its methods buffer
        # (points, params) goes out before the next item and when it closes
        checkpoint = _stored_checkpoint(spec, trial_id, end)
        callback.writer.submit(
            f"the run of trial {trial_id}",
            partial(_open_ended_run, callback, tracker, spec, trial_id, end, run),
        )
        callback.writer.submit(
            f"the end of trial {trial_id}",
            partial(callback._finish, trial_id, end.config, checkpoint, end.last),
        )
        settled.append(trial_id)
    if callback is not None:
        callback.writer.close()  # every item written, or printed as a failed write
        print(
            f"finished the MLflow runs of {len(settled)} trial(s) that ended before the "
            f"study's driver could record them, from their checkpoints: {', '.join(settled)}",
            flush=True,
        )
    done = {newest[t].info.run_id for t in settled if t in newest}
    by_id = {t.trial_id: t for t in outcomes}
    for run in runs:
        if run.info.status != "RUNNING" or run.info.run_id in done:
            continue
        trial = by_id.get(run.data.tags.get(TAG_TRIAL, ""))
        status = "FAILED" if trial is not None and trial.status == "FAILED" else "FINISHED"
        if trial is None or (interrupted and trial.status == "STOPPED"):
            status = "KILLED"
        if trial is not None and trial.error:
            tracker.set_tags(run.info.run_id, {TAG_FAILURE: trial.error})
        tracker.end_run(run.info.run_id, status)
    return settled


def _unaccounted_files(
    tracker: MlflowTracker, spec: StudySpec, run: Any, end: EndedTrial
) -> set[str]:
    """The files an ended trial's run must have (all of a finished trial's, or those of
    one stopped early) that are neither among its artifacts nor named in its
    ``energy_study.artifact_error`` tag (already known to be missing from its
    checkpoint)."""
    required = set(
        FINISHED_RUN_FILES if spec.ran_full_budget(end.config, end.last) else STOPPED_RUN_FILES
    )
    present: set[str] = set()
    client, run_id = tracker.client, run.info.run_id
    for folder in sorted({str(Path(f).parent) for f in required}):
        where = None if folder == "." else folder
        listed = retry(lambda w=where: client.list_artifacts(run_id, w), "list artifacts")
        present |= {item.path for item in listed if not item.is_dir}
    recorded = run.data.tags.get(TAG_ARTIFACT_ERROR, "")
    known = {part.split(":", 1)[0].strip() for part in recorded.split(";") if part.strip()}
    return required - present - known


def _stored_checkpoint(spec: StudySpec, trial_id: str, end: EndedTrial) -> Any | None:
    """An ended trial's last checkpoint in the storage: the one Tune (or, for the train
    backend, its last result) names, else the newest in its storage folders; None when
    it has none or they cannot be listed (said on stderr; ``study resume`` tries again)."""
    from study.trial import latest_stored_checkpoint, trial_checkpoint

    checkpoint = trial_checkpoint(spec.storage, end.checkpoint, end.last)
    if checkpoint is not None:
        return checkpoint
    try:
        return latest_stored_checkpoint(spec, trial_id)
    except Exception as exc:  # noqa: BLE001 - the run records it; resume tries again
        print(
            f"warning: trial {trial_id}: its checkpoints in {spec.storage} could not be "
            f"listed ({exc}); study resume tries again",
            file=sys.stderr,
            flush=True,
        )
        return None


def _open_ended_run(
    callback: Any,
    tracker: MlflowTracker,
    spec: StudySpec,
    trial_id: str,
    end: EndedTrial,
    run: Any | None,
) -> None:
    """Open the run of a trial Tune ended for ``callback`` (an
    :class:`~study.callbacks.MlflowCallback`) to end it (a run ended without its files is
    reopened first: the callback leaves a complete-looking run alone; no run at all is
    made), and log its last result's test metrics when the run lacks them (the writer
    held them when the driver died). Runs in the callback's writer thread."""
    from study.callbacks import our_metrics

    if run is not None and run.info.status != "RUNNING":
        key_tags = {TAG_STUDY: spec.name, TAG_TRIAL: trial_id}
        tracker.get_or_create_run(run.info.run_name, {}, key_tags)  # back to RUNNING
    run_id = callback.run_id(trial_id, end.config)
    held = tracker.get_run(run_id).data.metrics
    final = {k: v for k, v in our_metrics(end.last).items() if k.startswith(("test/", "best"))}
    if final and not any(k.startswith("test/") for k in held):
        step = int(end.last.get("epoch", end.last.get("training_iteration", 0)))
        tracker.log_metrics(run_id, final, step=step)
