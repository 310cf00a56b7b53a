"""Energies of a classifier seen as an energy-based model (METHODS.md §1).

For logits ``f(x) ∈ R^K``:

* joint energy     ``E(x, y) = -f(x)[y]``
* marginal energy  ``E(x)    = -logsumexp_k f(x)[k]``

Proposition 1 of the paper splits the TRADES KL term into a conditional and a
marginal energy term; :func:`kl_energy_terms` returns both per sample.
"""

from __future__ import annotations

import torch
from torch import Tensor


def marginal_energy(logits: Tensor) -> Tensor:
    """``E(x) = -logsumexp_k f(x)[k]`` per sample.

    Args:
        logits: ``[B, K]`` classifier outputs.

    Returns:
        ``[B]`` marginal energies (lower = more likely under the model's p(x)).
    """
    return -torch.logsumexp(logits, dim=1)


def joint_energy(logits: Tensor, y: Tensor) -> Tensor:
    """``E(x, y) = -f(x)[y]`` per sample.

    Args:
        logits: ``[B, K]`` classifier outputs.
        y: ``[B]`` integer class indices.

    Returns:
        ``[B]`` joint energies.
    """
    return -logits.gather(1, y.view(-1, 1)).squeeze(1)


def kl_energy_terms(logits_nat: Tensor, logits_adv: Tensor) -> tuple[Tensor, Tensor]:
    """The two terms of Proposition 1, per sample.

    ``KL(p(·|x) || p(·|x*)) = Σ_k p(k|x) [E(x*, k) - E(x, k)] + E(x) - E(x*)``

    Args:
        logits_nat: ``[B, K]`` logits of the natural inputs ``x``.
        logits_adv: ``[B, K]`` logits of the adversarial inputs ``x*``.

    Returns:
        ``(conditional, marginal)``, each ``[B]``; their sum is the per-sample KL.
    """
    p_nat = torch.softmax(logits_nat, dim=1)
    # E(x*, k) - E(x, k) = -f(x*)[k] + f(x)[k]
    conditional = (p_nat * (logits_nat - logits_adv)).sum(dim=1)
    marginal = marginal_energy(logits_nat) - marginal_energy(logits_adv)
    return conditional, marginal


def kl_per_sample(logits_nat: Tensor, logits_adv: Tensor) -> Tensor:
    """``KL(p(·|x) || p(·|x*))`` per sample ``[B]``, computed from log-softmaxes."""
    logp_nat = torch.log_softmax(logits_nat, dim=1)
    logp_adv = torch.log_softmax(logits_adv, dim=1)
    return (logp_nat.exp() * (logp_nat - logp_adv)).sum(dim=1)
