"""Search spaces: the YAML format, its validation and the Optuna compiler."""

from __future__ import annotations

import itertools
import math

import optuna
import pytest
import torch

from search_spaces import SpaceError, compile_space, load_space, shipped_spaces
from search_spaces.space import ParamSpec, SearchSpace, nest, parse_space
from trainables.config import TrainConfig
from trainables.generation import NOISE_IS_STD
from trainables.presets import PRESETS
from trainables.weighting import energy_weights

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.mark.parametrize(
    "name", ["weat", "trades", "mail", "attack", "smoke", "sgld", "sgld_smoke"]
)
def test_shipped_spaces_load_and_have_a_header(name: str) -> None:
    assert name in shipped_spaces()
    space = load_space(name)
    assert space.params
    text = open(space.source).read()
    assert text.startswith("#"), "each shipped space is documented in a comment header"


def test_conditional_parameters_follow_their_condition() -> None:
    space = load_space("weat")
    define = compile_space(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_shapes = set()
    for _ in range(60):
        trial = study.ask()
        define(trial)
        params = trial.params
        shape = params["weight_fn"]
        seen_shapes.add(shape)
        assert ("weight_params.temperature" in params) == (shape in ("softplus_t", "exp"))
        assert ("weight_params.power" in params) == (shape == "power")
        assert 1.0 <= params["beta"] <= 10.0
        study.tell(trial, 0.0)
    assert seen_shapes == {"weat", "softplus_t", "power", "exp", "none"}


def test_fixed_values_are_returned_as_constants() -> None:
    space = parse_space(
        "fixed: {method: trades}\nparams:\n  beta: {type: fixed, value: 3}\n"
        "  lr_max: {type: float, low: 0.01, high: 0.1, log: true}\n"
    )
    study = optuna.create_study()
    trial = study.ask()
    constants = compile_space(space)(trial)
    assert constants == {"method": "trades", "beta": 3}
    assert set(trial.params) == {"lr_max"}


def test_nest_dotted_keys() -> None:
    assert nest({"a": 1, "weight_params.temperature": 2.0}) == {
        "a": 1,
        "weight_params": {"temperature": 2.0},
    }


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("params:\n  beta: {type: gaussian}\n", r"<string>:2: .*unknown type 'gaussian'"),
        ("params:\n  m: {type: categorical, choices: []}\n", r"<string>:2: .*non-empty"),
        (
            "params:\n  a: 1\n  beta: {type: float, low: 5, high: 1}\n",
            r"<string>:3: .*low 5.0 > high",
        ),
        (
            "params:\n  t:\n    type: float\n    low: 1\n    high: 2\n    when: {shape: [exp]}\n",
            r"<string>:2: .*condition on 'shape'.*not a parameter defined above",
        ),
        (
            "params:\n  s: [a, b]\n  t: {type: float, low: 1, high: 2, when: {s: c}}\n",
            r"<string>:3: .*never takes",
        ),
        ("params:\n  lr: {type: float, low: 0, high: 1, log: true}\n", r"<string>:2: .*log"),
        ("params:\n  lr: {type: float, low: 0, hgh: 1}\n", r"<string>:2: .*unknown key"),
        ("parms: {}\n", r"<string>:1: unknown top-level key 'parms'"),
        ("params: [1, 2\n", r"not valid YAML"),
    ],
)
def test_bad_spaces_name_the_line(text: str, pattern: str) -> None:
    with pytest.raises(SpaceError, match=pattern):
        parse_space(text)


def test_unknown_config_key_is_reported_with_its_line() -> None:
    space = parse_space("params:\n  beta: [1, 2]\n  betta: [1, 2]\n")
    with pytest.raises(SpaceError, match=r"<string>:3: 'betta' is not a config key"):
        space.check_keys(["beta", "method"])


def test_missing_space_file_lists_shipped_ones() -> None:
    with pytest.raises(SpaceError, match="weat"):
        load_space("no_such_space")


