"""The Tune function trainable: one trial = one training, through Ray Train or directly.

Ray Train V2 pattern: Tune runs this function; for the ``train`` backend it
builds a ``TorchTrainer`` whose run name is the trial id, so a restarted trial
resumes its Train run from the last checkpoint. The function itself reserves
no CPU (a 0-CPU bundle with 1 MB of memory, which Ray accepts where a bare
``{"cpu": 0}`` is refused) so that the Train workers get every core: with a
0.01-CPU launcher, two 1-CPU trials need 2.02 CPUs and do not fit on 2 cores.

The ``direct`` backend (what ``auto`` picks for one CPU worker, no GPU) runs
the loop inside the Tune function: no Train controller or worker processes to
start per trial, and real Tune checkpoints.

A trial's files (checkpoints, metrics, energies) travel through its checkpoints
in the study's storage, never through the disk of the node that ran it
(:mod:`trainables.ray_adapter`): :func:`trial_checkpoint` finds the checkpoint a
trial last reported (Tune's, or for the ``train`` backend the Train run's, whose
path :class:`~ray.tune.integration.ray_train.TuneReportCallback` adds to the
result), and :func:`checkpoint_files` / :func:`trial_files` open it as a folder,
on local storage, a shared mount or ``s3://…`` alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from study.spec import SearchSpec, StudySpec, TrialTemplate

#: What the Tune function that launches a TorchTrainer reserves: no CPU (1 MB of
#: memory makes the bundle non-empty, which Ray requires).
LAUNCHER_RESOURCES = {"cpu": 0.0, "memory": 1e6}

#: The folder in a study's folder with the checkpoints (``last.pt``, ``best.pt``) of a
#: run that a trial of the ``train`` backend continues when Ray has none of its own
#: (``study train --workers N --resume CKPT`` puts them there and names the folder in
#: :attr:`StudySpec.start_from`; a folder left by an earlier run is not used).
START_FOLDER = "start"
#: The result key under which Ray Tune's ``TuneReportCallback`` (``train`` backend)
#: passes the path of the checkpoint a Train run reported, in the storage's file system.
CHECKPOINT_PATH_KEY = "checkpoint_path"


def storage_filesystem(storage: str) -> Any:
    """The ``pyarrow`` file system of a study storage (a local path or a URI such as
    ``s3://bucket/prefix``), resolved as Ray resolves it."""
    from ray.train._internal.storage import get_fs_and_path

    return get_fs_and_path(storage)[0]


def trial_checkpoint(
    storage: str, checkpoint: Any, result: Mapping[str, Any] | None = None
) -> Any | None:
    """The last checkpoint a trial reported, in the study's storage (None if none).

    Args:
        storage: the study's storage (:attr:`SearchSpec.storage`), to open a checkpoint
            known only by its path.
        checkpoint: Tune's checkpoint of the trial (``trial.checkpoint``,
            ``result.checkpoint``; the ``direct`` backend), or None.
        result: the trial's last result; for the ``train`` backend it names the Train
            run's checkpoint (:data:`CHECKPOINT_PATH_KEY`).
    """
    if checkpoint is not None:
        return checkpoint
    path = (result or {}).get(CHECKPOINT_PATH_KEY)
    if not path:
        return None
    from ray.tune import Checkpoint

    return Checkpoint(path=str(path), filesystem=storage_filesystem(storage))


@contextlib.contextmanager
def checkpoint_files(checkpoint: Any) -> Iterator[Path]:
    """A checkpoint's files as a local folder, read only (the storage folder itself for
    local storage, else a temporary download removed on exit)."""
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def stored_checkpoint_folders(spec: SearchSpec, trial_id: str) -> tuple[Any, list[list[str]]]:
    """The checkpoint folders of trial ``trial_id`` in the study's storage, oldest first:
    ``(file system, [folders of its Train run, folders of its Tune trial folder])`` (the
    Train run ``<study>/train/<id>`` of the ``train`` backend first, then each Tune trial
    folder ``<study>/tune/<trainable>_<id>_…``).

    Args:
        spec: the study (its storage, a folder or a URI).
        trial_id: the Tune trial id.
    """
    from pyarrow.fs import FileSelector, FileType
    from ray.train._internal.storage import get_fs_and_path

    fs, root = get_fs_and_path(spec.location())
    root = root.rstrip("/")

    def folders(path: str) -> list[Any]:
        found = fs.get_file_info(FileSelector(path, allow_not_found=True))
        return [i for i in found if i.type == FileType.Directory]

    places = [f"{root}/train/{trial_id}"]
    places += [i.path for i in folders(f"{root}/tune") if f"_{trial_id}_" in i.base_name]
    return fs, [
        sorted(i.path for i in folders(place) if i.base_name.startswith("checkpoint_"))
        for place in places
    ]


def latest_stored_checkpoint(spec: SearchSpec, trial_id: str) -> Any | None:
    """The newest checkpoint of trial ``trial_id`` in the study's storage: in its Train
    run (``<study>/train/<id>``, ``train`` backend) or its Tune trial folder
    (``<study>/tune/<trainable>_<id>_…``); None when it has none.

    For a caller that holds only the trial's id (``study train --workers N -o DIR``,
    benchmarks); the driver's callbacks use :func:`trial_checkpoint`.
    """
    from ray.tune import Checkpoint

    fs, places = stored_checkpoint_folders(spec, trial_id)
    for kept in places:
        if kept:
            return Checkpoint(path=kept[-1], filesystem=fs)
    return None


@contextlib.contextmanager
def trial_files(spec: SearchSpec, trial_id: str) -> Iterator[Path | None]:
    """The files of a trial's newest checkpoint as a local folder (None without one):
    rather than a folder on the node that ran it."""
    checkpoint = latest_stored_checkpoint(spec, trial_id)
    if checkpoint is None:
        yield None
        return
    with checkpoint_files(checkpoint) as folder:
        yield folder


def uses_train_backend(spec: StudySpec) -> bool:
    """Whether trials launch a TorchTrainer.

    ``train`` always does; ``direct`` never; ``auto`` does for several workers or
    GPUs and runs one CPU worker directly in the trial (the measured fast path).
    """
    if spec.backend == "auto":
        return spec.workers_per_trial > 1 or spec.gpus_per_trial > 0
    return spec.backend == "train"


def trial_resources(spec: StudySpec) -> dict[str, float]:
    """What the Tune function itself asks Ray for."""
    if uses_train_backend(spec):
        return dict(LAUNCHER_RESOURCES)
    return {"cpu": spec.cpus_per_worker}


def run_trial(config: dict[str, Any], spec: StudySpec, template: TrialTemplate) -> None:
    """Tune function trainable: build the trial's config and train it.

    Args:
        config: the trial's Tune config: the parameters Optuna sampled (dotted keys
            for nested config values) plus the space's constants.
        spec: the study (resources, backend, storage).
        template: the trials' common config, resolved on the driver
            (:attr:`StudySpec.template`); the trial never reads the space file.
    """
    from ray import tune

    from trainables.ray_adapter import train_in_trial, train_worker

    cfg = template.config(config)
    trial_id = tune.get_context().get_trial_id()
    if not uses_train_backend(spec):
        sampler = template.sampler(config)  # a study over training and generation
        finish = None
        if sampler is not None:
            from study.generate import generate_after_training

            finish = partial(generate_after_training, sampler, cfg.to_dict())
        train_in_trial(cfg, trial_id, spec.cpus_per_worker, finish=finish)
        return

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from study.stopper import checkpoints_to_keep

    workers = spec.workers_per_trial
    per_worker: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_trial > 0:
        per_worker["GPU"] = spec.gpus_per_trial / workers
    TorchTrainer(
        train_worker,
        # the one serialisation of the config: Train hands its workers plain data
        train_loop_config={
            "train": cfg.to_dict(),
            "label": trial_id,
            "cpus_per_worker": spec.cpus_per_worker,
            "start": spec.start_from,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=spec.gpus_per_trial > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=trial_id,
            # the study's storage (a URI or a shared path): the checkpoints, with every
            # file of the run, are where the driver reads them for MLflow
            storage_path=spec.location("train"),
            callbacks=[TuneReportCallback()],
            # the ΔE stopper needs the checkpoint of the peak before the fall
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep(spec)),
        ),
    ).fit()
