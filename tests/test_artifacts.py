"""A trial's files travel through its checkpoints in the study's storage, never through
the disk of the node that ran it, and reach MLflow from there; a file a run must have and
lacks is recorded (tag, ``study show``), never skipped in silence; the driver's MLflow
writes go through one background writer that loses nothing.

Real components: Ray (the shared local cluster of tests/conftest.py), Tune checkpoints
on the local storage, MLflow on SQLite.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from reports.vocabulary import (
    BEST_CHECKPOINT,
    CONFIG_FILE,
    ENERGIES_FILE,
    ENERGY_HIST,
    FINAL_FILE,
    LAST_CHECKPOINT,
    METRICS_LOG,
    PARENT_TAG,
    ROLE_STUDY,
    TAG_ARTIFACT_ERROR,
    TAG_EARLY,
    TAG_PROCESS,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
)
from study import cli
from study.callbacks import MlflowCallback
from study.export import trial_runs
from study.runner import open_parent_run, run_study
from study.spec import StudySpec
from study.tracking import BackgroundWriter, MlflowTracker
from study.trial import latest_stored_checkpoint, trial_files
from trainables.config import TrainConfig
from trainables.loop import train
from trainables.ray_adapter import SCRATCH_PARENT, finished_run, restore_files

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "eps": 0.1,
    "step_size": 0.025,
    "attack_steps": 2,
    "val_attack_steps": 3,
    "eval_steps": 3,
    "eval_step_size": 0.025,
    "batch_size": 64,
    "autoattack": False,
    "test_subset": 200,
}
#: What every trial run that trained all its epochs has in MLflow.
FULL_RUN = {
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    ENERGIES_FILE,
    METRICS_LOG,
    CONFIG_FILE,
    FINAL_FILE,
    ENERGY_HIST,
}


def make_spec(tmp_path: Path, name: str, **kw) -> StudySpec:
    values = {
        "name": name,
        "space": "smoke",
        "base": dict(BASE),
        "trials": 2,
        "epochs": 2,
        "asha": False,
        "finalists": 0,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "storage": str(tmp_path / "studies"),
    }
    values.update(kw)
    return StudySpec(**values)


def artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def scratch_left(trial_id: str) -> list[Path]:
    """Node-local scratch folders of a trial still on this machine."""
    return list((Path(tempfile.gettempdir()) / SCRATCH_PARENT).glob(f"{trial_id}-*"))


def check_trial_runs(spec: StudySpec, outcome) -> None:
    """Every trial's run has its files, every epoch's metrics and its test metrics,
    uploaded from its checkpoint in storage: the node kept none of them."""
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(tracker, spec.name)}
    assert set(runs) == {t.trial_id for t in outcome.trials}
    assert not (spec.folder / "trials").exists()  # no trial writes into the study folder
    for trial in outcome.trials:
        assert trial.status == "FINISHED", trial.error
        run = runs[trial.trial_id]
        assert not scratch_left(trial.trial_id)  # removed before the driver uploaded
        assert run.info.status == "FINISHED"
        assert TAG_ARTIFACT_ERROR not in run.data.tags
        assert FULL_RUN <= artifacts(tracker.client, run.info.run_id)
        for key in ("val/pgd_acc", "train/loss", "lr"):
            steps = sorted(m.step for m in tracker.client.get_metric_history(run.info.run_id, key))
            assert steps == [1, 2], (key, steps)
        assert run.data.metrics["test/clean_acc"] == pytest.approx(trial.metrics["test/clean_acc"])
        # the uploaded energies are the ones of the trial's last checkpoint in storage
        with tempfile.TemporaryDirectory() as tmp, trial_files(spec, trial.trial_id) as stored:
            assert stored is not None and (stored / FINAL_FILE).is_file()
            got = tracker.download(run.info.run_id, ENERGIES_FILE, tmp)
            with np.load(got) as a, np.load(stored / ENERGIES_FILE) as b:
                assert set(a.files) == set(b.files) and a.files
                for key in a.files:
                    np.testing.assert_array_equal(a[key], b[key])
            # the worker drew the histogram into its final checkpoint; the driver uploaded it
            hist = stored / ENERGY_HIST
            assert hist.is_file() and hist.read_bytes()[:4] == b"\x89PNG"
            got = tracker.download(run.info.run_id, ENERGY_HIST, Path(tmp, "hist"))
            assert Path(got).read_bytes() == hist.read_bytes()


@pytest.mark.usefixtures("ray_cluster")
def test_direct_trials_reach_mlflow_through_their_checkpoints(tmp_path) -> None:
    spec = make_spec(tmp_path, "ckpt-direct", backend="direct")
    outcome = run_study(spec)
    check_trial_runs(spec, outcome)
    for trial in outcome.trials:  # Tune's trial storage holds the final checkpoint
        checkpoint = latest_stored_checkpoint(spec, trial.trial_id)
        assert checkpoint is not None and "/tune/" in checkpoint.path


@pytest.mark.usefixtures("ray_cluster")
def test_train_backend_trials_reach_mlflow_through_the_train_run_checkpoints(tmp_path) -> None:
    spec = make_spec(tmp_path, "ckpt-train", backend="train", trials=1)
    outcome = run_study(spec)
    check_trial_runs(spec, outcome)
    (trial,) = outcome.trials
    checkpoint = latest_stored_checkpoint(spec, trial.trial_id)
    assert checkpoint is not None
    assert checkpoint.path.startswith(spec.location("train", trial.trial_id))


# --- a file missing from a trial's checkpoint, an upload that fails ---------------------------
def _store(tmp_path: Path) -> tuple[StudySpec, str]:
    spec = make_spec(tmp_path, "lacking", trials=2)
    spec.save()
    _, parent = open_parent_run(spec)
    return spec, parent


def _finished_folder(tmp_path: Path, name: str, *, without: tuple[str, ...] = ()) -> Path:
    """A folder shaped like a finished trial's last checkpoint, minus ``without``."""
    folder = tmp_path / name
    for rel in (BEST_CHECKPOINT, LAST_CHECKPOINT, CONFIG_FILE, METRICS_LOG, FINAL_FILE):
        if rel not in without:
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(f"{rel}\n")
    if ENERGIES_FILE not in without:
        np.savez(folder / ENERGIES_FILE, energy=np.arange(3.0))
    return folder


