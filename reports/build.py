"""``study report NAME``: one folder with ``index.html`` (and/or ``index.md``), PNGs and CSVs.

Usage::

    from reports.build import build_report
    index = build_report("weat-20261124", "sqlite:///mlflow.db", Path("report"), fmt="both")

Every section is built from MLflow alone; a section without data says so
instead of breaking the report.
"""

from __future__ import annotations

import datetime as dt
import math
import shutil
import tempfile
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from reports import analysis, figures
from reports.data import (
    ReportError,
    RunData,
    StudyData,
    all_experiments,
    client_for,
    download,
    generation_study_filter,
    load_study,
    metric_history,
    retry,
    search_runs,
    tags_filter,
)
from reports.intervals import Measured, measured, sample_size
from reports.ranking import is_feasible, rank_runs, ranking_rules
from reports.render import Cell, Image, Pre, Section, Table, num, render_html, render_markdown
from reports.vocabulary import (
    CONFIG_FILE,
    ENERGIES_FILE,
    GRID_ARTIFACT,
    REPORT_ARTIFACT,
    REPORT_INDEX,
    REPORT_MARKDOWN,
    ROLE_STUDY,
    ROLE_TRIAL,
    TAG_CONSTRAINTS,
    TAG_EARLY,
    TAG_FAILURE,
    TAG_KEPT_EPOCH,
    TAG_PROCESS,
    TAG_ROLE,
    TAG_STOP_EPOCH,
    TAG_STUDY,
    TAG_WARM_START,
    TAG_WARM_START_TRIALS,
)

FORMATS = ("html", "md", "both")
#: Panels of the training-dynamics figure: (metric, title); a panel no trial logged is left out.
#: With the training probe there are four, two per row: the two ΔE panels side by side.
DYNAMICS = (
    ("val/pgd_acc", "validation PGD accuracy"),
    ("lr", "learning rate"),
    ("val/delta_energy", "ΔE(x) = E(x) − E(x*) (validation)"),
    ("train_probe/delta_energy", "ΔE(x) = E(x) − E(x*) (training probe)"),
)
#: The training probe's other per-epoch numbers: in the dynamics CSV, not plotted.
PROBE_EXTRA = (
    "train_probe/delta_energy_std",
    "train_probe/delta_energy_xy",
    "train_probe/energy_nat",
    "train_probe/energy_adv",
)


def _acc_cell(m: Measured | None) -> Cell:
    """An accuracy cell: ``0.7500 [0.710, 0.787]`` (the bracket when its interval is known)."""
    if m is None:
        return Cell(num(None))
    return Cell(m.text(), m.value)


class Context:
    """What the section builders share: the data, the client, the output folder."""

    def __init__(self, data: StudyData, out: Path, tmp: Path, energy_run: str | None) -> None:
        self.data = data
        self.out = out
        self.tmp = tmp
        self.client = client_for(data.tracking_uri)
        self.energy_run = energy_run
        self._configs: dict[str, Path | None] | None = None
        (out / "figures").mkdir(parents=True, exist_ok=True)
        (out / "tables").mkdir(parents=True, exist_ok=True)

    def trial_config(self, run_id: str) -> Path | None:
        """The trial's ``config.yaml``, downloaded (None: the run has none). The first call
        fetches every trial's at once (:func:`fetch_trial_configs`)."""
        if self._configs is None:
            self._configs = fetch_trial_configs(self.client, self.data, self.tmp / "configs")
        if run_id not in self._configs:  # not found by the search: one download
            self._configs[run_id] = download(self.client, run_id, CONFIG_FILE, self.tmp / run_id)
        return self._configs[run_id]

    def csv(self, frame: pd.DataFrame, name: str) -> str:
        """Write ``tables/<name>.csv``; returns its relative path."""
        rel = f"tables/{name}.csv"
        frame.to_csv(self.out / rel, index=False)
        return rel

    def figure(self, name: str) -> tuple[Path, str]:
        """Absolute path and relative src of ``figures/<name>.png``."""
        rel = f"figures/{name}.png"
        return self.out / rel, rel


