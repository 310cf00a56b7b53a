"""The training config is validated at the door, naming field, value and what is allowed."""

from __future__ import annotations

import pytest

from trainables.config import TrainConfig, build_config, parse_overrides
from trainables.errors import ConfigError, UserError


def test_defaults_are_valid_and_round_trip() -> None:
    cfg = TrainConfig.from_dict({})
    assert cfg.method == "weat_adv" and cfg.dataset == "digits"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_fractions_and_string_numbers() -> None:
    cfg = TrainConfig.from_dict({"eps": "8/255", "step_size": "2/255", "epochs": "3"})
    assert cfg.eps == pytest.approx(8 / 255) and cfg.epochs == 3


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"bta": 6.0}, r"unknown config key.*'bta'.*did you mean 'beta'"),
        ({"beta": -1.0}, r"beta = -1.0 is out of range; allowed: >= 0"),
        ({"eps": 1.5}, r"eps = 1.5 is out of range; allowed: >= 0.0 and <= 1.0"),
        ({"method": "fgsm"}, r"method = 'fgsm' is not allowed; choose one of: .*weat_adv"),
        ({"model": "vit"}, r"model = 'vit' is not allowed; choose one of: .*resnet18"),
        ({"dataset": "mnist"}, r"dataset = 'mnist' is not allowed; choose one of: .*digits"),
        ({"epochs": 0}, r"epochs = 0 is out of range; allowed: >= 1"),
        ({"epochs": 2.5}, r"epochs = 2.5; expected an integer"),
        ({"eps": "abc"}, r"eps = 'abc'; expected a number"),
        ({"weight_fn": "exp", "weight_params": {"temperature": 0}}, r"temperature"),
        ({"weight_fn": "weat", "weight_params": {"power": 2}}, r"not a parameter"),
        ({"dataset": "cifar10"}, r"data_root must be set"),
        ({"aa_version": "custom"}, r"aa_attacks"),
        ({"normalize": "sum"}, r"normalize = 'sum'"),
        ({"download": "maybe"}, r"download = 'maybe'; expected true or false"),
    ],
)
def test_bad_values_name_field_value_and_allowed(values, pattern) -> None:
    with pytest.raises(ConfigError, match=pattern):
        TrainConfig.from_dict(values)


def test_overrides_and_files(tmp_path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("method: trades\nbeta: 3\nweight_params: {temperature: 2}\nweight_fn: exp\n")
    cfg = build_config(f, ["beta=4", "eps=4/255", "weight_params.temperature=5"])
    assert cfg.method == "trades" and cfg.beta == 4.0
    assert cfg.eps == pytest.approx(4 / 255)
    assert cfg.weight_params == {"temperature": 5.0}
    assert parse_overrides(["aa_attacks=[apgd-ce, apgd-t]"]) == {
        "aa_attacks": ["apgd-ce", "apgd-t"]
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["epochs"])


def test_unreadable_config_files(tmp_path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        build_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        build_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="mapping"):
        build_config(listy)


def test_burn_in_default_is_three_quarters() -> None:
    assert TrainConfig.from_dict({"epochs": 100}).resolved_burn_in() == 75
    assert TrainConfig.from_dict({"epochs": 8, "burn_in": 2}).resolved_burn_in() == 2
