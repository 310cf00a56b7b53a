"""Reading finished studies back out of MLflow: best configs, study lists and trial tables.

"Best" is one order everywhere (``study export``, ``study show``, the report):
:func:`reports.ranking.rank_runs`, trials that meet the study's constraints
(``--constraint``) first, then the study's objectives, ties broken by its next
objective, then ``val/clean_acc`` (max), then the trial id (its number where it
ends with Tune's ``_00003`` index). ``study export`` never writes a trial that
violates a constraint; ``study show`` lists it after the feasible ones, marked.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from reports.intervals import Measured, accuracies, sample_size
from reports.ranking import is_feasible, is_result, rank_runs, ranking_rules, run_metrics
from reports.vocabulary import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    ROLE_STUDY,
    ROLE_TRIAL,
    TAG_ARTIFACT_ERROR,
    TAG_CONSTRAINTS,
    TAG_FAILURE,
    TAG_FINALIST,
    TAG_KEPT_EPOCH,
    TAG_METRICS_ERROR,
    TAG_ROLE,
    TAG_STOP_EPOCH,
    TAG_STUDY,
    TAG_TRIAL,
)
from study.tracking import MlflowTracker
from trainables.errors import ConfigError, UserError

if TYPE_CHECKING:
    from torch import Tensor

    from trainables.config import TrainConfig

#: The objective of a study whose parent run does not name one.
DEFAULT_OBJECTIVES = (["val/pgd_acc"], ["max"])
#: Metric columns of ``study show`` after the study's objectives (duplicates dropped).
SHOW_COLUMNS = ("val/clean_acc", "test/pgd_acc", "test/aa_acc")
#: Namespaces whose accuracies ``study show`` prints with their n and interval, in order.
SHOW_NAMESPACES = ("val", "test", "final")
#: ``study show`` keeps its lines to about this many characters.
SHOW_WIDTH = 100
#: The header line of an exported config that names its source (JSON after the prefix):
#: ``# source: {"study": …, "trial": …, "run": …}``; ``study train --config`` reads it back.
SOURCE_PREFIX = "# source: "


def trial_runs(tracker: MlflowTracker, study: str) -> list[Any]:
    """All child runs of a study."""
    return tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: ROLE_TRIAL})


def _as_list(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return [raw]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)] if value is not None else None


def study_objectives(tracker: MlflowTracker, study: str) -> tuple[list[str], list[str]]:
    """The study's objective metrics and their modes, from its parent run's params.

    The parent run logs the spec's ``metrics`` and ``modes`` as params; a study
    without them (a study of one from ``study train``) gets ``val/pgd_acc``, ``max``.
    """
    parents = tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: ROLE_STUDY})
    for parent in sorted(parents, key=lambda r: r.info.start_time or 0):
        metrics = _as_list(parent.data.params.get("metrics"))
        modes = _as_list(parent.data.params.get("modes"))
        if metrics and modes and len(metrics) == len(modes):
            return metrics, modes
        if metrics and not modes:
            return metrics, ["max"] * len(metrics)
    return list(DEFAULT_OBJECTIVES[0]), list(DEFAULT_OBJECTIVES[1])


def ranking_of(
    metric: str, mode: str, objectives: Sequence[str], modes: Sequence[str]
) -> tuple[list[str], list[str]]:
    """``metric`` first, then the study's other objectives: the metric list of :func:`rank_runs`."""
    order = {metric: mode}
    for other, other_mode in zip(objectives, modes):
        order.setdefault(other, other_mode)
    return list(order), list(order.values())


