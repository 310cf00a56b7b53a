"""Issue 11's tracking figure: MLflow on a PostgreSQL-backed server vs the SQLite default,
and how the platform's driver cost grows with the number of trials.

``python -m bench.tracking_scale [--quick] [--rounds N] [--sizes 50,100,200] [--out FILE]``
prints a table and writes ``bench/results/<date>-tracking-<label>.json``
(``…-quick.json`` for ``--quick``) with the machine description of
:func:`bench.common.machine`. Not a test: nothing here asserts; the numbers are
reported as they come.

Every study is a real :func:`study.runner.run_study` of tiny trials
(:func:`bench.platform_overhead.tiny_config`: TRADES K=2, small CNN, digits, 256
training images, 1 epoch; the ``fixed`` space, no ASHA, no finalists, the ``direct``
backend) on one local Ray cluster started once with :func:`study.runner.init_ray`, as
``study run`` starts it; the storage is a local temporary folder in every mode.

* **Server vs SQLite** ("track" rows): 8 trials, 4 at once (0.5 CPU each), logging
  into a fresh-per-benchmark SQLite store (the default) or into ``mlflow server`` with
  its backend store on a throw-away PostgreSQL and ``--serve-artifacts`` into moto's
  S3 server (``tests/servers.py``; the servers run on this machine, 127.0.0.1). The
  two modes alternate (S, P, S, P, …) after one dropped warm-up study of each;
  walls are medians over the rounds and the ratio is a ratio of medians.
* **Scaling** ("scale" rows): 50, 100 and 200 trials (``--quick``: 8 and 16), 8 at
  once (0.25 CPU each), SQLite, a fresh store and a fresh local Ray cluster per study
  (as ``study run`` starts one; until 2026-12-03 one cluster served every study, in
  order of size, after the server figure). Driver CPU seconds per trial
  (``getrusage(RUSAGE_SELF)`` of this process, which is the driver, less the CPU of
  this benchmark's own sampler thread), MLflow writes per second, peak driver
  resident memory (``VmHWM``, reset through ``/proc/self/clear_refs`` before each
  study), and the least-squares slope of CPU s/trial against the trial count.

What is counted in every study:

* **records lost**: every result the MLflow callback was handed by Tune
  (``on_trial_result``; its metrics as :func:`study.callbacks.our_metrics` selects
  them, at the epoch as step) against the store, read back with MLflow's client
  after the study: each ``(metric, step, value)`` in ``get_metric_history``; every
  param of the trial's config (:func:`study.tracking.flatten`); every file a finished
  trial's run must have (:data:`trainables.files.FINISHED_RUN_FILES` and the energy
  histogram) in ``list_artifacts``; runs missing, duplicated or not ``FINISHED``.
* **driver time in MLflow calls per result**: the seconds spent inside the
  :class:`study.callbacks.MlflowCallback` Tune hooks (its own ``hook_s`` counter, in
  the Tune loop's thread) and, apart, the seconds of the ``MlflowClient`` calls made
  by its background writer thread, each divided by the results.
* **MLflow writes**: ``MlflowClient`` write calls (``log_batch``, ``create_run``,
  ``set_terminated``, ``log_artifact``, …; each one request to the store) counted by
  wrapping the client's methods, per thread; and the rows the study left in the
  store's ``metrics``, ``params`` and ``tags`` tables.
* **load**: CPU seconds of other processes on the machine during each study (from
  ``/proc``, every 2 s), apart from the benchmark's own tree and the servers'.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import CLK_TCK, REPO, load_average, machine, median, render, wait_for_idle

#: The name of the MLflow callback's writer thread (:class:`study.tracking.BackgroundWriter`).
WRITER_THREAD = "energy-study-mlflow-writer"
#: ``MlflowClient`` methods that write to the store (each call is one store request).
WRITE_CALLS = (
    "create_experiment", "set_experiment_tag", "create_run", "update_run", "set_terminated",
    "log_batch", "log_metric", "log_param", "set_tag", "log_artifact", "log_artifacts",
    "log_text", "log_dict",
)  # fmt: skip
#: ``MlflowClient`` methods that read from the store.
READ_CALLS = (
    "get_experiment_by_name", "get_run", "search_runs", "get_metric_history",
    "list_artifacts", "download_artifacts",
)  # fmt: skip
COMPARE_TRIALS = 8  #: trials of a server-vs-SQLite study
COMPARE_CONCURRENT = 4  #: of which at once
COMPARE_CPUS = 0.5  #: CPUs per trial there (4 × 0.5 = the 2 cores)
SCALE_CONCURRENT = 8  #: trials at once in the scaling studies
SCALE_CPUS = 0.25  #: CPUs per trial there (8 × 0.25 = the 2 cores)


# --- instrumentation ---------------------------------------------------------------------
@dataclass
class Probe:
    """Counts the MLflow client's calls by thread and keeps what Tune handed the MLflow
    callback, between :meth:`begin` and :meth:`end` (installed by :meth:`installed`).

    Attributes:
        calls: ``"<thread kind>:<method>"`` → calls (thread kind: ``writer`` for the
            callback's background writer, ``driver`` for any other thread).
        seconds: the same keys → wall seconds inside those calls.
        results: ``(trial_id, config, result)`` of every ``on_trial_result``.
        callbacks: the study's :class:`study.callbacks.MlflowCallback` objects.
        writer_cpu_s: CPU seconds used by the writer threads
            (:class:`study.tracking.BackgroundWriter`) that ended since :meth:`begin`.
        histogram_cpu_s: of which drawing the trials' energy histograms (a PNG per
            finished trial, :func:`study.ui.energy_histogram`).
    """

    calls: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    results: list[tuple[str, dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    callbacks: list[Any] = field(default_factory=list)
    writer_cpu_s: float = 0.0
    histogram_cpu_s: float = 0.0
    active: bool = False
    _depth: threading.local = field(default_factory=threading.local)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin(self) -> None:
        """Forget the counts of the last study and start counting."""
        self.calls, self.seconds, self.results, self.callbacks = {}, {}, [], []
        self.writer_cpu_s = self.histogram_cpu_s = 0.0
        self.active = True

    def end(self) -> None:
        """Stop counting (the benchmark's own read-back is not counted)."""
        self.active = False

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        probe = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(probe._depth, "n", 0)
            if not probe.active or depth:  # an inner call of an outer counted one
                return original(*args, **kwargs)
            probe._depth.n = 1
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                probe._depth.n = 0
                kind = "writer" if threading.current_thread().name == WRITER_THREAD else "driver"
                key = f"{kind}:{name}"
                with probe._lock:
                    probe.calls[key] = probe.calls.get(key, 0) + 1
                    probe.seconds[key] = probe.seconds.get(key, 0.0) + spent

        return counted

    @contextlib.contextmanager
    def installed(self) -> Iterator[Probe]:
        """Wrap the client's methods and the callback's ``__init__``/``on_trial_result``
        (class attributes, so the callback that ``run_study`` makes is seen); restored
        on exit."""
        from mlflow.tracking import MlflowClient

        from study import callbacks, tracking

        saved: list[tuple[Any, str, Any]] = []
        loop = tracking.BackgroundWriter._loop

        def timed_loop(writer: Any) -> None:  # the writer thread's own CPU clock
            t0 = time.thread_time()
            try:
                loop(writer)
            finally:
                with self._lock:
                    self.writer_cpu_s += time.thread_time() - t0

        draw = callbacks.energy_histogram

        def timed_draw(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return draw(*args, **kwargs)
            finally:
                with self._lock:
                    self.histogram_cpu_s += time.thread_time() - t0

        saved.append((callbacks, "energy_histogram", draw))
        callbacks.energy_histogram = timed_draw
        saved.append((tracking.BackgroundWriter, "_loop", loop))
        tracking.BackgroundWriter._loop = timed_loop  # type: ignore[method-assign]
        for name in WRITE_CALLS + READ_CALLS:
            original = getattr(MlflowClient, name, None)
            if original is not None:
                saved.append((MlflowClient, name, original))
                setattr(MlflowClient, name, self._wrap(name, original))
        init, on_result = (
            callbacks.MlflowCallback.__init__,
            callbacks.MlflowCallback.on_trial_result,
        )
        probe = self

        def keep(cb: Any, *args: Any, **kwargs: Any) -> None:
            init(cb, *args, **kwargs)
            probe.callbacks.append(cb)

        def seen(cb: Any, iteration: int, trials: list, trial: Any, result: dict, **info: Any):
            if probe.active:  # outside the callback's own hook_s timer
                probe.results.append((trial.trial_id, dict(trial.config), dict(result)))
            return on_result(cb, iteration, trials, trial, result, **info)

        saved += [
            (callbacks.MlflowCallback, "__init__", init),
            (callbacks.MlflowCallback, "on_trial_result", on_result),
        ]
        callbacks.MlflowCallback.__init__ = keep  # type: ignore[method-assign]
        callbacks.MlflowCallback.on_trial_result = seen  # type: ignore[method-assign]
        try:
            yield self
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    def summary(self) -> dict[str, Any]:
        """Calls and seconds per thread kind, writes and reads apart."""
        out: dict[str, Any] = {}
        for kind in ("driver", "writer"):
            for group, names in (("writes", WRITE_CALLS), ("reads", READ_CALLS)):
                keys = [f"{kind}:{n}" for n in names]
                out[f"{kind}_{group}"] = sum(self.calls.get(k, 0) for k in keys)
                out[f"{kind}_{group}_s"] = round(sum(self.seconds.get(k, 0.0) for k in keys), 4)
        out["by_call"] = {k: [self.calls[k], round(self.seconds[k], 4)] for k in sorted(self.calls)}
        return out


class Watch:
    """A sampler thread for one study: the driver's resident memory every ``interval``
    seconds, and every second sample the CPU time of every process on the machine
    (``/proc/*/stat``), split into this benchmark's tree (the driver, Ray and the
    trials), the servers (``server_pids``' trees) and other work.

    Its own CPU time (:meth:`thread_cpu_s`) is taken off the driver's.

    Args:
        interval: seconds between two samples.
        server_roots: pids whose process trees are the tracking servers (PostgreSQL's
            postmaster is not below this process: ``pg_ctl`` detaches it).
    """

    def __init__(self, interval: float = 1.0, server_roots: tuple[int, ...] = ()) -> None:
        self.interval = interval
        self.server_roots = server_roots
        self.rss_max_mib = 0.0
        self.cpu = {"bench": 0.0, "servers": 0.0, "other": 0.0}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clock: int | None = None
        self._ticks = 0

    def _rss(self) -> None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss_max_mib = max(self.rss_max_mib, int(line.split()[1]) / 1024)

    def _cpu(self, count: bool) -> None:
        parents: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                pid = int(entry.name)
                parents[pid] = int(fields[1])
                cpu[pid] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)

        def tree(root: int) -> set[int]:
            found, frontier = {root}, [root]
            while frontier:
                for kid in children.get(frontier.pop(), []):
                    found.add(kid)
                    frontier.append(kid)
            return found

        servers: set[int] = set()
        for root in self.server_roots:
            servers |= tree(root)
        mine = tree(os.getpid()) - servers
        for pid, value in cpu.items():
            delta = value - self._last.get(pid, value)
            self._last[pid] = value
            if count and delta > 0:
                kind = "servers" if pid in servers else "bench" if pid in mine else "other"
                self.cpu[kind] += delta

    def _run(self) -> None:
        self._clock = time.pthread_getcpuclockid(threading.get_ident())
        while not self._stop.wait(self.interval):
            self._rss()
            self._ticks += 1
            if self._ticks % 2 == 0:
                self._cpu(count=True)

    def thread_cpu_s(self) -> float:
        """CPU seconds this sampler's thread has used so far."""
        return time.clock_gettime(self._clock) if self._clock is not None else 0.0

    def __enter__(self) -> Watch:
        self._rss()
        self._cpu(count=False)
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)
        self._thread.start()
        while self._clock is None:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._rss()
        self._cpu(count=True)


