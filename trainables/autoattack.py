"""AutoAttack through ``pyautoattack`` (the reference attacks), behind one function.

``version="standard"`` runs APGD-CE, APGD-T, FAB-T and Square with the library's
standard settings; ``"plus"`` and ``"rand"`` are the library's other presets;
``version="custom"`` runs the ``attacks`` given, with the library's default settings
for each attack (e.g. APGD-CE and FAB with 5 restarts, Square with 5000 queries).

What the adapter adds around ``pyautoattack.AutoAttack``:

* the model runs in eval mode with its parameters frozen (FAB calls ``.backward()``,
  which would otherwise add to the parameters' ``.grad``); every submodule's mode
  and every parameter's ``requires_grad`` are restored afterwards;
* targeted attacks use at most ``num_classes - 1`` target classes (the library's
  9 would index past the logits below 10 classes); with a preset version, attacks
  that cannot run on so few classes are left out (APGD-T needs 4 classes, APGD-DLR
  3), with ``custom`` asking for one is a :class:`~trainables.errors.ConfigError`;
* the library's log (logger ``auto-attack``) stays quiet unless ``verbose``; its
  warnings (randomized defense, zero gradients, ...) are kept in the result;
* the library re-seeds the global RNGs with ``seed`` before every attack; the
  caller's RNG state is saved and restored, so evaluation does not change what a
  training run draws next. ``sys.settrace`` (the library's dynamic-defense check
  clears it, which would stop debuggers and coverage) is restored too.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainables.errors import ConfigError

#: Attack names that ``pyautoattack.AutoAttack.run_standard_evaluation`` accepts.
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
#: ``version`` values: the library's presets plus ``custom``.
VERSIONS = ("standard", "plus", "rand", "custom")
#: Threat models the library implements.
NORMS = ("Linf", "L2", "L1")
#: Fewest classes each attack can run on (the DLR losses index the sorted logits).
MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}

_LOGGER_NAME = "auto-attack"  # the logger pyautoattack writes to


@dataclass
class AutoAttackResult:
    """Outcome of an AutoAttack evaluation.

    Attributes:
        robust_acc: fraction (0 to 1) of the ``N`` points still classified correctly
            after every attack.
        clean_acc: fraction (0 to 1) classified correctly before the attacks.
        robust_mask: ``[N]`` bool, which points stayed correct after every attack
            (always a subset of the correctly classified clean points).
        x_adv: ``[N, C, H, W]`` adversarial points, on the device of ``x``; where no
            attack succeeded (or the point was misclassified already) it equals ``x``.
        attacks: the attacks that ran, in order (a preset can lose some on few classes).
        warnings: the library's warnings (e.g. points with zero gradient, a model that
            looks randomized), kept even when ``verbose`` is off.
    """

    robust_acc: float
    clean_acc: float
    robust_mask: Tensor
    x_adv: Tensor
    attacks: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


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
        model: a classifier mapping inputs in [0, 1] to logits ``[N, num_classes]``
            (logits, not probabilities; any normalization belongs inside the model).
        x: ``[N, C, H, W]`` float inputs in [0, 1]. They may stay on the CPU while the
            model runs on a GPU; batches are moved to ``device``.
        y: ``[N]`` integer labels in ``[0, num_classes)``.
        eps: radius of the threat model in input units (pixel values in [0, 1]):
            the largest per-pixel change for ``Linf``, the largest Euclidean / sum of
            absolute changes per image for ``L2`` / ``L1``.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.
        version: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square), ``"plus"``,
            ``"rand"`` (for randomized models: APGD-CE, APGD-DLR with EOT) or
            ``"custom"`` (then ``attacks`` lists the attacks to run).
        attacks: with ``version="custom"`` only, the attacks to run in order, from
            ``apgd-ce``, ``apgd-dlr``, ``apgd-t``, ``fab``, ``fab-t``, ``square``.
        batch_size: points per forward/attack batch. The library re-seeds before each
            batch, so another batch size can change which random starts a point gets.
        seed: seed the library gives the global RNGs before each attack (restarts,
            random starts, Square's sampling); the same seed gives the same result.
        device: where the model runs (default: the device of its first parameter or
            buffer, else that of ``x``). The model must already be there.
        verbose: let the library log its progress (logger ``auto-attack`` at DEBUG; a
            stderr handler is added for the call if no logging is configured).

    Returns:
        an :class:`AutoAttackResult`.

    Raises:
        ConfigError: an unknown ``norm``, ``version`` or attack name, ``attacks``
            without ``version="custom"`` (or none with it), ``eps <= 0``,
            ``batch_size < 1``, or a custom attack that needs more classes than
            the model has.
        ValueError: ``x`` and ``y`` do not match or are empty, ``x`` leaves [0, 1],
            a label is outside the model's classes, or the model gives fewer than 2
            logits per point.
    """
    run = _check_settings(eps, norm, version, attacks, batch_size)
    _check_data(x, y)
    if device is None:
        device = _model_device(model, x)
    device = torch.device(device)
    x = x.detach()
    y = y.detach().to(device=x.device, dtype=torch.long)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_frozen_eval(model))
        stack.enter_context(_saved_rng(device))
        stack.enter_context(_saved_trace())
        if device.type == "cuda":
            stack.enter_context(torch.cuda.device(device))
        log = stack.enter_context(_library_log(verbose))

        clean, num_classes = _clean_predictions(model, x, y, batch_size, device)
        x_adv, y_adv, ran = _run_library(
            model, x, y, run, eps, norm, version, batch_size, seed, device, num_classes, verbose
        )

    robust = y_adv.eq(y) & clean
    n = len(y)
    return AutoAttackResult(
        robust_acc=robust.sum().item() / n,
        clean_acc=clean.sum().item() / n,
        robust_mask=robust,
        x_adv=x_adv.detach(),
        attacks=tuple(ran),
        warnings=tuple(log),
    )


