"""One training run, top to bottom: data, model, attack, loss, step, evaluate, checkpoint.

Reads like CleanRL: the algorithm's lines are in :func:`train`'s batch loop,
the bookkeeping around them; resuming (``_restore``), the epoch's metrics
(``_epoch_metrics``) and its checkpoints (``_save``) are helpers beside it.
Nothing here knows about Ray or MLflow: metrics go to a
:class:`~trainables.reporting.Reporter`.

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
import warnings
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
from trainables.config import PATH_FIELDS, TrainConfig
from trainables.data import (
    DataBundle,
    TensorData,
    iterate_batches,
    load_data,
    num_batches,
    to_float,
)
from trainables.energy import joint_energy, marginal_energy
from trainables.errors import CheckpointError, ConfigError, TrainingDiverged
from trainables.files import BEST_CHECKPOINT, CONFIG_FILE, ENERGIES_FILE, LAST_CHECKPOINT
from trainables.methods import MethodSpec, bind_method
from trainables.models import accelerate, create_model
from trainables.reporting import NullReporter, Reporter
from trainables.stats import with_intervals

#: Config keys that may differ between a checkpoint and the run resuming it.
RUNTIME_KEYS = frozenset(
    {
        "device",
        "num_threads",
        "output_dir",
        "autoattack",
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
        raise ConfigError("device = 'cuda' but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the training attack and step (None = fp32).

    ``auto`` and ``fp32`` train in fp32, whatever the method: a study compares
    methods, and a precision that differed between them would leak into the
    comparison (:data:`~trainables.methods.BF16_NOTE`). ``bf16`` asks for bf16
    autocast on any device (CPU autocast works too; whether it pays depends on the
    CPU's bf16 support, see bench/README.md).
    """
    return torch.bfloat16 if cfg.precision == "bf16" else None


def use_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    """``channels_last`` as set, or by default on for CUDA and off on the CPU."""
    return device.type == "cuda" if cfg.channels_last is None else bool(cfg.channels_last)


def precision_context(dtype: torch.dtype | None, device: torch.device):
    """Autocast to ``dtype`` on ``device`` (a no-op context for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


#: torch.optim.lr_scheduler.OneCycleLR's defaults, which the paper's code keeps.
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4
ONECYCLE_MOMENTUM = (0.85, 0.95)  # (base, max)


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def onecycle_at(
    step: int, total_steps: int, lr_max: float, pct_start: float
) -> tuple[float, float]:
    """``(lr, momentum)`` of ``torch.optim.lr_scheduler.OneCycleLR`` at ``step``.

    The same piecewise cosine as torch's scheduler with ``max_lr=lr_max``,
    ``pct_start``, ``anneal_strategy="cos"``, ``div_factor=25``,
    ``final_div_factor=1e4`` and momentum cycled 0.95 → 0.85 → 0.95, as a pure
    function of the step so that a resumed run needs no scheduler state.

    Args:
        step: optimiser steps already taken (0 for the first batch).
        total_steps: optimiser steps of the whole run.
        lr_max: the peak learning rate.
        pct_start: fraction of the steps spent rising to ``lr_max``.

    Example:
        >>> onecycle_at(29, total_steps=100, lr_max=0.1, pct_start=0.3)  # the peak
        (0.1, 0.85)
    """
    initial = lr_max / ONECYCLE_DIV_FACTOR
    final = initial / ONECYCLE_FINAL_DIV_FACTOR
    base_m, max_m = ONECYCLE_MOMENTUM
    step = min(max(step, 0), total_steps - 1)
    phases = (
        (float(pct_start * total_steps) - 1, initial, lr_max, max_m, base_m),
        (float(total_steps - 1), lr_max, final, base_m, max_m),
    )
    start_step = 0.0
    for i, (end_step, lr0, lr1, m0, m1) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            span = end_step - start_step  # 0 for a warm-up of one step: at its end
            pct = (step - start_step) / span if span > 0 else 1.0
            return _cos_anneal(lr0, lr1, pct), _cos_anneal(m0, m1, pct)
        start_step = end_step
    raise AssertionError("unreachable")  # pragma: no cover


def schedule_at(step: int, total_steps: int, cfg: TrainConfig) -> tuple[float, float]:
    """``(lr, momentum)`` for the optimiser step after ``step`` of ``total_steps`` steps.

    ``onecycle`` is torch's ``OneCycleLR`` (:func:`onecycle_at`, momentum cycled);
    ``triangular`` rises linearly from 0 to ``lr_max`` over the first 40 % of
    steps and falls linearly to 0; ``cosine`` anneals from ``lr_max`` to 0;
    ``constant`` stays at ``lr_max``. Only ``onecycle`` changes the momentum.
    """
    if cfg.lr_schedule == "onecycle":
        return onecycle_at(step, total_steps, cfg.lr_max, cfg.lr_pct_start)
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if cfg.lr_schedule == "triangular":
        lr = float(np.interp(t, [0.0, 0.4, 1.0], [0.0, cfg.lr_max, 0.0]))
    elif cfg.lr_schedule == "cosine":
        lr = cfg.lr_max * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        lr = cfg.lr_max
    return lr, cfg.momentum


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of :func:`schedule_at`."""
    return schedule_at(step, total_steps, cfg)[0]


