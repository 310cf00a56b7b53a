"""``study replicate NAME --top K --seeds S``: the best configurations, new seeds.

A search ranks trials that each trained once, with one seed: the best of them is
partly the best configuration and partly a lucky seed (the winner's curse). This
command takes the study's ``K`` best finished trials (the order of ``study export``:
:func:`study.export.best_runs`), and trains each one's configuration ``S`` more times
with new training seeds (initialisation, data order, augmentation, attacks; the
validation split stays), as a Ray Tune run on the study's cluster with the study's
trainable, resources and storage. No searcher and no early stopping: every replicate
runs the full budget.

In MLflow each replicate is a run of the study's experiment nested under the trial
it re-trains (:data:`~reports.vocabulary.PARENT_TAG`), with role
:data:`~reports.vocabulary.ROLE_REPLICATE` and tags naming its source trial
(:data:`~reports.vocabulary.TAG_REPLICATE_OF`) and seed
(:data:`~reports.vocabulary.TAG_REPLICATE_SEED`). Replicates are not trials: ``study
export``, ``study show``, warm starts and the Optuna search never count them. The
report's leaderboard (:func:`reports.analysis.leaderboard`) scores a replicated
configuration by its replicates alone (n = S), whose seeds were not selected for
their score, and ranks groups by that mean.

Seeds: the source trial's seed + 1, + 2, …, + S, or ``--first-seed F``: F … F + S - 1
(a seed equal to the source trial's own is refused: that run exists). Running the
command again skips every (source trial, seed) that already has a finished replicate,
so an interrupted replication is completed by repeating it, and ``--seeds`` can grow.
"""

from __future__ import annotations

import json
import math
import pickle
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray.tune.search import Searcher

from reports.vocabulary import (
    CONFIG_FILE,
    PARENT_TAG,
    ROLE_REPLICATE,
    ROLE_STUDY,
    TAG_REPLICATE_OF,
    TAG_REPLICATE_SEED,
    TAG_REPLICATES,
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_STUDY,
    TAG_TRIAL,
)
from study.callbacks import MlflowCallback
from study.spec import StudySpec
from study.tracking import MlflowTracker
from trainables.errors import ConfigError, UserError

#: The folder (under the study's storage folder) of each replication's Tune run.
REPLICATE_DIR = "replicate"


@dataclass(frozen=True)
class Replica:
    """One training of a source trial's configuration with another seed.

    Attributes:
        source_trial: the Tune trial id of the trial it re-trains.
        source_run: that trial's MLflow run id (the replicate's parent run).
        seed: its training seed (``TrainConfig.seed``).
        config: its Tune config: the source trial's (searched values and the space's
            constants, dotted keys) with ``seed`` set.
    """

    source_trial: str
    source_run: str
    seed: int
    config: dict[str, Any]

    @property
    def key(self) -> str:
        """The config as canonical JSON: how a Tune trial is matched to its replica."""
        return config_key(self.config)


def config_key(config: Mapping[str, Any]) -> str:
    """A Tune config as canonical JSON (sorted keys)."""
    return json.dumps(dict(config), sort_keys=True, default=str)


def lookup(nested: Mapping[str, Any], dotted: str) -> Any:
    """The value at ``dotted`` (``weighting.beta``) in a nested dict; KeyError if absent."""
    value: Any = nested
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def source_config(tracker: MlflowTracker, run: Any, tmp: Path) -> tuple[dict[str, Any], int]:
    """A trial run's Tune config (typed values from its ``config.yaml`` artifact, for the
    keys its :data:`TAG_SEARCHED` tag lists) and its training seed.

    Raises:
        UserError: the run lacks its ``config.yaml`` or a key of its Tune config.
    """
    from reports.data import read_text_artifact

    run_id, trial = run.info.run_id, run.data.tags.get(TAG_TRIAL, run.info.run_id)
    text = read_text_artifact(tracker.client, run_id, CONFIG_FILE, tmp / run_id)
    full = yaml.safe_load(text) if text else None
    if not isinstance(full, dict):
        raise UserError(f"trial {trial} (run {run_id}) has no {CONFIG_FILE} artifact to re-train")
    keys = [k for k in run.data.tags.get(TAG_SEARCHED, "").split(",") if k and k != "seed"]
    try:
        config = {k: lookup(full, k) for k in keys}
    except KeyError as missing:
        raise UserError(f"trial {trial}'s {CONFIG_FILE} lacks {missing.args[0]!r}") from None
    return config, int(full.get("seed", 0))


def seeds_for(source_seed: int, seeds: int, first_seed: int | None) -> list[int]:
    """The replicate seeds of one source trial (see the module docstring).

    Args:
        source_seed: the source trial's training seed.
        seeds: how many (S >= 1).
        first_seed: the first seed, or None for ``source_seed + 1``.
    """
    start = source_seed + 1 if first_seed is None else first_seed
    chosen = list(range(start, start + seeds))
    if source_seed in chosen:
        raise ConfigError(
            f"--first-seed {first_seed} with --seeds {seeds} includes seed {source_seed}, the "
            "source trial's own: that training exists; pick seeds beyond it"
        )
    return chosen