def _driver_cpu_s() -> float:
    """CPU seconds (user + system) of this process, every thread."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def _reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current resident size (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _slope(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """Least-squares line ``y = a + b x``: ``(b, a)``; None with fewer than 2 distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return b, my - b * mx


# --- the store, read back -------------------------------------------------------------------
def lost_records(
    tracking_uri: str, spec: Any, results: list[tuple[str, dict[str, Any], dict[str, Any]]]
) -> dict[str, Any]:
    """What the study's store lacks of what its trials reported (counts, 0 = nothing lost).

    Args:
        tracking_uri: the store the study logged into.
        spec: the study (:class:`study.spec.StudySpec`).
        results: ``(trial_id, config, result)`` of every result Tune handed the callback.
    """
    from mlflow.tracking import MlflowClient

    from reports.data import search_runs, tags_filter
    from reports.vocabulary import (
        ENERGY_HIST,
        ROLE_TRIAL,
        TAG_ARTIFACT_ERROR,
        TAG_ROLE,
        TAG_STUDY,
        TAG_TRIAL,
    )
    from study.callbacks import our_metrics
    from study.tracking import flatten
    from trainables.files import FINISHED_RUN_FILES

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(spec.name)
    runs = (
        search_runs(
            client,
            [experiment.experiment_id],
            tags_filter({TAG_STUDY: spec.name, TAG_ROLE: ROLE_TRIAL}),
        )
        if experiment is not None
        else []
    )
    by_trial: dict[str, list[Any]] = {}
    for run in runs:
        by_trial.setdefault(run.data.tags.get(TAG_TRIAL, "?"), []).append(run)
    expected: dict[str, dict[str, Any]] = {}
    for trial_id, config, result in results:
        entry = expected.setdefault(trial_id, {"config": config, "points": []})
        metrics = our_metrics(result)
        step = int(metrics.get("epoch", result.get("training_iteration", 0)))
        entry["points"] += [(k, v, step) for k, v in metrics.items()]
    out = {
        "trials_reported": len(expected),
        "results_expected": spec.trials * spec.trial_config({}).epochs,
        "results_reported": len(results),
        "trial_runs_in_store": len(runs),
        "runs_missing": 0,
        "runs_duplicated": sum(len(v) - 1 for v in by_trial.values() if len(v) > 1),
        "runs_not_finished": 0,
        "metric_points_expected": 0,
        "metric_points_lost": 0,
        "params_expected": 0,
        "params_lost": 0,
        "artifacts_expected": 0,
        "artifacts_lost": 0,
        "artifact_error_tags": 0,
    }
    wanted_files = [*FINISHED_RUN_FILES, ENERGY_HIST]
    for trial_id, entry in expected.items():
        params = flatten(spec.trial_config(entry["config"]).to_dict())
        out["metric_points_expected"] += len(entry["points"])
        out["params_expected"] += len(params)
        out["artifacts_expected"] += len(wanted_files)
        found = by_trial.get(trial_id)
        if not found:
            out["runs_missing"] += 1
            out["metric_points_lost"] += len(entry["points"])
            out["params_lost"] += len(params)
            out["artifacts_lost"] += len(wanted_files)
            continue
        run = found[0]
        run_id = run.info.run_id
        out["runs_not_finished"] += run.info.status != "FINISHED"
        out["artifact_error_tags"] += TAG_ARTIFACT_ERROR in run.data.tags
        history: dict[str, list[Any]] = {}
        for key, value, step in entry["points"]:
            if key not in history:
                history[key] = client.get_metric_history(run_id, key)
            hit = any(
                int(m.step) == step and abs(m.value - value) <= 1e-9 * max(1.0, abs(value))
                for m in history[key]
            )
            out["metric_points_lost"] += not hit
        stored = run.data.params
        out["params_lost"] += sum(stored.get(k) != v for k, v in params.items())
        listed: set[str] = set()
        folders: list[str | None] = [None]
        while folders:
            for info in client.list_artifacts(run_id, folders.pop()):
                if info.is_dir:
                    folders.append(info.path)
                else:
                    listed.add(info.path)
        out["artifacts_lost"] += sum(f not in listed for f in wanted_files)
    out["records_lost"] = (
        out["runs_missing"] + out["metric_points_lost"] + out["params_lost"] + out["artifacts_lost"]
    )
    return out


