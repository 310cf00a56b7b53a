"""Figure 4, evaluation share: per-epoch validation against the epoch.

The loop times every epoch itself (``time/epoch_s``, with ``time/train_s`` and
``time/val_s``, the validation: clean + PGD on ``val_subset`` points, default
512 with PGD-10). The share is ``time/val_s / time/epoch_s`` per epoch, median
over epochs, with the default evaluation settings, on two workloads:

* the CIFAR-10 JPEG folder (7200 training images, TRADES K = 10, small CNN):
  the epochs of figure 2's in-process run when it ran, else a run of its own;
* the default study's digits config (``study/default.yaml``: K = 5 training
  attack, PGD-10 validation on the whole 144-image validation split).

The final test evaluation (PGD-20 and AutoAttack on the same test points)
runs once after the last epoch; its time is measured on its own by
calling :func:`trainables.loop.final_evaluation` on the finished digits run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.common import GUARD, REPO, median
from trainables.config import TrainConfig
from trainables.loop import final_evaluation, resolve_device, train
from trainables.models import create_model


def share(history: list[dict[str, float]]) -> dict[str, Any]:
    shares = [h["time/val_s"] / h["time/epoch_s"] for h in history]
    return {
        "val_share": median(shares),
        "val_share_per_epoch": shares,
        "epoch_s": median(h["time/epoch_s"] for h in history),
        "val_s": median(h["time/val_s"] for h in history),
    }


def run(quick: bool, cifar_history: list[dict[str, float]] | None) -> dict[str, Any]:
    from bench.platform_overhead import fig2_config

    out: dict[str, Any] = {}
    if cifar_history is None:
        cfg = TrainConfig.from_dict(fig2_config(2, smoke=quick))
        GUARD.wait()
        with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
            cifar_history = train(cfg, output_dir=tmp).history
        out["cifar_source"] = "own run (2 epochs)"
    else:
        out["cifar_source"] = "figure 2 in-process run"
    out["cifar_jpeg"] = share(cifar_history)

    base = yaml.safe_load((REPO / "study" / "default.yaml").read_text())
    # quick: a smoke test (1 epoch, the final evaluation on 32 test points), not the figure
    smoke = {"epochs": 1, "test_subset": 32} if quick else {"epochs": 8}
    cfg = TrainConfig.from_dict({**base, **smoke, "num_threads": 2})
    GUARD.wait()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        result = train(cfg, output_dir=tmp)
        out["digits_default"] = share(result.history)
        from trainables.data import load_data

        data = load_data(cfg.dataset, cfg.data_root, val_fraction=cfg.val_fraction)
        device = resolve_device(cfg.device)
        model = create_model(cfg.model, num_classes=data.num_classes, in_channels=1).to(device)
        GUARD.wait()
        t = time.perf_counter()
        metrics, _ = final_evaluation(cfg, model, data, Path(tmp), device=device)
        out["final_evaluation"] = {
            "seconds": time.perf_counter() - t,
            "test_points": len(data.test.subset(cfg.test_subset, seed=cfg.split_seed)),
            "eval_steps": cfg.eval_steps,
            "autoattack": cfg.autoattack,
            "runs": "once, after the last epoch",
            "epoch_s_for_comparison": out["digits_default"]["epoch_s"],
        }
    out["setup"] = {
        "val_subset": cfg.val_subset,
        "val_attack_steps": cfg.val_attack_steps,
        "digits_epochs": cfg.epochs,
        "smoke": quick,
        "torch_threads": torch.get_num_threads(),
    }
    worst = max(out["cifar_jpeg"]["val_share"], out["digits_default"]["val_share"])
    out["targets"] = {
        "cifar_val_share": {
            "value": out["cifar_jpeg"]["val_share"],
            "target": "<= 0.15",
            "met": out["cifar_jpeg"]["val_share"] <= 0.15,
        },
        "digits_val_share": {
            "value": out["digits_default"]["val_share"],
            "target": "<= 0.15",
            "met": out["digits_default"]["val_share"] <= 0.15,
        },
    }
    out["worst_share"] = worst
    return out