def training_attack(cfg: TrainConfig, spec: MethodSpec) -> PGD | None:
    """The attack method ``spec`` trains against (None for ``standard``)."""
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
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_run_data(cfg: TrainConfig, *, download: bool, augment: str) -> DataBundle:
    """The dataset of ``cfg``: its split, validation file and training subset."""
    return load_data(
        cfg.dataset,
        cfg.data_root,
        val_fraction=cfg.val_fraction,
        val_npz=cfg.val_npz,
        split_seed=cfg.split_seed,
        download=download,
        augment=augment,
        train_subset=cfg.train_subset,
    )


@dataclass
class _Progress:
    """Where a run stands after ``epoch`` epochs: what a resume restores besides the
    weights, the optimiser and the RNGs."""

    epoch: int = 0
    step: int = 0  # optimiser steps taken
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_score: float = -math.inf  # the best epoch's val/pgd_acc

    def record(self, metrics: dict[str, float], cfg: TrainConfig) -> bool:
        """Append a finished epoch; True when its weights are the best so far: the
        highest ``val/pgd_acc`` from epoch ``select_from`` on (the last epoch is always
        eligible), or without a validation set the last epoch."""
        self.epoch += 1
        self.history.append({"epoch": self.epoch, **metrics})
        score = metrics.get("val/pgd_acc")
        if score is None:
            improved = self.epoch == cfg.epochs
        else:
            eligible = self.epoch >= min(cfg.select_from, cfg.epochs)
            improved = eligible and score > self.best_score
        if improved:
            self.best_epoch = self.epoch
            self.best_score = self.best_score if score is None else score
        return improved