_ROWS_SQL = (
    "SELECT count(*) FROM {table} t JOIN runs r ON t.run_uuid = r.run_uuid "
    "WHERE r.experiment_id = {experiment}"
)


def store_rows(count: Callable[[str], int], experiment_id: str) -> dict[str, int]:
    """Rows of the experiment's runs in the store's ``metrics``, ``params``, ``tags``.

    Args:
        count: runs one ``SELECT count(*)`` on the store's database, returns the number.
        experiment_id: the study's MLflow experiment.
    """
    return {
        table: count(_ROWS_SQL.format(table=table, experiment=int(experiment_id)))
        for table in ("metrics", "params", "tags")
    }


def sqlite_counter(tracking_uri: str) -> Callable[[str], int]:
    """:func:`store_rows`' ``count`` for a ``sqlite:///`` store."""
    path = tracking_uri[len("sqlite:///") :]

    def count(sql: str) -> int:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return int(db.execute(sql).fetchone()[0])

    return count


# --- studies -------------------------------------------------------------------------------
@dataclass
class Bench:
    """One benchmark session: the probe, the servers' pids, the storage root.

    Attributes:
        root: temporary folder for the studies' storage and the SQLite stores.
        probe: the installed :class:`Probe`.
        server_roots: process trees of the tracking servers (for the load split).
        counters: tracking URI → row counter of its database (:func:`store_rows`).
    """

    root: Path
    probe: Probe
    server_roots: tuple[int, ...] = ()
    counters: dict[str, Callable[[str], int]] = field(default_factory=dict)
    count: int = 0

    def study(
        self, mode: str, tracking_uri: str, trials: int, concurrent: int, cpus: float
    ) -> dict[str, Any]:
        """Run one study of tiny trials and measure it (see the module docstring).

        Args:
            mode: a label (``sqlite``, ``server``).
            tracking_uri: where it logs.
            trials: trials of the study.
            concurrent: trials at once (``max_concurrent``).
            cpus: CPUs each trial reserves (``cpus_per_worker``; fractions allowed).
        """
        from mlflow.tracking import MlflowClient

        from bench.platform_overhead import tiny_config
        from study.runner import run_study
        from study.spec import StudySpec

        self.count += 1
        spec = StudySpec(
            name=f"track-{self.count}-{mode}-{trials}", space="fixed", base=tiny_config(),
            trials=trials, max_concurrent=concurrent, cpus_per_worker=cpus, backend="direct",
            asha=False, finalists=0, tracking_uri=tracking_uri,
            storage=str(self.root / "studies"),
        )  # fmt: skip
        reset = _reset_peak_rss()
        self.probe.begin()
        with Watch(server_roots=self.server_roots) as watch:
            cpu0, sampler0, t0 = _driver_cpu_s(), watch.thread_cpu_s(), time.perf_counter()
            outcome = run_study(spec)
            wall = time.perf_counter() - t0
            cpu = _driver_cpu_s() - cpu0 - (watch.thread_cpu_s() - sampler0)
        self.probe.end()
        peak = _peak_rss_mib()
        calls = self.probe.summary()
        results = list(self.probe.results)
        cb = self.probe.callbacks[-1] if self.probe.callbacks else None
        n_results = cb.results if cb is not None else len(results)
        finished = sum(t.status == "FINISHED" for t in outcome.trials)
        lost = lost_records(tracking_uri, spec, results)
        experiment = MlflowClient(tracking_uri).get_experiment_by_name(spec.name)
        rows = (
            store_rows(self.counters[tracking_uri], experiment.experiment_id)
            if tracking_uri in self.counters and experiment is not None
            else None
        )
        writes = calls["driver_writes"] + calls["writer_writes"]
        per = max(n_results, 1)
        out = {
            "mode": mode,
            "trials": trials,
            "concurrent": concurrent,
            "cpus_per_trial": cpus,
            "finished": finished,
            "wall_s": round(wall, 2),
            "driver_cpu_s": round(cpu, 2),
            "driver_cpu_s_per_trial": round(cpu / trials, 4),
            "driver_peak_rss_mib": round(peak, 1) if reset else None,
            "driver_max_sampled_rss_mib": round(watch.rss_max_mib, 1),
            "results": n_results,
            "hook_s": round(cb.hook_s, 4) if cb is not None else None,
            "hook_ms_per_result": round(1000 * cb.hook_s / per, 3) if cb is not None else None,
            "writer_calls_s": calls["writer_writes_s"] + calls["writer_reads_s"],
            "writer_ms_per_result": round(
                1000 * (calls["writer_writes_s"] + calls["writer_reads_s"]) / per, 2
            ),
            "writer_thread_cpu_s": round(self.probe.writer_cpu_s, 3),
            "writer_thread_cpu_s_per_trial": round(self.probe.writer_cpu_s / trials, 4),
            "histogram_cpu_s_per_trial": round(self.probe.histogram_cpu_s / trials, 4),
            "driver_thread_mlflow_s": calls["driver_writes_s"] + calls["driver_reads_s"],
            "writer_errors": len(cb.writer.errors) if cb is not None else None,
            "mlflow_writes": writes,
            "mlflow_writes_per_s": round(writes / wall, 2),
            "store_rows": rows,
            "store_rows_per_s": round(sum(rows.values()) / wall, 1) if rows else None,
            "calls": calls,
            "lost": lost,
            "cpu_s_during": {k: round(v, 1) for k, v in watch.cpu.items()},
            "other_share_of_machine": round(
                watch.cpu["other"] / max(wall * (os.cpu_count() or 1), 1e-9), 4
            ),
            "load_after": load_average(),
        }
        print(
            f"[tracking] {spec.name}: {wall:.1f} s wall, driver {cpu:.1f} CPU-s "
            f"({cpu / trials:.3f}/trial), {finished}/{trials} finished, {n_results} results, "
            f"hooks {out['hook_ms_per_result']} ms/result, writer {out['writer_ms_per_result']} "
            f"ms/result, {writes} writes ({out['mlflow_writes_per_s']}/s), lost "
            f"{lost['records_lost']}, peak RSS {out['driver_peak_rss_mib']} MiB, other work "
            f"{100 * out['other_share_of_machine']:.1f}%",
            flush=True,
        )
        return out


