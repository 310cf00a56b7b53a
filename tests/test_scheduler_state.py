"""The trial scheduler's state survives ``study resume``: Ray's own ASHA and median
stopping rule (:func:`study.search.make_scheduler`), their state saved and restored
through Tune's own callback files (:class:`ray.tune.callback.CallbackList`) by
:class:`study.callbacks.SchedulerState`, make the same stop decisions after the
restore as an uninterrupted scheduler fed the same results.

No Ray cluster: the schedulers are driven with Tune's Trial objects, in the order a
study of one trial at a time reports, so the decisions depend on nothing but the
values below.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.tune.callback import CallbackList
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from study.callbacks import SchedulerState
from study.search import make_scheduler
from study.spec import StudySpec

#: per trial, the objective (``val/pgd_acc``) at epochs 1, 2, 3, 4
CURVES = {
    "t1": [0.30, 0.40, 0.45, 0.50],
    "t2": [0.20, 0.25, 0.30, 0.35],
    "t3": [0.35, 0.45, 0.50, 0.55],
    "t4": [0.34, 0.44, 0.47, 0.49],
    "t5": [0.19, 0.36, 0.38, 0.40],
    "t6": [0.28, 0.42, 0.44, 0.46],
    "t7": [0.31, 0.33, 0.35, 0.36],
}


class OneAtATime:
    """What the median rule asks of Tune's controller: the live trials, of which none is
    waiting (one trial at a time), so a trial short of samples runs on."""

    def get_live_trials(self) -> list[Trial]:
        return []


CONTROLLER = OneAtATime()


#: per trial, a second objective (``val/clean_acc``) at epochs 1, 2, 3, 4 (MO-ASHA)
CLEAN = {
    "t1": [0.50, 0.60, 0.62, 0.64],
    "t2": [0.70, 0.72, 0.74, 0.75],
    "t3": [0.40, 0.50, 0.55, 0.58],
    "t4": [0.55, 0.65, 0.66, 0.67],
    "t5": [0.60, 0.62, 0.64, 0.66],
    "t6": [0.30, 0.61, 0.63, 0.65],
    "t7": [0.42, 0.44, 0.46, 0.48],
}


def make_spec(tmp_path: Path, scheduler: str) -> StudySpec:
    if scheduler == "mo-asha":
        return StudySpec(
            name="sched",
            space="smoke",
            base={"dataset": "digits", "model": "small_cnn", "epochs": 4},
            trials=len(CURVES),
            scheduler="asha",
            metrics=["val/pgd_acc", "val/clean_acc"],
            modes=["max", "max"],
            grace_period=1,
            reduction_factor=2,
            finalists=0,
            tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
            storage=str(tmp_path / "studies"),
        )
    return StudySpec(
        name="sched",
        space="smoke",
        base={"dataset": "digits", "model": "small_cnn", "epochs": 4},
        trials=len(CURVES),
        scheduler=scheduler,
        grace_period=1,
        reduction_factor=2,
        finalists=0,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage=str(tmp_path / "studies"),
    )


def run_trial(scheduler: TrialScheduler, trial: Trial, epochs: list[int]) -> list[tuple[int, str]]:
    """Feed ``trial``'s results at ``epochs`` until the scheduler stops it; returns each
    (epoch, decision). The last epoch of a trial that was not stopped completes it."""
    decisions = []
    for epoch in epochs:
        result = result_at(trial.trial_id, epoch)
        action = scheduler.on_trial_result(CONTROLLER, trial, result)
        decisions.append((epoch, action))
        if action == TrialScheduler.STOP:
            scheduler.on_trial_complete(CONTROLLER, trial, result)
            break
    else:
        scheduler.on_trial_complete(CONTROLLER, trial, result)
    trial.status = Trial.TERMINATED
    return decisions


def result_at(trial_id: str, epoch: int) -> dict[str, float]:
    return {
        "epoch": epoch,
        "val/pgd_acc": CURVES[trial_id][epoch - 1],
        "val/clean_acc": CLEAN[trial_id][epoch - 1],
    }


def new_trial(scheduler: TrialScheduler, trial_id: str) -> Trial:
    trial = Trial("run_trial", trial_id=trial_id, stub=True)
    scheduler.on_trial_add(CONTROLLER, trial)
    return trial


def uninterrupted(spec: StudySpec) -> dict[str, list[tuple[int, str]]]:
    scheduler = make_scheduler(spec)
    return {tid: run_trial(scheduler, new_trial(scheduler, tid), [1, 2, 3, 4]) for tid in CURVES}


def restore(spec: StudySpec, folder: Path, done: list[str], *, saved: bool) -> TrialScheduler:
    """A new scheduler as ``study resume`` builds it: from the spec, its state read back
    from Tune's callback file (when ``saved``), then Tune's restored trials added."""
    scheduler = make_scheduler(spec)
    if saved:
        callbacks = CallbackList([SchedulerState(scheduler)])
        assert callbacks.can_restore(str(folder))
        callbacks.restore_from_dir(str(folder))
        assert callbacks._callbacks[0].restored
    for tid in done:
        trial = Trial("run_trial", trial_id=tid, stub=True)
        trial.status = Trial.TERMINATED
        scheduler.on_trial_add(CONTROLLER, trial)
    return scheduler


@pytest.mark.parametrize("name", ["asha", "median", "mo-asha"])
def test_a_restored_scheduler_decides_as_an_uninterrupted_one(tmp_path, name) -> None:
    spec = make_spec(tmp_path, name)
    expected = uninterrupted(spec)
    ids = list(CURVES)

    # A study of the first three trials, then one cut off after its second epoch, then
    # the driver dies: Tune saves the callback states with its experiment state.
    scheduler = make_scheduler(spec)
    got = {tid: run_trial(scheduler, new_trial(scheduler, tid), [1, 2, 3, 4]) for tid in ids[:3]}
    cut = new_trial(scheduler, ids[3])
    first = run_trial_until(scheduler, cut, 2)
    CallbackList([SchedulerState(scheduler)]).save_to_dir(str(tmp_path), session_str="s1")

    resumed = restore(spec, tmp_path, ids[:3], saved=True)
    again = new_trial(resumed, ids[3])  # restored from its epoch-1 checkpoint: epoch 2 again
    got[ids[3]] = first[:1] + run_trial(resumed, again, [2, 3, 4])
    for tid in ids[4:]:
        got[tid] = run_trial(resumed, new_trial(resumed, tid), [1, 2, 3, 4])
    assert got == expected

    # Without the saved state the later trials are judged differently (the test can fail).
    empty = restore(spec, tmp_path, ids[:3], saved=False)
    fresh = {tid: run_trial(empty, new_trial(empty, tid), [1, 2, 3, 4]) for tid in ids[3:]}
    assert fresh != {tid: expected[tid] for tid in ids[3:]}
    assert any(d == TrialScheduler.STOP for tid in ids[3:] for _, d in expected[tid])


def run_trial_until(scheduler: TrialScheduler, trial: Trial, last: int) -> list[tuple[int, str]]:
    """Feed epochs 1..``last`` of a trial the driver's death then cuts off (no stop)."""
    decisions = []
    for epoch in range(1, last + 1):
        result = result_at(trial.trial_id, epoch)
        decisions.append((epoch, scheduler.on_trial_result(CONTROLLER, trial, result)))
    assert all(d == TrialScheduler.CONTINUE for _, d in decisions)
    return decisions


