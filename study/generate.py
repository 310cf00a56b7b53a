"""``study generate``: sample images from a robust classifier, score them, search the sampler.

SOURCE is an MLflow run id of a training run (its ``checkpoints/best.pt``
artifact is used) or a checkpoint file. Without a space, one sampling run with
the paper's defaults; with one, a Ray Tune + Optuna study over the sampler's
parameters (objective FID, min, by default). Every sampling run is an MLflow
run nested under the source training run, or under a generation-study parent
run when SOURCE is a file: its parameters, IS/FID/KID, the energy trace of the
chain as step metrics, a per-class sample grid and a grid of the initial
images next to the final ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.tune import Callback

from trainables.errors import ConfigError, UserError
from trainables.gen_config import SamplerConfig
from trainables.scores import INCEPTION, inception_weights

ROLE_GENERATION = "generation"
ROLE_GENERATION_STUDY = "generation_study"
TRACE_FILE = "trace.npz"
GRID_FILE = "samples.png"
INIT_GRID_FILE = "init_vs_final.png"
METRICS_FILE = "metrics.json"


@dataclass
class Source:
    """A trained classifier to sample from.

    Attributes:
        checkpoint: local path of its checkpoint (``best.pt`` or ``last.pt``).
        train_config: the training config it was trained with (a mapping).
        run_id: its MLflow training run (None when given as a file).
        experiment: the MLflow experiment the sampling runs go to.
    """

    checkpoint: Path
    train_config: dict[str, Any]
    run_id: str | None
    experiment: str


def resolve_source(source: str, tracking_uri: str, cache: Path, experiment: str) -> Source:
    """A checkpoint file, or a run id whose ``checkpoints/best.pt`` is fetched to ``cache``."""
    from trainables.checkpoint import load_checkpoint

    path = Path(source)
    if path.is_file():
        state = load_checkpoint(path)
        if "config" not in state or "model" not in state:
            raise UserError(f"{path} is not a training checkpoint (no model or config in it)")
        return Source(path, dict(state["config"]), None, experiment)
    if path.suffix in (".pt", ".pth") or "/" in source:
        raise UserError(f"checkpoint file {source!r} does not exist")

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from study.tracking import quiet_mlflow

    quiet_mlflow()
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(source)
    except MlflowException:
        raise UserError(
            f"--from {source!r} is neither a checkpoint file nor a run id in {tracking_uri} "
            "(study show NAME lists runs; pass --tracking-uri for another store)"
        ) from None
    target = cache / source
    target.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = Path(client.download_artifacts(source, "checkpoints/best.pt", str(target)))
    except (MlflowException, OSError):
        raise UserError(
            f"run {source} has no checkpoints/best.pt artifact (did its training finish?)"
        ) from None
    from trainables.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)
    experiment_name = client.get_experiment(run.info.experiment_id).name
    return Source(ckpt, dict(state["config"]), source, experiment_name)


def load_plugin(plugin: str | None) -> None:
    """Import a module or ``.py`` file that registers a torch-fidelity feature extractor."""
    if not plugin:
        return
    path = Path(plugin)
    if path.suffix == ".py":
        if not path.is_file():
            raise UserError(f"extractor plugin {plugin!r} does not exist")
        name = f"energy_study_plugin_{path.stem}"
        if name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(plugin)
        except ImportError as exc:
            raise UserError(
                f"extractor plugin module {plugin!r} cannot be imported: {exc}"
            ) from None


def _device(cfg: SamplerConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def load_classifier(source: Source, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The source's model (eval mode, on ``device``) and its dataset (for statistics and FID)."""
    from trainables.checkpoint import load_checkpoint
    from trainables.config import TrainConfig
    from trainables.loop import trained_model

    cfg = TrainConfig.from_dict(source.train_config)
    weights = load_checkpoint(source.checkpoint)["model"]
    return trained_model(cfg, weights, device=device)


def dataset_key(train_config: dict[str, Any]) -> str:
    """A name for the training data's cached statistics (dataset, root, split, subset)."""
    parts = [
        str(train_config.get("dataset")),
        Path(str(train_config.get("data_root") or "")).name or "-",
        f"val{train_config.get('val_fraction')}",
        f"seed{train_config.get('split_seed')}",
        f"n{train_config.get('train_subset')}",
    ]
    return "-".join(p.replace("/", "_") for p in parts)