def _new_sqlite(bench: Bench, label: str) -> str:
    """A fresh SQLite store, its schema made now (a once-per-store cost, not timed)."""
    from study.tracking import MlflowTracker

    folder = bench.root / label
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    MlflowTracker(uri, "bench-store")
    bench.counters[uri] = sqlite_counter(uri)
    return uri


@contextlib.contextmanager
def servers(bench: Bench) -> Iterator[str]:
    """PostgreSQL, moto's S3 and ``mlflow server`` on 127.0.0.1 (``tests/servers.py``);
    yields the tracking URI; stops all three on exit."""
    sys.path.insert(0, str(REPO / "tests"))
    import servers as test_servers  # tests/ is on the path, not a package

    postgres = s3 = mlflow = None
    try:
        t0 = time.perf_counter()
        postgres = test_servers.start_postgres()
        s3 = test_servers.start_s3()
        (bench.root / "server").mkdir(parents=True, exist_ok=True)
        mlflow = test_servers.start_mlflow_server(postgres, s3, folder=bench.root / "server")
        print(f"[tracking] servers up in {time.perf_counter() - t0:.1f} s", flush=True)
        postmaster = int((postgres.data / "postmaster.pid").read_text().split()[0])
        roots = [postmaster]
        roots += [p.proc.pid for p in (s3, mlflow) if p is not None and p.proc is not None]
        bench.server_roots = tuple(roots)

        def count(sql: str) -> int:
            return int(postgres.psql(sql, db="mlflow").strip())

        bench.counters[mlflow.uri] = count
        from study.tracking import MlflowTracker

        MlflowTracker(mlflow.uri, "bench-store")  # the schema and the first connection
        yield mlflow.uri
    finally:
        for server in (mlflow, s3, postgres):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        bench.server_roots = ()


