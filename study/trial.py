"""The Tune function trainable: one trial = one training, through Ray Train or directly.

Ray Train V2 pattern: Tune runs this function; for the ``train`` backend it
builds a ``TorchTrainer`` whose run name is the trial id, so a restarted trial
resumes its Train run from the last checkpoint. The function itself reserves
no CPU (a 0-CPU bundle with 1 MB of memory, which Ray accepts where a bare
``{"cpu": 0}`` is refused) so that the Train workers get every core: with a
0.01-CPU launcher, two 1-CPU trials need 2.02 CPUs and do not fit on 2 cores.

The ``direct`` backend (what ``auto`` picks for one CPU worker, no GPU) runs
the loop inside the Tune function: no Train controller or worker process to
start (about 9 s per trial on 2 cores), real Tune checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from study.spec import StudySpec

#: What the Tune function that launches a TorchTrainer reserves: no CPU (1 MB of
#: memory makes the bundle non-empty, which Ray requires).
LAUNCHER_RESOURCES = {"cpu": 0.0, "memory": 1e6}


def trial_output_dir(spec: StudySpec, trial_id: str) -> Path:
    """Where a trial's loop writes its checkpoints, metrics and energies."""
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


def run_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """Tune function trainable: build the trial's config and train it.

    Args:
        config: the parameters Optuna sampled for this trial (dotted keys for nested
            config values) plus the space's constants.
        spec: the study spec as plain data.
    """
    from ray import tune

    from trainables.ray_adapter import train_in_trial, train_worker

    study = StudySpec(**spec)
    cfg = study.trial_config(config)
    trial_id = tune.get_context().get_trial_id()
    payload = {
        "train": cfg.to_dict(),
        "output_dir": str(trial_output_dir(study, trial_id)),
        "cpus_per_worker": study.cpus_per_worker,
    }
    if not uses_train_backend(study):
        train_in_trial(payload)
        return

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    workers = study.workers_per_trial
    per_worker: dict[str, float] = {"CPU": study.cpus_per_worker}
    if study.gpus_per_trial > 0:
        per_worker["GPU"] = study.gpus_per_trial / workers
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=study.gpus_per_trial > 0,
            resources_per_worker=per_worker,
        ),
        run_config=RunConfig(
            name=trial_id,
            storage_path=str(study.folder / "train"),
            callbacks=[TuneReportCallback()],
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
