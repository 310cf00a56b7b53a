"""Search spaces: the YAML format, its validation and the Optuna compiler."""

from __future__ import annotations

import optuna
import pytest

from search_spaces import SpaceError, compile_space, load_space, shipped_spaces
from search_spaces.space import nest, parse_space

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
