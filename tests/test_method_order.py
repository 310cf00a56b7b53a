"""Robust training beats standard training under PGD-20 and AutoAttack, on real data.

Every method trains with the same seed, data and schedule and is then measured
by the loop's own final evaluation (``trainables.loop.final_evaluation``):
clean, PGD-20 and standard AutoAttack accuracy on the same ``test_subset`` test
points, each with its 95 % Wilson interval. Two settings:

* ``digits`` (bundled 8x8 grayscale, eps 0.2): ``standard`` and all six robust
  methods;
* ``cifar10-jpeg`` (the shared CIFAR-10 JPEG folder read by ``imagefolder``,
  eps 8/255, 4,000 training images, 100 test points): ``standard``, ``trades``,
  ``weat_adv`` and ``sat`` (standard AutoAttack costs ~25 s per robust CIFAR model
  on one CPU thread, most of it FAB-T and Square, so not all six fit the budget).

Each method is evaluated at the end of the schedule (``select_from = epochs``): the
loop's default pick by validation PGD accuracy takes standard training's first,
barely trained epoch, whose few "robust" points come from near-constant predictions.

The table is printed (``pytest -m slow -s``; pytest also shows it on failure). The
module runs in about 4 minutes on two CPU cores, one torch thread per run, and its
numbers are the same on every run (fixed seeds, CPU, one thread).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.loop import train
from trainables.stats import wilson_interval

pytestmark = pytest.mark.slow

ROBUST_ALL = ("trades", "weat_adv", "sat", "mart", "mail_trades", "weat_nat")

# beside the checkout (../shared/data), as on the development and CI machines;
# ENERGY_STUDY_CIFAR_JPEG points elsewhere (as in test_data.py)
_CANDIDATES = [
    Path(os.environ.get("ENERGY_STUDY_CIFAR_JPEG", "/nonexistent")),
    Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-test-jpeg",
    Path("/work/shared/data/cifar10-test-jpeg"),
]
CIFAR_JPEG = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[1])

# Digits: the settings of test_loop.py's PGD-only version (eps 0.2 on [0, 1]), with a
# narrower CNN and 100 test points so that AutoAttack fits.
DIGITS = {
    "dataset": "digits",
    "model": "small_cnn",
    "model_kwargs": {"width": 16},
    "eps": 0.2,
    "step_size": 0.05,
    "attack_steps": 5,
    "val_attack_steps": 10,
    "eval_steps": 20,
    "eval_step_size": 0.05,
    "batch_size": 64,
    "epochs": 6,
    "select_from": 6,
    "probe_n": 0,
    "test_subset": 100,
    "autoattack": True,
    "aa_version": "standard",
    "seed": 0,
    "num_threads": 1,
}

# CIFAR-10 JPEGs (32x32 RGB): the usual eps 8/255 threat model and PGD-20 with step
# 2/255; 4,000 training images, 5 epochs, no augmentation (it only slows so short a
# run), batch 64 so that the schedule has enough steps (5 x 63); 100 test points.
CIFAR = {
    "dataset": "imagefolder",
    "data_root": str(CIFAR_JPEG),
    "model": "small_cnn",
    "model_kwargs": {"width": 16},
    "eps": 8 / 255,
    "step_size": 2 / 255,
    "attack_steps": 5,
    "val_attack_steps": 10,
    "val_subset": 256,
    "eval_steps": 20,
    "eval_step_size": 2 / 255,
    "batch_size": 64,
    "epochs": 5,
    "select_from": 5,
    "augment": "none",
    "train_subset": 4000,
    "probe_n": 0,
    "test_subset": 100,
    "autoattack": True,
    "aa_version": "standard",
    "seed": 0,
    "num_threads": 1,
}

# name: (config, robust methods, least clean accuracy of standard training)
SETTINGS = {
    # measured: 1.000 on the 100 test points
    "digits": (DIGITS, ROBUST_ALL, 0.90),
    # measured: 0.500 on the 100 test points (10 classes, chance 0.10)
    "cifar10-jpeg": (CIFAR, ("trades", "weat_adv", "sat"), 0.35),
}

#: standard training is broken by PGD-20 (measured 0.000 digits, 0.020 CIFAR)
STANDARD_PGD_MAX = 0.10
#: AutoAttack may end above PGD-20 by at most this much on the same points (it is the
#: stronger attack; measured AA <= PGD for every method, by 0.00 to 0.24)
AA_OVER_PGD_TOL = 0.02


@pytest.fixture
def one_thread():
    """One torch thread per run (the loop sets it from ``num_threads``); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cell(p: float, n: int) -> str:
    lo, hi = wilson_interval(p, n)
    return f"{p:.3f} [{lo:.3f}, {hi:.3f}]"


