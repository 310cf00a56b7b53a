"""Model lineage in MLflow: study → trial → final model → registered version.

``study export NAME --register MODEL``
    The study's best trial (:func:`study.export.best_runs`, the order of ``study
    export``) is built as the project's model with its ``checkpoints/best.pt`` weights
    and logged with MLflow's model API (``mlflow.pytorch.log_model``) as the logged
    model :data:`~reports.vocabulary.TRIAL_MODEL` of the trial's run, then registered as
    a new version of ``MODEL`` with the alias ``candidate``.

``study train --config best.yaml --register MODEL``
    The final training's runs carry the study, trial and run the exported config names
    (:func:`study.export.read_source`) as tags; its best weights are logged as
    :data:`~reports.vocabulary.FINAL_MODEL` of its run and registered as a new version of
    ``MODEL``. The alias ``champion`` moves to that version only when it beats the
    current champion (:func:`beats`):

    * the number compared is the final run's **test** score of the source study's
      objective: objective ``val/pgd_acc`` → ``test/pgd_acc`` (the objective itself
      when the run logged no ``test/`` counterpart). The study's validation scores
      chose the config; the test score is the held-out number every final run has;
    * the champion's number is the same metric of the champion version's run;
    * it must be strictly better in the objective's mode (``max``/``min``): a tie, or
      a champion whose run lacks the metric, leaves the alias where it is (the command
      says why);
    * a config without a source (written by hand), or whose source study is not in
      this store, is judged on ``test/pgd_acc`` (max).

    With ``--workers``/``--gpus`` (Ray Train, a study of one) the same happens to its
    trial's run once the training ended (:func:`record_final`).

Every logged model holds its training config (the logged model's params, and the
``training_config`` entry of its ``MLmodel`` metadata), a signature (float32 images
``[N, C, H, W]`` in [0, 1] → logits ``[N, classes]``, the normalisation is inside the
model) and an input example of two test images. It is saved as a ``torch.export``
program (``serialization_format="pt2"``): ``mlflow.pytorch.load_model`` loads it with
torch alone, without this project's code. Its requirements are given (torch), so MLflow
infers none (no subprocess, no network). Every version is tagged with its source
study, trial and run (:data:`~reports.vocabulary.TAG_SOURCE_STUDY` …), the run its
weights come from and the metric it is judged by with its value.

Bad input (an unknown study, a study without a finished trial, a run without its
weights, an invalid model name) is refused before anything is logged or registered.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reports.data import retry
from reports.ranking import run_metrics
from reports.vocabulary import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    FINAL_MODEL,
    ROLE_TRIAL,
    TAG_MODEL_RUN,
    TAG_OBJECTIVE,
    TAG_OBJECTIVE_MODE,
    TAG_OBJECTIVE_VALUE,
    TAG_ROLE,
    TAG_SOURCE_RUN,
    TAG_SOURCE_STUDY,
    TAG_SOURCE_TRIAL,
    TAG_STUDY,
    TAG_TRIAL,
    TRIAL_MODEL,
)
from study.export import DEFAULT_OBJECTIVES, study_objectives, trial_checkpoint
from study.tracking import MlflowTracker, flatten
from trainables.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from trainables.config import TrainConfig

#: Test images saved with each logged model as its input example.
EXAMPLE_POINTS = 2
#: The description of a registered model this module creates.
MODEL_DESCRIPTION = (
    "Classifiers trained by energy-study. Alias `candidate`: the best trial of a study "
    "(`study export NAME --register MODEL`); alias `champion`: the final training that "
    "beat every earlier champion on its study's objective, compared on the test score "
    "(`study train --config best.yaml --register MODEL`). Inputs: float32 images "
    "[N, C, H, W] in [0, 1]; outputs: logits."
)


@dataclass
class Registered:
    """A registered model version.

    Attributes:
        name: the registered model.
        version: the new version (a number as text).
        model_uri: the logged model it was registered from (``models:/m-…``).
        run_id: the run whose weights it holds.
        alias: the alias it got (``candidate``, ``champion``), or ``None``.
        objective: the metric it is judged by; ``value``: its value (NaN when missing).
        reason: one line on the alias (why it moved, or why it stayed).
    """

    name: str
    version: str
    model_uri: str
    run_id: str
    alias: str | None
    objective: str
    value: float
    reason: str


def check_model_name(name: str) -> str:
    """``name`` as a registered model name, stripped.

    Raises:
        UserError: it is empty or holds ``/``, ``:`` or ``@`` (they break ``models:/``
            URIs).
    """
    stripped = name.strip()
    if not stripped or any(c in stripped for c in "/:@"):
        raise UserError(
            f"--register {name!r}: a registered model name must be non-empty and hold no "
            "'/', ':' or '@'"
        )
    return stripped


def source_tags(source: Mapping[str, str] | None) -> dict[str, str]:
    """The tags naming a config's source (:func:`study.export.read_source`); none without."""
    if not source:
        return {}
    return {
        TAG_SOURCE_STUDY: source["study"],
        TAG_SOURCE_TRIAL: source["trial"],
        TAG_SOURCE_RUN: source["run"],
    }


