"""Projected gradient attacks with one call shape: ``attack(model, x, y) -> x_adv``.

* Objectives: ``ce`` (cross-entropy with the true label, SAT/MART training and
  evaluation) and ``kl`` (``KL(p(·|x) || p(·|x*))``, TRADES-style training).
* Norms: ``linf`` (sign step, clip to the box) and ``l2`` (normalised step,
  renormalise onto the ball).
* Starts: ``uniform`` in the ε-ball (Madry), ``normal`` (``x + 0.001·N(0, I)``,
  TRADES), ``none``.

The model runs in eval mode during the attack and gets its previous mode back
afterwards. After every step the point is projected onto the ε-ball and
clamped to [0, 1]. For ``kl``, ``p(·|x)`` is computed once per batch (the
TRADES reference code recomputes it at every step). Input gradients come from
``torch.autograd.grad`` so no parameter gradient is computed or accumulated,
and there is no host synchronisation inside the step loop. Under an autocast
context (bf16 training) the model runs in bf16 and the objective in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.errors import ConfigError

NORMS = ("linf", "l2")
OBJECTIVES = ("ce", "kl")
STARTS = ("uniform", "normal", "none")


def _per_sample_norm(t: Tensor) -> Tensor:
    """ℓ2 norm of each sample, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class PGD:
    """Projected gradient ascent on ``objective`` inside an ε-ball.

    Attributes:
        eps: radius of the threat model (ℓ∞: per pixel, inputs in [0, 1]; ℓ2: per image).
        alpha: step size, in the same units as ``eps``.
        steps: number of gradient steps (0 returns the start point).
        norm: ``"linf"`` or ``"l2"``.
        objective: ``"ce"`` or ``"kl"``.
        start: ``"uniform"``, ``"normal"`` (0.001·N(0, I)) or ``"none"``.
    """

    eps: float
    alpha: float
    steps: int
    norm: str = "linf"
    objective: str = "ce"
    start: str = "uniform"

    def __post_init__(self) -> None:
        for field_name, value, allowed in (
            ("norm", self.norm, NORMS),
            ("objective", self.objective, OBJECTIVES),
            ("start", self.start, STARTS),
        ):
            if value not in allowed:
                raise ConfigError(f"attack {field_name} = {value!r}; allowed: {', '.join(allowed)}")
        if not self.eps >= 0:
            raise ConfigError(f"attack eps = {self.eps}; must be >= 0")
        if self.steps < 0:
            raise ConfigError(f"attack steps = {self.steps}; must be >= 0")

    def _project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        delta = x_adv - x
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            delta = delta * (self.eps / _per_sample_norm(delta)).clamp(max=1.0)
        return (x + delta).clamp(0.0, 1.0)

    def _start(self, x: Tensor) -> Tensor:
        if self.start == "none" or self.eps == 0:
            return x.clone()
        if self.start == "normal":
            return self._project(x + 0.001 * torch.randn_like(x), x)
        if self.norm == "linf":
            delta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        else:
            direction = torch.randn_like(x)
            radius = torch.rand(x.shape[0], device=x.device, dtype=x.dtype) * self.eps
            shape = (-1, *([1] * (x.dim() - 1)))
            delta = direction / _per_sample_norm(direction) * radius.view(shape)
        return self._project(x + delta, x)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Return adversarial points for the batch ``(x, y)``; ``x`` in [0, 1]."""
        was_training = model.training
        model.eval()
        try:
            x = x.detach()
            logp_nat = None
            if self.objective == "kl" and self.steps > 0:
                with torch.no_grad():
                    logp_nat = F.log_softmax(model(x).float(), dim=1)
            x_adv = self._start(x)
            if self.norm == "linf":  # the ε-ball ∩ [0, 1] box, per pixel, computed once
                lo, hi = (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv).float()  # under autocast: the loss in fp32
                if logp_nat is None:
                    loss = F.cross_entropy(logits, y, reduction="sum")
                else:
                    loss = F.kl_div(
                        F.log_softmax(logits, dim=1), logp_nat, reduction="sum", log_target=True
                    )
                (grad,) = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    if self.norm == "linf":  # step and projection in three in-place ops
                        x_adv = x_adv.detach().add_(grad.sign_(), alpha=self.alpha)
                        x_adv = x_adv.clamp_(min=lo, max=hi)
                    else:
                        step = self.alpha * grad / _per_sample_norm(grad)
                        x_adv = self._project(x_adv.detach() + step, x)
            return x_adv.detach()
        finally:
            model.train(was_training)