def best_runs(
    tracker: MlflowTracker,
    study: str,
    metric: str,
    mode: str = "max",
    top: int = 1,
    *,
    objectives: Sequence[str] | None = None,
    modes: Sequence[str] | None = None,
) -> list[Any]:
    """The ``top`` finished trial runs that stand for a trained configuration (a full
    budget, or the epoch a ΔE-stopped trial kept: :func:`reports.ranking.is_result`)
    and meet the study's constraints,
    best first: ranked as this module's docstring says, ``metric`` deciding first.

    Args:
        tracker: the study's tracker.
        study: the study name.
        metric: the metric that decides first.
        mode: ``max`` or ``min`` for ``metric``.
        top: how many runs to return (fewer when fewer qualify).
        objectives: the study's objectives (default: read from its parent run).
        modes: their modes (with ``objectives``).
    """
    finished = [r for r in trial_runs(tracker, study) if r.info.status == "FINISHED"]
    trained = [r for r in finished if is_result(r)]  # a ΔE-stopped trial: its kept epoch
    scored = [r for r in trained if math.isfinite(run_metrics(r).get(metric, math.nan))]
    runs = [r for r in scored if is_feasible(r)]
    if not runs:
        violating = f" that meets the study's constraints ({len(scored)} violate one)"
        raise ConfigError(
            f"study {study!r} has no finished trial with metric {metric!r}"
            f"{violating if scored else ''} in {tracker.tracking_uri}"
        )
    if objectives is None or modes is None:
        objectives, modes = study_objectives(tracker, study)
    metrics, order = ranking_of(metric, mode, objectives, modes)
    return rank_runs(runs, metrics, order)[:top]


def run_config(tracker: MlflowTracker, run_id: str) -> dict[str, Any]:
    """The full training config a run was trained with (its ``config.yaml`` artifact)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return yaml.safe_load(tracker.download(run_id, CONFIG_FILE, tmp).read_text())


def trial_checkpoint(tracker: MlflowTracker, run: Any) -> tuple[TrainConfig, dict[str, Tensor]]:
    """A finished run's training config and best weights, read from MLflow (its
    ``config.yaml`` and ``checkpoints/best.pt`` artifacts).

    Args:
        tracker: the tracker of the run's experiment.
        run: the MLflow run (a study's trial, or ``study train``'s run).

    Raises:
        UserError: the run lacks either artifact (or the checkpoint is corrupt), or its
            config is not a valid training config.
    """
    import tempfile

    from mlflow.exceptions import MlflowException

    from trainables.checkpoint import load_checkpoint
    from trainables.config import TrainConfig

    run_id, trial = run.info.run_id, run.data.tags.get(TAG_TRIAL, "?")
    with tempfile.TemporaryDirectory(prefix="energy-study-weights-") as tmp:
        try:
            checkpoint = tracker.download(run_id, BEST_CHECKPOINT, tmp)
        except (MlflowException, OSError):
            raise UserError(
                f"run {run_id} (trial {trial}) has no {BEST_CHECKPOINT} artifact to export"
            ) from None
        weights = load_checkpoint(checkpoint)["model"]
    try:
        cfg = TrainConfig.from_dict(run_config(tracker, run_id))
    except (MlflowException, OSError):
        raise UserError(f"run {run_id} (trial {trial}) has no {CONFIG_FILE} artifact") from None
    return cfg, weights


def source_line(study: str, trial: str, run_id: str) -> str:
    """The header line of an exported config naming the trial it came from
    (:data:`SOURCE_PREFIX`, then JSON)."""
    return SOURCE_PREFIX + json.dumps({"study": study, "trial": trial, "run": run_id}) + "\n"


#: The header lines ``study export`` wrote before it wrote :data:`SOURCE_PREFIX`.
_OLD_STUDY_LINE = re.compile(r"# best config #\d+ of study (?P<study>'.*') by .*")
_OLD_RUN_LINE = re.compile(r"# MLflow run (?P<run>\w+), trial (?P<trial>.+)")


def read_source(path: str | Path) -> dict[str, str] | None:
    """The study, trial and run (keys ``study``, ``trial``, ``run``) an exported config came
    from, read from its header; ``None`` for a config that names none (written by hand).

    The header of older exports (no :data:`SOURCE_PREFIX` line) is read too: its first
    line names the study, its second the run and the trial.

    Args:
        path: a training config YAML file (a missing file reads as no source: the
            config loader reports it).
    """
    import ast

    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    header = [ln for ln in lines if ln.startswith("#")]
    for line in header:
        if line.startswith(SOURCE_PREFIX):
            try:
                found = json.loads(line[len(SOURCE_PREFIX) :])
            except json.JSONDecodeError:
                return None
            keys = ("study", "trial", "run")
            if isinstance(found, dict) and all(isinstance(found.get(k), str) for k in keys):
                return {k: found[k] for k in keys}
            return None
    study = next((m for ln in header if (m := _OLD_STUDY_LINE.fullmatch(ln))), None)
    run = next((m for ln in header if (m := _OLD_RUN_LINE.fullmatch(ln))), None)
    if study is None or run is None:
        return None
    try:
        name = ast.literal_eval(study["study"])
    except (ValueError, SyntaxError):
        return None
    return {"study": str(name), "trial": run["trial"], "run": run["run"]}


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

    With ``top`` > 1 the files are ``<stem>-1.yaml`` … ``<stem>-K.yaml``, best first
    (the order of :func:`best_runs`).
    """
    out = Path(out)
    written = []
    for rank, run in enumerate(best_runs(tracker, study, metric, mode, top), start=1):
        cfg = run_config(tracker, run.info.run_id)
        cfg["output_dir"] = f"runs/{study}-best{rank if top > 1 else ''}"
        # a study's trials skip AutoAttack (its finalists get it); a final training
        # ends with the full evaluation again
        cfg["autoattack"] = True
        target = out if top == 1 else out.with_name(f"{out.stem}-{rank}{out.suffix or '.yaml'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"# best config #{rank} of study {study!r} by {metric} ({mode}) = "
            f"{run_metrics(run)[metric]:.4f}\n"
            f"# MLflow run {run.info.run_id}, trial {run.data.tags.get(TAG_TRIAL, '?')}\n"
            + source_line(study, run.data.tags.get(TAG_TRIAL, "?"), run.info.run_id)
            + f"# final training: study train --config {target.name} --set epochs=100\n"
            "# (autoattack is on again: the study's trials skipped it)\n"
            + sampler_lines(run.data.params)
        )
        target.write_text(header + yaml.safe_dump(cfg, sort_keys=False))
        written.append(target)
    return written