def _trial(trial_id: str, checkpoint, epochs: int = 2) -> SimpleNamespace:
    """What the callback reads of a Tune trial: id, config, checkpoint, last result."""
    config = {"method": "weat_adv", "beta": 1.0, "weight_fn": "weat"}
    result = {"epoch": epochs, "val/pgd_acc": 0.5, "test/clean_acc": 0.9, "training_iteration": 2}
    return SimpleNamespace(
        trial_id=trial_id, config=config, checkpoint=checkpoint, last_result=result
    )


def test_a_missing_or_failed_artifact_is_tagged_and_shown(tmp_path, capsys, monkeypatch) -> None:
    from ray.tune import Checkpoint

    monkeypatch.setattr("study.callbacks.UPLOAD_WAIT_S", 0.01)  # the retries, quickly

    spec, parent = _store(tmp_path)
    callback = MlflowCallback(spec, parent)
    whole = _trial("abc12_00000", Checkpoint.from_directory(_finished_folder(tmp_path, "a")))
    lacking_dir = _finished_folder(tmp_path, "b", without=(ENERGIES_FILE,))
    lacking = _trial("abc12_00001", Checkpoint.from_directory(lacking_dir))
    failing = _trial("abc12_00002", Checkpoint.from_directory(_finished_folder(tmp_path, "c")))
    for trial in (whole, lacking, failing):
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, dict(trial.last_result))
    callback.writer.flush()
    # the failing run's artifact folder is a file: every upload into it fails
    run_c = callback.run_id(failing.trial_id, failing.config)
    repo = Path(MlflowTracker(spec.tracking_uri, spec.name).get_run(run_c).info.artifact_uri[7:])
    shutil.rmtree(repo, ignore_errors=True)
    repo.parent.mkdir(parents=True, exist_ok=True)
    repo.write_text("not a folder\n")
    for trial in (whole, lacking, failing):
        callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])

    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(tracker, spec.name)}
    assert TAG_ARTIFACT_ERROR not in runs["abc12_00000"].data.tags
    assert FULL_RUN <= artifacts(tracker.client, runs["abc12_00000"].info.run_id)
    assert runs["abc12_00001"].data.tags[TAG_ARTIFACT_ERROR] == (
        f"{ENERGIES_FILE}: not in the trial's checkpoint"
    )
    failed = runs["abc12_00002"].data.tags[TAG_ARTIFACT_ERROR]
    assert f"{BEST_CHECKPOINT}: upload failed" in failed and f"{ENERGIES_FILE}: upload" in failed
    assert all(r.info.status == "FINISHED" for r in runs.values())
    err = capsys.readouterr().err
    assert "trial abc12_00001: its MLflow run lacks energies.npz" in err

    assert cli.main(["show", spec.name, "--tracking-uri", spec.tracking_uri]) == 0
    out = capsys.readouterr().out
    assert f"artifacts missing: {ENERGIES_FILE}: not in the trial's checkpoint" in out
    assert out.count("artifacts missing:") == 2


