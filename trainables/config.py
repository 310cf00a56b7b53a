"""One typed configuration for a training run, validated at the door.

A :class:`TrainConfig` is built from a mapping (a YAML file, ``--set`` overrides,
a Tune trial's sampled parameters) by :meth:`TrainConfig.from_dict`, which
rejects unknown keys, coerces and checks every value and names the field, the
bad value and what is allowed when something is wrong.

Numbers may be written as fractions (``eps: 8/255``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

from trainables.errors import ConfigError, UserError
from trainables.registry import check_choice, check_range

LR_SCHEDULES = ("onecycle", "triangular", "cosine", "constant")
#: The fields that hold paths: a study makes them absolute on its driver, and the same
#: place written relative or absolute is the same config when a run resumes.
PATH_FIELDS = ("data_root", "val_npz", "output_dir")
#: augmentation policies (trainables.data.augment_batch); a config may also say ``auto``
AUGMENTS = ("none", "crop", "crop_flip")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigBase:
    """What the config dataclasses share: built from a mapping, copied, validated.

    A subclass is a ``@dataclass`` (field types written as strings, as under
    ``from __future__ import annotations``) with a ``validate()`` method.
    """

    KIND: ClassVar[str] = "config"  #: the word in "unknown <KIND> key(s)"

    @classmethod
    def field_names(cls) -> list[str]:
        """All configuration keys."""
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """Build and validate a config; unknown keys and bad values raise ConfigError."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"a {cls.__name__} must be a mapping of keys to values, got {values!r}"
            )
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"unknown {cls.KIND} key(s): {', '.join(hints)}")
        types = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        cfg = cls(**{k: _coerce(k, v, types[k]) for k, v in values.items()})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (YAML/JSON-serialisable)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def validate(self) -> None:
        """Check names and ranges; raise ConfigError naming the field."""
        raise NotImplementedError


