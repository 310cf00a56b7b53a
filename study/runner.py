"""Building, running and resuming a study on Ray Tune (+ Ray Train, Optuna, MLflow)."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from search_spaces import compile_space
from study.spec import StudySpec
from study.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL, MlflowTracker, flatten
from study.trial import uses_train_backend

#: Ray Train V2 polls its workers this often (seconds); its default of 2 s adds
#: several seconds to every TorchTrainer start and finish.
HEALTH_CHECK_INTERVAL_S = "0.2"
#: Ray Train V2 actors that a cluster on this one machine has no use for: the
#: preemption watcher (one more actor process per TorchTrainer run, polling for
#: node drains, which a local cluster never has) and the Prometheus metrics
#: callbacks (nothing scrapes them without the dashboard).
LOCAL_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0"}
TUNE_DIR = "tune"


@dataclass
class TrialOutcome:
    """One trial as the study ended it."""

    trial_id: str
    status: str  # FINISHED | FAILED | STOPPED
    config: dict[str, Any]
    metrics: dict[str, float]
    error: str | None


@dataclass
class StudyOutcome:
    """What ``study run`` hands back: every trial, the best ones and the Pareto set."""

    spec: StudySpec
    trials: list[TrialOutcome]
    parent_run_id: str

    def ranked(self, metric: str | None = None, mode: str | None = None) -> list[TrialOutcome]:
        """Trials with the metric, best first."""
        metric = metric or self.spec.metrics[0]
        mode = mode or self.spec.modes[self.spec.metrics.index(metric)]
        scored = [t for t in self.trials if metric in t.metrics]
        return sorted(scored, key=lambda t: t.metrics[metric], reverse=mode == "max")

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
    :func:`train_env` as well; Tune snapshots the experiment every 0.5 s, so a
    killed driver reruns (almost) no finished trial. Returns :func:`train_env`,
    for the workers' environment.
    """
    env = train_env(local)
    for key, value in {
        **env,
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_GLOBAL_CHECKPOINT_S": "0.5",
    }.items():
        os.environ.setdefault(key, value)
    return env


def init_ray(address: str | None, verbose: bool = False) -> None:
    """Join ``address`` or start a local cluster; workers get :func:`train_env`."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    env = set_driver_env(local=target == "local")
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "runtime_env": {"env_vars": env},
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
        tags={TAG_ROLE: "study"},
        key_tags={TAG_STUDY: spec.name, "energy_study.parent": "true"},
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
        tracker.log_artifact(run_id, space_file, "spec")
        tracker.log_text(run_id, yaml.safe_dump(spec.to_dict(), sort_keys=False), "spec/study.yaml")
        tracker.log_text(run_id, " ".join(sys.argv), "spec/command.txt")
    return tracker, run_id


def build_tuner(spec: StudySpec, parent_run_id: str, *, resume: bool, verbose: bool = False):
    """The Tuner of a study (new, or restored from its folder)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from study.callbacks import MlflowCallback, PlacementGroupSweeper, ProgressCallback
    from study.trial import run_trial, trial_resources, uses_train_backend

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.to_dict()), trial_resources(spec)
    )
    tune_dir = spec.folder / TUNE_DIR
    if resume:
        return tune.Tuner.restore(
            str(tune_dir.resolve()), trainable, resume_unfinished=True, resume_errored=False
        )
    space = spec.load_space()
    multi = spec.multi_objective
    metric: str | list[str] = spec.metrics if multi else spec.metrics[0]
    mode: str | list[str] = spec.modes if multi else spec.modes[0]
    storage = None
    if spec.optuna_storage:
        storage = optuna.storages.RDBStorage(spec.optuna_storage)
    searcher: Any = OptunaSearch(
        space=compile_space(space),
        metric=metric,
        mode=mode,
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
        study_name=spec.name,
        storage=storage,
    )
    scheduler = None
    epochs = spec.trial_config(space.sample_defaults()).epochs
    if spec.asha and not multi and epochs > spec.grace_period:
        scheduler = ASHAScheduler(
            # the loop's epoch counter survives a restored trial; Tune's
            # training_iteration restarts at 1 for a resumed TorchTrainer run
            time_attr="epoch",
            metric=spec.metrics[0],
            mode=spec.modes[0],
            max_t=epochs,
            grace_period=spec.grace_period,
            reduction_factor=spec.reduction_factor,
        )
    callbacks = [
        MlflowCallback(spec.to_dict(), parent_run_id),
        ProgressCallback(spec.metrics, spec.trials),
    ]
    if uses_train_backend(spec):
        callbacks.append(PlacementGroupSweeper())
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
            storage_path=str(spec.folder.resolve()),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
            verbose=2 if verbose else 0,
        ),
    )


def can_resume(spec: StudySpec) -> bool:
    """Whether the study's Tune state exists on disk."""
    from ray import tune

    return tune.Tuner.can_restore(str((spec.folder / TUNE_DIR).resolve()))


def run_study(spec: StudySpec, *, resume: bool = False, verbose: bool = False) -> StudyOutcome:
    """Run (or resume) a study to the end and return its trials.

    The spec, space and base config are validated before Ray starts.
    """
    spec.validate()
    spec.save()
    tracker, parent = open_parent_run(spec)
    init_ray(spec.address, verbose)
    tuner = build_tuner(spec, parent, resume=resume, verbose=verbose)
    grid = tuner.fit()
    if uses_train_backend(spec):
        from study.callbacks import remove_orphaned_placement_groups

        # the last trials Tune stopped inside TorchTrainer.fit left their workers'
        # placement groups behind; the study is over, so every one of them goes
        remove_orphaned_placement_groups(all_of_this_job=True)
    outcomes = []
    for result in grid:
        trial_id = result.metrics.get("trial_id") or _trial_id_from_path(result.path)
        epochs = spec.trial_config(result.config).epochs
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, int | float)}
        if result.error is not None:
            status = "FAILED"
        elif metrics.get("epoch", 0) >= epochs and "test/clean_acc" in metrics:
            status = "FINISHED"
        else:
            status = "STOPPED"
        error = str(result.error).strip().splitlines()[-1][:500] if result.error else None
        outcomes.append(TrialOutcome(str(trial_id), status, dict(result.config), metrics, error))
    _reconcile(tracker, spec, outcomes)
    failed = all(t.status == "FAILED" for t in outcomes) and outcomes
    tracker.end_run(parent, "FAILED" if failed else "FINISHED")
    return StudyOutcome(spec, outcomes, parent)


def _trial_id_from_path(path: str) -> str:
    """Tune names trial folders ``<trainable>_<trial id>_<index>_<params>``."""
    found = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path).name)
    return found.group(1) if found else Path(path).name


def _reconcile(tracker: MlflowTracker, spec: StudySpec, outcomes: list[TrialOutcome]) -> None:
    """No child run stays RUNNING once its trial has ended (e.g. after a driver kill)."""
    by_id = {t.trial_id: t for t in outcomes}
    for run in tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: "trial"}):
        if run.info.status != "RUNNING":
            continue
        trial = by_id.get(run.data.tags.get(TAG_TRIAL, ""))
        status = "FAILED" if trial is not None and trial.status == "FAILED" else "FINISHED"
        if trial is None:
            status = "KILLED"
        if trial is not None and trial.error:
            tracker.set_tags(run.info.run_id, {"energy_study.failure_reason": trial.error})
        tracker.end_run(run.info.run_id, status)
