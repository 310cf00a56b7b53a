"""Reading a finished study back out of MLflow (any tracking URI; never Ray).

The layout read here is the one ``study/`` writes: one experiment per study, a
parent run (role ``study``), one child run per trial (role ``trial``) and
sampling runs (role ``generation``) nested under a training run or under a
generation-study run. Tag and artifact names come from :mod:`reports.vocabulary`,
which ``study/`` imports too; :func:`retry` is the one retry of a busy store, used by
``study/``'s tracker as well.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from reports.ranking import result_metrics
from reports.vocabulary import (
    COMMAND_ARTIFACT,
    PARENT_TAG,
    ROLE_GENERATION,
    ROLE_GENERATION_STUDY,
    ROLE_REPLICATE,
    ROLE_STUDY,
    ROLE_TRIAL,
    SPEC_ARTIFACT,
    SPEC_DIR,
    TAG_METHOD,
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_STUDY,
    TAG_TRIAL,
)
from trainables.errors import UserError

T = TypeVar("T")
log = logging.getLogger(__name__)


class ReportError(UserError):
    """The study cannot be reported (unknown name, unreachable store); the message says why."""


@dataclass
class RunData:
    """One MLflow run as plain data.

    Attributes:
        run_id: MLflow run id.
        name: MLflow run name.
        status: FINISHED, FAILED, KILLED or RUNNING.
        start_ms: start time (ms since the epoch); end_ms likewise (None while running).
        params: params as logged (strings).
        metrics: the latest value of every metric; a ΔE-stopped trial's kept epoch's
            (:func:`reports.ranking.result_metrics`).
        tags: every tag.
    """

    run_id: str
    name: str
    status: str
    start_ms: int | None
    end_ms: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    searched_names: list[str] | None = None

    @property
    def trial_id(self) -> str:
        """The trial id (tag), else the run id."""
        return self.tags.get(TAG_TRIAL) or self.run_id[:8]

    @property
    def method(self) -> str:
        """The training method (param or tag)."""
        return self.params.get("method") or self.tags.get(TAG_METHOD) or "?"

    @property
    def searched(self) -> list[str]:
        """Names of the params the search sampled for this trial.

        The trial's tag lists every key of its Tune config (the space's constants
        too); :func:`load_study` narrows it to the space's parameters.
        """
        if self.searched_names is not None:
            return list(self.searched_names)
        raw = self.tags.get(TAG_SEARCHED, "")
        return [s for s in raw.split(",") if s]

    def metric(self, key: str) -> float | None:
        """A finite metric value, else None."""
        value = self.metrics.get(key)
        return value if value is not None and math.isfinite(value) else None


@dataclass
class StudyData:
    """Everything the report shows, read from MLflow once.

    Attributes:
        name: the study name (experiment name).
        tracking_uri: where it was read from.
        parent: the study's parent run (None when the study has none).
        trials: training trials, ordered by trial id.
        generations: sampling runs belonging to the study.
        spec: the study spec (``spec/study.yaml`` artifact, else the parent's params).
        command: the command that started the study (``spec/command.txt``), if logged.
        objective: objective metric names; modes: ``max``/``min`` for each.
        replicates: replicate runs (``study replicate``: a trial's configuration trained
            again with another seed), ordered by start time.
    """

    name: str
    tracking_uri: str
    parent: RunData | None
    trials: list[RunData]
    generations: list[RunData]
    spec: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    objective: list[str] = field(default_factory=lambda: ["val/pgd_acc"])
    modes: list[str] = field(default_factory=lambda: ["max"])
    replicates: list[RunData] = field(default_factory=list)


def _to_run(run: Any) -> RunData:
    info, data = run.info, run.data
    return RunData(
        run_id=info.run_id,
        name=info.run_name or "",
        status=info.status,
        start_ms=info.start_time,
        end_ms=info.end_time,
        params=dict(data.params),
        metrics={k: float(v) for k, v in result_metrics(data.metrics).items()},
        tags=dict(data.tags),
    )


def client_for(tracking_uri: str) -> Any:
    """An MlflowClient for ``tracking_uri``, with MLflow's start-up chatter silenced."""
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("alembic", "mlflow", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri)


def retry(fn: Callable[[], T], what: str, attempts: int = 8) -> T:
    """``fn()``, called again (up to ``attempts`` times, waits doubling from 0.05 s to
    2 s) while MLflow's store answers "database is locked"; any other error at once.

    Args:
        fn: one MLflow call.
        what: what it does (for the debug log).
        attempts: calls at most.
    """
    delay = 0.05
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # MlflowException wraps sqlalchemy's OperationalError
            if "locked" not in str(exc).lower() or i == attempts - 1:
                raise
            log.debug("MLflow store busy during %s; retrying in %.2fs", what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")  # pragma: no cover


def tags_filter(tags: Mapping[str, str]) -> str:
    """An MLflow search filter for runs carrying all ``tags``."""
    return " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())


def generation_study_filter(name: str) -> str:
    """The search filter of the generation-study runs named ``name``."""
    return tags_filter({TAG_ROLE: ROLE_GENERATION_STUDY, TAG_STUDY: name})


#: runs per MLflow search call (its maximum)
SEARCH_PAGE = 1000


def all_experiments(client: Any) -> list[Any]:
    """Every experiment in the store, page after page (MLflow returns at most 1,000 per
    call, as for runs); each call retried like every tracker call."""
    found: list[Any] = []
    token = None
    while True:
        page = retry(
            lambda t=token: client.search_experiments(max_results=1000, page_token=t),
            "search experiments",
        )
        found += list(page)
        token = page.token
        if not token:
            return found


def search_runs(
    client: Any, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None
) -> list[Any]:
    """Every run the search finds, page after page (MLflow returns at most
    :data:`SEARCH_PAGE` per call); each call retried like every tracker call."""
    runs: list[Any] = []
    token = None
    while True:
        page = retry(
            lambda t=token: client.search_runs(
                experiment_ids, filter_string, order_by=order_by, max_results=SEARCH_PAGE,
                page_token=t,
            ),
            "search",
        )  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def read_text_artifact(client: Any, run_id: str, path: str, tmp: Path) -> str | None:
    """The text of an artifact file, or None when the run has no such artifact."""
    local = download(client, run_id, path, tmp)
    return local.read_text() if local is not None else None


def download(client: Any, run_id: str, path: str, dst: Path) -> Path | None:
    """Download one artifact of a run into ``dst`` (None when it does not exist)."""
    dst.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(client.download_artifacts(run_id, path, str(dst)))
    except Exception:  # noqa: BLE001 - a missing artifact is "no data", not an error
        return None
    return local if local.exists() else None


def _parse_list(value: Any, default: list[str]) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return [value]
        return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]
    return default


def load_study(name: str, tracking_uri: str, tmp: Path) -> StudyData:
    """Read study ``name`` from the MLflow store at ``tracking_uri``.

    Args:
        name: the study's name (its experiment), or the name of a generation study.
        tracking_uri: any MLflow tracking URI.
        tmp: a scratch folder for downloaded artifacts.

    Raises:
        ReportError: no experiment and no run carries that study name.
    """
    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    all_ids = [e.experiment_id for e in all_experiments(client)]
    parent: RunData | None = None
    trials: list[RunData] = []
    replicates: list[RunData] = []
    if experiment is not None:
        in_exp = [_to_run(r) for r in search_runs(client, [experiment.experiment_id], "")]
        parents = [
            r
            for r in in_exp
            if r.tags.get(TAG_ROLE) == ROLE_STUDY and r.tags.get(TAG_STUDY, name) == name
        ]
        parent = min(parents, key=lambda r: r.start_ms or 0) if parents else None
        trials = [r for r in in_exp if r.tags.get(TAG_ROLE) == ROLE_TRIAL]
        replicates = [r for r in in_exp if r.tags.get(TAG_ROLE) == ROLE_REPLICATE]
    trial_ids = {t.run_id for t in trials}
    generations = []
    gen_parents = set()
    if all_ids:
        gen_parents = {
            r.info.run_id for r in search_runs(client, all_ids, generation_study_filter(name))
        }
        for run in search_runs(client, all_ids, tags_filter({TAG_ROLE: ROLE_GENERATION})):
            r = _to_run(run)
            owner = r.tags.get(PARENT_TAG)
            if owner in trial_ids or owner in gen_parents or r.tags.get(TAG_STUDY) == name:
                generations.append(r)
    if experiment is None and not generations:
        known = sorted(e.name for e in all_experiments(client) if e.name != "Default")
        raise ReportError(
            f"no study {name!r} in {tracking_uri}; experiments there: "
            f"{', '.join(known) or 'none'} (pass --tracking-uri for another store)"
        )
    if parent is None:
        _narrow_searched(trials, None)
    trials.sort(key=lambda r: (r.start_ms or 0, r.trial_id))
    replicates.sort(key=lambda r: (r.start_ms or 0, r.trial_id))
    generations.sort(key=lambda r: (r.start_ms or 0, r.run_id))
    data = StudyData(name, tracking_uri, parent, trials, generations, replicates=replicates)
    if parent is not None:
        text = read_text_artifact(client, parent.run_id, SPEC_ARTIFACT, tmp / SPEC_DIR)
        spec = yaml.safe_load(text) if text else None
        data.spec = spec if isinstance(spec, dict) else dict(parent.params)
        data.command = (
            read_text_artifact(client, parent.run_id, COMMAND_ARTIFACT, tmp / SPEC_DIR) or ""
        ).strip()
        space = space_params(client, parent.run_id, tmp / SPEC_DIR)
        _narrow_searched(trials, space)
        data.objective = _parse_list(data.spec.get("metrics"), data.objective)
        data.modes = _parse_list(data.spec.get("modes"), ["max"] * len(data.objective))
    # a replicate is grouped by the names its study's trials were narrowed to
    _narrow_searched(replicates, {n for t in trials for n in t.searched})
    return data


def metric_history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs of a metric, sorted by step (the last value of a repeated step)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if int(m.step) not in by_step or m.timestamp >= by_step[int(m.step)][0]:
            by_step[int(m.step)] = (m.timestamp, float(m.value))
    return [(s, v) for s, (_, v) in sorted(by_step.items())]


def space_params(client: Any, run_id: str, tmp: Path) -> set[str] | None:
    """Names under ``params:`` of the search-space file the parent run logged under ``spec/``."""
    try:
        items = client.list_artifacts(run_id, SPEC_DIR)
    except Exception:  # noqa: BLE001 - no spec folder: no space
        return None
    for item in items:
        if item.is_dir or not item.path.endswith((".yaml", ".yml")):
            continue
        if item.path == SPEC_ARTIFACT:
            continue
        text = read_text_artifact(client, run_id, item.path, tmp)
        try:
            space = yaml.safe_load(text or "")
        except yaml.YAMLError:
            continue
        if isinstance(space, dict) and isinstance(space.get("params"), dict):
            return {str(k) for k in space["params"]}
    return None


def _narrow_searched(trials: list[RunData], space: set[str] | None) -> None:
    """Keep only searched params: the space's, else those that differ between trials."""
    for run in trials:
        names = run.searched
        if space is not None:
            run.searched_names = [n for n in names if n in space]
        else:
            run.searched_names = [
                n
                for n in names
                if len({t.params.get(n) for t in trials if n in t.searched}) > 1 or n == "method"
            ]
