"""Studies end to end: real Ray (one local cluster per session), real Optuna, real MLflow (SQLite).

Every number checked here is read back from the MLflow store the study wrote,
and compared with what Tune and the trial outputs say.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from study import cli
from study.export import best_runs, export_best, trial_runs
from study.runner import pareto_front, run_study
from study.spec import StudySpec
from study.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL, MlflowTracker
from trainables.config import TrainConfig

pytestmark = pytest.mark.usefixtures("ray_cluster")

#: A base config that trains a digits trial in a few seconds on one core.
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


def make_spec(tmp_path: Path, name: str, **kw) -> StudySpec:
    values = {
        "name": name,
        "space": "smoke",
        "base": dict(BASE),
        "trials": 2,
        "epochs": 2,
        "asha": False,
        "finalists": 0,  # the second stage has its own tests (tests/test_finals.py)
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "storage": str(tmp_path / "studies"),
    }
    values.update(kw)
    return StudySpec(**values)


def child_runs(spec: StudySpec) -> list:
    return trial_runs(MlflowTracker(spec.tracking_uri, spec.name), spec.name)


def history(spec: StudySpec, run_id: str, key: str) -> list[tuple[int, float]]:
    client = MlflowTracker(spec.tracking_uri, spec.name).client
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def artifacts(spec: StudySpec, run_id: str, path: str = "") -> set[str]:
    client = MlflowTracker(spec.tracking_uri, spec.name).client
    out = set()
    for item in client.list_artifacts(run_id, path or None):
        if item.is_dir:
            out |= artifacts(spec, run_id, item.path)
        else:
            out.add(item.path)
    return out


def test_study_records_every_trial_in_mlflow_and_exports_a_trainable_config(tmp_path) -> None:
    spec = make_spec(tmp_path, "smoke-a", trials=4, max_concurrent=2)
    outcome = run_study(spec)

    assert [t.status for t in outcome.trials] == ["FINISHED"] * 4
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    parents = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: "study"})
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["git_commit"]
    assert "version.torch" in parent.data.tags and "hardware.cpu" in parent.data.tags
    assert {"spec/smoke.yaml", "spec/study.yaml"} <= artifacts(spec, parent.info.run_id)

    runs = child_runs(spec)
    assert len(runs) == 4
    # two trials ran at once against the SQLite store
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), spans
    # the conditional parameter exists exactly where its condition holds (smoke.yaml:
    # weight_params.temperature only for weight_fn = exp), in Tune's configs and in MLflow
    shapes = {t.config["weight_fn"] for t in outcome.trials}
    assert shapes == {"weat", "exp"}, shapes  # seeded TPE: both branches are sampled
    for trial in outcome.trials:
        assert ("weight_params.temperature" in trial.config) == (trial.config["weight_fn"] == "exp")
    for run in runs:
        has_t = "weight_params.temperature" in run.data.params
        assert has_t == (run.data.params["weight_fn"] == "exp"), run.data.params
    by_trial = {r.data.tags[TAG_TRIAL]: r for r in runs}
    assert set(by_trial) == {t.trial_id for t in outcome.trials}
    for trial in outcome.trials:
        run = by_trial[trial.trial_id]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        # the full config as params, with the sampled values
        assert run.data.params["method"] == trial.config["method"]
        assert float(run.data.params["beta"]) == pytest.approx(trial.config["beta"])
        assert run.data.params["epochs"] == "2" and run.data.params["eps"] == "0.1"
        if "weight_params.temperature" in trial.config:
            assert float(run.data.params["weight_params.temperature"]) == pytest.approx(
                trial.config["weight_params.temperature"]
            )
        # every epoch's metrics, with the epoch as step; nothing lost with 2 trials at once
        for key in ("val/pgd_acc", "val/clean_acc", "train/loss", "val/delta_energy", "lr"):
            steps = [s for s, _ in history(spec, run.info.run_id, key)]
            assert steps == [1, 2], (key, steps)
        assert history(spec, run.info.run_id, "val/pgd_acc")[-1][1] == pytest.approx(
            trial.metrics["val/pgd_acc"]
        )
        # final test metrics agree with what the trial wrote to disk
        final = run.data.metrics
        assert final["test/clean_acc"] == pytest.approx(trial.metrics["test/clean_acc"])
        assert 0.0 <= final["test/pgd_acc"] <= final["test/clean_acc"] <= 1.0
        assert {
            "checkpoints/best.pt",
            "checkpoints/last.pt",
            "config.yaml",
            "energies.npz",
        } <= artifacts(spec, run.info.run_id)

    # export: the best config by val/pgd_acc, usable as a training config; "best" is the
    # one shared ranking (ties on val/pgd_acc: val/clean_acc, then the trial id)
    from reports.ranking import rank_runs

    best = rank_runs(outcome.trials, spec.metrics, spec.modes)[0]
    (path,) = export_best(tracker, spec.name, tmp_path / "best.yaml", metric="val/pgd_acc")
    exported = TrainConfig.from_dict({k: v for k, v in yaml.safe_load(path.read_text()).items()})
    assert exported.method == best.config["method"]
    assert exported.beta == pytest.approx(best.config["beta"])
    assert exported.eps == 0.1 and exported.epochs == 2
    assert exported.autoattack  # the final training evaluates with AutoAttack again
    assert best_runs(tracker, spec.name, "val/pgd_acc")[0].data.tags[TAG_TRIAL] == best.trial_id

    # ... and `study train --config best.yaml` trains from it
    code = cli.main(
        [
            "train",
            "--config",
            str(path),
            "--set",
            "epochs=1",
            "--no-mlflow",
            "--no-progress",
            "-o",
            str(tmp_path / "final"),
        ]
    )
    assert code == 0
    assert (tmp_path / "final" / "checkpoints" / "last.pt").is_file()


def test_multi_objective_study_reports_the_pareto_front(tmp_path, capsys) -> None:
    spec = make_spec(
        tmp_path,
        "pareto",
        trials=4,
        epochs=1,
        metrics=["val/clean_acc", "val/pgd_acc"],
        modes=["max", "max"],
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    outcome = run_study(spec)
    front = {t.trial_id for t in outcome.pareto()}
    assert front
    # Optuna's own study (in its RDB storage, as optuna-dashboard reads it) agrees
    import optuna

    study = optuna.load_study(study_name=spec.name, storage=spec.optuna_storage)
    assert len(study.trials) == 4
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    optuna_front = {round(t.params["beta"], 9) for t in study.best_trials}
    ours = {round(t.config["beta"], 9) for t in outcome.pareto()}
    assert optuna_front == ours
    # recompute the front from what MLflow holds
    runs = child_runs(spec)
    points = {
        r.data.tags[TAG_TRIAL]: (r.data.metrics["val/clean_acc"], r.data.metrics["val/pgd_acc"])
        for r in runs
    }
    assert len(points) == 4
    expected = {
        a
        for a, pa in points.items()
        if not any(
            pb[0] >= pa[0] and pb[1] >= pa[1] and pb != pa for b, pb in points.items() if b != a
        )
    }
    assert front == expected


def test_pareto_front_of_known_points() -> None:
    from study.runner import TrialOutcome

    def t(i: str, a: float, b: float) -> TrialOutcome:
        return TrialOutcome(i, "FINISHED", {}, {"x": a, "y": b}, None)

    trials = [t("a", 1, 0), t("b", 0, 1), t("c", 0.5, 0.5), t("d", 0.4, 0.4), t("e", 1, 0)]
    assert {x.trial_id for x in pareto_front(trials, ["x", "y"], ["max", "max"])} == {
        "a",
        "b",
        "c",
        "e",
    }
    # minimising: c is dominated by d; a, b (and e, a's twin) hold the best of one axis
    assert {x.trial_id for x in pareto_front(trials, ["x", "y"], ["min", "min"])} == {
        "a",
        "b",
        "d",
        "e",
    }
    assert {x.trial_id for x in pareto_front(trials, ["x", "y"], ["max", "min"])} == {"a", "e"}


def test_ray_train_settings_local_cluster_only_and_the_user_wins(monkeypatch) -> None:
    from study.runner import HEALTH_CHECK_INTERVAL_S, LOCAL_TRAIN_ENV, train_env

    for key in ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", *LOCAL_TRAIN_ENV):
        monkeypatch.delenv(key, raising=False)
    local, remote = train_env(local=True), train_env(local=False)
    assert local["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == HEALTH_CHECK_INTERVAL_S
    assert local["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    # a cluster joined with --address keeps Ray Train's preemption watcher and metrics
    assert remote == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": HEALTH_CHECK_INTERVAL_S}
    monkeypatch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.0")
    mine = train_env(local=True)
    assert mine["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "1"
    assert mine["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.0"


def test_a_diverging_trial_fails_alone_with_its_reason_in_mlflow(tmp_path) -> None:
    # lr_max = 1e6 makes the loss non-finite in the first epoch: TrainingDiverged
    spec = make_spec(
        tmp_path,
        "diverge",
        trials=1,
        epochs=1,
        base={**BASE, "lr_max": 1.0e6, "lr_schedule": "constant"},
    )
    outcome = run_study(spec)
    (trial,) = outcome.trials
    assert trial.status == "FAILED"
    assert "diverged" in (trial.error or "").lower()
    (run,) = child_runs(spec)
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["energy_study.failure_reason"].lower()
    with pytest.raises(Exception, match="no finished trial"):
        best_runs(MlflowTracker(spec.tracking_uri, spec.name), spec.name, "val/pgd_acc")


def test_torchtrainer_backend_with_asha_stops_frees_the_cores(tmp_path) -> None:
    """Ray Train trials; ASHA stops some inside TorchTrainer.fit, later trials still start."""
    import ray

    spec = make_spec(
        tmp_path,
        "train-backend",
        backend="train",
        trials=3,
        epochs=3,
        asha=True,
        grace_period=1,
        max_concurrent=2,
    )
    outcome = run_study(spec)
    assert len(outcome.trials) == 3
    assert all(t.status in ("FINISHED", "STOPPED") for t in outcome.trials)
    assert any(t.status == "FINISHED" for t in outcome.trials)
    runs = child_runs(spec)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        steps = [s for s, _ in history(spec, run.info.run_id, "val/pgd_acc")]
        assert steps == list(range(1, len(steps) + 1))
    # the Train checkpoints went to the study's storage
    assert any((spec.folder / "train").rglob("checkpoint_*"))
    deadline = time.time() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0)


def test_resume_after_the_driver_is_killed(tmp_path) -> None:
    """Kill `study run` mid-study; `study resume` finishes it without duplicates."""
    import ray

    address = ray.get_runtime_context().gcs_address
    spec = make_spec(tmp_path, "resumable", trials=4, epochs=4, max_concurrent=2)
    tracking = spec.tracking_uri
    cmd = [
        sys.executable, "-m", "study", "run", "--space", "smoke", "--name", spec.name,
        "--finalists", "0",
        "--trials", "4", "--epochs", "4", "--no-asha", "--max-concurrent", "2",
        "--address", address, "--tracking-uri", tracking, "--storage", spec.storage,
    ]  # fmt: skip
    for key, value in BASE.items():
        cmd += ["--set", f"{key}={value}"]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finished_before: dict[str, int] = {}
    deadline = time.time() + 240
    try:
        # wait until one trial is finished and another has reported an epoch
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1.0)
            if not (spec.folder / "tune").is_dir():
                continue  # the driver is still creating the store: don't race its migrations
            runs = child_runs(spec)
            done = {
                r.data.tags[TAG_TRIAL]: r.info.end_time for r in runs if r.info.status == "FINISHED"
            }
            started = [r for r in runs if r.info.status == "RUNNING" and "epoch" in r.data.metrics]
            if done and started:
                finished_before = done
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert finished_before, (tmp_path / "driver.log").read_text()[-3000:]
    time.sleep(1.0)  # let the killed driver's trials go away

    assert cli.main(
        ["resume", spec.name, "--address", address, "--tracking-uri", tracking,
         "--storage", spec.storage]
    ) == 0  # fmt: skip

    runs = child_runs(spec)
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == 4, ids  # no run duplicated, none missing
    assert all(r.info.status == "FINISHED" for r in runs), [r.info.status for r in runs]
    for run in runs:
        tid = run.data.tags[TAG_TRIAL]
        steps = [s for s, _ in history(spec, run.info.run_id, "val/pgd_acc")]
        assert steps == [1, 2, 3, 4], (tid, steps)  # resumed, not restarted; no epoch twice
        assert "test/clean_acc" in run.data.metrics
        if tid in finished_before:  # finished before the kill: not rerun
            assert run.info.end_time == finished_before[tid]
    parents = MlflowTracker(tracking, spec.name).find_runs(
        **{TAG_STUDY: spec.name, TAG_ROLE: "study"}
    )
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_a_retried_run_resume_entrypoint_starts_resumes_then_reports(tmp_path, capsys) -> None:
    """`study run --name N --resume`, the entrypoint a retried cluster job runs again:
    the first time it starts the study; killed mid-study and run again, it resumes it
    (no trial rerun, no epoch twice); once the study has ended it prints the outcome
    and exits 0. Without --resume an existing name is refused, naming both ways on."""
    import ray

    address = ray.get_runtime_context().gcs_address
    spec = make_spec(tmp_path, "retried", trials=2, epochs=3, max_concurrent=1)
    argv = ["run", "--space", "smoke", "--name", spec.name, "--finalists", "0",
            "--trials", "2", "--epochs", "3", "--no-asha", "--max-concurrent", "1",
            "--address", address, "--tracking-uri", spec.tracking_uri,
            "--storage", spec.storage, "--resume"]  # fmt: skip
    for key, value in BASE.items():
        argv += ["--set", f"{key}={value}"]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "study", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    finished_before: dict[str, int] = {}
    deadline = time.time() + 240
    try:  # one trial finished, the other not yet: kill the driver
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1.0)
            if not (spec.folder / "tune").is_dir():
                continue
            done = {
                r.data.tags[TAG_TRIAL]: r.info.end_time
                for r in child_runs(spec)
                if r.info.status == "FINISHED"
            }
            if len(done) == 1:
                finished_before = done
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert finished_before, (tmp_path / "driver.log").read_text()[-3000:]
    assert "study retried: 2 trials" in (tmp_path / "driver.log").read_text()  # it started
    time.sleep(1.0)  # let the killed driver's trials go away

    assert cli.main(argv) == 0  # the same command again: resumes
    out = capsys.readouterr().out
    assert "resuming study retried" in out and "study retried: 2 finished" in out
    runs = child_runs(spec)
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == 2, ids
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [s for s, _ in history(spec, run.info.run_id, "val/pgd_acc")]
        assert steps == [1, 2, 3], steps
        if run.data.tags[TAG_TRIAL] in finished_before:
            assert run.info.end_time == finished_before[run.data.tags[TAG_TRIAL]]

    assert cli.main(argv) == 0  # and once more: it has ended, nothing runs
    out = capsys.readouterr().out
    assert "has ended already" in out and "study retried: 2 finished" in out
    assert len(child_runs(spec)) == 2

    assert cli.main([a for a in argv if a != "--resume"]) == 2  # no --resume: refused
    err = " ".join(capsys.readouterr().err.split())
    assert "already exists" in err and "--resume" in err and "study resume retried" in err


def test_resume_survives_a_tune_state_cut_short_by_a_killed_driver(tmp_path) -> None:
    """Tune rewrites its experiment state in place: a driver killed mid-write leaves it
    empty, and Tune would start the whole study again. study resume puts back the copy
    StateBackup kept: no trial runs twice."""
    spec = make_spec(tmp_path, "cut", trials=2, epochs=1)
    first = run_study(spec)
    assert sorted(t.status for t in first.trials) == ["FINISHED", "FINISHED"]
    state = sorted((spec.folder / "tune").glob("experiment_state-*.json"))[-1]
    state.write_text("")
    again = run_study(StudySpec.load(spec.storage, "cut"), resume=True)
    assert sorted(t.trial_id for t in again.trials) == sorted(t.trial_id for t in first.trials)
    runs = child_runs(spec)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)


def test_cli_run_prints_the_best_trials_and_the_commands(tmp_path, capsys, monkeypatch) -> None:
    import search_spaces.space

    loads, parse = [], search_spaces.space.parse_space  # the space files the driver reads
    monkeypatch.setattr(
        search_spaces.space,
        "parse_space",
        lambda text, source: loads.append(source) or parse(text, source),
    )
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "--space", "smoke", "--name", "cli-smoke", "--trials", "2", "--epochs", "1",
            "--finalists", "1", "--final-n", "20",
            "--tracking-uri", tracking, "--storage", str(tmp_path / "studies")]  # fmt: skip
    assert cli.main(args) == 0
    # the command's defaults and the spec (validation, searcher, ASHA, finals, the
    # outcome); trials read none. MlflowCallback still rebuilds a spec from plain
    # data, reading the space twice per trial (study/callbacks.py)
    assert len(loads) <= 2, loads
    out = capsys.readouterr().out
    assert "best trials by val/pgd_acc (max)" in out
    # the second stage: one finalist, its accuracies with n and a 95 % interval
    assert "finalists (search" in out and "n=20" in out and "aa_acc" in out
    assert "study ui" in out and "study export cli-smoke" in out
    assert cli.main(["show", "cli-smoke", "--tracking-uri", tracking]) == 0
    shown = capsys.readouterr().out
    assert shown.count("FINISHED") == 2
    assert cli.main(["list", "--tracking-uri", tracking]) == 0
    assert "cli-smoke" in capsys.readouterr().out


def test_bad_inputs_fail_before_ray_starts(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  beta: {type: float, low: 5.0, high: 1.0}\n")
    code = cli.main(["run", "--space", str(bad), "--storage", str(tmp_path / "s"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "bad.yaml:2:" in err and "beta" in err
    assert not (tmp_path / "s").exists()

    code = cli.main(["run", "--set", "eps=-1", "--storage", str(tmp_path / "s")])
    assert code == 2
    assert "eps" in capsys.readouterr().err

    code = cli.main(["resume", "nope", "--storage", str(tmp_path / "s")])
    assert code == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_metric_values_are_finite_numbers(tmp_path) -> None:
    """Energies and gaps reach MLflow as finite floats (no NaN from the evaluation)."""
    spec = make_spec(
        tmp_path, "finite", trials=1, epochs=1, space="fixed", base={**BASE, "method": "weat_adv"}
    )
    run_study(spec)
    (run,) = child_runs(spec)
    for key in ("val/energy_nat", "val/energy_adv", "val/delta_energy", "test/delta_energy"):
        assert math.isfinite(run.data.metrics[key]), key


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_study_logs_to_an_mlflow_server_started_by_study_ui(tmp_path) -> None:
    """`study ui` serves the SQLite store on 127.0.0.1; a study logs to it over HTTP."""
    import urllib.request

    port = _free_port()
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    server = subprocess.Popen(
        [sys.executable, "-m", "study", "ui", "--port", str(port), "--tracking-uri", db],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("study ui did not answer on /health within 90 s")
        spec = make_spec(tmp_path, "over-http", trials=1, epochs=1, tracking_uri=url)
        outcome = run_study(spec)
        assert outcome.trials[0].status == "FINISHED"
        (run,) = child_runs(spec)
        assert run.info.status == "FINISHED"
        assert [s for s, _ in history(spec, run.info.run_id, "val/pgd_acc")] == [1]
        assert "checkpoints/last.pt" in artifacts(spec, run.info.run_id)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    # the same runs are in the SQLite file behind the server
    (run_again,) = child_runs(make_spec(tmp_path, "over-http", tracking_uri=db))
    assert run_again.info.run_id == run.info.run_id


def test_a_killed_trial_process_restarts_from_its_checkpoint(tmp_path) -> None:
    """SIGKILL the trial's worker process mid-study: it restarts (max_failures=1) and finishes."""
    import threading

    spec = make_spec(tmp_path, "kill-worker", trials=1, epochs=5, max_failures=1)
    killed: list[int] = []

    def kill_after_two_epochs() -> None:
        deadline = time.time() + 180
        while time.time() < deadline and not killed:
            time.sleep(0.3)
            if not (spec.folder / "tune").is_dir():
                continue
            for run in child_runs(spec):
                process = run.data.tags.get("energy_study.process", "")
                if run.data.metrics.get("epoch", 0) >= 2 and process:
                    pid = int(process.rsplit(":", 1)[1])
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return

    killer = threading.Thread(target=kill_after_two_epochs, daemon=True)
    killer.start()
    outcome = run_study(spec)
    killer.join(timeout=5)
    assert killed, "the trial finished before its process could be killed"
    (trial,) = outcome.trials
    assert trial.status == "FINISHED", trial.error
    # resumed from a checkpoint, not retrained from scratch: fewer than 5 epochs since restore
    assert trial.metrics["iterations_since_restore"] < 5
    (run,) = child_runs(spec)
    assert run.info.status == "FINISHED"
    assert [s for s, _ in history(spec, run.info.run_id, "val/pgd_acc")] == [1, 2, 3, 4, 5]
    assert (
        run.data.tags["energy_study.process"]
        != f"{run.data.tags['energy_study.process'].rsplit(':', 1)[0]}:{killed[0]}"
    )


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    args = ["train", "--no-progress", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage", str(tmp_path / "studies"), "--set", "epochs=2"]  # fmt: skip
    for key, value in BASE.items():
        args += ["--set", f"{key}={value}"]
    return [*args, *extra]


def test_study_train_records_a_study_of_one_in_mlflow(tmp_path) -> None:
    out = tmp_path / "run"
    assert cli.main(_train_args(tmp_path, "-o", str(out), "--experiment", "final")) == 0
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "final")
    (run,) = trial_runs(tracker, "final")
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "weat_adv" and run.data.params["eps"] == "0.1"
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    got = history(
        StudySpec(name="final", tracking_uri=tracker.tracking_uri), run.info.run_id, "val/pgd_acc"
    )
    assert got == [(line["epoch"], pytest.approx(line["val/pgd_acc"])) for line in lines]
    final = json.loads((out / "final.json").read_text())["metrics"]
    assert run.data.metrics["test/pgd_acc"] == pytest.approx(final["test/pgd_acc"])
    assert {"checkpoints/best.pt", "checkpoints/last.pt", "config.yaml"} <= artifacts(
        StudySpec(name="final", tracking_uri=tracker.tracking_uri), run.info.run_id
    )


def test_study_train_on_two_ray_train_workers(tmp_path, capsys) -> None:
    """`study train --workers 2`: DDP over two 1-CPU Ray Train workers on the 2-CPU cluster."""
    code = cli.main(_train_args(tmp_path, "--workers", "2", "--experiment", "ddp"))
    assert code == 0, capsys.readouterr().err
    assert "FINISHED" in capsys.readouterr().out
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "ddp")
    (run,) = trial_runs(tracker, "ddp")
    assert run.info.status == "FINISHED"
    spec = StudySpec(name="ddp", tracking_uri=tracker.tracking_uri)
    assert [s for s, _ in history(spec, run.info.run_id, "val/pgd_acc")] == [1, 2]
    assert 0.5 < run.data.metrics["test/clean_acc"] <= 1.0
