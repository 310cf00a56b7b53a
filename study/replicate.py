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

from reports.ranking import run_metrics
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
from study.spec import GEN_PREFIX, StudySpec
from study.tracking import MlflowTracker, flatten
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


def source_config(
    tracker: MlflowTracker, run: Any, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial run's Tune config (typed values from its ``config.yaml`` artifact, for the
    keys its :data:`TAG_SEARCHED` tag lists) and its whole training config.

    Raises:
        UserError: the run lacks its ``config.yaml``, its searched keys, or a key of its
            Tune config.
    """
    from reports.data import read_text_artifact

    run_id, trial = run.info.run_id, run.data.tags.get(TAG_TRIAL, run.info.run_id)
    text = read_text_artifact(tracker.client, run_id, CONFIG_FILE, tmp / run_id)
    full = yaml.safe_load(text) if text else None
    if not isinstance(full, dict):
        raise UserError(f"trial {trial} (run {run_id}) has no {CONFIG_FILE} artifact to re-train")
    keys = [k for k in run.data.tags.get(TAG_SEARCHED, "").split(",") if k and k != "seed"]
    if not keys:
        raise UserError(f"trial {trial} (run {run_id}) has no {TAG_SEARCHED} tag to re-train")
    try:  # a sampler value (a study over training and generation) is a param of the run
        config = {
            k: _typed(run.data.params[k]) if k.startswith(GEN_PREFIX) else lookup(full, k)
            for k in keys
        }
    except KeyError as missing:
        raise UserError(f"trial {trial}'s {CONFIG_FILE} lacks {missing.args[0]!r}") from None
    return config, full


def _typed(text: str) -> Any:
    """A logged param's value: YAML's reading, and a number YAML leaves a string
    (``1e-05``) as a float."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_drift(
    spec: StudySpec,
    config: Mapping[str, Any],
    full: Mapping[str, Any],
    params: Mapping[str, str] | None = None,
) -> list[str]:
    """The training-config keys (dotted) whose value the study would give ``config`` now
    and the source trial's ``config.yaml`` differ on, ``seed`` and the data paths apart
    (a study may be replicated from another folder): a changed space, base config or
    preset; empty when a replicate trains what its trial trained.

    Raises:
        ConfigError: the study cannot build the config now (its space file moved).
    """
    from trainables.config import PATH_FIELDS

    now = flatten(spec.trial_config(config).to_dict())
    then = flatten(dict(full))
    skip = {"seed", *PATH_FIELDS}
    drift = {k for k in set(now) | set(then) if k not in skip and now.get(k) != then.get(k)}
    sampler = spec.template.sampler(config)
    if sampler is not None and params is not None:  # the sampler's, as the run logged them
        now = flatten({"generation": sampler})
        then = {k: v for k, v in params.items() if k.startswith(GEN_PREFIX)}
        moved = {f"{GEN_PREFIX}extractor_plugin", f"{GEN_PREFIX}inception_weights"}  # paths
        drift |= {k for k in (set(now) | set(then)) - moved if now.get(k) != then.get(k)}
    return sorted(drift)


def check_counts(top: int, seeds: int, first_seed: int | None) -> None:
    """Refuse ``--top``/``--seeds`` below 1 and a negative ``--first-seed``."""
    if top < 1 or seeds < 1:
        raise ConfigError(f"--top {top} --seeds {seeds}: both must be at least 1")
    if first_seed is not None and first_seed < 0:
        raise ConfigError(f"--first-seed {first_seed}: a training seed is >= 0")


