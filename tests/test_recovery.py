"""A study loses nothing when its driver stops: a trial Tune ended before the driver
died gets its MLflow run finished from its checkpoint in storage on ``study resume``; a
SIGTERM (Slurm or Kubernetes preemption) stops the study as gracefully as Ctrl-C; the
node-local scratch folders of trials stopped abruptly are swept.

Real components: Ray (the shared local cluster of tests/conftest.py), ``study run`` as a
subprocess, Tune checkpoints on a local storage, MLflow on SQLite. The driver's death is
made at a point the test controls (never by timing).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from test_artifacts import BASE, FULL_RUN  # the same tiny digits trial and its files

from reports.vocabulary import (
    CONFIG_FILE,
    FINAL_FILE,
    LAST_CHECKPOINT,
    METRICS_LOG,
    TAG_ARTIFACT_ERROR,
    TAG_EARLY,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
)
from study import cli
from study.export import trial_runs
from study.runner import can_resume, resume_command
from study.spec import StudySpec
from study.tracking import MlflowTracker
from study.trial import trial_files

#: The per-epoch metrics checked at every epoch.
EPOCH_KEYS = ("epoch", "val/pgd_acc", "val/clean_acc", "train/loss", "lr")


def study_argv(tmp_path: Path, name: str, trials: int, epochs: int, address: str) -> list[str]:
    """``study run`` arguments of a tiny study on the shared cluster (no ASHA, no finals)."""
    argv = ["run", "--space", "smoke", "--name", name, "--finalists", "0",
            "--trials", str(trials), "--epochs", str(epochs), "--no-asha",
            "--max-concurrent", "1", "--address", address,
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage", str(tmp_path / "studies")]  # fmt: skip
    for key, value in BASE.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def resume_argv(spec: StudySpec, address: str) -> list[str]:
    return ["resume", spec.name, "--address", address, "--tracking-uri", spec.tracking_uri,
            "--storage", spec.storage]  # fmt: skip


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def steps(tracker: MlflowTracker, run_id: str, key: str) -> list[int]:
    """Every step logged for ``key``, with repeats (an epoch logged twice shows twice)."""
    return sorted(m.step for m in tracker.client.get_metric_history(run_id, key))


def check_complete_runs(spec: StudySpec, trials: int, epochs: int) -> None:
    """One FINISHED run per trial with every file, every epoch once, and the test metrics
    of the trial's last checkpoint in storage."""
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = trial_runs(tracker, spec.name)
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == trials, ids  # none duplicated, none missing
    for run in runs:
        run_id, tid = run.info.run_id, run.data.tags[TAG_TRIAL]
        assert run.info.status == "FINISHED", (tid, run.info.status)
        logged = artifacts(tracker.client, run_id)
        assert FULL_RUN <= logged, (tid, logged)
        assert TAG_ARTIFACT_ERROR not in run.data.tags, run.data.tags[TAG_ARTIFACT_ERROR]
        assert run.data.tags.get(TAG_EARLY) == "false"
        for key in EPOCH_KEYS:
            assert steps(tracker, run_id, key) == list(range(1, epochs + 1)), (tid, key)
        assert steps(tracker, run_id, "test/clean_acc") == [epochs], tid
        with trial_files(spec, tid) as stored:
            assert stored is not None
            final = json.loads((stored / FINAL_FILE).read_text())["metrics"]
        assert run.data.metrics["test/clean_acc"] == pytest.approx(final["test/clean_acc"])


