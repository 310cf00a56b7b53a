"""Per-sample weighting functions of the marginal energy (WEAT, METHODS.md §3).

Every function here is a *decreasing* function of ``|E(x)|`` and is computed as
a log-weight, so that very large energies (``|E|`` in the hundreds or more)
neither overflow nor underflow, and the optional per-batch ``mean``
normalisation stays finite. Weights never carry gradient: the energies are
detached before use.

Shapes (``a = |E(x)|``; parameters in ``weight_params``):

==============  ==========================================  ===================
name            w(a)                                        parameters
==============  ==========================================  ===================
``weat``        ``1 / softplus(a)``  (paper, Eq. 14)        none
``softplus_t``  ``1 / softplus(a / T)``                     ``temperature`` T>0
``power``       ``(1 + a / s) ** (-p)``                     ``power`` p>0, ``scale`` s>0
``exp``         ``exp(-a / T)``                             ``temperature`` T>0
``none``        ``1`` (WEAT reduces to TRADES)              none
==============  ==========================================  ===================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.errors import ConfigError
from trainables.registry import Param, Registry


@dataclass(frozen=True)
class WeightFn:
    """A registered weighting shape.

    Attributes:
        log_weight: maps ``(|E|, params)`` to ``log w`` per sample.
        params: the shape's parameters (each a finite value > 0), with defaults.
    """

    log_weight: Callable[[Tensor, Mapping[str, float]], Tensor]
    params: tuple[Param, ...] = ()


WEIGHT_FNS: Registry[WeightFn] = Registry("weighting function")
NORMALIZATIONS = ("none", "mean")


def _neg_log_softplus(a: Tensor) -> Tensor:
    # softplus(a) >= log 2 > 0 for a >= 0, so the log is always finite.
    return -torch.log(F.softplus(a))


def _positive(name: str, default: float, meaning: str) -> Param:
    return Param(name, default, meaning, lo=0.0, lo_open=True)


_T = "temperature T dividing |E| (energy units)"
WEIGHT_FNS.add("weat", WeightFn(lambda a, p: _neg_log_softplus(a)))
WEIGHT_FNS.add(
    "softplus_t",
    WeightFn(
        lambda a, p: _neg_log_softplus(a / p["temperature"]), (_positive("temperature", 1.0, _T),)
    ),
)
WEIGHT_FNS.add(
    "power",
    WeightFn(
        lambda a, p: -p["power"] * torch.log1p(a / p["scale"]),
        (
            _positive("power", 1.0, "exponent p of the decay"),
            _positive("scale", 1.0, "scale s of |E| (energy units)"),
        ),
    ),
)
WEIGHT_FNS.add(
    "exp", WeightFn(lambda a, p: -a / p["temperature"], (_positive("temperature", 10.0, _T),))
)
WEIGHT_FNS.add("none", WeightFn(lambda a, p: torch.zeros_like(a)))


def resolve_weight_params(name: str, params: Mapping[str, float] | None) -> dict[str, float]:
    """Fill a shape's defaults into ``params`` and validate names and values.

    Raises:
        ConfigError: unknown shape, unknown parameter, or a non-positive value.
    """
    fn = WEIGHT_FNS.get(name)
    params = dict(params or {})
    unknown = sorted(set(params) - {p.name for p in fn.params})
    if unknown:
        allowed = ", ".join(p.name for p in fn.params) or "none"
        raise ConfigError(
            f"weight_params: {unknown} not a parameter of weighting function {name!r} "
            f"(its parameters: {allowed})"
        )
    out = {p.name: float(params.get(p.name, p.default)) for p in fn.params}
    for p in fn.params:
        p.check(out[p.name], f"weight_params.{p.name}")
    return out


def energy_weights(
    energy: Tensor,
    name: str = "weat",
    params: Mapping[str, float] | None = None,
    normalize: str = "none",
) -> Tensor:
    """Per-sample weights ``w(|E(x)|)`` from marginal energies.

    Args:
        energy: ``[B]`` marginal energies ``E(x)`` (any sign; detached here).
        name: weighting shape, one of :data:`WEIGHT_FNS`.
        params: the shape's parameters (defaults filled in).
        normalize: ``"none"`` (paper and reference code) or ``"mean"`` (weights
            divided by their batch mean, so they average to 1).

    Returns:
        ``[B]`` non-negative weights with no gradient.
    """
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize = {normalize!r}; allowed: {', '.join(NORMALIZATIONS)}")
    fn = WEIGHT_FNS.get(name)
    p = resolve_weight_params(name, params)
    a = energy.detach().abs().double()  # float64: exact log-space normalisation
    logw = fn.log_weight(a, p)
    if normalize == "mean":
        logw = logw - (torch.logsumexp(logw, dim=0) - math.log(logw.numel()))
    return logw.exp().to(energy.dtype if energy.is_floating_point() else torch.float32)
