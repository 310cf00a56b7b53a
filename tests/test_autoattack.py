"""The AutoAttack adapter runs the reference attacks on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.autoattack import autoattack_accuracy
from trainables.errors import ConfigError


class Blind(nn.Module):
    """Ignores its input: every point gets the same logits (robust by construction)."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(k, dtype=torch.float32))

    def forward(self, x):
        return self.bias.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


def _linear_task(n: int = 32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point is classified correctly at first
    return model, x, y


def test_undefended_model_loses_accuracy_and_points_stay_in_ball() -> None:
    model, x, y = _linear_task()
    model.train()
    res = autoattack_accuracy(
        model, x, y, eps=0.3, version="custom", attacks=["apgd-ce", "apgd-t"], seed=0
    )
    assert model.training, "train mode restored"
    assert res.clean_acc == 1.0
    assert res.robust_acc < res.clean_acc
    assert res.robust_mask.shape == (32,) and res.robust_mask.dtype == torch.bool
    assert res.robust_acc == pytest.approx(res.robust_mask.float().mean().item())
    assert (res.x_adv - x).abs().max() <= 0.3 + 1e-6
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1


def test_standard_version_on_few_classes_and_a_blind_model() -> None:
    model = Blind(k=3)
    x = torch.rand(8, 1, 8, 8)
    y = torch.full((8,), 2)  # the blind model always says 2
    res = autoattack_accuracy(model, x, y, eps=8 / 255, version="standard", batch_size=8)
    assert res.clean_acc == res.robust_acc == 1.0


def test_bad_settings() -> None:
    model, x, y = _linear_task(4)
    with pytest.raises(ConfigError, match="unknown; allowed"):
        autoattack_accuracy(model, x, y, version="custom", attacks=["cw"])
    with pytest.raises(ConfigError, match="norm"):
        autoattack_accuracy(model, x, y, norm="L3")
    with pytest.raises(ConfigError, match="only used with version 'custom'"):
        autoattack_accuracy(model, x, y, attacks=["apgd-ce"])