def sampler_lines(params: Mapping[str, str]) -> str:
    """The header lines of an exported config whose trial also sampled (a study over
    training and generation): its sampler settings (the run's ``generation.*`` params)
    as the ``study generate`` command that samples the same way from the final model;
    nothing for a trial that only trained.

    Args:
        params: the trial run's params (MLflow strings).
    """
    from study.spec import GEN_PREFIX

    # a setting left unset in the space (None, "None" as a param) is the sampler's default
    chosen = {k[len(GEN_PREFIX) :]: v for k, v in sorted(params.items())
              if k.startswith(GEN_PREFIX) and v not in (None, "None")}  # fmt: skip
    if not chosen:
        return ""
    sets = " ".join(f"--set {k}={shlex.quote(str(v))}" for k, v in chosen.items())
    return (
        "# this trial also sampled; the same sampler on the final model:\n"
        f"#   study generate --from <final run id> {sets}\n"
    )


# --- study show ------------------------------------------------------------------------------
def finalist_rank(tags: Mapping[str, str]) -> int | None:
    """A run's finalist rank (its :data:`TAG_FINALIST` tag as a number), else None."""
    raw = str(tags.get(TAG_FINALIST, "")).strip()
    return int(raw) if raw.isdigit() else None


def _short(key: str) -> str:
    """``test/pgd_acc`` → ``pgd`` (the name inside its namespace, without ``_acc``)."""
    return key.split("/", 1)[1].removesuffix("_acc")


def _wrap(label: str, items: list[str], indent: int, width: int) -> list[str]:
    """``label`` then ``items`` two spaces apart; items that do not fit go under the first."""
    head = " " * indent + label + " "
    lines: list[str] = []
    current: list[str] = []
    for item in items:
        if current and len(head) + len("  ".join([*current, item])) > width:
            lines.append("  ".join(current))
            current = []
        current.append(item)
    lines.append("  ".join(current))
    pad = " " * len(head)
    return [(head if i == 0 else pad) + text for i, text in enumerate(lines)]


def _namespace_lines(
    metrics: Mapping[str, float], namespace: str, finalist: int | None, indent: int, width: int
) -> list[str]:
    found: list[Measured] = accuracies(metrics, namespace)
    if not found or (namespace != "final" and not any(m.has_interval for m in found)):
        return []  # values without any n are in the columns already
    n = sample_size(metrics, f"{namespace}/n")  # the namespace's n; an item's own n if other
    label = namespace + (f" #{finalist}" if namespace == "final" and finalist else "")
    label += f" n={n}" if n is not None else ""
    items = [f"{_short(m.key)} {m.text(with_n=m.n != n)}" for m in found]
    return _wrap(label + ":", items, indent, width)