def finished_replicas(tracker: MlflowTracker, study: str) -> set[tuple[str, str]]:
    """``(source trial, seed)`` of every finished replicate run of ``study`` (one that
    reached its test evaluation)."""
    return {
        (r.data.tags.get(TAG_REPLICATE_OF, ""), r.data.tags.get(TAG_REPLICATE_SEED, ""))
        for r in tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: ROLE_REPLICATE})
        if r.info.status == "FINISHED" and "test/clean_acc" in r.data.metrics
    }


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

    check_counts(top, seeds, first_seed)
    objectives, modes = study_objectives(tracker, spec.name)
    sources = best_runs(
        tracker, spec.name, objectives[0], modes[0], top, objectives=objectives, modes=modes
    )
    if len(sources) < top:  # (best_runs refuses a study with none)
        echo(
            f"only {len(sources)} trial(s) trained to the end with the objective (and meet "
            "the constraints): replicating those"
        )
    done = finished_replicas(tracker, spec.name)
    todo: list[Replica] = []
    finished: list[Replica] = []
    seen: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for run in sources:
            trial = run.data.tags.get(TAG_TRIAL, run.info.run_id)
            config, full = source_config(tracker, run, Path(tmp))
            if drift := config_drift(spec, config, full, run.data.params):
                raise UserError(
                    f"study {spec.name!r} would not train trial {trial}'s configuration again: "
                    f"{', '.join(drift[:6])} differ from the trial's {CONFIG_FILE} (the space, "
                    "base config or preset changed since it ran); put them back to replicate"
                )
            source_seed = int(full.get("seed", 0))
            if (same := seen.get(config_key(config))) is not None:
                echo(f"trial {trial} has the configuration of trial {same}: not replicated twice")
                continue
            seen[config_key(config)] = trial
            for seed in seeds_for(source_seed, seeds, first_seed):
                replica = Replica(trial, run.info.run_id, seed, {**config, "seed": seed})
                (finished if (trial, str(seed)) in done else todo).append(replica)
    return todo, finished


def replicate_tuner(
    spec: StudySpec, parent_run_id: str, replicas: Sequence[Replica], verbose: bool = False
) -> Any:
    """A Tuner that trains exactly ``replicas`` (in order) with the study's trainable and
    resources, no searcher and no scheduler; its state goes to
    ``<study folder>/replicate/<time>``; ``verbose``: Tune's own console output."""
    from ray import tune

    from study.callbacks import PlacementGroupSweeper, ProgressCallback
    from study.trial import run_trial, trial_resources, uses_train_backend

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
                *([PlacementGroupSweeper()] if uses_train_backend(spec) else []),
            ],
            verbose=2 if verbose else 0,
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

    def __init__(
        self, spec: StudySpec, parent_run_id: str, replicas: Sequence[Replica] = ()
    ) -> None:
        super().__init__(spec, parent_run_id)
        self.replicas = {r.key: r for r in replicas}

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "replicas": list(self.replicas.values())}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # runs __init__ without the replicas
        self.replicas = {r.key: r for r in state.get("replicas", [])}

    def _replica(self, config: dict[str, Any]) -> Replica:
        try:
            return self.replicas[config_key(config)]
        except KeyError:
            raise RuntimeError(
                f"Tune ran a config that is none of the replicas asked for: {config}"
            ) from None

    def run_name(self, method: str, config: dict[str, Any]) -> str:
        """The source trial's run name with the replicate's seed."""
        return f"{super().run_name(method, config)} seed={self._replica(config).seed}"

    def run_tags(self, trial_id: str, config: dict[str, Any]) -> dict[str, str]:
        replica = self._replica(config)
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
        value = run_metrics(run).get(metric)
        if run.info.status != "FINISHED" or source is None or seed is None or value is None:
            continue
        by_source.setdefault(source, {}).setdefault(int(seed), value)  # newest first
    sources = {
        r.data.tags.get(TAG_TRIAL): run_metrics(r).get(metric, math.nan)
        for r in tracker.find_runs(**{TAG_STUDY: study})
        if r.data.tags.get(TAG_TRIAL) in by_source and r.data.tags.get(TAG_ROLE) != ROLE_REPLICATE
    }
    return [
        ReplicateSummary(s, sources.get(s, math.nan), dict(sorted(by_source[s].items())))
        for s in sorted(by_source)
    ]


@dataclass
class Replication:
    """What one ``study replicate`` did.

    Attributes:
        summaries: every replicated trial of the study, scored over its finished
            replicates (:func:`summarise`).
        asked: the (trial, seed) trainings this command was asked for.
        missing: those of them without a finished replicate when it ended (failed or
            interrupted trainings; the command run again trains them).
        signum: the signal (SIGINT, SIGTERM) that stopped it, else None.
    """

    summaries: list[ReplicateSummary]
    asked: list[Replica]
    missing: list[Replica]
    signum: int | None = None


