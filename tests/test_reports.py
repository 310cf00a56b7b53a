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
from reports.data import ReportError

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
    "aa_n": 20,
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
    """A real study ('rep', 6 trials, 2 epochs), a failed one ('bad') and 2 sampling runs."""
    from study import cli
    from study.runner import run_study
    from study.spec import StudySpec

    tmp = tmp_path_factory.mktemp("reports")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    space = tmp / "repeat.yaml"
    space.write_text(SPACE)
    common = {"epochs": 2, "asha": False, "tracking_uri": uri, "storage": str(tmp / "studies")}
    outcome = run_study(
        StudySpec(name="rep", space=str(space), base=dict(BASE), trials=6, **common)
    )
    assert all(t.status == "FINISHED" for t in outcome.trials)
    bad_base = {**BASE, "aa_n": 0, "lr_max": 1.0e6, "lr_schedule": "constant"}
    bad = run_study(StudySpec(name="bad", space="smoke", base=bad_base, trials=1, **common))
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
    flt = "tags.`energy_study.role` = 'trial'"
    if trial_id:
        flt += f" and tags.`energy_study.trial_id` = '{trial_id}'"
    return list(client.search_runs([exp.experiment_id], filter_string=flt))


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
    best = {}
    for key, runs in groups.items():
        label = f"{key[0]} (beta={float(key[1]):.4g})"
        (row,) = [r for r in table if r[0][0] == label]
        assert row[1][1] == len(runs)
        for col, metric in ((2, "test/clean_acc"), (3, "test/pgd_acc"), (4, "test/aa_acc")):
            values = [r.data.metrics[metric] for r in runs]
            mean = float(np.mean(values))
            assert row[col][1] == pytest.approx(mean, abs=1e-12), (label, metric)
            if len(values) > 1:
                std = statistics.stdev(values)
                assert f"± {std:.4f}" in row[col][0]
            (c,) = csv[csv["group"] == label][f"{metric} mean"]
            assert c == pytest.approx(mean, abs=1e-12)
            best.setdefault(col, []).append(mean)
    for col, means in best.items():  # the best mean of each column is marked
        marked = [r[col][1] for r in table if r[col][2]]
        assert marked == [pytest.approx(max(means), abs=1e-12)], (col, marked)


def test_trials_pareto_energy_and_generation_match_mlflow(store, report) -> None:
    client = _client(store["uri"])
    page = parse(report)
    runs = {r.data.tags["energy_study.trial_id"]: r for r in _trial_runs(client, "rep")}
    table = rows(page, "trials")
    assert {r[0][0] for r in table} == set(runs)
    for row in table:
        run = runs[row[0][0]]
        assert row[1][0] == "FINISHED"
        assert row[4][1] == pytest.approx(run.data.metrics["val/pgd_acc"])
        assert row[6][1] == pytest.approx(run.data.metrics["test/pgd_acc"])
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
    npz = Path(client.download_artifacts(run_id, "energies.npz", str(store["tmp"] / "e")))
    with np.load(npz) as z:
        expected = {k: float(np.mean(z[k].astype(np.float64))) for k in z.files if "energy" in k}
    got = {r[0][0]: r[2][1] for r in rows(page, "energy-table")}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-9)

    # generation: one row per momentum, scores as logged
    exp = client.get_experiment_by_name("rep")
    gen = client.search_runs([exp.experiment_id], "tags.`energy_study.role` = 'generation'")
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
    assert trial[1][0] == "FAILED" and "diverged" in trial[8][0].lower()
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