def compare(bench: Bench, rounds: int, warmup: bool) -> dict[str, Any]:
    """Server vs SQLite, alternated; ``warmup``: one dropped study of each first."""
    sqlite_uri = _new_sqlite(bench, "compare")
    runs: dict[str, list[dict[str, Any]]] = {"sqlite": [], "server": []}
    warm: list[dict[str, Any]] = []
    with servers(bench) as server_uri:
        uris = {"sqlite": sqlite_uri, "server": server_uri}
        args = (COMPARE_TRIALS, COMPARE_CONCURRENT, COMPARE_CPUS)
        if warmup:
            for mode in ("sqlite", "server"):
                warm.append(bench.study(mode, uris[mode], 4, COMPARE_CONCURRENT, COMPARE_CPUS))
        for _ in range(rounds):
            for mode in ("sqlite", "server"):
                runs[mode].append(bench.study(mode, uris[mode], *args))
    walls = {m: median(r["wall_s"] for r in rs) for m, rs in runs.items()}

    def med(mode: str, key: str) -> float:
        return median(r[key] for r in runs[mode])

    return {
        "setup": {
            "trials": COMPARE_TRIALS,
            "concurrent": COMPARE_CONCURRENT,
            "cpus_per_trial": COMPARE_CPUS,
            "rounds": rounds,
            "warmup_studies": len(warm),
            "workload": "tiny_config(): TRADES K=2, small_cnn, digits, 256 train, 1 epoch",
            "server": "mlflow server, backend PostgreSQL (throw-away cluster), "
            "--serve-artifacts into moto S3; all on 127.0.0.1 of this machine",
        },
        "wall_s": walls,
        "ratio_server_over_sqlite": walls["server"] / walls["sqlite"],
        "per_round_ratio": [
            p["wall_s"] / s["wall_s"] for s, p in zip(runs["sqlite"], runs["server"])
        ],
        "hook_ms_per_result": {m: med(m, "hook_ms_per_result") for m in runs},
        "writer_ms_per_result": {m: med(m, "writer_ms_per_result") for m in runs},
        "driver_cpu_s_per_trial": {m: med(m, "driver_cpu_s_per_trial") for m in runs},
        "records_lost": {m: sum(r["lost"]["records_lost"] for r in runs[m]) for m in runs},
        "warmup": warm,
        "runs": runs,
    }


