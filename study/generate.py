"""``study generate``: sample images from a robust classifier, score them, search the sampler.

SOURCE is an MLflow run id of a training run (its ``checkpoints/best.pt``
artifact is used) or a checkpoint file. Without a space, one sampling run with
the paper's defaults; with one, a Ray Tune + Optuna study over the sampler's
parameters (objective FID, min, by default). Every sampling run is an MLflow
run nested under the source training run, or under a generation-study parent
run when SOURCE is a file: its parameters, IS/FID/KID, the energy trace of the
chain as step metrics, a per-class sample grid and a grid of the initial
images next to the final ones.

A study's trials run wherever Ray places them, on nodes that need not share the
driver's disk: every file of the driver a trial opens (the source checkpoint, a
``.py`` extractor plugin, the Inception weights) travels with it through Ray's
object store (:class:`ShippedFile`, as :mod:`study.finals` ships a finalist's
weights); a trial on the driver's own node opens the driver's file, with no copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ray.tune import Callback

from reports.vocabulary import (
    BEST_CHECKPOINT,
    GEN_METRICS_FILE,
    GENERATION_DIR,
    GRID_FILE,
    INIT_GRID_FILE,
    PARENT_GENERATION,
    PARENT_TAG,
    ROLE_GENERATION,
    ROLE_GENERATION_STUDY,
    TAG_ARTIFACT_ERROR,
    TAG_FAILURE,
    TAG_PARENT,
    TAG_PROCESS,
    TAG_ROLE,
    TAG_SOURCE,
    TAG_STUDY,
    TAG_TRIAL,
    TRACE_FILE,
)
from search_spaces import SearchSpace
from study.runner import TrialOutcome
from study.spec import SearchSpec
from trainables.errors import ConfigError, DataNotFoundError, UserError
from trainables.gen_config import SamplerConfig
from trainables.scores import INCEPTION, inception_weights


@dataclass
class Source:
    """A trained classifier to sample from.

    Attributes:
        checkpoint: path of its checkpoint (``best.pt`` or ``last.pt``) on the driver
            (a study's trials get its bytes through :class:`ShippedFile`).
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
        return Source(path.resolve(), dict(state["config"]), None, experiment)
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
        ckpt = Path(client.download_artifacts(source, BEST_CHECKPOINT, str(target)))
    except (MlflowException, OSError):
        raise UserError(
            f"run {source} has no {BEST_CHECKPOINT} artifact (did its training finish?)"
        ) from None
    state = load_checkpoint(ckpt)
    experiment_name = client.get_experiment(run.info.experiment_id).name
    return Source(ckpt, dict(state["config"]), source, experiment_name)


def _has_size(path: Path, size: int) -> bool:
    """Whether ``path`` is a file of ``size`` bytes."""
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


@dataclass(frozen=True)
class ShippedFile:
    """A file of the driver that a Ray trial opens wherever Ray places it.

    Its bytes go into Ray's object store once (:meth:`put`, on the driver). A trial
    on the driver's node opens the driver's file itself (no copy, as on one machine);
    a trial on any other node fetches the bytes once per node into a node-local
    folder (:meth:`local`), so a node that does not share the driver's disk opens it
    all the same.

    Attributes:
        path: the file on the driver (absolute).
        size: its size in bytes.
        digest: a hash of its bytes (the folder of its copies on other nodes).
        node_id: the Ray node id of the driver.
        ref: the object ref of its bytes (owned by the driver, alive while it runs).
    """

    path: str
    size: int
    digest: str
    node_id: str
    ref: Any

    @classmethod
    def put(cls, path: str | Path) -> ShippedFile:
        """Read ``path`` (a file on the driver) into Ray's object store; Ray must be
        initialised."""
        import ray

        path = Path(path).resolve()
        data = path.read_bytes()
        return cls(
            path=str(path),
            size=len(data),
            digest=hashlib.blake2b(data, digest_size=16).hexdigest(),
            node_id=ray.get_runtime_context().get_node_id(),
            ref=ray.put(data),
        )

    def local(self, scratch: Path) -> Path:
        """The file as this process can open it: the driver's own path on the driver's
        node, else a copy at ``<scratch>/<digest>/<name>`` (fetched from the object
        store once per node, written through a temporary file and a rename so that
        concurrent trials never read half of it).

        Args:
            scratch: a node-local folder for the copies (made when needed).
        """
        import ray

        own = Path(self.path)
        if ray.get_runtime_context().get_node_id() == self.node_id and _has_size(own, self.size):
            return own
        target = scratch / self.digest / own.name
        if _has_size(target, self.size):
            return target
        data = ray.get(self.ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target


#: The key of the source checkpoint among a trial's shipped files.
SOURCE_KEY = "checkpoint"


def ship_trial_files(source: Source, cfg: SamplerConfig) -> dict[str, ShippedFile]:
    """The driver's files a sampling trial opens, put into Ray's object store: the
    source checkpoint (:data:`SOURCE_KEY`), a ``.py`` extractor plugin and, when the
    runs are scored with Inception, its weights (the file the driver found:
    ``--inception-weights``, ``$ENERGY_STUDY_INCEPTION_WEIGHTS`` or torch's hub cache).

    Args:
        source: the classifier sampled from (its checkpoint on the driver).
        cfg: the study's sampler config before any sampled value (its file paths
            absolute, :attr:`GenerationSpec.template`).
    """
    files = {SOURCE_KEY: ShippedFile.put(source.checkpoint)}
    if cfg.extractor_plugin and cfg.extractor_plugin.endswith(".py"):
        files["extractor_plugin"] = ShippedFile.put(cfg.extractor_plugin)
    if cfg.score and cfg.feature_extractor == INCEPTION:
        files["inception_weights"] = ShippedFile.put(inception_weights(cfg.inception_weights))
    return files


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
    if generation.INITS.get(cfg.init).needs_stats:
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
    (out / GEN_METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def generate_after_training(
    sampler: Mapping[str, Any], train_config: Mapping[str, Any], folder: Path
) -> dict[str, float]:
    """A trial of a study over training and generation, once it trained: sample from its
    best checkpoint and score (:func:`sample_and_score`), in the trial's own process.

    The files go to ``<folder>/generation/`` (``samples.png``, ``init_vs_final.png``,
    ``trace.npz``, ``metrics.json``), so that the trial's last checkpoint carries them
    to its MLflow run; the ``gen/*`` metrics join the trial's last result.

    Args:
        sampler: the trial's sampler settings (:meth:`TrialTemplate.sampler`).
        train_config: the trial's training config (a :class:`TrainConfig` mapping).
        folder: the trial's run folder (its ``checkpoints/best.pt`` is sampled from).
    """
    from trainables.generation import default_cache_dir

    cfg = SamplerConfig.from_dict(dict(sampler))
    load_plugin(cfg.extractor_plugin)
    source = Source(folder / BEST_CHECKPOINT, dict(train_config), None, "")
    return sample_and_score(cfg, source, folder / GENERATION_DIR, cache_dir=default_cache_dir())


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
    process: str | None = None,
) -> str:
    """One sampling run, nested under ``parent_run_id``, with params, scores, trace and grids.

    ``process`` (``host:pid`` of the process that sampled, a study's trial) becomes the
    tag :data:`~reports.vocabulary.TAG_PROCESS`, as for a training trial.
    """
    from study.tracking import flatten

    run_id, created = tracker.get_or_create_run(
        run_name=name,
        tags={PARENT_TAG: parent_run_id, TAG_ROLE: ROLE_GENERATION},
        key_tags={TAG_STUDY: study, TAG_TRIAL: trial_id},
    )
    if created:
        tracker.log_params(run_id, flatten(cfg.to_dict()))
    if process:
        tracker.set_tags(run_id, {TAG_PROCESS: process})
    if metrics:
        tracker.log_metrics(run_id, metrics, step=0)
    trace = out / TRACE_FILE
    if trace.is_file():
        with np.load(trace) as z:
            for key in ("energy_target", "energy_other"):
                tracker.log_series(run_id, f"gen/{key}", z[key])
    lacking = []
    for file in (GRID_FILE, INIT_GRID_FILE, TRACE_FILE, GEN_METRICS_FILE):
        if (out / file).is_file():
            tracker.log_artifact(run_id, out / file, GENERATION_DIR)
        elif status == "FINISHED":  # a finished sampling run has every file: say which not
            lacking.append(f"{GENERATION_DIR}/{file}: not in the trial's checkpoint")
    if lacking:
        tracker.set_tags(run_id, {TAG_ARTIFACT_ERROR: "; ".join(lacking)})
        print(f"warning: sampling run {trial_id} lacks {'; '.join(lacking)}", file=sys.stderr)
    if error:
        tracker.set_tags(run_id, {TAG_FAILURE: error[:1000]})
    tracker.end_run(run_id, status)
    return run_id


def parent_run(tracker: Any, source: Source, study: str, space: str | None) -> str:
    """The run sampling runs nest under: the source training run, or a generation-study run."""
    if source.run_id is not None:
        return source.run_id
    run_id, created = tracker.get_or_create_run(
        run_name=study,
        tags={TAG_ROLE: ROLE_GENERATION_STUDY, TAG_SOURCE: str(source.checkpoint)},
        key_tags={TAG_STUDY: study, TAG_PARENT: PARENT_GENERATION},
    )
    if created:
        tracker.log_params(
            run_id, {"source": str(source.checkpoint), "space": space or "(single run)"}
        )
    return run_id


@dataclass
class GenerationSpec(SearchSpec):
    """One ``study generate``: the fields of :class:`~study.spec.SearchSpec` and these.

    Its ``space`` is a sampler space (None: one sampling run with ``base``); its
    metrics are ``gen/*`` (default ``gen/fid``, min); ``trials`` defaults to 8.

    Attributes:
        source: an MLflow run id of a training run (its ``checkpoints/best.pt`` is
            sampled from) or a training checkpoint file.
        base: the sampler config (a :class:`SamplerConfig` mapping) every run starts from.
        experiment: MLflow experiment of the sampling runs when ``source`` is a file
            (a run id's runs go to that run's experiment).
    """

    config_keys: ClassVar[tuple[str, ...]] = tuple(SamplerConfig.field_names())
    presets: ClassVar[Iterable[str]] = ()

    space: str | None = None
    trials: int = 8
    metrics: list[str] = field(default_factory=lambda: ["gen/fid"])
    modes: list[str] = field(default_factory=lambda: ["min"])
    source: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    experiment: str = "generation"

    @property
    def cache(self) -> Path:
        """``<storage>/cache``: fetched checkpoints, class statistics, reference features
        (a URI storage: the node-local :attr:`~study.spec.SearchSpec.local_root`'s)."""
        return self.local_root / "cache"

    @cached_property
    def template(self) -> dict[str, Any]:
        """base < the space's ``fixed`` values, with the file paths absolute (resolved
        once on the driver; Tune runs a trial in a working folder of its own)."""
        values = {**self.base, **(self.load_space().fixed if self.space else {})}
        plugin = values.get("extractor_plugin")
        if plugin and str(plugin).endswith(".py"):
            values["extractor_plugin"] = str(Path(plugin).resolve())
        if values.get("inception_weights"):
            values["inception_weights"] = str(Path(values["inception_weights"]).resolve())
        return values

    def trial_config(self, sampled: Mapping[str, Any]) -> SamplerConfig:
        """One run's validated sampler config: :attr:`template` < ``sampled``."""
        return SamplerConfig.from_dict({**self.template, **sampled})

    def validate(self) -> None:
        """Check every field, the space and one sampled config, before anything starts."""
        self.check()
        if not self.source:
            raise ConfigError("source: give a training run id or a checkpoint file")
        SamplerConfig.from_dict(self.base)
        for metric in self.metrics:
            if not metric.startswith("gen/"):
                raise ConfigError(
                    f"metric {metric!r}: generation objectives are gen/fid, gen/is, ..."
                )
        self.trial_config(self.load_space().sample_defaults() if self.space else {})


def validate_space(space_name: str) -> SearchSpace:
    """A sampler search space, checked against the sampler's keys (a ConfigError if not)."""
    return GenerationSpec(name="generate", space=space_name).load_space()


def generation_trial(
    config: dict[str, Any],
    spec: GenerationSpec,
    source: Source,
    template: dict[str, Any],
    files: Mapping[str, ShippedFile] | None = None,
) -> None:
    """Tune function trainable: one sampling run; reports its ``gen/*`` metrics once.

    Args:
        config: the trial's Tune config (sampled values and the space's constants).
        spec: the generation study (folder and cache).
        source: the classifier sampled from (its checkpoint path is the driver's).
        template: :attr:`GenerationSpec.template`, resolved on the driver.
        files: the driver's files the trial opens (:func:`ship_trial_files`): the source
            checkpoint and the sampler's files, opened where this trial runs (None: the
            driver's paths as they are, for a node that shares the driver's disk).
    """
    import shutil
    import socket

    from ray import tune

    from trainables.ray_adapter import scratch_folder, snapshot

    local = {key: shipped.local(spec.cache / "shipped") for key, shipped in (files or {}).items()}
    if SOURCE_KEY in local:
        source = dataclasses.replace(source, checkpoint=local.pop(SOURCE_KEY))
    cfg = SamplerConfig.from_dict({**template, **{k: str(v) for k, v in local.items()}, **config})
    torch.set_num_threads(1)
    # node-local scratch; the files travel to the driver in the checkpoint (storage)
    out = scratch_folder(tune.get_context().get_trial_id())
    try:
        try:
            metrics = sample_and_score(cfg, source, out, cache_dir=spec.cache)
        except DataNotFoundError as exc:  # the data is the one file that does not travel
            raise DataNotFoundError(
                f"on node {socket.gethostname()}: a generation trial reads the source's "
                "training data where it runs, like a training trial: the dataset must be at "
                f"data_root = {source.train_config.get('data_root')!r} on every node that "
                f"runs trials (a shared volume; see docs/cluster.md). {exc}"
            ) from None
        with snapshot(out) as files:  # without the folder's hidden owner record
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(files)))
    finally:
        shutil.rmtree(out, ignore_errors=True)


