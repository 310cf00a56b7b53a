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
from trainables.loop import train
from trainables.reporting import JsonlReporter, MultiReporter, Reporter

CHECKPOINT_FILE = "last.pt"


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
    final, lines, saved = out / "final.json", out / "metrics.jsonl", out / "config.yaml"
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
    return MultiReporter(ray_reporter, JsonlReporter(out / "metrics.jsonl", resume_epoch=start))


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` for ``TorchTrainer``.

    ``config`` holds ``train`` (a TrainConfig mapping), ``output_dir`` (the
    trial's folder, on storage every worker can reach) and ``cpus_per_worker``
    (torch threads are set to it, so workers never oversubscribe the cores).
    """
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    out = Path(config["output_dir"])
    wrap = None
    if world > 1:
        from ray.train.torch import prepare_model

        def wrap(model: torch.nn.Module) -> torch.nn.Module:
            return prepare_model(model, move_to_device=False)

    if cfg.device == "auto":
        from ray.train.torch import get_device

        cfg = cfg.replace(device=get_device().type)
    done = finished_run(out, cfg)
    if done is not None:
        ray.train.report(done)
        return
    resume = _resume_file(ray.train.get_checkpoint(), out / f".resume-rank{rank}")
    reporter = RayReporter(ray.train.report, Checkpoint, cfg.epochs)
    train(
        cfg,
        reporter=_reporters(out, reporter, rank, resume),
        output_dir=out,
        resume=resume,
        rank=rank,
        world_size=world,
        wrap_model=wrap,
    )


def train_in_trial(config: dict[str, Any]) -> None:
    """Run the loop directly in the Tune function (single CPU worker fast path)."""
    from ray import tune

    cfg = TrainConfig.from_dict(config["train"])
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))
    out = Path(config["output_dir"])
    done = finished_run(out, cfg)
    if done is not None:
        tune.report(done)
        return
    resume = _resume_file(tune.get_checkpoint(), out / ".resume")
    train(
        cfg,
        reporter=_reporters(out, RayReporter(tune.report, tune.Checkpoint, cfg.epochs), 0, resume),
        output_dir=out,
        resume=resume,
    )
