"""MLflow tracking of studies, written from one place: the driver.

Layout: one experiment per study; one parent run for the study (spec, search
space, git commit, versions); one child run per trial (its config as params,
every per-epoch metric with the epoch as step, checkpoints, final test
metrics, status and failure reason).

All writes of a study go through one :class:`MlflowTracker` living in the driver
process, so concurrent trials never write to the SQLite store at the same time; on
top of that each call the tracker makes to MLflow (writes, its searches and
downloads) is retried while the store answers "database is locked" (a call on
``tracker.client`` directly is not; ``study report`` logs its report with the same
:func:`reports.data.retry`). Runs are found again by tags (study name, trial id), so
resuming a study reuses its runs instead of duplicating them. Tag and artifact
names: :mod:`reports.vocabulary`.

The trials' writes are made by the MLflow callback's :class:`BackgroundWriter` (one
thread: the Tune loop never waits on the store; a run's metrics, params and tags batched
into as few ``log_batch`` requests as MLflow's limits allow, :func:`batch_chunks`; order
kept; what fails for good recorded per run in :attr:`BackgroundWriter.lost`).
:meth:`MlflowTracker.log_artifact` raises on a missing file: a caller
records what a run lacks instead of skipping it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from reports.data import retry, search_runs, tags_filter
from reports.vocabulary import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    ENERGIES_FILE,
    ENERGY_HIST,
    METRICS_LOG,
    PARENT_STUDY,
    PARENT_TAG,
    ROLE_STUDY,
    ROLE_TRIAL,
    TAG_EARLY,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
    TRAIN_TRIAL,
)
from study.ui import EXPERIMENT_TAGS, energy_histogram

log = logging.getLogger(__name__)
MAX_PARAM_LEN = 6000


def recorded_study(tracking_uri: str, name: str) -> tuple[bool, list[str]]:
    """Whether the MLflow store at ``tracking_uri`` holds trial runs of study ``name``,
    and the studies (experiments) it holds; creates nothing (a SQLite file that is not
    there holds no study and is not made).

    Args:
        tracking_uri: an MLflow tracking URI.
        name: the study's name (its experiment).
    """
    from reports.data import all_experiments, client_for

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).is_file():
        return False, []
    with store_lock(tracking_uri):
        client = client_for(tracking_uri)
    found = False
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        wanted = tags_filter({TAG_STUDY: name, TAG_ROLE: ROLE_TRIAL})
        found = bool(search_runs(client, [experiment.experiment_id], wanted))
    known = sorted(e.name for e in all_experiments(client) if e.name != "Default")
    return found, known


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


#: MLflow's limits on one ``log_batch`` request: metrics, params, tags, all together.
BATCH_METRICS, BATCH_PARAMS, BATCH_TAGS, BATCH_ENTITIES = 1000, 100, 100, 1000


def batch_chunks(
    metrics: list[Any], params: list[Any], tags: list[Any]
) -> Iterator[tuple[list[Any], list[Any], list[Any]]]:
    """Split what one run logs into ``(metrics, params, tags)`` chunks that each fit one
    ``log_batch`` request (at most :data:`BATCH_PARAMS` params, :data:`BATCH_TAGS` tags,
    :data:`BATCH_METRICS` metrics and :data:`BATCH_ENTITIES` entries in all), in order;
    nothing when all three are empty."""
    m, p, t = list(metrics), list(params), list(tags)
    while m or p or t:
        p_chunk, p = p[:BATCH_PARAMS], p[BATCH_PARAMS:]
        t_chunk, t = t[:BATCH_TAGS], t[BATCH_TAGS:]
        room = min(BATCH_METRICS, BATCH_ENTITIES - len(p_chunk) - len(t_chunk))
        m_chunk, m = m[:room], m[room:]
        yield m_chunk, p_chunk, t_chunk


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
            found = retry(lambda: self.client.get_experiment_by_name(experiment), "lookup")
            if found is None:
                # tells the MLflow UI this is model training, not GenAI (study/ui.py)
                self.experiment_id = retry(
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
        order = ["attributes.start_time DESC"]
        return search_runs(self.client, [self.experiment_id], tags_filter(tags), order)

    def get_or_create_run(
        self, run_name: str, tags: Mapping[str, str], key_tags: Mapping[str, str]
    ) -> tuple[str, bool]:
        """The run with ``key_tags``, or a new one; returns ``(run_id, created)``.

        A run found again (study resumed) is set back to RUNNING.
        """
        existing = self.find_runs(**key_tags)
        if existing:
            run_id = existing[0].info.run_id
            self.reopen_run(run_id)
            return run_id, False
        return self.create_run(run_name, {**tags, **key_tags}), True

    def reopen_run(self, run_id: str) -> None:
        """Set a run found again (a study resumed) back to RUNNING."""
        retry(lambda: self.client.update_run(run_id, status="RUNNING"), "reopen run")

    def create_run(self, run_name: str, tags: Mapping[str, str]) -> str:
        """A new run of this experiment with ``tags``; returns its id."""
        create = self.client.create_run
        run = retry(lambda: create(self.experiment_id, run_name=run_name, tags=dict(tags)), "run")
        return run.info.run_id

    def get_run(self, run_id: str) -> Any:
        """The MLflow run ``run_id`` (info and data)."""
        return retry(lambda: self.client.get_run(run_id), "get run")

    def download(self, run_id: str, artifact: str, folder: str | Path) -> Path:
        """Download a run's artifact into ``folder``; returns the local path."""
        get = self.client.download_artifacts
        return Path(retry(lambda: get(run_id, artifact, str(folder)), "download"))

    # --- logging ---------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Log params that are not logged yet (MLflow params are write-once)."""
        current = self.get_run(run_id).data.params
        self.log_batch(run_id, [], params={k: v for k, v in params.items() if k not in current})

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        """Log numeric metrics at ``step`` (the epoch for training runs)."""
        numbers = [(k, v) for k, v in metrics.items() if not isinstance(v, bool)]
        self.log_batch(run_id, [(k, v, step) for k, v in numbers if isinstance(v, int | float)])

    def log_series(self, run_id: str, key: str, values: Iterable[float]) -> None:
        """Log metric ``key`` with ``values`` at steps 0, 1, … (a per-step trace)."""
        self.log_batch(run_id, [(key, v, step) for step, v in enumerate(values)])

    def log_points(self, run_id: str, points: list[tuple[str, float, int]]) -> None:
        """Log ``(key, value, step)`` metric points in as few ``log_batch`` calls as
        MLflow allows (:func:`batch_chunks`)."""
        self.log_batch(run_id, points)

    def log_batch(
        self,
        run_id: str,
        points: list[tuple[str, float, int]],
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> int:
        """Log metric points ``(key, value, step)``, params and tags of one run together,
        in as few ``log_batch`` requests as MLflow's limits allow (:func:`batch_chunks`);
        returns how many requests that took.

        Args:
            run_id: the run.
            points: metric points; the value a float, the step the epoch for trial runs.
            params: params to log (write-once in MLflow: a param the run already holds
                must come with the same value).
            tags: tags to set (or overwrite).
        """
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(v), now, step) for key, v, step in points]
        param_list = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in (params or {}).items()]
        tag_list = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        sent = 0
        log = self.client.log_batch
        for m, p, t in batch_chunks(metrics, param_list, tag_list):
            retry(lambda m=m, p=p, t=t: log(run_id, metrics=m, params=p, tags=t), "log batch")
            sent += 1
        return sent

    def last_step(self, run_id: str, metric: str) -> int:
        """The largest step logged for ``metric`` in a run (0 when none)."""
        history = retry(lambda: self.client.get_metric_history(run_id, metric), "history")
        return max((int(m.step) for m in history), default=0)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags of a run."""
        self.log_batch(run_id, [], tags=tags)

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts.

        Raises:
            FileNotFoundError: ``path`` is neither a file nor a folder (never skipped
                silently: the caller records what its run lacks).
        """
        path = Path(path)
        local = str(path)
        if path.is_dir():
            retry(lambda: self.client.log_artifacts(run_id, local, artifact_path), "log artifacts")
        elif path.is_file():
            retry(lambda: self.client.log_artifact(run_id, local, artifact_path), "artifact")
        else:
            raise FileNotFoundError(f"no file or folder {path} to log into run {run_id}")

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Store ``text`` as an artifact file."""
        retry(lambda: self.client.log_text(run_id, text, artifact_file), "log text")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run FINISHED, FAILED or KILLED."""
        retry(lambda: self.client.set_terminated(run_id, status=status), "end run")

    def set_experiment_tags(self, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags of this study's experiment."""
        set_tag = self.client.set_experiment_tag
        for k, v in tags.items():
            retry(lambda k=k, v=v: set_tag(self.experiment_id, k, v), "experiment tag")


@dataclass
class LostWrites:
    """What a run lacks because its batched writes failed for good (:class:`BackgroundWriter`).

    Attributes:
        points: ``(metric key, step)`` of every metric point lost.
        params: names of params lost.
        tags: names of tags lost.
    """

    points: set[tuple[str, int]] = field(default_factory=set)
    params: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.points or self.params or self.tags)

    def describe(self) -> str:
        """One line for the run's tag: how many points, at which steps, of which keys;
        the params and tags lost."""
        parts = []
        if self.points:
            steps = ", ".join(str(s) for s in sorted({s for _, s in self.points}))
            keys = ", ".join(sorted({k for k, _ in self.points}))
            parts.append(f"{len(self.points)} metric points at steps {steps} of {keys}")
        if self.params:
            parts.append(f"params {', '.join(sorted(self.params))}")
        if self.tags:
            parts.append(f"tags {', '.join(sorted(self.tags))}")
        return "; ".join(parts)