class GenerationWriter(Callback):
    """Driver-side MLflow writer of sampling trials (one writer for the SQLite store).

    Args:
        spec: the generation study (its space and template read once, on the driver).
        experiment: the experiment of the source run (or the generation experiment).
        parent_run_id: the run the sampling runs nest under.
    """

    def __init__(self, spec: GenerationSpec, experiment: str, parent_run_id: str) -> None:
        self._args = (spec, experiment, parent_run_id)
        self._tracker: Any = None
        self.run_ids: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"args": self._args}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"])  # type: ignore[misc]

    def _log(self, trial: Any, status: str, error: str | None = None) -> None:
        import contextlib
        import tempfile

        from study.callbacks import our_metrics
        from study.tracking import MlflowTracker
        from study.trial import checkpoint_files, trial_checkpoint
        from study.ui import searched_values, trial_run_name

        spec, experiment, parent = self._args
        if self._tracker is None:
            self._tracker = MlflowTracker(spec.tracking_uri, experiment)
        name = trial_run_name("sgld", searched_values(spec.load_space(), trial.config))
        # the trial's files from its checkpoint in storage, never from the node that ran it
        checkpoint = trial_checkpoint(spec.storage, trial.checkpoint, trial.last_result)
        last = trial.last_result or {}
        process = f"{last.get('hostname', '?')}:{last['pid']}" if "pid" in last else None
        with contextlib.ExitStack() as stack:
            if checkpoint is not None:
                out = stack.enter_context(checkpoint_files(checkpoint))
            else:  # no files (a failed trial): an empty folder
                out = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            self.run_ids[trial.trial_id] = log_sampling_run(
                self._tracker, parent, spec.trial_config(trial.config), our_metrics(last), out,
                name=name, study=spec.name, trial_id=trial.trial_id, status=status, error=error,
                process=process,
            )  # fmt: skip

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from study.callbacks import trial_error_text

        self._log(trial, "FAILED", trial_error_text(trial))