def sample_and_score(
    cfg: SamplerConfig,
    source: Source,
    out: Path,
    *,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    """One sampling run: initialise, run the chain, score, write grids and the trace to ``out``.

    Returns the run's metrics (``gen/*``). ``out`` receives ``samples.png``,
    ``init_vs_final.png``, ``trace.npz`` (per-step mean energies) and
    ``metrics.json``.
    """
    from trainables import generation
    from trainables.data import to_float

    load_plugin(cfg.extractor_plugin)
    device = _device(cfg)
    model, data = load_classifier(source, device)
    classes = cfg.class_list(data.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    key = dataset_key(source.train_config)

    per_class = max(1, cfg.samples // len(classes))
    y = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    stats = None
    if cfg.init != "random":
        stats = generation.fit_class_stats(
            to_float(data.train.x), data.train.y, cache_dir=cache_dir, key=key
        )
    x0 = generation.initial_images(
        cfg.init,
        stats,
        y,
        gen,
        sigma=cfg.pca_sigma,
        retained_variance=cfg.retained_variance,
        shape=tuple(data.train.x.shape[1:]),
    )
    result = generation.sgld_sample(
        model,
        x0.to(device),
        y.to(device),
        steps=cfg.steps,
        momentum=cfg.momentum,
        step_size=cfg.step_size,
        noise=cfg.noise,
        generator=gen,
        batch_size=cfg.batch_size,
    )
    sample_s = time.perf_counter() - t0
    images = result.images.detach().cpu()
    trace_t = np.asarray(torch.as_tensor(result.energy_target).cpu(), dtype=np.float64)
    trace_o = np.asarray(torch.as_tensor(result.energy_other).cpu(), dtype=np.float64)
    np.savez_compressed(out / TRACE_FILE, energy_target=trace_t, energy_other=trace_o)
    generation.save_grid(images, y, out / GRID_FILE)
    generation.save_init_final_grid(x0.cpu(), images, y, out / INIT_GRID_FILE)

    metrics: dict[str, float] = {
        "gen/energy_target_start": float(trace_t[0]),
        "gen/energy_target_end": float(trace_t[-1]),
        "gen/energy_other_end": float(trace_o[-1]),
        "gen/samples": float(len(images)),
        "time/sample_s": sample_s,
    }
    if cfg.score:
        from trainables.scores import generation_scores

        reference = data.train
        ref_key = f"{key}-ref"
        if len(classes) < data.num_classes:  # compare with the sampled classes only
            reference = reference.take(torch.isin(reference.y, y.unique()).nonzero().squeeze(1))
            ref_key += "-c" + "_".join(str(c) for c in classes)
        if cfg.reference_n is not None:
            reference = reference.subset(cfg.reference_n, seed=0)
        t1 = time.perf_counter()
        metrics.update(
            generation_scores(
                images,
                to_float(reference.x),
                reference_key=f"{ref_key}{len(reference)}",
                labels=y,
                feature_extractor=cfg.feature_extractor,
                weights_path=cfg.inception_weights,
                cache_dir=cache_dir,
            )
        )
        metrics["time/score_s"] = time.perf_counter() - t1
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


# --- MLflow ------------------------------------------------------------------------------------
def log_sampling_run(
    tracker: Any,
    parent_run_id: str,
    cfg: SamplerConfig,
    metrics: dict[str, float] | None,
    out: Path,
    *,
    name: str,
    study: str,
    trial_id: str,
    status: str = "FINISHED",
    error: str | None = None,
) -> str:
    """One sampling run, nested under ``parent_run_id``, with params, scores, trace and grids."""
    from study.tracking import PARENT_TAG, TAG_ROLE, TAG_STUDY, TAG_TRIAL, flatten

    run_id, created = tracker.get_or_create_run(
        run_name=name,
        tags={PARENT_TAG: parent_run_id, TAG_ROLE: ROLE_GENERATION},
        key_tags={TAG_STUDY: study, TAG_TRIAL: trial_id},
    )
    if created:
        tracker.log_params(run_id, flatten({k: v for k, v in cfg.to_dict().items()}))
    if metrics:
        tracker.log_metrics(run_id, metrics, step=0)
    trace = out / TRACE_FILE
    if trace.is_file():
        with np.load(trace) as z:
            target, other = z["energy_target"], z["energy_other"]
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric("gen/energy_target", float(v), now, i) for i, v in enumerate(target)]
        batch += [Metric("gen/energy_other", float(v), now, i) for i, v in enumerate(other)]
        for i in range(0, len(batch), 500):
            tracker.client.log_batch(run_id, metrics=batch[i : i + 500])
    for file in (GRID_FILE, INIT_GRID_FILE, TRACE_FILE, METRICS_FILE):
        tracker.log_artifact(run_id, out / file, "generation")
    if error:
        tracker.set_tags(run_id, {"energy_study.failure_reason": error[:1000]})
    tracker.end_run(run_id, status)
    return run_id


def parent_run(tracker: Any, source: Source, study: str, space: str | None) -> str:
    """The run sampling runs nest under: the source training run, or a generation-study run."""
    from study.tracking import TAG_ROLE, TAG_STUDY

    if source.run_id is not None:
        return source.run_id
    run_id, created = tracker.get_or_create_run(
        run_name=study,
        tags={TAG_ROLE: ROLE_GENERATION_STUDY, "energy_study.source": str(source.checkpoint)},
        key_tags={TAG_STUDY: study, "energy_study.parent": "generation"},
    )
    if created:
        tracker.log_params(
            run_id, {"source": str(source.checkpoint), "space": space or "(single run)"}
        )
    return run_id


def validate_space(space_name: str) -> Any:
    """A sampler search space, checked against the sampler's keys before Ray starts."""
    from search_spaces import load_space
    from search_spaces.space import SpaceError

    try:
        space = load_space(space_name)
        space.check_keys(SamplerConfig.field_names())
    except SpaceError as exc:
        raise ConfigError(str(exc)) from None
    return space


def trial_config(base: dict[str, Any], space: Any, sampled: dict[str, Any]) -> SamplerConfig:
    """base < space constants < sampled values."""
    return SamplerConfig.from_dict({**base, **dict(space.fixed), **sampled})


def generation_trial(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Tune function trainable: one sampling run; reports its ``gen/*`` metrics once."""
    from ray import tune

    from search_spaces import load_space

    space = load_space(payload["space"])
    cfg = trial_config(payload["base"], space, config)
    torch.set_num_threads(1)
    trial_id = tune.get_context().get_trial_id()
    out = Path(payload["folder"]) / "trials" / trial_id
    source = Source(
        Path(payload["checkpoint"]),
        payload["train_config"],
        payload["run_id"],
        payload["experiment"],
    )
    metrics = sample_and_score(cfg, source, out, cache_dir=Path(payload["cache_dir"]))
    tune.report(metrics)


class GenerationWriter(Callback):
    """Driver-side MLflow writer of sampling trials (one writer for the SQLite store).

    Args:
        tracking_uri: the MLflow store.
        experiment: the experiment of the source run (or the generation experiment).
        parent_run_id: the run the sampling runs nest under.
        study: the generation study's name.
        base: the sampler config every trial starts from (a mapping).
        space_name: the search space.
        folder: the study's folder (trial outputs under ``trials/<id>``).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        parent_run_id: str,
        study: str,
        base: dict[str, Any],
        space_name: str,
        folder: str,
    ) -> None:
        self._args = (tracking_uri, experiment, parent_run_id, study, base, space_name, folder)
        self._tracker: Any = None
        self.run_ids: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])  # type: ignore[misc]

    def _log(self, trial: Any, status: str, error: str | None = None) -> None:
        from search_spaces import load_space
        from study.tracking import MlflowTracker
        from study.ui import searched_values, trial_run_name

        uri, experiment, parent, study, base, space_name, folder = self._args
        if self._tracker is None:
            self._tracker = MlflowTracker(uri, experiment)
        space = load_space(space_name)
        cfg = trial_config(base, space, trial.config)
        name = trial_run_name("sgld", searched_values(space, trial.config))  # what it tried
        self.run_ids[trial.trial_id] = log_sampling_run(
            self._tracker, parent, cfg, _gen_metrics(trial.last_result or {}),
            Path(folder) / "trials" / trial.trial_id, name=name,
            study=study, trial_id=trial.trial_id, status=status, error=error,
        )  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.callbacks import trial_error_text

        self._log(trial, "FAILED", trial_error_text(trial))


@dataclass
class GenerationOutcome:
    """One sampling run of ``study generate``."""

    trial_id: str
    status: str
    config: dict[str, Any]
    metrics: dict[str, float]
    run_id: str | None
    error: str | None = None


def _gen_metrics(result: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in result.items()
        if k.startswith(("gen/", "time/"))
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    }


def run_generation(
    *,
    source_arg: str,
    base: dict[str, Any],
    space_name: str | None,
    trials: int,
    metrics: list[str],
    modes: list[str],
    name: str,
    tracking_uri: str,
    storage: Path,
    experiment: str,
    address: str | None = None,
    seed: int = 0,
    max_concurrent: int = 0,
) -> list[GenerationOutcome]:
    """``study generate``: one sampling run, or a Tune + Optuna study over the sampler."""
    from study.tracking import MlflowTracker

    base_cfg = SamplerConfig.from_dict(base)  # bad values fail before anything starts
    space = validate_space(space_name) if space_name else None
    if space is not None:
        trial_config(base, space, space.sample_defaults())
    for metric in metrics:
        if not metric.startswith("gen/"):
            raise ConfigError(f"metric {metric!r}: generation objectives are gen/fid, gen/is, ...")
    folder = storage / name
    cache = storage / "cache"
    source = resolve_source(source_arg, tracking_uri, cache / "sources", experiment)
    # fail on a missing extractor plugin or Inception weights before anything runs
    load_plugin(base_cfg.extractor_plugin)
    if base_cfg.score and base_cfg.feature_extractor == INCEPTION:
        inception_weights(base_cfg.inception_weights)
    tracker = MlflowTracker(tracking_uri, source.experiment)
    parent = parent_run(tracker, source, name, space_name)

    if space is None:
        out = folder / "single"
        try:
            values = sample_and_score(base_cfg, source, out, cache_dir=cache)
        except Exception as exc:
            log_sampling_run(
                tracker, parent, base_cfg, None, out, name=f"{name}-single", study=name,
                trial_id="single", status="FAILED", error=f"{type(exc).__name__}: {exc}",
            )  # fmt: skip
            raise
        run_id = log_sampling_run(
            tracker, parent, base_cfg, values, out, name=f"{name}-single", study=name,
            trial_id="single",
        )  # fmt: skip
        return [GenerationOutcome("single", "FINISHED", base_cfg.to_dict(), values, run_id)]

    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from search_spaces import compile_space
    from study.callbacks import ProgressCallback
    from study.runner import init_ray

    multi = len(metrics) > 1
    searcher = OptunaSearch(
        space=compile_space(space),
        metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0],
        sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=name,
    )
    payload = {
        "space": space_name,
        "base": base,
        "folder": str(folder.resolve()),
        "cache_dir": str(cache.resolve()),
        "checkpoint": str(source.checkpoint.resolve()),
        "train_config": source.train_config,
        "run_id": source.run_id,
        "experiment": source.experiment,
    }
    init_ray(address)
    writer = GenerationWriter(
        tracking_uri, source.experiment, parent, name, base, space_name, str(folder)
    )
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(generation_trial, payload=payload), {"cpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=trials, max_concurrent_trials=max_concurrent or None
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(folder.resolve()),
            callbacks=[writer, ProgressCallback(metrics, trials)],
            verbose=0,
        ),
    )
    grid = tuner.fit()
    outcomes = []
    for result in grid:
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
        status = "FAILED" if result.error else "FINISHED"
        error = str(result.error).strip().splitlines()[-1][:500] if result.error else None
        outcomes.append(
            GenerationOutcome(
                trial_id,
                status,
                dict(result.config),
                _gen_metrics(result.metrics or {}),
                writer.run_ids.get(trial_id),
                error,
            )
        )
    if source.run_id is None:
        tracker.end_run(parent, "FINISHED")
    return outcomes