def test_a_trial_without_a_checkpoint_and_a_stopped_trial(tmp_path) -> None:
    """No checkpoint at all is recorded; an early-stopped trial needs no test files."""
    from ray.tune import Checkpoint

    spec, parent = _store(tmp_path)
    callback = MlflowCallback(spec, parent)
    none = _trial("abc12_00000", None)
    stopped_dir = _finished_folder(
        tmp_path, "s", without=(ENERGIES_FILE, FINAL_FILE, BEST_CHECKPOINT)
    )
    stopped = _trial("abc12_00001", Checkpoint.from_directory(stopped_dir), epochs=1)
    for trial in (none, stopped):
        callback.on_trial_start(0, [], trial)
        callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    runs = {
        r.data.tags[TAG_TRIAL]: r
        for r in trial_runs(MlflowTracker(spec.tracking_uri, spec.name), spec.name)
    }
    assert (
        runs["abc12_00000"].data.tags[TAG_ARTIFACT_ERROR] == "checkpoint: the trial reported none"
    )
    assert runs["abc12_00001"].data.tags[TAG_EARLY] == "true"
    assert TAG_ARTIFACT_ERROR not in runs["abc12_00001"].data.tags


# --- a restarted finished trial reads its files from its checkpoint ---------------------------
def test_a_finished_run_is_read_back_from_its_checkpoint(tmp_path) -> None:
    from ray.tune import Checkpoint

    cfg = TrainConfig.from_dict({**BASE, "epochs": 1, "method": "standard", "test_subset": 50})
    node = tmp_path / "node"
    result = train(cfg, output_dir=node)
    checkpoint = Checkpoint.from_directory(str(node))
    elsewhere = tmp_path / "other-node"
    assert restore_files(checkpoint, elsewhere) == elsewhere / LAST_CHECKPOINT
    # metrics.jsonl is what JsonlReporter writes; the loop alone does not: add its line
    (elsewhere / METRICS_LOG).write_text('{"epoch": 1, "val/pgd_acc": 0.5}\n')
    (elsewhere / FINAL_FILE).write_text('{"metrics": {"test/clean_acc": 0.75}}\n')
    done = finished_run(elsewhere, cfg)
    assert done == {"epoch": 1, "val/pgd_acc": 0.5, "test/clean_acc": 0.75}
    assert finished_run(elsewhere, cfg.replace(epochs=2)) is None  # another config
    assert result.best_epoch == 1


