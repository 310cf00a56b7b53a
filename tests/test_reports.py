"""Reports: a small real study in a temporary MLflow store, reported, checked against MLflow.

One module-scoped fixture runs (once) a digits study whose configurations repeat
over two seeds, a study whose only trial diverges, and two sampling runs; every
number the report shows is recomputed here from the MLflow store directly.
The HTML is opened in headless Chromium (Debian's ``chromium``) for a full-page
screenshot; console messages, missing images and empty figure sections fail.
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reports.build import build_report
from reports.cli import add_parser, main
from reports.data import ReportError, tags_filter
from reports.vocabulary import (
    ENERGIES_FILE,
    PARENT_TAG,
    ROLE_GENERATION,
    ROLE_STUDY,
    ROLE_TRIAL,
    SPEC_ARTIFACT,
    TAG_FINALIST,
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_STUDY,
    TAG_TRIAL,
)
from trainables.stats import wilson_interval

PLUGIN = str(Path(__file__).with_name("standin_extractor.py"))
STANDIN = "energy-study-standin"
#: A digits config that trains a trial in a few seconds on one core (as in test_study).
BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "eps": 0.1,
    "step_size": 0.025,
    "attack_steps": 3,
    "val_attack_steps": 5,
    "eval_steps": 5,
    "eval_step_size": 0.025,
    "batch_size": 64,
    "aa_version": "custom",
    "aa_attacks": ["apgd-ce"],
    "test_subset": 200,
}
#: Two methods × two seeds: groups of repeated configurations (mean ± std over seeds).
SPACE = """\
params:
  method: {type: categorical, choices: [weat_adv, trades]}
  beta: {type: categorical, choices: [6.0]}
  seed: {type: categorical, choices: [0, 1]}
