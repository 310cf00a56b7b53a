"""Aggregations of a study's runs: leaderboard, Pareto front, importances, generation scores.

Pure functions of :class:`~reports.data.RunData` lists (no MLflow calls), so
each number in the report can be recomputed from the store independently.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from reports.data import RunData
from reports.intervals import group_interval, measured, sample_size
from reports.ranking import is_feasible, rank_key, rank_runs, ranking_rules, trial_order
from reports.vocabulary import (
    TAG_CONSTRAINT_OK,
    TAG_FINALIST,
    TAG_REPLICATE_OF,
    TAG_REPLICATE_SEED,
)

#: Final test metrics of the leaderboard: (metric, column title).
TEST_METRICS = (
    ("test/clean_acc", "Clean"),
    ("test/pgd_acc", "PGD"),
    ("test/aa_acc", "AutoAttack"),
)
#: Second-stage metrics of a study's finalists (all on the same ``final/n`` points).
FINAL_METRICS = (
    ("final/clean_acc", "Clean"),
    ("final/pgd_acc", "PGD"),
    ("final/aa_acc", "AutoAttack"),
    ("final/robust_acc", "Robust (both)"),
)
#: Params that never define a configuration group (repetitions differ only in them).
NOT_A_GROUP_KEY = {"seed", "method"}
#: Sampler params that do not change what is sampled (hardware, scoring plumbing).
GEN_IGNORED = {
    "seed",
    "device",
    "batch_size",
    "score",
    "feature_extractor",
    "inception_weights",
    "extractor_plugin",
    "reference_n",
    "classes",
}
#: Generation scores: (metric, column title, better).
GEN_METRICS = (
    ("gen/is", "IS", "max"),
    ("gen/fid", "FID", "min"),
    ("gen/kid", "KID", "min"),
    ("gen/diversity", "Diversity", "max"),
)


def group_key(run: RunData) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A trial's configuration group: its method and its searched params (seed excluded)."""
    searched = sorted(p for p in run.searched if p not in NOT_A_GROUP_KEY)
    return run.method, tuple((p, run.params.get(p, "-")) for p in searched)


def group_label(key: tuple[str, tuple[tuple[str, str], ...]]) -> str:
    """``"weat_adv (beta=3.21, weight_fn=exp)"``."""
    method, params = key
    if not params:
        return method
    return f"{method} (" + ", ".join(f"{k}={_short(v)}" for k, v in params) + ")"


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.4g}" if not number.is_integer() or "." in value else value


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