def test_multi_objective_asha_stops_the_dominated_at_a_rung(tmp_path) -> None:
    """At each rung a trial goes on when its Pareto front is among the best fronts that
    hold half the rung's trials (reduction factor 2), whatever one objective says."""
    from study.search import MultiObjectiveASHA, keeps, pareto_fronts

    assert pareto_fronts([(1, 1), (2, 0), (0, 0), (2, 2), (0, 2)]) == [[3], [0, 1, 4], [2]]
    assert pareto_fronts([(1, 1), (1, 1)]) == [[0, 1]]  # equal points dominate neither
    assert keeps((0.2, 0.9), [(0.5, 0.5)], 2)  # neither dominates: both in front 0
    assert not keeps((0.4, 0.4), [(0.5, 0.5)], 2)  # dominated, the quota of 1 is full
    # the quota is ceil(3 / 2) = 2: front 0 holds one, front 1 (two) is taken whole
    assert keeps((0.4, 0.4), [(0.5, 0.5), (0.45, 0.3)], 2)
    assert not keeps((0.1, 0.1), [(0.5, 0.5), (0.4, 0.4), (0.3, 0.3)], 2)

    spec = make_spec(tmp_path, "mo-asha")
    scheduler = make_scheduler(spec)
    assert isinstance(scheduler, MultiObjectiveASHA) and spec.early_stopping() == "asha"
    assert [m for m, _ in scheduler._rungs] == [1, 2]
    got = uninterrupted(spec)
    # t3 has the best PGD at epoch 1 but a clean accuracy below t1's and t2's: it is
    # dominated by none and goes on. At epoch 1, t6 is dominated by t1 and t4 while
    # front 0 (t2, t3, t4) already fills the quota of 3 of 6: it stops. t7, dominated by
    # t4 only, is in front 1, which the quota of 4 of 7 takes whole: it goes on, and
    # stops at epoch 2, where t1, t3 and t4 dominate it.
    assert got["t3"] == [(e, TrialScheduler.CONTINUE) for e in (1, 2, 3)] + [
        (4, TrialScheduler.STOP)
    ]
    assert got["t6"] == [(1, TrialScheduler.STOP)]
    assert got["t7"] == [(1, TrialScheduler.CONTINUE), (2, TrialScheduler.STOP)]