def judged_metric(objective: str, metrics: Mapping[str, float]) -> str:
    """The metric a final run is judged by for the study objective ``objective``:
    ``test/<name>`` for ``<namespace>/<name>`` when ``metrics`` holds it, else
    ``objective`` itself.

    Args:
        objective: the study's first objective, e.g. ``val/pgd_acc``.
        metrics: the final run's metrics (latest values).
    """
    name = objective.split("/", 1)[-1]
    candidate = f"test/{name}"
    return candidate if candidate in metrics else objective


def beats(new: float, old: float, mode: str) -> bool:
    """Whether ``new`` is strictly better than ``old`` in ``mode`` (``max``/``min``); a
    tie, or a value that is not a finite number on either side, is no win."""
    if not (math.isfinite(new) and math.isfinite(old)):
        return False
    return new > old if mode == "max" else new < old


@contextlib.contextmanager
def _tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``log_model``) and its registry store resolve the tracking
    URI from the process's global setting: this one for the block, the earlier after."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # MLflow puts the earlier URI back on exit, and drops MLFLOW_TRACKING_URI from the
    # environment when the earlier one came from there: the variable is restored too
    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _registered_model(client: Any, name: str) -> None:
    """Create the registered model ``name`` unless it exists."""
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: client.get_registered_model(name), "get registered model")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        create = client.create_registered_model
        retry(lambda: create(name, description=MODEL_DESCRIPTION), "create registered model")


def _link_metrics(client: Any, run_id: str, model_id: str) -> None:
    """Link the latest point of every metric of ``run_id`` to the logged model (the
    model's page in the UI shows them; the run's history is unchanged)."""
    from mlflow.entities import Metric

    run = retry(lambda: client.get_run(run_id), "get run")
    linked = []
    for key in run.data.metrics:
        history = retry(lambda k=key: client.get_metric_history(run_id, k), "history")
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            linked.append(
                Metric(key, last.value, last.timestamp, last.step, model_id=model_id, run_id=run_id)
            )
    for first in range(0, len(linked), 1000):
        chunk = linked[first : first + 1000]
        retry(lambda c=chunk: client.log_batch(run_id, metrics=c), "link metrics")


@dataclass
class RunModel:
    """A finished run's model, built and checked, ready to log (:func:`run_model`).

    Attributes:
        run: the MLflow run.
        cfg: its training config.
        model: the project's model with the run's best weights (eval mode, CPU).
        example: the input example: the first :data:`EXAMPLE_POINTS` test images,
            float32 ``[N, C, H, W]`` in [0, 1] (numpy).
    """

    run: Any
    cfg: TrainConfig
    model: nn.Module
    example: np.ndarray


