"""MLflow tracking of studies, written from one place: the driver.

Layout: one experiment per study; one parent run for the study (spec, search
space, git commit, versions); one child run per trial (its config as params,
every per-epoch metric with the epoch as step, checkpoints, final test
metrics, status and failure reason).

All writes go through one :class:`MlflowTracker` living in the driver process,
so concurrent trials never write to the SQLite store at the same time; on top
of that every write is retried when the store answers "database is locked".
Runs are found again by tags (study name, trial id), so resuming a study
reuses its runs instead of duplicating them.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from study.ui import EXPERIMENT_TAGS

T = TypeVar("T")
log = logging.getLogger(__name__)

TAG_STUDY = "energy_study.study"
TAG_ROLE = "energy_study.role"  # "study" | "trial" | "train" | "generation"
TAG_TRIAL = "energy_study.trial_id"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000
SEARCH_PAGE = 1000  #: runs per MLflow search call (its maximum)


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Hold an exclusive lock beside a SQLite store (``<db>.lock``) while it is opened.

    Two processes opening the same fresh store at once would both run MLflow's
    schema migrations and one would crash; with the lock the first creates it and
    the second finds it made. Other stores need no lock (a no-op).
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_tracking_uri(folder: str | Path = ".") -> str:
    """The default store: ``sqlite:///<folder>/mlflow.db`` (absolute path)."""
    return f"sqlite:///{(Path(folder).resolve() / 'mlflow.db').as_posix()}"


