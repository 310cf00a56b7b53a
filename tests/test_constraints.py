"""``--constraint "val/clean_acc>=0.80"``: parsed and checked at the door, given to Optuna
as constraint values, recorded on each trial's MLflow run, and a violating trial is
never "best" (export, show, the report's leaderboard, the study's outcome)."""

from __future__ import annotations

import math

import pytest
import yaml
from test_search import _optuna_trials, _run_args, make_spec

from reports.constraints import parse_constraint, verdict
from reports.ranking import is_feasible, rank_runs
from study import cli
from trainables.errors import ConfigError

# -- the parser (no Ray) ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metric", "op", "bound"),
    [
        ("val/clean_acc>=0.80", "val/clean_acc", ">=", 0.8),
        (" val/pgd_acc <= 0.5 ", "val/pgd_acc", "<=", 0.5),
        ("test/clean_acc>1e-1", "test/clean_acc", ">", 0.1),
        ("val/delta_energy<-2", "val/delta_energy", "<", -2.0),
    ],
)
def test_constraints_parse(text: str, metric: str, op: str, bound: float) -> None:
    c = parse_constraint(text)
    assert (c.metric, c.op, c.bound) == (metric, op, bound)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("val/clean_acc=>0.8", "write METRIC OP BOUND"),
        ("val/clean_acc==0.8", "write METRIC OP BOUND"),
        ("val/clean_acc", "write METRIC OP BOUND"),
        (">=0.8", "write METRIC OP BOUND"),
        ("val/clean_acc>=high", "the bound 'high' is not a finite number"),
        ("val/clean_acc>=inf", "the bound 'inf' is not a finite number"),
    ],
)
def test_a_bad_constraint_is_refused_saying_how_to_write_one(text: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_constraint(text)
    assert repr(text) in str(err.value) and says in str(err.value)


def test_violation_follows_optunas_sign_and_strict_bounds() -> None:
    ge, gt = parse_constraint("val/clean_acc>=0.5"), parse_constraint("val/clean_acc>0.5")
    le, lt = parse_constraint("val/n<=48"), parse_constraint("val/n<48")
    assert ge.violation({"val/clean_acc": 0.75}) == -0.25
    assert ge.violation({"val/clean_acc": 0.25}) == 0.25
    assert ge.violation({"val/clean_acc": 0.5}) == 0.0 and ge.satisfied({"val/clean_acc": 0.5})
    assert gt.violation({"val/clean_acc": 0.5}) > 0 and not gt.satisfied({"val/clean_acc": 0.5})
    assert le.violation({"val/n": 64}) == 16 and lt.violation({"val/n": 32}) == -16
    assert not lt.satisfied({"val/n": 48})
    assert ge.violation({}) == math.inf and ge.violation({"val/clean_acc": math.nan}) == math.inf
    ok, text = verdict([ge, le], {"val/clean_acc": 0.75, "val/n": 64})
    assert not ok and text == "val/clean_acc>=0.5: 0.7500 met; val/n<=48: 64.0000 violated"


def test_a_constraint_on_an_unknown_metric_is_refused(tmp_path) -> None:
    with pytest.raises(ConfigError, match="'val/clean' is not a metric the trials report"):
        make_spec(tmp_path, "s", constraints=["val/clean>=0.8"]).validate()
    with pytest.raises(ConfigError, match="not a metric"):
        make_spec(tmp_path, "s", constraints=["final/aa_acc>=0.5"]).validate()
    make_spec(tmp_path, "s", constraints=["val/clean_acc>=0.8", "test/pgd_acc>0.1"]).validate()


def test_study_run_takes_repeated_constraints_and_refuses_a_bad_one(tmp_path, capsys) -> None:
    parser = cli.build_parser()
    argv = _run_args(tmp_path, "--constraint", "val/clean_acc>=0.8", "--constraint", "val/n<64")
    assert cli._spec_from_args(parser.parse_args(argv)).constraints == [
        "val/clean_acc>=0.8",
        "val/n<64",
    ]
    assert cli.main(_run_args(tmp_path, "--constraint", "val/clean_acc=>0.8")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("study run: error: constraint 'val/clean_acc=>0.8': write METRIC OP")
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_violating_trial_ranks_after_every_feasible_one() -> None:
    class T:
        def __init__(self, trial_id: str, pgd: float, ok: str | None) -> None:
            self.trial_id, self.metrics = trial_id, {"val/pgd_acc": pgd}
            self.tags = {} if ok is None else {"energy_study.constraint_ok": ok}

    best, feasible, untagged = (
        T("x_00001", 0.9, "false"),
        T("x_00002", 0.5, "true"),
        T("x_00003", 0.4, None),
    )
    ranked = rank_runs([best, feasible, untagged], ["val/pgd_acc"], ["max"])
    assert [t.trial_id for t in ranked] == ["x_00002", "x_00003", "x_00001"]
    assert not is_feasible(best) and is_feasible(feasible) and is_feasible(untagged)


# -- real Ray, real Optuna (RDB storage), real MLflow --------------------------------

#: a space whose one parameter fixes the validation set's size: the objective and the
#: constraint (both on ``val/n``) are known before any training, whatever it learns
SPACE = {
    "study": {"metric": "val/n", "mode": "max"},
    "params": {"val_subset": {"type": "categorical", "choices": [32, 64]}},
}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_constraint_excludes_the_trial_that_would_be_best(tmp_path, capsys) -> None:
    """Two one-epoch trials, one per ``val_subset`` (the sampler's seed 0 draws 64, then
    32): by the objective ``val/n`` (max) the 64-point trial is best, but ``val/n<=48``
    excludes it. Optuna holds each trial's constraint value (64 - 48 = 16, 32 - 48 =
    -16); the MLflow runs carry the verdict; export, show, the leaderboard and the
    outcome pick the 32-point trial."""
    from reports.analysis import leaderboard
    from reports.data import load_study
    from reports.vocabulary import TAG_CONSTRAINT_OK, TAG_CONSTRAINTS, TAG_TRIAL
    from study.export import trial_runs
    from study.runner import run_study
    from study.tracking import MlflowTracker

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    spec = make_spec(
        tmp_path,
        "bounded",
        space=str(space),
        metrics=["val/n"],
        modes=["max"],
        constraints=["val/n<=48"],
        epochs=1,
        scheduler="none",
        max_concurrent=1,
        seed=0,
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
    )
    outcome = run_study(spec)
    by_n = {int(t.metrics["val/n"]): t for t in outcome.trials}
    assert sorted(by_n) == [32, 64], "seed 0 no longer draws one trial of each size"
    big, small = by_n[64], by_n[32]
    assert (big.feasible, small.feasible) == (False, True)
    assert [t.trial_id for t in outcome.ranked()] == [small.trial_id, big.trial_id]

    trials = _optuna_trials(spec)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    assert {t.params["val_subset"]: t.constraints for t in trials} == {
        64: {"val/n<=48": 16.0},
        32: {"val/n<=48": -16.0},
    }

    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(tracker, spec.name)}
    assert runs[big.trial_id].data.tags[TAG_CONSTRAINT_OK] == "false"
    assert runs[small.trial_id].data.tags[TAG_CONSTRAINT_OK] == "true"
    assert runs[big.trial_id].data.tags[TAG_CONSTRAINTS] == "val/n<=48: 64.0000 violated"

    store = ["--storage", spec.storage, "--tracking-uri", spec.tracking_uri]
    out = tmp_path / "best.yaml"
    assert cli.main(["export", "bounded", "-o", str(out), *store]) == 0
    assert yaml.safe_load(out.read_text())["val_subset"] == 32
    assert f"trial {small.trial_id}" in out.read_text()

    capsys.readouterr()
    assert cli.main(["show", "bounded", *store]) == 0
    lines = capsys.readouterr().out.splitlines()
    (first,) = [line for line in lines if line.split()[:1] == ["1"]]
    assert small.trial_id in first
    (second,) = [line for line in lines if big.trial_id in line]
    assert second.split()[0] == "-"
    assert any("violates a constraint: val/n<=48: 64.0000 violated" in line for line in lines)

    data = load_study("bounded", spec.tracking_uri, tmp_path / "report")
    assert data.spec["constraints"] == ["val/n<=48"]
    board = leaderboard(data.trials, data.objective, data.modes)
    assert list(board["constraints"]) == ["met", f"violated: {big.trial_id}"]
    assert "val_subset=32" in board["group"].iloc[0]


def test_the_printed_pareto_set_holds_only_finished_trials_that_meet_the_constraints(
    tmp_path, capsys
) -> None:
    """Trial a dominates nothing it may be listed beside: it violates the constraint; c
    stopped early with good early scores; b and d are the front of what counts (the
    finalists' rule), so only they are printed, by the first objective."""
    from study.runner import StudyOutcome, TrialOutcome

    spec = make_spec(tmp_path, "mo", metrics=["val/clean_acc", "val/pgd_acc"],
                     modes=["max", "max"], constraints=["val/clean_acc>=0.5"])  # fmt: skip

    def trial(tid: str, status: str, clean: float, pgd: float, ok: bool = True) -> TrialOutcome:
        metrics = {"val/clean_acc": clean, "val/pgd_acc": pgd}
        return TrialOutcome(tid, status, {"beta": 1.0}, metrics, None, feasible=ok)

    trials = [
        trial("t_a", "FINISHED", 0.40, 0.90, ok=False),
        trial("t_b", "FINISHED", 0.70, 0.50),
        trial("t_c", "STOPPED", 0.95, 0.95),
        trial("t_d", "FINISHED", 0.90, 0.30),
        trial("t_e", "FINISHED", 0.60, 0.20),
    ]
    cli._print_outcome(StudyOutcome(spec, trials, "parent"))
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("t_")]
    assert listed == ["t_d", "t_b"], out
    assert "violating: t_a" in out