def run_model(tracker: MlflowTracker, run: Any) -> RunModel:
    """Build a finished run's model from its ``config.yaml`` and ``checkpoints/best.pt``
    artifacts (:func:`study.export.trial_checkpoint`) and the dataset on disk.

    Raises:
        UserError: the run lacks its weights or config, or the dataset is not on disk.
    """
    import torch

    from trainables.data import to_float
    from trainables.loop import trained_model

    cfg, weights = trial_checkpoint(tracker, run)
    model, data = trained_model(cfg, weights, device="cpu")  # a missing dataset fails here
    example = to_float(data.test.take(torch.arange(EXAMPLE_POINTS)).x).numpy()
    return RunModel(run, cfg, model, example)


def log_model(
    tracker: MlflowTracker,
    built: RunModel,
    *,
    model_name: str,
    source: Mapping[str, str] | None,
) -> Any:
    """Log a run's model (:func:`run_model`) with MLflow's model API as a logged model of
    that run, its metrics linked (see the module's docstring for what it holds).

    Args:
        tracker: the tracker of the run's experiment.
        built: the run's model.
        model_name: the logged model's name (:data:`TRIAL_MODEL`, :data:`FINAL_MODEL`).
        source: the study, trial and run the weights or their config came from.

    Returns:
        MLflow's ``ModelInfo`` (``model_uri``: ``models:/<model id>``).
    """
    import mlflow.pytorch
    import torch
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import infer_signature

    run, cfg, model, example = built.run, built.cfg, built.model, built.example
    with torch.no_grad():
        logits = model(torch.from_numpy(example)).numpy()
    run_id = run.info.run_id
    client = tracker.client
    with _tracking(tracker.tracking_uri):
        logged = retry(
            lambda: client.create_logged_model(
                tracker.experiment_id,
                name=model_name,
                source_run_id=run_id,
                params=flatten(cfg.to_dict()),
                tags={**source_tags(source), TAG_MODEL_RUN: run_id},
                model_type="classifier",
            ),
            "create logged model",
        )
        info = mlflow.pytorch.log_model(
            model,
            model_id=logged.model_id,
            signature=infer_signature(example, logits),
            input_example=example,
            # as MLflow pins it (no local label such as +cpu); none inferred
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            serialization_format="pt2",
            metadata={
                "training_config": cfg.to_dict(),
                "source": dict(source or {}),
                "inputs": "float32 images [N, C, H, W] in [0, 1]; normalisation inside",
            },
        )
        output = [LoggedModelOutput(logged.model_id, step=0)]
        retry(lambda: client.log_outputs(run_id, models=output), "link model to run")
        _link_metrics(client, run_id, logged.model_id)
    return info


def _register(
    tracker: MlflowTracker, name: str, info: Any, run_id: str, tags: Mapping[str, str]
) -> str:
    """Register the logged model ``info`` as a new version of ``name``; returns it."""
    client = tracker.client
    with _tracking(tracker.tracking_uri):
        _registered_model(client, name)
        version = retry(
            lambda: client.create_model_version(
                name, source=info.model_uri, run_id=run_id, tags=dict(tags), model_id=info.model_id
            ),
            "create model version",
        )
    return str(version.version)


def _objective(tracking_uri: str, study: str | None) -> tuple[str, str]:
    """The first objective of ``study`` and its mode (:data:`DEFAULT_OBJECTIVES` when
    there is no study or the store does not hold it)."""
    from mlflow.tracking import MlflowClient

    if study is not None:
        client = MlflowClient(tracking_uri)
        if retry(lambda: client.get_experiment_by_name(study), "lookup") is not None:
            metrics, modes = study_objectives(MlflowTracker(tracking_uri, study), study)
            return metrics[0], modes[0]
    return DEFAULT_OBJECTIVES[0][0], DEFAULT_OBJECTIVES[1][0]


# --- study export --register ----------------------------------------------------------------
@dataclass
class Candidate:
    """The best trial of a study, checked and ready to register (:func:`prepare_candidate`).

    Attributes:
        tracker: the study's tracker.
        study: the study; ``name``: the registered model.
        run: the best trial's MLflow run.
        metric, mode: the metric that ranked it first and its mode.
        built: its model.
    """

    tracker: MlflowTracker
    study: str
    name: str
    run: Any
    metric: str
    mode: str
    built: RunModel