def _table(name: str, rows: dict[str, dict[str, float]], seconds: dict[str, float]) -> str:
    head = (
        f"{'method':<12} {'clean [95% CI]':<22} {'PGD-20 [95% CI]':<22} "
        f"{'AA [95% CI]':<22} {'n':>4} {'time_s':>7}"
    )
    lines = [f"method order on {name} (95 % Wilson intervals)", head, "-" * len(head)]
    for method, m in rows.items():
        n = int(m["test/n"])
        lines.append(
            f"{method:<12} {_cell(m['test/clean_acc'], n):<22} {_cell(m['test/pgd_acc'], n):<22} "
            f"{_cell(m['test/aa_acc'], n):<22} {n:>4} {seconds[method]:>7.1f}"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_robust_methods_beat_standard_under_pgd20_and_autoattack(
    name: str, tmp_path, one_thread
) -> None:
    base, robust, standard_clean_min = SETTINGS[name]
    if base["dataset"] == "imagefolder" and not CIFAR_JPEG.is_dir():
        pytest.skip(
            f"shared CIFAR-10 JPEG folder not found ({CIFAR_JPEG}; set ENERGY_STUDY_CIFAR_JPEG)"
        )
    first = TrainConfig.from_dict({**base, "method": "standard"})
    data = load_data(  # one copy of the data for every method
        first.dataset,
        first.data_root,
        val_fraction=first.val_fraction,
        split_seed=first.split_seed,
        augment=first.augment,
        train_subset=first.train_subset,
    )

    rows: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    for method in ("standard", *robust):
        cfg = TrainConfig.from_dict({**base, "method": method})
        start = time.perf_counter()
        rows[method] = train(cfg, output_dir=tmp_path / method, data=data).test_metrics
        seconds[method] = time.perf_counter() - start
    table = _table(name, rows, seconds)
    print("\n" + table, flush=True)

    n = int(rows["standard"]["test/n"])
    assert n == base["test_subset"], table
    assert all(int(m["test/n"]) == n for m in rows.values()), table  # the same points
    std = rows["standard"]
    assert std["test/clean_acc"] >= standard_clean_min, f"standard training did not learn\n{table}"
    assert std["test/pgd_acc"] <= STANDARD_PGD_MAX, f"PGD-20 does not break standard\n{table}"

    for method, m in rows.items():
        assert m["test/aa_acc"] <= m["test/pgd_acc"] + AA_OVER_PGD_TOL, (
            f"{method}: AutoAttack weaker than PGD-20 on the same points\n{table}"
        )
    for attack in ("pgd_acc", "aa_acc"):
        std_high = wilson_interval(std[f"test/{attack}"], n)[1]
        for method in robust:
            low = wilson_interval(rows[method][f"test/{attack}"], n)[0]
            # the intervals do not overlap: robust > standard beyond the sampling error
            assert low > std_high, (
                f"{method} {attack}: Wilson lower bound {low:.3f} is not above standard's "
                f"upper bound {std_high:.3f}\n{table}"
            )
