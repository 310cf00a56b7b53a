"""The paper's protocol: the reference schedule, model selection, the ΔE training probe,
evaluation on the same points with n and 95 % Wilson intervals, one precision per study."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainables.config import TrainConfig, build_config
from trainables.data import load_data
from trainables.loop import evaluate_weights, onecycle_at, schedule_at, train
from trainables.stats import wilson_interval, with_intervals

#: digits, a few seconds per run on one core
BASE = {
    "dataset": "digits",
    "model": "small_cnn",
    "eps": 0.1,
    "step_size": 0.025,
    "attack_steps": 3,
    "val_attack_steps": 3,
    "eval_steps": 5,
    "eval_step_size": 0.025,
    "batch_size": 64,
    "autoattack": False,
    "num_threads": 1,
}


def test_onecycle_is_torchs_onecyclelr_step_by_step() -> None:
    """100 epochs x 391 steps (CIFAR-10, batch 128): lr and momentum of every step
    equal torch.optim.lr_scheduler.OneCycleLR(max_lr=0.1, pct_start=0.25)."""
    steps = 100 * 391
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, pct_start=0.25, total_steps=steps)
    cfg = TrainConfig.from_dict({"lr_max": 0.1})
    lr_err = mom_err = 0.0
    for step in range(steps):
        lr, momentum = schedule_at(step, steps, cfg)
        group = opt.param_groups[0]
        lr_err = max(lr_err, abs(lr - group["lr"]))
        mom_err = max(mom_err, abs(momentum - group["momentum"]))
        opt.step()
        if step < steps - 1:
            ref.step()
    assert lr_err < 1e-12 and mom_err < 1e-12
    # the robust-overfitting phase the issue quotes: epochs 75 and 90 of 100
    assert onecycle_at(75 * 391, steps, 0.1, 0.25)[0] == pytest.approx(0.025, abs=5e-4)
    assert onecycle_at(90 * 391, steps, 0.1, 0.25)[0] == pytest.approx(0.0043, abs=5e-5)


def test_triangular_keeps_the_old_linear_schedule_and_momentum() -> None:
    cfg = TrainConfig.from_dict({"lr_schedule": "triangular", "lr_max": 0.2, "momentum": 0.9})
    assert schedule_at(0, 100, cfg) == (0.0, 0.9)
    assert schedule_at(40, 100, cfg)[0] == pytest.approx(0.2)
    assert schedule_at(70, 100, cfg)[0] == pytest.approx(0.1)


def test_wilson_interval_known_values_and_bounds() -> None:
    # Wilson's interval for 81 of 263 (a textbook example): 0.2553 .. 0.3662
    lo, hi = wilson_interval(81 / 263, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    assert wilson_interval(1.0, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0.0, 10)[0] == pytest.approx(0.0, abs=1e-15)
    assert wilson_interval(0.0, 10)[1] > 0.2  # never a zero-width interval at the edge
    # the 200-point AutoAttack of old: about ±6.5 points at 50 % (1.96 x 3.5 pt)
    lo, hi = wilson_interval(0.5, 200)
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 200), rel=0.02)
    out = with_intervals({"a_acc": 0.5, "b": 1.0}, n=100, keys=["a_acc", "missing"])
    assert set(out) == {"a_acc", "b", "a_acc_ci_low", "a_acc_ci_high"}


def test_preset_then_set_wins() -> None:
    cfg = build_config(None, ["data_root=/data", "epochs=3", "beta=2"], preset="cifar100-weat_adv")
    assert (cfg.dataset, cfg.model, cfg.beta, cfg.epochs) == ("cifar100", "resnet18", 2.0, 3)
    assert cfg.select_from == 91 and cfg.val_attack_steps == 20 and cfg.autoattack


def test_probe_intervals_and_selection_window_are_logged_every_epoch(tmp_path) -> None:
    cfg = TrainConfig.from_dict({**BASE, "epochs": 3, "probe_n": 64, "select_from": 3})
    result = train(cfg, output_dir=tmp_path)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for h in result.history:
        assert h["train_probe/n"] == 64 and math.isfinite(h["train_probe/delta_energy"])
        assert math.isfinite(h["train_probe/delta_energy_xy"])
        assert h["val/n"] == 144
        lo, hi = wilson_interval(h["val/pgd_acc"], 144)
        assert (h["val/pgd_acc_ci_low"], h["val/pgd_acc_ci_high"]) == (lo, hi)
        assert lo <= h["val/pgd_acc"] <= hi
    # select_from 3: only the last epoch may become best.pt, whatever epochs 1-2 scored
    assert result.best_epoch == 3
    # ΔE of the probe comes from the training attack on training points, not validation
    assert result.history[-1]["train_probe/delta_energy"] != result.history[-1]["val/delta_energy"]


def test_no_validation_set_keeps_the_last_epoch(tmp_path) -> None:
    cfg = TrainConfig.from_dict({**BASE, "epochs": 2, "val_fraction": 0.0, "probe_n": 0})
    with pytest.warns(UserWarning, match="no validation set"):
        result = train(cfg, output_dir=tmp_path)
    assert result.best_epoch == 2
    assert not any(k.startswith("val/") for k in result.history[-1])
    assert not any(k.startswith("train_probe/") for k in result.history[-1])
    assert "best/val_pgd_acc" not in result.test_metrics


@pytest.mark.slow
def test_pgd_and_autoattack_on_the_same_points(tmp_path) -> None:
    """The final evaluation and a finalist's evaluation measure every accuracy on one
    set of points, and report it with n and its interval."""
    cfg = TrainConfig.from_dict(
        {**BASE, "epochs": 2, "probe_n": 0, "test_subset": 40, "autoattack": True}
    )
    result = train(cfg, output_dir=tmp_path)
    m = result.test_metrics
    assert m["test/n"] == 40
    saved = np.load(tmp_path / "energies.npz")
    assert len(saved["aa_robust"]) == len(saved["pgd_correct"]) == 40
    assert m["test/aa_acc"] == pytest.approx(saved["aa_robust"].mean())
    assert m["test/pgd_acc"] == pytest.approx(saved["pgd_correct"].mean())
    both = (saved["aa_robust"] & saved["pgd_correct"]).mean()
    assert m["test/robust_acc"] == pytest.approx(both)
    assert m["test/robust_acc"] <= min(m["test/aa_acc"], m["test/pgd_acc"])
    assert m["test/aa_acc_ci_low"] <= m["test/aa_acc"] <= m["test/aa_acc_ci_high"]

    # a finalist's evaluation: the same seeded points of the test set
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["model"]
    data = load_data("digits")
    metrics, samples = evaluate_weights(cfg, best, n=40, data=data)
    expected = data.test.subset_indices(40, seed=cfg.split_seed).numpy()
    assert np.array_equal(samples["index"], expected)
    assert metrics["n"] == 40 and len(samples["aa_robust"]) == 40
    assert metrics["clean_acc"] == pytest.approx(m["test/clean_acc"])
    assert metrics["aa_acc"] == pytest.approx(m["test/aa_acc"])
    # the PGD's random start is seeded: the same checkpoint, the same PGD outcome per
    # point, whatever the RNG went through before (here a whole training run)
    assert metrics["pgd_acc"] == pytest.approx(m["test/pgd_acc"])
    assert np.array_equal(samples["pgd_correct"], saved["pgd_correct"])


def test_a_space_preset_is_the_base_of_every_trial(tmp_path) -> None:
    """preset < study base (--set) < the space's fixed values < the sampled parameters."""
    from study.spec import StudySpec

    space = tmp_path / "space.yaml"
    space.write_text(
        "preset: cifar100-weat_adv\nfixed:\n  attack_steps: 3\n"
        "params:\n  beta: {type: float, low: 1.0, high: 2.0}\n"
    )
    spec = StudySpec(name="p", space=str(space), base={"data_root": "/data", "attack_steps": 7})
    cfg = spec.trial_config({"beta": 1.5})
    assert (cfg.dataset, cfg.model, cfg.epochs, cfg.select_from) == (
        "cifar100",
        "resnet18",
        100,
        91,
    )
    assert cfg.attack_steps == 3 and cfg.beta == 1.5 and cfg.data_root == "/data"
    assert cfg.autoattack is False  # the search's trials; the finalists get AutoAttack
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: cifar10-wat_adv\nparams: {}\n")
    with pytest.raises(Exception, match=r"bad.yaml:1: unknown preset 'cifar10-wat_adv'"):
        StudySpec(name="p", space=str(bad), base={"data_root": "/d"}).validate()
