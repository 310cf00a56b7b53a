"""Paper presets: every file builds a valid config and carries the paper's values."""

from __future__ import annotations

import math

import pytest

from trainables.config import TrainConfig
from trainables.errors import ConfigError
from trainables.presets import PRESETS, load_preset, preset_path

DATASETS = ("cifar10", "cifar100", "svhn")
METHODS = ("sat", "trades", "mart", "mail_trades", "weat_nat", "weat_adv")

# β per (dataset, method), from the paper: Appendix A.3 (WEAT_ADV 6/7, WEAT_NAT 6,
# MAIL-TRADES 5), TRADES 6 (A.3 "matching TRADES", Table 1c), MART 5 (Table 1c,
# ResNet-18). SAT has no β (None = the method's default, unused).
BETA = {
    "cifar10": {"trades": 6, "mart": 5, "mail_trades": 5, "weat_nat": 6, "weat_adv": 6},
    "cifar100": {"trades": 6, "mart": 5, "mail_trades": 5, "weat_nat": 6, "weat_adv": 7},
    "svhn": {"trades": 6, "mart": 5, "mail_trades": 5, "weat_nat": 6, "weat_adv": 6},
}
# Appendix A.3: epochs and training step α; select_from: the reference keeps the
# best checkpoint after epoch 90 of 100 (SVHN: the same last 10 % of 30 epochs).
SCHEDULE = {
    "cifar10": {"epochs": 100, "step_size": 2 / 255, "select_from": 91},
    "cifar100": {"epochs": 100, "step_size": 2 / 255, "select_from": 91},
    "svhn": {"epochs": 30, "step_size": 1 / 255, "select_from": 28},
}
# Shared by every preset (A.3, Section 4.1, reference code).
COMMON = {
    "model": "resnet18",
    "batch_size": 128,
    "lr_schedule": "onecycle",
    "lr_max": 0.1,
    "lr_pct_start": 0.25,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "norm": "linf",
    "eps": 8 / 255,
    "attack_steps": 10,
    "val_fraction": 0.0,
    "val_npz": None,
    "train_subset": None,
    "augment": "crop_flip",
    "val_attack_steps": 20,
    "val_subset": None,
    "eval_steps": 20,
    "eval_step_size": 2 / 255,
    "test_subset": None,
    "autoattack": True,
    "aa_version": "standard",
    "precision": "fp32",
    "weight_fn": "weat",
    "normalize": "none",
}


def _config(name: str) -> TrainConfig:
    return TrainConfig.from_dict({**load_preset(name), "data_root": "/nonexistent"})


def test_one_preset_per_dataset_and_method() -> None:
    assert sorted(PRESETS) == sorted(f"{d}-{m}" for d in DATASETS for m in METHODS)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_preset_matches_the_paper(dataset: str, method: str) -> None:
    name = f"{dataset}-{method}"
    assert "data_root" not in load_preset(name), "data_root is the user's to add"
    cfg = _config(name)  # validation passes without opening any file
    assert cfg.dataset == dataset
    assert cfg.method == method
    expected_beta = BETA[dataset].get(method)
    assert cfg.beta == expected_beta
    for key, value in {**COMMON, **SCHEDULE[dataset]}.items():
        got = getattr(cfg, key)
        if isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-12), (name, key, got, value)
        else:
            assert got == value, (name, key, got, value)


@pytest.mark.parametrize("dataset", DATASETS)
def test_mail_trades_preset_matches_the_official_code(dataset: str) -> None:
    cfg = _config(f"{dataset}-mail_trades")
    assert cfg.mail_scale == 3.0  # mail_loss.py weight_assign: 3 * sigmoid
    assert (cfg.bias, cfg.slope) == (0.0, 2.0)  # README of the MAIL code
    assert cfg.burn_in is None and cfg.burn_in_fraction == 0.75  # A.3: 75 of 100
    assert cfg.resolved_burn_in() == {"cifar10": 75, "cifar100": 75, "svhn": 22}[dataset]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_file_has_a_citing_header(name: str) -> None:
    text = preset_path(name).read_text(encoding="utf-8")
    assert text.startswith("# Paper preset")
    assert "A.3" in text and "data_root" in text


def test_load_preset_returns_a_fresh_mapping() -> None:
    first = load_preset("cifar10-trades")
    first["beta"] = 99
    assert load_preset("cifar10-trades")["beta"] == 6


def test_unknown_preset_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        load_preset("cifar10-weat_adb")
    message = str(info.value)
    assert "'cifar10-weat_adb'" in message
    assert "did you mean 'cifar10-weat_adv'" in message
    for name in PRESETS:
        assert name in message