def leaderboard(
    trials: Sequence[RunData],
    objective: Sequence[str] = ("val/pgd_acc",),
    modes: Sequence[str] = ("max",),
    replicates: Sequence[RunData] = (),
) -> pd.DataFrame:
    """One row per configuration group of the finished trials with test metrics.

    Columns: ``group``, ``method``, ``n`` (trials), ``trials`` (their ids),
    ``finalists`` (``#1 <trial>`` for members that are finalists), and for each
    of :data:`TEST_METRICS` that any trial has: ``<metric> mean`` / ``std``
    over the group's trials, ``<metric> n`` (test points, the smallest of the
    group's; NaN when not logged) and ``<metric> ci_low`` / ``ci_high``, the
    95 % Wilson interval of the mean on those points (see
    :func:`reports.intervals.group_interval`).

    A configuration with replicates (``study replicate``: finished replicate runs of
    one of its trials) is scored over its replicates alone, one per seed: their seeds
    were not selected for their score, while the search kept its trial because it
    scored best. Its ``n`` is the number of replicates, ``trials`` lists them, and the
    ``replicates of`` column (present when any group has replicates) names the trials
    they re-train.

    When the study has constraints (its trials carry
    :data:`~reports.vocabulary.TAG_CONSTRAINT_OK`), a ``constraints`` column says
    ``met`` or ``violated: <trial ids>``; a group is feasible when every trial of it is.

    Rows are in the order of :mod:`reports.ranking` applied to the groups: feasible
    groups first, then the group mean of each objective (in ``modes``), then of
    ``val/clean_acc`` (max), then the group's first trial id
    (:func:`reports.ranking.trial_order`). So the first row holds the trial
    ``study export`` writes when its group has one trial.

    Args:
        trials: the study's trial runs.
        objective: the study's objective metrics, most important first.
        modes: ``max``/``min`` for each objective.
        replicates: the study's replicate runs (:attr:`StudyData.replicates`).
    """
    groups: dict[tuple, list[RunData]] = {}
    for run in trials:
        if run.status != "FINISHED" or run.metric("test/clean_acc") is None:
            continue
        groups.setdefault(group_key(run), []).append(run)
    # one training per configuration and seed (the newest: a seed replicated twice, by
    # two commands at once or for two trials of one configuration, is the same training)
    by_seed: dict[tuple, dict[str, RunData]] = {}
    for run in sorted(replicates, key=lambda r: r.start_ms or 0):
        if run.status == "FINISHED" and run.metric("test/clean_acc") is not None:
            seed = run.tags.get(TAG_REPLICATE_SEED) or run.run_id
            by_seed.setdefault(group_key(run), {})[seed] = run
    replicated = {key: list(runs.values()) for key, runs in by_seed.items()}
    scored_runs = [*trials, *(r for rs in replicated.values() for r in rs)]
    present = [m for m, _ in TEST_METRICS if any(r.metric(m) is not None for r in scored_runs)]
    constrained = any(TAG_CONSTRAINT_OK in r.tags for r in trials)
    rules = ranking_rules(objective, modes)
    rows = []
    order = []
    for key in [*groups, *(k for k in replicated if k not in groups)]:
        searched = groups.get(key, [])
        runs = rank_runs(replicated.get(key) or searched, objective, modes)
        row: dict[str, object] = {
            "group": group_label(key),
            "method": key[0],
            "n": len(runs),
            "trials": " ".join(r.trial_id for r in runs),
            "finalists": " ".join(
                f"#{rank} {r.trial_id}"
                for rank, r in sorted(
                    (finalist_rank(r), r) for r in searched if finalist_rank(r) is not None
                )
            ),
        }
        if replicated:
            sources = sorted({r.tags.get(TAG_REPLICATE_OF, "?") for r in replicated.get(key, [])})
            row["replicates of"] = " ".join(sources)
        violating = list(
            dict.fromkeys(r.trial_id for r in [*searched, *runs] if not is_feasible(r))
        )
        if constrained:
            row["constraints"] = f"violated: {' '.join(violating)}" if violating else "met"
        for metric in present:
            scored = [(r, v) for r in runs if (v := r.metric(metric)) is not None]
            values = [v for _, v in scored]
            row[f"{metric} mean"], row[f"{metric} std"] = mean_std(values)
            single = measured(scored[0][0].metrics, metric) if len(scored) == 1 else None
            n, low, high = group_interval(
                values, [sample_size(r.metrics, metric) for r, _ in scored], single
            )
            row[f"{metric} n"] = math.nan if n is None else n
            row[f"{metric} ci_low"] = math.nan if low is None else low
            row[f"{metric} ci_high"] = math.nan if high is None else high
        means = {
            m: statistics.fmean(vs)
            for m, _ in rules
            if (vs := [v for r in runs if (v := r.metric(m)) is not None])
        }
        first = min(runs, key=lambda r: trial_order(r.trial_id, r.run_id))
        order.append(rank_key(means, first.trial_id, rules, first.run_id, not violating))
        rows.append(row)
    columns = ["group", "method", "n", "trials", "finalists"]
    columns += ["replicates of"] if replicated else []
    columns += ["constraints"] if constrained else []
    columns += [f"{m} {s}" for m in present for s in ("mean", "std", "n", "ci_low", "ci_high")]
    ranked = [row for _, row in sorted(zip(order, rows), key=lambda pair: pair[0])]
    return pd.DataFrame(ranked, columns=columns)


def finalist_rank(run: RunData) -> int | None:
    """A trial's finalist rank (its :data:`TAG_FINALIST` tag as a number), else None."""
    raw = run.tags.get(TAG_FINALIST, "").strip()
    return int(raw) if raw.isdigit() else None


