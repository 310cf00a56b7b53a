"""Reading finished studies back out of MLflow: best configs, study lists and trial tables."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from study.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL, MlflowTracker
from trainables.errors import ConfigError


def trial_runs(tracker: MlflowTracker, study: str) -> list[Any]:
    """All child runs of a study."""
    return tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: "trial"})


def best_runs(
    tracker: MlflowTracker, study: str, metric: str, mode: str = "max", top: int = 1
) -> list[Any]:
    """The ``top`` finished, fully trained trial runs by the last value of ``metric``."""
    runs = [
        r
        for r in trial_runs(tracker, study)
        if r.info.status == "FINISHED"
        and r.data.tags.get("energy_study.early_stopped", "false") != "true"
        and metric in r.data.metrics
        and math.isfinite(r.data.metrics[metric])
    ]
    if not runs:
        raise ConfigError(
            f"study {study!r} has no finished trial with metric {metric!r} in "
            f"{tracker.tracking_uri}"
        )
    runs.sort(key=lambda r: r.data.metrics[metric], reverse=mode == "max")
    return runs[:top]


def run_config(tracker: MlflowTracker, run_id: str) -> dict[str, Any]:
    """The full training config a run was trained with (its ``config.yaml`` artifact)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.client.download_artifacts(run_id, "config.yaml", tmp)
        return yaml.safe_load(Path(path).read_text())


def export_best(
    tracker: MlflowTracker,
    study: str,
    out: str | Path,
    *,
    metric: str,
    mode: str = "max",
    top: int = 1,
) -> list[Path]:
    """Write the best config(s) as YAML files usable by ``study train --config``.

    With ``top`` > 1 the files are ``<stem>-1.yaml`` … ``<stem>-K.yaml``, best first.
    """
    out = Path(out)
    written = []
    for rank, run in enumerate(best_runs(tracker, study, metric, mode, top), start=1):
        cfg = run_config(tracker, run.info.run_id)
        cfg["output_dir"] = f"runs/{study}-best{rank if top > 1 else ''}"
        target = out if top == 1 else out.with_name(f"{out.stem}-{rank}{out.suffix or '.yaml'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# best config #{rank} of study {study!r} by {metric} ({mode}) = "
            f"{run.data.metrics[metric]:.4f}\n"
            f"# MLflow run {run.info.run_id}, trial {run.data.tags.get(TAG_TRIAL, '?')}\n"
            f"# final training: study train --config {target.name} --set epochs=100\n"
        )
        target.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        written.append(target)
    return written