@pytest.mark.parametrize("name", ["sgld", "sgld_smoke"])
def test_sampler_spaces_use_sampler_keys_and_conditions(name: str) -> None:
    from trainables.gen_config import SamplerConfig

    space = load_space(name)
    space.check_keys(SamplerConfig.field_names())
    define = compile_space(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        fixed = define(trial) or {}
        params = trial.params
        assert ("pca_sigma" in params) == (params["init"] == "pca")
        SamplerConfig.from_dict({**params, **fixed})  # every sample is a valid config


# --- preset key --------------------------------------------------------------------------
def test_preset_key_is_parsed_and_checked_against_known_names() -> None:
    space = parse_space("# header\npreset: cifar10-trades\nparams:\n  beta: [1, 2]\n")
    assert space.preset == "cifar10-trades"
    space.check_preset(PRESETS)  # a shipped preset passes
    assert parse_space("params: {}\n").preset is None
    parse_space("params: {}\n").check_preset(PRESETS)  # no preset: nothing to check


def test_unknown_preset_is_reported_with_its_line() -> None:
    space = parse_space("params: {}\npreset: cifar10-trade\n")
    with pytest.raises(
        SpaceError,
        match=r"<string>:2: unknown preset 'cifar10-trade' \(did you mean "
        r"'cifar10-trades'\?\); known presets: .*svhn-weat_adv",
    ):
        space.check_preset(PRESETS)


@pytest.mark.parametrize("value", ["[a, b]", "3", "'bad name'", "{x: 1}"])
def test_malformed_preset_fails_at_load_time(value: str) -> None:
    with pytest.raises(SpaceError, match=r"<string>:2: preset = .* must be the name"):
        parse_space(f"params: {{}}\npreset: {value}\n")


# --- ranges that must not waste trials --------------------------------------------------
def _corners(space: SearchSpace, names: list[str]) -> list[dict[str, float]]:
    """Every combination of the low and high ends of the numeric parameters ``names``."""
    specs = {p.name: p for p in space.params}
    ranges = [(specs[n].low, specs[n].high) for n in names]
    return [dict(zip(names, values)) for values in itertools.product(*ranges)]


def _belongs_to(param: ParamSpec, shape: str) -> bool:
    return param.name.startswith("weight_params.") and shape in param.when.get("weight_fn", ())


def test_weat_shapes_keep_weights_at_initialisation() -> None:
    """|E(x)| ≈ log K at initialisation; with normalize none no corner of a shape's
    range may start the run with weights below 1e-2 (log 100 covers CIFAR-100)."""
    space = load_space("weat")
    shapes = next(p for p in space.params if p.name == "weight_fn").choices
    energy = torch.tensor([-math.log(100.0), math.log(100.0)], dtype=torch.float64)
    checked = 0
    for shape in shapes:
        names = [p.name for p in space.params if _belongs_to(p, shape)]
        for corner in _corners(space, names) if names else [{}]:
            params = {k.split(".", 1)[1]: v for k, v in corner.items()}
            w = energy_weights(energy, shape, params, normalize="none")
            assert float(w.min()) >= 1e-2, (shape, params, w.tolist())
            checked += 1
    assert checked == 2 + 2 + 2 + 4  # weat, none, softplus_t ×2, exp ×2, power ×4


def test_mail_space_searches_the_burn_in_fraction_around_the_paper() -> None:
    space = load_space("mail")
    space.check_keys(TrainConfig.field_names())
    specs = {p.name: p for p in space.params}
    assert "burn_in" not in specs and "burn_in" not in space.fixed
    frac = specs["burn_in_fraction"]
    assert frac.low <= 0.75 <= frac.high and 0.0 < frac.low and frac.high < 1.0
    assert "mail_scale" not in specs and space.fixed["mail_scale"] == 3.0
    for sampled in (space.sample_defaults(), {"burn_in_fraction": frac.high}):
        cfg = TrainConfig.from_dict({**space.fixed, **sampled, "epochs": 100})
        assert 0 < cfg.resolved_burn_in() < 100


def test_sgld_noise_range_covers_the_three_readings_of_gamma() -> None:
    """γ = 0.001 read as a std (this sampler): the paper's variance (std √γ), the
    reference's std γ·√(2η) with η = 0.05, and the momentum notebook's std γ."""
    assert NOISE_IS_STD
    noise = next(p for p in load_space("sgld").params if p.name == "noise")
    readings = {
        "paper variance": math.sqrt(0.001),
        "reference sqrt(2 eta)": 0.001 * math.sqrt(2 * 0.05),
        "notebook": 0.001,
    }
    for label, std in readings.items():
        assert noise.low <= std <= noise.high, (label, std, noise.low, noise.high)