def _check_settings(
    eps: float, norm: str, version: str, attacks: Sequence[str] | None, batch_size: int
) -> list[str]:
    """Validate the settings; return the attacks a custom run asks for (else ``[]``)."""
    if norm not in NORMS:
        raise ConfigError(f"AutoAttack norm = {norm!r} is unknown; allowed: {', '.join(NORMS)}")
    if version not in VERSIONS:
        raise ConfigError(
            f"AutoAttack version = {version!r} is unknown; allowed: {', '.join(VERSIONS)}"
        )
    if isinstance(attacks, str):
        raise ConfigError(f"AutoAttack attacks must be a list of names, not the string {attacks!r}")
    if version != "custom":
        if attacks:
            raise ConfigError(
                f"AutoAttack attacks {list(attacks)} are only used with version 'custom', "
                f"not {version!r}"
            )
        run: list[str] = []
    else:
        if not attacks:
            raise ConfigError("AutoAttack version 'custom' needs a list of attacks")
        bad = [a for a in attacks if a not in ATTACKS]
        if bad:
            raise ConfigError(f"AutoAttack attack(s) {bad} unknown; allowed: {', '.join(ATTACKS)}")
        run = list(dict.fromkeys(attacks))  # the library would run a repeated name twice
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ConfigError(f"AutoAttack eps = {eps!r}; it must be a positive number")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"AutoAttack batch_size = {batch_size!r}; it must be at least 1")
    return run


def _check_data(x: Tensor, y: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"AutoAttack needs float inputs in [0, 1], got dtype {x.dtype}")
    if y.dim() != 1 or x.dim() < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"AutoAttack needs x [N, C, H, W] and y [N]; got x {tuple(x.shape)}, y {tuple(y.shape)}"
        )
    if y.shape[0] == 0:
        raise ValueError("AutoAttack needs at least one point")
    if y.is_floating_point():
        raise ValueError(f"AutoAttack needs integer labels, got dtype {y.dtype}")
    lo, hi = x.min().item(), x.max().item()
    if lo < 0 or hi > 1:
        raise ValueError(
            f"AutoAttack needs inputs in [0, 1] (the attacks clip to it), got [{lo:.4g}, "
            f"{hi:.4g}]; put any normalization inside the model"
        )