@dataclass
class TrainConfig(ConfigBase):
    """Everything one training run needs. Units are given per field."""

    # --- method -------------------------------------------------------------
    method: str = "weat_adv"  #: training method (see trainables.methods.METHODS)
    beta: float | None = None  #: trade-off β ≥ 0; None = the method's default
    weight_fn: str = "weat"  #: WEAT weighting shape (trainables.weighting.WEIGHT_FNS)
    weight_params: dict[str, float] = field(default_factory=dict)  #: the shape's parameters
    normalize: str = "none"  #: WEAT weight normalisation: none | mean
    bias: float = 0.0  #: MAIL-TRADES margin bias
    slope: float = 2.0  #: MAIL-TRADES sigmoid slope
    mail_scale: float = 3.0  #: MAIL-TRADES weight scale (official mail_loss.py: 3·sigmoid)
    burn_in: int | None = None  #: MAIL epochs of plain TRADES; None = burn_in_fraction of epochs
    burn_in_fraction: float = 0.75  #: MAIL burn-in as a fraction of epochs (paper: 75 of 100)
    # --- model and data -----------------------------------------------------
    model: str = "small_cnn"  #: model name (trainables.models.MODELS)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  #: extra model arguments
    dataset: str = "digits"  #: dataset name (trainables.data.DATASETS)
    data_root: str | None = None  #: folder holding the dataset files (not for digits)
    download: bool = False  #: let torchvision download the dataset (needs internet)
    val_fraction: float = 0.1  #: fraction of training data held out for validation
    val_npz: str | None = None  #: .npz validation set (x, y) instead of the held-out split
    split_seed: int = 0  #: seed of the validation split (kept fixed across training seeds)
    augment: str = "auto"  #: auto (the dataset's) | none | crop | crop_flip
    train_subset: int | None = None  #: use only this many training points (None = all)
    # --- optimisation ---------------------------------------------------------
    epochs: int = 10  #: training epochs
    batch_size: int = 128  #: images per batch (per worker)
    lr_max: float = 0.1  #: peak learning rate of the schedule
    #: ``onecycle``: exactly ``torch.optim.lr_scheduler.OneCycleLR(max_lr=lr_max,
    #: pct_start=lr_pct_start)`` with torch's defaults (cosine, start lr_max/25, end
    #: lr_max/25e4, momentum cycled 0.95 → 0.85 → 0.95), as the paper's code;
    #: ``triangular``: linear 0 → lr_max at 40 % → 0; ``cosine``; ``constant``. Per batch.
    lr_schedule: str = "onecycle"
    lr_pct_start: float = 0.25  #: onecycle: fraction of steps spent rising to lr_max
    momentum: float = 0.9  #: SGD momentum (onecycle cycles it 0.85–0.95 instead)
    weight_decay: float = 5e-4  #: SGD weight decay
    seed: int = 0  #: seed of initialisation, data order, augmentation and attacks
    # --- threat model (training attack) ------------------------------------
    norm: str = "linf"  #: linf | l2
    eps: float = 8 / 255  #: attack radius (inputs in [0, 1])
    step_size: float = 2 / 255  #: training attack step size
    attack_steps: int = 10  #: training attack steps K
    # --- evaluation -----------------------------------------------------------
    val_attack_steps: int = 10  #: PGD steps of the per-epoch validation attack
    val_subset: int | None = 512  #: validation points evaluated per epoch (None = all)
    select_from: int = 1  #: first epoch (from 1) whose checkpoint may become best.pt
    probe_n: int = 256  #: training points of the per-epoch ΔE probe (0 = off)
    eval_steps: int = 20  #: PGD steps of the final test attack (PGD-20)
    eval_step_size: float = 2 / 255  #: step size of the evaluation attacks
    #: test points of the final evaluation (clean, PGD and AutoAttack on the same
    #: points; None = the whole test set)
    test_subset: int | None = None
    autoattack: bool = True  #: run AutoAttack in the final test evaluation
    aa_version: str = "standard"  #: AutoAttack version: standard | custom
    aa_attacks: list[str] | None = None  #: attack list when aa_version is custom
    # --- runtime --------------------------------------------------------------
    device: str = "auto"  #: auto | cpu | cuda
    num_threads: int | None = None  #: torch intra-op threads (None = leave as is)
    #: precision of the training attack and training step: ``auto`` and ``fp32`` train
    #: in fp32 (one precision for every method, so it never leaks into a comparison);
    #: ``bf16`` asks for bf16 autocast wherever the device supports it. Evaluation
    #: (validation, test, AutoAttack) always runs in fp32.
    precision: str = "auto"
    #: channels_last (NHWC) memory format for model and inputs; None = auto (on for
    #: CUDA, off on the CPU)
    channels_last: bool | None = None
    compile: bool = False  #: torch.compile the model for attacks, training and evaluation
    output_dir: str = "runs/train"  #: where checkpoints and metrics are written

    def resolved_burn_in(self) -> int:
        """MAIL burn-in in epochs (default: ``burn_in_fraction`` of the run, paper 75 of 100)."""
        if self.burn_in is not None:
            return self.burn_in
        return int(math.floor(self.burn_in_fraction * self.epochs + 1e-9))

    def method_hparams(self) -> dict[str, Any]:
        """Every hyperparameter a method declares, for ``bind_method`` (burn_in resolved)."""
        from trainables.methods import HPARAMS

        return {
            **{name: getattr(self, name) for name in HPARAMS},
            "burn_in": self.resolved_burn_in(),
        }

    def validate(self) -> None:
        """Check names against the registries and values against their ranges."""
        from trainables.data import DATASETS, require_root
        from trainables.methods import HPARAMS, METHODS, check_hparams
        from trainables.models import MODELS

        check_choice("method", self.method, METHODS.names())
        check_hparams({name: getattr(self, name) for name in HPARAMS})
        check_choice("model", self.model, MODELS.names())
        check_choice("dataset", self.dataset, DATASETS.names())
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("augment", self.augment, ("auto", *AUGMENTS))
        check_choice("norm", self.norm, ("linf", "l2"))
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("aa_version", self.aa_version, ("standard", "custom", "plus", "rand"))
        check_range("eps", self.eps, lo=0.0, hi=1.0 if self.norm == "linf" else math.inf)
        check_range("step_size", self.step_size, lo=0.0, lo_open=True)
        check_range("eval_step_size", self.eval_step_size, lo=0.0, lo_open=True)
        check_range("val_fraction", self.val_fraction, lo=0.0, hi=0.9)
        check_range("lr_max", self.lr_max, lo=0.0, lo_open=True)
        check_range("momentum", self.momentum, lo=0.0, hi=1.0)
        check_range("weight_decay", self.weight_decay, lo=0.0)
        check_range("burn_in_fraction", self.burn_in_fraction, lo=0.0, hi=1.0)
        check_range("lr_pct_start", self.lr_pct_start, lo=0.0, hi=1.0, lo_open=True)
        if self.lr_pct_start >= 1.0:
            raise ConfigError(f"lr_pct_start = {self.lr_pct_start}; must lie in (0, 1)")
        for name in ("epochs", "batch_size", "select_from"):
            check_range(name, getattr(self, name), lo=1)
        for name in (
            "attack_steps",
            "val_attack_steps",
            "eval_steps",
            "probe_n",
            "seed",
            "split_seed",
        ):
            check_range(name, getattr(self, name), lo=0)
        for name in ("train_subset", "test_subset", "val_subset", "num_threads"):
            value = getattr(self, name)
            if value is not None:
                check_range(name, value, lo=1)
        if self.aa_version == "custom" and not self.aa_attacks:
            raise ConfigError("aa_attacks must list the attacks when aa_version is 'custom'")
        if DATASETS.get(self.dataset).needs_root:
            require_root(self.dataset, self.data_root)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} = {value!r}; expected a number")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                return float(num) / float(den)
            return float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{name} = {value!r}; expected a number (fractions like 8/255 are fine)")


