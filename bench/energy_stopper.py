"""Issue 14, part 1: where the ΔE stopper fires on a run that robust-overfits.

``python -m bench.energy_stopper [--seeds 0,1,2] [--epochs 40] [--out FILE]`` trains
one setting that robust-overfits on a CPU in minutes (SAT on 500 images of the
shared CIFAR-10 JPEG folder, small CNN, ε = 8/255, a constant learning rate of
0.05, no weight decay, 40 epochs) once per training seed with the direct loop
(:func:`trainables.loop.train`, no Ray), and after every epoch measures the epoch's
weights (its ``last.pt``) on a fixed subset of the test split with PGD-10: that
test curve is for this table only, a study never sees it.

The stopper's rule (:func:`study.stopper.divergence_at`) is a pure function of the
ΔE history up to an epoch, so replaying it on a finished run's history epoch by
epoch gives exactly the epoch where ``study run --stop-on-energy-divergence`` would
have stopped that trial. For each run and rule setting the table has: the stop
epoch, the peak epoch before the fall, the epoch of peak test PGD (the oracle),
test PGD of the kept checkpoint (the best ``val/pgd_acc`` epoch up to the peak, as
the loop's ``best.pt`` stood then), of the last epoch (training to the end, no
selection) and of "best validation PGD" selection over the whole run (the loop's
``best.pt`` at the end), and the compute saved: the epochs not run and their
seconds (``time/epoch_s``: training, validation and probe; not this benchmark's
test curve).

Results go to ``bench/results/<date>-energy-stopper-cpu<N>.json``, rewritten after
every run. Nothing here asserts; the numbers are reported as they come.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from bench.common import CIFAR_JPEG, REPO, machine
from study.stopper import DELTA_ENERGY, DivergenceRule, divergence_onset
from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.loop import eval_attack, evaluate, load_run_data, train, trained_model

#: the setting: SAT on a small CIFAR-10 subset with a constant, high learning rate
SETTING: dict[str, Any] = {
    "dataset": "imagefolder",
    "data_root": str(CIFAR_JPEG),
    "model": "small_cnn",
    "method": "sat",
    "train_subset": 500,
    "eps": 8 / 255,
    "step_size": 2 / 255,
    "attack_steps": 5,
    "val_attack_steps": 10,
    "val_subset": 200,
    "probe_n": 128,
    "eval_steps": 10,
    "eval_step_size": 2 / 255,
    "batch_size": 32,
    "lr_max": 0.05,
    "lr_schedule": "constant",
    "weight_decay": 0.0,
    "augment": "none",
    "autoattack": False,
    "device": "cpu",
}
#: test points of the per-epoch test curve (a fixed subset of the test split)
TEST_N = 300
#: the rule settings replayed on every run: the study's defaults first
RULES: dict[str, DivergenceRule] = {
    "default (W5, 25 %, ≥ 0.1, from 5)": DivergenceRule(),
    "W3, 25 %, ≥ 0.05, from 5": DivergenceRule(window=3, threshold=0.25, min_drop=0.05),
    "W5, 50 %, ≥ 0.2, from 5": DivergenceRule(window=5, threshold=0.5, min_drop=0.2),
}


class _TestCurve:
    """A loop reporter: PGD accuracy of every epoch's weights on fixed test points."""

    def __init__(self, cfg: TrainConfig, data: Any, n: int) -> None:
        self.cfg, self.data = cfg, data
        self.points = data.test.subset(n, seed=cfg.split_seed)
        self.attack = eval_attack(cfg, cfg.eval_steps)
        self.rows: list[dict[str, float]] = []

    def report(self, epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
        assert checkpoint is not None
        weights = load_checkpoint(checkpoint)["model"]
        model, _ = trained_model(self.cfg, weights, data=self.data)
        test, _ = evaluate(
            model, self.points, self.attack, batch_size=256, device=torch.device("cpu")
        )
        self.rows.append({"epoch": epoch, **metrics, "test/pgd_acc": test["pgd_acc"]})
        print(
            f"  epoch {epoch:3d}  ΔE {metrics[DELTA_ENERGY]:8.3f}  val pgd "
            f"{metrics['val/pgd_acc']:.3f}  test pgd {test['pgd_acc']:.3f}  train adv "
            f"{metrics['train/adv_acc']:.3f}  {metrics['time/epoch_s']:.1f} s",
            flush=True,
        )

    def final(self, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
        pass


def first_best(rows: Sequence[dict[str, float]], key: str, upto: int) -> dict[str, float]:
    """The first row with the highest ``key`` among epochs ``≤ upto`` (the loop's
    ``best.pt`` rule: a later epoch must be strictly better)."""
    eligible = [r for r in rows if r["epoch"] <= upto]
    return max(eligible, key=lambda r: (r[key], -r["epoch"]))


def judge(rows: list[dict[str, float]], rule: DivergenceRule) -> dict[str, Any]:
    """Replay ``rule`` on one run's history; the table's numbers for that run."""
    history = {int(r["epoch"]): float(r[DELTA_ENERGY]) for r in rows}
    last = rows[-1]
    epochs = int(last["epoch"])
    peak_test = first_best(rows, "test/pgd_acc", epochs)
    by_val = first_best(rows, "val/pgd_acc", epochs)
    found = divergence_onset(history, rule)
    out: dict[str, Any] = {
        "epochs": epochs,
        "peak_test_epoch": int(peak_test["epoch"]),
        "peak_test_pgd": peak_test["test/pgd_acc"],
        "last_test_pgd": last["test/pgd_acc"],
        "best_val_epoch": int(by_val["epoch"]),
        "best_val_test_pgd": by_val["test/pgd_acc"],
        "total_s": sum(r["time/epoch_s"] for r in rows),
    }
    if found is None:
        kept_epoch, kept_pgd = int(by_val["epoch"]), by_val["test/pgd_acc"]
        none = {"stop_epoch": None, "kept_epoch": kept_epoch, "kept_test_pgd": kept_pgd}
        return {**out, **none, "epochs_saved": 0, "saved_s": 0.0}
    kept = first_best(rows, "val/pgd_acc", found.peak_epoch)
    saved = [r for r in rows if r["epoch"] > found.epoch]
    return {
        **out,
        "stop_epoch": found.epoch,
        "peak_epoch": found.peak_epoch,
        "fall": found.fall,
        "kept_epoch": int(kept["epoch"]),
        "kept_test_pgd": kept["test/pgd_acc"],
        "epochs_saved": len(saved),
        "saved_s": sum(r["time/epoch_s"] for r in saved),
    }


def run_one(seed: int, epochs: int, threads: int, data_root: str) -> list[dict[str, float]]:
    """Train the setting with ``seed`` for ``epochs`` on ``threads`` torch threads, the
    CIFAR-10 JPEG folder at ``data_root``; its per-epoch rows."""
    cfg = TrainConfig.from_dict({**SETTING, "seed": seed, "epochs": epochs,
                                 "num_threads": threads, "data_root": data_root})  # fmt: skip
    data = load_run_data(cfg, download=False, augment="none")
    curve = _TestCurve(cfg, data, TEST_N)
    with tempfile.TemporaryDirectory(prefix="energy-stopper-") as out:
        train(cfg, reporter=curve, output_dir=out, data=data)
    return curve.rows


def table(result: dict[str, Any]) -> str:
    """The README's table (Markdown) from a results JSON's content: one row per run and
    rule setting, then the means per rule setting."""
    head = (
        "| seed | rule | stop epoch (peak) | peak test PGD epoch | kept epoch | test PGD: kept "
        "| last epoch | best val PGD (epoch) | epochs saved | seconds saved |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines, by_rule = [], {}
    for run in result["runs"]:
        for name, r in run["by_rule"].items():
            by_rule.setdefault(name, []).append(r)
            stop = "–" if r["stop_epoch"] is None else f"{r['stop_epoch']} ({r['peak_epoch']})"
            lines.append(
                f"| {run['seed']} | {name} | {stop} | {r['peak_test_epoch']} "
                f"({r['peak_test_pgd']:.3f}) | {r['kept_epoch']} | {r['kept_test_pgd']:.3f} "
                f"| {r['last_test_pgd']:.3f} | {r['best_val_test_pgd']:.3f} "
                f"({r['best_val_epoch']}) | {r['epochs_saved']}/{r['epochs']} "
                f"| {r['saved_s']:.0f} of {r['total_s']:.0f} |"
            )
    for name, rows in by_rule.items():
        n = len(rows)

        def mean(key: str, rows: list[dict[str, Any]] = rows, n: int = n) -> float:
            return sum(r[key] for r in rows) / n

        lines.append(
            f"| mean of {n} | {name} | | | | {mean('kept_test_pgd'):.3f} "
            f"| {mean('last_test_pgd'):.3f} | {mean('best_val_test_pgd'):.3f} "
            f"| {mean('epochs_saved') / mean('epochs'):.0%} "
            f"| {mean('saved_s') / mean('total_s'):.0%} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.energy_stopper", description=__doc__)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of every run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--data", default=str(CIFAR_JPEG), help="the CIFAR-10 JPEG folder")
    parser.add_argument("--out", help="results JSON (default: bench/results/<date>-…)")
    parser.add_argument("--table-from", metavar="FILE", help="print the table of a results "
                        "JSON; runs nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())), end="")
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(
        args.out
        or REPO
        / "bench"
        / "results"
        / f"{time.strftime('%Y-%m-%d')}-energy-stopper-cpu{os.cpu_count()}.json"
    )
    result: dict[str, Any] = {
        "machine": machine(),
        "setting": {
            **SETTING,
            "data_root": "<the CIFAR-10 JPEG folder>",
            "epochs": args.epochs,
            "test_n": TEST_N,
        },  # fmt: skip
        "rules": {name: vars(rule) for name, rule in RULES.items()},
        "runs": [],
    }
    for seed in seeds:
        print(f"seed {seed}", flush=True)
        t0 = time.perf_counter()
        rows = run_one(seed, args.epochs, args.threads, args.data)
        run = {
            "seed": seed,
            "wall_s": time.perf_counter() - t0,
            "history": rows,
            "by_rule": {name: judge(rows, rule) for name, rule in RULES.items()},
        }
        result["runs"].append(run)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")  # after every run
        for name, row in run["by_rule"].items():
            print(f"  {name}: {row}", flush=True)
    print(table(result), end="")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
