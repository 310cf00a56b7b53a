"""Registries know their own facts: declared parameters, data roots, statistics, names."""

from __future__ import annotations

import inspect

import pytest
import torch

from trainables import config, data, generation
from trainables.config import TrainConfig
from trainables.errors import ConfigError
from trainables.gen_config import SamplerConfig
from trainables.methods import HPARAM_NAMES, HPARAMS, METHODS, bind_method
from trainables.weighting import WEIGHT_FNS


@pytest.mark.parametrize("name", METHODS.names())
def test_declared_hparams_are_the_loss_signature(name: str) -> None:
    spec = METHODS.get(name)
    taken = list(inspect.signature(spec.loss).parameters)[3:]  # after logits_nat, logits_adv, y
    assert ("epoch" in taken) == spec.uses_epoch
    assert [p.name for p in spec.params] == [t for t in taken if t != "epoch"]


def test_hparam_names_are_the_declared_ones() -> None:
    declared = {p.name for n in METHODS for p in METHODS.get(n).params}
    assert set(HPARAM_NAMES) == declared | {"epoch"} and set(HPARAMS) == declared
    assert set(TrainConfig.from_dict({}).method_hparams()) == declared  # every one a config field
    for n in METHODS:  # one range per name, whichever method declares it
        for p in METHODS.get(n).params:
            assert p.__class__(**{**vars(HPARAMS[p.name]), "default": p.default}) == p


def test_config_defaults_are_the_declared_defaults() -> None:
    cfg = TrainConfig.from_dict({"epochs": 8})  # burn_in: the run's, 6 of 8 epochs
    for name in METHODS:
        declared = bind_method(name, {"burn_in": 6})
        assert bind_method(name, cfg.method_hparams()).hparams == declared.hparams, name


def test_bind_method_fills_defaults_drops_unused_and_refuses_bad_values() -> None:
    m = bind_method("mail_trades", {"beta": None, "slope": 1.5, "weight_fn": "exp", "epoch": 3})
    assert dict(m.hparams) == {
        "beta": 5.0, "bias": 0.0, "slope": 1.5, "mail_scale": 3.0, "burn_in": 0
    }  # fmt: skip
    assert dict(bind_method("weat_nat", {"weight_fn": "exp"}).hparams)["weight_params"] == {
        "temperature": 10.0
    }
    with pytest.raises(ConfigError, match=r"beta = -0.5 is out of range; allowed: >= 0"):
        bind_method("trades", {"beta": -0.5})
    with pytest.raises(ConfigError, match=r"unknown hyperparameter.*'gamma'"):
        bind_method("trades", {"gamma": 1.0})
    with pytest.raises(ConfigError, match=r"normalize = 'sum' is not allowed"):
        bind_method("weat_adv", {"normalize": "sum"})
    with pytest.raises(ConfigError, match=r"weight_params.temperature = 0.0 is out of range"):
        bind_method("weat_adv", {"weight_fn": "exp", "weight_params": {"temperature": 0}})


def test_only_epoch_users_get_the_epoch() -> None:
    nat, adv, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    mail = bind_method("mail_trades", {"burn_in": 2})
    before, after = mail.loss(nat, adv, y, epoch=1), mail.loss(nat, adv, y, epoch=2)
    assert before[1]["mean_weight"] == 1.0 and after[1]["mean_weight"] != 1.0
    bind_method("trades", {}).loss(nat, adv, y, epoch=7)  # _trades takes no epoch


def test_weighting_params_are_declared() -> None:
    for name in WEIGHT_FNS:
        for p in WEIGHT_FNS.get(name).params:
            with pytest.raises(ConfigError, match=f"weight_params.{p.name} = -1.0"):
                p.check(-1.0, f"weight_params.{p.name}")


@pytest.mark.parametrize("name", data.DATASETS.names())
def test_needs_root_is_what_load_data_does_without_a_root(name: str) -> None:
    if data.DATASETS.get(name).needs_root:
        with pytest.raises(ConfigError, match=f"data_root must be set for dataset '{name}'"):
            data.load_data(name, None)
        with pytest.raises(ConfigError, match="data_root must be set"):
            TrainConfig.from_dict({"dataset": name})
    else:
        assert data.load_data(name, None, test_subset=10).name == name
        assert TrainConfig.from_dict({"dataset": name}).data_root is None


@pytest.mark.parametrize("name", generation.INITS.names())
def test_needs_stats_is_what_initial_images_does_without_stats(name: str) -> None:
    y = torch.tensor([0, 1])
    if generation.INITS.get(name).needs_stats:
        with pytest.raises(ConfigError, match="needs the class statistics"):
            generation.initial_images(name, None, y, shape=(1, 2, 2))
    else:
        assert generation.initial_images(name, None, y, shape=(1, 2, 2)).shape == (2, 1, 2, 2)


def test_one_source_per_name_list() -> None:
    assert data.AUGMENTS is config.AUGMENTS
    for augment in ("auto", *config.AUGMENTS):
        assert TrainConfig.from_dict({"augment": augment}).augment == augment
    with pytest.raises(ConfigError, match="augment = 'flip' is not allowed"):
        TrainConfig.from_dict({"augment": "flip"})
    for init in generation.INITS:
        assert SamplerConfig.from_dict({"init": init}).init == init
    with pytest.raises(ConfigError, match="init = 'zeros' is not allowed.*gaussian"):
        SamplerConfig.from_dict({"init": "zeros"})


@pytest.mark.parametrize(
    "cls, changes, unknown",
    [(TrainConfig, {"beta": 3.0, "augment": "crop"}, "unknown config key"),
     (SamplerConfig, {"steps": 7, "classes": ["1"]}, "unknown sampler key")],
)  # fmt: skip
def test_config_base_round_trip(cls, changes, unknown) -> None:
    cfg = cls.from_dict({})
    assert cls.from_dict(cfg.to_dict()) == cfg
    changed = cfg.replace(**changes)
    assert type(changed) is cls and {k: getattr(changed, k) for k in changes} == changes
    assert cfg.field_names() == list(cfg.to_dict())
    with pytest.raises(ConfigError, match=f"{unknown}.*'sed'.*did you mean 'seed'"):
        cls.from_dict({"sed": 1})
    with pytest.raises(ConfigError, match=f"a {cls.__name__} must be a mapping"):
        cls.from_dict([1])


def test_a_weighting_registered_after_import_is_a_valid_choice():
    """The allowed weight_fn values are the registry's names when a config is checked,
    not a copy taken when trainables.methods was imported."""
    from trainables.weighting import WeightFn

    WEIGHT_FNS.add("test_flat", WeightFn(lambda a, p: torch.zeros_like(a)))
    try:
        cfg = TrainConfig.from_dict({"method": "weat_adv", "weight_fn": "test_flat"})
        assert cfg.weight_fn == "test_flat"
    finally:
        WEIGHT_FNS.remove("test_flat")
    with pytest.raises(ConfigError, match="test_flat"):
        TrainConfig.from_dict({"method": "weat_adv", "weight_fn": "test_flat"})