#: A driver that dies the way a killed one does, at a point the test controls: the MLflow
#: writer never gets a trial's last epoch (with its test metrics) nor its end, as when
#: they were still queued; once Tune has ended every trial and saved its state for the
#: last time (``on_experiment_end`` comes after that save), the process ends at once.
DYING_DRIVER = textwrap.dedent(
    """
    import os
    import sys

    from study.callbacks import MlflowCallback
    from study.cli import main

    EPOCHS = int(os.environ["DYING_DRIVER_EPOCHS"])
    on_result = MlflowCallback.on_trial_result


    def held_last_epoch(self, iteration, trials, trial, result, **info):
        if result.get("epoch", 0) < EPOCHS:
            on_result(self, iteration, trials, trial, result, **info)


    def die(self, trials, **info):
        self.writer.flush()  # what was queued before is written: a known state
        os._exit(3)


    MlflowCallback.on_trial_result = held_last_epoch
    MlflowCallback.on_trial_complete = lambda self, *args, **kwargs: None
    MlflowCallback.on_experiment_end = die
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.usefixtures("ray_cluster")
def test_trials_ended_before_the_driver_died_are_finished_from_storage_on_resume(
    tmp_path, capsys
) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    epochs = 2
    argv = study_argv(tmp_path, "ended", trials=2, epochs=epochs, address=address)
    driver = tmp_path / "dying_driver.py"
    driver.write_text(DYING_DRIVER)
    env = {**os.environ, "DYING_DRIVER_EPOCHS": str(epochs)}
    done = subprocess.run(
        [sys.executable, str(driver), *argv], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr[-3000:]

    spec = StudySpec.load(str(tmp_path / "studies"), "ended")
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = trial_runs(tracker, spec.name)
    # the state a driver killed there leaves: Tune ended both trials, their runs are
    # open, without their last epoch, test metrics or files
    assert len(runs) == 2 and all(r.info.status == "RUNNING" for r in runs)
    for run in runs:
        assert steps(tracker, run.info.run_id, "val/pgd_acc") == [1]
        assert "test/clean_acc" not in run.data.metrics
        assert artifacts(tracker.client, run.info.run_id) == {CONFIG_FILE}
    # ... and one as a `study resume` of an earlier version left it: ended FINISHED as it was
    tracker.end_run(runs[1].info.run_id, "FINISHED")

    assert cli.main(resume_argv(spec, address)) == 0
    check_complete_runs(spec, trials=2, epochs=epochs)
    assert "finished the MLflow runs of 2 trial(s)" in capsys.readouterr().out
    parents = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: "study"})
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


#: A driver that is sent SIGTERM, by itself, right after the MLflow callback was handed the
#: first epoch-1 result: the signal comes while ``Tuner.fit`` runs, whatever the timing of
#: the trials (a preempted pod's PID 1 gets it the same way: the driver alone).
SIGNALLED_DRIVER = textwrap.dedent(
    """
    import os
    import signal
    import sys

    from study.callbacks import MlflowCallback
    from study.cli import main

    on_result = MlflowCallback.on_trial_result
    sent = []


    def then_sigterm(self, iteration, trials, trial, result, **info):
        on_result(self, iteration, trials, trial, result, **info)
        if not sent and result.get("epoch") == 1:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)


    MlflowCallback.on_trial_result = then_sigterm
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.usefixtures("ray_cluster")
def test_sigterm_stops_the_study_like_ctrl_c_and_resume_finishes_it(tmp_path) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    epochs = 3
    argv = study_argv(tmp_path, "preempted", trials=2, epochs=epochs, address=address)
    driver = tmp_path / "signalled_driver.py"
    driver.write_text(SIGNALLED_DRIVER)
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(driver), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    # stopped by its own handler (not killed by the signal, not Ray's sys.exit(15)): the
    # CLI's exit status for a study stopped by a signal, 128 + SIGTERM
    assert code == 143, (code, text[-3000:])
    spec = StudySpec.load(str(tmp_path / "studies"), "preempted")
    assert "interrupted (SIGTERM)" in text, text[-3000:]
    assert resume_command(spec) in " ".join(text.split()), text[-3000:]
    assert can_resume(spec)
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    stopped = trial_runs(tracker, spec.name)
    # the writer's queue was drained and every run settled: none left RUNNING, a trial cut
    # short KILLED (not "finished, stopped early"), one that ended before FINISHED
    assert stopped and all(
        r.info.status == ("FINISHED" if "test/clean_acc" in r.data.metrics else "KILLED")
        for r in stopped
    ), [(r.info.status, sorted(r.data.metrics)) for r in stopped]
    assert any(r.info.status == "KILLED" for r in stopped)
    assert not any(TAG_ARTIFACT_ERROR in r.data.tags for r in stopped)
    assert any(steps(tracker, r.info.run_id, "epoch") for r in stopped)
    parents = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: "study"})
    assert len(parents) == 1 and parents[0].info.status == "KILLED"

    assert cli.main(resume_argv(spec, address)) == 0
    check_complete_runs(spec, trials=2, epochs=epochs)
    parents = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: "study"})
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