def artifact_root_for(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it in ``mlartifacts/``; servers decide themselves."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def quiet_mlflow() -> None:
    """Silence MLflow's and alembic's start-up chatter on the console."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    delay = 0.05
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # MlflowException wraps sqlalchemy's OperationalError
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            log.debug("MLflow store busy during %s; retrying in %.2fs", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")  # pragma: no cover


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"weight_params.temperature": "2.0", ...}`` as MLflow params."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM_LEN]
    return out


class MlflowTracker:
    """The one MLflow writer of a study.

    Args:
        tracking_uri: any MLflow tracking URI (``sqlite:///…``, ``http://127.0.0.1:5000``).
        experiment: experiment name (one per study).
    """

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow.tracking import MlflowClient

        quiet_mlflow()
        self.tracking_uri = tracking_uri
        with store_lock(tracking_uri):  # one process creates a fresh SQLite store
            self.client = MlflowClient(tracking_uri)
            found = _retry(lambda: self.client.get_experiment_by_name(experiment), "lookup")
            if found is None:
                # tells the MLflow UI this is model training, not GenAI (study/ui.py)
                self.experiment_id = _retry(
                    lambda: self.client.create_experiment(
                        experiment,
                        artifact_location=artifact_root_for(tracking_uri),
                        tags=dict(EXPERIMENT_TAGS),
                    ),
                    "create experiment",
                )
            else:
                self.experiment_id = found.experiment_id
        self.experiment = experiment

    # --- runs ------------------------------------------------------------------
    def find_runs(self, **tags: str) -> list[Any]:
        """Runs of this experiment carrying all ``tags`` (newest first), every page of
        the search (MLflow returns at most 1,000 runs per call)."""
        clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        runs: list[Any] = []
        token: str | None = None
        while True:
            page = _retry(
                lambda t=token: self.client.search_runs(
                    [self.experiment_id],
                    filter_string=" and ".join(clauses),
                    order_by=["attributes.start_time DESC"],
                    max_results=SEARCH_PAGE,
                    page_token=t,
                ),
                "search",
            )
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def get_or_create_run(
        self, run_name: str, tags: Mapping[str, str], key_tags: Mapping[str, str]
    ) -> tuple[str, bool]:
        """The run with ``key_tags``, or a new one; returns ``(run_id, created)``.

        A run found again (study resumed) is set back to RUNNING.
        """
        existing = self.find_runs(**key_tags)
        if existing:
            run_id = existing[0].info.run_id
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")
            return run_id, False
        run = _retry(
            lambda: self.client.create_run(
                self.experiment_id, run_name=run_name, tags={**tags, **key_tags}
            ),
            "create run",
        )
        return run.info.run_id, True

    # --- logging ---------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params that are not logged yet (MLflow params are write-once)."""
        from mlflow.entities import Param

        current = _retry(lambda: self.client.get_run(run_id), "get run").data.params
        new = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in params.items() if k not in current]
        for i in range(0, len(new), 100):
            chunk = new[i : i + 100]
            _retry(lambda c=chunk: self.client.log_batch(run_id, params=c), "log params")

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (the epoch for training runs)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        for i in range(0, len(batch), 500):
            chunk = batch[i : i + 500]
            _retry(lambda c=chunk: self.client.log_batch(run_id, metrics=c), "log metrics")

    def last_step(self, run_id: str, metric: str) -> int:
        """The largest step logged for ``metric`` in a run (0 when none)."""
        history = _retry(lambda: self.client.get_metric_history(run_id, metric), "history")
        return max((int(m.step) for m in history), default=0)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags of a run."""
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        _retry(lambda: self.client.log_batch(run_id, tags=batch), "set tags")

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            _retry(
                lambda: self.client.log_artifacts(run_id, str(path), artifact_path),
                "log artifacts",
            )
        elif path.is_file():
            _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path), "artifact")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store ``text`` as an artifact file."""
        _retry(lambda: self.client.log_text(run_id, text, artifact_file), "log text")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        _retry(lambda: self.client.set_terminated(run_id, status=status), "end run")


class MlflowRunReporter:
    """A loop reporter that records one in-process training as a study of one.

    Creates (or finds) the experiment ``experiment``, a parent run and one child
    run with the config as params; logs every epoch's metrics with the epoch as
    step, and at the end the test metrics, checkpoints and energies.
    """

    def __init__(self, tracker: MlflowTracker, config: Mapping[str, Any], run_name: str) -> None:
        import yaml

        self.tracker = tracker
        parent = tracker.client.create_run(
            tracker.experiment_id,
            run_name=run_name,
            tags={TAG_STUDY: tracker.experiment, TAG_ROLE: "study", "energy_study.parent": "true"},
        )
        self.parent_id = parent.info.run_id
        child = tracker.client.create_run(
            tracker.experiment_id,
            run_name=f"{run_name}-train",
            tags={
                PARENT_TAG: self.parent_id,
                TAG_STUDY: tracker.experiment,
                TAG_ROLE: "trial",
                TAG_TRIAL: "train",
            },
        )
        self.run_id = child.info.run_id
        tracker.log_params(self.run_id, flatten(config))
        tracker.log_text(self.run_id, yaml.safe_dump(dict(config), sort_keys=False), "config.yaml")

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.tracker.log_metrics(self.run_id, {"epoch": epoch, **metrics}, step=epoch)

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        last = self.tracker.client.get_run(self.run_id).data.metrics.get("epoch", 0)
        self.tracker.log_metrics(self.run_id, metrics, step=int(last))
        for name, path in artifacts.items():
            self.tracker.log_artifact(
                self.run_id, path, "checkpoints" if name.startswith("checkpoint") else None
            )
        out = Path(next(iter(artifacts.values()))).parent if artifacts else None
        if out is not None:
            self.tracker.log_artifact(self.run_id, out / "metrics.jsonl")
            from study.ui import ENERGY_HIST, energy_histogram

            hist = energy_histogram(out / "energies.npz", out / ENERGY_HIST, "study train")
            if hist is not None:
                self.tracker.log_artifact(self.run_id, hist)
        self.tracker.set_tags(self.run_id, {"energy_study.early_stopped": "false"})
        self.end("FINISHED")

    def end(self, status: str) -> None:
        """Close the child and the parent run."""
        self.tracker.end_run(self.run_id, status)
        self.tracker.end_run(self.parent_id, status)