def _date(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _flat(value: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(value)}


# --- sections ------------------------------------------------------------------------------
def _constraint_texts(data: StudyData) -> list[str]:
    """The study's constraints as written (``val/clean_acc>=0.8``): a list in its
    ``study.yaml``, or the text of one logged as the parent run's param."""
    value = data.spec.get("constraints")
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return [value]
    return [str(c) for c in value] if isinstance(value, list) else []


def _warm_start_text(tags: dict[str, str]) -> str:
    """``"OTHER (12 trials seeded)"`` from a parent run's warm-start tags, else ``-``."""
    source = tags.get(TAG_WARM_START)
    if not source:
        return "-"
    return f"{source} ({tags.get(TAG_WARM_START_TRIALS, '?')} trials seeded)"


def header_section(ctx: Context) -> Section:
    """Spec, dates, versions, commit, hardware and the commands that reproduce each trial."""
    data = ctx.data
    sec = Section("header", "Study")
    parent = data.parent
    runs = data.trials + data.generations
    start = min([r.start_ms for r in runs if r.start_ms] or [parent.start_ms if parent else 0])
    end = max([r.end_ms or 0 for r in runs] or [parent.end_ms if parent else 0])
    tags = parent.tags if parent else {}
    counts: dict[str, int] = {}
    for run in data.trials:
        counts[run.status] = counts.get(run.status, 0) + 1
    hosts = sorted(
        {r.tags[TAG_PROCESS].split(":")[0] for r in data.trials if TAG_PROCESS in r.tags}
    )
    facts = [
        ("study", data.name),
        ("tracking URI", data.tracking_uri),
        ("objective", ", ".join(f"{m} ({o})" for m, o in zip(data.objective, data.modes))),
        ("constraints", ", ".join(_constraint_texts(data)) or "none"),
        ("warm start", _warm_start_text(tags)),
        ("trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
        ("sampling runs", str(len(data.generations))),
        ("started", _date(start)),
        ("ended", _date(end)),
        ("git commit", tags.get("git_commit", "-")),
        ("hardware", tags.get("version.platform", "-")),
        *[
            (f"hardware: {k.removeprefix('hardware.')}", tags[k])
            for k in sorted(tags)
            if k.startswith("hardware.")
        ],
        ("trial hosts", ", ".join(hosts) or "-"),
    ]
    resources = {k: data.spec.get(k) for k in ("workers_per_trial", "cpus_per_worker")}
    resources["gpus_per_trial"] = data.spec.get("gpus_per_trial")
    if any(v is not None for v in resources.values()):
        facts.append(("resources per trial", ", ".join(f"{k}={v}" for k, v in resources.items())))
    for key in sorted(k for k in tags if k.startswith("version.") and k != "version.platform"):
        facts.append((key.removeprefix("version."), tags[key]))
    sec.blocks.append(
        Table(["", "value"], [[Cell(k), Cell(str(v))] for k, v in facts], "facts", None)
    )
    if data.command:
        sec.blocks += ["Command that started the study:", Pre(data.command)]
    if data.spec:
        sec.blocks += ["Study spec:", Pre(yaml.safe_dump(data.spec, sort_keys=False).strip())]
    if parent is None:
        sec.blocks.append("The study has no parent run in MLflow (spec, versions unknown).")
    sec.blocks += trials_blocks(ctx)
    return sec


#: downloads of the trials' config files at once (they wait on the store, not the CPU)
CONFIG_THREADS = 8


def fetch_trial_configs(client: Any, data: StudyData, tmp: Path) -> dict[str, Path | None]:
    """Run id → its ``config.yaml`` downloaded into ``tmp/<run id>/`` (None: it has none),
    for every trial of ``data``: the runs' artifact locations from one paginated search,
    then the files straight from the artifact store, :data:`CONFIG_THREADS` at a time
    (a download by run id costs two extra store calls per run: minutes for 1,000 trials).
    """
    from mlflow.artifacts import download_artifacts

    experiment = retry(lambda: client.get_experiment_by_name(data.name), "lookup")
    if experiment is None or not data.trials:
        return {}
    wanted = {t.run_id for t in data.trials}
    found = search_runs(client, [experiment.experiment_id], tags_filter({TAG_ROLE: ROLE_TRIAL}))
    roots = {r.info.run_id: r.info.artifact_uri for r in found if r.info.run_id in wanted}

    def fetch(run_id: str) -> tuple[str, Path | None]:
        dst = tmp / run_id
        dst.mkdir(parents=True, exist_ok=True)
        uri = f"{roots[run_id].rstrip('/')}/{CONFIG_FILE}"
        try:
            local = Path(download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                            tracking_uri=data.tracking_uri))  # fmt: skip
        except Exception:  # noqa: BLE001 - a missing artifact is "no config", not an error
            return run_id, None
        return run_id, local if local.is_file() else None

    with ThreadPoolExecutor(CONFIG_THREADS) as pool:
        return dict(pool.map(fetch, sorted(roots)))


def _trial_config_file(ctx: Context, run: RunData) -> str:
    """``configs/<trial>.yaml`` (the run's config.yaml artifact, else its params)."""
    rel = f"configs/{run.trial_id}.yaml"
    target = ctx.out / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    local = ctx.trial_config(run.run_id)
    if local is not None:
        shutil.copyfile(local, target)
    else:
        nested: dict[str, Any] = {}
        for key, raw in sorted(run.params.items()):
            *parents, leaf = key.split(".")
            node = nested
            for p in parents:
                node = node.setdefault(p, {})
            try:
                node[leaf] = yaml.safe_load(raw)
            except yaml.YAMLError:
                node[leaf] = raw
        target.write_text(yaml.safe_dump(nested, sort_keys=False))
    return rel


def trials_blocks(ctx: Context) -> list[object]:
    """The table of every trial: status, searched values, objective, test metrics, command.

    Accuracies carry their 95 % Wilson interval where the trial logged its ``n``
    (``val/n``, ``test/n``); the ``n`` column gives both.
    """
    data = ctx.data
    if not data.trials:
        return ["No training trials are recorded for this study."]
    objective = data.objective[0]
    metrics = [objective, "test/clean_acc", "test/pgd_acc", "test/aa_acc"]
    cols = ["trial", "status", "method", "searched", *metrics, "n (val / test)", "note",
            "reproduce"]  # fmt: skip
    rows = []
    records = []
    for run in data.trials:
        searched = ", ".join(f"{k}={run.params.get(k, '-')}" for k in run.searched if k != "method")
        note = run.tags.get(TAG_FAILURE, "")
        if not note and run.tags.get(TAG_STOP_EPOCH):
            kept = run.tags.get(TAG_KEPT_EPOCH)
            note = f"ΔE stop at epoch {run.tags[TAG_STOP_EPOCH]}"
            note += f"; epoch {kept} kept" if kept else "; no epoch kept"
        elif not note and run.tags.get(TAG_EARLY) == "true":
            note = "stopped early"
        if not is_feasible(run):
            why = run.tags.get(TAG_CONSTRAINTS, "")
            note = "; ".join(filter(None, [note, f"violates a constraint ({why})"]))
        rank = analysis.finalist_rank(run)
        if rank is not None:
            note = "; ".join(filter(None, [f"finalist #{rank}", note]))
        command = f"study train --config {_trial_config_file(ctx, run)}"
        found = [measured(run.metrics, m) for m in metrics]
        val_n, test_n = sample_size(run.metrics, "val/n"), sample_size(run.metrics, "test/n")
        ns = f"{val_n if val_n is not None else '-'} / {test_n if test_n is not None else '-'}"
        rows.append(
            [Cell(run.trial_id), Cell(run.status), Cell(run.method), Cell(searched)]
            + [_acc_cell(m) for m in found]
            + [Cell(ns), Cell(note), Cell(command, code=True)]
        )
        record: dict[str, object] = {"trial": run.trial_id, "run_id": run.run_id,
                                     "status": run.status, "method": run.method,
                                     "searched": searched}  # fmt: skip
        for key, m in zip(metrics, found):
            record[key] = m.value if m else None
            record[f"{key} ci_low"] = m.low if m else None
            record[f"{key} ci_high"] = m.high if m else None
        record.update({"val/n": val_n, "test/n": test_n, "finalist": rank, "note": note,
                       "command": command})  # fmt: skip
        records.append(record)
    csv = ctx.csv(pd.DataFrame(records), "trials")
    return ["Trials (each command retrains the trial from its exact config; [low, high]: 95 % "
            "Wilson interval of an accuracy on its n points):",
            Table(cols, rows, "trials", csv)]  # fmt: skip


def _leaderboard_n(row: pd.Series, metrics: list[str], titles: dict[str, str]) -> str:
    """The test points of a leaderboard row: ``300``, or per metric when they differ."""
    ns = {m: row[f"{m} n"] for m in metrics if not math.isnan(float(row[f"{m} n"]))}
    if not ns:
        return "-"
    if len(set(ns.values())) == 1 and len(ns) == len(metrics):
        return str(int(next(iter(ns.values()))))
    return ", ".join(f"{titles[m]} {int(n)}" for m, n in ns.items())


def _one(values: set[str | None], fmt: str, default: str) -> str:
    """``fmt`` filled with the one value all runs share, else ``default``."""
    values.discard(None)
    return fmt.format(values.pop()) if len(values) == 1 else default


def finalists_blocks(ctx: Context) -> list[object]:
    """The finalists' second evaluation stage: ``final/*`` with n and 95 % intervals."""
    frame = analysis.finalist_table(ctx.data.trials)
    if frame.empty:
        return []
    chosen = analysis.finalists(ctx.data.trials)
    pgd = _one({r.params.get("eval_steps") for r in chosen}, "PGD-{}", "PGD")
    version = _one({r.params.get("aa_version") for r in chosen}, "{}", "")
    aa = "AutoAttack" + (f" ({version})" if version and version != "standard" else "")
    metrics = [m for m, _ in analysis.FINAL_METRICS if frame[m].notna().any()]
    titles = {**dict(analysis.FINAL_METRICS), "final/pgd_acc": pgd, "final/aa_acc": aa}
    best = {m: int(frame[m].idxmax()) for m in metrics}
    rows = []
    for i, row in frame.iterrows():
        n = float(row["final/n"])
        cells = [Cell(f"#{int(row['rank'])}", float(row["rank"])), Cell(str(row["trial"])),
                 Cell(str(row["group"])), Cell(num(None) if math.isnan(n) else str(int(n)),
                                              None if math.isnan(n) else n)]  # fmt: skip
        for m in metrics:
            value, low, high = (float(row[m]), float(row[f"{m} ci_low"]),
                                float(row[f"{m} ci_high"]))  # fmt: skip
            if math.isnan(value):
                cells.append(Cell(num(None)))
                continue
            text = num(value) + ("" if math.isnan(low) else f" [{low:.3f}, {high:.3f}]")
            cells.append(Cell(text, value, best=best[m] == i))
        rows.append(cells)
    cols = ["finalist", "trial", "configuration", "n",
            *(f"{titles[m]} ({m})" for m in metrics)]  # fmt: skip
    return [
        "Finalists: the study's top trials evaluated again, every attack on the same n test "
        f"points ({pgd}, {version or 'standard'} AutoAttack; robust = the points that survive "
        "both); [low, high]: 95 % Wilson interval; ★ best of each column.",
        Table(cols, rows, "finalists-table", ctx.csv(frame, "finalists")),
    ]


def leaderboard_section(ctx: Context) -> Section:
    """Mean ± std and 95 % interval of clean / PGD / AutoAttack accuracy per configuration group."""
    sec = Section("leaderboard", "Leaderboard")
    data = ctx.data
    frame = analysis.leaderboard(data.trials, data.objective, data.modes, data.replicates)
    final = finalists_blocks(ctx)
    if frame.empty:
        if final:
            sec.blocks += final
            return sec
        sec.has_data = False
        sec.empty = "no finished trial has test metrics (failed, stopped early, or not run)."
        return sec
    pgd = _one({r.params.get("eval_steps") for r in data.trials}, "PGD-{}", "PGD")
    titles = {m: (pgd if m == "test/pgd_acc" else t) for m, t in analysis.TEST_METRICS}
    metrics = [m for m, _ in analysis.TEST_METRICS if f"{m} mean" in frame]
    best = analysis.best_rows(frame, metrics)
    has_final = frame["finalists"].astype(bool).any()
    constrained = "constraints" in frame
    replicated = "replicates of" in frame
    rows = []
    for i, row in frame.iterrows():
        cells = [Cell(str(row["group"])), Cell(str(int(row["n"])), float(row["n"]))]
        if constrained:
            cells.append(Cell(str(row["constraints"])))
        for m in metrics:
            mean, std = float(row[f"{m} mean"]), float(row[f"{m} std"])
            low, high = float(row[f"{m} ci_low"]), float(row[f"{m} ci_high"])
            text = num(mean) if math.isnan(std) else f"{num(mean)} ± {num(std)}"
            if not math.isnan(low):
                text += f" [{low:.3f}, {high:.3f}]"
            cells.append(Cell(text, mean, best=best.get(m) == i))
        cells.append(Cell(_leaderboard_n(row, metrics, titles)))
        cells.append(Cell(str(row["trials"])))
        if replicated:
            cells.append(Cell(str(row["replicates of"]) or "-"))
        if has_final:
            cells.append(Cell(str(row["finalists"])))
        rows.append(cells)
    cols = ["configuration", "trials (n)", *(["constraints"] if constrained else []),
            *(f"{titles[m]} ({m})" for m in metrics),
            "test points (n)", "trials"] + (["replicates of"] if replicated else []) + (
            ["finalists"] if has_final else [])  # fmt: skip
    rules = ", then ".join(f"{m} ({o})" for m, o in ranking_rules(data.objective, data.modes))
    texts = _constraint_texts(data)
    first = "groups whose trials meet every constraint, then " if constrained else ""
    sec.blocks += [
        "Test accuracy per configuration (method and its searched parameters), mean ± std "
        "over the trials (seeds) of each group, then [low, high]: the 95 % Wilson interval of "
        "that accuracy on the group's n test points (the seeds share the points, so averaging "
        "them does not narrow it); ★ marks the best mean of each column. Rows are ordered by "
        f"{first}the group means of {rules}, then the first trial id (as study export ranks).",
    ]
    if replicated:
        sec.blocks.append(
            "A configuration with replicates (study replicate: its trial trained again with "
            "new seeds) is scored over its replicates only, n = their number: the search "
            "kept its own trial because that seed scored best, so counting it would flatter "
            "the configuration. The replicates-of column names the trial they re-train."
        )
    if constrained:
        sec.blocks.append(
            f"Constraints of the study: {', '.join(texts) or '(not recorded)'}. A trial that "
            "violates one (its last value of the metric misses the bound; the constraints "
            "column names it) is never the best: study export and study show pass it over."
        )
    sec.blocks.append(Table(cols, rows, "leaderboard-table", ctx.csv(frame, "leaderboard")))
    if "test/aa_acc mean" not in frame:
        sec.blocks.append(
            "No trial ran AutoAttack in its own test evaluation: that column is left out"
            + ("; the finalists below were evaluated with it." if final else ".")
        )
    sec.blocks += final
    return sec


def pareto_section(ctx: Context) -> Section:
    """Clean vs robust accuracy of all trials with the Pareto front labelled."""
    sec = Section("pareto", "Pareto front: clean vs robust accuracy")
    clean, robust = "test/clean_acc", "test/pgd_acc"
    points = analysis.pareto_points(ctx.data.trials, clean, robust)
    if not points:
        clean, robust = "val/clean_acc", "val/pgd_acc"
        points = analysis.pareto_points(ctx.data.trials, clean, robust)
    if not points:
        sec.has_data, sec.empty = False, "no trial reported clean and PGD accuracy."
        return sec
    path, rel = ctx.figure("pareto")
    figures.pareto_figure(points, path, clean, robust)
    frame = pd.DataFrame(
        [{"trial": p.trial_id, "method": p.method, clean: p.clean, robust: p.robust,
          "pareto": p.pareto} for p in points]
    )  # fmt: skip
    front = [p for p in points if p.pareto]
    rows = [
        [Cell(p.trial_id), Cell(p.method), Cell(num(p.clean), p.clean),
         Cell(num(p.robust), p.robust)]
        for p in sorted(front, key=lambda p: p.clean)
    ]  # fmt: skip
    sec.blocks += [
        Image(rel, f"{robust} vs {clean} of {len(points)} trials; Pareto points labelled"),
        "Pareto-optimal trials:",
        Table(["trial", "method", clean, robust], rows, "pareto-table", ctx.csv(frame, "pareto")),
    ]
    return sec


def quality_section(ctx: Context) -> Section | None:
    """A study over training and generation: robust accuracy vs the FID of each trial's
    samples, the Pareto front (max robust, min FID) and its trials' sample grids; None
    (no section) for a study whose trials only train."""
    if not any(r.metric("gen/fid") is not None for r in ctx.data.trials):
        return None
    sec = Section("quality", "Robustness vs sample quality")
    robust = "test/pgd_acc"
    points = analysis.pareto_points(ctx.data.trials, "gen/fid", robust, "min")
    if not points:
        robust = "val/pgd_acc"
        points = analysis.pareto_points(ctx.data.trials, "gen/fid", robust, "min")
    if not points:
        sec.has_data, sec.empty = False, "no trial with an FID reported a PGD accuracy."
        return sec
    path, rel = ctx.figure("robust-vs-fid")
    figures.pareto_figure(points, path, "gen/fid", robust, x_label="FID of its samples (gen/fid)")
    frame = pd.DataFrame(
        [{"trial": p.trial_id, "method": p.method, "gen/fid": p.clean, robust: p.robust,
          "pareto": p.pareto} for p in points]
    )  # fmt: skip
    front = sorted((p for p in points if p.pareto), key=lambda p: p.clean)
    rows = [
        [Cell(p.trial_id), Cell(p.method), Cell(num(p.clean), p.clean),
         Cell(num(p.robust), p.robust)]
        for p in front
    ]  # fmt: skip
    sec.blocks += [
        Image(rel, f"{robust} vs gen/fid of {len(points)} trials; Pareto points labelled"),
        "Pareto-optimal trials (the most robust for their FID), by FID, with their samples:",
        Table(
            ["trial", "method", "gen/fid", robust], rows, "quality-table", ctx.csv(frame, "quality")
        ),  # fmt: skip
    ]
    by_trial = {r.trial_id: r for r in ctx.data.trials}
    for p in front:
        run = by_trial[p.trial_id]
        local = download(ctx.client, run.run_id, GRID_ARTIFACT, ctx.tmp / "quality" / run.run_id)
        if local is None:
            sec.blocks.append(f"trial {p.trial_id}: its run has no {GRID_ARTIFACT}.")
            continue
        path, rel = ctx.figure(f"samples-{p.trial_id}")
        shutil.copyfile(local, path)
        sec.blocks.append(
            Image(
                rel, f"samples of trial {p.trial_id} (FID {num(p.clean)}, {robust} {num(p.robust)})"
            )  # fmt: skip
        )
    return sec


def dynamics_section(ctx: Context) -> Section:
    """Per-epoch validation PGD accuracy, ΔE(x) (validation and training probe) and learning rate.

    One line per method: its best trial (:func:`reports.analysis.best_per_method`).
    The training-probe ΔE (``train_probe/delta_energy``: E(x) − E(x*) on a fixed
    training subset under the training attack, the paper's Fig. 3) gets its panel
    beside the validation one when a trial logged it; a panel without data is left out.
    """
    sec = Section("dynamics", "Training dynamics")
    metric = ctx.data.objective[0]
    best = analysis.best_per_method(ctx.data.trials, ctx.data.objective, ctx.data.modes)
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    records = []
    for method, run in best.items():
        curves[method] = {}
        keys = [k for k, _ in DYNAMICS]
        if "train_probe/delta_energy" in run.metrics:
            keys += PROBE_EXTRA
        for key in keys:
            series = metric_history(ctx.client, run.run_id, key)
            curves[method][key] = series
            records += [
                {"method": method, "trial": run.trial_id, "metric": key, "epoch": s, "value": v}
                for s, v in series
            ]
    if not records:
        sec.has_data, sec.empty = False, "no trial logged per-epoch metrics."
        return sec
    panels = [(k, t) for k, t in DYNAMICS if any(c.get(k) for c in curves.values())]
    labels = {m: f"{m} ({r.trial_id})" for m, r in best.items()}
    path, rel = ctx.figure("dynamics")
    figures.dynamics_figure(curves, labels, path, panels)
    chosen = ", ".join(f"{m}: {r.trial_id}" for m, r in best.items())
    probe = any(k == "train_probe/delta_energy" for k, _ in panels)
    sec.blocks += [
        f"Best trial of each method by {metric} ({chosen})."
        + (
            " Training probe: ΔE(x) = E(x) − E(x*) on a fixed subset of training points, "
            "x* from the training attack, each epoch (as the paper's Fig. 3)."
            if probe
            else ""
        ),
        Image(rel, "; ".join(t for _, t in panels) + " per epoch"),
        f"Per-epoch values: {ctx.csv(pd.DataFrame(records), 'dynamics')}",
    ]
    return sec


def energy_section(ctx: Context) -> Section:
    """Histograms of E(x) and E(x, y), natural vs adversarial, from a run's energies.npz."""
    sec = Section("energy", "Energy distributions")
    metric = ctx.data.objective[0]
    candidates = [r for r in ctx.data.trials if r.status != "FAILED"]
    if ctx.energy_run:
        candidates = [r for r in ctx.data.trials if ctx.energy_run in (r.run_id, r.trial_id)]
        if not candidates:
            raise ReportError(f"--energy-run {ctx.energy_run!r} is not a trial of this study")
    candidates = rank_runs(candidates, ctx.data.objective, ctx.data.modes)
    for run in candidates:
        local = download(ctx.client, run.run_id, ENERGIES_FILE, ctx.tmp / "energies" / run.run_id)
        if local is None:
            continue
        with np.load(local) as z:
            arrays = {k: z[k] for k in z.files}
        path, rel = ctx.figure("energy")
        title = f"trial {run.trial_id} ({run.method}), final test evaluation"
        figures.energy_figure(arrays, title, path)
        stats = []
        for key in ("energy_nat", "energy_adv", "joint_energy_nat", "joint_energy_adv"):
            if key in arrays:
                a = np.asarray(arrays[key], float)
                stats.append({"array": key, "n": a.size, "mean": a.mean(), "std": a.std()})
        frame = pd.DataFrame(stats)
        rows = [
            [Cell(s["array"]), Cell(str(s["n"]), float(s["n"])), Cell(num(s["mean"]), s["mean"]),
             Cell(num(s["std"]), s["std"])]
            for s in stats
        ]  # fmt: skip
        sec.blocks += [
            f"Run {run.run_id} (trial {run.trial_id}, the best by {metric} with energies).",
            Image(rel, "E(x) and E(x, y) of natural vs adversarial test points"),
            Table(["array", "n", "mean", "std"], rows, "energy-table", ctx.csv(frame, "energy")),
        ]
        return sec
    sec.has_data, sec.empty = False, "no trial has an energies.npz artifact."
    return sec


def importance_section(ctx: Context) -> Section:
    """Parameter importances of the objective and a parallel coordinates plot."""
    sec = Section("importance", "What mattered")
    metric, mode = ctx.data.objective[0], ctx.data.modes[0]
    scored = [
        r for r in ctx.data.trials
        if r.status != "FAILED" and r.metric(metric) is not None and r.searched
    ]  # fmt: skip
    if not scored:
        sec.has_data, sec.empty = False, f"no trial with searched parameters reported {metric}."
        return sec
    if len(ctx.data.objective) > 1:
        sec.blocks.append(f"Multi-objective study: importances are for the first, {metric}.")
    imp = analysis.importances(ctx.data.trials, metric, mode)
    if imp.values:
        path, rel = ctx.figure("importance")
        figures.importance_figure(imp.values, imp.evaluator, path)
        frame = pd.DataFrame([{"param": k, "importance": v} for k, v in imp.values.items()]).assign(
            evaluator=imp.evaluator
        )
        rows = [[Cell(k), Cell(num(v, 3), v)] for k, v in imp.values.items()]
        sec.blocks += [
            f"Importances of the searched parameters for {metric} ({imp.evaluator}, Optuna; "
            f"{len(scored)} trials; conditional parameters only where all trials have them).",
            Image(rel, f"parameter importances for {metric}"),
            Table(["parameter", "importance"], rows, "importance-table",
                  ctx.csv(frame, "importance")),
        ]  # fmt: skip
    else:
        sec.blocks.append(f"Importances not computed: {imp.message}.")
    params = [{k: r.params[k] for k in r.searched if k in r.params} for r in scored]
    values = [r.metric(metric) or math.nan for r in scored]
    path, rel = ctx.figure("parallel")
    figures.parallel_figure(params, values, metric, path)
    sec.blocks.append(Image(rel, f"parallel coordinates of the searched parameters ({metric})"))
    return sec


def generation_section(ctx: Context) -> Section:
    """IS/FID/KID per sampler configuration and the best sample grids."""
    sec = Section("generation", "Generation")
    runs = ctx.data.generations
    frame = analysis.generation_table(runs)
    if frame.empty:
        failed = sum(r.status == "FAILED" for r in runs)
        sec.has_data = False
        sec.empty = (
            "no sampling run of this study has scores"
            + (f" ({failed} failed)" if failed else "")
            + " (study generate --from RUN_ID records them)."
        )
        return sec
    keys = [c for c in frame.columns if c not in ("n", "runs") and not c.startswith("gen/")]
    varying = [k for k in keys if frame[k].nunique() > 1] or keys
    metrics = [*analysis.GEN_METRICS, ("gen/is_std", "IS std", ""), ("gen/kid_std", "KID std", "")]
    best_idx = {}
    for m, _, better in analysis.GEN_METRICS:
        if frame[m].notna().any():
            best_idx[m] = int(frame[m].idxmax() if better == "max" else frame[m].idxmin())
    rows = []
    for i, row in frame.iterrows():
        cells = [Cell(str(row[k])) for k in varying]
        cells.append(Cell(str(int(row["n"])), float(row["n"])))
        for m, _, _ in metrics:
            value = float(row[m])
            cells.append(Cell(num(value), None if math.isnan(value) else value,
                              best=best_idx.get(m) == i))  # fmt: skip
        rows.append(cells)
    cols = [*varying, "n", *(f"{t} ({m})" for m, t, _ in metrics)]
    fixed = {k: frame[k].iloc[0] for k in keys if k not in varying}
    sec.blocks += [
        "Scores per sampler configuration (mean over its runs; ★ best: IS max, FID/KID min)."
        + (" Same in all: " + ", ".join(f"{k}={v}" for k, v in fixed.items()) if fixed else ""),
        Table(cols, rows, "generation-table", ctx.csv(frame, "generation")),
    ]
    by_id = {r.run_id: r for r in runs}
    best_runs = sorted(
        (by_id[rid] for rids in frame["runs"] for rid in str(rids).split()),
        key=lambda r: r.metric("gen/fid") or math.inf,
    )[:3]
    for run in best_runs:
        local = download(ctx.client, run.run_id, GRID_ARTIFACT, ctx.tmp / "gen" / run.run_id)
        if local is None:
            continue
        path, rel = ctx.figure(f"samples-{run.run_id[:12]}")
        shutil.copyfile(local, path)
        fid = run.metric("gen/fid")
        sec.blocks.append(Image(rel, f"samples of run {run.run_id} (FID {num(fid)})"))
    return sec


SECTIONS: tuple[Callable[[Context], Section | None], ...] = (
    header_section,
    leaderboard_section,
    pareto_section,
    quality_section,
    dynamics_section,
    energy_section,
    importance_section,
    generation_section,
)


def build_report(
    name: str, tracking_uri: str, out_dir: Path, fmt: str = "html", *, energy_run: str | None = None
) -> Path:
    """Write the report of study ``name`` into ``out_dir``; returns the index file.

    Args:
        name: the study (MLflow experiment) name, or a generation study's name.
        tracking_uri: any MLflow tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``).
        out_dir: output folder (created): ``index.html`` and/or ``index.md``,
            ``figures/*.png``, ``tables/*.csv``, ``configs/<trial>.yaml``.
        fmt: ``html``, ``md`` or ``both`` (the returned index is the HTML one then).
        energy_run: run id or trial id whose energies are histogrammed (default:
            the best trial by the objective that has ``energies.npz``).

    Raises:
        ReportError: unknown study, unknown format or energy run.
    """
    if fmt not in FORMATS:
        raise ReportError(f"format {fmt!r}; allowed: {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="energy-report-") as scratch:
        tmp = Path(scratch)
        data = load_study(name, tracking_uri, tmp)
        ctx = Context(data, out, tmp, energy_run)
        sections = []
        for builder in SECTIONS:
            try:
                if (section := builder(ctx)) is not None:  # None: not this kind of study
                    sections.append(section)
            except ReportError:
                raise
            except Exception as exc:  # noqa: BLE001 - one broken section never hides the rest
                sec = Section(builder.__name__.removesuffix("_section"), builder.__name__)
                sec.has_data, sec.empty = False, f"this section failed: {exc!r}"
                sec.blocks.append(Pre(traceback.format_exc()))
                sections.append(sec)
    title = f"Study report: {name}"
    subtitle = f"Generated {_date(int(dt.datetime.now(dt.UTC).timestamp() * 1000))} from MLflow"
    index = out / (REPORT_MARKDOWN if fmt == "md" else REPORT_INDEX)
    if fmt in ("md", "both"):
        (out / REPORT_MARKDOWN).write_text(render_markdown(title, subtitle, sections))
    if fmt in ("html", "both"):
        (out / REPORT_INDEX).write_text(render_html(title, subtitle, sections))
    return index


#: What ``study report`` logs into the study's run (under :data:`REPORT_ARTIFACT`).
REPORT_FILES = (REPORT_INDEX, REPORT_MARKDOWN, "figures", "tables", "configs")


def experiment_ids(client: Any) -> list[str]:
    """The ids of every experiment in the store (all pages: :func:`all_experiments`)."""
    return [e.experiment_id for e in all_experiments(client)]


def report_run(name: str, tracking_uri: str) -> str | None:
    """The run a study's report belongs to: its parent run (the first one, as
    :func:`reports.data.load_study` reads it), else the generation-study run of that
    name; None when there is neither."""
    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        study = tags_filter({TAG_ROLE: ROLE_STUDY, TAG_STUDY: name})
        parents = search_runs(client, [experiment.experiment_id], study)
        if parents:
            return min(parents, key=lambda r: r.info.start_time or 0).info.run_id
    ids = experiment_ids(client)
    found = search_runs(client, ids, generation_study_filter(name)) if ids else []
    return found[0].info.run_id if found else None


def log_report(name: str, tracking_uri: str, out_dir: Path) -> str | None:
    """Log a built report into the study's run, so the MLflow UI's artifact view shows
    it: ``report/index.html`` (and ``index.md``), ``report/figures/*.png``,
    ``report/tables/*.csv``, ``report/configs/*.yaml``; returns the run id (None: the
    study has no run to hold it). Each write is retried while the store is busy
    (:func:`reports.data.retry`, as ``study/``'s tracker does).

    Args:
        name: the study (as for :func:`build_report`).
        tracking_uri: any MLflow tracking URI.
        out_dir: the folder :func:`build_report` wrote.
    """
    run_id = report_run(name, tracking_uri)
    if run_id is None:
        return None
    client = client_for(tracking_uri)
    out = Path(out_dir)
    for item in REPORT_FILES:
        path, target = out / item, f"{REPORT_ARTIFACT}/{item}"
        if item == REPORT_INDEX and path.is_file():
            # the UI shows an HTML artifact from a blob: address, where the figures'
            # relative addresses lead nowhere: this copy carries them inline
            call = partial(client.log_text, run_id, inline_figures(path), target)
        elif path.is_file():
            call = partial(client.log_artifact, run_id, str(path), REPORT_ARTIFACT)
        elif path.is_dir():
            call = partial(client.log_artifacts, run_id, str(path), target)
        else:
            continue
        retry(call, f"log {target}")
    return run_id


def inline_figures(index: Path) -> str:
    """The HTML of ``index`` with each ``<img src="figures/….png">`` beside it as a
    ``data:`` address (a page that shows its figures wherever it is opened).

    Args:
        index: a report's ``index.html``.
    """
    import base64
    import re

    def data_uri(match: re.Match[str]) -> str:
        png = index.parent / match.group(1)
        if not png.is_file():
            return match.group(0)
        return 'src="data:image/png;base64,' + base64.b64encode(png.read_bytes()).decode() + '"'

    return re.sub(r'src="(figures/[^"]+\.png)"', data_uri, index.read_text())