def prepare_candidate(
    tracking_uri: str, study: str, name: str, *, metric: str, mode: str
) -> Candidate:
    """Find and check the best trial of ``study`` before anything is written.

    Args:
        tracking_uri: the MLflow store of the study.
        study: the study's name (its experiment).
        name: the registered model to add a version to.
        metric: the metric that ranks the trials first; ``mode``: ``max``/``min``.

    Raises:
        UserError: an invalid ``name``, an unknown study, a study without a finished
            trial, a best run without its weights or config, a dataset not on disk.
    """
    from mlflow.tracking import MlflowClient

    from study.export import best_runs
    from study.tracking import quiet_mlflow

    name = check_model_name(name)
    quiet_mlflow()
    client = MlflowClient(tracking_uri)
    if retry(lambda: client.get_experiment_by_name(study), "lookup") is None:
        raise UserError(
            f"no study {study!r} in {tracking_uri} (study list --tracking-uri URI lists them)"
        )
    tracker = MlflowTracker(tracking_uri, study)
    (run,) = best_runs(tracker, study, metric, mode, 1)
    built = run_model(tracker, run)  # its weights, config and data are there
    return Candidate(tracker, study, name, run, metric, mode, built)


def register_candidate(candidate: Candidate) -> Registered:
    """Log the best trial's model to its run and register it with the alias ``candidate``
    (see the module's docstring)."""
    run = candidate.run
    run_id, trial = run.info.run_id, run.data.tags.get(TAG_TRIAL, "?")
    source = {"study": candidate.study, "trial": trial, "run": run_id}
    info = log_model(candidate.tracker, candidate.built, model_name=TRIAL_MODEL, source=source)
    value = float(run_metrics(run).get(candidate.metric, math.nan))  # ΔE stop: kept epoch's
    tags = {
        **source_tags(source),
        TAG_MODEL_RUN: run_id,
        TAG_OBJECTIVE: candidate.metric,
        TAG_OBJECTIVE_MODE: candidate.mode,
        TAG_OBJECTIVE_VALUE: f"{value:.6g}",
    }
    version = _register(candidate.tracker, candidate.name, info, run_id, tags)
    client = candidate.tracker.client
    alias = ALIAS_CANDIDATE
    retry(lambda: client.set_registered_model_alias(candidate.name, alias, version), "alias")
    reason = f"best trial {trial} of study {candidate.study!r} by {candidate.metric}"
    return Registered(
        candidate.name, version, info.model_uri, run_id, alias, candidate.metric, value, reason
    )


# --- study train --register -----------------------------------------------------------------
#: Training-config params whose values must agree for two final runs' test scores to be
#: compared: the data, the threat model and the test evaluation.
COMPARABLE_PARAMS = ("dataset", "eps", "eval_steps", "eval_step_size", "test_subset")


def _not_comparable(
    champion_tags: Mapping[str, str], old_run: Any, metric: str, mode: str, new_run: Any
) -> list[str]:
    """Why the champion's score and a new final run's cannot be compared (empty: they
    can): another judged metric or mode on the champion's version, or another dataset,
    ε or test evaluation in the two runs' params."""
    why = []
    judged = champion_tags.get(TAG_OBJECTIVE)
    if judged and judged != metric:
        why.append(f"on {judged}, not {metric}")
    if (held := champion_tags.get(TAG_OBJECTIVE_MODE)) and held != mode:
        why.append(f"mode {held}, not {mode}")
    if old_run is not None:
        old, new = old_run.data.params, new_run.data.params
        why += [f"{k} {old.get(k)} vs {new.get(k)}" for k in COMPARABLE_PARAMS
                if old.get(k) != new.get(k)]  # fmt: skip
    return why