class BackgroundWriter:
    """The one thread that makes a driver callback's MLflow writes, so that a slow or
    remote tracking server never holds up the Tune loop.

    Work items run one at a time in the order they were submitted (so a run's writes
    keep their order and a run is ended after everything logged into it); the metric
    points, params and tags that items :meth:`buffer` are sent together, one
    ``log_batch`` per run (more only past MLflow's limits), before the next item that
    is not a pure metrics item and whenever the queue runs dry (a run's params and tags
    without metric points then wait for its first metrics, the next other item, a
    :meth:`flush` or :meth:`close`). An item or batch that
    raises is tried again (``attempts`` in all, waits doubling from ``wait_s`` seconds),
    then recorded in :attr:`errors` and printed on stderr; a batch that failed for good
    is also recorded, per run, in :attr:`lost` (its owner tags the run with it); nothing
    queued is dropped in silence. :meth:`flush` waits until everything submitted so far
    is written; :meth:`close` flushes and ends the thread (call it before the process
    ends).

    Args:
        attempts: tries of one item or batch (MLflow's own retries are inside each).
        wait_s: first wait between two tries, seconds.
        background: False runs every item at once in the caller's thread (the
            synchronous baseline; same order, same batching per item).
    """

    def __init__(self, *, attempts: int = 3, wait_s: float = 0.5, background: bool = True) -> None:
        import queue
        import threading

        self.attempts = attempts
        self.wait_s = wait_s
        self.background = background
        self.errors: list[str] = []  #: what could not be written, one line each
        self.lost: dict[str, LostWrites] = {}  #: run id → what its failed batches held
        self._queue: queue.Queue[tuple[str, Any, bool] | None] = queue.Queue()
        self._pending: dict[str, _Batch] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inside = threading.local()  # .item: this thread runs an item now
        self._closed = False

    def submit(self, what: str, fn: Any, *, metrics_only: bool = False) -> None:
        """Queue ``fn()`` (``what``: how an error names it). ``metrics_only``: the item
        only buffers metric points (they may be sent together with the next items')."""
        if not self.background:
            self._run(what, fn)
            self._send_points()
            return
        with self._lock:
            if self._closed:
                raise RuntimeError("the MLflow writer is closed")
            if self._thread is None:
                import threading

                self._thread = threading.Thread(
                    target=self._loop, name="energy-study-mlflow-writer", daemon=True
                )
                self._thread.start()
        self._queue.put((what, fn, metrics_only))

    def buffer(
        self,
        tracker: MlflowTracker,
        run_id: str,
        points: list[tuple[str, float, int]],
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        """Metric points ``(key, value, step)``, params and tags of ``run_id`` to send
        with the run's next batch. Called from inside an item they wait for that batch;
        from anywhere else (no item running in this thread) they are sent at once.

        Args:
            tracker: the tracker that sends them.
            run_id: the run they belong to.
            points: metric points; step = the epoch for trial runs.
            params: params (write-once in MLflow).
            tags: tags (a later value of the same tag wins).
        """
        inside = getattr(self._inside, "item", False)
        batch = self._pending.setdefault(run_id, _Batch(tracker)) if inside else _Batch(tracker)
        batch.points.extend(points)
        batch.params.update(params or {})
        batch.tags.update(tags or {})
        if not inside:
            self._send(run_id, batch)

    def flush(self) -> None:
        """Wait until every item submitted so far is written (or recorded as failed),
        params and tags waiting for their run's first metrics too."""
        if self.background and self._thread is not None and not self._closed:
            self.submit("flush", lambda: None)  # not a metrics item: all that waits goes
            self._queue.join()

    def close(self) -> None:
        """Flush, then end the thread; later submits are refused."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _loop(self) -> None:
        import queue

        while True:
            item = self._queue.get()
            items = [item]
            while item is not None:  # take what is already waiting: one batch for all
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
            for entry in items:
                if entry is not None:
                    what, fn, metrics_only = entry
                    if not metrics_only:
                        self._send_points()
                    self._run(what, fn)
            # the queue ran dry: what waits goes out, but a run's params and tags alone
            # wait for its first metrics (one log_batch), or the next other item, or close
            self._send_points(hold_bare=items[-1] is not None)
            for _ in items:
                self._queue.task_done()
            if items[-1] is None:
                return

    def _send_points(self, *, hold_bare: bool = False) -> None:
        """Send every run's waiting batch; ``hold_bare``: keep those without metric points."""
        pending, self._pending = self._pending, {}
        for run_id, batch in pending.items():
            if hold_bare and not batch.points:
                self._pending[run_id] = batch
            else:
                self._send(run_id, batch)

    def _send(self, run_id: str, batch: _Batch) -> None:
        """Send one run's batch; what fails for good goes to :attr:`lost`."""
        send = partial(batch.tracker.log_batch, run_id, batch.points, batch.params, batch.tags)
        what = f"{len(batch.points)} metric points"
        if batch.params or batch.tags:
            what += f", {len(batch.params)} params and {len(batch.tags)} tags"
        if not self._run(f"{what} of run {run_id}", send):
            lost = self.lost.setdefault(run_id, LostWrites())
            lost.points.update((key, int(step)) for key, _, step in batch.points)
            lost.params.update(batch.params)
            lost.tags.update(batch.tags)

    def _run(self, what: str, fn: Any) -> bool:
        """``fn()``, tried :attr:`attempts` times; returns whether it went through."""
        wait = self.wait_s
        outer, self._inside.item = getattr(self._inside, "item", False), True
        try:
            for attempt in range(1, self.attempts + 1):
                try:
                    fn()
                    return True
                except Exception as exc:  # noqa: BLE001 - recorded below, never dropped silently
                    if attempt == self.attempts:
                        line = f"MLflow write failed ({what}) after {attempt} tries: {exc}"
                        self.errors.append(line)
                        print(f"warning: {line}", file=sys.stderr, flush=True)
                        return False
                    time.sleep(wait)
                    wait *= 2
        finally:
            self._inside.item = outer
        return False


@dataclass
class _Batch:
    """What one run has waiting in a :class:`BackgroundWriter`."""

    tracker: MlflowTracker
    points: list[tuple[str, float, int]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, Any] = field(default_factory=dict)


class MlflowRunReporter:
    """A loop reporter that records one in-process training as a study of one.

    Creates (or finds) the experiment ``experiment``, a parent run and one child
    run with the config as params; logs every epoch's metrics with the epoch as
    step, and at the end the test metrics, checkpoints and energies.
    """

    def __init__(self, tracker: MlflowTracker, config: Mapping[str, Any], run_name: str) -> None:
        import yaml

        self.tracker = tracker
        study = {TAG_STUDY: tracker.experiment}
        self.parent_id = tracker.create_run(
            run_name, {**study, TAG_ROLE: ROLE_STUDY, TAG_PARENT: PARENT_STUDY}
        )
        self.run_id = tracker.create_run(
            f"{run_name}-train",
            {PARENT_TAG: self.parent_id, **study, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: TRAIN_TRIAL},
        )
        tracker.log_params(self.run_id, flatten(config))
        tracker.log_text(self.run_id, yaml.safe_dump(dict(config), sort_keys=False), CONFIG_FILE)

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        self.tracker.log_metrics(self.run_id, {"epoch": epoch, **metrics}, step=epoch)

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        last = self.tracker.get_run(self.run_id).data.metrics.get("epoch", 0)
        self.tracker.log_metrics(self.run_id, metrics, step=int(last))
        for name, path in artifacts.items():
            folder = CHECKPOINT_DIR if name.startswith("checkpoint") else None
            self.tracker.log_artifact(self.run_id, path, folder)
        if artifacts:
            out = Path(next(iter(artifacts.values()))).parent
            self.tracker.log_artifact(self.run_id, out / METRICS_LOG)
            hist = energy_histogram(out / ENERGIES_FILE, out / ENERGY_HIST, "study train")
            if hist is not None:
                self.tracker.log_artifact(self.run_id, hist)
        self.tracker.set_tags(self.run_id, {TAG_EARLY: "false"})
        self.end("FINISHED")

    def end(self, status: str) -> None:
        """Close the child and the parent run."""
        self.tracker.end_run(self.run_id, status)
        self.tracker.end_run(self.parent_id, status)
