"""The second stage of a study's evaluation: its finalists, measured properly.

During the search, trials are compared on cheap numbers (PGD on a validation
subset each epoch; no AutoAttack). Once the search ends, the finalists (the
top ``spec.finalists`` finished trials by the objective, or the Pareto set of a
multi-objective study) are evaluated with PGD-``eval_steps`` (20 by default)
and standard AutoAttack on the **same** test points (``spec.final_n`` of them;
all by default), in parallel as Ray tasks. Each finalist's run gets
``final/*`` metrics (with ``final/n`` and 95 % Wilson bounds), the tag
:data:`~reports.vocabulary.TAG_FINALIST` (its rank) and ``final_eval.npz`` (per point: index
in the test set, label, PGD and AutoAttack outcome).

Weights travel from MLflow (the ``checkpoints/best.pt`` artifact the driver
logged) to the task through Ray's object store, so a finalist trained on any
node is evaluated wherever Ray places the task.
"""

from __future__ import annotations

import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reports.vocabulary import (
    BEST_CHECKPOINT,
    ENERGY_HIST,
    FINAL_ARTIFACT,
    TAG_FINALIST,
    TAG_STUDY,
    TAG_TRIAL,
)
from study.spec import StudySpec
from study.tracking import MlflowTracker

__all__ = ["FINAL_ARTIFACT", "TAG_FINALIST", "FinalResult", "evaluate_finalists"]


@dataclass
class FinalResult:
    """One finalist's second-stage evaluation.

    Attributes:
        trial_id: the Tune trial id.
        rank: 1 for the best trial by the objective (Pareto set: by the first objective).
        run_id: its MLflow run.
        metrics: ``final/*`` metrics as logged.
        seconds: wall time of its evaluation task.
    """

    trial_id: str
    rank: int
    run_id: str
    metrics: dict[str, float]
    seconds: float


def _evaluate_task(
    cfg: dict[str, Any], state: bytes, n: int | None, threads: int
) -> tuple[dict[str, float], dict[str, np.ndarray], float]:
    """Ray task body: load the weights and evaluate them (see ``evaluate_weights``)."""
    import torch

    from trainables.config import TrainConfig
    from trainables.loop import evaluate_weights

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    config = TrainConfig.from_dict(cfg)
    weights = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)["model"]
    metrics, samples = evaluate_weights(config, weights, n=n)
    keep = ("index", "y", "pred_nat", "pgd_correct", "aa_robust")
    return metrics, {k: samples[k] for k in keep if k in samples}, time.perf_counter() - t0


def _test_task(
    cfg: dict[str, Any], state: bytes, threads: int
) -> tuple[dict[str, float], dict[str, np.ndarray], float]:
    """Ray task body: a kept checkpoint's test metrics, as the loop's final evaluation
    measures them (:func:`trainables.loop.measure_test_set`), with its per-point arrays."""
    import torch

    from trainables.config import TrainConfig
    from trainables.loop import measure_test_set, resolve_device, trained_model

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    config = TrainConfig.from_dict(cfg)
    weights = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)["model"]
    device = resolve_device(config.device)
    model, data = trained_model(config, weights, device=device)
    metrics, samples = measure_test_set(config, model, data, device=device)
    return metrics, samples, time.perf_counter() - t0


