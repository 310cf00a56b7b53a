"""Each method's loss against a direct transcription of METHODS.md §3."""

from __future__ import annotations

import math

import pytest
import torch

from trainables.errors import ConfigError
from trainables.methods import METHODS, compute_loss

B, K = 32, 10


def _batch(k: int = K, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    nat = (torch.randn(B, k, generator=g) * 2).double()
    adv = (nat + torch.randn(B, k, generator=g) * 1.5).double()
    y = torch.randint(0, k, (B,), generator=g)
    return nat, adv, y


def _p(logits: torch.Tensor) -> torch.Tensor:
    return torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -torch.log(_p(logits)[torch.arange(len(y)), y])


def _kl(nat: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    p, q = _p(nat), _p(adv)
    return (p * torch.log(p / q)).sum(1)


def _max_other(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(len(y)):
        out.append(max(probs[i, k] for k in range(probs.shape[1]) if k != y[i]))
    return torch.stack(out)


def test_sat() -> None:
    nat, adv, y = _batch()
    loss, _ = compute_loss("sat", None, adv, y)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(_ce(adv, y).mean().item(), rel=1e-9)


def test_trades() -> None:
    nat, adv, y = _batch()
    loss, diag = compute_loss("trades", nat, adv, y, beta=6.0)
    expected = _ce(nat, y).mean() + 6.0 * _kl(nat, adv).sum() / B
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert diag["kl"].item() == pytest.approx((_kl(nat, adv).sum() / B).item(), rel=1e-9)


def test_mart() -> None:
    nat, adv, y = _batch()
    loss, diag = compute_loss("mart", nat, adv, y, beta=5.0)
    pa, pn = _p(adv), _p(nat)
    bce = _ce(adv, y) - torch.log(1 - _max_other(pa, y))
    p_true = pn[torch.arange(B), y]
    expected = bce.mean() + 5.0 * (_kl(nat, adv) * (1 - p_true)).sum() / B
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert diag["mean_weight"].item() == pytest.approx((1 - p_true).mean().item(), rel=1e-9)


def _official_mail_trades(
    nat: torch.Tensor, adv: torch.Tensor, y: torch.Tensor, beta: float, bias: float, slope: float
) -> torch.Tensor:
    """A transcription of the official MAIL code (QizhouWang/MAIL, ``mail_loss.py``):
    ``PM`` and ``weight_assign`` (which returns the sigmoid times 3, "normalized_reweight"),
    then TRADES with the per-sample KL sum weighted and divided by the batch size.
    Its one-hot ``torch.eye(10)`` is generalised to K classes (a known defect of that
    code, METHODS.md §6)."""
    k = nat.shape[1]
    eye = torch.eye(k, dtype=nat.dtype)
    probs = adv.softmax(1)
    probs_gt = (probs * eye[y]).sum(1).detach()
    top2_probs = (probs * (1 - eye[y])).max(1)[0].detach()
    pm = top2_probs - probs_gt
    reweight = ((pm + bias) * slope).sigmoid().detach()
    normalized_reweight = reweight * 3
    batch_size = len(y)
    loss_natural = torch.nn.functional.cross_entropy(nat, y)
    kl = torch.nn.KLDivLoss(reduction="none")(adv.log_softmax(1), nat.softmax(1)).sum(1)
    loss_robust = (1.0 / batch_size) * torch.sum(kl * normalized_reweight)
    return loss_natural + beta * loss_robust


@pytest.mark.parametrize("k", [3, 10, 100])
def test_mail_trades_equals_the_official_code(k: int) -> None:
    nat, adv, y = _batch(k=k)
    beta, bias, slope = 5.0, -0.5, 2.0
    loss, diag = compute_loss(
        "mail_trades", nat, adv, y, beta=beta, bias=bias, slope=slope, burn_in=2, epoch=3
    )
    expected = _official_mail_trades(nat, adv, y, beta, bias, slope)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    # and the METHODS.md formula, written out by hand: w = 3·sigmoid(slope·(PM + bias))
    pa = _p(adv)
    pm = _max_other(pa, y) - pa[torch.arange(B), y]
    w = 3 / (1 + torch.exp(-slope * (pm + bias)))
    by_hand = _ce(nat, y).mean() + beta * (_kl(nat, adv) * w).sum() / B
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-9)
    assert diag["mean_weight"].item() == pytest.approx(w.mean().item(), rel=1e-9)


def test_mail_scale_is_a_hyperparameter() -> None:
    nat, adv, y = _batch()
    three, _ = compute_loss("mail_trades", nat, adv, y, beta=5.0, burn_in=0, epoch=1)
    one, _ = compute_loss("mail_trades", nat, adv, y, beta=5.0, burn_in=0, epoch=1, mail_scale=1)
    ce = _ce(nat, y).mean()
    assert (three - ce).item() == pytest.approx(3 * (one - ce).item(), rel=1e-9)


def test_mail_burn_in_is_plain_trades() -> None:
    nat, adv, y = _batch()
    mail, _ = compute_loss("mail_trades", nat, adv, y, beta=5.0, burn_in=75, epoch=10)
    trades, _ = compute_loss("trades", nat, adv, y, beta=5.0)
    assert mail.item() == pytest.approx(trades.item(), rel=1e-12)
    after, _ = compute_loss("mail_trades", nat, adv, y, beta=5.0, burn_in=75, epoch=75)
    assert after.item() != pytest.approx(trades.item(), rel=1e-6)


@pytest.mark.parametrize("variant", ["weat_nat", "weat_adv"])
def test_weat(variant: str) -> None:
    nat, adv, y = _batch()
    loss, diag = compute_loss(variant, nat, adv, y, beta=6.0)
    energy = -torch.log(torch.exp(nat).sum(1))
    w = 1 / torch.log(1 + torch.exp(energy.abs()))  # Eq. 14
    ce = _ce(nat if variant == "weat_nat" else adv, y)
    expected = (w * ce).sum() / B + 6.0 * (w * _kl(nat, adv)).sum() / B
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)
    assert diag["mean_weight"].item() == pytest.approx(w.mean().item(), rel=1e-9)


def test_weat_mean_normalisation_and_none_shape() -> None:
    nat, adv, y = _batch()
    plain, _ = compute_loss("weat_nat", nat, adv, y, beta=6.0, weight_fn="none")
    trades, _ = compute_loss("trades", nat, adv, y, beta=6.0)
    assert plain.item() == pytest.approx(trades.item(), rel=1e-12)  # w = 1 is TRADES
    _, diag = compute_loss("weat_adv", nat, adv, y, normalize="mean")
    assert diag["mean_weight"].item() == pytest.approx(1.0, rel=1e-9)


def test_weights_carry_no_gradient() -> None:
    nat, adv, y = _batch()
    nat = nat.clone().requires_grad_(True)
    adv = adv.clone().requires_grad_(True)
    loss, _ = compute_loss("weat_nat", nat, adv, y, beta=6.0)
    (g_nat,) = torch.autograd.grad(loss, nat)
    # The same loss with the weights computed outside the graph as constants:
    with torch.no_grad():
        w = 1 / torch.nn.functional.softplus(torch.logsumexp(nat, 1).abs())
    nat2 = nat.detach().clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(nat2, y, reduction="none")
    lp, lq = torch.log_softmax(nat2, 1), torch.log_softmax(adv.detach(), 1)
    kl = (lp.exp() * (lp - lq)).sum(1)
    ref = (w * ce).mean() + 6.0 * (w * kl).mean()
    (g_ref,) = torch.autograd.grad(ref, nat2)
    assert torch.allclose(g_nat, g_ref, atol=1e-10)


def test_losses_are_finite_for_huge_logits() -> None:
    nat, adv, y = _batch()
    for name in METHODS.names():
        loss, _ = compute_loss(name, nat * 200, adv * 200, y)
        assert math.isfinite(loss.item()), name


def test_bad_inputs_name_the_problem() -> None:
    nat, adv, y = _batch()
    with pytest.raises(ConfigError, match="unknown method 'fgsm'.*known methods"):
        compute_loss("fgsm", nat, adv, y)
    with pytest.raises(ConfigError, match="gamma"):
        compute_loss("trades", nat, adv, y, gamma=1.0)
    with pytest.raises(ConfigError, match="beta"):
        compute_loss("trades", nat, adv, y, beta=-1.0)
    with pytest.raises(ConfigError, match="natural logits"):
        compute_loss("trades", None, adv, y)
