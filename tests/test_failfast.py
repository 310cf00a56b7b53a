"""Fail fast, fail clearly, lose nothing: bad inputs fail before anything is created,
checkpoints survive a kill mid-write, a fresh store is created once, Ctrl-C keeps the
study resumable and a second Ctrl-C stops at once."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from study import cli
from study.export import trial_runs
from study.tracking import TAG_ROLE, TAG_STUDY, TAG_TRIAL, MlflowTracker
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.errors import CheckpointError

STUDY = [sys.executable, "-m", "study"]
BAD_SPACE = "params:\n  method: {type: categorical, choices: [trades, nosuchmethod]}\n"

#: (name, arguments of `study run`, words the one-paragraph error must hold)
BAD_INPUTS = [
    ("choice the config refuses", ["--space", "bad.yaml"], ["bad.yaml:2", "nosuchmethod"]),
    ("zero trials", ["--trials", "0"], ["trials = 0"]),
    ("unknown metric", ["--metric", "val/nonexistent_metric"], ["val/nonexistent_metric"]),
    ("GPU on a machine without", ["--gpus-per-trial", "1"], ["GPU"]),
    ("more CPUs than a node has", ["--cpus-per-worker", "64"], ["64 CPU", "largest node"]),
    ("storage not writable", ["--storage", "/proc/nowrite"], ["/proc/nowrite", "--storage"]),
    ("no tracking server", ["--tracking-uri", "http://127.0.0.1:9"], ["127.0.0.1:9"]),
    ("no Ray cluster", ["--address", "127.0.0.1:9"], ["no Ray cluster", "127.0.0.1:9"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,args,words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_fast_with_one_paragraph_and_creates_nothing(
    tmp_path: Path, name: str, args: list[str], words: list[str]
) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_SPACE)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.monotonic()
    proc = subprocess.run(
        [*STUDY, "run", *args, "--connect-timeout", "5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    elapsed = time.monotonic() - t0
    err = proc.stderr
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert elapsed < 30, elapsed
    assert "Traceback" not in err, err[-2000:]
    message = err[err.index("study run: error:") :]
    for word in words:
        assert word in message, (word, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], list(tmp_path.iterdir())


def _write_forever(path: str) -> None:
    big = {"model": {"w": torch.randn(4_000_000)}, "epoch": 0}
    i = 0
    while True:
        i += 1
        big["epoch"] = i
        save_checkpoint(path, big)


def test_a_checkpoint_killed_mid_write_is_never_half_there(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites a 16 MB checkpoint in a loop, several times:
    what is left at the checkpoint's path always loads (old or new, never half)."""
    path = tmp_path / "last.pt"
    ctx = multiprocessing.get_context("spawn")
    for delay in (0.05, 0.13, 0.31):
        proc = ctx.Process(target=_write_forever, args=(str(path),))
        proc.start()
        deadline = time.monotonic() + 60
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # somewhere inside a later write
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        state = load_checkpoint(path)
        assert state["model"]["w"].numel() == 4_000_000 and state["epoch"] >= 1
    # the killed writers' partial files are theirs alone and never under the real name
    assert all(p.name == "last.pt" or p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_a_refused_pickle_is_named_apart_from_a_truncated_file(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path / "good.pt", {"model": {"w": torch.zeros(3)}, "epoch": 1})
    evil = tmp_path / "evil.pt"
    torch.save({"format": "energy-study/checkpoint-v1", "x": Path("/")}, evil)
    with pytest.raises(CheckpointError, match="refused: the file holds Python objects"):
        load_checkpoint(evil)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or\\s+truncated") as info:
        load_checkpoint(cut)
    assert "refused:" not in str(info.value)


def _open_store(uri: str, name: str, go: float) -> None:
    while time.time() < go:
        time.sleep(0.001)
    MlflowTracker(uri, name).client.create_run(MlflowTracker(uri, name).experiment_id)


@pytest.mark.slow
def test_two_processes_open_the_same_fresh_store(tmp_path: Path) -> None:
    """Both processes get their experiment; the store's schema is created once."""
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(3):
        uri = f"sqlite:///{tmp_path / f'store{round_}' / 'mlflow.db'}"
        go = time.time() + 4.0  # both start at the same moment, after their imports
        procs = [ctx.Process(target=_open_store, args=(uri, f"s{i}", go)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        names = {e.name for e in MlflowTracker(uri, "s0").client.search_experiments()}
        assert {"s0", "s1"} <= names


def _study_cmd(tmp_path: Path, name: str, address: str) -> list[str]:
    return [
        *STUDY, "run", "--space", "smoke", "--name", name, "--trials", "4", "--epochs", "6",
        "--no-asha", "--max-concurrent", "2", "--finalists", "0", "--address", address,
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--storage", str(tmp_path / "studies"),
        "--set", "eps=0.1", "--set", "step_size=0.025", "--set", "attack_steps=3",
        "--set", "val_attack_steps=3", "--set", "eval_steps=3", "--set", "test_subset=100",
    ]  # fmt: skip


def _start_and_wait_for_an_epoch(cmd: list[str], log: Path) -> subprocess.Popen:
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if " epoch 1:" in log.read_text():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no trial reported an epoch:\n" + log.read_text()[-3000:])


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_ctrl_c_keeps_the_study_resumable(tmp_path: Path) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    proc = _start_and_wait_for_an_epoch(_study_cmd(tmp_path, "sigint", address), log)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(120)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "continue with:" in text and "study resume sigint" in text, text[-3000:]
    tracker = MlflowTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "sigint")
    parent = tracker.find_runs(**{TAG_STUDY: "sigint", TAG_ROLE: "study"})
    assert [r.info.status for r in parent] == ["KILLED"]
    assert all(r.info.status != "RUNNING" for r in trial_runs(tracker, "sigint"))

    resume = ["resume", "sigint", "--address", address, "--storage", str(tmp_path / "studies"),
              "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # fmt: skip
    assert cli.main(resume) == 0
    runs = trial_runs(tracker, "sigint")
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == 4, ids
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "val/pgd_acc")]
        assert sorted(steps) == list(range(1, 7)), steps  # no epoch lost, none twice
    parent = tracker.find_runs(**{TAG_STUDY: "sigint", TAG_ROLE: "study"})
    assert [r.info.status for r in parent] == ["FINISHED"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    import ray

    address = ray.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    proc = _start_and_wait_for_an_epoch(_study_cmd(tmp_path, "twice", address), log)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in text, text[-3000:]
    assert "study resume twice" in text, text[-3000:]


@pytest.mark.slow
def test_two_study_runs_on_the_same_fresh_store_both_run(tmp_path: Path) -> None:
    """Two `study run` processes started together on one new SQLite store: both finish,
    each with its own study, and the store holds both.

    Each starts its own local Ray cluster: two Tune runs that start in the same second
    on one Ray session share a staging folder (Ray names it by the second and the run
    name), which is Ray's race, not the store's.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    tracking = f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"
    procs = []
    for name in ("twin-a", "twin-b"):
        cmd = [
            *STUDY, "run", "--space", "smoke", "--name", name, "--trials", "1", "--epochs", "1",
            "--no-asha", "--finalists", "0", "--tracking-uri", tracking,
            "--storage", str(tmp_path / "studies"), "--set", "attack_steps=2",
            "--set", "val_attack_steps=2", "--set", "eval_steps=2", "--set", "test_subset=50",
        ]  # fmt: skip
        log = open(tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append((name, proc, log))
    for name, proc, log in procs:
        rc = proc.wait(300)
        log.close()
        text = (tmp_path / f"{name}.log").read_text()
        assert rc == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
    for name in ("twin-a", "twin-b"):
        (run,) = trial_runs(MlflowTracker(tracking, name), name)
        assert run.info.status == "FINISHED"


def test_a_tune_state_cut_short_by_a_killed_driver_is_put_back_from_the_backup(tmp_path):
    """StateBackup copies only a whole state file; repair_experiment_state puts the
    copy back when the newest state does not parse, and leaves a whole one alone."""
    import json

    from study.callbacks import STATE_BACKUP, StateBackup, repair_experiment_state

    state = tmp_path / "experiment_state-2026-12-02_16-07-18.json"
    whole = json.dumps({"trial_data": [["t1", "{}"]], "runner_data": {}})
    state.write_text(whole)
    backup = StateBackup(tmp_path)
    backup.backup()
    assert (tmp_path / STATE_BACKUP).read_text() == whole
    state.write_text(whole[:20])  # a write in progress: the copy stays the whole one
    backup.backup()
    assert (tmp_path / STATE_BACKUP).read_text() == whole
    assert not repair_experiment_state(tmp_path / "elsewhere")
    state.write_text("")  # the driver was killed while writing it
    assert repair_experiment_state(tmp_path)
    assert json.loads(state.read_text()) == json.loads(whole)
    assert not repair_experiment_state(tmp_path)  # a whole state is left alone


def test_a_whole_tune_state_is_told_from_a_cut_one_by_its_end(tmp_path):
    """Tune's layout (``stats`` last, the trials as escaped JSON strings, even ones that
    hold the same words): whole only when written to the end, wherever it is cut."""
    import json

    from study.callbacks import STATE_BACKUP, StateBackup, state_is_whole

    trial = json.dumps({"stats": {"start_time": 1.0}, "results": list(range(300))})
    text = json.dumps(
        {"trial_data": [[trial, trial]], "runner_data": {"n": 1}, "stats": {"start_time": 17.5}}
    )
    path = tmp_path / "experiment_state-2026-12-03_10-00-00.json"
    path.write_text(text)
    assert state_is_whole(path)
    for cut in (len(text) - 1, len(text) - 2, len(text) - 10, len(text) // 2, len(trial), 5):
        path.write_text(text[:cut])
        assert not state_is_whole(path), cut
        StateBackup(tmp_path).backup()
        assert not (tmp_path / STATE_BACKUP).exists()
    path.write_text(text + "\n")
    StateBackup(tmp_path).backup()
    assert (tmp_path / STATE_BACKUP).read_text() == text + "\n"


def _search_generator(limit: int):
    """Tune's own search wrappers around the study's searcher, as ``Tuner`` builds them."""
    import optuna
    from ray.tune.search import ConcurrencyLimiter, SearchGenerator

    from study.search import StudySearch

    space = {"beta": optuna.distributions.FloatDistribution(1.0, 10.0)}
    searcher = StudySearch(space=space, metric="val/pgd_acc", mode="max", seed=0)
    return SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=limit))


def _trial_list(folder, trials: dict[str, str]) -> None:
    """An experiment state as Tune writes it: ``[trial state JSON, run metadata]`` per
    trial, with its id and status."""
    import json

    data = [[json.dumps({"trial_id": t, "status": s}), "{}"] for t, s in trials.items()]
    state = folder / "experiment_state-2026-12-03_10-00-00.json"
    state.write_text(json.dumps({"trial_data": data, "runner_data": {"_checkpoint_period": "0.5"}}))


def _optuna_states(generator) -> dict[str, str]:
    searcher = generator.searcher.searcher
    study_states = {t.number: t.state.name for t in searcher._ot_study.get_trials()}
    return {tid: study_states[t.number] for tid, t in searcher._ot_trials.items()}


def test_a_search_state_that_counts_a_trial_the_trial_list_lacks_is_aligned(tmp_path):
    """Killed between the saves: the search state counts 3 trials (b ended, a and
    "lost" running) and the trial list has 2. Restored as is, Tune would never create
    the third; aligned, Tune's own restore reads a count of 2, the lost trial is no
    longer running and its Optuna trial has failed, so the search goes on."""
    from study.callbacks import align_search_state

    saved = _search_generator(limit=2)
    saved.searcher.suggest("b")
    saved.searcher.on_trial_complete("b", {"val/pgd_acc": 0.5, "epoch": 1})
    saved.searcher.suggest("a")
    saved.searcher.suggest("lost")
    saved._counter, saved._total_samples = 3, 3
    saved.save_to_dir(str(tmp_path), "2026-12-03_10-00-00")
    _trial_list(tmp_path, {"a": "RUNNING", "b": "TERMINATED"})

    assert align_search_state(str(tmp_path)) == 1
    restored = _search_generator(limit=2)
    restored.restore_from_dir(str(tmp_path))
    assert restored._counter == 2 and restored._total_samples == 3
    assert not restored.is_finished()
    assert restored.searcher.live_trials == {"a"}
    assert restored.searcher.num_unfinished_live_trials == 1
    assert _optuna_states(restored) == {"b": "COMPLETE", "a": "RUNNING", "lost": "FAIL"}
    assert align_search_state(str(tmp_path)) == 0  # now they agree


def test_a_search_state_older_than_the_trial_list_counts_all_its_trials(tmp_path):
    """The other way round (a search state from the save before): the count rises to
    the trial list's length, so no trial beyond the study's number is created; the
    list's running trial counts against the concurrency limit, and its results, which
    the older searcher never suggested, are skipped instead of failing the study."""
    from study.callbacks import align_search_state

    saved = _search_generator(limit=2)
    saved.searcher.suggest("a")
    saved._counter, saved._total_samples = 1, 3
    saved.save_to_dir(str(tmp_path), "2026-12-03_10-00-00")
    _trial_list(tmp_path, {"a": "RUNNING", "b": "RUNNING", "c": "TERMINATED"})

    assert align_search_state(str(tmp_path)) == -2
    restored = _search_generator(limit=2)
    restored.restore_from_dir(str(tmp_path))
    assert restored._counter == 3 and restored.is_finished()
    assert restored.searcher.live_trials == {"a", "b"}
    restored.on_trial_result("b", {"val/pgd_acc": 0.4, "epoch": 1})
    restored.on_trial_complete("b", {"val/pgd_acc": 0.4, "epoch": 1})
    assert restored.searcher.live_trials == {"a"}
    assert _optuna_states(restored) == {"a": "RUNNING"}
    assert align_search_state(str(tmp_path / "none")) == 0  # no state: nothing to do


def test_a_resumed_study_saves_its_state_as_often_as_the_variable_says(tmp_path):
    """Tune restores its save period from the saved state; the resume puts the one in
    effect there, and a state it cannot parse is left alone."""
    import json

    from study.callbacks import set_saved_save_period

    _trial_list(tmp_path, {"a": "TERMINATED"})
    state = tmp_path / "experiment_state-2026-12-03_10-00-00.json"
    assert set_saved_save_period(str(tmp_path), "5")
    assert json.loads(state.read_text())["runner_data"]["_checkpoint_period"] == "5"
    assert (
        json.loads(state.read_text())["trial_data"][0][0]
        == '{"trial_id": "a", "status": "TERMINATED"}'
    )
    assert not set_saved_save_period(str(tmp_path), "5")  # already so
    state.write_text('{"trial_data": [')  # cut short: repair_experiment_state's business
    assert not set_saved_save_period(str(tmp_path), "7")
    assert state.read_text() == '{"trial_data": ['