def evaluate_kept(
    spec: StudySpec,
    tracker: MlflowTracker,
    kept: list[tuple[str, int, dict[str, Any]]],
    *,
    echo: Any = print,
    untestable: set[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Test the checkpoints that ΔE-stopped trials kept, as a finished trial's last
    epoch tests its ``best.pt``: ``test/*`` (its ``test_subset`` points; AutoAttack when
    its config asks for it), ``energies.npz`` and ``energy_hist.png`` go into the trial's
    run, the metrics at the kept epoch's step. One Ray task per trial, with a trial's
    CPUs (and GPUs); a run that has its ``test/clean_acc`` already (a resumed study) is
    not tested again. Ray must be initialised.

    Args:
        spec: the study (resources).
        tracker: its MLflow tracker.
        kept: ``(trial id, kept epoch, training config)`` of each such trial.
        echo: where progress lines go.
        untestable: where the ids of the trials without a run or a kept ``best.pt`` go
            (they have no checkpoint to stand for them).

    Returns:
        The ``test/*`` metrics of each trial tested now or before, by trial id.
    """
    import ray

    from reports.vocabulary import ENERGIES_FILE
    from trainables.reporting import energy_histogram

    gpus = {"num_gpus": spec.gpus_per_trial} if spec.gpus_per_trial > 0 else {}
    task = ray.remote(num_cpus=spec.cpus_per_worker, **gpus)(_test_task)
    threads = max(1, int(spec.cpus_per_worker))
    pending: dict[str, tuple[str, int, Any]] = {}
    out: dict[str, dict[str, float]] = {}
    for trial_id, epoch, cfg in kept:
        found = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_TRIAL: trial_id})
        if not found:
            echo(f"ΔE-stopped trial {trial_id}: no MLflow run found; its kept checkpoint untested")
            if untestable is not None:
                untestable.add(trial_id)
            continue
        run = found[0]
        if "test/clean_acc" in run.data.metrics:
            out[trial_id] = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
            continue
        with tempfile.TemporaryDirectory(prefix="energy-study-kept-") as tmp:
            try:
                state = tracker.download(run.info.run_id, BEST_CHECKPOINT, tmp).read_bytes()
            except Exception as exc:  # noqa: BLE001 - said; the others are still tested
                echo(f"ΔE-stopped trial {trial_id}: its kept {BEST_CHECKPOINT} is missing ({exc})")
                if untestable is not None:
                    untestable.add(trial_id)
                continue
        pending[trial_id] = (run.info.run_id, epoch, task.remote(cfg, ray.put(state), threads))
    if not pending:
        return out
    echo(
        f"testing the checkpoints kept by {len(pending)} ΔE-stopped trial(s) as a finished "
        f"trial's best.pt is tested ({len(pending)} Ray task(s))"
    )
    for trial_id, (run_id, epoch, ref) in pending.items():
        try:
            metrics, samples, seconds = ray.get(ref)
            # the files first, the metrics last: a run with test/clean_acc has them all,
            # so a resumed study that finds it does not test it again
            with tempfile.TemporaryDirectory(prefix="energy-study-kept-") as tmp:
                path = Path(tmp) / ENERGIES_FILE
                np.savez_compressed(path, **samples)
                tracker.log_artifact(run_id, path)
                if energy_histogram(path, Path(tmp) / ENERGY_HIST, f"trial {trial_id}"):
                    tracker.log_artifact(run_id, Path(tmp) / ENERGY_HIST)
            tracker.log_metrics(run_id, metrics, step=epoch)
        except Exception as exc:  # noqa: BLE001 - said; the others are still tested
            echo(f"ΔE-stopped trial {trial_id}: its kept checkpoint could not be tested ({exc})")
            continue
        out[trial_id] = dict(metrics)
        echo(
            f"  trial {trial_id} (epoch {epoch} kept): test clean "
            f"{metrics.get('test/clean_acc', float('nan')):.4f}, PGD "
            f"{metrics.get('test/pgd_acc', float('nan')):.4f} ({seconds:.1f} s)"
        )
    return out


def evaluate_finalists(
    spec: StudySpec,
    tracker: MlflowTracker,
    finalists: list[tuple[str, dict[str, Any]]],
    *,
    echo: Any = print,
) -> list[FinalResult]:
    """Evaluate ``finalists`` (``(trial_id, training config)``, best first) on Ray.

    Ray must be initialised. Each task reserves the CPUs (and GPUs) of one trial;
    the driver alone writes to MLflow.

    Args:
        spec: the study (``final_n``, resources).
        tracker: the study's MLflow tracker.
        finalists: trial ids with their training configs, in rank order.
        echo: where progress lines go (``print`` by default).
    """
    import ray

    if not finalists:
        return []
    gpus = {"num_gpus": spec.gpus_per_trial} if spec.gpus_per_trial > 0 else {}
    task = ray.remote(num_cpus=spec.cpus_per_worker, **gpus)(_evaluate_task)
    threads = max(1, int(spec.cpus_per_worker))
    runs: dict[str, str] = {}
    pending: dict[str, Any] = {}
    done: dict[str, dict[str, float]] = {}
    for trial_id, cfg in finalists:
        found = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_TRIAL: trial_id})
        if not found:
            echo(f"finalist {trial_id}: no MLflow run found; skipped")
            continue
        runs[trial_id] = found[0].info.run_id
        if "final/robust_acc" in found[0].data.metrics:
            done[trial_id] = dict(found[0].data.metrics)  # a resumed study: evaluated already
            continue
        with tempfile.TemporaryDirectory(prefix="energy-study-final-") as tmp:
            try:
                state = tracker.download(runs[trial_id], BEST_CHECKPOINT, tmp).read_bytes()
            except Exception as exc:  # noqa: BLE001 - said; the other finalists go on
                echo(f"finalist {trial_id}: its {BEST_CHECKPOINT} is missing ({exc}); skipped")
                continue
        pending[trial_id] = task.remote(cfg, ray.put(state), spec.final_n, threads)
    n_text = "the whole test set" if spec.final_n is None else f"{spec.final_n} test points"
    echo(
        f"final evaluation of {len(pending)} finalist(s): PGD and AutoAttack on the same "
        f"points ({n_text}), {len(pending)} Ray task(s)"
    )
    results = []
    for rank, (trial_id, _) in enumerate(finalists, start=1):
        if trial_id in done:
            final = {k: v for k, v in done[trial_id].items() if k.startswith("final/")}
            results.append(FinalResult(trial_id, rank, runs[trial_id], final, 0.0))
        elif trial_id in pending:
            run_id = runs[trial_id]
            try:
                metrics, samples, seconds = ray.get(pending[trial_id])
                final = {f"final/{k}": float(v) for k, v in metrics.items()}
                # the file first, the metrics last: a run with final/robust_acc has both
                with tempfile.TemporaryDirectory(prefix="energy-study-final-") as tmp:
                    path = Path(tmp) / FINAL_ARTIFACT
                    np.savez_compressed(path, **samples)
                    tracker.log_artifact(run_id, path)
                tracker.set_tags(run_id, {TAG_FINALIST: str(rank)})
                tracker.log_metrics(run_id, final, step=0)
            except Exception as exc:  # noqa: BLE001 - said; the other finalists stand
                echo(f"finalist {trial_id}: its final evaluation failed ({exc})")
                continue
            results.append(FinalResult(trial_id, rank, run_id, final, seconds))
    return results