def finalists(trials: Sequence[RunData]) -> list[RunData]:
    """The study's finalists (trials tagged with a finalist rank), by rank."""
    tagged = [r for r in trials if finalist_rank(r) is not None]
    return sorted(tagged, key=lambda r: (finalist_rank(r), trial_order(r.trial_id, r.run_id)))


def finalist_table(trials: Sequence[RunData]) -> pd.DataFrame:
    """One row per finalist: its second-stage evaluation (``final/*``) with n and intervals.

    Columns: ``rank``, ``trial``, ``run_id``, ``group``, ``final/n``, and for each
    of :data:`FINAL_METRICS` the value and its ``ci_low`` / ``ci_high`` (the
    bounds the run logged, else the Wilson interval on ``final/n`` points; NaN
    when unknown). Empty when the study has no finalists.
    """
    rows = []
    for run in finalists(trials):
        row: dict[str, object] = {
            "rank": finalist_rank(run),
            "trial": run.trial_id,
            "run_id": run.run_id,
            "group": group_label(group_key(run)),
            "final/n": sample_size(run.metrics, "final/n") or math.nan,
        }
        for metric, _ in FINAL_METRICS:
            m = measured(run.metrics, metric)
            row[metric] = m.value if m else math.nan
            row[f"{metric} ci_low"] = m.low if m and m.low is not None else math.nan
            row[f"{metric} ci_high"] = m.high if m and m.high is not None else math.nan
        rows.append(row)
    columns = ["rank", "trial", "run_id", "group", "final/n"]
    columns += [f"{m}{s}" for m, _ in FINAL_METRICS for s in ("", " ci_low", " ci_high")]
    return pd.DataFrame(rows, columns=columns)


def best_rows(frame: pd.DataFrame, metrics: Sequence[str]) -> dict[str, int]:
    """For each metric column ``<m> mean`` of ``frame``: the index of its best (largest)
    row, among the rows whose ``constraints`` are ``met`` when the frame has that column
    (a group that violates a constraint is never the best)."""
    if "constraints" in frame:
        frame = frame[frame["constraints"] == "met"]
    out = {}
    for metric in metrics:
        col = f"{metric} mean"
        if col in frame and frame[col].notna().any():
            out[metric] = int(frame[col].idxmax())
    return out


@dataclass
class Point:
    """One trial in the clean-vs-robust plane."""

    trial_id: str
    method: str
    clean: float
    robust: float
    pareto: bool = False


def pareto_points(
    trials: Sequence[RunData],
    clean: str = "test/clean_acc",
    robust: str = "test/pgd_acc",
    clean_mode: str = "max",
) -> list[Point]:
    """Every trial with both metrics; ``pareto`` marks the non-dominated ones (``robust``
    maximised, ``clean`` as ``clean_mode`` says: ``min`` for a score such as ``gen/fid``
    on that axis)."""
    sign = -1.0 if clean_mode == "min" else 1.0
    points = [
        Point(r.trial_id, r.method, c, p)
        for r in trials
        if (c := r.metric(clean)) is not None and (p := r.metric(robust)) is not None
    ]
    for a in points:
        a.pareto = not any(
            sign * b.clean >= sign * a.clean
            and b.robust >= a.robust
            and (sign * b.clean > sign * a.clean or b.robust > a.robust)
            for b in points
        )
    return points


def objective_value(run: RunData, metric: str) -> float | None:
    """A trial's objective: the last value of ``metric`` it reported (as Tune saw it)."""
    return run.metric(metric)


def best_per_method(
    trials: Sequence[RunData], objective: Sequence[str], modes: Sequence[str]
) -> dict[str, RunData]:
    """The best trial of each method (finished or early-stopped trials with the objective).

    Best in the order of :func:`reports.ranking.rank_runs` (objectives, then
    ``val/clean_acc``, then trial id), as ``study export`` picks.

    Args:
        trials: the study's trial runs.
        objective: the study's objective metrics, most important first.
        modes: ``max``/``min`` for each objective.
    """
    best: dict[str, RunData] = {}
    scored = [r for r in trials if r.status != "FAILED" and r.metric(objective[0]) is not None]
    for run in rank_runs(scored, objective, modes):
        best.setdefault(run.method, run)
    return dict(sorted(best.items()))