def show_lines(
    runs: Sequence[Any],
    objectives: Sequence[str],
    modes: Sequence[str],
    *,
    width: int = SHOW_WIDTH,
) -> list[str]:
    """The text of ``study show``: one line per trial, best first, then its accuracies with
    their n and 95 % Wilson interval (:data:`SHOW_NAMESPACES`), its failure reason and the
    files its run lacks (:data:`~reports.vocabulary.TAG_ARTIFACT_ERROR`) and
    metric points it lost (:data:`~reports.vocabulary.TAG_METRICS_ERROR`).

    Args:
        runs: the study's trial runs (MLflow runs).
        objectives: the study's objective metric names (the ranking's order).
        modes: ``max``/``min`` of each objective.
        width: wrap the interval lines at about this many characters.
    """
    ranked = rank_runs(runs, objectives, modes)
    logged = {k for r in ranked for k in r.data.metrics}
    extra = [c for c in SHOW_COLUMNS if c in logged]  # test/aa_acc: not in a study's trials
    columns = list(dict.fromkeys([*objectives, *extra]))
    widths = [max(len(c), 10) for c in columns]
    rules = ", then ".join(f"{m} ({o})" for m, o in ranking_rules(objectives, modes))
    first = (
        "(those that meet the study's constraints before those that violate one, rank -) "
        if not all(is_feasible(r) for r in ranked)
        else ""
    )
    lines = [
        f"{len(ranked)} trial(s), best first {first}by {rules}, then trial id",
        f"{'rank':>4s} {'fin':<3s} {'trial':<12s} {'status':<9s} {'method':<12s} "
        + " ".join(f"{c:>{w}s}" for c, w in zip(columns, widths)),
    ]
    any_final = False
    place = 0
    for run in ranked:
        m, tags = run_metrics(run), run.data.tags  # a ΔE-stopped trial: its kept epoch's
        scored = objectives[0] in m and math.isfinite(m[objectives[0]])
        place += scored and is_feasible(run)
        finalist = finalist_rank(tags)
        fin = f"#{finalist}" if finalist else ""
        any_final = any_final or finalist is not None or any(k.startswith("final/") for k in m)
        cells = " ".join(
            f"{m[c]:>{w}.4f}" if c in m else f"{'-':>{w}s}" for c, w in zip(columns, widths)
        )
        method = run.data.params.get("method", "?")
        feasible = is_feasible(run)
        rank = str(place) if scored and feasible else "-"
        lines.append(
            f"{rank:>4s} {fin:<3s} {tags.get(TAG_TRIAL, '?'):<12s} {run.info.status:<9s} "
            f"{method:<12s} {cells}"
        )
        for namespace in SHOW_NAMESPACES:
            lines += _namespace_lines(m, namespace, finalist, 6, width)
        if not feasible:
            lines.append(f"    violates a constraint: {tags.get(TAG_CONSTRAINTS, '?')}")
        if stop := tags.get(TAG_STOP_EPOCH):
            kept = tags.get(TAG_KEPT_EPOCH) or ""
            lines.append(
                f"    ΔE stop at epoch {stop}; "
                + (f"its values are those of epoch {kept} (kept)" if kept else "no epoch kept")
            )
        reason = tags.get(TAG_FAILURE)
        if reason:
            lines.append(f"    failure: {reason}")
        missing = tags.get(TAG_ARTIFACT_ERROR)
        if missing:
            lines.append(f"    artifacts missing: {missing}")
        if lost := tags.get(TAG_METRICS_ERROR):
            lines.append(f"    metrics missing: {lost}")
    legend = "[low, high]: 95 % Wilson interval of the accuracy on the n points"
    if any_final:
        legend += (
            "; fin: finalist rank (final/*: clean, PGD, AutoAttack and robust = "
            "survives both, all on the same n points)"
        )
    lines += textwrap.wrap(legend, width)
    return lines