def test_the_fast_sort_gives_the_fronts_of_peeling_the_non_dominated() -> None:
    """Deb's fast sort against the definition: peel the points no remaining point
    dominates, again and again (seeded points, ties on a coarse grid included)."""
    import random

    from study.search import pareto_fronts

    def dominates(a, b) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    def peeled(points) -> list[list[int]]:
        left, fronts = set(range(len(points))), []
        while left:
            front = sorted(
                i for i in left if not any(dominates(points[j], points[i]) for j in left)
            )
            fronts.append(front)
            left -= set(front)
        return fronts

    rng = random.Random(7)
    for n, m in [(1, 2), (5, 2), (40, 2), (40, 3), (60, 2)]:
        points = [tuple(rng.randint(0, 6) / 6 for _ in range(m)) for _ in range(n)]
        assert pareto_fronts(points) == peeled(points)


def test_hyperband_has_no_saved_state_and_says_so_on_resume(tmp_path) -> None:
    scheduler = make_scheduler(make_spec(tmp_path, "hyperband"))
    assert SchedulerState(scheduler).get_state() is None


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_asha_decides_the_same_across_a_resume(tmp_path, capsys) -> None:
    """A real study split in two (3 trials, then ``study extend`` by 3, which resumes it
    through ``Tuner.restore``) stops the same trials at the same epochs as the same
    study of 6 trials run in one go. One trial at a time, seeded sampler and training,
    so the decisions follow from the scores alone. Before the scheduler's state was
    saved, the resumed half met empty rungs and never stopped a trial at its first one.
    """
    from test_search import _optuna_trials
    from test_search import make_spec as search_spec

    from study import cli
    from study.runner import run_study

    def decisions(spec: StudySpec) -> list[tuple[dict, str, int]]:
        trials = sorted(_optuna_trials(spec), key=lambda t: t.number)
        return [(t.params, t.state.name, max(t.intermediate_values)) for t in trials]

    def spec_of(name: str, trials: int) -> StudySpec:
        return search_spec(
            tmp_path / name,
            name,
            trials=trials,
            scheduler="asha",
            reduction_factor=2,
            max_concurrent=1,
            optuna_storage=f"sqlite:///{tmp_path / name / 'optuna.db'}",
        )

    whole = spec_of("whole", 6)
    run_study(whole)
    expected = decisions(whole)
    assert any(state == "PRUNED" for _, state, _ in expected[3:]), expected  # can fail

    split = spec_of("split", 3)
    run_study(split)
    store = ["--storage", split.storage, "--tracking-uri", split.tracking_uri]
    assert cli.main(["extend", "split", "--trials", "3", *store]) == 0
    assert "starts empty on resume" not in capsys.readouterr().err
    assert decisions(split) == expected


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_multi_objective_study_stops_dominated_trials(tmp_path) -> None:
    """6 trials of 3 epochs, one at a time, on val/pgd_acc and val/clean_acc with the
    default scheduler: MO-ASHA stops some, each one dominated at the epoch it stopped by
    a trial that reached that epoch before it (MLflow's histories); Optuna holds them as
    PRUNED with the epochs they ran, the others COMPLETE after 3 epochs. Whether a trial
    stops rests on the seeds (one trial at a time: sampler and training deterministic).
    """
    from mlflow.tracking import MlflowClient
    from test_search import _optuna_trials
    from test_search import make_spec as search_spec

    from reports.vocabulary import TAG_TRIAL
    from study.export import trial_runs
    from study.runner import run_study
    from study.tracking import MlflowTracker

    metrics = ["val/pgd_acc", "val/clean_acc"]
    spec = search_spec(
        tmp_path,
        "mo",
        trials=6,
        metrics=metrics,
        modes=["max", "max"],
        reduction_factor=2,
        max_concurrent=1,
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    assert spec.early_stopping() == "asha"
    outcome = run_study(spec)
    states = {
        t.number: (t.state.name, t.user_attrs.get("epochs_run")) for t in _optuna_trials(spec)
    }
    assert sorted(s for s, _ in states.values()) == sorted(
        {"FINISHED": "COMPLETE", "STOPPED": "PRUNED"}[t.status] for t in outcome.trials
    )
    assert all(e == 3 for s, e in states.values() if s == "COMPLETE"), states
    assert any(s == "PRUNED" for s, _ in states.values()), states  # the seeds give one

    client = MlflowClient(spec.tracking_uri)
    runs = sorted(
        trial_runs(MlflowTracker(spec.tracking_uri, spec.name), spec.name),
        key=lambda r: r.info.start_time,
    )
    assert len(runs) == 6

    def at(run, epoch: int) -> tuple[float, ...]:
        values = []
        for m in metrics:
            (point,) = [p for p in client.get_metric_history(run.info.run_id, m) if p.step == epoch]
            values.append(point.value)
        return tuple(values)

    by_id = {t.trial_id: t for t in outcome.trials}
    for i, run in enumerate(runs):
        trial = by_id[run.data.tags[TAG_TRIAL]]
        if trial.status != "STOPPED":
            continue
        epoch = int(trial.metrics["epoch"])
        mine = at(run, epoch)
        earlier = [
            at(r, epoch)
            for r in runs[:i]
            if int(by_id[r.data.tags[TAG_TRIAL]].metrics["epoch"]) >= epoch
        ]
        assert any(
            all(o >= v for o, v in zip(other, mine)) and other != mine for other in earlier
        ), (trial.trial_id, epoch, mine, earlier)
