"""Energies, Proposition 1 and the weighting functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainables.energy import joint_energy, kl_energy_terms, kl_per_sample, marginal_energy
from trainables.errors import ConfigError
from trainables.weighting import WEIGHT_FNS, energy_weights


def _logits(b: int = 64, k: int = 10, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g, dtype=torch.float64) * scale


def test_energies_match_definitions() -> None:
    logits = _logits()
    y = torch.arange(64) % 10
    assert torch.allclose(marginal_energy(logits), -torch.log(torch.exp(logits).sum(1)))
    assert torch.equal(joint_energy(logits, y), -logits[torch.arange(64), y])
    # CE(x, y) = E(x, y) - E(x) >= 0
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(ce, joint_energy(logits, y) - marginal_energy(logits))
    assert (ce >= 0).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 10, 100])
def test_proposition_1_holds_to_1e5(seed: int, k: int) -> None:
    nat, adv = _logits(k=k, seed=seed), _logits(k=k, seed=seed + 100, scale=5.0)
    cond, marg = kl_energy_terms(nat.float(), adv.float())
    p, q = F.softmax(nat, 1), F.softmax(adv, 1)
    kl_direct = (p * (p.log() - q.log())).sum(1)  # float64 reference
    assert cond.shape == marg.shape == (64,)
    assert (cond + marg - kl_direct).abs().max() < 1e-5
    assert (kl_per_sample(nat.float(), adv.float()) - kl_direct).abs().max() < 1e-5


def test_weat_weight_is_eq_14() -> None:
    e = torch.tensor([-300.0, -20.0, -1.0, 0.0, 0.5, 7.0, 250.0], dtype=torch.float64)
    w = energy_weights(e, "weat")
    expected = torch.tensor([1.0 / math.log(1.0 + math.exp(abs(v))) for v in e.tolist()[1:-1]])
    assert torch.allclose(w[1:-1].double(), expected.double(), rtol=1e-5)
    # |E| in the hundreds: softplus(a) ~ a, no overflow to inf/0
    assert torch.allclose(w[[0, -1]].double(), 1.0 / e[[0, -1]].abs(), rtol=1e-4)


@pytest.mark.parametrize("name", WEIGHT_FNS.names())
@pytest.mark.parametrize("normalize", ["none", "mean"])
def test_weights_are_decreasing_finite_and_detached(name: str, normalize: str) -> None:
    e = -torch.linspace(0.0, 800.0, 401, requires_grad=True)
    w = energy_weights(e, name, normalize=normalize)
    assert not w.requires_grad
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert (w[1:] <= w[:-1] + 1e-12).all(), "weights must not increase with |E|"
    if normalize == "mean":
        assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    if name != "none" and normalize == "none":
        assert w[-1] < w[0]


def test_weight_shapes_formulas() -> None:
    a = torch.tensor([0.0, 1.0, 5.0, 50.0])
    assert torch.allclose(
        energy_weights(-a, "softplus_t", {"temperature": 2.0}), 1 / F.softplus(a / 2)
    )
    assert torch.allclose(
        energy_weights(a, "power", {"power": 2.0, "scale": 3.0}), (1 + a / 3) ** -2
    )
    assert torch.allclose(energy_weights(a, "exp", {"temperature": 4.0}), torch.exp(-a / 4))
    assert torch.equal(energy_weights(a, "none"), torch.ones(4))


def test_mean_normalisation_survives_underflow() -> None:
    # exp(-|E|/T) underflows to 0 for every sample; the log-space mean does not.
    e = torch.tensor([-500.0, -510.0, -520.0])
    w = energy_weights(e, "exp", {"temperature": 0.5}, normalize="mean")
    assert torch.isfinite(w).all() and w.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_bad_weighting_inputs_fail_with_names() -> None:
    e = torch.zeros(3)
    with pytest.raises(ConfigError, match="unknown weighting function 'cubic'"):
        energy_weights(e, "cubic")
    with pytest.raises(ConfigError, match="temperature"):
        energy_weights(e, "exp", {"temperature": -1.0})
    with pytest.raises(ConfigError, match="not a parameter"):
        energy_weights(e, "weat", {"power": 2.0})
    with pytest.raises(ConfigError, match="normalize"):
        energy_weights(e, "weat", normalize="sum")
