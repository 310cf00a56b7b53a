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
    ROLE_STUDY,
    TAG_ARTIFACT_ERROR,
    TAG_EARLY,
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
