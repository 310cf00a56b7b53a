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
"""

from __future__ import annotations

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


def trial_output_dir(spec: SearchSpec, trial_id: str) -> Path:
    """Where a trial writes its outputs (checkpoints, metrics, energies, samples)."""
    return spec.folder / "trials" / trial_id


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
    out = trial_output_dir(spec, tune.get_context().get_trial_id())
    if not uses_train_backend(spec):
        train_in_trial(cfg, out, spec.cpus_per_worker)
        return

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    workers = spec.workers_per_trial
    per_worker: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_trial > 0:
        per_worker["GPU"] = spec.gpus_per_trial / workers
    TorchTrainer(
        train_worker,
        # the one serialisation of the config: Train hands its workers plain data
        train_loop_config={
            "train": cfg.to_dict(),
            "output_dir": str(out),
            "cpus_per_worker": spec.cpus_per_worker,
            "start": spec.start_from,
        },
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=spec.gpus_per_trial > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=out.name,
            storage_path=str(spec.folder / "train"),
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    ).fit()