def replicate_study(
    spec: StudySpec,
    top: int,
    seeds: int,
    first_seed: int | None = None,
    *,
    verbose: bool = False,
    working_dir: str | None = None,
    again: str | None = None,
    echo: Callable[[str], None] = print,
) -> Replication:
    """Train the study's ``top`` best configurations with ``seeds`` new seeds each (see
    the module docstring); every replicated trial is then summarised on the study's
    first objective.

    A Ctrl-C or SIGTERM stops the trainings as it stops a study (Tune ends them and
    the MLflow writer drains its queue); their replicate runs end KILLED, and the
    same command trains them again from their first epoch.

    Args:
        spec: the study (its saved spec; ``--address``/``--tracking-uri`` given now win).
        top: how many of the best trials to replicate (K).
        seeds: replicates per trial (S).
        first_seed: the first replicate seed (None: each source's seed + 1).
        verbose: Ray's and Tune's own console output.
        working_dir: a folder shipped to every Ray node.
        again: the command that continues after an interrupt (printed by a second one).
        echo: where progress lines go.

    Raises:
        ConfigError, UserError: bad arguments, a study the store lacks, a configuration
            the study would not train again, or nothing to replicate; raised before Ray
            starts or anything is written.
    """
    from study import preflight
    from study.credentials import redact
    from study.runner import _Interrupts, check_nodes, init_ray
    from study.tracking import recorded_study

    check_counts(top, seeds, first_seed)
    spec.validate()  # the space and base config as they are now
    preflight.check_tracking(spec.tracking_uri, spec.connect_timeout)
    found, known = recorded_study(spec.tracking_uri, spec.name)
    if not found:
        raise UserError(
            f"no study {spec.name!r} with trials in the MLflow store "
            f"{redact(spec.tracking_uri)} (--tracking-uri); studies there: "
            f"{', '.join(known) or 'none'}"
        )
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    parents = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: ROLE_STUDY})
    if not parents:
        raise UserError(f"study {spec.name!r} has no parent run in {redact(spec.tracking_uri)}")
    parent = min(parents, key=lambda r: r.info.start_time or 0).info.run_id
    todo, done = plan(tracker, spec, top, seeds, first_seed, echo=echo)
    sources = sorted({r.source_trial for r in [*todo, *done]})
    echo(
        f"replicating {len(sources)} trial(s) of study {spec.name} with {seeds} seed(s) each: "
        f"{len(todo)} training(s) to run, {len(done)} already done"
    )
    signum = None
    if todo:
        preflight.check_storage(
            spec.storage if spec.remote else spec.location(), spec.connect_timeout
        )
        preflight.check_ray_address(spec.address, spec.connect_timeout)
        init_ray(spec.address, verbose, working_dir)
        preflight.check_resources(spec)
        check_nodes(spec)
        with _Interrupts(spec, again) as sigint:
            grid = replicate_tuner(spec, parent, todo, verbose).fit()
            if sigint.caught():
                signum = sigint.signum
        _sweep_placement_groups(spec)
        if signum is not None:
            _end_unfinished(tracker, spec.name)
        elif failed := [r for r in grid if r.error is not None]:
            echo(f"warning: {len(failed)} replicate training(s) failed; run the command again")
    finished = finished_replicas(tracker, spec.name)
    missing = [r for r in todo if (r.source_trial, str(r.seed)) not in finished]
    summaries = summarise(tracker, spec.name, spec.metrics[0])
    tracker.set_tags(parent, {TAG_REPLICATES: str(sum(len(s.values) for s in summaries))})
    return Replication(summaries, [*done, *todo], missing, signum)


def _sweep_placement_groups(spec: StudySpec) -> None:
    """The placement groups that trials Tune stopped inside ``TorchTrainer.fit`` left
    (the ``train`` backend), as a study removes them when it ends."""
    from study.trial import uses_train_backend

    if uses_train_backend(spec):
        from study.callbacks import remove_orphaned_placement_groups

        remove_orphaned_placement_groups(all_of_this_job=True)


def _end_unfinished(tracker: MlflowTracker, study: str) -> None:
    """End the study's replicate runs still RUNNING as KILLED: Tune ends interrupted
    trials without telling the callbacks, and no later command reopens a replicate run
    (the same command trains the replica again, in a new run)."""
    for run in tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: ROLE_REPLICATE}):
        if run.info.status == "RUNNING":
            tracker.end_run(run.info.run_id, "KILLED")


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