def run_generation(spec: GenerationSpec, working_dir: str | None = None) -> list[TrialOutcome]:
    """``study generate``: one sampling run (no space), or a Tune + Optuna study over
    the sampler (:func:`study.runner.build_tuner`); the runs' outcomes, MLflow run ids
    included.

    Args:
        spec: the generation study.
        working_dir: a folder shipped to every Ray node (``--working-dir``; a study only).
    """
    from study import preflight
    from study.tracking import MlflowTracker

    spec.validate()  # bad values fail before anything starts
    if spec.space:  # the search keeps Tune's state in the storage (a folder or a URI)
        preflight.check_storage(spec.storage if spec.remote else spec.location())
    preflight.check_tracking(spec.tracking_uri)
    base_cfg = spec.trial_config({})
    source = resolve_source(spec.source, spec.tracking_uri, spec.cache / "sources", spec.experiment)
    # fail on a missing extractor plugin or Inception weights before anything runs
    load_plugin(base_cfg.extractor_plugin)
    if base_cfg.score and base_cfg.feature_extractor == INCEPTION:
        inception_weights(base_cfg.inception_weights)
    tracker = MlflowTracker(spec.tracking_uri, source.experiment)
    parent = parent_run(tracker, source, spec.name, spec.space)

    if not spec.space:
        out, run = spec.folder / "single", {"name": f"{spec.name}-single", "study": spec.name}
        try:
            values = sample_and_score(base_cfg, source, out, cache_dir=spec.cache)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log_sampling_run(
                tracker, parent, base_cfg, None, out, **run, trial_id="single", status="FAILED",
                error=error,
            )  # fmt: skip
            raise
        run_id = log_sampling_run(tracker, parent, base_cfg, values, out, **run, trial_id="single")
        return [TrialOutcome("single", "FINISHED", base_cfg.to_dict(), values, None, run_id)]

    from ray import tune

    from study.callbacks import ProgressCallback
    from study.runner import build_tuner, init_ray, trial_outcomes

    init_ray(spec.address, working_dir=working_dir)
    writer = GenerationWriter(spec, source.experiment, parent)
    # the trials may run on nodes that do not share this disk: the files they open go
    # with them through the object store (alive while ``files`` is, i.e. the study)
    files = ship_trial_files(source, base_cfg)
    trainable = tune.with_parameters(
        generation_trial, spec=spec, source=source, template=spec.template, files=files
    )
    tuner = build_tuner(
        spec,
        tune.with_resources(trainable, {"cpu": 1}),
        [writer, ProgressCallback(spec.metrics, spec.trials)],
    )
    outcomes = trial_outcomes(tuner.fit(), lambda config, metrics: True)
    for outcome in outcomes:
        outcome.run_id = writer.run_ids.get(outcome.trial_id)
    if source.run_id is None:
        tracker.end_run(parent, "FINISHED")
    return outcomes
