"""The declarative search-space format and its one compiler.

A space is a YAML mapping::

    # comment header: what the space searches and why
    # preset: cifar10-trades  (optional: a training preset every trial starts from)
    fixed:                 # config values every trial gets (optional)
      dataset: digits
      epochs: 4
    study:                 # defaults for the study that uses this space (optional)
      metric: val/pgd_acc
      mode: max
    params:                # searched parameters, sampled in this order
      method:   {type: categorical, choices: [weat_nat, weat_adv]}
      beta:     {type: float, low: 1.0, high: 10.0}
      lr_max:   {type: float, low: 0.01, high: 0.2, log: true}
      attack_steps: {type: int, low: 3, high: 10}
      weight_fn: {type: categorical, choices: [weat, softplus_t, exp, none]}
      weight_params.temperature:            # nested key of the training config
        type: float
        low: 0.1
        high: 10.0
        log: true
        when: {weight_fn: [softplus_t, exp]}  # exists only for these shapes
      normalize: {type: fixed, value: none}

A training space may also sample images after each trial's training (one study
over training and generation)::

    generation:            # sampler settings (SamplerConfig keys); each trial samples
      steps: 20            # with its best checkpoint once it ran every epoch
      samples: 100
    params:
      generation.step_size: {type: float, low: 0.5, high: 2.0}   # searched sampler values

Types: ``float`` (``low``, ``high``, optional ``log`` or ``step``), ``int``
(``low``, ``high``, optional ``log`` or ``step``), ``categorical``
(``choices``), ``fixed`` (``value``). ``when`` maps earlier parameters to the
value or list of values for which this parameter exists.

``preset`` names one of the training presets shipped in ``trainables/presets/``
(the paper's settings per dataset and method, e.g. ``cifar10-weat_adv``; see
``trainables.presets.PRESETS``). A trial's config is then built as: preset <
the study's base config (config file and ``--set`` values, e.g. ``data_root``)
< the space's ``fixed`` values < the sampled parameters; the later wins. This
module only checks that the key holds a well-formed name: ``search_spaces``
imports nothing from ``trainables`` (ARCHITECTURE.md), so the name is resolved
by the study, which calls :meth:`SearchSpace.check_preset` with the known names
(an unknown name fails there with ``file:line:``) and merges the preset.

:func:`compile_space` turns a space into an Optuna define-by-run function for
Ray Tune's ``OptunaSearch``. A bad space fails at load time, before Ray
starts, with ``file:line: message``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml

TYPES = ("float", "int", "categorical", "fixed")
_KEYS = {
    "float": {"low", "high", "log", "step"},
    "int": {"low", "high", "log", "step"},
    "categorical": {"choices"},
    "fixed": {"value"},
}
_TOP_KEYS = {"fixed", "params", "study", "description", "preset", "generation"}
#: The head of a searched parameter of the sampler that runs after training.
GENERATION_KEY = "generation"
_PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
HERE = Path(__file__).resolve().parent


class SpaceError(ValueError):
    """A search space is malformed; the message starts with ``file:line:``."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter.

    Attributes:
        name: config key (dots address nested keys, e.g. ``weight_params.temperature``).
        type: ``float`` | ``int`` | ``categorical`` | ``fixed``.
        low, high: range of numeric types (inclusive).
        log: sample on a log scale.
        step: discretisation step of numeric types.
        choices: values of a categorical.
        value: the value of a fixed parameter.
        when: ``{earlier_param: allowed values}``; all must hold for the parameter to exist.
        line: line of the parameter in its file (1-based), for messages.
    """

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    value: Any = None
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    line: int = 0

    def active(self, sampled: Mapping[str, Any]) -> bool:
        """Whether the parameter exists given the values sampled so far."""
        return all(k in sampled and sampled[k] in v for k, v in self.when.items())

    def default(self, wanted: tuple[Any, ...] | None = None) -> Any:
        """The value without Optuna: the first choice (the first of ``wanted`` among
        them, when given), the low end of a range, or the fixed value."""
        if self.type == "categorical":
            return next((c for c in self.choices if wanted and c in wanted), self.choices[0])
        if self.type == "fixed":
            return self.value
        return int(self.low) if self.type == "int" else self.low

    def distribution(self) -> optuna.distributions.BaseDistribution | None:
        """The Optuna distribution :meth:`suggest` samples from (None for ``fixed``): what a
        trial added to a study by hand (a warm start) must carry for this parameter."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.type == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            step = int(self.step) if self.step else 1
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=step)
        if self.type == "categorical":
            return CategoricalDistribution(list(self.choices))
        return None

    def suggest(self, trial: optuna.Trial) -> Any:
        """Sample this parameter from an Optuna trial (define-by-run)."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            step = int(self.step) if self.step else 1
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=step
            )
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        return self.value


@dataclass(frozen=True)
class SearchSpace:
    """A loaded, validated space.

    Attributes:
        params: searched parameters in sampling order.
        fixed: config values every trial gets.
        study: study defaults the space suggests (metric, mode, trials, …).
        source: the file it came from (or ``<string>``).
        preset: name of the training preset every trial starts from (below the base
            config, ``fixed`` and the sampled values), or None; resolved by the study.
        preset_line: line of the ``preset`` key in its file (1-based), for messages.
        generation: the sampler settings of a study over training and generation (its
            ``generation:`` mapping; ``{}`` when only searched ``generation.*``
            parameters ask for it), or None: the trials only train.
    """

    params: tuple[ParamSpec, ...]
    fixed: Mapping[str, Any]
    study: Mapping[str, Any]
    source: str
    preset: str | None = None
    preset_line: int = field(default=0, compare=False)
    generation: Mapping[str, Any] | None = None

    @property
    def names(self) -> list[str]:
        """Names of the searched parameters."""
        return [p.name for p in self.params]

    def check_keys(self, allowed: Iterable[str]) -> None:
        """Fail (naming the line) if a parameter or fixed key is not a config key.

        Args:
            allowed: valid top-level config keys; dotted names are checked by their head.
        """
        allowed = set(allowed) | ({GENERATION_KEY} if self.generation is not None else set())
        for p in self.params:
            if p.name.split(".", 1)[0] not in allowed:
                raise SpaceError(
                    f"{self.source}:{p.line}: {p.name!r} is not a config key "
                    f"(known: {', '.join(sorted(allowed))})"
                )
        for key in self.fixed:
            if str(key).split(".", 1)[0] not in allowed:
                raise SpaceError(f"{self.source}: fixed key {key!r} is not a config key")

    def check_preset(self, known: Iterable[str]) -> None:
        """Fail (naming the line) if the space's ``preset`` is not a known preset name.

        Args:
            known: the preset names that exist (``trainables.presets.PRESETS``); the
                caller passes them so that this package needs nothing from ``trainables``.
        """
        if self.preset is None:
            return
        known = sorted(known)
        if self.preset not in known:
            close = difflib.get_close_matches(self.preset, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpaceError(
                f"{self.source}:{self.preset_line}: unknown preset {self.preset!r}{hint}; "
                f"known presets: {', '.join(known)}"
            )

    def sample_each_value(self) -> Iterator[tuple[ParamSpec, Any, dict[str, Any]]]:
        """Configs without Optuna that, together, use every categorical choice, both
        ends of every range and every fixed value of the space.

        Yields ``(param, value, sampled)``: ``sampled`` sets ``param`` to ``value``,
        the parameters its ``when`` names to a value that makes it exist, and every
        other parameter as :meth:`sample_defaults` does.
        """
        # dependent (later) parameters first, so that a bad range is named by its own line
        for target in reversed(self.params):
            if target.type == "categorical":
                values: tuple[Any, ...] = target.choices
            elif target.type == "fixed":
                values = (target.value,)
            else:
                cast = int if target.type == "int" else float
                values = (cast(target.low), cast(target.high))
            for value in values:
                out: dict[str, Any] = {}
                for p in self.params:
                    if p is target:
                        if p.active(out):
                            out[p.name] = value
                        continue
                    if not p.active(out):
                        continue
                    out[p.name] = p.default(target.when.get(p.name))
                if target.name in out:
                    yield target, value, out

    def sample_defaults(self) -> dict[str, Any]:
        """A config without Optuna: the first choice / the low end / fixed values."""
        out: dict[str, Any] = {}
        for p in self.params:
            if p.active(out):
                out[p.name] = p.default()
        return out


class _LineLoader(yaml.SafeLoader):
    """A SafeLoader that records the line of every mapping key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    mapping = loader.construct_mapping(node, deep=True)
    lines = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    mapping["__lines__"] = lines
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "__lines__"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _number(src: str, line: int, name: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpaceError(f"{src}:{line}: {name}.{key} = {value!r} must be a number")
    if not math.isfinite(value):
        raise SpaceError(f"{src}:{line}: {name}.{key} = {value!r} must be finite")
    return float(value)


def _parse_param(
    src: str, line: int, name: str, raw: Any, earlier: dict[str, ParamSpec]
) -> ParamSpec:
    if not isinstance(raw, dict):
        # shorthand: a bare value is fixed, a bare list is categorical
        raw = (
            {"type": "categorical", "choices": raw}
            if isinstance(raw, list)
            else {
                "type": "fixed",
                "value": raw,
            }
        )
    raw = _strip(raw)
    kind = raw.get("type")
    if kind not in TYPES:
        raise SpaceError(
            f"{src}:{line}: parameter {name!r} has unknown type {kind!r}; "
            f"allowed: {', '.join(TYPES)}"
        )
    extra = set(raw) - _KEYS[kind] - {"type", "when"}
    if extra:
        raise SpaceError(
            f"{src}:{line}: parameter {name!r} ({kind}) has unknown key(s) {sorted(extra)}; "
            f"allowed: {', '.join(sorted(_KEYS[kind] | {'when'}))}"
        )
    when: dict[str, tuple[Any, ...]] = {}
    for cond_name, cond_values in (raw.get("when") or {}).items():
        if cond_name not in earlier:
            raise SpaceError(
                f"{src}:{line}: parameter {name!r} has a condition on {cond_name!r}, which is "
                "not a parameter defined above it"
            )
        values = tuple(cond_values) if isinstance(cond_values, list) else (cond_values,)
        parent = earlier[cond_name]
        possible = (
            parent.choices
            if parent.type == "categorical"
            else (parent.value,)
            if parent.type == "fixed"
            else None
        )
        if possible is not None:
            missing = [v for v in values if v not in possible]
            if missing:
                raise SpaceError(
                    f"{src}:{line}: condition {cond_name} in {list(values)} of {name!r} names "
                    f"value(s) {missing} that {cond_name!r} never takes"
                )
        when[cond_name] = values
    if kind == "categorical":
        choices = raw.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{src}:{line}: parameter {name!r} needs a non-empty list of choices")
        return ParamSpec(name, kind, choices=tuple(choices), when=when, line=line)
    if kind == "fixed":
        if "value" not in raw:
            raise SpaceError(f"{src}:{line}: fixed parameter {name!r} needs a value")
        return ParamSpec(name, kind, value=raw["value"], when=when, line=line)
    for key in ("low", "high"):
        if key not in raw:
            raise SpaceError(f"{src}:{line}: parameter {name!r} ({kind}) needs {key!r}")
    low = _number(src, line, name, "low", raw["low"])
    high = _number(src, line, name, "high", raw["high"])
    if low > high:
        raise SpaceError(f"{src}:{line}: parameter {name!r} has low {low} > high {high}")
    log = bool(raw.get("log", False))
    step = _number(src, line, name, "step", raw["step"]) if raw.get("step") is not None else None
    if log and low <= 0:
        raise SpaceError(f"{src}:{line}: parameter {name!r} is log-scaled but low = {low} <= 0")
    if log and step is not None:
        raise SpaceError(f"{src}:{line}: parameter {name!r} cannot have both log and step")
    if step is not None and step <= 0:
        raise SpaceError(f"{src}:{line}: parameter {name!r} has step {step} <= 0")
    if kind == "int" and (low != int(low) or high != int(high)):
        raise SpaceError(f"{src}:{line}: int parameter {name!r} needs integer low/high")
    return ParamSpec(name, kind, low=low, high=high, log=log, step=step, when=when, line=line)


def parse_space(text: str, source: str = "<string>") -> SearchSpace:
    """Parse and validate the YAML text of a space."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SpaceError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise SpaceError(f"{source}:1: a search space must be a mapping with a 'params' key")
    lines = data.get("__lines__", {})
    unknown = set(data) - _TOP_KEYS - {"__lines__"}
    if unknown:
        key = sorted(unknown, key=str)[0]
        raise SpaceError(
            f"{source}:{lines.get(key, 1)}: unknown top-level key {key!r}; "
            f"allowed: {', '.join(sorted(_TOP_KEYS))}"
        )
    raw_params = data.get("params") or {}
    if not isinstance(raw_params, dict):
        raise SpaceError(f"{source}:{lines.get('params', 1)}: 'params' must be a mapping")
    param_lines = raw_params.get("__lines__", {})
    earlier: dict[str, ParamSpec] = {}
    for name, raw in raw_params.items():
        if name == "__lines__":
            continue
        earlier[str(name)] = _parse_param(source, param_lines.get(name, 0), str(name), raw, earlier)
    fixed = _strip(data.get("fixed") or {})
    study = _strip(data.get("study") or {})
    for key, value in (("fixed", fixed), ("study", study)):
        if not isinstance(value, dict):
            raise SpaceError(f"{source}:{lines.get(key, 1)}: {key!r} must be a mapping")
    overlap = set(fixed) & set(earlier)
    if overlap:
        raise SpaceError(f"{source}: {sorted(overlap)} are both fixed and searched")
    preset = data.get("preset")
    preset_line = lines.get("preset", 1)
    if preset is not None and not (isinstance(preset, str) and _PRESET_NAME.fullmatch(preset)):
        raise SpaceError(
            f"{source}:{preset_line}: preset = {_strip(preset)!r} must be the name of a "
            "training preset (e.g. cifar10-trades)"
        )
    generation = data.get("generation")
    if generation is not None:
        generation = _strip(generation)
        if not isinstance(generation, dict):
            raise SpaceError(
                f"{source}:{lines.get('generation', 1)}: 'generation' must be a mapping of "
                "sampler settings"
            )
    elif any(name.split(".", 1)[0] == GENERATION_KEY for name in earlier):
        generation = {}
    return SearchSpace(
        tuple(earlier.values()), fixed, study, source, preset, preset_line, generation
    )


def space_path(name_or_path: str | Path) -> Path:
    """A shipped space by name (``weat``) or a path to any YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = HERE / f"{p.stem if p.suffix else p.name}.yaml"
    if p.suffix == "" and shipped.exists():
        return shipped
    if p.exists():
        return p
    raise SpaceError(
        f"search space {str(name_or_path)!r} not found: give a YAML file or one of "
        f"{', '.join(shipped_spaces())}"
    )


def shipped_spaces() -> list[str]:
    """Names of the spaces shipped with the package."""
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load_space(name_or_path: str | Path) -> SearchSpace:
    """Load and validate a space file (or a shipped space by name)."""
    path = space_path(name_or_path)
    return parse_space(path.read_text(), source=str(path))


class DefineByRun:
    """A picklable define-by-run function (Tune pickles its searcher to resume studies)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        sampled: dict[str, Any] = {}
        constants: dict[str, Any] = dict(self.space.fixed)
        for p in self.space.params:
            if not p.active(sampled):
                continue
            value = p.suggest(trial)
            sampled[p.name] = value
            if p.type == "fixed":
                constants[p.name] = value
        return constants


def compile_space(space: SearchSpace) -> Callable[[optuna.Trial], dict[str, Any]]:
    """An Optuna define-by-run function for ``OptunaSearch(space=...)``.

    It samples the active parameters in order (conditional ones only when their
    condition holds) and returns the space's fixed values and its ``fixed``
    parameters as constants.
    """
    return DefineByRun(space)


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Turn dotted keys (``weight_params.temperature``) into nested mappings."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if "." in key:
            head, tail = key.split(".", 1)
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out
