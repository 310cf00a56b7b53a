"""The thin adapter between the epoch loop and Ray: the only module here that imports Ray.

Two ways to run one training inside a Tune trial:

* :func:`train_worker`: the ``train_loop_per_worker`` of a Ray Train
  ``TorchTrainer`` (one or more workers, DDP when several). It reports with
  ``ray.train.report`` and resumes from ``ray.train.get_checkpoint``.
* :func:`train_in_trial`: the loop runs directly in the Tune function (one
  CPU worker, no Train start-up cost). It reports with ``ray.tune.report`` and
  resumes from ``ray.tune.get_checkpoint``.

Either way the per-epoch metrics reach Tune (so ASHA and Optuna see them); the last
epoch's report is held back until the final test evaluation is done and goes out
once, carrying the ``test/*`` metrics too, so the trial's last result is complete.

Files travel through the checkpoints, never through a node's disk: the run writes
into a node-local scratch folder (removed when the trial function ends; one that a
trial Tune stopped abruptly left behind is removed by a later trial on the node once it
is a day old and its process gone: :func:`sweep_scratch`), and every
report of rank 0 carries a checkpoint that is a snapshot of that folder in the
layout of :mod:`trainables.files` (each epoch ``checkpoints/last.pt``,
``checkpoints/best.pt``, ``config.yaml``, ``metrics.jsonl``; the final report also
``energies.npz`` and ``final.json``). Ray copies it to the study's storage (a local
folder, a shared mount or ``s3://…``), where the driver reads it for MLflow and a
restarted trial reads it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.files import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FINAL_FILE,
    GEN_METRICS_FILE,
    GENERATION_DIR,
    LAST_CHECKPOINT,
    METRICS_LOG,
)
from trainables.loop import train
from trainables.reporting import (
    EnergyHistogramReporter,
    JsonlReporter,
    MultiReporter,
    Reporter,
)

#: ``last.pt`` at the top of a checkpoint: the layout of checkpoints written before
#: they carried the whole run folder (still read on resume).
LEGACY_CHECKPOINT_FILE = Path(LAST_CHECKPOINT).name
#: Where trials keep their node-local scratch folders (below the system's temp folder).
SCRATCH_PARENT = "energy-study-trials"
#: A scratch folder in which nothing changed for this long (seconds, by the newest
#: mtime of anything in it) and whose owning process is gone is removed by the next
#: trial that starts on the node (:func:`sweep_scratch`): a trial Tune stopped abruptly
#: (ASHA, a kill) never ran its own clean-up. A live trial writes its checkpoint every
#: epoch, far more often than this.
SCRATCH_MAX_AGE_S = 24 * 3600
#: The file in a scratch folder that names its owner: ``HOST PID START`` (START: the
#: process's start time in clock ticks since boot, empty where ``/proc`` is missing).
#: Hidden, so no checkpoint of a training run carries it (:func:`snapshot`).
SCRATCH_OWNER = ".owner"


def scratch_folder(label: str) -> Path:
    """A new, empty node-local folder for one run's files (under the system temp
    folder, in :data:`SCRATCH_PARENT`, its name starting with ``label``), its owner
    written into it (:data:`SCRATCH_OWNER`). Folders that dead trials left there are
    swept first (:func:`sweep_scratch`)."""
    parent = Path(tempfile.gettempdir()) / SCRATCH_PARENT
    parent.mkdir(parents=True, exist_ok=True)
    sweep_scratch(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=parent))
    pid = os.getpid()
    (folder / SCRATCH_OWNER).write_text(
        f"{socket.gethostname()} {pid} {_process_start(pid) or ''}\n"
    )
    return folder


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot: field 22 of
    ``/proc/PID/stat``), to tell it from a later process given the same pid; None where
    it cannot be read (no such process, no ``/proc``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (name)": field 3 onwards
    return fields[19] if len(fields) > 19 else None


def scratch_owner_alive(folder: Path) -> bool | None:
    """Whether the process that made scratch folder ``folder`` still runs.

    True when its pid (:data:`SCRATCH_OWNER`) is a live process on this host that
    started when the owner did; False when that process is gone (or its pid now belongs
    to a process started later); None when it cannot be told: no owner file (a folder
    of an older version, or one being made), or another host's (a temp folder shared
    between nodes).
    """
    try:
        host, pid_text, *start = (folder / SCRATCH_OWNER).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname() or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    now = _process_start(pid)
    return not (start and now is not None and now != start[0])


def _last_change(folder: Path) -> float:
    """The newest mtime (seconds since the epoch) of ``folder`` and anything in it."""
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def sweep_scratch(
    parent: Path, max_age_s: float = SCRATCH_MAX_AGE_S, now: float | None = None
) -> list[Path]:
    """Remove the scratch folders in ``parent`` that trials stopped abruptly left behind;
    returns the ones removed.

    A folder goes when nothing in it changed for ``max_age_s`` seconds and its owner is
    not a live process (:func:`scratch_owner_alive`: gone, or cannot be told); a folder
    whose owner still runs stays, however old. Anything that cannot be read or removed
    (another user's, a race with another trial's sweep) is left alone.

    Args:
        parent: the folder of the scratch folders (:data:`SCRATCH_PARENT` in the
            system's temp folder).
        max_age_s: least seconds since the newest change in a folder
            (:data:`SCRATCH_MAX_AGE_S`).
        now: the current time, seconds since the epoch (None: the clock's).
    """
    now = time.time() if now is None else now
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    removed = []
    for folder in entries:
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            if now - folder.lstat().st_mtime < max_age_s or now - _last_change(folder) < max_age_s:
                continue
        except OSError:
            continue
        if scratch_owner_alive(folder):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():
            removed.append(folder)
    return removed


@contextlib.contextmanager
def snapshot(folder: Path) -> Iterator[Path]:
    """A temporary folder holding the files of ``folder`` as they are now (hard links
    where the file system allows, else copies), without hidden (``.``) entries: what a
    Ray checkpoint of the run carries. Removed on exit."""
    with tempfile.TemporaryDirectory(
        prefix=".snapshot-", dir=folder.parent, ignore_cleanup_errors=True
    ) as tmp:
        for src in sorted(folder.rglob("*")):
            rel = src.relative_to(folder)
            if not src.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            dst = Path(tmp) / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        yield Path(tmp)


class RayReporter:
    """A :class:`~trainables.reporting.Reporter` that forwards to Ray.

    Args:
        report: ``ray.train.report`` or ``ray.tune.report``.
        checkpoint_cls: the matching ``Checkpoint`` class.
        epochs: the run's epoch count (the last epoch waits for the test metrics).
        folder: the run's folder whose snapshot each report with a checkpoint carries
            (None: this worker sends no checkpoint, a DDP rank other than 0).
        finish: run on ``folder`` before the last report (see :func:`train_in_trial`).
    """

    def __init__(
        self,
        report: Callable[..., None],
        checkpoint_cls: Any,
        epochs: int,
        folder: Path | None,
        finish: Callable[[Path], dict[str, float]] | None = None,
    ) -> None:
        self._report = report
        self._checkpoint_cls = checkpoint_cls
        self._epochs = epochs
        self._folder = folder
        self._finish = finish
        self._held: tuple[int, dict[str, float], Path | None] | None = None

    def send(self, metrics: dict[str, Any], with_files: bool) -> None:
        """Report ``metrics``, with a checkpoint of the run's folder when ``with_files``."""
        if not with_files or self._folder is None:
            self._report(metrics)
            return
        with snapshot(self._folder) as tmp:
            self._report(metrics, checkpoint=self._checkpoint_cls.from_directory(str(tmp)))

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if epoch >= self._epochs:
            self._held = (epoch, metrics, checkpoint)
        else:
            self.send({"epoch": epoch, **metrics}, checkpoint is not None)

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        epoch, last, checkpoint = self._held or (self._epochs, {}, None)
        if self._finish is not None and self._folder is not None:
            metrics = {**metrics, **self._finish(self._folder)}
        self.send({"epoch": epoch, **last, **metrics}, checkpoint is not None or bool(artifacts))


def restore_files(checkpoint: Any, into: Path) -> Path | None:
    """Copy a Ray checkpoint's files into the run folder ``into``; returns the path of
    its ``last.pt`` there (None without a checkpoint or without ``last.pt``).

    Reads the checkpoint where Ray keeps it (the study's storage: a local folder, a
    shared mount or ``s3://…``), never a folder of the node that wrote it.
    """
    if checkpoint is None:
        return None
    into.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        shutil.copytree(d, into, dirs_exist_ok=True)
    legacy = into / LEGACY_CHECKPOINT_FILE
    if legacy.is_file() and not (into / LAST_CHECKPOINT).is_file():
        (into / CHECKPOINT_DIR).mkdir(exist_ok=True)
        os.replace(legacy, into / LAST_CHECKPOINT)
    last = into / LAST_CHECKPOINT
    return last if last.is_file() else None


def finished_run(out: Path, cfg: TrainConfig) -> dict[str, float] | None:
    """The complete last result of a run that already finished in ``out`` (else None).

    A trial that finished just before its driver was killed can be started again
    by ``study resume`` (Tune's last saved state may predate its end:
    :func:`study.runner.state_save_period`). Its run is
    then not trained or evaluated again: its files come back from its last
    checkpoint (:func:`restore_files`) and its last epoch and test metrics, read
    from ``metrics.jsonl`` and ``final.json``, are reported once more.
    """
    final, lines, saved = out / FINAL_FILE, out / METRICS_LOG, out / CONFIG_FILE
    if not (final.is_file() and lines.is_file() and saved.is_file()):
        return None
    try:
        import yaml

        if TrainConfig.from_dict(yaml.safe_load(saved.read_text())) != cfg:
            return None
        epochs = [json.loads(ln) for ln in lines.read_text().splitlines() if ln.strip()]
        test = json.loads(final.read_text())["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not epochs or int(epochs[-1].get("epoch", 0)) != cfg.epochs or not test:
        return None
    sampled = out / GENERATION_DIR / GEN_METRICS_FILE  # it also sampled: its scores
    try:
        scores = json.loads(sampled.read_text()) if sampled.is_file() else {}
    except (OSError, ValueError):
        scores = {}
    return {**epochs[-1], **test, **scores}


def stored_final_checkpoint(checkpoint_cls: Any) -> Any | None:
    """The newest checkpoint of this Tune trial in storage that holds ``final.json``
    (None when there is none or the storage cannot be listed).

    A trial that finished after Tune's last snapshot of the study is restored with an
    older checkpoint; its final one is still in the trial's storage folder.
    """
    try:
        from pyarrow.fs import FileSelector, FileType
        from ray.train._internal.session import get_session

        storage = get_session().storage
        fs, trial = storage.storage_filesystem, storage.trial_fs_path
        found = fs.get_file_info(FileSelector(trial))
        folders = sorted(
            i.path
            for i in found
            if i.type == FileType.Directory and i.base_name.startswith("checkpoint_")
        )
        for path in reversed(folders):
            if fs.get_file_info(f"{path}/{FINAL_FILE}").type == FileType.File:
                return checkpoint_cls(path=path, filesystem=fs)
    except Exception:  # noqa: BLE001 - a private API: without it the trial trains again
        return None
    return None


def _reporters(
    out: Path, ray_reporter: RayReporter, rank: int, resume: Path | None, trial: str = ""
) -> Reporter:
    """On rank 0, ``metrics.jsonl``/``final.json`` and, at the end, the energy histogram
    in the run's folder, then Ray (so that each report's checkpoint holds the files
    written for it: the driver uploads the figure instead of drawing it); Ray alone on
    other ranks. ``trial`` (the trial id) titles the histogram."""
    if rank != 0:
        return ray_reporter
    start = 0
    if resume is not None:
        start = int(load_checkpoint(resume).get("epoch", 0))
    return MultiReporter(
        JsonlReporter(out / METRICS_LOG, resume_epoch=start),
        EnergyHistogramReporter(out, f"trial {trial}"),
        ray_reporter,
    )


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``.

    Args:
        config: ``train`` (a TrainConfig mapping), ``label`` (the trial id: names the
            node-local scratch folder), ``cpus_per_worker`` (torch threads are set to
            it, so workers never oversubscribe the cores) and ``start`` (a folder with
            another run's ``last.pt`` and ``best.pt`` to continue when Ray has no
            checkpoint, or None).
    """
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig.from_dict(config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    wrap = None
    if world > 1:
        from ray.train.torch import prepare_model

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            return prepare_model(model, move_to_device=False)

    if cfg.device == "auto":
        from ray.train.torch import get_device

        cfg = cfg.replace(device=get_device().type)
    label, cpus = f"{config.get('label', 'run')}-rank{rank}", config["cpus_per_worker"]
    start = Path(config["start"]) if config.get("start") else None
    _train(cfg, label, cpus, ray.train, Checkpoint, rank=rank, world=world, wrap=wrap, start=start)


def train_in_trial(
    cfg: TrainConfig,
    label: str,
    cpus_per_worker: float,
    finish: Callable[[Path], dict[str, float]] | None = None,
) -> None:
    """Run the loop directly in the Tune function (single CPU worker fast path).

    Args:
        cfg: the trial's training config.
        label: the trial id (names the node-local scratch folder).
        cpus_per_worker: CPUs the trial holds; torch threads are set to it.
        finish: run on the run's folder once training and the test evaluation ended,
            before the last report; its metrics join that report and the files it
            writes into the folder go with its checkpoint (a study over training and
            generation samples here: :func:`study.generate.generate_after_training`).
    """
    from ray import tune

    _train(cfg, label, cpus_per_worker, tune, tune.Checkpoint, final_lookup=True, finish=finish)


def _train(
    cfg: TrainConfig,
    label: str,
    cpus: float,
    ray_api: Any,
    checkpoint_cls: Any,
    *,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    start: Path | None = None,
    final_lookup: bool = False,
    finish: Callable[[Path], dict[str, float]] | None = None,
) -> None:
    """Train through ``ray.train`` or ``ray.tune`` (``ray_api``: its ``report`` and
    ``get_checkpoint``) in a node-local scratch folder removed at the end; a run whose
    checkpoint shows it finished is reported again instead (with its files).

    Args:
        label: names the scratch folder (the trial id, and the rank).
        final_lookup: also look for a finished run's checkpoint in the Tune trial's
            storage (:func:`stored_final_checkpoint`) when Ray hands an older one.
        finish: see :func:`train_in_trial` (rank 0 only).
    """
    torch.set_num_threads(max(1, int(cpus)))
    out = scratch_folder(label)
    try:
        checkpoint = ray_api.get_checkpoint()
        resume = restore_files(checkpoint, out)
        done, folder = finished_run(out, cfg), out
        if done is None and final_lookup:  # apart, so that a resume is not disturbed
            stored, folder = stored_final_checkpoint(checkpoint_cls), out / ".final"
            if stored is not None and restore_files(stored, folder) is not None:
                done = finished_run(folder, cfg)
        if done is not None:
            again = RayReporter(ray_api.report, checkpoint_cls, cfg.epochs, folder)
            again.send(done, with_files=rank == 0)
            return
        reporter = RayReporter(
            ray_api.report,
            checkpoint_cls,
            cfg.epochs,
            out if rank == 0 else None,
            finish=finish if rank == 0 else None,
        )
        if resume is None and start is not None:  # continue another run, its best.pt beside
            resume = start / LEGACY_CHECKPOINT_FILE
            if rank == 0:
                shutil.copytree(start, out / CHECKPOINT_DIR, dirs_exist_ok=True)
        train(
            cfg,
            reporter=_reporters(out, reporter, rank, resume, label.removesuffix(f"-rank{rank}")),
            output_dir=out,
            resume=resume,
            rank=rank,
            world_size=world,
            wrap_model=wrap,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