def _model_device(model: nn.Module, x: Tensor) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return x.device


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` for the call; each module's and
    parameter's own setting restored afterwards (not just the top-level flag)."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)


@contextlib.contextmanager
def _saved_rng(device: torch.device) -> Iterator[None]:
    """Restore the CPU RNG (and the CUDA RNGs the library may seed) afterwards."""
    devices: list[int] = []
    if device.type == "cuda" and torch.cuda.is_available():
        current = torch.cuda.current_device()
        devices = sorted({current, current if device.index is None else device.index})
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _saved_trace() -> Iterator[None]:
    """``checks.check_dynamic`` ends with ``sys.settrace(None)``; put the tracer back."""
    trace = sys.gettrace()
    try:
        yield
    finally:
        sys.settrace(trace)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _library_log(verbose: bool) -> Iterator[list[str]]:
    """Quiet the library's logger (or open it at DEBUG); yield its warnings."""
    logger = logging.getLogger(_LOGGER_NAME)
    old = (logger.level, logger.propagate)
    stream = None
    if verbose:
        logger.setLevel(logging.DEBUG)
        if not logger.hasHandlers():  # nothing configured: DEBUG lines would be dropped
            stream = logging.StreamHandler(sys.stderr)
            logger.addHandler(stream)
    else:
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    collect = _Collect()
    logger.addHandler(collect)
    try:
        yield collect.messages
    finally:
        logger.removeHandler(collect)
        if stream is not None:
            logger.removeHandler(stream)
        logger.setLevel(old[0])
        logger.propagate = old[1]


def _clean_predictions(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device
) -> tuple[Tensor, int]:
    """Which points the model gets right, and its number of classes."""
    correct = []
    num_classes = 0
    with torch.no_grad():
        for xb, yb in zip(torch.split(x, batch_size), torch.split(y, batch_size)):
            logits = model(xb.to(device))
            if logits.dim() != 2:
                raise ValueError(
                    f"AutoAttack needs logits [N, num_classes], got {tuple(logits.shape)}"
                )
            num_classes = logits.shape[1]
            correct.append(logits.argmax(1).to(y.device).eq(yb))
    if num_classes < 2:
        raise ValueError(f"AutoAttack needs at least 2 classes, the model gives {num_classes}")
    if y.min().item() < 0 or y.max().item() >= num_classes:
        raise ValueError(f"AutoAttack labels must lie in [0, {num_classes}), the model's classes")
    return torch.cat(correct), num_classes


def _run_library(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    run: list[str],
    eps: float,
    norm: str,
    version: str,
    batch_size: int,
    seed: int,
    device: torch.device,
    num_classes: int,
    verbose: bool,
) -> tuple[Tensor, Tensor, list[str]]:
    """Set up ``pyautoattack.AutoAttack`` for ``num_classes`` and run it.

    Returns the library's ``(x_adv, y_adv)`` (``y_adv``: the predicted label at
    ``x_adv``) and the attacks that ran."""
    from pyautoattack import AutoAttack

    too_few = [a for a in run if num_classes < MIN_CLASSES.get(a, 2)]
    if too_few:
        need = ", ".join(f"{a} needs {MIN_CLASSES[a]}" for a in too_few)
        raise ConfigError(
            f"AutoAttack attack(s) {too_few} cannot run on {num_classes} classes ({need})"
        )
    adversary = AutoAttack(
        model,
        attacks=run if version == "custom" else None,  # type: ignore[arg-type]
        device=device,
        eps=float(eps),
        norm=norm,  # type: ignore[arg-type]
        seed=seed,
        version=version,  # type: ignore[arg-type]
    )
    adversary.verbose = verbose
    # A preset keeps the attacks that can run on this many classes.
    adversary.attacks_to_run = [
        a for a in adversary.attacks_to_run if num_classes >= MIN_CLASSES.get(a, 2)
    ]
    # Targets are the 2nd..(k+1)th most likely classes: at most num_classes - 1 exist.
    targets = num_classes - 1
    adversary.apgd_targeted.n_target_classes = min(
        adversary.apgd_targeted.n_target_classes, targets
    )
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, targets)
    x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv, y_adv, list(adversary.attacks_to_run)
