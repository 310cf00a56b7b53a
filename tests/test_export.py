"""The one ranking of trials (reports.ranking) and what study export / study show make of it.

No Ray here: synthetic run-like objects for the rules, and a real MLflow SQLite
store (written with the study's own tracker) for ``best_runs``, ``export_best``
and ``study show``.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import yaml

from reports.data import RunData
from reports.intervals import accuracies, group_interval, measured, sample_size
from reports.ranking import (
    rank_key,
    rank_runs,
    ranking_rules,
    trial_number,
    trial_order,
)
from reports.vocabulary import (
    CONFIG_FILE,
    PARENT_STUDY,
    TAG_ARTIFACT_ERROR,
    TAG_EARLY,
    TAG_FAILURE,
    TAG_FINALIST,
    TAG_METRICS_ERROR,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
)
from study import cli
from study.export import (
    best_runs,
    export_best,
    ranking_of,
    sampler_lines,
    show_lines,
    study_objectives,
)
from study.tracking import MlflowTracker, flatten
from trainables.stats import wilson_interval

PGD, CLEAN = "val/pgd_acc", "val/clean_acc"


def mlflow_like(trial_id: str, status: str = "FINISHED", tags: dict | None = None, **metrics):
    """An object shaped like ``mlflow.entities.Run`` (``info`` and ``data``)."""
    return SimpleNamespace(
        info=SimpleNamespace(run_id=f"run-{trial_id}", status=status, start_time=0),
        data=SimpleNamespace(
            metrics={k.replace("__", "/"): v for k, v in metrics.items()},
            tags={TAG_TRIAL: trial_id, **(tags or {})},
            params={"method": "weat_adv"},
        ),
    )


def outcome_like(trial_id: str, **metrics):
    """An object shaped like ``study.runner.TrialOutcome`` (``trial_id`` and ``metrics``)."""
    return SimpleNamespace(
        trial_id=trial_id, metrics={k.replace("__", "/"): v for k, v in metrics.items()}
    )


def ids(runs) -> list[str]:
    return [r.data.tags[TAG_TRIAL] if hasattr(r, "data") else r.trial_id for r in runs]


def every_order(runs, metrics, modes) -> list[list[str]]:
    """The ranking of every permutation of ``runs`` (all must agree)."""
    return [ids(rank_runs(list(p), metrics, modes)) for p in itertools.permutations(runs)]


# --- the rules, one at a time ---------------------------------------------------------------
def test_the_objective_decides_first_in_its_mode() -> None:
    a = outcome_like("t_00000", val__pgd_acc=0.5, val__clean_acc=0.99)
    b = outcome_like("t_00001", val__pgd_acc=0.8, val__clean_acc=0.10)
    assert ids(rank_runs([a, b], [PGD], ["max"])) == ["t_00001", "t_00000"]
    assert ids(rank_runs([a, b], [PGD], ["min"])) == ["t_00000", "t_00001"]


def test_a_tie_on_the_objective_goes_to_the_next_objective_in_its_mode() -> None:
    # 13/16 = 0.8125 twice: the study's second objective (train/loss, min) decides,
    # even though val/clean_acc would say the opposite
    a = outcome_like("t_00000", val__pgd_acc=0.8125, train__loss=0.9, val__clean_acc=0.99)
    b = outcome_like("t_00001", val__pgd_acc=0.8125, train__loss=0.4, val__clean_acc=0.50)
    orders = every_order([a, b], [PGD, "train/loss"], ["max", "min"])
    assert all(o == ["t_00001", "t_00000"] for o in orders)


def test_then_val_clean_acc_decides() -> None:
    a = outcome_like("t_00000", val__pgd_acc=0.8125, val__clean_acc=0.90)
    b = outcome_like("t_00001", val__pgd_acc=0.8125, val__clean_acc=0.95)
    c = outcome_like("t_00002", val__pgd_acc=0.75, val__clean_acc=1.00)
    orders = every_order([a, b, c], [PGD], ["max"])
    assert all(o == ["t_00001", "t_00000", "t_00002"] for o in orders)


def test_then_the_trial_number_ascending_not_the_text_of_the_id() -> None:
    # same numbers everywhere: trial 1 before trial 3 although "zzz" > "aaa"
    a = mlflow_like("aaa00_00003", val__pgd_acc=0.8125, val__clean_acc=0.9)
    b = mlflow_like("zzz99_00001", val__pgd_acc=0.8125, val__clean_acc=0.9)
    c = mlflow_like("mmm55_00002", val__pgd_acc=0.8125, val__clean_acc=0.9)
    orders = every_order([a, b, c], [PGD], ["max"])
    assert all(o == ["zzz99_00001", "mmm55_00002", "aaa00_00003"] for o in orders)
    assert trial_number("abc12_00003") == 3 and trial_number("train") is None
    # ids without an index come after those with one; the run id breaks the last tie
    assert trial_order("x_00007") < trial_order("a") < trial_order("b")
    assert trial_order("train", "r1") < trial_order("train", "r2")
    # a study's trials (Optuna searcher, Ray 2.60): 8 random hex digits, in text order
    hexes = [mlflow_like(t, val__pgd_acc=0.5, val__clean_acc=0.5) for t in ("f72adc73", "1a0dc094")]
    assert all(o == ["1a0dc094", "f72adc73"] for o in every_order(hexes, [PGD], ["max"]))


def test_missing_or_nan_values_rank_after_every_value() -> None:
    has = outcome_like("t_00003", val__pgd_acc=0.1, val__clean_acc=0.1)
    nan = outcome_like("t_00000", val__pgd_acc=math.nan, val__clean_acc=0.99)
    missing = outcome_like("t_00001")
    for mode in ("max", "min"):
        orders = every_order([has, nan, missing], [PGD], [mode])
        assert all(o == ["t_00003", "t_00000", "t_00001"] for o in orders), mode
    # within a tie, a trial missing val/clean_acc loses to one that has it
    a = outcome_like("t_00000", val__pgd_acc=0.5)
    b = outcome_like("t_00009", val__pgd_acc=0.5, val__clean_acc=0.0)
    assert ids(rank_runs([a, b], [PGD], ["max"])) == ["t_00009", "t_00000"]


def test_rules_and_their_errors() -> None:
    assert ranking_rules([PGD], ["max"]) == [(PGD, "max"), (CLEAN, "max")]
    # val/clean_acc as an objective keeps its place and mode; no second copy
    assert ranking_rules([CLEAN, PGD], ["min", "max"]) == [(CLEAN, "min"), (PGD, "max")]
    with pytest.raises(ValueError, match="mode"):
        ranking_rules([PGD], ["best"])
    with pytest.raises(ValueError, match="objective"):
        ranking_rules([PGD, CLEAN], ["max"])
    # export's metric first, then the study's other objectives
    assert ranking_of("test/pgd_acc", "max", [PGD, "train/loss"], ["max", "min"]) == (
        ["test/pgd_acc", PGD, "train/loss"],
        ["max", "max", "min"],
    )
    key = rank_key({PGD: 0.5}, "t_00002", ranking_rules([PGD], ["max"]))
    assert key < rank_key({PGD: 0.4}, "t_00001", ranking_rules([PGD], ["max"]))


def test_every_kind_of_run_ranks_the_same() -> None:
    values = [("t_00002", 0.8125, 0.9), ("t_00000", 0.8125, 0.9), ("t_00001", 0.8125, 0.95)]
    expected = ["t_00001", "t_00000", "t_00002"]
    flows = [mlflow_like(t, val__pgd_acc=p, val__clean_acc=c) for t, p, c in values]
    outcomes = [outcome_like(t, val__pgd_acc=p, val__clean_acc=c) for t, p, c in values]
    reports = [
        RunData(f"run-{t}", t, "FINISHED", 0, 0, {}, {PGD: p, CLEAN: c}, {TAG_TRIAL: t})
        for t, p, c in values
    ]
    assert ids(rank_runs(flows, [PGD], ["max"])) == expected
    assert ids(rank_runs(outcomes, [PGD], ["max"])) == expected
    assert [r.trial_id for r in rank_runs(reports, [PGD], ["max"])] == expected


# --- accuracies with n and interval ---------------------------------------------------------
def test_measured_accuracies_use_logged_bounds_else_n_else_none() -> None:
    logged = {PGD: 0.75, "val/n": 512, f"{PGD}_ci_low": 0.70, f"{PGD}_ci_high": 0.80}
    m = measured(logged, PGD)
    assert (m.n, m.low, m.high) == (512, 0.70, 0.80)
    computed = measured({PGD: 0.75, "val/n": 512.0}, PGD)
    assert (computed.low, computed.high) == pytest.approx(wilson_interval(0.75, 512))
    assert computed.text(with_n=True).endswith("n=512") and computed.bracket().startswith("[0.7")
    unknown = measured({PGD: 0.75}, PGD)
    assert unknown.n is None and not unknown.has_interval and unknown.text() == "0.7500"
    assert measured({PGD: math.nan}, PGD) is None and measured({}, PGD) is None
    energy = measured({"val/delta_energy": 0.3, "val/n": 512}, "val/delta_energy")
    assert energy.n is None and not energy.has_interval  # not an accuracy: no interval
    # old stores: AutoAttack had its own n (test/aa_n); test/n wins when both exist
    old = {"test/aa_acc": 0.5, "test/aa_n": 20.0, "test/clean_acc": 0.9}
    assert sample_size(old, "test/aa_acc") == 20 and sample_size(old, "test/clean_acc") is None
    assert sample_size({**old, "test/n": 300}, "test/aa_acc") == 300
    final = {f"final/{k}": 0.5 for k in ("robust_acc", "aa_acc", "pgd_acc", "clean_acc")}
    assert [a.key for a in accuracies({**final, "final/n": 10}, "final")] == [
        "final/clean_acc",
        "final/pgd_acc",
        "final/aa_acc",
        "final/robust_acc",
    ]
    # a group: the interval of the mean on the smallest n; unknown n → no interval
    assert group_interval([0.7, 0.8], [100, 200])[0] == 100
    assert group_interval([0.7, 0.8], [100, None]) == (None, None, None)


# --- study show -----------------------------------------------------------------------------
def show_runs() -> list:
    final = {"final__clean_acc": 0.9, "final__pgd_acc": 0.78, "final__aa_acc": 0.75,
             "final__robust_acc": 0.74, "final__n": 1000}  # fmt: skip
    test = {"test__clean_acc": 0.91, "test__pgd_acc": 0.78, "test__n": 300}
    return [
        mlflow_like("abc12_00001", val__pgd_acc=0.8125, val__clean_acc=0.9, val__n=512, **test),
        mlflow_like(
            "abc12_00000",
            tags={TAG_FINALIST: "1"},
            val__pgd_acc=0.8125,
            val__clean_acc=0.95,
            val__n=512,
            **test,
            **final,
        ),  # fmt: skip
        mlflow_like("abc12_00002", "FAILED", {TAG_FAILURE: "diverged: nan"}),
        mlflow_like("abc12_00003", val__pgd_acc=0.7),
    ]


def test_show_ranks_marks_finalists_and_prints_intervals_within_100_columns() -> None:
    lines = show_lines(show_runs(), [PGD], ["max"])
    text = "\n".join(lines)
    assert max(len(ln) for ln in lines) <= 100, text
    rows = [ln for ln in lines if ln[:4].strip() in ("1", "2", "3", "-")]
    order = [next(t for t in r.split() if t.startswith("abc12_")) for r in rows]
    assert order == ["abc12_00000", "abc12_00001", "abc12_00003", "abc12_00002"]
    assert rows[0].split()[:2] == ["1", "#1"] and rows[-1].split()[0] == "-"
    lo, hi = wilson_interval(0.8125, 512)
    assert f"val n=512: clean 0.9500 [{wilson_interval(0.95, 512)[0]:.3f}" in text
    assert f"pgd 0.8125 [{lo:.3f}, {hi:.3f}]" in text
    assert "test n=300:" in text and "final #1 n=1000:" in text
    assert f"robust 0.7400 [{wilson_interval(0.74, 1000)[0]:.3f}" in text
    assert text.count("final #") == 1  # only the finalist has a final line
    assert "failure: diverged: nan" in text and "finalist rank" in text
    assert "artifacts missing" not in text  # no run is tagged so


def test_show_prints_the_files_a_run_lacks_under_its_trial() -> None:
    lacking = {TAG_ARTIFACT_ERROR: "energies.npz: not in the trial's checkpoint"}
    runs = [
        mlflow_like("abc12_00000", **{PGD: 0.5}),
        mlflow_like("abc12_00001", tags=lacking, **{PGD: 0.7}),
    ]
    lines = show_lines(runs, [PGD], ["max"])
    at = next(i for i, ln in enumerate(lines) if "abc12_00001" in ln)
    after = lines[at + 1 : next(i for i, ln in enumerate(lines) if "abc12_00000" in ln)]
    assert "    artifacts missing: energies.npz: not in the trial's checkpoint" in after
    assert sum("artifacts missing" in ln for ln in lines) == 1


def test_show_prints_the_metric_points_a_run_lost_under_its_trial() -> None:
    lost = {TAG_METRICS_ERROR: "1 metric points at steps 2 of test/clean_acc"}
    runs = [
        mlflow_like("abc12_00000", tags=lost, **{PGD: 0.5}),
        mlflow_like("abc12_00001", **{PGD: 0.7}),
    ]
    lines = show_lines(runs, [PGD], ["max"])
    at = next(i for i, ln in enumerate(lines) if "abc12_00000" in ln)
    expected = "    metrics missing: 1 metric points at steps 2 of test/clean_acc"
    assert lines[at + 1 :].count(expected) == 1
    assert sum("metrics missing" in ln for ln in lines) == 1


def test_a_stopped_trial_with_a_kept_epoch_ranks_and_shows_by_that_epoch() -> None:
    from reports.ranking import is_result
    from reports.vocabulary import TAG_EARLY, TAG_KEPT_EPOCH, TAG_STOP_EPOCH

    stop = {TAG_EARLY: "true", TAG_STOP_EPOCH: "9", TAG_KEPT_EPOCH: "6"}
    kept = mlflow_like("abc12_00000", tags=stop, **{PGD: 0.30, "kept/" + PGD: 0.62})
    asha = mlflow_like("abc12_00001", tags={TAG_EARLY: "true"}, **{PGD: 0.70})
    full = mlflow_like("abc12_00002", tags={TAG_EARLY: "false"}, **{PGD: 0.60})
    assert [is_result(r) for r in (kept, asha, full)] == [True, False, True]
    assert ids(rank_runs([full, kept], [PGD], ["max"])) == ["abc12_00000", "abc12_00002"]
    lines = show_lines([full, kept], [PGD], ["max"])
    at = next(i for i, ln in enumerate(lines) if "abc12_00000" in ln)
    assert "0.6200" in lines[at] and "0.3000" not in lines[at]
    assert lines[at + 1] == "    ΔE stop at epoch 9; its values are those of epoch 6 (kept)"


def test_a_joint_trials_export_says_how_to_sample_the_same_way_from_the_final_model() -> None:
    import shlex

    from trainables.config import parse_overrides

    params = {"beta": "6.0", "generation.step_size": "0.05", "generation.steps": "50",
              "generation.classes": "[0, 3]", "generation.reference_n": "None"}  # fmt: skip
    text = sampler_lines(params)
    command = next(ln for ln in text.splitlines() if "study generate" in ln)
    words = shlex.split(command.lstrip("# "))
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    # the line parses as `study generate` reads its --set items, sampler keys only
    assert parse_overrides(sets) == {"classes": [0, 3], "step_size": 0.05, "steps": 50}
    assert sampler_lines({"beta": "6.0", "method": "weat_adv"}) == ""


# --- a real MLflow store --------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Study 'ties': two objectives; trials logged out of order, three tied on val/pgd_acc."""
    tmp = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "ties")
    parent, _ = tracker.get_or_create_run(
        "ties", {TAG_ROLE: "study"}, {TAG_STUDY: "ties", TAG_PARENT: PARENT_STUDY}
    )
    tracker.log_params(parent, flatten({"metrics": [PGD, "train/loss"], "modes": ["max", "min"]}))
    trials = [  # (trial id, val/pgd_acc, train/loss, val/clean_acc, early stopped)
        ("abc12_00004", 0.8125, 0.5, 0.90, False),
        ("abc12_00003", 0.8125, 0.5, 0.90, False),  # ties 00004 on everything: number wins
        ("abc12_00001", 0.8125, 0.5, 0.85, False),
        ("abc12_00000", 0.8125, 0.9, 0.99, False),  # loses on the second objective
        ("abc12_00002", 0.9000, 0.1, 0.99, True),  # best, but stopped early: not exported
    ]
    for trial_id, pgd, loss, clean, early in trials:
        run_id, _ = tracker.get_or_create_run(
            trial_id, {TAG_ROLE: "trial", TAG_STUDY: "ties"}, {TAG_TRIAL: trial_id}
        )
        tracker.log_params(run_id, {"method": "weat_adv", "beta": pgd})
        tracker.log_metrics(
            run_id, {PGD: pgd, "train/loss": loss, CLEAN: clean, "val/n": 512}, step=2
        )
        tracker.log_text(run_id, yaml.safe_dump({"method": "weat_adv", "beta": pgd}), CONFIG_FILE)
        tracker.set_tags(run_id, {TAG_EARLY: str(early).lower()})
        tracker.end_run(run_id)
    return {"uri": uri, "tracker": tracker, "tmp": tmp}