# --- node-local scratch folders ---------------------------------------------------------------
def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _scratch(parent: Path, name: str, owner: str | None, age_s: float, now: float) -> Path:
    """A scratch folder with a checkpoint in it, everything last changed ``age_s`` ago."""
    folder = parent / name
    (folder / "checkpoints").mkdir(parents=True)
    (folder / LAST_CHECKPOINT).write_text("weights\n")
    if owner is not None:
        (folder / ".owner").write_text(owner + "\n")
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, (now - age_s, now - age_s))
    return folder


def test_scratch_of_dead_trials_is_swept_and_a_live_trials_is_kept(tmp_path, monkeypatch) -> None:
    import socket

    from trainables.ray_adapter import (
        SCRATCH_MAX_AGE_S,
        SCRATCH_OWNER,
        SCRATCH_PARENT,
        _process_start,
        scratch_folder,
        scratch_owner_alive,
        snapshot,
        sweep_scratch,
    )

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the node's temp folder
    parent = tmp_path / SCRATCH_PARENT
    parent.mkdir()
    now, old, host = time.time(), SCRATCH_MAX_AGE_S + 3600, socket.gethostname()
    me, start = os.getpid(), _process_start(os.getpid())
    assert start is not None  # Linux: /proc is there
    dead = _dead_pid()
    gone = _scratch(parent, "t1-gone", f"{host} {dead} 1", old, now)
    unknown = _scratch(parent, "t2-unknown", None, old, now)  # an older version's: no owner
    reused = _scratch(parent, "t3-reused", f"{host} {me} 1", old, now)  # pid now someone else's
    live = _scratch(parent, "t4-live", f"{host} {me} {start}", old, now)  # old, owner running
    young = _scratch(parent, "t5-young", f"{host} {dead} 1", SCRATCH_MAX_AGE_S / 2, now)
    writing = _scratch(parent, "t6-writing", f"{host} {dead} 1", old, now)
    os.utime(writing / LAST_CHECKPOINT, (now - 60, now - 60))  # changed a minute ago, deep in

    assert scratch_owner_alive(gone) is False and scratch_owner_alive(reused) is False
    assert scratch_owner_alive(live) is True and scratch_owner_alive(unknown) is None
    removed = sweep_scratch(parent, now=now)
    assert sorted(removed) == sorted([gone, unknown, reused])
    assert not gone.exists() and not unknown.exists() and not reused.exists()
    assert live.is_dir() and young.is_dir() and writing.is_dir()
    assert (live / LAST_CHECKPOINT).read_text() == "weights\n"
    assert sweep_scratch(parent, now=now) == []  # what stays, stays

    # a trial's start sweeps (with the clock's time) and names its owner: this process
    os.utime(young, (now - old, now - old))
    for path in young.rglob("*"):
        os.utime(path, (now - old, now - old))
    mine = scratch_folder("abc12_00000")
    assert mine.parent == parent and mine.name.startswith("abc12_00000-")
    assert not young.exists() and live.is_dir()
    assert (mine / SCRATCH_OWNER).read_text().split() == [host, str(me), start]
    assert scratch_owner_alive(mine) is True
    # age alone never removes a live trial's folder; a dead one's goes at any age asked
    assert sweep_scratch(parent, max_age_s=0) == [writing]
    assert mine.is_dir() and live.is_dir()
    # the owner file never travels in a checkpoint of the run
    (mine / METRICS_LOG).write_text("{}\n")
    with snapshot(mine) as copy:
        assert sorted(p.name for p in copy.rglob("*")) == [METRICS_LOG]
