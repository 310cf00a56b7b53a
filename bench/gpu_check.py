"""Device check: every method trains and is tested on a GPU, and a checkpoint's test
numbers do not depend on where it is measured.

``python -m bench.gpu_check [--device cuda] [--epochs 4] [--out FILE]`` trains each
method (``standard`` and the six robust ones, plus ``weat_adv`` with ``precision:
bf16``) on the bundled digits with the direct loop (:func:`trainables.loop.train`, no
Ray, no MLflow): small CNN, ε = 0.2, PGD-5 training attack, the ΔE probe on 128
training points, and the final test (clean, PGD-20 and standard AutoAttack on 200
test points). Then it tests the run's ``best.pt`` again as a ΔE-stopped trial's kept
checkpoint is tested after a search (``study.finals`` runs
:func:`trainables.loop.trained_model` and :func:`trainables.loop.measure_test_set`
in a Ray task) and reports whether each accuracy is within one point of the run's
own test. It needs only torch, numpy, PyYAML, scikit-learn (digits) and
``pyautoattack``: a machine with a GPU image and no Ray can run it with
``PYTHONPATH`` pointing at the checkout and at a copy of ``pyautoattack``.

Prints a table and writes ``bench/results/<date>-gpu-check-<device>.json``. Nothing
here asserts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from bench.common import REPO, machine
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.loop import measure_test_set, resolve_device, train, trained_model

#: the shared setting (digits, a few epochs; the method and precision vary)
BASE: dict[str, Any] = {
    "dataset": "digits",
    "model": "small_cnn",
    "eps": 0.2,
    "step_size": 0.05,
    "attack_steps": 5,
    "select_from": 1,
    "batch_size": 128,
    "val_subset": 128,
    "probe_n": 128,
    "test_subset": 200,
    "autoattack": True,
    "aa_version": "standard",
    "seed": 0,
}
RUNS = [(m, "auto") for m in ("standard", "sat", "trades", "mart", "mail_trades", "weat_nat",
                              "weat_adv")] + [("weat_adv", "bf16")]  # fmt: skip
KEYS = ("test/clean_acc", "test/pgd_acc", "test/aa_acc")


def check_one(cfg: TrainConfig, data: Any) -> dict[str, Any]:
    """Train ``cfg``, then test its ``best.pt`` again the way a kept checkpoint is tested.

    Args:
        cfg: the run's config.
        data: the loaded dataset bundle (shared by every run).
    """
    row: dict[str, Any] = {"method": cfg.method, "precision": cfg.precision}
    with tempfile.TemporaryDirectory(prefix="energy-study-gpu-check-") as tmp:
        t0 = time.perf_counter()
        res = train(cfg, output_dir=tmp, data=data)
        row["train_s"] = round(time.perf_counter() - t0, 2)
        row["epoch_s"] = [round(h.get("time/epoch_s", float("nan")), 4) for h in res.history]
        row["delta_energy"] = [h.get("train_probe/delta_energy") for h in res.history]
        row.update({k: res.test_metrics.get(k) for k in KEYS})
        best = Path(tmp) / "checkpoints" / "best.pt"
        state = torch.load(best, map_location="cpu", weights_only=True)["model"]
    device = resolve_device(cfg.device)
    t1 = time.perf_counter()
    model, again_data = trained_model(cfg, state, data=data, device=device)
    again, _ = measure_test_set(cfg, model, again_data, device=device)
    row["retest_s"] = round(time.perf_counter() - t1, 2)
    row["retest"] = {k: again.get(k) for k in KEYS}
    n = int(again.get("test/n", 0)) or 1
    row["retest_within_one_point"] = all(
        abs(float(again[k]) - float(res.test_metrics[k])) <= 1.0 / n + 1e-9 for k in KEYS
    )
    row["on"] = str(next(model.parameters()).device)
    return row


def table(rows: list[dict[str, Any]]) -> list[str]:
    """The printed table: accuracies, the re-test's agreement, times."""
    head = (f"{'method':<12} {'prec':<5} {'clean':>6} {'PGD-20':>6} {'AA':>6} "
            f"{'re-test ±1 pt':>13} {'train_s':>8} {'epoch_s':>8} {'retest_s':>8}  on")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['method']:<12} {r['precision']:<5} ERROR "
                         f"{r['error'].strip().splitlines()[-1]}")  # fmt: skip
            continue
        epochs = sorted(r["epoch_s"])
        med = epochs[len(epochs) // 2] if epochs else float("nan")
        lines.append(
            f"{r['method']:<12} {r['precision']:<5} {r['test/clean_acc']:>6.3f} "
            f"{r['test/pgd_acc']:>6.3f} {r['test/aa_acc']:>6.3f} "
            f"{'yes' if r['retest_within_one_point'] else 'NO':>13} {r['train_s']:>8.1f} "
            f"{med:>8.3f} {r['retest_s']:>8.1f}  {r['on']}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (default), cpu or auto")
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4)")
    ap.add_argument(
        "--out", help="JSON file (default bench/results/<date>-gpu-check-<device>.json)"
    )
    args = ap.parse_args(argv)
    info = machine()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__} on {info.get('gpu', 'no GPU')}", flush=True)
    data = load_data("digits")
    rows = []
    for method, precision in RUNS:
        cfg = TrainConfig.from_dict({**BASE, "method": method, "precision": precision,
                                     "device": args.device, "epochs": args.epochs})  # fmt: skip
        try:
            row = check_one(cfg, data)
        except Exception:  # noqa: BLE001 - one method's failure is a finding; go on
            row = {"method": method, "precision": precision, "error": traceback.format_exc()}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "epoch_s"}, default=str), flush=True)
    print("\n" + "\n".join(table(rows)))
    date = dt.date.today().isoformat()
    out = Path(args.out or REPO / "bench" / "results" / f"{date}-gpu-check-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date, "machine": info, "base": BASE, "runs": rows},
                              indent=1, default=str) + "\n")  # fmt: skip
    print(f"results in {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
