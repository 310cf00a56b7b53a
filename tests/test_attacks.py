"""PGD: stays in the ε-ball and [0, 1], increases its objective, eval mode, no param grads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.attacks import PGD
from trainables.errors import ConfigError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def _data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _objective(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y, kind: str) -> float:
    model.eval()
    with torch.no_grad():
        if kind == "ce":
            return F.cross_entropy(model(x_adv), y, reduction="sum").item()
        lp, lq = F.log_softmax(model(x), 1), F.log_softmax(model(x_adv), 1)
        return (lp.exp() * (lp - lq)).sum().item()


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 8 / 255, 2 / 255), ("l2", 0.5, 0.1)])
@pytest.mark.parametrize("objective", ["ce", "kl"])
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
def test_pgd_stays_in_ball_and_box_and_increases_objective(norm, eps, alpha, objective, start):
    model, (x, y) = _model(), _data()
    model.train()
    torch.manual_seed(2)
    x_adv = PGD(eps, alpha, 10, norm=norm, objective=objective, start=start)(model, x, y)
    assert model.training, "the attack must give the model its train mode back"
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max() <= eps + 1e-5
    torch.manual_seed(2)
    x_start = PGD(eps, alpha, 0, norm=norm, objective=objective, start=start)(model, x, y)
    before = _objective(model, x, x_start, y, objective)
    after = _objective(model, x, x_adv, y, objective)
    assert after > before * 1.005 + 1e-6, (before, after)
    assert all(p.grad is None for p in model.parameters()), "no parameter gradients"


def test_attack_runs_in_eval_mode() -> None:
    model, (x, y) = _model(), _data()
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(m.training))
    model.train()
    PGD(8 / 255, 2 / 255, 3, objective="kl", start="normal")(model, x, y)
    assert seen and not any(seen)
    model.eval()
    PGD(8 / 255, 2 / 255, 1)(model, x, y)
    assert not model.training


def test_kl_attack_computes_p_nat_once() -> None:
    model, (x, y) = _model(), _data()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(1))
    PGD(8 / 255, 2 / 255, 10, objective="kl", start="normal")(model, x, y)
    assert len(calls) == 11  # one p(.|x) + K attack steps


def test_random_start_uniform_covers_ball() -> None:
    model, (x, y) = _model(), _data()
    x = x * 0.5 + 0.25  # keep away from the box edges
    x0 = PGD(0.1, 0.01, 0, start="uniform")(model, x, y)
    d = (x0 - x).flatten()
    assert d.abs().max() <= 0.1 + 1e-6 and d.abs().max() > 0.09
    assert abs(d.mean().item()) < 0.01
    xn = PGD(0.1, 0.01, 0, start="normal")(model, x, y)
    assert 0.0005 < (xn - x).std().item() < 0.002


def test_bad_attack_settings() -> None:
    with pytest.raises(ConfigError, match="norm"):
        PGD(0.1, 0.01, 1, norm="l1")
    with pytest.raises(ConfigError, match="objective"):
        PGD(0.1, 0.01, 1, objective="cw")
    with pytest.raises(ConfigError, match="steps"):
        PGD(0.1, 0.01, -1)


@pytest.mark.parametrize("start", ["none", "normal", "uniform"])
@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_linf_step_matches_the_textbook_step_and_leaves_inputs_alone(start, objective) -> None:
    """The in-place ℓ∞ step (clamp against ball ∩ box bounds) = x + clip(x' + α·sign(g) − x)."""
    model = _model()
    x, y = _data()
    x_before = x.clone()
    attack = PGD(8 / 255, 2 / 255, 5, objective=objective, start=start)
    torch.manual_seed(3)
    got = attack(model, x, y)
    assert torch.equal(x, x_before)

    # the same attack written out of place, with the same random start
    torch.manual_seed(3)
    x_adv = attack._start(x)
    model.eval()
    with torch.no_grad():
        logp_nat = F.log_softmax(model(x), dim=1)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        if objective == "ce":
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:
            loss = F.kl_div(F.log_softmax(logits, 1), logp_nat, reduction="sum", log_target=True)
        (grad,) = torch.autograd.grad(loss, x_adv)
        step = x_adv.detach() + attack.alpha * grad.sign()
        x_adv = (x + (step - x).clamp(-attack.eps, attack.eps)).clamp(0.0, 1.0)
    # equal up to rounding of x + (v - x) vs v (one ulp); a sign flip would show as 2α
    assert (got - x_adv).abs().max().item() < 1e-6
