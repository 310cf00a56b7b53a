"""Figure 1, attack-step efficiency, and the before/after of the speed options.

*Ours*: the real epoch loop (:func:`trainables.loop.train`) on ``n_batches`` full
batches per epoch; the time of a batch is the loop's own ``time/train_s`` of an
epoch after the first, divided by its batches (data gathering, augmentation and
the device-side bookkeeping included).

*Reference*: a bare loop in the style of the official TRADES code
(``trades.py`` of yaodongyu/TRADES), written here: it recomputes ``model(x)`` at
every attack step (inside ``enable_grad``) and twice more in the loss, same
model, optimiser, learning rate, batches and data pipeline.

*Floor* (the issue's definition, the target): (K+1) timed input-gradient passes
(eval mode, forward + gradient with respect to the input) plus one timed plain
training step (train-mode forward of the B images, cross-entropy, backward, SGD
step) of the same model and batch, no data loading.

*TRADES floor* (for the profile of the gap): the passes TRADES itself cannot
avoid, timed bare: one no-grad forward for p(·|x), K input-gradient passes, and
one TRADES training step (train-mode forwards of x and x*, the loss, one
backward through both B-image graphs, SGD step).

Ours, the reference and the floors are run alternately, ``repeats`` rounds
after one warm-up round; medians are reported.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import alternate, cifar_jpeg, median
from trainables.config import TrainConfig
from trainables.data import iterate_batches
from trainables.loop import lr_at, train
from trainables.models import create_model

BATCH = 128
K = 10


def base_config(n_batches: int, epochs: int, **extra: Any) -> TrainConfig:
    """TRADES (K = 10, ε = 8/255, α = 2/255) on the CIFAR-10 JPEG folder, small CNN,
    ``n_batches`` full batches per epoch and next to no evaluation."""
    return TrainConfig.from_dict(
        {
            "method": "trades",
            "beta": 6.0,
            "model": "small_cnn",
            "dataset": "imagefolder",
            "data_root": "unused (data passed in)",
            "batch_size": BATCH,
            "attack_steps": K,
            "train_subset": BATCH * n_batches,
            "epochs": epochs,
            "val_subset": 1,
            "val_attack_steps": 0,
            "test_subset": 1,
            "eval_steps": 0,
            "autoattack": False,
            "seed": 0,
            **extra,
        }
    )


def ours_batch_seconds(cfg: TrainConfig, data, skip_epochs: int = 1) -> tuple[float, list[float]]:
    """Median seconds per batch of the loop's epochs after ``skip_epochs`` (and all epochs)."""
    from trainables.data import num_batches

    # train() applies train_subset only when it loads the data itself
    data = dataclasses.replace(data, train=data.train.subset(cfg.train_subset, cfg.split_seed))
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as tmp:
        result = train(cfg, output_dir=tmp, data=data)
    n = num_batches(len(data.train), cfg.batch_size)
    per_epoch = [h["time/train_s"] / n for h in result.history]
    return median(per_epoch[skip_epochs:]), per_epoch


def trades_reference_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    data,
    epoch: int,
    step: int,
    total_steps: int,
) -> tuple[float, int]:
    """One epoch of the official-TRADES-style loop; returns (seconds per batch, step)."""
    criterion_kl = nn.KLDivLoss(reduction="sum")  # size_average=False in the original
    eps, step_size, beta = cfg.eps, cfg.step_size, 6.0
    train_data = data.train.subset(cfg.train_subset, cfg.split_seed)
    t0, n = time.perf_counter(), 0
    for x_natural, y in iterate_batches(
        train_data, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch, augment=data.augment
    ):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg)
        # --- trades_loss(), as in the official code ---
        model.eval()
        batch_size = len(x_natural)
        x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
        for _ in range(cfg.attack_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = criterion_kl(
                    F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
                )
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x_natural - eps), x_natural + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        model.train()
        x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
        optimizer.zero_grad()
        logits = model(x_natural)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / batch_size) * criterion_kl(
            F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1)
        )
        loss = loss_natural + beta * loss_robust
        loss.backward()
        optimizer.step()
        step += 1
        n += 1
    return (time.perf_counter() - t0) / max(n, 1), step