@dataclass
class Importances:
    """Parameter importances of the objective, or why there are none."""

    values: dict[str, float]
    evaluator: str
    message: str = ""


def _distribution(values: list[str]):  # noqa: ANN202 - an optuna distribution
    import optuna

    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return optuna.distributions.CategoricalDistribution(sorted(set(values))), None
    if all(
        n.is_integer() and "." not in v and "e" not in v.lower() for n, v in zip(numbers, values)
    ):
        return optuna.distributions.IntDistribution(int(min(numbers)), int(max(numbers))), int
    return optuna.distributions.FloatDistribution(min(numbers), max(numbers)), float


def importances(trials: Sequence[RunData], metric: str, mode: str) -> Importances:
    """Importances of the searched params for ``metric``, by Optuna's evaluators.

    An in-memory Optuna study is rebuilt from the MLflow trial runs (one
    ``create_trial`` per trial with the objective, distributions inferred from
    the values the params took); fANOVA first, mean decrease impurity if it
    fails. Fewer than three scored trials give a message instead.
    """
    import optuna

    scored = [r for r in trials if r.status != "FAILED" and objective_value(r, metric) is not None]
    names = sorted({p for r in scored for p in r.searched})
    if len(scored) < 3 or not names:
        return Importances(
            {}, "", f"{len(scored)} scored trial(s) with searched parameters: at least 3 are needed"
        )
    dists = {}
    casts = {}
    for name in names:
        values = [r.params[name] for r in scored if name in r.params]
        dists[name], casts[name] = _distribution(values)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for run in scored:
        params = {}
        used = {}
        for name in names:
            if name not in run.params:
                continue
            raw = run.params[name]
            params[name] = casts[name](float(raw)) if casts[name] is not None else raw
            used[name] = dists[name]
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=used, value=objective_value(run, metric)
            )
        )
    errors = []
    for label, evaluator in (
        ("fANOVA", optuna.importance.FanovaImportanceEvaluator(seed=0)),
        (
            "mean decrease impurity",
            optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0),
        ),
    ):
        try:
            values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except Exception as exc:  # noqa: BLE001 - the next evaluator, then a message
            errors.append(f"{label}: {exc}")
            continue
        if values:
            return Importances({k: float(v) for k, v in values.items()}, label)
    return Importances({}, "", "; ".join(errors) or "no parameter took more than one value")


def generation_table(runs: Sequence[RunData]) -> pd.DataFrame:
    """IS/FID/KID per sampler configuration (finished sampling runs with scores).

    Columns: the sampler params that define a configuration (those not in
    :data:`GEN_IGNORED`), ``n`` (runs), ``runs`` (run ids), and the mean of each
    of :data:`GEN_METRICS` plus ``gen/is_std`` / ``gen/kid_std`` (means over the
    group's runs). Sorted by FID, best first.
    """
    scored = [r for r in runs if r.status == "FINISHED" and r.metric("gen/fid") is not None]
    keys = sorted({k for r in scored for k in r.params if k not in GEN_IGNORED})
    groups: dict[tuple[str, ...], list[RunData]] = {}
    for run in scored:
        groups.setdefault(tuple(run.params.get(k, "-") for k in keys), []).append(run)
    metrics = [m for m, _, _ in GEN_METRICS] + ["gen/is_std", "gen/kid_std"]
    rows = []
    for values, members in groups.items():
        row: dict[str, object] = dict(zip(keys, values))
        row["n"] = len(members)
        row["runs"] = " ".join(r.run_id for r in members)
        for metric in metrics:
            found = [v for r in members if (v := r.metric(metric)) is not None]
            row[metric] = statistics.fmean(found) if found else math.nan
        rows.append(row)
    frame = pd.DataFrame(rows, columns=[*keys, "n", "runs", *metrics])
    if not frame.empty:
        frame = frame.sort_values("gen/fid", kind="stable").reset_index(drop=True)
    return frame
