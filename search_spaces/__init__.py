"""Searchable knobs as data: declarative YAML spaces and their compiler.

See :mod:`search_spaces.space` for the format; the shipped spaces live next to
this file (``weat.yaml``, ``trades.yaml``, ``mail.yaml``, ``attack.yaml``,
``smoke.yaml`` …) and are found by name with :func:`space_path`.
"""

from search_spaces.space import (
    ParamSpec,
    SearchSpace,
    SpaceError,
    compile_space,
    load_space,
    shipped_spaces,
    space_path,
)

__all__ = [
    "ParamSpec",
    "SearchSpace",
    "SpaceError",
    "compile_space",
    "load_space",
    "shipped_spaces",
    "space_path",
]
