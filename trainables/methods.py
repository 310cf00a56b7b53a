"""Training losses of the six methods (METHODS.md §3), registered by name.

Each method is a pure function of logits: per-sample vectors in, a 0-dim loss
and a dict of detached diagnostics out. The attack that produces ``x*`` is not
part of the loss; :class:`MethodSpec` only says which training attack a
method expects (objective and start), so the epoch loop can build it.

Public entry points: :func:`bind_method` resolves a method and its hyperparameters
once (what the epoch loop does); :func:`compute_loss` is the one-call front door.

>>> y = torch.tensor([0, 1])
>>> nat, adv = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.5]])
>>> loss, diag = compute_loss("weat_adv", nat, adv, y, beta=6.0)
>>> sorted(diag)
['ce_adv', 'energy_nat', 'kl', 'mean_weight']
>>> method = bind_method("mail_trades", {"beta": 4.0})
>>> method.hparams["beta"], method.hparams["slope"]
(4.0, 2.0)
>>> loss, diag = method.loss(nat, adv, y, epoch=3)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.energy import kl_per_sample, marginal_energy
from trainables.errors import ConfigError
from trainables.registry import Param, Registry
from trainables.weighting import NORMALIZATIONS, WEIGHT_FNS, energy_weights, resolve_weight_params

LossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class MethodSpec:
    """A registered training method.

    Attributes:
        loss: ``loss(logits_nat, logits_adv, y, **hparams) -> (loss, diagnostics)``.
        attack_loss: objective of the training attack, ``"ce"`` or ``"kl"``; ``None``
            for a method trained on natural inputs only (``standard``).
        attack_start: ``"uniform"`` (noise in the ε-ball) or ``"normal"`` (0.001·N(0, I)).
        needs_nat: whether the loss uses the logits of the natural input.
        params: the hyperparameters ``loss`` takes, with defaults and allowed values.
        uses_epoch: whether ``loss`` also takes the current ``epoch`` (from 0).
    """

    loss: LossFn
    attack_loss: str | None
    attack_start: str
    needs_nat: bool
    params: tuple[Param, ...] = ()
    uses_epoch: bool = False


METHODS: Registry[MethodSpec] = Registry("method")

#: Why every method trains in fp32 unless ``precision: bf16`` is asked for (for all of
#: them: a study compares methods, so precision must not differ between them).
BF16_NOTE = """\
The KL attack starts at x* = x + 0.001·N(0, I), where KL(p(·|x) || p(·|x*)) is about
1e-5: below the resolution of bf16 logits (8-bit mantissa). Measured on the CPU
(small CNN after 2 TRADES epochs on the CIFAR-10 JPEG folder, 512 images): under
bf16 autocast the first-step KL read 2.2e-3 instead of 1.8e-5, its input gradient
had cosine 0.17 with the fp32 one, and the final perturbations of the 10-step KL
attack agreed in sign on 57% of the pixels (98.5% for the CE attack). The CE
attacks (SAT, MART) start from a point where the loss is well resolved.
"""


def _detached(**values: Tensor) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in values.items()}


def _standard(logits_nat: Tensor, logits_adv: Tensor | None, y: Tensor) -> tuple[Tensor, dict]:
    ce = F.cross_entropy(logits_nat, y)
    return ce, _detached(ce_nat=ce)


def _sat(logits_nat: Tensor | None, logits_adv: Tensor, y: Tensor) -> tuple[Tensor, dict]:
    ce = F.cross_entropy(logits_adv, y)
    return ce, _detached(ce_adv=ce)


def _trades(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> tuple[Tensor, dict]:
    ce = F.cross_entropy(logits_nat, y)
    kl = kl_per_sample(logits_nat, logits_adv).mean()
    return ce + beta * kl, _detached(ce_nat=ce, kl=kl)


def _mart(logits_nat: Tensor, logits_adv: Tensor, y: Tensor, beta: float) -> tuple[Tensor, dict]:
    probs_adv = torch.softmax(logits_adv, dim=1)
    others = probs_adv.scatter(1, y.view(-1, 1), float("-inf"))
    max_other = others.max(dim=1).values
    # BCE = CE(x*, y) - log(1 - max_{k≠y} p(k|x*)); clamp keeps the log finite.
    bce = F.cross_entropy(logits_adv, y) - torch.log1p(-max_other.clamp(max=1 - 1e-6)).mean()
    p_true_nat = torch.softmax(logits_nat, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    kl_i = kl_per_sample(logits_nat, logits_adv)
    weight = 1.0 - p_true_nat
    kl = (kl_i * weight).mean()
    return bce + beta * kl, _detached(bce=bce, kl=kl, mean_weight=weight.mean())


def _mail_trades(
    logits_nat: Tensor,
    logits_adv: Tensor,
    y: Tensor,
    beta: float,
    bias: float,
    slope: float,
    mail_scale: float,
    burn_in: int,
    epoch: int,
) -> tuple[Tensor, dict]:
    # official mail_loss.py: weight_assign returns 3·sigmoid(slope·(PM + bias)), no
    # other normalisation, and the weighted KL sum is divided by B
    ce = F.cross_entropy(logits_nat, y)
    kl_i = kl_per_sample(logits_nat, logits_adv)
    if epoch < burn_in:
        weight = torch.ones_like(kl_i)
    else:
        with torch.no_grad():
            probs_adv = torch.softmax(logits_adv, dim=1)
            p_true = probs_adv.gather(1, y.view(-1, 1)).squeeze(1)
            max_other = probs_adv.scatter(1, y.view(-1, 1), float("-inf")).max(dim=1).values
            margin = max_other - p_true
            weight = mail_scale * torch.sigmoid(slope * (margin + bias))
    kl = (kl_i * weight).mean()
    return ce + beta * kl, _detached(ce_nat=ce, kl=kl, mean_weight=weight.mean())


def _weat(
    logits_nat: Tensor,
    logits_adv: Tensor,
    y: Tensor,
    *,
    ce_on: str,
    beta: float,
    weight_fn: str,
    weight_params: Mapping[str, float] | None,
    normalize: str,
) -> tuple[Tensor, dict]:
    energy = marginal_energy(logits_nat).detach()
    weight = energy_weights(energy, weight_fn, weight_params, normalize)
    ce_logits = logits_nat if ce_on == "nat" else logits_adv
    ce_i = F.cross_entropy(ce_logits, y, reduction="none")
    kl_i = kl_per_sample(logits_nat, logits_adv)
    # Weighted sums divided by B, not by Σw (reference code).
    ce = (weight * ce_i).mean()
    kl = (weight * kl_i).mean()
    return ce + beta * kl, _detached(
        **{f"ce_{ce_on}": ce}, kl=kl, mean_weight=weight.mean(), energy_nat=energy.mean()
    )


def _weat_nat(logits_nat, logits_adv, y, beta, weight_fn, weight_params, normalize):
    return _weat(
        logits_nat, logits_adv, y, ce_on="nat", beta=beta, weight_fn=weight_fn,
        weight_params=weight_params, normalize=normalize,
    )  # fmt: skip


def _weat_adv(logits_nat, logits_adv, y, beta, weight_fn, weight_params, normalize):
    return _weat(
        logits_nat, logits_adv, y, ce_on="adv", beta=beta, weight_fn=weight_fn,
        weight_params=weight_params, normalize=normalize,
    )  # fmt: skip


def _beta(default: float) -> Param:
    return Param("beta", default, "trade-off β: weight of the (weighted) KL term", lo=0.0)


_WEAT = (
    _beta(6.0),
    Param("weight_fn", "weat", "shape of the sample weight w(|E(x)|)", choices=WEIGHT_FNS),
    Param("weight_params", None, "the shape's parameters by name (None: its defaults)"),
    Param("normalize", "none", "mean: weights divided by their batch mean", choices=NORMALIZATIONS),
)
_MAIL = (
    _beta(5.0),
    Param("bias", 0.0, "added to the probability margin PM (in [-1, 1]) before the sigmoid"),
    Param("slope", 2.0, "slope of the sigmoid, per unit of margin", lo=0.0),
    Param("mail_scale", 3.0, "weight scale (official mail_loss.py: 3·sigmoid)", lo=0.0),
    # 0 for a direct call; a run's default is TrainConfig's (burn_in_fraction of its epochs)
    Param("burn_in", 0, "epochs of plain TRADES before the weights start", lo=0),
)
METHODS.add("standard", MethodSpec(_standard, None, "none", needs_nat=True))
METHODS.add("sat", MethodSpec(_sat, "ce", "uniform", needs_nat=False))
METHODS.add("trades", MethodSpec(_trades, "kl", "normal", True, (_beta(6.0),)))
METHODS.add("mart", MethodSpec(_mart, "ce", "normal", True, (_beta(5.0),)))
METHODS.add("mail_trades", MethodSpec(_mail_trades, "kl", "normal", True, _MAIL, uses_epoch=True))
METHODS.add("weat_nat", MethodSpec(_weat_nat, "kl", "normal", True, _WEAT))
METHODS.add("weat_adv", MethodSpec(_weat_adv, "kl", "normal", True, _WEAT))

#: Every hyperparameter some method declares (ranges agree between methods; defaults may not).
HPARAMS: dict[str, Param] = {p.name: p for n in METHODS for p in METHODS.get(n).params}
#: Every hyperparameter name a method may be given (others are rejected); ``epoch`` is
#: the loop's, handed only to a method that ``uses_epoch``.
HPARAM_NAMES: tuple[str, ...] = (*sorted(HPARAMS), "epoch")


def check_hparams(values: Mapping[str, Any]) -> dict[str, Any]:
    """Check hyperparameter values against their declarations (``None`` is skipped).

    Returns:
        ``values`` with ``weight_params`` resolved against ``weight_fn`` (defaults filled).

    Raises:
        ConfigError: naming the hyperparameter, the bad value and what is allowed.
    """
    for name, value in values.items():
        if value is not None and name in HPARAMS:
            HPARAMS[name].check(value)
    out = dict(values)
    if "weight_params" in out:
        out["weight_params"] = resolve_weight_params(out["weight_fn"], out["weight_params"])
    return out


@dataclass(frozen=True)
class BoundMethod:
    """A method with its hyperparameters resolved (defaults filled in, validated once)."""

    name: str
    spec: MethodSpec
    hparams: Mapping[str, Any]  # resolved; no 'epoch'

    def loss(
        self, logits_nat: Tensor | None, logits_adv: Tensor | None, y: Tensor, epoch: int = 0
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-batch loss: no name lookup, no re-validation."""
        runtime = {"epoch": epoch} if self.spec.uses_epoch else {}
        return self.spec.loss(logits_nat, logits_adv, y, **self.hparams, **runtime)


