"""One training run, top to bottom: data, model, attack, loss, step, evaluate, checkpoint.

Reads like CleanRL: the algorithm's lines are in :func:`train`'s batch loop,
the bookkeeping around them. Nothing here knows about Ray or MLflow: metrics
go to a :class:`~trainables.reporting.Reporter`.

Per batch (adversarial methods): the training attack (model in eval mode),
one train-mode forward of ``x`` (if the method uses it) and of ``x*``, the
method's loss, one backward, one SGD step, one learning-rate update. Running
sums stay on the device; they are read once per epoch (no host sync in the
inner loop).

Speed options (config keys ``precision``, ``channels_last``, ``compile``): the
training attack and training step may run under bf16 autocast, the model in
channels_last format and through ``torch.compile``; evaluation always runs in
fp32. Datasets stay in host memory as tensors (no loader processes); on CUDA
each batch is gathered there, pinned and copied asynchronously.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from trainables.attacks import PGD
from trainables.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainables.config import TrainConfig
from trainables.data import (
    DataBundle,
    TensorData,
    iterate_batches,
    load_data,
    num_batches,
    to_float,
)
from trainables.energy import joint_energy, marginal_energy
from trainables.errors import CheckpointError, TrainingDiverged
from trainables.methods import METHODS, compute_loss, method_hparams
from trainables.models import accelerate, create_model
from trainables.reporting import NullReporter, Reporter

#: Config keys that may differ between a checkpoint and the run resuming it.
RUNTIME_KEYS = frozenset(
    {
        "device",
        "num_threads",
        "output_dir",
        "aa_n",
        "aa_version",
        "aa_attacks",
        "test_subset",
        "precision",
        "channels_last",
        "compile",
    }
)


@dataclass
class TrainResult:
    """What a finished run hands back.

    Attributes:
        output_dir: folder with ``config.yaml``, ``metrics.jsonl``, ``final.json``,
            ``energies.npz`` and ``checkpoints/{last,best}.pt``.
        best_epoch: epoch (from 1) with the best ``val/pgd_acc``.
        history: per-epoch metric dicts, in order.
        test_metrics: final test metrics of the best checkpoint.
    """

    output_dir: Path
    best_epoch: int
    history: list[dict[str, float]]
    test_metrics: dict[str, float]
    artifacts: dict[str, Path] = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from trainables.errors import ConfigError

        raise ConfigError("device = 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training attack and step (None = fp32).

    ``auto`` is bf16 on CUDA devices that support it, for methods whose numerics
    allow it (``MethodSpec.bf16``), and fp32 on the CPU; ``bf16`` asks for it on
    any device (CPU autocast works too; whether it pays depends on the CPU's bf16
    support, see bench/README.md).
    """
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and METHODS.get(cfg.method).bf16 and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """``channels_last`` as set, or by default on for CUDA and off on the CPU."""
    return device.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)


