"""Soak: 24 trials, 8 at once on 2 cores (a quarter CPU each), ASHA; one trial process
SIGKILLed, then the driver SIGKILLed and the study resumed. Nothing may be lost or
doubled: every trial run once in MLflow, every epoch it reached logged exactly once,
no run left RUNNING, the killed trial resumed from its checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study import cli
from study.export import trial_runs
from study.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL, MlflowTracker

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

TRIALS, EPOCHS = 24, 4
SETS = {
    "eps": 0.1, "step_size": 0.025, "attack_steps": 2, "val_attack_steps": 2,
    "eval_steps": 2, "val_subset": 64, "test_subset": 64, "probe_n": 32, "train_subset": 400,
    "num_threads": 1,
}  # fmt: skip


def _process_pid(run) -> int | None:
    process = run.data.tags.get("energy_study.process", "")
    return int(process.rsplit(":", 1)[1]) if ":" in process else None


def test_soak_kills_lose_nothing(tmp_path: Path) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = str(tmp_path / "studies")
    cmd = [
        sys.executable, "-m", "study", "run", "--space", "smoke", "--name", "soak",
        "--trials", str(TRIALS), "--epochs", str(EPOCHS), "--asha", "--grace-period", "1",
        "--max-concurrent", "8", "--cpus-per-worker", "0.25", "--max-failures", "1",
        "--finalists", "0", "--address", address, "--tracking-uri", tracking,
        "--storage", storage,
    ]  # fmt: skip
    for key, value in SETS.items():
        cmd += ["--set", f"{key}={value}"]
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    tracker = None
    killed_trial: tuple[str, int] | None = None
    driver_killed = False
    deadline = time.time() + 600
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            if not (Path(storage) / "soak" / "tune").is_dir():
                continue  # the driver is still creating the store
            tracker = tracker or MlflowTracker(tracking, "soak")
            runs = trial_runs(tracker, "soak")
            if killed_trial is None:
                # a trial in its fourth epoch: kill its process. Not earlier: Tune
                # registers an epoch's checkpoint by a save call to the trial's actor
                # made after the callbacks have logged that epoch, so a trial killed
                # just after its first epoch was logged may lose that checkpoint and
                # restart from scratch; by the time its third epoch is logged, the
                # second's checkpoint is registered (the next result waits for the
                # save). Epoch 3 is no ASHA rung (1, 2, 4): nothing stops it there.
                for run in runs:
                    pid = _process_pid(run)
                    if run.info.status == "RUNNING" and run.data.metrics.get("epoch") == 3 and pid:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            continue
                        killed_trial = (run.data.tags[TAG_TRIAL], pid)
                        break
                continue
            finished = sum(r.info.status == "FINISHED" for r in runs)
            restarted = any(
                r.data.tags[TAG_TRIAL] == killed_trial[0] and _process_pid(r) != killed_trial[1]
                for r in runs
            )
            if restarted and finished >= 6:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver, mid-study
                driver_killed = True
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    text = (tmp_path / "driver.log").read_text()
    assert killed_trial is not None and driver_killed, text[-3000:]
    time.sleep(1.0)

    resume = ["resume", "soak", "--address", address, "--tracking-uri", tracking,
              "--storage", storage]  # fmt: skip
    assert cli.main(resume) == 0

    tracker = MlflowTracker(tracking, "soak")
    runs = trial_runs(tracker, "soak")
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    duplicates = len(ids) - len(set(ids))
    running = [r.data.tags[TAG_TRIAL] for r in runs if r.info.status == "RUNNING"]
    lost = []
    for run in runs:
        steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "val/pgd_acc")]
        if sorted(steps) != list(range(1, len(steps) + 1)) or not steps:
            lost.append((run.data.tags[TAG_TRIAL], sorted(steps)))
        if run.info.status == "FINISHED" and run.data.tags.get("energy_study.early_stopped") != (
            "true"
        ):
            assert len(steps) == EPOCHS and "test/clean_acc" in run.data.metrics
    (killed,) = [r for r in runs if r.data.tags[TAG_TRIAL] == killed_trial[0]]
    killed_steps = [
        m.step for m in tracker.client.get_metric_history(killed.info.run_id, "val/pgd_acc")
    ]
    parents = tracker.find_runs(**{TAG_STUDY: "soak", TAG_ROLE: "study"})
    print(
        f"soak: {len(runs)} trial runs, {duplicates} duplicate(s), {len(running)} RUNNING, "
        f"{len(lost)} with lost or doubled epochs; killed trial {killed_trial[0]} "
        f"(pid {killed_trial[1]}) now in process {_process_pid(killed)}, resumed from epoch "
        f"{killed.data.tags.get('energy_study.resumed_from_epoch')}, epochs {killed_steps}; "
        f"statuses {sorted({r.info.status for r in runs})}"
    )
    assert len(ids) == TRIALS and duplicates == 0, ids
    assert not running, running
    assert not lost, lost
    assert _process_pid(killed) != killed_trial[1]  # restarted in a new process ...
    assert int(killed.data.tags["energy_study.resumed_from_epoch"]) >= 1  # ... from a checkpoint
    assert [p.info.status for p in parents] == ["FINISHED"]
