"""The paper's training settings, shipped as named YAML presets.

One preset per (dataset, method) for CIFAR-10, CIFAR-100 and SVHN and the six
methods SAT, TRADES, MART, MAIL-TRADES, WEAT_NAT and WEAT_ADV, named
``<dataset>-<method>`` (``cifar10-weat_adv``, ``svhn-trades``, …). Each file in
``trainables/presets/`` holds training-config keys with the paper's values
(Appendix A.3 of Mirza et al., ECCV 2024, and the reference code) and a comment
header citing where every value comes from; docs/methods.md lists them all.

A preset is a partial config: ``data_root`` cannot be known in advance and is
left out, so it must be added (``study train --preset cifar10-weat_adv --set
data_root=DIR``), and validation of a non-digits config refuses it until then::

    >>> values = {**load_preset("cifar10-weat_adv"), "data_root": "/data/cifar10"}
    >>> values["beta"], values["epochs"]
    (6, 100)

Presets are found by name from the files present, so adding a YAML file adds a
preset.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from trainables.errors import ConfigError

#: Folder holding the preset files (``<name>.yaml``).
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


#: Names of the shipped presets, sorted (derived from the files in :data:`PRESET_DIR`).
PRESETS: list[str] = _names()


def preset_path(name: str) -> Path:
    """The YAML file of preset ``name``.

    Args:
        name: a preset name such as ``cifar10-weat_adv`` (see :data:`PRESETS`).

    Raises:
        ConfigError: unknown name; the message names it, suggests the closest
            known name and lists all of them.
    """
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; known presets: {', '.join(PRESETS)}")
    return PRESET_DIR / f"{name}.yaml"


def load_preset(name: str) -> dict[str, Any]:
    """The config values of preset ``name``, as a fresh mapping of config keys.

    Values are as written in the file (``eps`` stays the string ``"8/255"``);
    :meth:`trainables.config.TrainConfig.from_dict` coerces and validates them.

    Args:
        name: a preset name such as ``cifar10-weat_adv`` (see :data:`PRESETS`).

    Raises:
        ConfigError: unknown name (see :func:`preset_path`), or a file that does
            not hold a mapping.
    """
    path = preset_path(name)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ConfigError(f"preset {name!r} ({path}) must hold a mapping of config keys")
    return data