# --- the background writer ---------------------------------------------------------------------
def test_background_writer_keeps_order_batches_and_loses_nothing(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "writer")
    run_id = tracker.create_run("w", {TAG_STUDY: "writer", TAG_ROLE: ROLE_STUDY})
    batches: list[int] = []
    real = MlflowClient.log_batch

    def counting(self, run_id, metrics=(), *args, **kwargs):
        if metrics:
            batches.append(len(metrics))
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counting)
    writer = BackgroundWriter()
    gate = threading.Event()
    writer.submit("wait", gate.wait)  # the queue fills while the writer waits
    for step in range(1, 51):
        points = [("val/pgd_acc", step / 100, step), ("epoch", float(step), step)]
        writer.submit(
            "epoch", lambda p=points: writer.buffer(tracker, run_id, p), metrics_only=True
        )
    failures = iter([RuntimeError("server unreachable")])

    def flaky_end() -> None:
        if (exc := next(failures, None)) is not None:
            raise exc
        tracker.end_run(run_id, "FINISHED")

    writer.submit("end run", flaky_end)
    gate.set()
    writer.close()
    history = tracker.client.get_metric_history(run_id, "val/pgd_acc")
    assert sorted(m.step for m in history) == list(range(1, 51))  # nothing lost
    assert batches == [100]  # the 50 queued epochs went out in one log_batch
    assert tracker.get_run(run_id).info.status == "FINISHED"  # tried again, after the metrics
    assert writer.errors == []
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit("late", lambda: None)


def test_background_writer_records_what_fails_for_good(tmp_path, capsys) -> None:
    writer = BackgroundWriter(attempts=2, wait_s=0.01)
    done: list[int] = []

    def broken() -> None:
        raise OSError("no route to host")

    writer.submit("tag run r1", broken)
    writer.submit("tag run r2", lambda: done.append(2))
    writer.close()
    assert done == [2]  # a failed item does not stop the ones after it
    assert writer.errors == ["MLflow write failed (tag run r1) after 2 tries: no route to host"]
    assert "warning: MLflow write failed (tag run r1)" in capsys.readouterr().err


