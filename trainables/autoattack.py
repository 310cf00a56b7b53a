"""AutoAttack through ``pyautoattack`` (the reference attacks), behind one function.

``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square as the library
defines them; ``version="custom"`` runs the ``attacks`` given. The model runs in
eval mode on its own device; the library's log output stays quiet unless
``verbose``. Targeted attacks use at most ``num_classes - 1`` target classes, so
datasets with fewer than 10 classes work; APGD-T (targeted DLR loss, which
needs 4 classes) is left out below 4 classes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainables.errors import ConfigError

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
VERSIONS = ("standard", "plus", "rand", "custom")
NORMS = ("Linf", "L2", "L1")


@dataclass
class AutoAttackResult:
    """Outcome of an AutoAttack evaluation.

    Attributes:
        robust_acc: fraction of points still classified correctly after every attack.
        clean_acc: fraction classified correctly before the attacks.
        robust_mask: ``[N]`` bool, which points stayed correct.
        x_adv: ``[N, C, H, W]`` the adversarial points (the input where no attack succeeded).
    """

    robust_acc: float
    clean_acc: float
    robust_mask: Tensor
    x_adv: Tensor


def autoattack_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float = 8 / 255,
    norm: str = "Linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    verbose: bool = False,
) -> AutoAttackResult:
    """Robust accuracy of ``model`` on ``(x, y)`` under AutoAttack.

    Args:
        model: a classifier taking inputs in [0, 1] and returning logits.
        x: ``[N, C, H, W]`` float inputs in [0, 1].
        y: ``[N]`` int64 labels.
        eps: radius of the threat model (ℓ∞: per pixel; ℓ2/ℓ1: per image).
        norm: ``Linf``, ``L2`` or ``L1``.
        version: ``standard`` (APGD-CE, APGD-T, FAB-T, Square), ``plus``, ``rand`` or
            ``custom`` (then ``attacks`` lists the attacks to run).
        attacks: attack names for ``custom``: ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``,
            ``fab-t``, ``square``.
        batch_size: points per attack batch.
        seed: seed of the attacks' random restarts.
        device: where to run (default: the model's device).
        verbose: let the library log its progress.
    """
    from pyautoattack import AutoAttack

    if norm not in NORMS:
        raise ConfigError(f"AutoAttack norm = {norm!r}; allowed: {', '.join(NORMS)}")
    if version not in VERSIONS:
        raise ConfigError(f"AutoAttack version = {version!r}; allowed: {', '.join(VERSIONS)}")
    if version == "custom":
        if not attacks:
            raise ConfigError("AutoAttack version 'custom' needs a list of attacks")
        bad = [a for a in attacks if a not in ATTACKS]
        if bad:
            raise ConfigError(f"AutoAttack attack(s) {bad} unknown; allowed: {', '.join(ATTACKS)}")
    elif attacks:
        raise ConfigError(
            f"AutoAttack attacks are only used with version 'custom', not {version!r}"
        )
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)

    was_training = model.training
    model.eval()
    logger = logging.getLogger("auto-attack")
    old_level = logger.level
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    try:
        adversary = AutoAttack(
            model,
            attacks=list(attacks) if version == "custom" else None,
            device=device,
            eps=eps,
            norm=norm,  # type: ignore[arg-type]
            seed=seed,
            version=version,  # type: ignore[arg-type]
        )
        adversary.verbose = verbose
        with torch.no_grad():
            num_classes = model(x[:1].to(device)).shape[1]
        targets = max(1, num_classes - 1)
        adversary.apgd_targeted.n_target_classes = min(
            adversary.apgd_targeted.n_target_classes, targets
        )
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, targets)
        if num_classes < 4 and "apgd-t" in adversary.attacks_to_run:
            # The targeted DLR loss needs 4 classes; the library would fail inside it.
            adversary.attacks_to_run = [a for a in adversary.attacks_to_run if a != "apgd-t"]
        x, y = x.to(device), y.to(device)
        x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        with torch.no_grad():
            clean = torch.cat([model(xb).argmax(1) for xb in torch.split(x, batch_size)]).eq(y)
        robust = y_adv.eq(y)
    finally:
        logger.setLevel(old_level)
        model.train(was_training)
    n = max(len(y), 1)
    return AutoAttackResult(
        robust_acc=robust.sum().item() / n,
        clean_acc=clean.sum().item() / n,
        robust_mask=robust.cpu(),
        x_adv=x_adv.detach(),
    )