def plan(
    tracker: MlflowTracker,
    spec: StudySpec,
    top: int,
    seeds: int,
    first_seed: int | None = None,
    *,
    echo: Callable[[str], None] = print,
) -> tuple[list[Replica], list[Replica]]:
    """The replicas of the study's ``top`` best trials: ``(to_run, already_done)``.

    Sources are ranked as ``study export`` ranks (:func:`study.export.best_runs` on the
    study's first objective); a source whose configuration equals a better one's is
    skipped (its replicates would be the same trainings). A replica is done when a
    finished replicate run of that source trial and seed exists.

    Raises:
        ConfigError: ``top`` or ``seeds`` below 1, or a seed clash (:func:`seeds_for`).
        UserError: the study has no finished, fully trained trial.
    """
    from study.export import best_runs, study_objectives

    if top < 1 or seeds < 1:
        raise ConfigError(f"--top {top} --seeds {seeds}: both must be at least 1")
    objectives, modes = study_objectives(tracker, spec.name)
    sources = best_runs(
        tracker, spec.name, objectives[0], modes[0], top, objectives=objectives, modes=modes
    )
    if not sources:
        raise UserError(
            f"study {spec.name!r} has no finished, fully trained trial to replicate "
            f"(see `study show {spec.name}`)"
        )
    if len(sources) < top:
        echo(f"only {len(sources)} trial(s) trained to the end: replicating those")
    done = {
        (r.data.tags.get(TAG_REPLICATE_OF), r.data.tags.get(TAG_REPLICATE_SEED))
        for r in tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: ROLE_REPLICATE})
        if r.info.status == "FINISHED" and "test/clean_acc" in r.data.metrics
    }
    todo: list[Replica] = []
    finished: list[Replica] = []
    seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in sources:
            trial = run.data.tags.get(TAG_TRIAL, run.info.run_id)
            config, source_seed = source_config(tracker, run, Path(tmp))
            if (same := seen.get(config_key(config))) is not None:
                echo(f"trial {trial} has the configuration of trial {same}: not replicated twice")
                continue
            seen[config_key(config)] = trial
            for seed in seeds_for(source_seed, seeds, first_seed):
                replica = Replica(trial, run.info.run_id, seed, {**config, "seed": seed})
                (finished if (trial, str(seed)) in done else todo).append(replica)
    return todo, finished


def replicate_tuner(spec: StudySpec, parent_run_id: str, replicas: Sequence[Replica]) -> Any:
    """A Tuner that trains exactly ``replicas`` (in order) with the study's trainable and
    resources, no searcher and no scheduler; its state goes to
    ``<study folder>/replicate/<time>``."""
    from ray import tune

    from study.callbacks import ProgressCallback
    from study.trial import run_trial, trial_resources

    trainable = tune.with_parameters(run_trial, spec=spec, template=spec.template)
    points = [dict(r.config) for r in replicas]
    return tune.Tuner(
        tune.with_resources(trainable, trial_resources(spec)),
        tune_config=tune.TuneConfig(
            search_alg=_Replays(points),
            num_samples=len(points),
            max_concurrent_trials=spec.max_concurrent or None,
        ),
        run_config=tune.RunConfig(
            name=time.strftime("%Y%m%d-%H%M%S"),
            storage_path=spec.location(REPLICATE_DIR),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[
                ReplicateCallback(spec, parent_run_id, replicas),
                ProgressCallback(spec.metrics, len(points)),
            ],
            verbose=0,
        ),
    )