def test_best_runs_and_export_follow_the_ranking(store) -> None:
    tracker = store["tracker"]
    assert study_objectives(tracker, "ties") == ([PGD, "train/loss"], ["max", "min"])
    best = best_runs(tracker, "ties", PGD, top=4)
    assert [r.data.tags[TAG_TRIAL] for r in best] == [
        "abc12_00003", "abc12_00004", "abc12_00001", "abc12_00000"
    ]  # fmt: skip
    # objectives given: without train/loss as second objective, val/clean_acc decides
    again = best_runs(tracker, "ties", PGD, top=4, objectives=[PGD], modes=["max"])
    assert [r.data.tags[TAG_TRIAL] for r in again] == [
        "abc12_00000", "abc12_00003", "abc12_00004", "abc12_00001"
    ]  # fmt: skip
    (path,) = export_best(tracker, "ties", store["tmp"] / "best.yaml", metric=PGD)
    assert "trial abc12_00003" in path.read_text()
    # a study without a parent run falls back to val/pgd_acc (max)
    assert study_objectives(MlflowTracker(store["uri"], "other"), "other") == ([PGD], ["max"])


def test_study_show_prints_the_ranking(store, capsys) -> None:
    assert cli.main(["show", "ties", "--tracking-uri", store["uri"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study ties: 5 trial(s), best first by val/pgd_acc (max), then "
                          "train/loss (min), then val/clean_acc (max)")  # fmt: skip
    order = [ln.split()[1] for ln in out.splitlines() if "abc12_" in ln]
    assert order == ["abc12_00002", "abc12_00003", "abc12_00004", "abc12_00001", "abc12_00000"]
    assert f"val n=512: clean 0.9900 [{wilson_interval(0.99, 512)[0]:.3f}" in out
