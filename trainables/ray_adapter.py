"""The thin adapter between the epoch loop and Ray: the only module here that imports Ray.

Two ways to run one training inside a Tune trial:

* :func:`train_worker`: the ``train_loop_per_worker`` of a Ray Train
  ``TorchTrainer`` (one or more workers, DDP when several). It reports with
  ``ray.train.report`` and resumes from ``ray.train.get_checkpoint``.
* :func:`train_in_trial`: the loop runs directly in the Tune function (one
  CPU worker, no Train start-up cost). It reports with ``ray.tune.report`` and
  resumes from ``ray.tune.get_checkpoint``.

Either way the per-epoch metrics reach Tune (so ASHA and Optuna see them) with
a checkpoint holding ``last.pt``; the last epoch's report is held back until
the final test evaluation is done and goes out once, carrying the ``test/*``
metrics too, so the trial's last result is complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.files import CHECKPOINT_DIR, CONFIG_FILE, FINAL_FILE, LAST_CHECKPOINT, METRICS_LOG
from trainables.loop import train
from trainables.reporting import JsonlReporter, MultiReporter, Reporter

CHECKPOINT_FILE = Path(LAST_CHECKPOINT).name  #: the file a Ray checkpoint holds


class RayReporter:
    """A :class:`~trainables.reporting.Reporter` that forwards to Ray.

    Args:
        report: ``ray.train.report`` or ``ray.tune.report``.
        checkpoint_cls: the matching ``Checkpoint`` class.
        epochs: the run's epoch count (the last epoch waits for the test metrics).
    """

    def __init__(self, report: Callable[..., None], checkpoint_cls: Any, epochs: int) -> None:
        self._report = report
        self._checkpoint_cls = checkpoint_cls
        self._epochs = epochs
        self._held: tuple[int, dict[str, float], Path | None] | None = None

    def _send(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        payload = {"epoch": epoch, **metrics}
        if checkpoint is None:
            self._report(payload)
            return
        with tempfile.TemporaryDirectory(prefix="energy-study-ckpt-") as tmp:
            shutil.copy2(checkpoint, Path(tmp) / CHECKPOINT_FILE)
            self._report(payload, checkpoint=self._checkpoint_cls.from_directory(tmp))

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        if epoch >= self._epochs:
            self._held = (epoch, metrics, checkpoint)
        else:
            self._send(epoch, metrics, checkpoint)

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        epoch, last, checkpoint = self._held or (self._epochs, {}, None)
        self._send(epoch, {**last, **metrics}, checkpoint)


def _resume_file(checkpoint: Any, into: Path) -> Path | None:
    """Copy ``last.pt`` out of a Ray checkpoint (or None when there is none)."""
    if checkpoint is None:
        return None
    into.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as d:
        src = Path(d) / CHECKPOINT_FILE
        if not src.is_file():
            return None
        dst = into / "resume.pt"
        shutil.copy2(src, dst)
        return dst


def finished_run(out: Path, cfg: TrainConfig) -> dict[str, float] | None:
    """The complete last result of a run that already finished in ``out`` (else None).

    A trial that finished just before its driver was killed can be started again
    by ``study resume`` (Tune snapshots its state every half second). Its run is
    then not trained or evaluated again: its last epoch and test metrics, read
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
    return {**epochs[-1], **test}


def _reporters(out: Path, ray_reporter: RayReporter, rank: int, resume: Path | None) -> Reporter:
    """Ray plus, on rank 0, ``metrics.jsonl``/``final.json`` in the trial's folder."""
    if rank != 0:
        return ray_reporter
    start = 0
    if resume is not None:
        start = int(load_checkpoint(resume).get("epoch", 0))
    return MultiReporter(ray_reporter, JsonlReporter(out / METRICS_LOG, resume_epoch=start))


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``.

    Args:
        config: ``train`` (a TrainConfig mapping), ``output_dir`` (the trial's
            folder, on storage every worker can reach), ``cpus_per_worker``
            (torch threads are set to it, so workers never oversubscribe the cores)
            and ``start`` (a folder with another run's ``last.pt`` and ``best.pt`` to
            continue when Ray has no checkpoint, or None).
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
    out, cpus = Path(config["output_dir"]), config["cpus_per_worker"]
    start = Path(config["start"]) if config.get("start") else None
    _train(cfg, out, cpus, ray.train, Checkpoint, rank=rank, world=world, wrap=wrap, start=start)


def train_in_trial(cfg: TrainConfig, output_dir: Path, cpus_per_worker: float) -> None:
    """Run the loop directly in the Tune function (single CPU worker fast path).

    Args:
        cfg: the trial's training config.
        output_dir: the trial's folder (absolute).
        cpus_per_worker: CPUs the trial holds; torch threads are set to it.
    """
    from ray import tune

    _train(cfg, output_dir, cpus_per_worker, tune, tune.Checkpoint)


def _train(
    cfg: TrainConfig,
    out: Path,
    cpus: float,
    ray_api: Any,
    checkpoint_cls: Any,
    *,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    start: Path | None = None,
) -> None:
    """Train (or report a run already finished in ``out``) through ``ray.train`` or
    ``ray.tune`` (``ray_api``: its ``report`` and ``get_checkpoint``)."""
    torch.set_num_threads(max(1, int(cpus)))
    done = finished_run(out, cfg)
    if done is not None:
        ray_api.report(done)
        return
    resume = _resume_file(ray_api.get_checkpoint(), out / f".resume-rank{rank}")
    if resume is None and start is not None:  # continue another run, its best.pt beside
        resume = start / CHECKPOINT_FILE
        if rank == 0:
            shutil.copytree(start, out / CHECKPOINT_DIR, dirs_exist_ok=True)
    reporter = RayReporter(ray_api.report, checkpoint_cls, cfg.epochs)
    train(
        cfg,
        reporter=_reporters(out, reporter, rank, resume),
        output_dir=out,
        resume=resume,
        rank=rank,
        world_size=world,
        wrap_model=wrap,
    )
