"""``study replicate``: the best trials' configurations trained again with new seeds, and
the leaderboard that scores a replicated configuration over its replicates.

The real-Ray study runs one trial at a time without early stopping, so which trials
are the best follows from the seeded sampler and the seeded training alone.
"""

from __future__ import annotations

import json
import statistics

import pytest

from reports.analysis import leaderboard
from reports.data import RunData
from reports.vocabulary import (
    ROLE_REPLICATE,
    SHARED_VIEW_PREFIX,
    TAG_REPLICATE_OF,
    TAG_REPLICATE_SEED,
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_TRIAL,
    VIEW_KEY,
)
from study.replicate import seeds_for
from trainables.errors import ConfigError

PGD, CLEAN = "val/pgd_acc", "test/clean_acc"


def _run(
    trial: str, beta: str, pgd: float, *, role: str = "trial", of: str = "", start: int = 0
) -> RunData:
    tags = {TAG_TRIAL: trial, TAG_ROLE: role, TAG_SEARCHED: "beta,seed"}
    if of:
        tags |= {TAG_REPLICATE_OF: of, TAG_REPLICATE_SEED: trial[-1]}
    metrics = {PGD: pgd, CLEAN: 0.9, "test/pgd_acc": pgd}
    return RunData(f"run-{trial}", trial, "FINISHED", start, 0,
                   {"beta": beta, "method": "weat_adv"}, metrics, tags,
                   searched_names=["beta", "seed"])  # fmt: skip


def test_seeds_are_new_and_never_the_source_trials_own() -> None:
    assert seeds_for(0, 3, None) == [1, 2, 3]
    assert seeds_for(7, 2, None) == [8, 9]
    assert seeds_for(0, 2, 10) == [10, 11]
    with pytest.raises(ConfigError, match="seed 5, the source trial's own"):
        seeds_for(5, 3, 4)


def test_a_replicated_configuration_is_scored_over_its_replicates_and_ranked_by_their_mean():
    """Trial a won the search (0.80) but its replicates average 0.50; trial b (0.70)
    averages 0.65 over its replicates; trial c (0.60) was not replicated. The
    leaderboard ranks b's configuration first, a's last, with n = 2 replicates each: an
    older training of b's seed 2 (replicated twice) counts once, the newest."""
    trials = [_run("a", "1.0", 0.80), _run("b", "2.0", 0.70), _run("c", "3.0", 0.60)]
    replicates = [
        _run("rb2", "2.0", 0.64, role=ROLE_REPLICATE, of="b", start=9),
        _run("ra1", "1.0", 0.55, role=ROLE_REPLICATE, of="a"),
        _run("ra2", "1.0", 0.45, role=ROLE_REPLICATE, of="a"),
        _run("rb1", "2.0", 0.66, role=ROLE_REPLICATE, of="b"),
        _run("ob2", "2.0", 0.10, role=ROLE_REPLICATE, of="b", start=1),
    ]
    frame = leaderboard(trials, [PGD], ["max"], replicates)
    assert list(frame["replicates of"]) == ["b", "", "a"]
    assert list(frame["n"]) == [2, 1, 2]
    assert list(frame["trials"]) == ["rb1 rb2", "c", "ra1 ra2"]  # ranked within: pgd first
    assert frame["test/pgd_acc mean"].tolist() == pytest.approx([0.65, 0.60, 0.50])
    assert frame["test/pgd_acc std"][0] == pytest.approx(statistics.stdev([0.66, 0.64]))
    # without replicates the search's own scores decide, as before
    plain = leaderboard(trials, [PGD], ["max"])
    assert list(plain["trials"]) == ["a", "b", "c"] and "replicates of" not in plain


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--top", "0"], "--top 0"), (["--seeds", "0"], "--seeds 0"),
     (["--first-seed", "-1"], "--first-seed -1")],
)  # fmt: skip
def test_bad_counts_are_refused_before_anything_is_read(tmp_path, capsys, args, says) -> None:
    from study import cli

    code = cli.main(["replicate", "nope", *args, "--storage", str(tmp_path / "studies"),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])  # fmt: skip
    assert code == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "m.db").exists()


def test_a_configuration_the_study_would_not_train_again_is_named(tmp_path) -> None:
    """The trial's config.yaml against what the study builds now from its Tune config:
    equal but for the seed and the data paths, no drift; a changed value is named."""
    from test_search import make_spec

    from study.replicate import config_drift

    spec = make_spec(tmp_path, "d")
    config = spec.load_space().sample_defaults()
    full = spec.trial_config(config).to_dict()
    moved = {**full, "seed": 7, "data_root": "/elsewhere"}
    assert config_drift(spec, config, moved) == []
    assert config_drift(spec, config, {**full, "eps": 0.3, "attack_steps": 9}) == [
        "attack_steps",
        "eps",
    ]