def precision_context(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device`` (a no-op context for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate after ``step`` of ``total_steps`` optimiser steps.

    ``onecycle``: linear from 0 to ``lr_max`` over the first 40% of steps, then
    linear to 0 (the cyclic schedule of the paper's code, stepped per batch).
    """
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if cfg.lr_schedule == "onecycle":
        return float(np.interp(t, [0.0, 0.4, 1.0], [0.0, cfg.lr_max, 0.0]))
    if cfg.lr_schedule == "cosine":
        return cfg.lr_max * 0.5 * (1.0 + math.cos(math.pi * t))
    return cfg.lr_max


def training_attack(cfg: TrainConfig) -> PGD | None:
    """The attack a method trains against (None for ``standard``)."""
    spec = METHODS.get(cfg.method)
    if spec.attack_loss is None:
        return None
    return PGD(
        eps=cfg.eps,
        alpha=cfg.step_size,
        steps=cfg.attack_steps,
        norm=cfg.norm,
        objective=spec.attack_loss,
        start=spec.attack_start,
    )


def eval_attack(cfg: TrainConfig, steps: int) -> PGD:
    """Untargeted PGD-CE with a uniform random start (evaluation)."""
    return PGD(eps=cfg.eps, alpha=cfg.eval_step_size, steps=steps, norm=cfg.norm)


def evaluate(
    model: nn.Module,
    data: TensorData,
    attack: PGD | None,
    *,
    batch_size: int,
    device: torch.device,
    keep_samples: bool = False,
) -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """Clean and adversarial accuracy and energies of ``model`` on ``data`` (eval mode).

    Returns:
        ``(metrics, samples)``: metrics ``clean_acc``, ``pgd_acc``, ``energy_nat``
        (mean E(x)), ``energy_adv`` (mean E(x*)), ``delta_energy`` (mean of
        E(x) − E(x*)), ``delta_energy_std``, ``delta_energy_joint`` (mean of
        E(x, y) − E(x*, y)); ``samples`` holds per-sample arrays when asked for.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(7, dtype=torch.float64, device=device)
    kept: dict[str, list[Tensor]] = {}
    n = len(data)
    pin = device.type == "cuda"
    batches = iterate_batches(
        data, batch_size, shuffle=False, seed=0, epoch=0, device=device, pin_memory=pin
    )
    for x, y in batches:
        with torch.no_grad():
            logits = model(x)
        if attack is not None:
            x_adv = attack(model, x, y)
            with torch.no_grad():
                logits_adv = model(x_adv)
        else:
            logits_adv = logits
        e_nat, e_adv = marginal_energy(logits), marginal_energy(logits_adv)
        ej_nat, ej_adv = joint_energy(logits, y), joint_energy(logits_adv, y)
        pred, pred_adv = logits.argmax(1), logits_adv.argmax(1)
        delta = e_nat - e_adv
        sums += torch.stack(
            [
                (pred == y).sum(),
                (pred_adv == y).sum(),
                e_nat.sum(),
                e_adv.sum(),
                delta.sum(),
                (delta.double() ** 2).sum(),
                (ej_nat - ej_adv).sum(),
            ]
        ).double()
        if keep_samples:
            for k, v in (
                ("y", y),
                ("pred_nat", pred),
                ("pred_adv", pred_adv),
                ("energy_nat", e_nat),
                ("energy_adv", e_adv),
                ("joint_energy_nat", ej_nat),
                ("joint_energy_adv", ej_adv),
            ):
                kept.setdefault(k, []).append(v.detach())  # read once, at the end
    model.train(was_training)
    s = (sums / max(n, 1)).tolist()
    var = max(s[5] - s[4] ** 2, 0.0)
    metrics = {
        "clean_acc": s[0],
        "pgd_acc": s[1],
        "energy_nat": s[2],
        "energy_adv": s[3],
        "delta_energy": s[4],
        "delta_energy_std": math.sqrt(var),
        "delta_energy_joint": s[6],
    }
    samples = {k: torch.cat(v).cpu().numpy() for k, v in kept.items()} if keep_samples else None
    return metrics, samples


def _write_config(cfg: TrainConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def train(
    cfg: TrainConfig,
    *,
    reporter: Reporter | None = None,
    output_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
    data: DataBundle | None = None,
    rank: int = 0,
    world_size: int = 1,
    wrap_model: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainResult:
    """Train one model with ``cfg``, evaluate it, and return the result.

    Args:
        cfg: the validated run configuration.
        reporter: receives per-epoch metrics (with the epoch's checkpoint path)
            and the final test metrics; defaults to none.
        output_dir: where to write; defaults to ``cfg.output_dir``.
        resume: a checkpoint written by an earlier call with the same config; the
            run continues after its epoch and ends exactly as an uninterrupted run
            would (bit for bit on the CPU).
        progress: show a progress bar over batches (stderr).
        data: an already loaded dataset bundle (else loaded from ``cfg``).
        rank, world_size: this worker's place in a data-parallel group (each rank
            trains on its shard of every epoch; only rank 0 writes files and runs
            the final test evaluation).
        wrap_model: wraps the model for the training forward pass (e.g. in
            ``DistributedDataParallel``); attacks and evaluation use the bare model.
    """
    reporter = reporter or NullReporter()
    out = Path(output_dir or cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    # --- set-up -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_data(
            cfg.dataset,
            cfg.data_root,
            val_fraction=cfg.val_fraction,
            val_npz=cfg.val_npz,
            split_seed=cfg.split_seed,
            download=cfg.download,
            augment=cfg.augment,
            train_subset=cfg.train_subset,
        )
    model = create_model(
        cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, **cfg.model_kwargs
    ).to(device)
    # speed options: `fast` shares the model's parameters (checkpoints come from `model`)
    channels_last = use_channels_last(cfg, device)
    fast = accelerate(model, channels_last=channels_last, compile=cfg.compile)
    net = fast
    if wrap_model is not None:
        net = accelerate(wrap_model(model), channels_last=channels_last, compile=cfg.compile)
    amp = autocast_dtype(cfg, device)
    pin = device.type == "cuda"
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    writer = rank == 0
    steps_per_epoch = num_batches(len(data.train), cfg.batch_size, world_size=world_size)
    total_steps = cfg.epochs * steps_per_epoch
    attack = training_attack(cfg)
    val_attack = eval_attack(cfg, cfg.val_attack_steps)
    val_data = data.val.subset(cfg.val_subset, seed=cfg.split_seed)
    spec = METHODS.get(cfg.method)
    hparams = cfg.method_hparams()
    method_hparams(cfg.method, hparams)  # validate once, before the first batch

    start_epoch, step = 0, 0
    history: list[dict[str, float]] = []
    best_epoch, best_score = 0, -math.inf
    if resume is not None:
        state = load_checkpoint(resume, map_location=device)
        _check_resumable(state, cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["schedule"]["step"])
        start_epoch = int(state["epoch"])
        history = list(state["history"])
        best_epoch, best_score = int(state["best"]["epoch"]), float(state["best"]["score"])
        set_rng_state(state["rng"])
    if writer:
        _write_config(cfg, out)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="batch", leave=False, dynamic_ncols=True)

    if resume is not None and start_epoch >= cfg.epochs and history:
        # the run had finished its epochs: say its last epoch again, so that a
        # reporter that joined late (a restarted trial) still sees the metrics
        last_epoch = {k: v for k, v in history[-1].items() if k != "epoch"}
        reporter.report(cfg.epochs, last_epoch, Path(resume) if writer else None)

    # --- epochs ---------------------------------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        sums = torch.zeros(4, device=device)  # loss·B, correct nat, correct adv, weight·B
        zero, one, count = sums.new_zeros(()), sums.new_ones(()), 0
        batches = iterate_batches(
            data.train,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            epoch=epoch,
            device=device,
            augment=data.augment,
            rank=rank,
            world_size=world_size,
            pin_memory=pin,
        )
        for x, y in batches:
            lr = lr_at(step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # the algorithm: attack, forward, loss, step
            with precision_context(amp, device):
                x_adv = attack(fast, x, y) if attack is not None else None
                logits_nat = net(x).float() if spec.needs_nat else None
                logits_adv = net(x_adv).float() if x_adv is not None else None
            loss, diag = compute_loss(cfg.method, logits_nat, logits_adv, y, **hparams, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

            # bookkeeping, on the device (the batch size is known on the host)
            b = y.shape[0]
            count += b
            with torch.no_grad():
                sums += torch.stack(
                    [
                        loss.detach() * b,
                        (logits_nat.argmax(1) == y).sum() if logits_nat is not None else zero,
                        (logits_adv.argmax(1) == y).sum() if logits_adv is not None else zero,
                        diag.get("mean_weight", one) * b,
                    ]
                ).float()
            if bar is not None:
                bar.update(1)
        loss_sum, correct_nat, correct_adv, weight_sum = sums.tolist()  # the epoch's one read
        train_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        val, _ = evaluate(fast, val_data, val_attack, batch_size=cfg.batch_size, device=device)
        val_s = time.perf_counter() - t1
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(
                f"training diverged: train/loss is {loss_sum / count} in epoch {epoch + 1} "
                f"(method {cfg.method}, lr_max {cfg.lr_max}); lower lr_max or beta"
            )
        metrics: dict[str, float] = {
            "train/loss": loss_sum / count,
            "train/mean_weight": weight_sum / count,
            "lr": lr_at(step, total_steps, cfg),
        }
        if spec.needs_nat:
            metrics["train/clean_acc"] = correct_nat / count
        if attack is not None:
            metrics["train/adv_acc"] = correct_adv / count
        metrics.update({f"val/{k}": v for k, v in val.items()})
        metrics.update(
            {
                "time/epoch_s": time.perf_counter() - t0,
                "time/train_s": train_s,
                "time/val_s": val_s,
            }
        )
        history.append({"epoch": epoch + 1, **metrics})

        improved = metrics["val/pgd_acc"] > best_score
        if improved:
            best_epoch, best_score = epoch + 1, metrics["val/pgd_acc"]
        if not writer:
            reporter.report(epoch + 1, metrics, None)
            continue
        if improved:
            save_checkpoint(
                ckpt_dir / "best.pt",
                {"model": model.state_dict(), "epoch": epoch + 1, "config": cfg.to_dict()},
            )
        last = save_checkpoint(
            ckpt_dir / "last.pt",
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": {"step": step, "total_steps": total_steps},
                "epoch": epoch + 1,
                "rng": rng_state(),
                "config": cfg.to_dict(),
                "history": history,
                "best": {"epoch": best_epoch, "score": best_score},
            },
        )
        reporter.report(epoch + 1, metrics, last)
    if bar is not None:
        bar.close()

    # --- final test evaluation of the best checkpoint ------------------------
    if not writer:
        reporter.final({}, {})
        return TrainResult(out, best_epoch, history, {}, {})
    test_metrics, artifacts = final_evaluation(cfg, model, data, out, device=device, view=fast)
    test_metrics["best_epoch"] = float(best_epoch)
    test_metrics["best/val_pgd_acc"] = best_score
    artifacts.update(
        {"checkpoint_best": ckpt_dir / "best.pt", "checkpoint_last": ckpt_dir / "last.pt"}
    )
    reporter.final(test_metrics, artifacts)
    return TrainResult(out, best_epoch, history, test_metrics, artifacts)


def final_evaluation(
    cfg: TrainConfig,
    model: nn.Module,
    data: DataBundle,
    out: Path,
    *,
    device: torch.device,
    view: nn.Module | None = None,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Load ``best.pt`` into ``model`` and measure clean, PGD-``eval_steps`` and
    AutoAttack accuracy on the test set; writes per-sample energies to
    ``energies.npz`` (for energy histograms).

    ``view`` (from :func:`~trainables.models.accelerate`, sharing ``model``'s
    parameters) runs the PGD evaluation; AutoAttack always gets the bare model.
    """
    best = load_checkpoint(out / "checkpoints" / "best.pt", map_location=device)
    model.load_state_dict(best["model"])
    test = data.test.subset(cfg.test_subset, seed=cfg.split_seed)
    metrics, samples = evaluate(
        view if view is not None else model,
        test,
        eval_attack(cfg, cfg.eval_steps),
        batch_size=cfg.batch_size,
        device=device,
        keep_samples=True,
    )
    result = {f"test/{k}": v for k, v in metrics.items()}
    artifacts: dict[str, Path] = {}
    assert samples is not None
    energies = out / "energies.npz"
    np.savez_compressed(energies, **samples)
    artifacts["energies"] = energies
    if cfg.aa_n > 0:
        from trainables.autoattack import autoattack_accuracy

        aa_data = test.subset(cfg.aa_n, seed=cfg.split_seed)
        aa = autoattack_accuracy(
            model,
            to_float(aa_data.x).to(device),
            aa_data.y.to(device),
            eps=cfg.eps,
            norm="Linf" if cfg.norm == "linf" else "L2",
            version=cfg.aa_version,
            attacks=cfg.aa_attacks,
            batch_size=max(cfg.batch_size, 256),
            seed=cfg.seed,
            device=device,
        )
        result["test/aa_acc"] = aa.robust_acc
        result["test/aa_clean_acc"] = aa.clean_acc
        result["test/aa_n"] = float(len(aa_data))
    return result, artifacts


def _check_resumable(state: dict[str, Any], cfg: TrainConfig) -> None:
    """A checkpoint resumes only the run it came from (runtime keys may differ)."""
    if "optimizer" not in state:
        raise CheckpointError(
            "cannot resume from a weights-only checkpoint (best.pt); resume from last.pt"
        )
    saved = state.get("config", {})
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}"
        for k, v in cfg.to_dict().items()
        if k not in RUNTIME_KEYS and saved.get(k) != v
    ]
    if diffs:
        raise CheckpointError(
            "cannot resume: the checkpoint was written with another config ("
            + "; ".join(diffs[:5])
            + ")"
        )