def floor_seconds(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """(K+1) input-gradient passes plus one plain training step, timed."""
    model.eval()
    t0 = time.perf_counter()
    for _ in range(K + 1):
        xr = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(xr), y, reduction="sum")
        torch.autograd.grad(loss, xr)
    t_grad = time.perf_counter() - t0
    model.train()
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    return t_grad + time.perf_counter() - t1


def trades_floor_seconds(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """p(·|x) once, K input-gradient passes and one TRADES training step, timed bare."""
    from trainables.methods import compute_loss

    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        logp = F.log_softmax(model(x), dim=1)
    x_adv = x
    for _ in range(K):
        xr = x_adv.detach().requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(xr), dim=1), logp, reduction="sum", log_target=True)
        (grad,) = torch.autograd.grad(loss, xr)
        x_adv = xr.detach()  # the same point again: no projection, pure passes
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, _ = compute_loss("trades", model(x), model(x_adv), y, beta=6.0)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - t0


def breakdown(data, repeats: int, profiled_batches: int = 5) -> dict[str, Any]:
    """Where a batch of ours goes, each piece timed bare and alternately (milliseconds).

    The pieces are those of the loop: the training attack (p(·|x) once + K steps
    with projection), the TRADES training step (two train-mode forwards, loss,
    one backward, SGD step), one batch from memory; and the floor's pieces: (K+1)
    input-gradient passes, one plain training step. A torch.profiler table of
    the operators (self CPU time per batch) for ours and the floor goes with it.
    """
    from torch.profiler import ProfilerActivity, profile

    from trainables.attacks import PGD
    from trainables.methods import compute_loss

    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=data.num_classes, in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = next(iterate_batches(data.train, BATCH, shuffle=True, seed=2, epoch=0))
    attack = PGD(8 / 255, 2 / 255, K, objective="kl", start="normal")
    x_adv = attack(model, x, y)

    def t_attack() -> float:
        t = time.perf_counter()
        attack(model, x, y)
        return time.perf_counter() - t

    def t_trades_step() -> float:
        model.train()
        t = time.perf_counter()
        loss, _ = compute_loss("trades", model(x), model(x_adv), y, beta=6.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    def t_batch() -> float:
        it = iterate_batches(data.train, BATCH, shuffle=True, seed=0, epoch=0, augment="crop_flip")
        t = time.perf_counter()
        for _ in range(10):
            next(it)
        return (time.perf_counter() - t) / 10

    def t_input_grads() -> float:
        model.eval()
        t = time.perf_counter()
        for _ in range(K + 1):
            xr = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
        return time.perf_counter() - t

    def t_plain_step() -> float:
        model.train()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    times = alternate(
        {
            "attack (p(x) + K steps)": t_attack,
            "TRADES training step": t_trades_step,
            "one batch from memory": t_batch,
            "(K+1) input-gradient passes": t_input_grads,
            "plain training step": t_plain_step,
        },
        repeats,
    )
    ms = {k: 1000 * median(v) for k, v in times.items()}

    def top_ops(fn, n_batches: int = profiled_batches, rows: int = 8) -> list[tuple[str, float]]:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(n_batches):
                fn()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        return [(e.key, e.self_cpu_time_total / 1000 / n_batches) for e in events[:rows]]

    return {
        "ms": ms,
        "ours_ms": ms["attack (p(x) + K steps)"]
        + ms["TRADES training step"]
        + ms["one batch from memory"],
        "floor_ms": ms["(K+1) input-gradient passes"] + ms["plain training step"],
        "profile_ours_ms_per_batch": top_ops(lambda: (t_attack(), t_trades_step())),
        "profile_floor_ms_per_batch": top_ops(lambda: (t_input_grads(), t_plain_step())),
    }


def run(quick: bool) -> dict[str, Any]:
    data = cifar_jpeg()
    # quick: a smoke test (4 batches, 1 timed epoch, 1 round), not the figure; 8 steps in
    # all, the fewest the onecycle schedule takes (its rise must span 2 steps)
    n_batches, epochs = (4, 2) if quick else (12, 4)
    repeats = 1 if quick else 7
    cfg = base_config(n_batches, epochs)

    ref_model = create_model("small_cnn", num_classes=data.num_classes, in_channels=3)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    ref_state = {"step": 0, "epoch": 0}
    total = 10**6  # the learning rate stays near zero: timing only

    floor_model = create_model("small_cnn", num_classes=data.num_classes, in_channels=3)
    floor_opt = torch.optim.SGD(floor_model.parameters(), lr=0.0, momentum=0.9)
    x, y = next(iterate_batches(data.train, BATCH, shuffle=True, seed=1, epoch=0))

    ours_epochs: list[list[float]] = []

    def ours() -> float:
        t, per_epoch = ours_batch_seconds(cfg, data)
        ours_epochs.append(per_epoch)
        return t

    def reference() -> float:
        times = []
        for _ in range(epochs - 1):
            t, ref_state["step"] = trades_reference_epoch(
                ref_model, ref_opt, cfg, data, ref_state["epoch"], ref_state["step"], total
            )
            ref_state["epoch"] += 1
            times.append(t)
        return median(times)

    def floor() -> float:
        return median(floor_seconds(floor_model, floor_opt, x, y) for _ in range(n_batches))

    def trades_floor() -> float:
        return median(trades_floor_seconds(floor_model, floor_opt, x, y) for _ in range(n_batches))

    times = alternate(
        {"ours": ours, "reference": reference, "floor": floor, "trades_floor": trades_floor},
        repeats,
    )
    t_ours, t_ref, t_floor = (median(times[k]) for k in ("ours", "reference", "floor"))
    t_trades_floor = median(times["trades_floor"])
    paired = [r / o for r, o in zip(times["reference"], times["ours"])]
    return {
        "setup": {
            "method": "trades",
            "K": K,
            "model": "small_cnn",
            "batch": BATCH,
            "data": "CIFAR-10 JPEG folder (32x32x3), crop+flip",
            "batches_per_epoch": n_batches,
            "epochs_per_run": epochs,
            "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            "smoke": quick,
        },
        "ours_batch_s": t_ours,
        "reference_batch_s": t_ref,
        "floor_batch_s": t_floor,
        "speedup_vs_reference": t_ref / t_ours,
        "speedup_vs_reference_paired": paired,
        "ours_over_floor": t_ours / t_floor,
        "trades_floor_batch_s": t_trades_floor,
        "ours_over_trades_floor": t_ours / t_trades_floor,
        "raw_s": times,
        "ours_per_epoch_s": ours_epochs,
        "breakdown": breakdown(data, 2, 1) if quick else breakdown(data, 20),
        "targets": {
            "speedup_vs_reference": {"target": ">= 1.2", "met": t_ref / t_ours >= 1.2},
            "ours_over_floor": {"target": "<= 1.1", "met": t_ours / t_floor <= 1.1},
        },
    }


def passes_per_batch() -> dict[str, Any]:
    """Forward/backward passes per batch (B images each), counted, not timed."""
    return {
        "ours": {"forward": K + 3, "input_grad_backward": K, "train_backward": 2},
        "reference": {"forward": 2 * K + 3, "input_grad_backward": K, "train_backward": 3},
        "floor": {"forward": K + 2, "input_grad_backward": K + 1, "train_backward": 1},
        "trades_floor": {"forward": K + 3, "input_grad_backward": K, "train_backward": 2},
        "note": (
            "ours: p(x) once + K attack forwards + train-mode forwards of x and x*; "
            "reference: model(x) again at every attack step and twice in the loss; "
            "train_backward counts B-image graphs the training backward runs through"
        ),
    }