def test_the_replicate_callback_survives_pickling(tmp_path) -> None:
    """Tune pickles its callbacks with the experiment; the replicas come back."""
    import pickle

    from test_search import make_spec

    from study.replicate import Replica, ReplicateCallback

    spec = make_spec(tmp_path, "p")
    replica = Replica("t_00001", "run1", 3, {"beta": 2.0, "seed": 3})
    again = pickle.loads(pickle.dumps(ReplicateCallback(spec, "parent", [replica])))
    assert again.replicas == {replica.key: replica}
    assert again.run_tags("x", {"seed": 3, "beta": 2.0})[TAG_REPLICATE_OF] == "t_00001"


def test_replicate_trains_k_times_s_runs_tagged_with_their_source(tmp_path, capsys, ray_cluster):
    """A 3-trial study ends; ``study replicate --top 2 --seeds 2`` trains the two best
    trials' configurations with seeds 1 and 2 (the trials' own seed is 0): 4 runs nested
    under their source trials, with their configurations and seeds; the study still
    has 3 trials; the report's leaderboard scores those two configurations over n = 2
    replicates and ranks them by the replicates' mean. Run again, it trains nothing."""
    from test_search import make_spec

    from reports.data import load_study
    from study import cli
    from study.export import best_runs, trial_runs
    from study.runner import run_study
    from study.tracking import MlflowTracker
    from study.ui import publish_view

    spec = make_spec(tmp_path, "rep", trials=3, epochs=1, scheduler="none", max_concurrent=1)
    run_study(spec)
    store = ["--storage", spec.storage, "--tracking-uri", spec.tracking_uri]
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    best = best_runs(tracker, spec.name, PGD, "max", 2)
    sources = {r.data.tags[TAG_TRIAL]: r for r in best}
    assert len(sources) == 2
    capsys.readouterr()

    assert cli.main(["replicate", "rep", "--top", "2", "--seeds", "2", *store]) == 0
    out = capsys.readouterr().out
    assert "2 trial(s) of study rep with 2 seed(s) each: 4 training(s) to run, 0 already" in out

    reps = tracker.find_runs(**{"energy_study.study": "rep", TAG_ROLE: ROLE_REPLICATE})
    assert len(reps) == 4 and all(r.info.status == "FINISHED" for r in reps)
    pairs = sorted((r.data.tags[TAG_REPLICATE_OF], r.data.tags[TAG_REPLICATE_SEED]) for r in reps)
    assert pairs == sorted((t, s) for t in sources for s in ("1", "2"))
    for run in reps:
        source = sources[run.data.tags[TAG_REPLICATE_OF]]
        assert run.data.tags["mlflow.parentRunId"] == source.info.run_id
        assert run.data.params["seed"] == run.data.tags[TAG_REPLICATE_SEED]
        for key in ("method", "beta", "weight_fn"):
            assert run.data.params[key] == source.data.params[key], key
        assert CLEAN in run.data.metrics and PGD in run.data.metrics
        assert run.info.run_name.endswith(f" seed={run.data.tags[TAG_REPLICATE_SEED]}")
    assert len(trial_runs(tracker, spec.name)) == 3  # replicates are not trials

    data = load_study("rep", spec.tracking_uri, tmp_path / "report")
    frame = leaderboard(data.trials, data.objective, data.modes, data.replicates)
    replicated = frame[frame["replicates of"] != ""]
    assert sorted(replicated["replicates of"]) == sorted(sources)
    assert list(replicated["n"]) == [2, 2]
    means = {
        t: statistics.fmean(r.data.metrics[PGD] for r in reps if r.data.tags[TAG_REPLICATE_OF] == t)
        for t in sources
    }
    ranked = [means[t] for t in replicated["replicates of"]]
    assert ranked == sorted(ranked, reverse=True)  # by the replicates' mean (ties: any order)

    # the MLflow UI's saved view opens the replicated trials and shows source and seed
    state = json.loads(tracker.client.get_experiment(publish_view(tracker, "rep")).tags[
        f"{SHARED_VIEW_PREFIX}{VIEW_KEY}"])  # fmt: skip
    assert {r.info.run_id for r in best} <= set(state["runsExpanded"])
    assert f"tags.`{TAG_REPLICATE_OF}`" in state["selectedColumns"]

    assert cli.main(["replicate", "rep", "--top", "2", "--seeds", "2", *store]) == 0
    assert "0 training(s) to run, 4 already done" in capsys.readouterr().out
    assert len(tracker.find_runs(**{TAG_ROLE: ROLE_REPLICATE})) == 4