def register_final(
    tracker: MlflowTracker,
    run_id: str,
    name: str,
    *,
    source: Mapping[str, str] | None,
    echo: Callable[[str], Any] = print,
) -> Registered:
    """Log a final training's model to its run, register it, and give it the alias
    ``champion`` when it beats the current champion (the rule of the module's docstring).

    Args:
        tracker: the tracker of the final run's experiment.
        run_id: the final training's MLflow run (finished, with its weights logged).
        name: the registered model.
        source: the study, trial and run its config came from (``None``: none known).
        echo: where the outcome is told.
    """
    name = check_model_name(name)
    run = tracker.get_run(run_id)
    objective, mode = _objective(tracker.tracking_uri, (source or {}).get("study"))
    metric = judged_metric(objective, run.data.metrics)
    value = float(run.data.metrics.get(metric, math.nan))
    info = log_model(tracker, run_model(tracker, run), model_name=FINAL_MODEL, source=source)
    tags = {
        **source_tags(source),
        TAG_MODEL_RUN: run_id,
        TAG_OBJECTIVE: metric,
        TAG_OBJECTIVE_MODE: mode,
        TAG_OBJECTIVE_VALUE: f"{value:.6g}",
    }
    version = _register(tracker, name, info, run_id, tags)
    client = tracker.client
    aliases = retry(lambda: client.get_registered_model(name), "get registered model").aliases
    champion = None
    if ALIAS_CHAMPION in aliases:
        held = str(aliases[ALIAS_CHAMPION])
        champion = retry(lambda: client.get_model_version(name, held), "get model version")
    if champion is None:
        wins, reason = math.isfinite(value), f"no earlier {ALIAS_CHAMPION}"
        if not wins:
            reason = f"the run has no {metric}; no {ALIAS_CHAMPION} is set"
    else:
        old_run = tracker.get_run(champion.run_id) if champion.run_id else None
        old = float(old_run.data.metrics.get(metric, math.nan)) if old_run else math.nan
        differ = _not_comparable(champion.tags, old_run, metric, mode, run)
        wins = beats(value, old, mode) and not differ
        if differ:
            reason = (
                f"{ALIAS_CHAMPION} version {champion.version} was judged otherwise "
                f"({'; '.join(differ)}): the two are not compared"
            )
        elif not math.isfinite(old):
            reason = f"{ALIAS_CHAMPION} version {champion.version} has no {metric} to compare"
        elif not math.isfinite(value):
            reason = f"the run has no {metric}"
        else:
            verb = "beats" if wins else "does not beat"
            reason = (
                f"{metric} {value:.4f} {verb} {ALIAS_CHAMPION} version {champion.version}'s "
                f"{old:.4f} ({mode})"
            )
    alias = ALIAS_CHAMPION if wins else None
    if wins:
        retry(lambda: client.set_registered_model_alias(name, ALIAS_CHAMPION, version), "alias")
    told = f"registered {name} version {version} ({info.model_uri})"
    echo(told + (f" as {ALIAS_CHAMPION}: {reason}" if wins else f"; {reason}: alias unchanged"))
    return Registered(name, version, info.model_uri, run_id, alias, metric, value, reason)


def record_final(
    tracking_uri: str,
    study: str,
    parent_run_id: str,
    trial_id: str,
    *,
    source: Mapping[str, str] | None,
    register: str | None,
    echo: Callable[[str], Any] = print,
) -> Registered | None:
    """The lineage of a final training run through Ray Train (``study train --workers N``
    or ``--gpus G``, a study of one): its parent and trial run tagged with ``source``
    (after the training), and with ``register`` its model registered as
    :func:`register_final` does.

    Args:
        tracking_uri: the MLflow store.
        study: the study of one (its experiment).
        parent_run_id: its parent run.
        trial_id: the Tune trial id of its one trial.
        source: the study, trial and run the config came from (``None``: none known).
        register: the registered model, or ``None``.
        echo: where the outcome is told.
    """
    tracker = MlflowTracker(tracking_uri, study)
    key = {TAG_STUDY: study, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: trial_id}
    runs = tracker.find_runs(**key)
    if not runs:
        raise UserError(f"no MLflow run of trial {trial_id} in study {study!r} to register")
    run_id = runs[0].info.run_id
    if source:
        for tagged in (parent_run_id, run_id):
            tracker.set_tags(tagged, source_tags(source))
    if register is None:
        return None
    return register_final(tracker, run_id, register, source=source, echo=echo)