def scale(bench: Bench, sizes: list[int], until: float | None = None) -> dict[str, Any]:
    """Studies of ``sizes`` trials, 8 at once, each into a fresh SQLite store.

    Args:
        sizes: trial counts, one study each, in this order.
        until: a deadline (``time.time()`` seconds): a study whose expected wall time
            (the last study's seconds per trial, +15%; 5 s per trial for the first)
            would end after it is skipped, and named in ``skipped``.
    """
    runs: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for n in sizes:
        per_trial_s = runs[-1]["wall_s"] / runs[-1]["trials"] if runs else 5.0
        expected = 1.15 * per_trial_s * n + 15.0
        if until is not None and time.time() + expected > until:
            left = until - time.time()
            print(
                f"[tracking] skipping the {n}-trial study: about {expected:.0f} s expected, "
                f"{left:.0f} s left before the deadline",
                flush=True,
            )
            skipped.append({"trials": n, "expected_s": round(expected), "left_s": round(left)})
            continue
        uri = _new_sqlite(bench, f"scale-{n}")
        _fresh_cluster()
        runs.append(bench.study("sqlite", uri, n, SCALE_CONCURRENT, SCALE_CPUS))
    xs = [float(r["trials"]) for r in runs]
    per_trial = _slope(xs, [r["driver_cpu_s_per_trial"] for r in runs])
    total = _slope(xs, [r["driver_cpu_s"] for r in runs])
    return {
        "setup": {
            "sizes": sizes,
            "concurrent": SCALE_CONCURRENT,
            "cpus_per_trial": SCALE_CPUS,
            "store": "SQLite, a fresh store per study",
            "cluster": "a fresh local Ray cluster per study (as `study run` starts one)",
        },
        "cpu_s_per_trial_slope": per_trial[0] if per_trial else None,
        "cpu_s_total_fit": {"per_trial": total[0], "fixed": total[1]} if total else None,
        "runs": runs,
        "skipped": skipped,
    }


def _fresh_cluster() -> None:
    """Stop this process's Ray cluster and start a new one, as ``study run`` does for
    each study: a cluster kept from earlier studies adds its own history (placement
    groups, dead actors, log files) to the later, larger studies' cost."""
    import ray

    from study.runner import init_ray

    ray.shutdown()
    init_ray(None)
    time.sleep(2.0)  # let the fresh cluster's processes settle