def _coerce(name: str, value: Any, type_text: Any) -> Any:
    """Coerce ``value`` to the declared type of field ``name`` (types are strings here)."""
    t = str(type_text)
    optional = "None" in t
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} must not be empty (null)")
    base = t.replace(" | None", "")
    if base == "float":
        return _number(name, value)
    if base == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r}; expected an integer")
        number = _number(name, value)
        if number != int(number):
            raise ConfigError(f"{name} = {value!r}; expected an integer")
        return int(number)
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{name} = {value!r}; expected true or false")
    if base == "str":
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r}; expected a string")
        return str(value)
    if base.startswith("dict"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} = {value!r}; expected a mapping")
        if "float" in base:
            return {str(k): _number(f"{name}.{k}", v) for k, v in value.items()}
        return dict(value)
    if base.startswith("list"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} = {value!r}; expected a list")
        return [str(v) for v in value]
    return value  # pragma: no cover - every field type is handled above


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``--set key=value`` items; values are read as YAML (``eps=8/255`` stays a string)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        if "." in key:  # weight_params.temperature=2
            head, sub = key.split(".", 1)
            out.setdefault(head, {})[sub] = value
        else:
            out[key] = value
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a mapping; a missing or unreadable file raises UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {str(p)!r} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {str(p)!r} must hold a mapping of keys to values")
    return data


def build_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: str | None = None,
) -> TrainConfig:
    """Config from an optional preset, YAML file and ``key=value`` overrides, validated.

    Args:
        path: a YAML training config (its keys win over the preset's).
        overrides: ``key=value`` items (they win over both).
        preset: a shipped paper preset (:mod:`trainables.presets`), e.g. ``cifar10-trades``.
    """
    values: dict[str, Any] = {}
    if preset:
        from trainables.presets import load_preset

        values = load_preset(preset)
    for layer in (load_config_file(path) if path else {}, parse_overrides(overrides or [])):
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
    return TrainConfig.from_dict(values)
