"""Driver time spent in MLflow calls per trial result: the MLflow callback's writes made
in the Tune loop's thread (synchronous, as before the background writer) vs queued to
its background writer; and the cost of carrying ``best.pt`` in every epoch checkpoint.

Runs two identical small studies (digits, small CNN, SQLite store, local Ray cluster)
and prints, for each mode, the driver seconds spent inside
:class:`study.callbacks.MlflowCallback`'s Tune hooks divided by the number of results.
Usage: ``python -m bench.mlflow_hooks [TRIALS] [EPOCHS]``.

``python -m bench.mlflow_hooks requests [EPOCHS]`` (no Ray, a few seconds) prints instead
the MLflow client calls (:func:`requests_per_trial`) one finished trial costs the callback.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

BASE = {
    "dataset": "digits", "model": "small_cnn", "eps": 0.1, "step_size": 0.025,
    "attack_steps": 2, "val_attack_steps": 3, "eval_steps": 3, "eval_step_size": 0.025,
    "batch_size": 64, "autoattack": False, "test_subset": 200,
}  # fmt: skip


def run(background: bool, folder: Path, trials: int, epochs: int) -> tuple[float, int, float]:
    """One study; returns (hook seconds, results, wall seconds)."""
    from study import callbacks
    from study.runner import run_study
    from study.spec import StudySpec

    made: list[callbacks.MlflowCallback] = []
    init = callbacks.MlflowCallback.__init__

    def keep(self, *args, **kwargs):  # the study's callback, to read its counters
        init(self, *args, **kwargs)
        made.append(self)

    callbacks.MlflowCallback.BACKGROUND = background
    callbacks.MlflowCallback.__init__ = keep  # type: ignore[method-assign]
    try:
        spec = StudySpec(
            name=f"hooks-{'bg' if background else 'sync'}", space="smoke", base=dict(BASE),
            trials=trials, epochs=epochs, asha=False, finalists=0, max_concurrent=2,
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}", storage=str(folder / "studies"),
        )  # fmt: skip
        t0 = time.perf_counter()
        run_study(spec)
        wall = time.perf_counter() - t0
    finally:
        callbacks.MlflowCallback.__init__ = init  # type: ignore[method-assign]
        callbacks.MlflowCallback.BACKGROUND = True
    cb = made[-1]
    return cb.hook_s, cb.results, wall


def checkpoint_cost(folder: Path) -> dict[str, float]:
    """Bytes of ``last.pt`` and ``best.pt`` of a digits run, and the time to copy an
    epoch checkpoint with and without ``best.pt`` into a local storage folder."""
    import shutil

    from trainables.config import TrainConfig
    from trainables.loop import train

    cfg = TrainConfig.from_dict({**BASE, "epochs": 1, "method": "standard", "test_subset": 50})
    out = folder / "run"
    train(cfg, output_dir=out)
    last, best = out / "checkpoints/last.pt", out / "checkpoints/best.pt"
    times = {}
    shutil.copy2(last, folder / "warm-up.pt")  # the page cache holds both files first
    shutil.copy2(best, folder / "warm-up.pt")
    for label, files in (("last", [last]), ("last+best", [last, best])):
        t0 = time.perf_counter()
        for i in range(20):
            dst = folder / f"copy-{label}-{i}"
            dst.mkdir()
            for f in files:
                shutil.copy2(f, dst / f.name)
        times[label] = (time.perf_counter() - t0) / 20
    return {
        "last_bytes": last.stat().st_size,
        "best_bytes": best.stat().st_size,
        "copy_last_ms": 1000 * times["last"],
        "copy_last_best_ms": 1000 * times["last+best"],
    }


def requests_per_trial(folder: Path, epochs: int = 2) -> dict[str, int]:
    """The MLflow client calls (each one request to the store; the artifact repository's
    own look-ups inside them not counted) that :class:`study.callbacks.MlflowCallback`
    makes for one trial of ``epochs`` epochs that finishes, fed the Tune events such a
    trial makes (start, one result per epoch, the last with test metrics, the end) and
    a final checkpoint shaped like a real one (all of ``trainables.files``' files; the
    energy histogram in it when this version of the project has the worker draw it).
    Returns ``{method: calls}`` (client methods of ``bench.tracking_scale``'s list) and
    ``"total"``. The store: SQLite in ``folder``.

    Args:
        folder: an empty folder for the store, the study and the checkpoint.
        epochs: the trial's epochs (one result each).
    """
    import json
    from types import SimpleNamespace

    import numpy as np
    from ray.tune import Checkpoint

    from bench.tracking_scale import Probe
    from reports.vocabulary import ENERGY_HIST
    from study.callbacks import MlflowCallback
    from study.runner import open_parent_run
    from study.spec import StudySpec
    from trainables import files

    spec = StudySpec(
        name="requests", space="smoke", base=dict(BASE), trials=1, epochs=epochs,
        asha=False, finalists=0, tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
        storage=str(folder / "studies"),
    )  # fmt: skip
    spec.save()
    _, parent = open_parent_run(spec)
    ckpt = folder / "checkpoint"
    for rel in (files.BEST_CHECKPOINT, files.LAST_CHECKPOINT, files.CONFIG_FILE, files.FINAL_FILE):
        (ckpt / rel).parent.mkdir(parents=True, exist_ok=True)
        (ckpt / rel).write_text(f"{rel}\n")
    rows = [{"epoch": e, "val/pgd_acc": 0.1 * e, "lr": 0.01} for e in range(1, epochs + 1)]
    (ckpt / files.METRICS_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    np.savez(ckpt / files.ENERGIES_FILE, energy=np.arange(3.0))
    try:
        from trainables.reporting import draw_energy_histogram  # the worker's side
    except ImportError:  # a version of the project that draws it in the driver
        draw_energy_histogram = None
    if draw_energy_histogram is not None:
        draw_energy_histogram(ckpt, "trial")
        assert (ckpt / ENERGY_HIST).is_file()
    config = {"method": "weat_adv", "beta": 1.0, "weight_fn": "weat"}
    trial = SimpleNamespace(
        trial_id="bench_00000", config=config, checkpoint=Checkpoint.from_directory(ckpt),
        last_result={**rows[-1], "test/clean_acc": 0.9, "training_iteration": epochs},
    )  # fmt: skip
    probe = Probe()
    with probe.installed():
        probe.begin()
        callback = MlflowCallback(spec, parent)
        callback.on_trial_start(0, [], trial)
        for row in rows[:-1]:
            result = {**row, "training_iteration": row["epoch"], "hostname": "h", "pid": 1}
            callback.on_trial_result(0, [], trial, result)
        last = {**trial.last_result, "hostname": "h", "pid": 1}
        callback.on_trial_result(0, [], trial, last)
        callback.on_trial_complete(0, [], trial)
        callback.on_experiment_end([])
        probe.end()
    calls: dict[str, int] = {}
    for key, n in probe.calls.items():
        method = key.split(":", 1)[1]
        calls[method] = calls.get(method, 0) + n
    calls["total"] = sum(calls.values())
    return calls


def main() -> None:
    from study.runner import init_ray

    if sys.argv[1:2] == ["requests"]:
        epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
        with tempfile.TemporaryDirectory() as tmp:
            calls = requests_per_trial(Path(tmp), epochs)
        total = calls.pop("total")
        shown = ", ".join(f"{k} {v}" for k, v in sorted(calls.items()))
        print(f"MLflow requests for one finished trial of {epochs} epochs: {total} ({shown})")
        return

    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp:
        for background in (False, True):
            hook_s, results, wall = run(background, Path(tmp) / str(background), trials, epochs)
            mode = "background writer" if background else "synchronous (before)"
            print(
                f"{mode:22s}: {1000 * hook_s / max(results, 1):8.2f} ms of driver time in "
                f"MLflow hooks per result ({results} results, {hook_s:.3f} s; study {wall:.1f} s)"
            )
        cost = checkpoint_cost(Path(tmp) / "ckpt")
        print(
            f"epoch checkpoint: last.pt {cost['last_bytes'] / 1e3:.0f} kB, best.pt "
            f"{cost['best_bytes'] / 1e3:.0f} kB; copy to local storage "
            f"{cost['copy_last_ms']:.2f} ms (last) vs {cost['copy_last_best_ms']:.2f} ms "
            "(last + best)"
        )


if __name__ == "__main__":
    main()
