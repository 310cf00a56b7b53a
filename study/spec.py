"""The study spec: everything ``study run`` needs, validated before Ray starts.

A spec is saved as ``<storage>/<name>/study.yaml`` so that ``study resume``
and ``study export`` find the tracking URI, the space and the objective again.
The driver reads the space once per spec object and resolves the trials' common
config into one :class:`TrialTemplate`, which travels to every trial; no trial
opens the space file.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import yaml

from reports.constraints import Constraint, parse_constraints
from search_spaces import SearchSpace, load_space
from search_spaces.space import SpaceError, nest
from trainables.config import PATH_FIELDS, TrainConfig, load_config_file
from trainables.errors import ConfigError
from trainables.metrics import is_epoch_metric, is_metric, objective_names
from trainables.presets import PRESETS, load_preset

HERE = Path(__file__).resolve().parent
DEFAULT_BASE = HERE / "default.yaml"
DEFAULT_SPACE = "weat"
BACKENDS = ("auto", "train", "direct")
#: trial schedulers by name (``--scheduler``); :mod:`study.search` builds them
SCHEDULERS = ("asha", "hyperband", "median", "none")
SPEC_FILE = "study.yaml"


#: What a trial of a study over training and generation reports once it has sampled
#: (:func:`study.generate.sample_and_score`; ``gen/is``, ``gen/fid`` and ``gen/kid`` when
#: the sampler scores).
GEN_OBJECTIVES = ("gen/fid", "gen/is", "gen/kid", "gen/diversity")
#: The dotted head of a trial's searched sampler values (``generation.step_size``).
GEN_PREFIX = "generation."


def _trial_metric(metric: str, generation: bool = False) -> bool:
    """Whether every trial reports ``metric`` (not ``final/*``: the finalists' only;
    ``gen/*`` when the trials also sample: ``generation``)."""
    if generation and metric in GEN_OBJECTIVES:
        return True
    return is_metric(metric) and not metric.startswith("final/")


def _did_you_mean(metric: str) -> str:
    """`` (did you mean 'x'?)`` with the closest objective name, or nothing."""
    close = difflib.get_close_matches(metric, objective_names(), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class TrialTemplate:
    """The config every trial of a study shares, resolved once on the driver.

    Attributes:
        values: space preset < base config < space ``fixed`` values (nested mapping),
            with the :data:`PATH_FIELDS` absolute.
        overrides: what wins over the sampled values: ``autoattack: false`` and the
            study's ``epochs`` when it sets one.
        generation: the space's sampler settings when each trial also samples after
            training (a :class:`~trainables.gen_config.SamplerConfig` mapping), else None.
    """

    values: dict[str, Any]
    overrides: dict[str, Any]
    generation: dict[str, Any] | None = None

    def config(self, sampled: Mapping[str, Any]) -> TrainConfig:
        """One trial's validated config: the template < ``sampled`` < the overrides.

        Args:
            sampled: the trial's Tune config (dotted keys address nested values; the
                sampler's ``generation.*`` values are not the training's).
        """
        training = {k: v for k, v in sampled.items() if not k.startswith(GEN_PREFIX)}
        return TrainConfig.from_dict({**_merge(self.values, nest(training)), **self.overrides})

    def sampler(self, sampled: Mapping[str, Any]) -> dict[str, Any] | None:
        """The sampler settings of one trial (the space's ``generation:`` < its sampled
        ``generation.*`` values), or None when the trials only train.

        Args:
            sampled: the trial's Tune config.
        """
        if self.generation is None:
            return None
        chosen = {k[len(GEN_PREFIX) :]: v for k, v in sampled.items() if k.startswith(GEN_PREFIX)}
        return {**self.generation, **chosen}


@dataclass
class SearchSpec:
    """What every search over a space has (a study; a ``study generate`` study).

    Attributes:
        name: study name (MLflow experiment or run name, Tune run name); letters,
            digits, ``-_.``.
        space: search-space file or shipped space name (a file is kept by its
            absolute path).
        trials: number of trials Optuna proposes.
        metrics: objective metric name(s); several make the study multi-objective.
        modes: ``max``/``min`` per metric.
        max_concurrent: trials run at once (0 = as many as resources allow).
        max_failures: retries of a failed trial.
        seed: seed of the Optuna sampler.
        tracking_uri: MLflow tracking URI (a password in it moves to the environment,
            :mod:`study.credentials`).
        storage: where Ray's results, checkpoints and the study's files go: a folder
            (local, or a mount every node shares; made absolute) or a URI that
            ``pyarrow.fs`` opens (``s3://bucket/prefix``; see :mod:`study.storage`).
        address: Ray cluster address (None = start a local cluster).
        optuna_storage: Optuna RDB URL (e.g. ``sqlite:///optuna.db``) for optuna-dashboard
            (a password in it moves to the environment).
    """

    #: the config keys a space may set, and the preset names it may give
    config_keys: ClassVar[tuple[str, ...]]
    presets: ClassVar[Iterable[str]]

    name: str
    space: str | None = DEFAULT_SPACE
    trials: int = 12
    metrics: list[str] = field(default_factory=lambda: ["val/pgd_acc"])
    modes: list[str] = field(default_factory=lambda: ["max"])
    max_concurrent: int = 0
    max_failures: int = 0
    seed: int = 0
    tracking_uri: str = ""
    storage: str = ""
    address: str | None = None
    optuna_storage: str | None = None

    def __post_init__(self) -> None:
        """Make ``storage`` and a space file's path absolute (Tune moves trials' cwd); a
        storage URI stays a URI (:func:`study.storage.normalize`). Passwords in
        ``tracking_uri``, ``optuna_storage`` or ``storage`` move to the environment
        (:func:`study.credentials.take_credentials`), so that no file, param or line
        made from the spec carries them."""
        from study.credentials import check_one_password, take_credentials
        from study.storage import normalize

        check_one_password(self.tracking_uri, self.optuna_storage)
        self.tracking_uri = take_credentials(self.tracking_uri) or self.tracking_uri
        self.optuna_storage = take_credentials(self.optuna_storage)
        if self.storage:
            self.storage = normalize(take_credentials(self.storage) or self.storage)
        if self.space and Path(self.space).suffix in (".yaml", ".yml"):
            if Path(self.space).is_file():
                self.space = str(Path(self.space).resolve())

    @property
    def multi_objective(self) -> bool:
        """Whether the study has several objectives."""
        return len(self.metrics) > 1

    @property
    def remote(self) -> bool:
        """Whether the storage is a URI (``s3://…``) rather than a local or shared path."""
        from study.storage import is_uri

        return is_uri(self.storage)

    @property
    def local_root(self) -> Path:
        """A folder on this machine for the study's local files: the storage itself when
        it is a path; for a URI storage, a scratch folder named after the URI below the
        system's temporary folder (``$TMPDIR/energy-study/s3/bucket/prefix``)."""
        if not self.remote:
            return Path(self.storage)
        import tempfile

        scheme, _, rest = self.storage.partition("://")
        rest = re.sub(r"[^A-Za-z0-9_.\-/]", "_", rest.partition("?")[0]).strip("/")
        return Path(tempfile.gettempdir()) / "energy-study" / scheme / rest

    @property
    def folder(self) -> Path:
        """``<storage>/<name>`` as a local folder: Ray's experiment folder and the trials'
        outputs for a storage path; for a URI storage, a node-local scratch folder
        (:attr:`local_root`; what every node must see is at :meth:`location`)."""
        return self.local_root / self.name

    def location(self, *parts: str) -> str:
        """``<storage>/<name>/<parts…>`` as a string: an absolute local path, or a URI
        (``s3://bucket/prefix/<name>/…``) when the storage is one.

        Args:
            parts: path parts below the study's folder (``"train"``, ``"study.yaml"``).
        """
        from study.storage import join

        return join(self.storage, self.name, *parts)

    @cached_property
    def _space(self) -> SearchSpace:
        try:
            space = load_space(str(self.space))
            space.check_keys(self.config_keys)
            space.check_preset(self.presets)
        except SpaceError as exc:
            raise ConfigError(str(exc)) from None
        return space

    def load_space(self) -> SearchSpace:
        """The search space, validated against the config's keys and the presets; the
        file is read once per spec object, whose fields stay as they are from then on
        (a bad space is a ConfigError)."""
        return self._space

    def check(self) -> None:
        """Check the fields every search has (name, trials, objectives, concurrency)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(
                f"study name {self.name!r}: use letters, digits, '-', '_' or '.' (no spaces)"
            )
        if self.trials < 1:
            raise ConfigError(f"trials = {self.trials}; must be >= 1")
        if len(self.metrics) != len(self.modes):
            raise ConfigError(f"{len(self.metrics)} metric(s) but {len(self.modes)} mode(s)")
        for mode in self.modes:
            if mode not in ("max", "min"):
                raise ConfigError(f"mode = {mode!r}; allowed: max, min")
        if self.max_failures < 0 or self.max_concurrent < 0:
            raise ConfigError("max_failures >= 0, max_concurrent >= 0")


@dataclass
class StudySpec(SearchSpec):
    """One study: the fields of :class:`SearchSpec` and these.

    Attributes:
        base: base training config (mapping) every trial starts from.
        epochs: epochs per trial (overrides the base config when set).
        asha: early stopping of poor trials at all (False: none, whatever ``scheduler``
            says; the ``--asha/--no-asha`` of earlier versions).
        scheduler: the trial scheduler that stops poor trials early, one of
            :data:`SCHEDULERS`: ``asha`` (asynchronous successive halving),
            ``hyperband``, ``median`` (median stopping rule) or ``none``; single
            objective only (a multi-objective study runs every trial to the end).
        grace_period: epochs every trial runs before ASHA or the median rule may stop it.
        reduction_factor: ASHA and HyperBand keep the best 1/reduction_factor of trials
            at each rung.
        workers_per_trial: Ray Train workers per trial (DDP when > 1).
        cpus_per_worker: CPUs reserved per worker (torch threads follow it).
        gpus_per_trial: GPUs per trial, split over its workers (fractions allowed).
        backend: ``train`` (a TorchTrainer per trial), ``direct`` (the loop runs in
            the Tune trial; single CPU worker only) or ``auto`` (``direct`` for one
            CPU worker without GPU, ``train`` otherwise).
        finalists: trials evaluated in the study's second stage (top-K finished trials
            by the objective; a multi-objective study takes its Pareto set); 0 = none.
        final_n: test points of the second stage (PGD and AutoAttack on the same
            points; None = the whole test set).
        connect_timeout: seconds the tracking server and the Ray address have to answer
            before the study starts.
        start_from: a folder with another run's ``last.pt`` (and ``best.pt``) that the
            trials of the ``train`` backend continue when Ray has no checkpoint of
            theirs (``study train --workers N --resume CKPT``); None: start afresh.
        space_sha256: SHA-256 of the space file when the study started (set by
            :meth:`save`); ``study extend`` refuses a space that changed since.
        constraints: bounds on metrics a trial must meet to count as feasible, each
            ``METRIC OP BOUND`` with OP one of ``>= <= > <`` (``val/clean_acc>=0.80``;
            :mod:`reports.constraints`); a violating trial is never "best".
        warm_start: the name of another study, recorded in the same MLflow store, whose
            finished trials seed this study's Optuna search before its first trial
            (:mod:`study.warmstart`); None: a cold start.
        stop_on_energy_divergence: stop a trial when its training-probe ΔE
            (``train_probe/delta_energy``) falls steeply, keeping the best checkpoint
            before the fall (:mod:`study.stopper`).
        divergence_window: epochs before the current one over which the ΔE peak is taken.
        divergence_threshold: the least relative fall of ΔE from that peak that stops
            (a fraction of the peak's magnitude).
        divergence_min_epoch: the first epoch (from 1, at least 2) at which the ΔE
            stopper may stop a trial.
        divergence_min_drop: the least fall of ΔE from that peak that stops, in energy
            units (0: the relative fall alone decides).
    """

    config_keys: ClassVar[tuple[str, ...]] = tuple(TrainConfig.field_names())
    presets: ClassVar[Iterable[str]] = PRESETS

    base: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    asha: bool = True
    scheduler: str = "asha"
    grace_period: int = 3
    reduction_factor: int = 2
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_trial: float = 0.0
    backend: str = "auto"
    finalists: int = 3
    space_sha256: str = ""
    final_n: int | None = None
    connect_timeout: float = 15.0
    start_from: str | None = None
    constraints: list[str] = field(default_factory=list)
    warm_start: str | None = None
    stop_on_energy_divergence: bool = False
    divergence_window: int = 5
    divergence_threshold: float = 0.25
    divergence_min_epoch: int = 5
    divergence_min_drop: float = 0.1

    @property
    def constraint_list(self) -> list[Constraint]:
        """:attr:`constraints` parsed (a bad one is a ConfigError naming it)."""
        return parse_constraints(self.constraints)

    def meets_constraints(self, metrics: Mapping[str, Any]) -> bool:
        """Whether a trial whose last result is ``metrics`` meets every constraint."""
        return all(c.satisfied(metrics) for c in self.constraint_list)

    @cached_property
    def template(self) -> TrialTemplate:
        """The trials' common config (built once per spec object, from :meth:`load_space`).

        Trials of a study run no AutoAttack (``autoattack: false``): the search
        compares trials on cheap numbers, and the finalists get PGD-20 and AutoAttack
        on the same points once it ends (:mod:`study.finals`).
        """
        space = self.load_space()
        values = load_preset(space.preset) if space.preset else {}
        values = _merge(_merge(values, dict(self.base)), nest(dict(space.fixed)))
        for key in PATH_FIELDS:
            if values.get(key):
                values[key] = str(Path(values[key]).expanduser().resolve())
        epochs = {} if self.epochs is None else {"epochs": self.epochs}
        generation = None if space.generation is None else dict(space.generation)
        for key in ("extractor_plugin", "inception_weights"):  # trials run elsewhere
            path = (generation or {}).get(key)
            if path and (key == "inception_weights" or str(path).endswith(".py")):
                generation[key] = str(Path(path).expanduser().resolve())
        return TrialTemplate(values, {**epochs, "autoattack": False}, generation)

    def trial_config(self, sampled: Mapping[str, Any]) -> TrainConfig:
        """The validated training config of one trial: space preset < base < space
        fixed < ``sampled`` (a Tune config) < ``epochs``; see :attr:`template`."""
        return self.template.config(sampled)

    def validate(self) -> None:
        """Check every field, the space, and one sampled trial config, before Ray starts."""
        self.check()
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"epochs = {self.epochs}; must be >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend = {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        if self.backend == "direct" and (self.workers_per_trial > 1 or self.gpus_per_trial > 0):
            raise ConfigError("backend 'direct' runs one CPU worker; use 'train' for more")
        if self.workers_per_trial < 1:
            raise ConfigError(f"workers_per_trial = {self.workers_per_trial}; must be >= 1")
        if self.cpus_per_worker <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("cpus_per_worker must be > 0 and gpus_per_trial >= 0")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"scheduler = {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction_factor = {self.reduction_factor}; must be >= 2")
        if not self.connect_timeout > 0:
            raise ConfigError(f"connect_timeout = {self.connect_timeout}; must be > 0 seconds")
        if self.finalists < 0:
            raise ConfigError(f"finalists = {self.finalists}; must be >= 0 (0: no final stage)")
        if self.final_n is not None and self.final_n < 1:
            raise ConfigError(f"final_n = {self.final_n}; must be >= 1 (or unset: all)")
        if self.grace_period < 1:
            raise ConfigError(f"grace_period = {self.grace_period}; must be >= 1")
        self._check_constraints()
        self._check_energy_stop()
        name = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
        if self.warm_start is not None and (
            self.warm_start == self.name or not re.fullmatch(name, self.warm_start)
        ):
            raise ConfigError(
                f"warm_start = {self.warm_start!r}: name another study (letters, digits, "
                f"'-', '_' or '.'), not this one ({self.name!r})"
            )
        space = self.load_space()
        generation = space.generation is not None
        for metric in self.metrics:
            if not _trial_metric(metric, generation):
                raise ConfigError(
                    f"metric {metric!r} is not one the trials report{_did_you_mean(metric)}; "
                    "objectives: "
                    f"{', '.join(objective_names())}"
                )
            if self.early_stopping() != "none" and not is_epoch_metric(metric):
                raise ConfigError(
                    f"metric {metric!r} is reported once, after a trial's last epoch; the "
                    f"{self.early_stopping()} scheduler stops trials on a metric reported "
                    "every epoch (val/..., train/...): choose one, or turn early stopping "
                    "off with --scheduler none"
                )
        # every categorical choice and both ends of every range must build a valid
        # config (bad base or fixed values, or a choice the config refuses, fail here)
        self.trial_config(space.sample_defaults())
        if generation:
            self._check_generation(space)
        for param, value, sampled in space.sample_each_value():
            try:
                self.trial_config(sampled)
                self._sampler_config(sampled)
            except ConfigError as exc:
                raise ConfigError(
                    f"{space.source}:{param.line}: {param.name} = {value!r} does not give a "
                    f"valid training config: {exc}"
                ) from None

    def _sampler_config(self, sampled: Mapping[str, Any]) -> Any:
        """One trial's validated sampler config (None when the trials only train)."""
        settings = self.template.sampler(sampled)
        if settings is None:
            return None
        from trainables.gen_config import SamplerConfig

        return SamplerConfig.from_dict(settings)

    def _check_generation(self, space: SearchSpace) -> None:
        """A study over training and generation: valid sampler settings, and trials that
        run in the Tune function (the ``direct`` backend: one CPU worker, no GPU), where
        the sampling follows the training."""
        try:
            cfg = self._sampler_config(space.sample_defaults())
        except ConfigError as exc:
            raise ConfigError(f"{space.source}: generation: {exc}") from None
        scores = [m for m in (*self.metrics, *(c.metric for c in self.constraint_list))
                  if m in GEN_OBJECTIVES and m != "gen/diversity"]  # fmt: skip
        if scores and not cfg.score:
            raise ConfigError(
                f"{', '.join(scores)}: {space.source} samples without scores "
                "(generation: score: false); score, or choose other objectives"
            )
        # the extractor's files, before any trial trains (trials only find them then)
        from study.generate import load_plugin
        from trainables.scores import INCEPTION, inception_weights

        load_plugin(cfg.extractor_plugin)
        if cfg.score and cfg.feature_extractor == INCEPTION:
            inception_weights(cfg.inception_weights)
        if self.backend == "train" or self.workers_per_trial > 1 or self.gpus_per_trial > 0:
            raise ConfigError(
                f"{space.source} samples after training (generation:): its trials run on "
                "the direct backend (one CPU worker, no GPU); drop --backend train, "
                "--workers-per-trial and --gpus-per-trial"
            )

    def _check_energy_stop(self) -> None:
        """The ΔE stopper's parameters (:class:`study.stopper.DivergenceRule`), and a ΔE
        probe in the trials' config to watch (``probe_n > 0``)."""
        from study.stopper import DivergenceRule

        if not self.stop_on_energy_divergence:
            return
        if late := [m for m in self.metrics if not is_epoch_metric(m)]:
            raise ConfigError(
                f"metric {late[0]!r} is reported once, after a trial's last epoch; a trial "
                "the ΔE stopper ends never reports it (Optuna would learn nothing from "
                "it): choose objectives reported every epoch (val/..., train/...) or drop "
                "--stop-on-energy-divergence"
            )
        rule = DivergenceRule(
            self.divergence_window,
            self.divergence_threshold,
            self.divergence_min_epoch,
            self.divergence_min_drop,
        )
        rule.check()
        if self.trial_config(self.load_space().sample_defaults()).probe_n < 1:
            raise ConfigError(
                "--stop-on-energy-divergence watches train_probe/delta_energy, which the "
                "trials do not report with probe_n = 0; set probe_n >= 1"
            )

    def _check_constraints(self) -> None:
        """Each constraint parses and bounds a metric the trials report (not ``final/*``,
        which only the finalists get)."""
        generation = self.load_space().generation is not None
        for constraint in self.constraint_list:
            metric = constraint.metric
            if not _trial_metric(metric, generation):
                raise ConfigError(
                    f"constraint {constraint.text!r}: {metric!r} is not a metric the trials "
                    f"report{_did_you_mean(metric)}"
                )

    @property
    def default_epochs(self) -> int:
        """Epochs of a trial with the space's default values (ASHA's ``max_t``)."""
        return self.trial_config(self.load_space().sample_defaults()).epochs

    def early_stopping(self) -> str:
        """The scheduler that stops trials early (one of :data:`SCHEDULERS`): ``none``
        unless asked for (``asha`` and ``scheduler``), with (ASHA, median) more epochs
        than the grace period. Several objectives: ``asha`` only (non-dominated sorting,
        :class:`study.search.MultiObjectiveASHA`), when every objective is reported each
        epoch; else ``none``."""
        if not self.asha:
            return "none"
        if self.multi_objective and (
            self.scheduler != "asha" or not all(is_epoch_metric(m) for m in self.metrics)
        ):
            return "none"
        if self.scheduler != "hyperband" and self.default_epochs <= self.grace_period:
            return "none"  # HyperBand has no grace period; its brackets start at epoch 1
        return self.scheduler

    def uses_asha(self) -> bool:
        """Whether ASHA stops trials (:meth:`early_stopping` is ``asha``)."""
        return self.early_stopping() == "asha"

    def ran_full_budget(self, config: Mapping[str, Any], metrics: Mapping[str, Any]) -> bool:
        """Whether a trial ran to its end (rather than being stopped early): its last
        result (``metrics``) reached the trial's epochs and holds the test metrics.

        Args:
            config: the trial's Tune config (what was sampled).
            metrics: the trial's last result.
        """
        epochs = self.trial_config(config).epochs
        return metrics.get("epoch", 0) >= epochs and "test/clean_acc" in metrics

    def kept_result(self, config: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> Any:
        """The result of a trial the ΔE stopper stopped (:func:`study.stopper.kept_result`:
        its kept epoch and that epoch's metrics), or None: the stopper is off, or it did
        not stop this trial.

        Args:
            config: the trial's Tune config.
            rows: its per-epoch results (each with ``epoch``).
        """
        from study.stopper import kept_result, rule_of

        rule = rule_of(self)
        if rule is None:
            return None
        cfg = self.trial_config(config)
        return kept_result(rule, rows, cfg.select_from, cfg.epochs)

    def check_new(self) -> None:
        """Refuse a name that a study in the storage already has (its ``study.yaml``):
        ``study run`` starts new studies only (``--resume`` continues one)."""
        from study.storage import exists

        if exists(self.location(SPEC_FILE)):
            raise ConfigError(
                f"a study named {self.name!r} already exists under {self.storage}; "
                f"continue it with `study resume {self.name}` (or `study run --name "
                f"{self.name} --resume`, which starts it when it does not exist), add "
                f"trials to it with `study extend {self.name} --trials N`, or choose "
                "another --name"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``study.yaml`` and MLflow params); no URI in it carries a
        password (:meth:`__post_init__` moved them to the environment)."""
        return dataclasses.asdict(self)

    def space_digest(self) -> str:
        """SHA-256 of the search space's file as it is now (of its name when it has no
        file): what :attr:`space_sha256` keeps from the study's start."""
        import hashlib

        source = Path(self.load_space().source)
        data = source.read_bytes() if source.is_file() else str(self.space).encode()
        return hashlib.sha256(data).hexdigest()

    def save(self) -> str:
        """Write ``<storage>/<name>/study.yaml`` (a local file or an object); returns
        where. The space's digest is kept the first time (:meth:`space_digest`)."""
        from study.storage import write_text

        if not self.space_sha256:
            self.space_sha256 = self.space_digest()

        target = self.location(SPEC_FILE)
        write_text(target, yaml.safe_dump(self.to_dict(), sort_keys=False))
        return target

    @classmethod
    def load(cls, storage: str | Path, name: str) -> StudySpec:
        """Read a saved spec from a storage path or URI; a missing study is a ConfigError
        naming the studies that storage has."""
        from study.storage import join, normalize, read_text, subfolders_with

        storage = normalize(str(storage))
        try:
            text = read_text(join(storage, name, SPEC_FILE))
        except FileNotFoundError:
            existing = subfolders_with(storage, SPEC_FILE)
            raise ConfigError(
                f"no study {name!r} under {storage}; studies there: "
                f"{', '.join(existing) or 'none'} (use --storage to look elsewhere)"
            ) from None
        # the storage it was read from wins: a shared mount may sit at another path here
        return cls(**{**yaml.safe_load(text), "storage": storage})


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """``a`` updated by ``b``, nested mappings merged key by key (``b`` wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def base_config(path: str | None) -> dict[str, Any]:
    """The base training config: a YAML file, or the default study's digits settings."""
    return load_config_file(path or DEFAULT_BASE)
