"""``study run --warm-start OTHER``: a new study's Optuna search seeded with the finished
trials of another, read from the MLflow store; what does not fit the new space is skipped
and counted; a bad name stops before anything is created."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_search import _optuna_trials, _run_args, make_spec

from study import cli
from study.warmstart import (
    MISSING,
    NOT_IN_SPACE,
    OUTSIDE,
    SOURCE_ATTR,
    TRIAL_ATTR,
    Skip,
    WarmStart,
    fit_params,
)
from trainables.errors import ConfigError, UserError

SMOKE = Path(__file__).parents[1] / "search_spaces" / "smoke.yaml"


# -- fitting another study's values to the new space (no Ray, no store) --------------


def _smoke_space(tmp_path: Path):
    return make_spec(tmp_path, "s").load_space()


def test_values_logged_as_text_become_the_new_spaces_values(tmp_path) -> None:
    space = _smoke_space(tmp_path)
    params, dists = fit_params(
        space,
        {"method": "weat_adv", "beta": "3.25", "weight_fn": "exp",
         "weight_params.temperature": "2.5"},
    )  # fmt: skip
    assert params == {
        "method": "weat_adv",
        "beta": 3.25,
        "weight_fn": "exp",
        "weight_params.temperature": 2.5,
    }
    assert set(dists) == set(params)
    assert dists["beta"].low == 1.0 and dists["beta"].high == 10.0
    # the conditional parameter exists only for weight_fn = exp
    params, _ = fit_params(space, {"method": "weat_nat", "beta": "1.0", "weight_fn": "weat"})
    assert params == {"method": "weat_nat", "beta": 1.0, "weight_fn": "weat"}


@pytest.mark.parametrize(
    ("values", "reason", "detail"),
    [
        ({"method": "weat_adv", "beta": "12.0", "weight_fn": "weat"}, OUTSIDE, "beta = 12.0"),
        ({"method": "mail", "beta": "2.0", "weight_fn": "weat"}, OUTSIDE, "method = mail"),
        ({"method": "weat_adv", "weight_fn": "weat"}, MISSING, "beta"),
        ({"method": "weat_adv", "beta": "2", "weight_fn": "exp"}, MISSING,
         "weight_params.temperature"),
        ({"method": "weat_adv", "beta": "2", "weight_fn": "weat", "eps": "0.1"}, NOT_IN_SPACE,
         "eps = 0.1"),
        ({"method": "weat_adv", "beta": "2", "weight_fn": "weat",
          "weight_params.temperature": "3.0"}, NOT_IN_SPACE, "weight_params.temperature = 3.0"),
    ],
)  # fmt: skip
def test_values_that_do_not_fit_the_new_space_are_skipped_saying_why(
    tmp_path, values: dict, reason: str, detail: str
) -> None:
    with pytest.raises(Skip) as skip:
        fit_params(_smoke_space(tmp_path), values)
    assert (skip.value.reason, skip.value.detail) == (reason, detail)


def test_the_summary_counts_what_was_skipped_and_why() -> None:
    warm = WarmStart("old", [], {OUTSIDE: ["t1 (beta = 12.0)", "t2 (beta = 11.0)"]})
    text = warm.summary()
    assert text.startswith("warm start from study old: 0 of its 2 trials seed the search")
    assert f"2 {OUTSIDE}, e.g. t1 (beta = 12.0)" in text
    assert warm.tags() == {
        "energy_study.warm_start": "old",
        "energy_study.warm_start_trials": "0",
    }


def test_warm_start_names_another_study(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not this one"):
        make_spec(tmp_path, "same", warm_start="same").validate()
    with pytest.raises(ConfigError, match="name another study"):
        make_spec(tmp_path, "new", warm_start="no spaces").validate()


def test_study_run_passes_warm_start_on_to_the_spec(tmp_path) -> None:
    args = cli.build_parser().parse_args(_run_args(tmp_path, "--warm-start", "old"))
    assert cli._spec_from_args(args).warm_start == "old"
    assert (
        cli._spec_from_args(cli.build_parser().parse_args(_run_args(tmp_path))).warm_start is None
    )


def test_an_unknown_study_to_warm_start_from_stops_before_anything_is_created(
    tmp_path, capsys
) -> None:
    code = cli.main(_run_args(tmp_path, "--name", "new", "--warm-start", "nosuch"))
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--warm-start nosuch: no study 'nosuch' with trials" in err, err
    assert "studies there: none" in err, err
    assert sorted(tmp_path.iterdir()) == []  # no store, no storage folder


# -- real Ray, real Optuna (RDB storage), real MLflow --------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_warm_start_seeds_the_new_optuna_study_with_the_old_complete_trials(
    tmp_path, capsys
) -> None:
    """A study of 2 one-epoch trials (no Optuna storage: its Optuna study lives in Tune's
    searcher only) seeds a new study of 2 trials on an SQLite Optuna storage: the new
    Optuna study holds the 2 old trials, COMPLETE with their sampled values and final
    objective, then its own 2; the new parent run names the source and the count. A bad
    source name or other objectives stop before anything is created."""
    from reports.vocabulary import (
        ROLE_STUDY,
        TAG_ROLE,
        TAG_STUDY,
        TAG_WARM_START,
        TAG_WARM_START_TRIALS,
    )
    from study.runner import run_study
    from study.tracking import MlflowTracker

    space = tmp_path / "space.yaml"
    shutil.copy(SMOKE, space)
    common = {"space": str(space), "epochs": 1, "scheduler": "none", "max_concurrent": 1}
    old = run_study(make_spec(tmp_path, "old", **common))
    assert [t.status for t in old.trials] == ["FINISHED"] * 2

    spec = make_spec(
        tmp_path,
        "new",
        warm_start="old",
        seed=1,
        optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        **common,
    )
    capsys.readouterr()
    new = run_study(spec)
    assert "warm start from study old: 2 of its 2 trials seed the search" in capsys.readouterr().out
    assert len(new.trials) == 2

    trials = _optuna_trials(spec)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    seeded, own = trials[:2], trials[2:]
    assert all(t.user_attrs[SOURCE_ATTR] == "old" for t in seeded)
    assert not any(SOURCE_ATTR in t.user_attrs for t in own)
    searched = {p.name for p in spec.load_space().params}
    by_id = {t.trial_id: t for t in old.trials}
    for trial in seeded:
        source = by_id[trial.user_attrs[TRIAL_ATTR]]
        assert trial.params == {k: v for k, v in source.config.items() if k in searched}
        assert trial.value == source.metrics["val/pgd_acc"]
    assert {t.user_attrs[TRIAL_ATTR] for t in seeded} == set(by_id)
    assert {t.trial_id for t in new.trials}.isdisjoint(by_id)

    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    (parent,) = tracker.find_runs(**{TAG_STUDY: "new", TAG_ROLE: ROLE_STUDY})
    assert parent.data.tags[TAG_WARM_START] == "old"
    assert parent.data.tags[TAG_WARM_START_TRIALS] == "2"

    # a bad name: one error, exit 2, no study folder and no experiment of that name
    code = cli.main(_run_args(tmp_path, "--name", "newer", "--warm-start", "olde", "--epochs", "1"))
    assert code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "--warm-start olde" in err and "studies there: new, old" in err, err
    assert not (tmp_path / "studies" / "newer").exists()
    assert tracker.client.get_experiment_by_name("newer") is None
    # another objective: refused, naming both
    other = make_spec(tmp_path, "newer", warm_start="old", metrics=["val/clean_acc"], **common)
    with pytest.raises(UserError, match="needs the same objectives"):
        run_study(other)
    assert not (tmp_path / "studies" / "newer").exists()
