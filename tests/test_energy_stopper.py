"""The ΔE stopper (``--stop-on-energy-divergence``, :mod:`study.stopper`).

The rule on hand-made histories (it fires after a steep fall, not on noise, never
before epoch 2, its window and threshold honoured), its parameters refused before
Ray starts, and one real study (Ray, Optuna, MLflow on SQLite) whose recorded stop
is checked against the rule replayed on the ΔE history its run logged.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from reports.vocabulary import (
    BEST_CHECKPOINT,
    TAG_CONSTRAINTS,
    TAG_EARLY,
    TAG_KEPT_EPOCH,
    TAG_STOP_EPOCH,
    TAG_STOP_REASON,
    TAG_TRIAL,
)
from study import cli
from study.spec import StudySpec
from study.stopper import (
    DELTA_ENERGY,
    REASON,
    DivergenceRule,
    EnergyDivergenceStopper,
    checkpoints_to_keep,
    divergence_at,
    divergence_onset,
    history_from_rows,
)
from trainables.errors import ConfigError


def as_history(values: list[float]) -> dict[int, float]:
    """ΔE by epoch from a list (epoch 1 first)."""
    return {epoch: value for epoch, value in enumerate(values, start=1)}


# --- the rule --------------------------------------------------------------------------


def test_fires_on_the_first_epoch_of_a_steep_fall_and_names_the_peak() -> None:
    # flat around -1, then a fall to -1.6 at epoch 8 (60 % of the peak -1.0 at epoch 6)
    history = as_history([-0.9, -1.0, -1.05, -0.98, -1.02, -1.0, -1.1, -1.6, -2.5])
    rule = DivergenceRule(window=3, threshold=0.25, min_epoch=2)
    found = divergence_onset(history, rule)
    assert found is not None
    assert (found.epoch, found.peak_epoch) == (8, 6)
    assert found.peak == -1.0 and found.value == -1.6
    assert math.isclose(found.fall, 0.6)
    # the pure rule, epoch by epoch: nothing before the onset
    assert [divergence_at(history, e, rule) is not None for e in range(2, 8)] == [False] * 6


def test_noise_below_the_threshold_never_fires() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = (torch.rand(40, generator=gen) - 0.5) * 0.2  # ±0.1 around -2: at most 10 %
    history = as_history([-2.0 + float(n) for n in noise])
    assert divergence_onset(history, DivergenceRule(window=5, threshold=0.15, min_epoch=2)) is None


def test_never_before_min_epoch_and_never_at_epoch_one() -> None:
    # the steepest fall is from epoch 1 to 2; a rule from epoch 4 on sees the window 1..3
    history = as_history([-0.1, -1.0, -1.1, -1.15, -1.2])
    assert (
        divergence_onset(history, DivergenceRule(window=1, threshold=0.25, min_epoch=2)).epoch == 2
    )
    late = divergence_onset(history, DivergenceRule(window=1, threshold=0.25, min_epoch=3))
    assert late is None  # epochs 3..5 fall by < 25 % from the epoch before
    # epoch 1 has nothing to fall from, whatever the history holds
    assert divergence_at({1: -5.0}, 1, DivergenceRule(min_epoch=2)) is None
    with pytest.raises(ConfigError, match="divergence_min_epoch = 1"):
        DivergenceRule(min_epoch=1).check()


def test_the_window_bounds_where_the_peak_is_taken() -> None:
    # a slow slide: 10 % per epoch; over 1 epoch never 25 %, over 3 epochs 27 %
    history = as_history([-1.0, -1.1, -1.21, -1.331, -1.4641])
    assert divergence_onset(history, DivergenceRule(window=1, threshold=0.25, min_epoch=2)) is None
    found = divergence_onset(history, DivergenceRule(window=3, threshold=0.25, min_epoch=2))
    assert (found.epoch, found.peak_epoch) == (4, 1)


def test_the_threshold_is_a_fall_relative_to_the_peak() -> None:
    history = as_history([-2.0, -2.0, -2.5])  # 25 % below the peak
    assert divergence_onset(history, DivergenceRule(window=2, threshold=0.25, min_epoch=2))
    assert divergence_onset(history, DivergenceRule(window=2, threshold=0.26, min_epoch=2)) is None
    # a rise is never a fall, and a positive peak falls relative to itself too
    assert divergence_onset(as_history([1.0, 2.0, 4.0]), DivergenceRule(min_epoch=2)) is None
    found = divergence_onset(as_history([2.0, 1.0]), DivergenceRule(window=1, min_epoch=2))
    assert found.epoch == 2 and math.isclose(found.fall, 0.5)


def test_wobbles_around_zero_need_the_absolute_fall_too() -> None:
    # the first phases: natural and adversarial energies comparable, ΔE around 0
    history = as_history([0.01, -0.01, 0.005, -0.02, 0.0, -0.03])
    assert divergence_onset(history, DivergenceRule(window=2, min_epoch=2, min_drop=0.1)) is None
    found = divergence_onset(history, DivergenceRule(window=2, min_epoch=2, min_drop=0.0))
    assert found.epoch == 2 and math.isclose(found.fall, 2.0)
    with pytest.raises(ConfigError, match="divergence_min_drop = -0.1"):
        DivergenceRule(min_drop=-0.1).check()


@pytest.mark.parametrize(
    ("window", "threshold", "message"),
    [(0, 0.25, "divergence_window = 0"), (3, 0.0, "divergence_threshold = 0.0"),
     (3, math.inf, "divergence_threshold = inf")],
)  # fmt: skip
def test_bad_parameters_are_refused(window: int, threshold: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DivergenceRule(window, threshold, 2).check()


def test_the_stopper_replays_the_rule_and_its_history_survives_a_save() -> None:
    history = as_history([-0.9, -1.0, -1.05, -0.98, -1.02, -1.0, -1.1, -1.6, -2.5])
    rule = DivergenceRule(window=3, threshold=0.25, min_epoch=2)
    stopper = EnergyDivergenceStopper(rule)
    decisions = {
        e: stopper("t1", {"epoch": e, DELTA_ENERGY: v}) for e, v in history.items() if e <= 5
    }
    assert not any(decisions.values())
    # a resumed study: a new stopper gets the saved history, the trial goes on
    again = EnergyDivergenceStopper(rule)
    again.set_state(stopper.get_state())
    later = [again("t1", {"epoch": e, DELTA_ENERGY: history[e]}) for e in (6, 7, 8)]
    assert later == [False, False, True]
    assert again.stopped["t1"].epoch == divergence_onset(history, rule).epoch
    assert not again("t2", {"epoch": 3})  # a result without ΔE: never stops
    assert not again.stop_all()
    # a history that came back without the onset's epochs (restored past it): the next
    # result stops the trial, as the replay of its metrics.jsonl would have
    short = EnergyDivergenceStopper(rule)
    onset = divergence_onset(history, rule).epoch
    for e in range(1, onset - 1):
        short("t3", {"epoch": e, DELTA_ENERGY: history[e]})
    short.history["t3"][onset] = history[onset]  # known, but never decided on
    assert short("t3", {"epoch": onset + 1, DELTA_ENERGY: -2.6})
    assert short.stopped["t3"].epoch == onset


def test_history_from_metrics_rows_skips_rows_without_delta_energy() -> None:
    rows = [{"epoch": 1, DELTA_ENERGY: -0.5}, {"epoch": 2}, {"epoch": 3, DELTA_ENERGY: -0.7}]
    assert history_from_rows(rows) == {1: -0.5, 3: -0.7}


def test_the_spec_refuses_bad_stopper_settings_before_ray_starts(tmp_path, capsys) -> None:
    base = ["run", "--space", "smoke", "--name", "refused", "--storage", str(tmp_path / "s"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--trials", "1",
            "--stop-on-energy-divergence"]  # fmt: skip
    assert cli.main([*base, "--divergence-min-epoch", "1"]) == 2
    assert "divergence_min_epoch = 1" in capsys.readouterr().err
    assert cli.main([*base, "--divergence-window", "0"]) == 2
    assert "divergence_window = 0" in capsys.readouterr().err
    assert cli.main([*base, "--set", "probe_n=0"]) == 2
    assert "probe_n" in capsys.readouterr().err
    assert cli.main([*base, "--metric", "test/pgd_acc", "--scheduler", "none"]) == 2
    assert "or drop --stop-on-energy-divergence" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # nothing was created


def test_the_stopper_and_its_callback_stay_one_object_in_a_saved_run_config() -> None:
    """``study resume``: Tune pickles the Tuner's RunConfig as one object, so the stopper
    (``stop``) and the callback that carries its saved history are still one."""
    import pickle

    from ray import tune

    stopper = EnergyDivergenceStopper(DivergenceRule())
    stopper("t1", {"epoch": 1, DELTA_ENERGY: -0.5})
    config = pickle.loads(pickle.dumps(tune.RunConfig(stop=stopper, callbacks=[stopper])))
    assert config.stop is config.callbacks[0]
    assert config.stop.history == {"t1": {1: -0.5}}


def test_checkpoints_kept_cover_the_window() -> None:
    spec = StudySpec(name="k", space="smoke", divergence_window=4)
    assert checkpoints_to_keep(spec) == 2
    spec.stop_on_energy_divergence = True
    assert checkpoints_to_keep(spec) == 5
    spec.backend = "train"  # its workers may save one more epoch before the stop lands
    assert checkpoints_to_keep(spec) == 6


def _checkpoint(folder: Path, deltas: list[float], best_epoch: int | None) -> Path:
    """A trial checkpoint folder as Tune stores it: ``metrics.jsonl`` with one row per
    epoch of ``deltas`` and, unless ``best_epoch`` is None, ``checkpoints/best.pt``."""
    import json

    from trainables.checkpoint import save_checkpoint
    from trainables.files import METRICS_LOG

    folder.mkdir(parents=True)
    rows = [{"epoch": e, DELTA_ENERGY: v} for e, v in enumerate(deltas, start=1)]
    (folder / METRICS_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if best_epoch is not None:
        save_checkpoint(folder / BEST_CHECKPOINT, {"model": {}, "epoch": best_epoch})
    return folder


def test_energy_stop_keeps_the_best_pt_of_the_peaks_checkpoint(tmp_path) -> None:
    from study.stopper import energy_stop

    spec = StudySpec(name="k", space="smoke", storage=str(tmp_path), divergence_window=2)
    spec.stop_on_energy_divergence = True
    spec.divergence_min_epoch = 2
    deltas = [-1.0, -1.05, -1.02, -1.9]  # the fall at epoch 4, from the peak at epoch 3
    trial = tmp_path / "k" / "tune" / "run_trial_abcde_00000_0_x"
    _checkpoint(trial / "checkpoint_000002", deltas[:3], best_epoch=2)
    last = _checkpoint(trial / "checkpoint_000003", deltas, best_epoch=4)
    stop = energy_stop(spec, "abcde_00000", last, tmp_path / "kept")
    assert (stop.found.epoch, stop.found.peak_epoch, stop.kept_epoch) == (4, 3, 2)
    assert torch.load(stop.best, weights_only=True)["epoch"] == 2  # not the last one's 4
    # a trial the rule did not stop (its last epoch is no onset): nothing
    calm = _checkpoint(tmp_path / "calm", deltas[:3], best_epoch=2)
    assert energy_stop(spec, "abcde_00000", calm, tmp_path / "kept") is None
    # the peak's checkpoint is gone: said, and no best.pt from the fall instead
    (trial / "checkpoint_000002" / "metrics.jsonl").unlink()
    lost = energy_stop(spec, "abcde_00000", last, tmp_path / "kept")
    assert lost.best is None and "epoch 3" in lost.error
    # no epoch up to the peak was eligible for best.pt: none kept
    other = tmp_path / "k" / "tune" / "run_trial_fghij_00001_1_x"
    _checkpoint(other / "checkpoint_000002", deltas[:3], best_epoch=None)
    last = _checkpoint(other / "checkpoint_000003", deltas, best_epoch=4)
    none = energy_stop(spec, "fghij_00001", last, tmp_path / "kept")
    assert none.best is None and none.kept_epoch is None and none.error is None


# --- the result a stopped trial keeps ---------------------------------------------------


def test_the_kept_epoch_follows_the_loops_best_pt_rule() -> None:
    from study.stopper import kept_epoch

    rows = {1: {"val/pgd_acc": 0.5}, 2: {"val/pgd_acc": 0.3}, 3: {"val/pgd_acc": 0.5},
            4: {"val/pgd_acc": 0.4}, 5: {"val/pgd_acc": 0.9}}  # fmt: skip
    assert kept_epoch(rows, peak_epoch=4, select_from=1, epochs=10) == 1  # ties: the first
    assert kept_epoch(rows, peak_epoch=4, select_from=2, epochs=10) == 3
    assert kept_epoch(rows, peak_epoch=5, select_from=2, epochs=10) == 5
    assert kept_epoch(rows, peak_epoch=2, select_from=3, epochs=10) is None  # none eligible
    assert kept_epoch(rows, peak_epoch=4, select_from=30, epochs=4) == 4  # min(30, epochs)
    no_val = {1: {"val/clean_acc": 0.5}, 2: {"val/clean_acc": 0.6}}
    assert kept_epoch(no_val, peak_epoch=2, select_from=1, epochs=5) is None


def test_kept_result_names_the_stop_and_the_kept_epochs_metrics() -> None:
    from study.stopper import kept_result

    rule = DivergenceRule(window=2, threshold=0.25, min_epoch=2, min_drop=0.1)
    deltas, accs = [1.0, 1.5, 1.6, 0.5], [0.30, 0.45, 0.40, 0.20]
    rows = [{"epoch": e, DELTA_ENERGY: d, "val/pgd_acc": a, "val/clean_acc": a + 0.3}
            for e, (d, a) in enumerate(zip(deltas, accs), start=1)]  # fmt: skip
    kept = kept_result(rule, rows, select_from=1, epochs=10)
    assert (kept.found.epoch, kept.found.peak_epoch, kept.epoch) == (4, 3, 2)
    assert kept.metrics["val/pgd_acc"] == 0.45 and kept.metrics["val/clean_acc"] == 0.75
    assert kept_result(rule, rows[:3], select_from=1, epochs=10) is None  # no fall yet
    assert kept_result(None, rows, select_from=1, epochs=10) is None  # stopper off
    none = kept_result(rule, rows, select_from=4, epochs=10)
    assert none.epoch is None and none.metrics == {}


def test_the_searcher_tells_a_stopped_trial_complete_with_its_kept_epochs_value(
    tmp_path,
) -> None:
    from optuna.trial import TrialState
    from test_search import _searcher

    spec, searcher = _searcher(tmp_path, epochs=8, stop_on_energy_divergence=True,
                               divergence_window=2, divergence_min_epoch=2)  # fmt: skip
    for trial_id in ("kept", "none", "asha"):
        assert searcher.suggest(trial_id)
    deltas, accs = [1.0, 1.5, 1.6, 0.5], [0.30, 0.45, 0.40, 0.20]
    for trial_id in ("kept", "none"):
        for epoch, (d, a) in enumerate(zip(deltas, accs), start=1):
            result = {"epoch": epoch, DELTA_ENERGY: d, "val/pgd_acc": a}
            if epoch < 4:
                searcher.on_trial_result(trial_id, result)
        if trial_id == "none":  # nothing up to the peak could become best.pt
            searcher._configs[trial_id] = {**searcher._configs[trial_id], "select_from": 4}
        searcher.on_trial_complete(trial_id, result)  # the stop epoch's result
    searcher.on_trial_result("asha", {"epoch": 1, DELTA_ENERGY: 1.0, "val/pgd_acc": 0.1})
    searcher.on_trial_complete("asha", {"epoch": 2, DELTA_ENERGY: 1.1, "val/pgd_acc": 0.2})

    kept, none, asha = searcher._ot_study.get_trials(deepcopy=False)
    assert kept.state == TrialState.COMPLETE and kept.value == pytest.approx(0.45)
    assert kept.user_attrs == {"stop_epoch": 4, "kept_epoch": 2}
    assert kept.intermediate_values == pytest.approx(dict(enumerate(accs, start=1)))
    assert none.state == TrialState.PRUNED and none.user_attrs == {"stop_epoch": 4}
    assert asha.state == TrialState.PRUNED and asha.user_attrs == {}  # no fall: ASHA's stop
    assert searcher._rows == {}  # nothing kept after the ends


# --- a real study ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_study_stops_a_trial_at_the_onset_and_keeps_a_checkpoint_before_it(tmp_path) -> None:
    """One trial at a time (ASHA's cuts then follow from the seeded sampler and training,
    never from which trial reached a rung first)."""
    from study.export import best_runs, trial_runs
    from study.tracking import MlflowTracker

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rule = DivergenceRule(window=2, threshold=0.2, min_epoch=3, min_drop=0.05)
    argv = ["run", "--space", "smoke", "--name", "de-stop", "--storage", str(tmp_path / "s"),
            "--tracking-uri", tracking, "--trials", "2", "--epochs", "5", "--max-concurrent", "1",
            "--finalists", "0", "--scheduler", "asha", "--grace-period", "2",
            "--set", "train_subset=400", "--set", "val_subset=128",
            "--set", "probe_n=128", "--set", "test_subset=100", "--stop-on-energy-divergence",
            "--divergence-window", str(rule.window),
            "--divergence-threshold", str(rule.threshold),
            "--divergence-min-epoch", str(rule.min_epoch),
            "--divergence-min-drop", str(rule.min_drop),
            "--constraint", "val/pgd_acc>=0"]  # fmt: skip
    code = cli.main(argv)

    tracker = MlflowTracker(tracking, "de-stop")
    stopped = finished = 0
    results: set[str] = set()
    for run in trial_runs(tracker, "de-stop"):
        points = tracker.client.get_metric_history(run.info.run_id, DELTA_ENERGY)
        history = {int(m.step): m.value for m in points}
        onset = divergence_onset(history, rule)
        tags = run.data.tags
        if onset is None:  # ran to its end without a fall
            assert TAG_STOP_EPOCH not in tags, run.data.tags[TAG_TRIAL]
            finished += tags[TAG_EARLY] == "false"
            continue
        stopped += 1
        assert onset.epoch >= 2 and onset.epoch >= rule.min_epoch
        assert max(history) == onset.epoch  # no epoch after the stop
        assert int(tags[TAG_STOP_EPOCH]) == onset.epoch
        assert tags[TAG_STOP_REASON].startswith(REASON)
        assert tags[TAG_EARLY] == "true"
        kept = int(tags[TAG_KEPT_EPOCH])
        assert 1 <= kept <= onset.peak_epoch < onset.epoch
        weights = tracker.download(run.info.run_id, BEST_CHECKPOINT, tmp_path / run.info.run_id)
        assert torch.load(Path(weights), weights_only=True)["epoch"] == kept
        # the kept epoch is the trial's result: its metrics again under kept/, the
        # best.pt selection's record, and its checkpoint tested like a finished trial's
        metrics, run_id = run.data.metrics, run.info.run_id
        val = {
            int(m.step): m.value for m in tracker.client.get_metric_history(run_id, "val/pgd_acc")
        }
        assert (
            metrics["kept/val/pgd_acc"]
            == val[kept]
            == max(v for e, v in val.items() if e <= onset.peak_epoch)
        )
        assert metrics["best_epoch"] == kept and metrics["best/val_pgd_acc"] == val[kept]
        # its constraints are judged on the kept epoch, as Optuna is told
        assert tags[TAG_CONSTRAINTS] == f"val/pgd_acc>=0: {val[kept]:.4f} met"
        assert (
            metrics["test/n"] == 100 and 0 <= metrics["test/pgd_acc"] <= metrics["test/clean_acc"]
        )
        files = {f.path for f in tracker.client.list_artifacts(run_id)}
        assert {"energies.npz", "energy_hist.png"} <= files
        results.add(run.data.tags[TAG_TRIAL])
    assert stopped >= 1 and results
    # export, finals, warm start and the report take them as results, by the kept epoch
    ranked = best_runs(tracker, "de-stop", "val/pgd_acc", top=10)
    assert results <= {r.data.tags[TAG_TRIAL] for r in ranked}
    assert code == 0  # a kept result counts as a trial that ran to its end
