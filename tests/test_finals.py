"""A study's second stage on real Ray + MLflow: the finalists get PGD and standard
AutoAttack on the same test points, recorded with n and 95 % Wilson intervals;
the search itself runs no AutoAttack and logs the ΔE training probe every epoch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from reports.vocabulary import FINAL_ARTIFACT, TAG_FINALIST, TAG_TRIAL
from study.export import trial_runs
from study.runner import finalists, run_study
from study.spec import StudySpec
from study.tracking import MlflowTracker
from trainables.data import load_data
from trainables.stats import wilson_interval

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "eps": 0.1,
    "step_size": 0.025,
    "attack_steps": 3,
    "val_attack_steps": 5,
    "eval_steps": 5,
    "eval_step_size": 0.025,
    "batch_size": 64,
    "test_subset": 100,
    "probe_n": 64,
}
FINAL_N = 40


def test_finalists_get_pgd_and_autoattack_on_the_same_points(tmp_path: Path) -> None:
    spec = StudySpec(
        name="finals",
        space="smoke",
        base=dict(BASE),
        trials=3,
        epochs=2,
        asha=False,
        finalists=2,
        final_n=FINAL_N,
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        storage=str(tmp_path / "studies"),
    )
    outcome = run_study(spec)
    tracker = MlflowTracker(spec.tracking_uri, spec.name)
    runs = {r.data.tags[TAG_TRIAL]: r for r in trial_runs(tracker, spec.name)}
    assert len(runs) == 3

    # the search: no AutoAttack, the ΔE probe and the val interval at every epoch
    for run in runs.values():
        assert "test/aa_acc" not in run.data.metrics and run.data.params["autoattack"] == "False"
        probe = tracker.client.get_metric_history(run.info.run_id, "train_probe/delta_energy")
        assert sorted(m.step for m in probe) == [1, 2]
        assert run.data.metrics["val/n"] == 144 and "val/pgd_acc_ci_low" in run.data.metrics

    # the finalists: the two best finished trials by val/pgd_acc, ranks 1 and 2
    chosen = [t.trial_id for t in finalists(outcome)]
    assert len(chosen) == 2 and [f.trial_id for f in outcome.finals] == chosen
    others = [t for t in outcome.trials if t.trial_id not in chosen]
    worst_finalist = min(runs[t].data.metrics["val/pgd_acc"] for t in chosen)
    assert all(t.metrics["val/pgd_acc"] <= worst_finalist for t in others)
    expected_index = load_data("digits").test.subset_indices(FINAL_N, seed=0).numpy()
    for rank, trial_id in enumerate(chosen, start=1):
        run = tracker.client.get_run(runs[trial_id].info.run_id)
        m = run.data.metrics
        assert run.data.tags[TAG_FINALIST] == str(rank)
        assert m["final/n"] == FINAL_N
        with tempfile.TemporaryDirectory() as tmp:
            path = tracker.client.download_artifacts(run.info.run_id, FINAL_ARTIFACT, tmp)
            saved = dict(np.load(path))
        # PGD and AutoAttack on one index set: the seeded subset of the test set
        assert np.array_equal(saved["index"], expected_index)
        assert len(saved["pgd_correct"]) == len(saved["aa_robust"]) == FINAL_N
        assert m["final/pgd_acc"] == pytest.approx(saved["pgd_correct"].mean())
        assert m["final/aa_acc"] == pytest.approx(saved["aa_robust"].mean())
        both = (saved["pgd_correct"] & saved["aa_robust"]).mean()
        assert m["final/robust_acc"] == pytest.approx(both)
        for key in ("final/clean_acc", "final/pgd_acc", "final/aa_acc"):
            lo, hi = wilson_interval(m[key], FINAL_N)
            assert m[key + "_ci_low"] == pytest.approx(lo)
            assert m[key + "_ci_high"] == pytest.approx(hi)
    for trial_id in runs.keys() - set(chosen):
        assert TAG_FINALIST not in runs[trial_id].data.tags
        assert "final/aa_acc" not in runs[trial_id].data.metrics

    parent = tracker.client.get_run(outcome.parent_run_id)
    assert parent.data.metrics["study/search_s"] > 0 and parent.data.metrics["study/final_s"] > 0
    print(
        f"search {outcome.search_s:.1f} s, finalists {outcome.final_s:.1f} s; "
        + "; ".join(f"{f.trial_id}: {f.metrics}" for f in outcome.finals)
    )