def _flat(slope: float | None, runs: list[dict[str, Any]]) -> str:
    """``yes`` when the fitted change of CPU s/trial over the measured range of trial
    counts is within 10% of the mean CPU s/trial (or falls), ``NO`` otherwise."""
    if slope is None:
        return ""
    span = max(r["trials"] for r in runs) - min(r["trials"] for r in runs)
    mean = sum(r["driver_cpu_s_per_trial"] for r in runs) / len(runs)
    return "yes" if slope * span <= 0.1 * mean else "NO"


# --- table ----------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> list[list[str]]:
    """Rows: figure, measure, value, target, met."""
    rows: list[list[str]] = []
    c = res.get("compare")
    if c:
        n = c["setup"]["rounds"]
        lost = c["records_lost"]
        total_lost = lost["sqlite"] + lost["server"]
        everything = [r for rs in c["runs"].values() for r in rs]

        def med_of(runs: list[dict[str, Any]]) -> str:
            return f"{median(r['cpu_s_during']['servers'] for r in runs):.1f}"

        def med_w(runs: list[dict[str, Any]]) -> str:
            found = [r["writer_thread_cpu_s_per_trial"] for r in runs if "writer_thread_cpu_s" in r]
            return f"{median(found):.3f}" if found else "n/a"

        rows += [
            ["track", f"records lost, {n} studies each: SQLite / server",
             f"{lost['sqlite']} / {lost['server']}", "0", "yes" if total_lost == 0 else "NO"],
            ["track", "ms per result in the callback's hooks (Tune thread): SQLite / server",
             f"{c['hook_ms_per_result']['sqlite']:.3f} / {c['hook_ms_per_result']['server']:.3f}",
             "", ""],
            ["track", "writer thread's MLflow calls, ms per result (= per trial): SQLite / server",
             f"{c['writer_ms_per_result']['sqlite']:.1f} / "
             f"{c['writer_ms_per_result']['server']:.1f}", "", ""],
            ["track", f"study wall (s), median of {n}: SQLite / server",
             f"{c['wall_s']['sqlite']:.1f} / {c['wall_s']['server']:.1f}", "", ""],
            ["track", "wall ratio server / SQLite (per round)",
             f"{c['ratio_server_over_sqlite']:.3f} ("
             + ", ".join(f"{r:.3f}" for r in c["per_round_ratio"]) + ")",
             "<= 1.10", "yes" if c["ratio_server_over_sqlite"] <= 1.10 else "NO"],
            ["track", "driver CPU s per trial, all / writer thread: SQLite / server",
             f"{c['driver_cpu_s_per_trial']['sqlite']:.3f}/{med_w(c['runs']['sqlite'])} / "
             f"{c['driver_cpu_s_per_trial']['server']:.3f}/{med_w(c['runs']['server'])}", "", ""],
            ["track", "results handed to the callback / trials x epochs (all studies)",
             f"{sum(r['lost']['results_reported'] for r in everything)} / "
             f"{sum(r['lost']['results_expected'] for r in everything)}", "", ""],
            ["track", "servers' CPU s per study (PostgreSQL, mlflow, moto): SQLite / server",
             f"{med_of(c['runs']['sqlite'])} / {med_of(c['runs']['server'])}", "", ""],
            ["track", "CPU share of other processes per study (max)",
             f"{100 * max(r['other_share_of_machine'] for r in everything):.1f}%", "~0", ""],
        ]  # fmt: skip
    s = res.get("scale")
    if s and s["runs"]:
        runs = s["runs"]

        def each(fmt: Callable[[dict[str, Any]], str]) -> str:
            return " / ".join(fmt(r) for r in runs)

        sizes = "/".join(str(r["trials"]) for r in runs)
        slope = s["cpu_s_per_trial_slope"]
        fit = s["cpu_s_total_fit"]
        if s.get("skipped"):
            names = ", ".join(str(k["trials"]) for k in s["skipped"])
            rows.append(["scale", "studies skipped (would not end by the deadline)", names, "", ""])
        rows += [
            ["scale", f"{sizes} trials, 8 at once: wall (s)",
             each(lambda r: f"{r['wall_s']:.0f}"), "", ""],
            ["scale", "driver CPU s per trial",
             each(lambda r: f"{r['driver_cpu_s_per_trial']:.3f}"), "flat", ""],
            ["scale", "of which the MLflow writer thread (of which the energy histogram)",
             each(lambda r: f"{r.get('writer_thread_cpu_s_per_trial', float('nan')):.3f} "
                  f"({r.get('histogram_cpu_s_per_trial', float('nan')):.3f})"), "", ""],
            ["scale", "slope of driver CPU s/trial against trials",
             "n/a" if slope is None else f"{slope:+.5f} s/trial per trial", "~0 (flat)",
             _flat(slope, runs)],
            ["scale", "CPU s per trial, whole study (driver + Ray + trial processes)",
             each(lambda r: f"{r['cpu_s_during']['bench'] / r['trials']:.2f}"), "", ""],
            ["scale", "driver CPU s = fixed + per trial x N (least squares)",
             "n/a" if fit is None else f"{fit['fixed']:.1f} + {fit['per_trial']:.3f} N", "", ""],
            ["scale", "MLflow write calls per s; store rows per s",
             each(lambda r: f"{r['mlflow_writes_per_s']:.1f}") + "; "
             + each(lambda r: f"{r['store_rows_per_s']}"), "", ""],
            ["scale", "peak driver RSS (MiB)", each(lambda r: f"{r['driver_peak_rss_mib']}"), "",
             ""],
            ["scale", "hook ms / writer ms per result",
             each(lambda r: f"{r['hook_ms_per_result']:.3f}/{r['writer_ms_per_result']:.1f}"),
             "", ""],
            ["scale", "records lost", each(lambda r: str(r["lost"]["records_lost"])), "0",
             "yes" if all(r["lost"]["records_lost"] == 0 for r in runs) else "NO"],
            ["scale", "CPU share of other processes per study",
             each(lambda r: f"{100 * r['other_share_of_machine']:.1f}%"), "~0", ""],
        ]  # fmt: skip
    return rows