class _Replays(Searcher):
    """A Tune searcher that suggests given configs, in order, then says it is finished.

    Args:
        configs: the Tune configs of the trials to run.
    """

    def __init__(self, configs: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.configs = [dict(c) for c in configs]
        self.given = 0

    def set_search_properties(self, metric: Any, mode: Any, config: Any, **spec: Any) -> bool:
        return True  # nothing to search: the configs are given

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.given >= len(self.configs):
            return Searcher.FINISHED
        self.given += 1
        return dict(self.configs[self.given - 1])

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        pass  # nothing learns from a replicate

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump({"configs": self.configs, "given": self.given}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


class ReplicateCallback(MlflowCallback):
    """The study's MLflow writer, whose new runs are replicates: nested under their
    source trial's run, role :data:`ROLE_REPLICATE`, source trial and seed tagged.

    Args:
        spec: the study.
        parent_run_id: the study's parent run.
        replicas: what the Tune run trains; a trial is matched to its replica by its config.
    """

    def __init__(self, spec: StudySpec, parent_run_id: str, replicas: Sequence[Replica]) -> None:
        super().__init__(spec, parent_run_id)
        self.replicas = {r.key: r for r in replicas}

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "replicas": list(self.replicas.values())}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.replicas = {r.key: r for r in state.get("replicas", [])}

    def run_tags(self, trial_id: str, config: dict[str, Any]) -> dict[str, str]:
        replica = self.replicas[config_key(config)]
        return {
            PARENT_TAG: replica.source_run,
            TAG_ROLE: ROLE_REPLICATE,
            TAG_REPLICATE_OF: replica.source_trial,
            TAG_REPLICATE_SEED: str(replica.seed),
        }


@dataclass
class ReplicateSummary:
    """A replicated source trial, scored over its finished replicates.

    Attributes:
        source_trial: the trial re-trained.
        source_value: its own value of the metric (the search's, seed-selected).
        values: the replicates' values of the metric, by seed.
    """

    source_trial: str
    source_value: float
    values: dict[int, float]

    @property
    def mean_std(self) -> tuple[float, float]:
        """Mean and sample standard deviation of the replicates (std NaN for one)."""
        vs = list(self.values.values())
        if not vs:
            return math.nan, math.nan
        return statistics.fmean(vs), statistics.stdev(vs) if len(vs) > 1 else math.nan


def summarise(tracker: MlflowTracker, study: str, metric: str) -> list[ReplicateSummary]:
    """Every replicated trial of ``study`` with its finished replicates' values of
    ``metric``, in the order of the trials' ids."""
    by_source: dict[str, dict[int, float]] = {}
    for run in tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: ROLE_REPLICATE}):
        source, seed = run.data.tags.get(TAG_REPLICATE_OF), run.data.tags.get(TAG_REPLICATE_SEED)
        value = run.data.metrics.get(metric)
        if run.info.status != "FINISHED" or source is None or seed is None or value is None:
            continue
        by_source.setdefault(source, {}).setdefault(int(seed), value)  # newest first
    sources = {
        r.data.tags.get(TAG_TRIAL): r.data.metrics.get(metric, math.nan)
        for r in tracker.find_runs(**{TAG_STUDY: study})
        if r.data.tags.get(TAG_TRIAL) in by_source and r.data.tags.get(TAG_ROLE) != ROLE_REPLICATE
    }
    return [
        ReplicateSummary(s, sources.get(s, math.nan), dict(sorted(by_source[s].items())))
        for s in sorted(by_source)
    ]


def replicate_study(
    spec: StudySpec,
    top: int,
    seeds: int,
    first_seed: int | None = None,
    *,
    verbose: bool = False,
    working_dir: str | None = None,
    echo: Callable[[str], None] = print,
) -> list[ReplicateSummary]:
    """Train the study's ``top`` best configurations with ``seeds`` new seeds each (see
    the module docstring) and return every replicated trial's summary on the study's
    first objective.

    Args:
        spec: the study (its saved spec; ``--address``/``--tracking-uri`` given now win).
        top: how many of the best trials to replicate (K).
        seeds: replicates per trial (S).
        first_seed: the first replicate seed (None: each source's seed + 1).
        verbose: Ray's and Tune's own console output.
        working_dir: a folder shipped to every Ray node.
        echo: where progress lines go.

    Raises:
        ConfigError, UserError: bad arguments or nothing to replicate; raised before Ray
            starts or anything is written.
    """
    from study import preflight
    from study.runner import init_ray

    preflight.check_tracking(spec.tracking_uri, spec.connect_timeout)
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    parents = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: ROLE_STUDY})
    if not parents:
        raise UserError(f"study {spec.name!r} has no parent run in {spec.tracking_uri}")
    parent = min(parents, key=lambda r: r.info.start_time or 0).info.run_id
    todo, done = plan(tracker, spec, top, seeds, first_seed, echo=echo)
    sources = sorted({r.source_trial for r in [*todo, *done]})
    echo(
        f"replicating {len(sources)} trial(s) of study {spec.name} with {seeds} seed(s) each: "
        f"{len(todo)} training(s) to run, {len(done)} already done"
    )
    if todo:
        preflight.check_storage(
            spec.storage if spec.remote else spec.location(), spec.connect_timeout
        )
        preflight.check_ray_address(spec.address, spec.connect_timeout)
        init_ray(spec.address, verbose, working_dir)
        preflight.check_resources(spec)
        grid = replicate_tuner(spec, parent, todo).fit()
        failed = [r for r in grid if r.error is not None]
        if failed:
            echo(f"warning: {len(failed)} replicate training(s) failed; run the command again")
    metric = spec.metrics[0]
    summaries = summarise(tracker, spec.name, metric)
    total = sum(len(s.values) for s in summaries)
    tracker.set_tags(parent, {TAG_REPLICATES: str(total)})
    return summaries


def print_summaries(summaries: Sequence[ReplicateSummary], metric: str, mode: str) -> None:
    """The replicated trials ranked by the replicates' mean of ``metric`` (``mode``),
    with n and the source trial's own value beside it."""
    sign = -1.0 if mode == "max" else 1.0

    def order(s: ReplicateSummary) -> tuple[float, str]:
        mean = s.mean_std[0]
        return (sign * mean if math.isfinite(mean) else math.inf, s.source_trial)

    print(f"{'trial':<24} {'n':>3}  {metric + ' mean ± std':<26} search's own")
    for s in sorted(summaries, key=order):
        mean, std = s.mean_std
        spread = f"± {std:.4f}" if math.isfinite(std) else "± -"
        print(
            f"{s.source_trial:<24} {len(s.values):>3}  {mean:.4f} {spread:<17} {s.source_value:.4f}"
        )
    sys.stdout.flush()