def test_epochs_a_killed_driver_lost_are_filled_in_from_the_checkpoint(tmp_path) -> None:
    """Epoch 2's metrics were still in the writer when the driver died; the resumed trial
    went on from its epoch-2 checkpoint. At the trial's end its run gets epoch 2 from the
    checkpoint's metrics.jsonl, and no epoch twice."""
    from ray.tune import Checkpoint

    spec, parent = _store(tmp_path)
    folder = _finished_folder(tmp_path, "f", without=(METRICS_LOG,))
    rows = [{"epoch": e, "val/pgd_acc": 0.1 * e, "lr": 0.01} for e in (1, 2, 3)]
    (folder / METRICS_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    trial = _trial("abc12_00000", Checkpoint.from_directory(folder), epochs=3)
    callback = MlflowCallback(spec, parent)
    callback.on_trial_start(0, [], trial)
    for row in (rows[0], {**rows[2], "test/clean_acc": 0.9}):  # epoch 2 never arrived
        callback.on_trial_result(0, [], trial, {**row, "training_iteration": row["epoch"]})
    callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])

    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    (run,) = trial_runs(tracker, spec.name)
    client = tracker.client
    for metric in ("epoch", "val/pgd_acc", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
        assert steps == [1, 2, 3], (metric, steps)
    values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/pgd_acc")}
    assert values[2] == pytest.approx(0.2)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/clean_acc")] == [3]


# --- few requests per trial; the histogram drawn on the worker --------------------------------
#: ``MlflowClient`` methods counted (each call is one request to the store).
CLIENT_CALLS = (
    "search_runs", "create_run", "update_run", "get_run", "get_metric_history", "log_batch",
    "log_text", "log_artifact", "log_artifacts", "set_terminated", "list_artifacts",
)  # fmt: skip


def _count_client_calls(monkeypatch) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Count the real ``MlflowClient``'s calls by method (inner calls of a counted one not
    counted again), and the sizes of each ``log_batch``."""
    from mlflow.tracking import MlflowClient

    calls: dict[str, int] = {}
    batches: list[dict[str, int]] = []
    depth = threading.local()

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            if getattr(depth, "n", 0):
                return original(self, *args, **kwargs)
            calls[name] = calls.get(name, 0) + 1
            if name == "log_batch":
                sizes = {k: len(kwargs.get(k) or ()) for k in ("metrics", "params", "tags")}
                batches.append(sizes)
            depth.n = 1
            try:
                return original(self, *args, **kwargs)
            finally:
                depth.n = 0

        return counted

    for name in CLIENT_CALLS:
        monkeypatch.setattr(MlflowClient, name, wrap(name, getattr(MlflowClient, name)))
    return calls, batches


def test_a_finished_trial_costs_few_requests_and_its_worker_drawn_histogram(
    tmp_path, monkeypatch
) -> None:
    """One finished trial of 2 epochs: one search, one run, the params, process tags and
    first metrics in one log_batch, config.yaml once, the checkpoint's files in one
    upload, the histogram the worker drew (not drawn again), the end: 8 requests at most
    (20 before). Nothing lost: every param, epoch and file is in the run."""
    from ray.tune import Checkpoint

    from study.tracking import flatten
    from trainables.reporting import draw_energy_histogram

    spec, parent = _store(tmp_path)
    folder = _finished_folder(tmp_path, "w", without=(METRICS_LOG,))
    rows = [{"epoch": e, "val/pgd_acc": 0.1 * e, "lr": 0.01} for e in (1, 2)]
    (folder / METRICS_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = draw_energy_histogram(folder, "trial abc12_00000")  # what the worker does
    assert png == folder / ENERGY_HIST and png.stat().st_size > 0
    drawn = png.read_bytes()
    trial = _trial("abc12_00000", Checkpoint.from_directory(folder))
    calls, batches = _count_client_calls(monkeypatch)
    monkeypatch.setattr(
        "study.callbacks.energy_histogram",
        lambda *a: pytest.fail("the driver drew a histogram its checkpoint carries"),
    )
    callback = MlflowCallback(spec, parent)
    callback.on_trial_start(0, [], trial)
    for row in (rows[0], {**rows[1], "test/clean_acc": 0.9}):
        result = {**row, "training_iteration": row["epoch"], "hostname": "h", "pid": 7}
        callback.on_trial_result(0, [], trial, result)
    callback.on_trial_complete(0, [], trial)
    callback.on_experiment_end([])
    monkeypatch.undo()

    per_trial = dict(calls)
    assert sum(per_trial.values()) <= 8, per_trial
    for name in ("search_runs", "create_run", "log_text", "log_artifacts", "set_terminated"):
        assert per_trial.pop(name) == 1, (name, calls)
    assert 2 <= per_trial.pop("log_batch") <= 3, calls  # epochs 1 and 2 together or apart
    assert per_trial == {}, calls  # no get_run, history, update_run, per-file upload
    assert min(batches[0].values()) > 0, batches  # params, tags, first metrics: one batch

    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    (run,) = trial_runs(tracker, spec.name)
    assert run.info.status == "FINISHED" and TAG_ARTIFACT_ERROR not in run.data.tags
    cfg = spec.trial_config(trial.config)
    assert run.data.params == flatten(cfg.to_dict())
    assert run.data.tags[TAG_PROCESS] == "h:7"
    assert FULL_RUN <= artifacts(tracker.client, run.info.run_id)
    for key in ("epoch", "val/pgd_acc", "lr"):
        steps = sorted(m.step for m in tracker.client.get_metric_history(run.info.run_id, key))
        assert steps == [1, 2], (key, steps)
    got = tracker.download(run.info.run_id, ENERGY_HIST, tmp_path / "down")
    assert got.read_bytes() == drawn  # the worker's figure, uploaded as it was


# --- a metrics batch that fails for good is tagged on its run -----------------------------------
def test_metrics_a_store_refused_are_tagged_on_the_run_or_filled_in(tmp_path, capsys) -> None:
    """A real store refusing writes: both runs are deleted while a trial's epoch 2 goes
    out (MLflow refuses writes into a deleted run), then restored. The finished trial
    gets epoch 2 back from its checkpoint's metrics.jsonl at its end and only its lost
    test metric is tagged; the failed trial's run names the epoch's keys and step."""
    from ray.tune import Checkpoint

    spec, parent = _store(tmp_path)
    folder = _finished_folder(tmp_path, "f", without=(METRICS_LOG,))
    rows = [{"epoch": e, "val/pgd_acc": 0.1 * e, "lr": 0.01} for e in (1, 2)]
    (folder / METRICS_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = _trial("abc12_00000", Checkpoint.from_directory(folder))
    failed = _trial("abc12_00001", None)
    callback = MlflowCallback(spec, parent)
    callback.writer.wait_s = 0.01  # its retries, quickly
    client = callback.tracker.client
    for trial in (done, failed):
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, {**rows[0], "training_iteration": 1})
    callback.writer.flush()
    run_ids = [callback.run_id(t.trial_id, t.config) for t in (done, failed)]
    for run_id in run_ids:
        client.delete_run(run_id)
    callback.on_trial_result(0, [], done, {**rows[1], "test/clean_acc": 0.9})
    callback.on_trial_result(0, [], failed, {**rows[1], "training_iteration": 2})
    callback.writer.flush()
    assert set(callback.writer.lost) == set(run_ids)
    for run_id in run_ids:
        client.restore_run(run_id)
    callback.on_trial_complete(0, [], done)
    callback.on_trial_error(0, [], failed)
    callback.on_experiment_end([])

    from study.callbacks import TAG_METRICS_ERROR

    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(tracker, spec.name)}
    finished, broken = runs[done.trial_id], runs[failed.trial_id]
    for key in ("epoch", "val/pgd_acc", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(finished.info.run_id, key))
        assert steps == [1, 2], (key, steps)  # epoch 2 filled in from the checkpoint
    assert finished.data.tags[TAG_METRICS_ERROR] == ("1 metric points at steps 2 of test/clean_acc")
    assert finished.info.status == "FINISHED"
    assert broken.data.tags[TAG_METRICS_ERROR] == (
        "3 metric points at steps 2 of epoch, lr, val/pgd_acc"
    )
    assert broken.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(broken.info.run_id, "epoch")] == [1]
    err = capsys.readouterr().err
    assert f"MLflow run {broken.info.run_id} lacks 3 metric points at steps 2" in err


# --- study resume --tracking-uri NEW: the callback writes through NEW ---------------------------
def test_an_unpickled_callback_takes_the_resuming_drivers_spec(tmp_path, capsys) -> None:
    """Tuner.restore unpickles the callback saved with the study; the spec and parent run
    of the callback the resuming driver made first (another tracking URI) win, for that
    study only."""
    import pickle

    spec, parent = _store(tmp_path)
    saved = pickle.dumps(MlflowCallback(spec, parent))
    moved = make_spec(tmp_path, "lacking", tracking_uri=f"sqlite:///{tmp_path / 'moved.db'}")
    MlflowCallback(moved, "parent-in-moved")  # what study_tuner makes before the restore
    restored = pickle.loads(saved)
    assert restored.spec.tracking_uri == moved.tracking_uri
    assert restored.parent_run_id == "parent-in-moved"
    assert "resumes with the MLflow tracking URI sqlite:///" in capsys.readouterr().err
    other = make_spec(tmp_path, "other-study")
    again = pickle.loads(pickle.dumps(MlflowCallback(other, "p")))
    assert again.spec.tracking_uri == other.tracking_uri and again.parent_run_id == "p"


@pytest.mark.usefixtures("ray_cluster")
def test_resume_with_another_tracking_uri_writes_the_trials_there(tmp_path, monkeypatch) -> None:
    """The study stops (SIGINT, as Ctrl-C) once its first trial has ended; its store is
    copied (the server moved: same data, new address) and `study resume --tracking-uri
    NEW` finishes it: the trial that ran after the resume is recorded in the new store
    only, under the same parent run, with no run duplicated."""
    import os
    import signal

    import ray

    from study import callbacks
    from study.runner import StudyInterrupted

    spec = make_spec(tmp_path / "old", "moved", trials=2, epochs=1, max_concurrent=1)
    stops: list[str] = []
    complete = callbacks.ProgressCallback.on_trial_complete

    def stop_after_first(self, iteration, trials, trial, **info) -> None:
        complete(self, iteration, trials, trial, **info)
        if not stops:
            stops.append(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)  # Tune's handler: a graceful stop

    monkeypatch.setattr(callbacks.ProgressCallback, "on_trial_complete", stop_after_first)
    with pytest.raises(StudyInterrupted):
        run_study(spec)
    monkeypatch.undo()
    (first,) = stops

    old = MlflowTracker(spec.tracking_uri, spec.name)
    before = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(old, spec.name)}
    assert before[first].info.status == "FINISHED"
    new_dir = tmp_path / "new"
    shutil.copytree(tmp_path / "old", new_dir, ignore=shutil.ignore_patterns("studies"))
    new_uri = f"sqlite:///{new_dir / 'mlflow.db'}"
    address = ray.get_runtime_context().gcs_address
    argv = ["resume", spec.name, "--storage", spec.storage, "--tracking-uri", new_uri,
            "--address", address]  # fmt: skip
    assert cli.main(argv) == 0

    new = MlflowTracker(new_uri, spec.name)
    after = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(new, spec.name)}
    assert len(after) == 2 and all(r.info.status == "FINISHED" for r in after.values())
    (second,) = set(after) - {first}
    assert "test/clean_acc" in after[second].data.metrics
    assert TAG_PROCESS in after[second].data.tags  # its results came through the callback
    assert after[second].data.tags[PARENT_TAG] == before[first].data.tags[PARENT_TAG]
    # the old store never saw the resumed trial finish
    untouched = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(old, spec.name)}
    assert second not in untouched or "test/clean_acc" not in untouched[second].data.metrics
    assert untouched[first].info.end_time == before[first].info.end_time


def test_a_run_draws_its_energy_histogram_at_its_final_report(tmp_path) -> None:
    """The worker's side: a real run whose reporters include EnergyHistogramReporter
    leaves energy_hist.png beside energies.npz, before the reporters after it (Ray's,
    which snapshots the folder into the final checkpoint) are called."""
    from trainables.reporting import EnergyHistogramReporter, MultiReporter

    seen: list[bool] = []

    class After:  # what Ray's reporter would find in the folder at the final report
        def report(self, epoch, metrics, checkpoint) -> None:
            seen.append((out / ENERGY_HIST).exists())

        def final(self, metrics, artifacts) -> None:
            seen.append((out / ENERGY_HIST).read_bytes()[:4] == b"\x89PNG")

    cfg = TrainConfig.from_dict({**BASE, "epochs": 1, "method": "standard", "test_subset": 50})
    out = tmp_path / "run"
    reporter = MultiReporter(EnergyHistogramReporter(out, "trial t"), After())
    train(cfg, reporter=reporter, output_dir=out)
    assert seen == [False, True]  # not after the epoch, drawn before the final report


def test_one_runs_batch_is_cut_to_mlflows_limits_and_loses_nothing(tmp_path) -> None:
    """Params, tags and metric points of one run, more than one log_batch may carry: cut
    into requests MLflow accepts (100 params, 100 tags, 1000 entries), all stored."""
    from study.tracking import BATCH_ENTITIES, BATCH_PARAMS, BATCH_TAGS, batch_chunks

    chunks = list(batch_chunks(list(range(2500)), list(range(250)), list(range(150))))
    assert all(len(p) <= BATCH_PARAMS and len(t) <= BATCH_TAGS for _, p, t in chunks)
    assert all(len(m) + len(p) + len(t) <= BATCH_ENTITIES for m, p, t in chunks)
    for i, name in enumerate(("metrics", "params", "tags")):
        assert [x for c in chunks for x in c[i]] == list(range((2500, 250, 150)[i])), name
    assert list(batch_chunks([], [], [])) == []

    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "limits")
    run_id = tracker.create_run("r", {TAG_STUDY: "limits"})
    points = [(f"m{k}", float(step), step) for k in range(3) for step in range(500)]
    params = {f"p{i}": i for i in range(150)}
    tags = {f"t{i}": i for i in range(120)}
    assert tracker.log_batch(run_id, points, params, tags) == 2
    run = tracker.get_run(run_id)
    assert run.data.params == {k: str(v) for k, v in params.items()}
    assert {f"t{i}" for i in range(120)} <= set(run.data.tags)
    for k in range(3):
        history = tracker.client.get_metric_history(run_id, f"m{k}")
        assert sorted(m.step for m in history) == list(range(500))
