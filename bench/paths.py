"""The code paths of the issue, each measured before (option off) and after (on).

Every row times the real epoch loop on the figure-1 workload (TRADES K = 10,
small CNN, CIFAR-10 JPEG folder, batch 128), alternating the variants in the
same process: seconds per batch of the epochs after the first.

* ``channels_last`` and ``precision: bf16`` (autocast) are off on the CPU by
  default; here they are forced on to measure what they do on this CPU.
* ``compile``: ``torch.compile`` of the model; the first epoch pays the
  compilation, reported separately.
* PGD ℓ∞ step: before, the step and projection as seven out-of-place element-wise
  ops (``x + clamp(x_adv + α·sign(g) - x, -ε, ε)`` then ``clamp(0, 1)``); after,
  ``add_``, ``sign_`` and one ``clamp_`` against the ball-and-box bounds computed
  once per batch. Timed on the figure-1 attack (KL, K = 10, batch 128).
* Bookkeeping: the per-batch accumulation before (a tensor built from the batch
  size, ``y.new_tensor(B)``: on CUDA a host-to-device copy that waits for the
  GPU) and after (the batch size stays a host integer).
* Data: time to iterate one epoch of batches (gather, to float, crop + flip)
  against the epoch's training time.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.attack_step import base_config as fig1_config
from bench.attack_step import ours_batch_seconds
from bench.common import GUARD, alternate, cifar_jpeg, median
from trainables.attacks import PGD
from trainables.data import iterate_batches


class _PGDBefore(PGD):
    """The ℓ∞ step as it was before (kept here to measure the change)."""

    def __call__(self, model, x, y):
        was_training = model.training
        model.eval()
        try:
            x = x.detach()
            with torch.no_grad():
                logp_nat = F.log_softmax(model(x).float(), dim=1)
            x_adv = self._start(x)
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv).float()
                loss = F.kl_div(
                    F.log_softmax(logits, dim=1), logp_nat, reduction="sum", log_target=True
                )
                (grad,) = torch.autograd.grad(loss, x_adv)
                with torch.no_grad():
                    step = self.alpha * grad.sign()
                    x_adv = self._project(x_adv.detach() + step, x)
            return x_adv.detach()
        finally:
            model.train(was_training)


def _pgd_step(data, repeats: int, per_timing: int = 3) -> dict[str, float]:
    """Seconds per attack (KL, K = 10, batch 128) with the ℓ∞ step before and after."""
    from trainables.models import create_model

    model = create_model("small_cnn", num_classes=10, in_channels=3)
    x, y = next(iterate_batches(data.train, 128, shuffle=True, seed=3, epoch=0))
    args = (8 / 255, 2 / 255, 10)
    before = _PGDBefore(*args, objective="kl", start="normal")
    after = PGD(*args, objective="kl", start="normal")

    def timed_attack(attack) -> float:
        t = time.perf_counter()
        for _ in range(per_timing):
            attack(model, x, y)
        return (time.perf_counter() - t) / per_timing

    times = alternate(
        {"before": lambda: timed_attack(before), "after": lambda: timed_attack(after)}, repeats
    )
    return {k: median(v) for k, v in times.items()}


def _bookkeeping(repeats: int, n: int = 2000) -> dict[str, float]:
    """Seconds per batch of the two ways to accumulate the epoch sums (CPU)."""
    y = torch.randint(0, 10, (128,))
    logits = torch.randn(128, 10)
    loss = torch.tensor(1.0)

    def before() -> float:
        sums = torch.zeros(5)
        t = time.perf_counter()
        for _ in range(n):
            b = y.new_tensor(y.shape[0], dtype=torch.float32)
            sums += torch.stack(
                [loss * b, (logits.argmax(1) == y).sum(), b * 0, b.new_ones(()) * b, b]
            ).float()
        return (time.perf_counter() - t) / n

    def after() -> float:
        sums = torch.zeros(4)
        zero, one, count = sums.new_zeros(()), sums.new_ones(()), 0
        t = time.perf_counter()
        for _ in range(n):
            b = y.shape[0]
            count += b
            sums += torch.stack([loss * b, (logits.argmax(1) == y).sum(), zero, one * b]).float()
        return (time.perf_counter() - t) / n

    times = alternate({"before": before, "after": after}, repeats)
    return {k: median(v) for k, v in times.items()}


def run(quick: bool) -> dict[str, Any]:
    data = cifar_jpeg()
    # quick: a smoke test (4 batches, 1 timed epoch, 1 round), not the figure (8 steps:
    # the fewest the onecycle schedule takes)
    n_batches, epochs = (4, 2) if quick else (10, 4)
    repeats = 1 if quick else 5
    variants = {
        "default (fp32, NCHW, eager)": {},
        "channels_last": {"channels_last": True},
        "bf16 autocast": {"precision": "bf16"},
    }
    runs = {
        name: (
            lambda extra=extra: ours_batch_seconds(fig1_config(n_batches, epochs, **extra), data)[0]
        )
        for name, extra in variants.items()
    }
    times = alternate(runs, repeats)
    base = median(times["default (fp32, NCHW, eager)"])
    rows = {name: {"batch_s": median(t), "speedup": base / median(t)} for name, t in times.items()}

    # torch.compile: the first epoch compiles; the steady state is what the option buys
    compile_runs: dict[str, list[float]] = {"eager": [], "compile": []}
    first_epoch: list[float] = []
    for _ in range(1 if quick else 2):
        GUARD.wait()
        torch._dynamo.reset()  # a fresh cache per run (new model objects otherwise recompile)
        with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
            # a cold compilation: no kernels from earlier runs on this machine
            old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
            try:
                t, per_epoch = ours_batch_seconds(
                    fig1_config(n_batches, epochs, compile=True), data
                )
            finally:
                if old is None:
                    os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
                else:
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
        compile_runs["compile"].append(t)
        first_epoch.append(per_epoch[0] * n_batches)
        compile_runs["eager"].append(ours_batch_seconds(fig1_config(n_batches, epochs), data)[0])
    eager, compiled = median(compile_runs["eager"]), median(compile_runs["compile"])
    rows["torch.compile"] = {
        "batch_s": compiled,
        "speedup": eager / compiled,
        "eager_batch_s": eager,
        "first_epoch_s": median(first_epoch),
        "compile_overhead_s": median(first_epoch) - compiled * n_batches,
    }

    # data: one epoch of batches from memory (full training set) vs the epoch's training
    train = data.train
    t_data = []
    GUARD.wait()
    for r in range(1 if quick else 3):
        t = time.perf_counter()
        for _ in iterate_batches(train, 128, shuffle=True, seed=0, epoch=r, augment=data.augment):
            pass
        t_data.append(time.perf_counter() - t)
    n_full = -(-len(train) // 128)
    epoch_train_s = base * n_full
    return {
        "setup": {
            "workload": "figure 1 (TRADES K=10, small_cnn, batch 128, CIFAR-10 JPEG)",
            "batches_per_epoch": n_batches,
            "epochs_per_run": epochs,
            "repeats": repeats,
            "smoke": quick,
        },
        "options": rows,
        "raw_s": {**times, **{f"compile/{k}": v for k, v in compile_runs.items()}},
        "bookkeeping_s_per_batch": _bookkeeping(1, 200) if quick else _bookkeeping(3),
        "pgd_linf_attack_s": _pgd_step(data, 1, 1) if quick else _pgd_step(data, 10),
        "data": {
            "epoch_iterate_s": median(t_data),
            "epoch_train_s_estimate": epoch_train_s,
            "share": median(t_data) / epoch_train_s,
            "images": len(train),
        },
    }
