"""A tiny name -> object registry, the one lookup mechanism of the project.

Methods, weighting functions, models, datasets and SGLD initialisations are
each registered under a name in one :class:`Registry`; an unknown name fails
at once with the list of names that exist (the ``timm`` factory idea). An
entry that takes parameters declares them as :class:`Param` (default, allowed
values, meaning), so one declaration serves defaults, validation and docs.

>>> Param("beta", 6.0, "trade-off β", lo=0.0).check(-1.0)
Traceback (most recent call last):
...
trainables.errors.ConfigError: beta = -1.0 is out of range; allowed: >= 0.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from trainables.errors import ConfigError

T = TypeVar("T")
F = TypeVar("F")


def check_choice(name: str, value: Any, allowed: Collection[str]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of: {', '.join(allowed)}")


def check_range(
    name: str,
    value: float,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is finite and in ``[lo, hi]`` (``(lo, hi]``)."""
    bad = isinstance(value, float) and not math.isfinite(value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        bad = True
    if hi is not None and value > hi:
        bad = True
    if bad:
        lo_txt = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
        hi_txt = "" if hi is None or math.isinf(hi) else f"<= {hi}"
        allowed = " and ".join(t for t in (lo_txt, hi_txt) if t) or "a finite number"
        raise ConfigError(f"{name} = {value!r} is out of range; allowed: {allowed}")


@dataclass(frozen=True)
class Param:
    """One parameter a registry entry takes.

    Attributes:
        name: the keyword it is passed as.
        default: its value when none is given.
        meaning: one line: what it is, and its unit.
        lo: smallest allowed value (``None``: no bound); excluded when ``lo_open``.
        hi: largest allowed value (``None``: no bound).
        lo_open: whether ``lo`` itself is excluded.
        choices: the allowed values of a named option (``None``: not an option); a
            :class:`Registry` is read when a value is checked, so that names registered
            later are allowed too.
    """

    name: str
    default: Any
    meaning: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    choices: Iterable[str] | None = None

    def check(self, value: Any, field: str | None = None) -> None:
        """Raise :class:`ConfigError` naming ``field`` (default: the name), value and allowed."""
        field = field or self.name
        if self.choices is not None:
            check_choice(field, value, tuple(self.choices))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            check_range(field, value, lo=self.lo, hi=self.hi, lo_open=self.lo_open)


class Registry(Generic[T]):
    """A named table of objects of one kind.

    Args:
        kind: what the entries are, used in error messages (e.g. ``"method"``).
        entry: builds an entry from a registered function and its facts
            (``entry(fn, **facts)``); ``None``: the function is the entry.
    """

    def __init__(self, kind: str, entry: Callable[..., T] | None = None) -> None:
        self.kind = kind
        self.entry = entry
        self._entries: dict[str, T] = {}

    def register(self, name: str, **facts: Any) -> Callable[[F], F]:
        """Decorator that files ``obj`` (or ``entry(obj, **facts)``) under ``name``."""

        def deco(obj: F) -> F:
            self.add(name, obj if self.entry is None else self.entry(obj, **facts))  # type: ignore[arg-type]
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """File ``obj`` under ``name``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def remove(self, name: str) -> T:
        """Take ``name`` out again (an example or a plugin that cleans up after itself)."""
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """Look ``name`` up; an unknown name raises :class:`ConfigError` listing the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