# --- main ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the figure; returns the exit status (1 if a part failed)."""
    parser = argparse.ArgumentParser(prog="python -m bench.tracking_scale", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 8/16 trials")
    parser.add_argument("--rounds", type=int, default=None, help="server/SQLite rounds (3)")
    parser.add_argument("--sizes", default=None, help="scaling trial counts (50,100,200)")
    parser.add_argument("--skip", default="", help="parts to skip: compare, scale")
    parser.add_argument("--no-wait", action="store_true", help="no wait for idle CPUs first")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/…)")
    parser.add_argument(
        "--until",
        default=None,
        help="HH:MM (UTC, today): skip a scaling study that would not end by then",
    )
    parser.add_argument("--table-from", default=None, help="print the table of a results file")
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(render(table(saved["figures"])))
        return 0
    rounds = args.rounds or (1 if args.quick else 3)
    default_sizes = "8,16" if args.quick else "50,100,200"
    sizes = [int(v) for v in (args.sizes or default_sizes).split(",") if v.strip()]
    skip = {v.strip() for v in args.skip.split(",") if v.strip()}
    until = None
    if args.until:
        hour, minute = (int(v) for v in args.until.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        until = now.replace(hour=hour, minute=minute, second=0, microsecond=0).timestamp()

    import ray
    import torch

    from study.runner import init_ray

    torch.set_num_threads(2)
    info = machine()
    started = time.time()
    date = dt.date.today().isoformat()
    name = f"{date}-tracking-{info['label']}{'-quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    wait = (
        {"skipped": True}
        if args.no_wait or args.quick
        else wait_for_idle(max_wait_s=120.0, threshold=0.15, poll_s=15.0)
    )
    payload: dict[str, Any] = {
        "date": date,
        "mode": "quick-smoke" if args.quick else "full",
        "machine": info,
        "load": {"wait_for_idle": wait, "at_start": load_average()},
        "figures": {},
        "errors": {},
    }

    def save() -> None:
        payload["duration_s"] = round(time.time() - started, 1)
        payload["load"]["at_end"] = load_average()
        out.write_text(json.dumps(payload, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        bench = Bench(Path(tmp), Probe())
        t0 = time.perf_counter()
        init_ray(None)
        payload["ray_cluster_start_s"] = round(time.perf_counter() - t0, 2)
        time.sleep(2.0)  # let the fresh cluster's processes settle
        try:
            with bench.probe.installed():
                parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                    ("compare", lambda: compare(bench, rounds, warmup=not args.quick)),
                    ("scale", lambda: scale(bench, sizes, until)),
                ]
                for part, fn in parts:
                    if part in skip:
                        continue
                    try:
                        payload["figures"][part] = fn()
                    except Exception as exc:  # noqa: BLE001 - reported, the other part runs
                        import traceback

                        payload["errors"][part] = traceback.format_exc()[-4000:]
                        print(f"[tracking] {part} failed: {exc}", file=sys.stderr, flush=True)
                    save()
        finally:
            ray.shutdown()
    rows = table(payload["figures"])
    if args.quick:
        rows.insert(0, ["-", "SMOKE TEST (--quick): 1 round, 8/16 trials; not figures of record",
                        "", "", ""])  # fmt: skip
    print(render(rows))
    payload["table"] = [dict(zip(["fig", "measure", "value", "target", "met"], r)) for r in rows]
    save()
    print(f"[tracking] {time.time() - started:.0f} s; results in {out}")
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
