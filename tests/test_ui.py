"""The MLflow UI (and optuna-dashboard) as the place where studies are compared.

Unit tests (no Ray): run names, addresses, the saved runs view, the parent's
description, ``study ui``'s port check and its process group. The slow tests run
one small study (smoke space, 3 trials of 1 epoch, one finalist), start
``study ui NAME`` as a user would, load the printed address in headless Chromium
(Debian's ``chromium``) and check the rendered page, follow ``study show``'s
compare link, log ``study report`` into the parent run, and stop ``study ui``
with SIGTERM: nothing may listen on its port afterwards.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

from reports.data import tags_filter
from reports.vocabulary import (
    DESCRIPTION_TAG,
    ENERGIES_FILE,
    ENERGY_HIST,
    EXPERIMENT_KIND_TAG,
    ROLE_STUDY,
    ROLE_TRIAL,
    SHARED_VIEW_PREFIX,
    TAG_ROLE,
    TAG_TRIAL,
    TRAINING_KIND,
    VIEW_KEY,
)
from study import cli
from study.spec import StudySpec
from study.ui import (
    RUN_NAME_MAX,
    compare_url,
    runs_view_url,
    study_description,
    trial_run_name,
    view_state,
)

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
    "autoattack": False,
    "test_subset": 300,
}
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(port: int) -> bool:
    """Whether something accepts a connection on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def processes_with(text: str) -> list[int]:
    """Pids of the processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


# --- run names and addresses (no Ray) ------------------------------------------------------
def test_trial_run_names_say_what_was_tried() -> None:
    weat = {"method": "weat_adv", "beta": 3.3912, "weight_fn": "exp",
            "weight_params.temperature": 3.4321}  # fmt: skip
    assert trial_run_name("weat_adv", weat) == "weat_adv β=3.39 exp(T=3.43)"
    power = {"method": "weat_nat", "beta": 6.0, "weight_fn": "power", "weight_params.power": 1.25,
             "weight_params.scale": 3.14159, "normalize": "mean"}  # fmt: skip
    assert trial_run_name("weat_nat", power) == "weat_nat β=6 power(p=1.25,s=3.14) norm=mean"
    assert trial_run_name("weat_adv", {"beta": 2.0, "weight_fn": "none"}) == (
        "weat_adv β=2 unweighted"
    )
    assert trial_run_name("trades", {"beta": 6.0, "lr_max": 0.0512}) == "trades β=6 lr=0.0512"
    assert trial_run_name("sat", {"attack_steps": 7, "step_size": 0.004}) == "sat K=7 α=0.004"
    assert trial_run_name("weat_adv", {}) == "weat_adv"  # a study of one
    long = trial_run_name("mail_trades", {f"k{i}": 0.123456 for i in range(12)})
    assert len(long) == RUN_NAME_MAX and long.endswith("…")


def test_the_searched_values_of_a_trial_leave_out_fixed_values() -> None:
    from search_spaces import load_space
    from study.ui import searched_values

    space = load_space("smoke")
    # Tune's config of a trial carries the space's fixed values too
    config = {"dataset": "digits", "eps": 0.1, "method": "weat_adv", "beta": 3.0,
              "weight_fn": "exp", "weight_params.temperature": 2.0}  # fmt: skip
    assert list(searched_values(space, config)) == [
        "method", "beta", "weight_fn", "weight_params.temperature"
    ]  # fmt: skip


def test_addresses_carry_the_training_view_and_the_saved_view() -> None:
    url = runs_view_url("http://127.0.0.1:5123/", "7")
    page, _, fragment = url.partition("#")
    assert page == "http://127.0.0.1:5123/"
    route, _, query = fragment.partition("?")
    assert route == "/experiments/7/runs"
    assert urllib.parse.parse_qs(query) == {
        "viewStateShareKey": [VIEW_KEY],
        "workflowType": ["machine_learning"],
    }
    url = compare_url("http://127.0.0.1:5123", "7", ["a1", "b2", "c3"])
    route, _, query = url.partition("#")[2].partition("?")
    assert route == "/compare-runs"
    q = urllib.parse.parse_qs(query)
    assert json.loads(q["runs"][0]) == ["a1", "b2", "c3"]
    assert json.loads(q["experiments"][0]) == ["7"]


def test_the_saved_view_sorts_by_the_objective_and_shows_it_first() -> None:
    state = view_state(["val/pgd_acc", "train/loss"], ["max", "min"], ["beta", "method"],
                       metrics=["val/clean_acc", "val/pgd_acc"], expanded=["p1"])  # fmt: skip
    assert state["orderByKey"] == "metrics.`val/pgd_acc`" and state["orderByAsc"] is False
    assert state["selectedColumns"][:3] == [
        "metrics.`val/pgd_acc`", "metrics.`train/loss`", "metrics.`val/clean_acc`"
    ]  # fmt: skip
    order = state["columnOrder"]
    assert order[:6] == ["attributes.`Run Name`", "runDateAndNestInfo", "metrics.`val/pgd_acc`",
                         "metrics.`train/loss`", "params.`beta`", "params.`method`"]  # fmt: skip
    assert set(state["selectedColumns"]) <= set(order)
    assert state["runsExpanded"] == {"p1": True}
    assert view_state(["gen/fid"], ["min"], [])["orderByAsc"] is True
    tagged = view_state(["val/pgd_acc"], ["max"], [], tags=["energy_study.constraint_ok"])
    assert tagged["selectedColumns"][-1] == "tags.`energy_study.constraint_ok`"
    assert "tags.`energy_study.constraint_ok`" in tagged["columnOrder"]


def test_the_parent_description_says_space_objective_command_and_best_trials() -> None:
    spec = StudySpec(name="desc", space="smoke", base=dict(BASE), trials=3, epochs=1)
    running = study_description(spec, command="study run --space smoke")
    assert "**Objective**: `val/pgd_acc` (max)" in running
    assert "- `beta` ∈ [1, 10]" in running and "(when weight_fn ∈ {exp})" in running
    assert "`study run --space smoke`" in running and "the study is running" in running

    def run(run_id: str, name: str, trial: str, **metrics: float) -> SimpleNamespace:
        return SimpleNamespace(
            info=SimpleNamespace(run_id=run_id, run_name=name),
            data=SimpleNamespace(metrics=metrics, tags={TAG_TRIAL: trial}),
        )

    best = [run("r1", "weat_adv β=3 weat", "t_00001", **{"val/pgd_acc": 0.75, "final/aa_acc": 0.5}),
            run("r2", "weat_nat β=2 weat", "t_00000", **{"val/pgd_acc": 0.5})]  # fmt: skip
    text = study_description(spec, best=best, experiment_id="4", command="study run")
    assert "[weat_adv β=3 weat](#/experiments/4/runs/r1)" in text
    assert "| 1 | [weat_adv β=3 weat](#/experiments/4/runs/r1) | t_00001 | 0.7500 |" in text
    assert "final/aa_acc" in text and "| 0.5000 |" in text
    link = re.search(r"\[compare them\]\((#/compare-runs\?[^)]+)\)", text).group(1)
    runs = urllib.parse.parse_qs(link.partition("?")[2])["runs"][0]
    assert json.loads(runs) == ["r1", "r2"]
    assert len(text) < 5000  # an MLflow tag


# --- study ui: the port and the process group (no MLflow server) ---------------------------
def test_a_port_in_use_is_one_paragraph_naming_the_port(tmp_path, capsys) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        db = tmp_path / "mlflow.db"
        code = cli.main(["ui", "--port", str(port), "--tracking-uri", f"sqlite:///{db}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"port {port}" in err and "--port" in err and "Traceback" not in err
    assert err.count("\n") <= 3 and not db.exists()  # nothing written, nothing started


#: A stand-in server: a process with a child, serving nothing (``TOKEN``: a mark in the
#: child's command line).
FAKE_SERVER = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # TOKEN"])
    print("child", child.pid, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_study_ui_signals_end_the_whole_server_group(tmp_path, sig) -> None:
    port = free_port()
    token = f"fake-server-child-{port}-{sig.name}"
    (tmp_path / "fake.py").write_text(FAKE_SERVER.replace("TOKEN", token))
    driver = (
        "import sys; from study.ui import serve; "
        f"sys.exit(serve([sys.executable, {str(tmp_path / 'fake.py')!r}], {{}}, {port}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    group = None
    try:
        line = proc.stdout.readline()  # the stand-in runs and started its child
        child = int(line.split()[1])
        group = os.getpgid(child)  # the server's group: not the driver's
        assert alive(child) and group != os.getpgid(proc.pid)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
        deadline = time.time() + 10
        while time.time() < deadline and (alive(child) or processes_with(token)):
            time.sleep(0.1)
        assert not alive(child) and not processes_with(token), "the server's child was left"
        assert not processes_with(str(tmp_path / "fake.py")), "the server was left"
    finally:
        for pgid in (proc.pid, group):  # after a failure: nothing stays behind
            try:
                if pgid is not None:
                    os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


# --- a finished study, the UI, the browser -------------------------------------------------
def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(url: str, shot: Path | None = None, budget_ms: int = 15000) -> str:
    """The DOM of ``url`` after ``budget_ms`` of (virtual) time in headless Chromium; with
    ``shot``, a 1600×1000 screenshot too."""
    exe = chromium()
    assert exe is not None
    common = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--virtual-time-budget={budget_ms}", "--window-size=1600,1000"]  # fmt: skip
    if shot is not None:
        proc = subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def visible_text(dom: str) -> str:
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)))


def render_until(url: str, wanted: list[str], shot: Path | None = None) -> tuple[str, str]:
    """Render ``url`` until its text holds every string of ``wanted`` (the UI fetches its
    runs after it loads: a busy machine may need a second look); returns (DOM, text)."""
    for budget in (15000, 30000, 60000):
        dom = render(url, shot, budget)
        text = visible_text(dom)
        if all(w in text for w in wanted):
            break
    return dom, text


@pytest.fixture(scope="module")
def study_store(tmp_path_factory, ray_cluster) -> dict:
    """A finished study 'uis' (smoke space, 3 trials of 1 epoch, 1 finalist) with its Optuna
    study in SQLite."""
    from study.runner import run_study

    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    optuna_db = f"sqlite:///{tmp / 'optuna.db'}"
    spec = StudySpec(name="uis", space="smoke", base=dict(BASE), trials=3, epochs=1, asha=False,
                     finalists=1, final_n=20, seed=3, tracking_uri=uri,
                     storage=str(tmp / "studies"), optuna_storage=optuna_db)  # fmt: skip
    outcome = run_study(spec)
    assert [t.status for t in outcome.trials] == ["FINISHED"] * 3
    return {"uri": uri, "tmp": tmp, "optuna": optuna_db, "spec": spec}


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs(uri: str, role: str) -> list:
    client = _client(uri)
    exp = client.get_experiment_by_name("uis")
    return list(client.search_runs([exp.experiment_id], tags_filter({TAG_ROLE: role})))


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_trial_runs_are_named_described_and_carry_energy_histograms(study_store) -> None:
    from search_spaces import load_space
    from study.ui import searched_values

    uri = study_store["uri"]
    client = _client(uri)
    space = load_space("smoke")
    trials = _runs(uri, ROLE_TRIAL)
    assert len(trials) == 3
    for run in trials:
        params = run.data.params
        config = {k: float(params[k]) if k.startswith(("beta", "weight_params.")) else params[k]
                  for k in searched_values(space, params)}  # fmt: skip
        assert run.info.run_name == trial_run_name(params["method"], config)
        assert run.info.run_name.startswith(params["method"] + " β=")
        assert re.fullmatch(r"[0-9a-f]{8}", run.data.tags[TAG_TRIAL])
        arts = _artifacts(client, run.info.run_id)
        assert {ENERGIES_FILE, ENERGY_HIST} <= arts
        png = client.download_artifacts(run.info.run_id, ENERGY_HIST, str(study_store["tmp"]))
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the experiment opens on MLflow's training view and carries the study's runs view
    exp = client.get_experiment_by_name("uis")
    assert exp.tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    view = json.loads(exp.tags[SHARED_VIEW_PREFIX + VIEW_KEY])
    assert view["orderByKey"] == "metrics.`val/pgd_acc`"
    assert "params.`weight_params.temperature`" in view["selectedColumns"]
    assert "params.`dataset`" not in view["selectedColumns"]  # fixed, not searched
    # the parent's description: space, objective, command, best trials with final/*
    from reports.ranking import rank_runs

    (parent,) = _runs(uri, ROLE_STUDY)
    text = parent.data.tags[DESCRIPTION_TAG]
    assert "**Objective**: `val/pgd_acc` (max)" in text and "**Command**:" in text
    assert "final/aa_acc" in text and "[compare them](#/compare-runs?" in text
    rows = re.findall(r"^\| (\d) \| \[(.+?)\]\(#/experiments/(\d+)/runs/(\w+)\)", text, re.M)
    ranked = rank_runs(trials, ["val/pgd_acc"], ["max"])  # study show's order
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        (str(i), r.info.run_name, exp.experiment_id, r.info.run_id)
        for i, r in enumerate(ranked, start=1)
    ]


def test_optuna_dashboard_gets_the_study_vocabulary(study_store) -> None:
    import optuna

    study = optuna.load_study(study_name="uis", storage=study_store["optuna"])
    assert study.metric_names == ["val/pgd_acc"]
    attrs = study.user_attrs
    assert attrs["objective"] == ["val/pgd_acc (max)"]
    assert attrs["searched_params"]["beta"] == "∈ [1, 10]"
    assert set(attrs["searched_params"]) == {"method", "beta", "weight_fn",
                                             "weight_params.temperature"}  # fmt: skip
    assert attrs["mlflow_experiment"] == "uis" and attrs["space"].startswith("smoke")


def test_study_report_is_logged_into_the_parent_run(study_store, tmp_path, capsys) -> None:
    uri = study_store["uri"]
    out = tmp_path / "report"
    assert cli.main(["report", "uis", "--tracking-uri", uri, "-o", str(out)]) == 0
    (parent,) = _runs(uri, ROLE_STUDY)
    assert f"logged into MLflow run {parent.info.run_id}" in capsys.readouterr().out
    client = _client(uri)
    arts = _artifacts(client, parent.info.run_id)
    assert "report/index.html" in arts
    figures = {p for p in arts if p.startswith("report/figures/")}
    assert figures == {f"report/figures/{p.name}" for p in (out / "figures").glob("*.png")}
    assert figures  # the report has figures
    logged = Path(client.download_artifacts(parent.info.run_id, "report/index.html",
                                            str(tmp_path / "dl"))).read_text()  # fmt: skip
    # the logged page carries its figures (the UI shows it from a blob: address)
    assert 'src="figures/' not in logged and logged.count('src="data:image/png;base64,') == len(
        re.findall(r'src="figures/', (out / "index.html").read_text())
    )


@pytest.mark.slow
def test_study_ui_shows_the_study_compares_and_stops_on_sigterm(study_store, tmp_path) -> None:
    if chromium() is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    uri = study_store["uri"]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "study", "ui", "uis", "--port", str(port), "--tracking-uri", uri],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready:"):
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "study ui did not get ready:\n" + "".join(lines)
        base = f"http://127.0.0.1:{port}"
        (view,) = [ln.strip() for ln in lines if ln.strip().startswith(f"{base}/#/experiments/")
                   and "/runs?" in ln]  # fmt: skip

        # the runs view: every trial by its name, the objective column, the training view
        trials = _runs(uri, ROLE_TRIAL)
        names = [r.info.run_name for r in trials]
        shot = tmp_path / "runs.png"
        dom, text = render_until(view, [*names, "val/pgd_acc"], shot)
        for name in names:
            assert name in text, (name, text[:3000])
        assert "val/pgd_acc" in text and "Sort: val/pgd_acc" in text
        assert 'col-id="metrics.`val/pgd_acc`"' in dom  # a rendered column of the table
        assert "Model training" in text and "Detect Issues" not in text
        from PIL import Image

        with Image.open(shot) as img:
            assert img.size == (1600, 1000)
            assert len(img.convert("L").getcolors(256 * 256) or []) > 10  # not blank

        # study show's compare link: MLflow's compare page with the top trials
        show = subprocess.run(
            [sys.executable, "-m", "study", "show", "uis", "--tracking-uri", uri, "--ui", base],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert show.returncode == 0, show.stderr
        (link,) = [ln.strip() for ln in show.stdout.splitlines()
                   if ln.strip().startswith(f"{base}/#/compare-runs?")]  # fmt: skip
        ids = json.loads(urllib.parse.parse_qs(link.partition("?")[2])["runs"][0])
        assert len(ids) == 3
        by_id = {r.info.run_id: r for r in trials}
        top = [by_id[i].info.run_name for i in ids]
        dom, text = render_until(link, ["Comparing 3 Runs", *top], tmp_path / "compare.png")
        assert "Comparing 3 Runs" in text and "Parallel Coordinates Plot" in text
        for name in top:
            assert name in text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what the test is about: no killpg here
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            code = None
        server = processes_with(f"--port {port} ")
        for pid in server:  # after a failure: nothing stays behind
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except OSError:
                pass
    assert code == 0, "".join(lines)
    deadline = time.time() + 10
    while time.time() < deadline and answers(port):
        time.sleep(0.2)
    assert not answers(port), f"something still listens on port {port} after SIGTERM"
    assert not server, "a server process survived study ui"