def bind_method(name: str, hparams: Mapping[str, Any]) -> BoundMethod:
    """Look the method up, fill defaults, validate (ConfigError naming the bad value).

    Unknown names rejected; names the method does not use are dropped; None = default.

    Args:
        name: one of :data:`METHODS`.
        hparams: values for names in :data:`HPARAM_NAMES` (``epoch`` is dropped:
            :meth:`BoundMethod.loss` takes it per batch).
    """
    spec = METHODS.get(name)
    unknown = sorted(set(hparams) - set(HPARAM_NAMES))
    if unknown:
        raise ConfigError(
            f"unknown hyperparameter(s) {unknown} for method {name!r}; "
            f"allowed: {', '.join(HPARAM_NAMES)}"
        )
    values = {
        p.name: p.default if hparams.get(p.name) is None else hparams[p.name] for p in spec.params
    }
    return BoundMethod(name, spec, MappingProxyType(check_hparams(values)))


def compute_loss(
    name: str,
    logits_nat: Tensor | None,
    logits_adv: Tensor | None,
    y: Tensor,
    **hparams: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of method ``name``.

    Args:
        name: one of :data:`METHODS` (``sat``, ``trades``, ``mart``, ``mail_trades``,
            ``weat_nat``, ``weat_adv``, and the non-robust baseline ``standard``).
        logits_nat: ``[B, K]`` train-mode logits of the natural inputs (may be
            ``None`` for ``sat``).
        logits_adv: ``[B, K]`` train-mode logits of the adversarial inputs (``None``
            for ``standard``).
        y: ``[B]`` labels.
        **hparams: ``beta`` (trade-off, ≥ 0), ``weight_fn``/``weight_params``/
            ``normalize`` (WEAT), ``bias``/``slope``/``mail_scale``/``burn_in``/``epoch`` (MAIL);
            names a method does not use are ignored, unknown names rejected.

    Returns:
        ``(loss, diagnostics)``: a 0-dim loss and detached 0-dim tensors, including
        ``mean_weight`` for the methods that weight samples.

    Example:
        >>> y = torch.tensor([0, 1])
        >>> ln, la = torch.eye(2), torch.zeros(2, 2)
        >>> loss, diag = compute_loss("trades", ln, la, y, beta=6.0)
        >>> round(loss.item(), 4), sorted(diag)
        (0.9789, ['ce_nat', 'kl'])
    """
    method = bind_method(name, hparams)
    spec = method.spec
    if spec.needs_nat and logits_nat is None:
        raise ConfigError(f"method {name!r} needs the natural logits (logits_nat is None)")
    if spec.attack_loss is not None and logits_adv is None:
        raise ConfigError(f"method {name!r} needs the adversarial logits (logits_adv is None)")
    return method.loss(logits_nat, logits_adv, y, epoch=hparams.get("epoch") or 0)
