"""What the search learns from: Optuna told the truth about early-stopped trials,
schedulers by name, the TPE sampler's options, and a study name used once.

The real-Ray studies run one trial at a time (``max_concurrent=1``), so the
scheduler's decisions follow from the seeded sampler and the seeded training alone,
never from timing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search_spaces import compile_space
from study import cli
from study.spec import SCHEDULERS, StudySpec
from trainables.errors import ConfigError

#: A digits trial of a few seconds on one core (tests/test_study.py's, on subsets).
BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "eps": 0.1,
    "step_size": 0.025,
    "attack_steps": 2,
    "val_attack_steps": 2,
    "eval_steps": 2,
    "eval_step_size": 0.025,
    "batch_size": 64,
    "autoattack": False,
    "train_subset": 256,
    "val_subset": 128,
    "test_subset": 100,
}


def make_spec(tmp_path: Path, name: str, **kw) -> StudySpec:
    values = {
        "name": name,
        "space": "smoke",
        "base": dict(BASE),
        "trials": 2,
        "epochs": 3,
        "grace_period": 1,
        "finalists": 0,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "storage": str(tmp_path / "studies"),
    }
    values.update(kw)
    return StudySpec(**values)


# -- schedulers by name (no Ray cluster) --------------------------------------------


def test_an_unknown_scheduler_is_refused_listing_the_choices(tmp_path) -> None:
    with pytest.raises(ConfigError) as err:
        make_spec(tmp_path, "s", scheduler="asha2").validate()
    assert "'asha2'" in str(err.value)
    assert all(name in str(err.value) for name in SCHEDULERS)


def test_the_scheduler_in_effect(tmp_path) -> None:
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler, MedianStoppingRule

    from study.search import SCHEDULER_BUILDERS, make_scheduler

    assert set(SCHEDULER_BUILDERS) | {"none"} == set(SCHEDULERS)
    kinds = {"asha": ASHAScheduler, "hyperband": HyperBandScheduler, "median": MedianStoppingRule}
    for name, kind in kinds.items():
        spec = make_spec(tmp_path, "s", scheduler=name)
        assert spec.early_stopping() == name
        scheduler = make_scheduler(spec)
        assert isinstance(scheduler, kind)
        assert scheduler._time_attr == "epoch" and scheduler.metric == "val/pgd_acc"
    assert make_scheduler(make_spec(tmp_path, "s", scheduler="none")) is None
    # the old switch still turns it off; no epoch past the grace: none
    assert make_spec(tmp_path, "s", asha=False, scheduler="median").early_stopping() == "none"
    # several objectives: ASHA by non-dominated sorting; the others, or an objective
    # reported only at the end, none
    two = {"metrics": ["val/pgd_acc", "val/clean_acc"], "modes": ["max"] * 2}
    assert make_spec(tmp_path, "s", **two).early_stopping() == "asha"
    assert make_spec(tmp_path, "s", **two, scheduler="median").early_stopping() == "none"
    late = {"metrics": ["val/pgd_acc", "test/clean_acc"], "modes": ["max"] * 2}
    assert make_spec(tmp_path, "s", **late).early_stopping() == "none"
    assert make_spec(tmp_path, "s", epochs=1).early_stopping() == "none"
    # HyperBand has no grace period: it runs whatever the epochs
    assert make_spec(tmp_path, "s", epochs=1, scheduler="hyperband").early_stopping() == "hyperband"
    assert make_spec(tmp_path, "s", scheduler="asha").uses_asha()
    assert not make_spec(tmp_path, "s", scheduler="median").uses_asha()


def _run_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["run", "--space", "smoke", "--storage", str(tmp_path / "studies"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", *extra]  # fmt: skip


def test_scheduler_options_of_study_run(tmp_path) -> None:
    parser = cli.build_parser()

    def scheduler(*extra: str) -> str:
        spec = cli._spec_from_args(parser.parse_args(_run_args(tmp_path, *extra)))
        return spec.scheduler if spec.asha else "none"

    assert scheduler() == "none"  # smoke.yaml says asha: false
    assert scheduler("--asha") == "asha"
    assert scheduler("--scheduler", "median") == "median"  # the option beats the space
    assert scheduler("--no-asha", "--scheduler", "none") == "none"
    with pytest.raises(ConfigError, match="--no-asha means --scheduler none"):
        scheduler("--no-asha", "--scheduler", "hyperband")


def test_study_run_refuses_an_unknown_scheduler(tmp_path, capsys) -> None:
    assert cli.main(_run_args(tmp_path, "--scheduler", "fifo")) == 2
    err = capsys.readouterr().err
    assert "'fifo'" in err and "asha, hyperband, median, none" in err
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


# -- TPE's options (no Ray cluster) -------------------------------------------------


def test_tpe_options_follow_the_space_and_the_concurrency(tmp_path) -> None:
    from study.search import make_sampler, tpe_options

    # smoke.yaml is conditional (weight_params.temperature only for weight_fn = exp)
    one_at_a_time = make_spec(tmp_path, "s", seed=7, max_concurrent=1)
    assert tpe_options(one_at_a_time) == {
        "seed": 7,
        "constant_liar": False,
        "multivariate": True,
        "group": True,
    }
    flat = make_spec(tmp_path, "s", space="attack", max_concurrent=0)
    assert tpe_options(flat) == {"seed": 0, "constant_liar": True}
    assert tpe_options(make_spec(tmp_path, "s", max_concurrent=2))["constant_liar"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the installed Optuna takes them without a warning
        sampler = make_sampler(one_at_a_time)
    assert isinstance(sampler, optuna.samplers.TPESampler)


# -- the searcher (no Ray cluster: Tune's calls made by hand) -------------------------


def _searcher(tmp_path: Path, **kw):
    from study.search import make_searcher

    spec = make_spec(tmp_path, "s", max_concurrent=1, **kw)
    return spec, make_searcher(spec, compile_space(spec.load_space()))


def _epoch(epoch: int, acc: float, final: bool = False) -> dict[str, float]:
    result = {"epoch": epoch, "training_iteration": 1, "val/pgd_acc": acc}
    return {**result, "test/clean_acc": 0.5} if final else result


def test_searcher_tells_optuna_pruned_fail_and_complete(tmp_path) -> None:
    _, searcher = _searcher(tmp_path)
    for trial_id in ("full", "stopped", "broken", "paused"):
        assert searcher.suggest(trial_id)
    # a restored trial reports from epoch 2 with training_iteration 1: steps are epochs
    for epoch in (1, 2, 3):
        searcher.on_trial_result("full", _epoch(epoch, 0.1 * epoch, final=epoch == 3))
    searcher.on_trial_complete("full", _epoch(3, 0.3, final=True))
    # the result a scheduler stops a trial on comes with the completion only
    searcher.on_trial_complete("stopped", _epoch(1, 0.05))
    searcher.on_trial_result("broken", _epoch(1, 0.2))
    searcher.on_trial_complete("broken", None, error=True)
    searcher.on_trial_complete("full", _epoch(3, 0.9, final=True))  # a second call: ignored
    # a trial stopped while paused comes without a result: its last one counts
    searcher.on_trial_result("paused", _epoch(1, 0.1))
    searcher.on_trial_result("paused", _epoch(2, 0.2))
    searcher.on_trial_complete("paused")

    full, stopped, broken, paused = searcher._ot_study.get_trials(deepcopy=False)
    assert full.state == TrialState.COMPLETE and full.value == pytest.approx(0.3)
    assert full.intermediate_values == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {1: 0.05}
    assert stopped.value == pytest.approx(0.05)  # Optuna keeps the last step's as its value
    assert broken.state == TrialState.FAIL
    assert paused.state == TrialState.PRUNED and paused.value == pytest.approx(0.2)


def test_searcher_state_survives_save_and_restore(tmp_path) -> None:
    from study.search import StudySearch

    spec, searcher = _searcher(tmp_path)
    config = searcher.suggest("a")
    searcher.on_trial_result("a", _epoch(1, 0.4))
    searcher.save(str(tmp_path / "searcher.pkl"))

    again = StudySearch()
    again.restore(str(tmp_path / "searcher.pkl"))
    assert again._configs == {"a": config}
    assert again._finished(config, _epoch(3, 0.4, final=True))  # the spec's rule came back
    assert not again._finished(config, _epoch(2, 0.4))
    again.on_trial_complete("a", _epoch(2, 0.5))
    (trial,) = again._ot_study.get_trials(deepcopy=False)
    assert trial.state == TrialState.PRUNED
    assert trial.intermediate_values == pytest.approx({1: 0.4, 2: 0.5})


# -- a name is used once ------------------------------------------------------------


def test_study_run_refuses_an_existing_name(tmp_path, capsys) -> None:
    make_spec(tmp_path, "taken").save()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = cli.main(_run_args(tmp_path, "--name", "taken", "--epochs", "1"))
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "study resume taken" in err and "study extend taken --trials N" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing was created


# -- real Ray, real Optuna (RDB storage), real MLflow --------------------------------


def _optuna_trials(spec: StudySpec) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=spec.name, storage=spec.optuna_storage).get_trials()


def _check_states_agree(spec: StudySpec, outcome, epochs: int) -> dict[str, int]:
    """Every Optuna trial's state, intermediate steps and value agree with the Tune
    outcome and the MLflow run of the same trial; returns the count per state."""
    from reports.vocabulary import TAG_EARLY, TAG_TRIAL
    from study.export import trial_runs
    from study.tracking import MlflowTracker

    runs = trial_runs(MlflowTracker(spec.tracking_uri, spec.name), spec.name)
    early = {r.data.tags[TAG_TRIAL]: r.data.tags.get(TAG_EARLY) for r in runs}
    expected = {"FINISHED": TrialState.COMPLETE, "STOPPED": TrialState.PRUNED}
    trials = _optuna_trials(spec)
    assert len(trials) == len(outcome.trials) == len(runs) == spec.trials
    searched = {p.name for p in spec.load_space().params}

    def sampled(config: dict) -> dict:
        return {k: v for k, v in config.items() if k in searched}

    counts: dict[str, int] = {}
    for ot in trials:
        (tune,) = [t for t in outcome.trials if sampled(t.config) == ot.params]
        assert ot.state == expected[tune.status], (ot.number, ot.state, tune.status)
        assert early[tune.trial_id] == str(tune.status == "STOPPED").lower()
        steps = sorted(ot.intermediate_values)
        reached = int(tune.metrics["epoch"])
        assert steps == list(range(1, reached + 1)), (steps, tune.metrics["epoch"])
        if ot.state == TrialState.COMPLETE:
            assert reached == epochs
            assert ot.value == pytest.approx(tune.metrics["val/pgd_acc"])
        else:
            assert reached < epochs
        counts[ot.state.name] = counts.get(ot.state.name, 0) + 1
    return counts


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_asha_stopped_trials_are_pruned_in_optuna(tmp_path) -> None:
    """6 trials of 3 epochs, one at a time, ASHA with grace 1 and reduction 2 (rungs at
    epochs 1 and 2): a trial stops when its score at a rung is below the median of the
    earlier trials' scores there. No setting can force a stop whatever the scores (a
    trial better than every earlier one always goes on), so the test rests on the
    seeds: with one trial at a time, the sampler and the training are deterministic."""
    from study.runner import run_study, study_tuner

    spec = make_spec(
        tmp_path,
        "asha-truth",
        trials=6,
        scheduler="asha",
        reduction_factor=2,
        max_concurrent=1,
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    outcome = run_study(spec)
    counts = _check_states_agree(spec, outcome, epochs=3)
    print(f"asha: {counts}")
    assert counts.get("PRUNED", 0) >= 1 and counts.get("COMPLETE", 0) >= 1, counts

    # `study resume` restores the searcher: Tuner.restore unpickles it, Tune reloads its state
    tuner = study_tuner(spec, outcome.parent_run_id, resume=True)
    searcher = tuner._local_tuner._tune_config.search_alg  # Tune keeps it there
    searcher.restore_from_dir(str(spec.folder / "tune"))  # what Tune does on fit
    assert len(searcher._configs) == len(searcher._completed_trials) == 6
    assert searcher._finished.__func__ is StudySpec.ran_full_budget
    assert searcher._finished.__self__ == spec
    states = sorted(t.state.name for t in searcher._ot_study.get_trials())
    assert states == sorted(t.state.name for t in _optuna_trials(spec))


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
@pytest.mark.parametrize(
    ("scheduler", "trials", "max_concurrent"), [("hyperband", 4, 1), ("median", 6, 1)]
)
def test_hyperband_and_median_studies_end_with_consistent_optuna_states(
    tmp_path, scheduler: str, trials: int, max_concurrent: int
) -> None:
    """Whatever the schedulers decide, Optuna's states agree with Tune's and MLflow's.

    Both run one trial at a time, so nothing here depends on timing. HyperBand then
    never stops a trial (a bracket halves the trials running at once); with two at
    once it pauses the first to reach a rung, and what follows depends on which
    trial Tune runs first (this variant failed once in CI, cause not found, and
    passed 9 runs here, 3 of them on a loaded machine; left out until its paused
    path can be driven without timing). The median rule judges a trial once three
    have ended; whether it stops one depends on the scores. So only the agreement is
    checked, not the decisions.
    """
    from study.runner import run_study

    spec = make_spec(
        tmp_path,
        f"{scheduler}-truth",
        trials=trials,
        scheduler=scheduler,
        max_concurrent=max_concurrent,
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    outcome = run_study(spec)
    assert all(t.status in ("FINISHED", "STOPPED") for t in outcome.trials)
    counts = _check_states_agree(spec, outcome, epochs=3)
    print(f"{scheduler}: {counts}")
    assert counts.get("COMPLETE", 0) >= 1, counts


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_extend_adds_exactly_n_trials_to_the_same_study(tmp_path, capsys) -> None:
    """A study of 2 trials ends; ``study extend --trials 2`` runs exactly 2 more in the
    same Optuna study (which now holds 4, every one told its end), under the same MLflow
    parent run, and the saved spec and outcome count 4. Then the space file changes:
    a further extend is refused and changes nothing."""
    import shutil

    from reports.vocabulary import TAG_ROLE, TAG_STUDY, TAG_TRIAL
    from study.export import trial_runs
    from study.runner import load_outcome, run_study
    from study.tracking import MlflowTracker

    space = tmp_path / "space.yaml"
    shutil.copy(Path(__file__).parents[1] / "search_spaces" / "smoke.yaml", space)
    spec = make_spec(
        tmp_path,
        "grow",
        space=str(space),
        epochs=1,
        scheduler="none",
        max_concurrent=1,
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    first = run_study(spec)
    assert len(first.trials) == 2
    store = ["--storage", spec.storage, "--tracking-uri", spec.tracking_uri]
    capsys.readouterr()

    assert cli.main(["extend", "grow", "--trials", "2", *store]) == 0
    assert "extending study grow from 2 to 4 trials" in capsys.readouterr().out
    states = [t.state.name for t in _optuna_trials(spec)]
    assert states == ["COMPLETE"] * 4, states
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = trial_runs(tracker, spec.name)
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == 4
    assert {t.trial_id for t in first.trials} < set(ids)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {first.parent_run_id}
    parents = tracker.find_runs(**{TAG_STUDY: spec.name, TAG_ROLE: "study"})
    assert [(p.info.run_id, p.info.status) for p in parents] == [(first.parent_run_id, "FINISHED")]
    saved = StudySpec.load(spec.storage, spec.name)
    assert saved.trials == 4
    ended = load_outcome(saved)
    assert ended is not None and len(ended.trials) == 4

    space.write_text(space.read_text() + "\n# edited after the study started\n")
    assert cli.main(["extend", "grow", "--trials", "1", *store]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "changed since study 'grow' started" in err, err
    assert StudySpec.load(spec.storage, spec.name).trials == 4
    assert len(_optuna_trials(spec)) == 4