def _restore(
    path: str | Path,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> _Progress:
    """Load ``last.pt`` of the same run into ``model``, ``optimizer`` and the RNGs."""
    state = load_checkpoint(path, map_location=device)
    _check_resumable(state, cfg)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    best, step = state["best"], int(state["schedule"]["step"])
    history = list(state["history"])
    return _Progress(int(state["epoch"]), step, history, int(best["epoch"]), float(best["score"]))


def _save(
    out: Path,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    run: _Progress,
    total_steps: int,
    best: bool,
) -> Path:
    """Write the epoch's ``last.pt`` (everything :func:`_restore` reads) and, for the
    best epoch so far, ``best.pt`` (weights only); returns ``last.pt``'s path."""
    weights = {"model": model.state_dict(), "epoch": run.epoch, "config": cfg.to_dict()}
    if best:
        save_checkpoint(out / BEST_CHECKPOINT, weights)
    return save_checkpoint(
        out / LAST_CHECKPOINT,
        {
            **weights,
            "optimizer": optimizer.state_dict(),
            "schedule": {"step": run.step, "total_steps": total_steps},
            "rng": rng_state(),
            "history": run.history,
            "best": {"epoch": run.best_epoch, "score": run.best_score},
        },
    )


def _epoch_metrics(
    cfg: TrainConfig,
    spec: MethodSpec,
    model: nn.Module,
    val: tuple[TensorData, PGD],
    probe: tuple[TensorData, PGD] | None,
    sums: Tensor,
    count: int,
    *,
    epoch: int,
    lr: float,
    started: float,
) -> dict[str, float]:
    """The epoch's metrics: the training means from ``sums`` (loss·B, correct natural,
    correct adversarial, weight·B over ``count`` samples), ``lr``, the validation and
    probe metrics of ``model`` on each ``(points, attack)``, the times since ``started``.

    Raises:
        TrainingDiverged: the training loss is not finite.
    """
    loss_sum, correct_nat, correct_adv, weight_sum = sums.tolist()  # the epoch's one read
    train_s = time.perf_counter() - started
    t1 = time.perf_counter()
    val_metrics: dict[str, float] = {}
    if len(val[0]):
        val_metrics, _ = evaluate(model, *val, batch_size=cfg.batch_size, device=sums.device)
    val_s = time.perf_counter() - t1
    probe_m = probe_metrics(model, *probe, cfg.batch_size, sums.device) if probe else {}
    probe_s = time.perf_counter() - t1 - val_s
    if not math.isfinite(loss_sum):
        raise TrainingDiverged(
            f"training diverged: train/loss is {loss_sum / count} in epoch {epoch + 1} "
            f"(method {cfg.method}, lr_max {cfg.lr_max}); lower lr_max or beta"
        )
    metrics = {
        "train/loss": loss_sum / count,
        "train/mean_weight": weight_sum / count,
        "lr": lr,
    }
    if spec.needs_nat:
        metrics["train/clean_acc"] = correct_nat / count
    if spec.attack_loss is not None:
        metrics["train/adv_acc"] = correct_adv / count
    if val_metrics:
        metrics.update(accuracies_with_n("val", val_metrics, len(val[0])))
    return {
        **metrics,
        **probe_m,
        "time/epoch_s": time.perf_counter() - started,
        "time/train_s": train_s,
        "time/val_s": val_s,
        "time/probe_s": probe_s,
    }


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
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    # --- set-up -------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    if data is None:
        data = load_run_data(cfg, download=cfg.download, augment=cfg.augment)
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
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    writer = rank == 0
    total_steps = cfg.epochs * num_batches(len(data.train), cfg.batch_size, world_size=world_size)
    method = bind_method(cfg.method, cfg.method_hparams())  # resolved and checked once
    attack = training_attack(cfg, method.spec)
    val_attack = eval_attack(cfg, cfg.val_attack_steps)
    val = (data.val.subset(cfg.val_subset, seed=cfg.split_seed), val_attack)
    # the ΔE training probe (paper Fig. 3): fixed training points, not augmented,
    # against the training attack (the evaluation PGD for `standard`)
    probe_data = data.train.subset(cfg.probe_n, seed=cfg.split_seed) if cfg.probe_n else None
    probe = (probe_data, attack or val_attack) if probe_data is not None else None
    if not len(val[0]):
        warnings.warn(
            "no validation set (val_fraction 0 and no val_npz): no model selection, the "
            "last epoch's weights are kept as best.pt",
            stacklevel=2,
        )
    run = _Progress() if resume is None else _restore(resume, cfg, model, optimizer, device)
    if writer:
        _write_config(cfg, out)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=total_steps, initial=run.step, unit="batch", leave=False, dynamic_ncols=True
        )

    if resume is not None and run.epoch >= cfg.epochs and run.history:
        # the run had finished its epochs: say its last epoch again, so that a
        # reporter that joined late (a restarted trial) still sees the metrics
        last_epoch = {k: v for k, v in run.history[-1].items() if k != "epoch"}
        reporter.report(cfg.epochs, last_epoch, Path(resume) if writer else None)

    # --- epochs ---------------------------------------------------------------
    for epoch in range(run.epoch, cfg.epochs):
        started = time.perf_counter()
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
            pin_memory=device.type == "cuda",
        )
        for x, y in batches:
            lr, beta1 = schedule_at(run.step, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"], group["momentum"] = lr, beta1

            # the algorithm: attack, forward, loss, step
            with precision_context(amp, device):
                x_adv = attack(fast, x, y) if attack is not None else None
                logits_nat = net(x).float() if method.spec.needs_nat else None
                logits_adv = net(x_adv).float() if x_adv is not None else None
            loss, diag = method.loss(logits_nat, logits_adv, y, epoch=epoch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.step += 1

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

        lr = lr_at(run.step, total_steps, cfg)  # the next step's
        metrics = _epoch_metrics(
            cfg, method.spec, fast, val, probe, sums, count, epoch=epoch, lr=lr, started=started
        )
        best = run.record(metrics, cfg)
        last = _save(out, cfg, model, optimizer, run, total_steps, best) if writer else None
        reporter.report(run.epoch, metrics, last)
    if bar is not None:
        bar.close()

    # --- final test evaluation of the best checkpoint ------------------------
    if not writer:
        reporter.final({}, {})
        return TrainResult(out, run.best_epoch, run.history, {}, {})
    test_metrics, artifacts = final_evaluation(cfg, model, data, out, device=device, view=fast)
    test_metrics["best_epoch"] = float(run.best_epoch)
    if len(val[0]):
        test_metrics["best/val_pgd_acc"] = run.best_score
    artifacts.update(
        {"checkpoint_best": out / BEST_CHECKPOINT, "checkpoint_last": out / LAST_CHECKPOINT}
    )
    reporter.final(test_metrics, artifacts)
    return TrainResult(out, run.best_epoch, run.history, test_metrics, artifacts)


def with_n(metrics: dict[str, float], n: int) -> dict[str, float]:
    """``metrics`` plus ``n`` and the 95 % Wilson bounds of every accuracy in it
    (:mod:`trainables.stats`)."""
    out = {**metrics, "n": float(n)}
    return with_intervals(out, n=n, keys=[k for k in out if k.endswith("_acc")])


def accuracies_with_n(prefix: str, metrics: dict[str, float], n: int) -> dict[str, float]:
    """:func:`with_n` under ``prefix/`` (``val/n``, ``test/pgd_acc_ci_low`` …)."""
    return {f"{prefix}/{k}": v for k, v in with_n(metrics, n).items()}


def probe_metrics(
    model: nn.Module, data: TensorData, attack: PGD, batch_size: int, device: torch.device
) -> dict[str, float]:
    """The ΔE training probe: energies of fixed training points and their attacked
    versions (eval mode), as ``train_probe/*``.

    ``train_probe/delta_energy`` is the mean of E(x) − E(x*) (the paper's ΔE(x),
    Fig. 3), ``train_probe/delta_energy_xy`` the mean of E(x, y) − E(x*, y).
    """
    m, _ = evaluate(model, data, attack, batch_size=batch_size, device=device)
    return {
        "train_probe/delta_energy": m["delta_energy"],
        "train_probe/delta_energy_std": m["delta_energy_std"],
        "train_probe/delta_energy_xy": m["delta_energy_joint"],
        "train_probe/energy_nat": m["energy_nat"],
        "train_probe/energy_adv": m["energy_adv"],
        "train_probe/adv_acc": m["pgd_acc"],
        "train_probe/n": float(len(data)),
    }


def autoattack_on(
    cfg: TrainConfig,
    model: nn.Module,
    points: TensorData,
    *,
    device: torch.device,
    verbose: bool = False,
) -> Any:
    """AutoAttack (``cfg.aa_version``, the run's threat model and seed) on all of
    ``points``; returns :class:`trainables.autoattack.AutoAttackResult`.

    Args:
        verbose: let the library log each attack (logger ``auto-attack``).
    """
    from trainables.autoattack import autoattack_accuracy

    return autoattack_accuracy(
        model,
        to_float(points.x).to(device),
        points.y.to(device),
        eps=cfg.eps,
        norm="Linf" if cfg.norm == "linf" else "L2",
        version=cfg.aa_version,
        attacks=cfg.aa_attacks,
        batch_size=max(cfg.batch_size, 256),
        seed=cfg.seed,
        device=device,
        verbose=verbose,
    )


def measure(
    cfg: TrainConfig,
    model: nn.Module,
    points: TensorData,
    *,
    device: torch.device,
    view: nn.Module | None = None,
    autoattack: bool = True,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Clean, PGD-``eval_steps`` and (optionally) AutoAttack accuracy on the same points.

    The PGD's random start is drawn from ``cfg.seed`` in a forked RNG (the caller's RNG
    state is left as it was), and AutoAttack seeds itself: a checkpoint gets the same
    numbers wherever it is measured (a run's final test, a ΔE-stopped trial's kept
    checkpoint tested after the search, a finalist's evaluation), on the CPU exactly.

    Args:
        cfg: the run's config (threat model, evaluation attack, AutoAttack version).
        model: the classifier, weights loaded.
        points: the evaluation points; every number is measured on all of them.
        device: where the model runs.
        view: an accelerated view sharing ``model``'s parameters for the PGD pass
            (:func:`~trainables.models.accelerate`); AutoAttack gets the bare model.
        autoattack: also run AutoAttack (``cfg.aa_version``).

    Returns:
        ``(metrics, samples)``: unprefixed metrics (``clean_acc``, ``pgd_acc``,
        energies, and with AutoAttack ``aa_acc``, ``aa_clean_acc`` and ``robust_acc``,
        the points that survive both attacks) and per-point arrays (energies,
        predictions, ``pgd_correct``, and ``aa_robust`` with AutoAttack).
    """
    cuda = {"devices": [device], "device_type": "cuda"} if device.type == "cuda" else {}
    with torch.random.fork_rng(**({"devices": []} | cuda)):
        torch.manual_seed(cfg.seed)
        metrics, samples = evaluate(
            view if view is not None else model,
            points,
            eval_attack(cfg, cfg.eval_steps),
            batch_size=cfg.batch_size,
            device=device,
            keep_samples=True,
        )
    assert samples is not None
    pgd_correct = samples["pred_adv"] == samples["y"]
    samples["pgd_correct"] = pgd_correct
    if autoattack:
        aa = autoattack_on(cfg, model, points, device=device)
        aa_robust = aa.robust_mask.cpu().numpy()
        samples["aa_robust"] = aa_robust
        metrics["aa_acc"] = aa.robust_acc
        metrics["aa_clean_acc"] = aa.clean_acc
        metrics["robust_acc"] = float((aa_robust & pgd_correct).mean())
    return metrics, samples


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
    AutoAttack accuracy (when ``cfg.autoattack``) on the same ``test_subset`` test
    points, each with its n and 95 % Wilson interval; writes per-point energies and
    outcomes to ``energies.npz`` (for energy histograms).
    """
    best = load_checkpoint(out / BEST_CHECKPOINT, map_location=device)
    model.load_state_dict(best["model"])
    metrics, samples = measure_test_set(cfg, model, data, device=device, view=view)
    energies = out / ENERGIES_FILE
    np.savez_compressed(energies, **samples)
    return metrics, {"energies": energies}


def measure_test_set(
    cfg: TrainConfig,
    model: nn.Module,
    data: DataBundle,
    *,
    device: torch.device,
    view: nn.Module | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """A run's test metrics of ``model`` (weights loaded): :func:`measure` on its
    ``test_subset`` test points, AutoAttack when ``cfg.autoattack``, as ``test/*`` with
    n and 95 % Wilson bounds; and the per-point arrays (what ``energies.npz`` holds).
    The final evaluation of a run, and of the checkpoint a ΔE-stopped trial kept
    (:func:`study.finals.evaluate_kept`)."""
    test = data.test.subset(cfg.test_subset, seed=cfg.split_seed)
    metrics, samples = measure(
        cfg, model, test, device=device, view=view, autoattack=cfg.autoattack
    )
    return accuracies_with_n("test", metrics, len(test)), samples


def trained_model(
    cfg: TrainConfig,
    state_dict: dict[str, Tensor],
    *,
    data: DataBundle | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, DataBundle]:
    """The model of ``cfg`` with ``state_dict`` loaded (eval mode, on ``device``) and the
    data it is evaluated on: the run's own split and training subset, not augmented,
    never downloaded (``data`` when given).

    Args:
        cfg: the run's training config.
        state_dict: its weights (a checkpoint's ``"model"``).
        data: an already loaded dataset bundle.
        device: where the model goes.
    """
    if data is None:
        data = load_run_data(cfg, download=False, augment="none")
    model = create_model(
        cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, **cfg.model_kwargs
    )
    model.load_state_dict(state_dict)
    return model.to(device).eval(), data


def evaluate_weights(
    cfg: TrainConfig,
    state_dict: dict[str, Tensor],
    *,
    n: int | None = None,
    data: DataBundle | None = None,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Evaluate trained weights the way a study evaluates its finalists.

    Clean, PGD-``cfg.eval_steps`` and AutoAttack (``cfg.aa_version``) accuracy on
    the same ``n`` test points (the seeded subset :meth:`TensorData.subset` picks;
    ``None`` = the whole test set), in fp32, without the speed options.

    Args:
        cfg: the trial's training config (data, model, threat model, evaluation).
        state_dict: the model's weights (e.g. ``best.pt``'s ``"model"``).
        n: number of test points.
        data: an already loaded dataset bundle (else loaded from ``cfg``).

    Returns:
        ``(metrics, samples)``: ``clean_acc``, ``pgd_acc``, ``aa_acc``, ``robust_acc``
        and energies with ``n`` and 95 % Wilson bounds (unprefixed), and per-point
        arrays, ``index`` (positions in the test set) included.
    """
    device = resolve_device(cfg.device)
    model, data = trained_model(cfg, state_dict, data=data, device=device)
    index = data.test.subset_indices(n, seed=cfg.split_seed)
    points = data.test.take(index)
    metrics, samples = measure(cfg, model, points, device=device, autoattack=True)
    samples["index"] = index.numpy()
    return with_n(metrics, len(points)), samples


def _check_resumable(state: dict[str, Any], cfg: TrainConfig) -> None:
    """A checkpoint resumes only the run it came from (runtime keys may differ)."""
    if "optimizer" not in state:
        raise CheckpointError(
            "cannot resume from a weights-only checkpoint (best.pt); resume from last.pt"
        )
    saved = state.get("config", {})

    def same(key: str, then: Any, now: Any) -> bool:
        if key in PATH_FIELDS and then and now:  # relative then, absolute now: one place
            return Path(then).expanduser().resolve() == Path(now).expanduser().resolve()
        return then == now

    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs now {v!r}"
        for k, v in cfg.to_dict().items()
        if k not in RUNTIME_KEYS and not same(k, saved.get(k), v)
    ]
    if diffs:
        raise CheckpointError(
            "cannot resume: the checkpoint was written with another config ("
            + "; ".join(diffs[:5])
            + ")"
        )