"""
SEARCHED = ("beta",)  # with the method, the group key; the seed is what repeats


@pytest.fixture(scope="module")
def store(tmp_path_factory, ray_cluster):
    """A real study ('rep', 6 trials, 2 epochs, 2 finalists), a failed one ('bad') and 2 sampling
    runs."""
    from study import cli
    from study.runner import run_study
    from study.spec import StudySpec

    tmp = tmp_path_factory.mktemp("reports")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    space = tmp / "repeat.yaml"
    space.write_text(SPACE)
    common = {"epochs": 2, "asha": False, "tracking_uri": uri, "storage": str(tmp / "studies")}
    outcome = run_study(
        StudySpec(name="rep", space=str(space), base=dict(BASE), trials=6, finalists=2,
                  final_n=60, **common)
    )  # fmt: skip
    assert all(t.status == "FINISHED" for t in outcome.trials)
    bad_base = {**BASE, "lr_max": 1.0e6, "lr_schedule": "constant"}
    bad = run_study(
        StudySpec(name="bad", space="smoke", base=bad_base, trials=1, finalists=0, **common)
    )
    assert [t.status for t in bad.trials] == ["FAILED"]
    best = outcome.ranked()[0]
    client = _client(uri)
    (run,) = _trial_runs(client, "rep", best.trial_id)
    for i, momentum in enumerate((0.8, 0.0)):
        code = cli.main(["generate", "--from", run.info.run_id, "--samples", "40", "--set",
                         "steps=10", "--set", f"momentum={momentum}", "--tracking-uri", uri,
                         "--storage", str(tmp / "gen"), "--name", f"gen{i}",
                         "--extractor-plugin", PLUGIN, "--feature-extractor", STANDIN])  # fmt: skip
        assert code == 0
    return {"uri": uri, "tmp": tmp}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _trial_runs(client, study: str, trial_id: str | None = None) -> list:
    exp = client.get_experiment_by_name(study)
    tags = {TAG_ROLE: ROLE_TRIAL, **({TAG_TRIAL: trial_id} if trial_id else {})}
    return list(client.search_runs([exp.experiment_id], filter_string=tags_filter(tags)))


@pytest.fixture(scope="module")
def report(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-rep")
    index = build_report("rep", store["uri"], out, fmt="both")
    assert index == out / "index.html" and (out / "index.md").is_file()
    return out


# --- reading the HTML back ---------------------------------------------------------------
class Page(HTMLParser):
    """Tables (cells with their data-value), images and sections of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, float | None, bool]]]] = {}
        self.sections: dict[str, dict] = {}
        self._table: str | None = None
        self._cell: list | None = None
        self._section: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "section":
            self._section = a["id"]
            self.sections[a["id"]] = {"has_data": a["data-has-data"] == "true", "imgs": [],
                                      "tables": [], "text": ""}  # fmt: skip
        elif tag == "table":
            self._table = a.get("id", "?")
            self.tables[self._table] = []
            if self._section:
                self.sections[self._section]["tables"].append(self._table)
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            value = float(a["data-value"]) if "data-value" in a else None
            self._cell = ["", value, "best" in (a.get("class") or "")]
        elif tag == "img" and self._section:
            self.sections[self._section]["imgs"].append(a["src"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table:
            self.tables[self._table][-1].append(tuple(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[0] += data
        if self._section:
            self.sections[self._section]["text"] += data


def parse(folder: Path) -> Page:
    page = Page()
    page.feed((folder / "index.html").read_text())
    return page


def rows(page: Page, table: str) -> list[list[tuple[str, float | None, bool]]]:
    return [r for r in page.tables[table] if r]  # the header row has no <td>


def cell_text(cell: tuple[str, float | None, bool]) -> str:
    """A cell's text without the ★ that marks the best of a column."""
    return cell[0].removesuffix(" ★")


def check_images_and_sections(folder: Path, page: Page) -> None:
    """Every <img> is a PNG beside the page that decodes; every section with data shows some."""
    for sid, sec in page.sections.items():
        for src in sec["imgs"]:
            assert not src.startswith(("http:", "https:")), src  # no network
            path = folder / src
            assert path.is_file(), f"section {sid}: missing image {src}"
            with Image.open(path) as img:
                img.verify()
        if sec["has_data"]:
            assert sec["imgs"] or sec["tables"], f"section {sid} has data but shows nothing"
        else:
            assert "No data" in sec["text"], sid
        assert "this section failed" not in sec["text"], sec["text"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(folder: Path) -> None:
    """Open index.html in headless Chromium, take a full-page screenshot, fail on console output."""
    exe = chromium()
    if exe is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    shot = folder / "screenshot.png"
    proc = subprocess.run(
        [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--allow-file-access-from-files", "--enable-logging=stderr", "--v=0",
         "--window-size=1280,8000", f"--screenshot={shot}",
         (folder / "index.html").resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    assert not console, console
    with Image.open(shot) as img:
        assert img.size == (1280, 8000)
        # the page drew something: not a blank screenshot
        assert len(img.convert("L").getcolors(256 * 256) or []) > 10


# --- tests --------------------------------------------------------------------------------
TEST_COLUMNS = ("test/clean_acc", "test/pgd_acc", "test/aa_acc")


def _bracket(p: float, n: int) -> str:
    lo, hi = wilson_interval(p, n)
    return f"[{lo:.3f}, {hi:.3f}]"


def _id_order(trial_id: str) -> tuple[int, int, str]:
    """The ranking's last rule: Tune's ``_00003`` index as a number, else the id's text."""
    found = re.fullmatch(r".*_(\d{5})", trial_id)
    return (0, int(found.group(1)), trial_id) if found else (1, 0, trial_id)


def test_leaderboard_matches_mlflow(store, report) -> None:
    client = _client(store["uri"])
    groups: dict[tuple, list] = {}
    for run in _trial_runs(client, "rep"):
        key = (run.data.params["method"], *(run.data.params[p] for p in SEARCHED))
        groups.setdefault(key, []).append(run)
    assert len(groups) >= 2 and any(len(g) > 1 for g in groups.values())  # seeds repeat
    table = rows(parse(report), "leaderboard-table")
    assert len(table) == len(groups)
    csv = pd.read_csv(report / "tables" / "leaderboard.csv")
    every = [r for g in groups.values() for r in g]
    metrics = [m for m in TEST_COLUMNS if any(m in r.data.metrics for r in every)]
    assert metrics[:2] == ["test/clean_acc", "test/pgd_acc"]
    assert all(r.data.metrics["test/n"] > 0 for r in every)  # every trial logs its n
    best = {}
    order = []
    for key, runs in groups.items():
        label = f"{key[0]} (beta={float(key[1]):.4g})"
        (row,) = [r for r in table if r[0][0] == label]
        assert row[1][1] == len(runs)
        n = int(min(r.data.metrics["test/n"] for r in runs))
        assert row[2 + len(metrics)][0] == str(n)  # the test points column
        for col, metric in enumerate(metrics, start=2):
            values = [r.data.metrics[metric] for r in runs]
            mean = float(np.mean(values))
            assert row[col][1] == pytest.approx(mean, abs=1e-12), (label, metric)
            if len(values) > 1:
                std = statistics.stdev(values)
                assert f"± {std:.4f}" in row[col][0]
            # the 95 % Wilson interval of the mean on the group's n test points
            assert cell_text(row[col]).endswith(_bracket(mean, n)), (label, metric, row[col][0])
            (c,) = csv[csv["group"] == label][f"{metric} mean"]
            assert c == pytest.approx(mean, abs=1e-12)
            (c,) = csv[csv["group"] == label][f"{metric} n"]
            assert c == n
            best.setdefault(col, []).append(mean)
        # the ranking of the groups: objective mean, then val/clean_acc mean, then trial id
        pgd = float(np.mean([r.data.metrics["val/pgd_acc"] for r in runs]))
        clean = float(np.mean([r.data.metrics["val/clean_acc"] for r in runs]))
        first = min(_id_order(r.data.tags[TAG_TRIAL]) for r in runs)
        order.append(((-pgd, -clean, first), label))
    assert [r[0][0] for r in table] == [label for _, label in sorted(order)]
    for col, means in best.items():  # the best mean of each column is marked
        marked = [r[col][1] for r in table if r[col][2]]
        assert marked == [pytest.approx(max(means), abs=1e-12)], (col, marked)


def test_finalists_table_matches_mlflow(store, report) -> None:
    client = _client(store["uri"])
    finals = sorted(
        (int(r.data.tags[TAG_FINALIST]), r)
        for r in _trial_runs(client, "rep")
        if TAG_FINALIST in r.data.tags
    )
    assert [rank for rank, _ in finals] == [1, 2]
    page = parse(report)
    table = rows(page, "finalists-table")
    assert [r[0][0] for r in table] == ["#1", "#2"]
    for row, (_, run) in zip(table, finals):
        m = run.data.metrics
        assert row[1][0] == run.data.tags[TAG_TRIAL]
        assert row[3][1] == m["final/n"] == 60  # every attack on the same 60 points
        got = {c: cell for c, cell in zip(("clean", "pgd", "aa", "robust"), row[4:])}
        for name, cell in got.items():
            key = f"final/{name}_acc"
            assert cell[1] == pytest.approx(m[key])
            lo, hi = m[f"{key}_ci_low"], m[f"{key}_ci_high"]
            assert cell_text(cell).endswith(f"[{lo:.3f}, {hi:.3f}]"), (key, cell[0])
        assert m["final/robust_acc"] <= min(m["final/pgd_acc"], m["final/aa_acc"])
    # the leaderboard names the finalists of each group
    board = rows(page, "leaderboard-table")
    named = " ".join(r[-1][0] for r in board)
    for rank, run in finals:
        assert f"#{rank} {run.data.tags[TAG_TRIAL]}" in named


def test_trials_pareto_energy_and_generation_match_mlflow(store, report) -> None:
    client = _client(store["uri"])
    page = parse(report)
    runs = {r.data.tags[TAG_TRIAL]: r for r in _trial_runs(client, "rep")}
    table = rows(page, "trials")
    assert {r[0][0] for r in table} == set(runs)
    for row in table:
        run = runs[row[0][0]]
        m = run.data.metrics
        assert row[1][0] == "FINISHED"
        assert row[4][1] == pytest.approx(m["val/pgd_acc"])
        assert cell_text(row[4]).endswith(_bracket(m["val/pgd_acc"], int(m["val/n"])))
        assert row[6][1] == pytest.approx(m["test/pgd_acc"])
        assert cell_text(row[6]).endswith(_bracket(m["test/pgd_acc"], int(m["test/n"])))
        assert row[8][0] == f"{int(m['val/n'])} / {int(m['test/n'])}"
        if TAG_FINALIST in run.data.tags:
            assert f"finalist #{run.data.tags[TAG_FINALIST]}" in row[9][0]
        config = report / row[-1][0].split("--config ")[1]
        assert config.is_file() and f"seed: {run.data.params['seed']}" in config.read_text()

    # Pareto front recomputed by brute force
    pts = {t: (r.data.metrics["test/clean_acc"], r.data.metrics["test/pgd_acc"])
           for t, r in runs.items()}  # fmt: skip
    front = {
        t for t, (c, p) in pts.items()
        if not any(c2 >= c and p2 >= p and (c2, p2) != (c, p) for c2, p2 in pts.values())
    }  # fmt: skip
    assert {r[0][0] for r in rows(page, "pareto-table")} == front

    # energies: the chosen run's npz, downloaded directly
    text = page.sections["energy"]["text"]
    run_id = text.split("Run ")[1].split()[0]
    npz = Path(client.download_artifacts(run_id, ENERGIES_FILE, str(store["tmp"] / "e")))
    with np.load(npz) as z:
        expected = {k: float(np.mean(z[k].astype(np.float64))) for k in z.files if "energy" in k}
    got = {r[0][0]: r[2][1] for r in rows(page, "energy-table")}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9)

    # generation: one row per momentum, scores as logged
    exp = client.get_experiment_by_name("rep")
    gen = client.search_runs([exp.experiment_id], tags_filter({TAG_ROLE: ROLE_GENERATION}))
    assert len(gen) == 2
    by_momentum = {r.data.params["momentum"]: r for r in gen}
    for row in rows(page, "generation-table"):
        run = by_momentum[row[0][0]]
        assert row[1][1] == 1
        assert row[2][1] == pytest.approx(run.data.metrics["gen/is"])
        assert row[3][1] == pytest.approx(run.data.metrics["gen/fid"])
        assert row[4][1] == pytest.approx(run.data.metrics["gen/kid"])
    best_fid = min(gen, key=lambda r: r.data.metrics["gen/fid"])
    assert f"samples-{best_fid.info.run_id[:12]}.png" in " ".join(
        page.sections["generation"]["imgs"]
    )

    # importances: the method and the seed were searched (beta took one value only)
    imp = pd.read_csv(report / "tables" / "importance.csv")
    assert set(imp["param"]) <= {"method", "seed", "beta"} and len(imp) >= 1
    assert math.isclose(imp["importance"].sum(), 1.0, rel_tol=1e-6) or imp["importance"].sum() == 0


def test_dynamics_show_the_training_probe(store, report) -> None:
    client = _client(store["uri"])
    page = parse(report)
    dyn = page.sections["dynamics"]["text"]
    assert "training probe" in dyn and "ΔE(x) = E(x) − E(x*) (validation)" in dyn
    frame = pd.read_csv(report / "tables" / "dynamics.csv")
    runs = _trial_runs(client, "rep")
    for method in {r.data.params["method"] for r in runs}:
        # the best trial of the method: val/pgd_acc, then val/clean_acc, then trial id
        mine = [r for r in runs if r.data.params["method"] == method]
        best = min(
            mine,
            key=lambda r: (
                -r.data.metrics["val/pgd_acc"],
                -r.data.metrics["val/clean_acc"],
                _id_order(r.data.tags[TAG_TRIAL]),
            ),
        )
        trial = best.data.tags[TAG_TRIAL]
        assert f"{method}: {trial}" in dyn
        for key in ("train_probe/delta_energy", "val/delta_energy", "train_probe/energy_adv"):
            logged = sorted(
                (m.step, m.value) for m in client.get_metric_history(best.info.run_id, key)
            )
            assert [s for s, _ in logged] == [1, 2], key
            got = frame[(frame["trial"] == trial) & (frame["metric"] == key)]
            assert list(got["epoch"]) == [s for s, _ in logged], key
            assert list(got["value"]) == pytest.approx([v for _, v in logged]), key


# --- a store written by hand (no Ray): finalists, an old trial, ties ------------------------
def _log(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict:
    """Study 'syn': 4 trials logged directly, as study/ writes them (and as an old store did).

    * t_00000, t_00001: weat_adv beta=1, seeds 0/1, tied on val/pgd_acc (13/16) and
      val/clean_acc; t_00000 is finalist #2 and has the training probe.
    * t_00002: trades beta=2, val/pgd_acc 13/16 too but a higher val/clean_acc: ranks
      first; finalist #1; logs interval bounds (no per-trial n needed to show them).
    * t_00003: trades beta=3, an old store's trial: test/aa_n only, no test/n, no bounds.
    """
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("written")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("syn", artifact_location=(tmp / "art").as_uri())
    tag = {TAG_STUDY: "syn"}
    parent = client.create_run(exp, run_name="syn", tags={**tag, TAG_ROLE: ROLE_STUDY})
    client.log_text(parent.info.run_id, "name: syn\nmetrics: [val/pgd_acc]\nmodes: [max]\n",
                    SPEC_ARTIFACT)  # fmt: skip
    final = {"final/clean_acc": 0.9, "final/pgd_acc": 0.6, "final/aa_acc": 0.55,
             "final/robust_acc": 0.5, "final/n": 400.0}  # fmt: skip
    trials = [
        ("t_00000", "weat_adv", "1.0", "0", 0.90, {"test/n": 200.0}, "2"),
        ("t_00001", "weat_adv", "1.0", "1", 0.90, {"test/n": 200.0}, None),
        ("t_00002", "trades", "2.0", "0", 0.95, {}, "1"),
        ("t_00003", "trades", "3.0", "0", 0.99, {"test/aa_n": 20.0}, None),
    ]
    for i, (trial, method, beta, seed, clean, extra, finalist) in enumerate(trials):
        tags = {**tag, TAG_ROLE: ROLE_TRIAL, TAG_TRIAL: trial, TAG_SEARCHED: "method,beta,seed",
                PARENT_TAG: parent.info.run_id}  # fmt: skip
        if finalist:
            tags[TAG_FINALIST] = finalist
        run_id = client.create_run(exp, run_name=trial, tags=tags, start_time=1000 + i).info.run_id
        for k, v in {"method": method, "beta": beta, "seed": seed}.items():
            client.log_param(run_id, k, v)
        pgd = 0.5 if trial == "t_00003" else 0.8125
        for epoch in (1, 2, 3):
            per_epoch = {"val/pgd_acc": pgd * epoch / 3, "val/clean_acc": clean,
                         "val/delta_energy": 0.1 * epoch, "lr": 0.1 / epoch}  # fmt: skip
            _log(client, run_id, per_epoch, epoch)
            if trial == "t_00000":
                _log(client, run_id, {"train_probe/delta_energy": 0.3 * epoch,
                                      "train_probe/energy_nat": -epoch}, epoch)  # fmt: skip
        test = {"test/clean_acc": clean - 0.1, "test/pgd_acc": pgd - 0.2, "test/aa_acc": pgd - 0.3}
        if trial != "t_00003":
            _log(client, run_id, {"val/n": 16.0}, 3)
        if trial == "t_00002":
            test.update({f"{k}_ci_low": 0.111 for k in list(test)} |
                        {f"{k}_ci_high": 0.999 for k in list(test)})  # fmt: skip
        _log(client, run_id, {**test, **extra}, 3)
        if finalist:
            _log(client, run_id, final, 0)
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    out = tmp / "report"
    build_report("syn", uri, out, fmt="html")
    return {"uri": uri, "out": out}


def test_written_store_ranks_shows_intervals_finalists_and_the_probe(written) -> None:
    out = written["out"]
    page = parse(out)
    board = rows(page, "leaderboard-table")
    # ties on val/pgd_acc: val/clean_acc decides (trades beta=2 first), t_00003 is last
    assert [r[0][0] for r in board] == ["trades (beta=2)", "weat_adv (beta=1)", "trades (beta=3)"]
    # one trial with logged bounds: those; a group: Wilson of the mean on n = 200; an old
    # trial: only AutoAttack has an n (test/aa_n = 20)
    assert cell_text(board[0][2]) == "0.8500 [0.111, 0.999]"
    assert cell_text(board[1][2]) == "0.8000 ± 0.0000 " + _bracket(0.8, 200)
    assert cell_text(board[1][5]) == "200"
    assert cell_text(board[2][2]) == "0.8900" and cell_text(board[2][3]) == "0.3000"
    assert cell_text(board[2][4]) == "0.2000 " + _bracket(0.2, 20)
    assert cell_text(board[2][5]) == "AutoAttack 20"
    assert board[0][-1][0] == "#1 t_00002" and board[1][-1][0] == "#2 t_00000"
    finals = rows(page, "finalists-table")
    assert [(r[0][0], r[1][0]) for r in finals] == [("#1", "t_00002"), ("#2", "t_00000")]
    assert finals[0][3][1] == 400
    assert cell_text(finals[0][7]) == "0.5000 " + _bracket(
        0.5, 400
    )  # robust: computed from final/n
    trials = {r[0][0]: r for r in rows(page, "trials")}
    assert cell_text(trials["t_00000"][4]) == "0.8125 " + _bracket(0.8125, 16)
    assert (
        cell_text(trials["t_00000"][8]) == "16 / 200" and cell_text(trials["t_00003"][8]) == "- / -"
    )
    assert "finalist #1" in cell_text(trials["t_00002"][9])
    # dynamics: the weat_adv line is t_00000 (tied with t_00001: the lower number), whose
    # training probe gets its panel; the CSV holds the probe's values
    dyn = page.sections["dynamics"]["text"]
    assert "weat_adv: t_00000" in dyn and "trades: t_00002" in dyn
    assert "ΔE(x) = E(x) − E(x*) (training probe)" in dyn
    frame = pd.read_csv(out / "tables" / "dynamics.csv")
    probe = frame[frame["metric"] == "train_probe/delta_energy"]
    assert list(probe["trial"]) == ["t_00000"] * 3
    assert list(probe["value"]) == pytest.approx([0.3, 0.6, 0.9])
    assert list(frame[frame["metric"] == "train_probe/energy_nat"]["value"]) == [-1, -2, -3]
    check_images_and_sections(out, page)


def test_report_renders_in_chromium(report) -> None:
    page = parse(report)
    expected = ["header", "leaderboard", "pareto", "dynamics", "energy", "importance",
                "generation"]  # fmt: skip
    assert list(page.sections) == expected
    assert all(page.sections[s]["has_data"] for s in expected)
    for sid in ("pareto", "dynamics", "energy", "importance", "generation"):
        assert page.sections[sid]["imgs"], sid
    check_images_and_sections(report, page)
    md = (report / "index.md").read_text()
    assert "## Leaderboard" in md and "figures/pareto.png" in md
    screenshot(report)


def test_failed_study_without_generation_renders(store, tmp_path) -> None:
    out = tmp_path / "bad"
    assert main(["bad", "--tracking-uri", store["uri"], "-o", str(out)]) == 0
    page = parse(out)
    (trial,) = rows(page, "trials")
    assert trial[1][0] == "FAILED" and "diverged" in trial[9][0].lower()
    for sid in ("leaderboard", "pareto", "dynamics", "energy", "importance", "generation"):
        assert not page.sections[sid]["has_data"], sid
    check_images_and_sections(out, page)
    screenshot(out)


def test_command_line(store, tmp_path, capsys) -> None:
    assert main(["nope", "--tracking-uri", store["uri"], "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no study 'nope'" in err and "rep" in err
    with pytest.raises(ReportError, match="format"):
        build_report("rep", store["uri"], tmp_path, fmt="pdf")
    parser = argparse.ArgumentParser(prog="study")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", "rep", "-o", str(tmp_path / "md"), "--format", "md",
                              "--tracking-uri", store["uri"]])  # fmt: skip
    assert args.func(args) == 0
    assert (tmp_path / "md" / "index.md").is_file()
    assert not (tmp_path / "md" / "index.html").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "reports", "bad", "--tracking-uri", store["uri"], "-o",
         str(tmp_path / "cli"), "--format", "html"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cli" / "index.html").is_file()
