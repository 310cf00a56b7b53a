"""Figure 7, the default study's wall time, split into search and finalists.

Runs the README's main job as a user would: ``.venv/bin/study run`` with no
arguments besides ``--name``, ``--tracking-uri sqlite:///<tmp>/mlflow.db`` and
``--storage <tmp>/studies``, in a fresh temporary working folder, as a
subprocess of this benchmark. The wall time of the command is timed around the
subprocess; the split comes from the study's parent MLflow run (tag
``energy_study.role`` = ``study``): ``study/search_s`` (Tune's ``fit``) and
``study/final_s`` (the finalists' PGD-20 + AutoAttack tasks). What is left,
``total - search - final``, is the start-up and the rest (interpreter and
imports, the MLflow store, the Ray cluster's start and stop, reconciling runs).
The number of finalists and of final test points come from the finalists' runs
(tag ``energy_study.finalist``, metric ``final/n``).

The same command with ``--finalists 0`` (search only) runs alternately with it
(default, search only, default, ...; 2 rounds), and the figure is the median
over rounds. ``--quick`` is a smoke test of this path, not the figure: one round
of a two-trial study (``SMOKE_ARGS``).

After the timed runs (full mode only), one finalist of the last default study
is evaluated again in this process with one torch thread (what one finalist
task gets: one CPU), split into clean + PGD-20 and AutoAttack, with
AutoAttack's own per-attack times from its log: where the finalists' time goes.
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import GUARD, REPO, alternate, load_average, median, without

TARGET_S = 90.0
TARGET = "default study <= 90 s on 2 cores with its finalists evaluated on the full test set"
TAG_ROLE = "energy_study.role"  # study/tracking.py
TAG_FINALIST = "energy_study.finalist"  # study/finals.py
VARIANTS = {"default": [], "search_only": ["--finalists", "0"]}
# --quick (a smoke test, not the figure): the smallest study that still runs a search
# with ASHA (2 trials of 2 epochs, grace 1: the rung can stop the second) and the
# finalists' stage (1 finalist, PGD-20 + AutoAttack on 32 test points)
SMOKE_ARGS = ["--trials", "2", "--epochs", "2", "--grace-period", "1"]
SMOKE_ARGS += ["--finalists", "1", "--final-n", "32"]


def study_command() -> Path:
    """The ``study`` entry point of the repository's virtualenv."""
    path = REPO / ".venv" / "bin" / "study"
    if not path.exists():
        raise SystemExit(f"benchmark needs {path} (pip install -e . into .venv)")
    return path


def _tail(path: Path, folder: Path, lines: int = 15) -> list[str]:
    """The last ``lines`` of a log, with ``folder`` written ``<tmp>`` (no paths in results)."""
    try:
        text = path.read_text(errors="replace").replace(str(folder), "<tmp>")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def read_store(tracking_uri: str, name: str) -> dict[str, Any]:
    """The parent run's split and the finalists / trials of study ``name``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise RuntimeError(f"no MLflow experiment {name!r} in {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "study"]
    if len(parents) != 1:
        raise RuntimeError(f"expected one parent run (role study), found {len(parents)}")
    parent = parents[0]
    trials = [r for r in runs if r.data.tags.get(TAG_ROLE) == "trial"]
    finalists = sorted(
        (r for r in runs if r.data.tags.get(TAG_FINALIST)),
        key=lambda r: int(r.data.tags[TAG_FINALIST]),
    )
    per_trial = []
    for r in trials:
        epoch_s = [m.value for m in client.get_metric_history(r.info.run_id, "time/epoch_s")]
        per_trial.append(
            {
                "status": r.info.status,
                "epochs": int(r.data.metrics.get("epoch", 0)),
                "run_s": (r.info.end_time - r.info.start_time) / 1e3 if r.info.end_time else None,
                "epoch_s_median": median(epoch_s) if epoch_s else None,
                "early_stopped": r.data.tags.get("energy_study.early_stopped"),
            }
        )
    m = parent.data.metrics
    return {
        "search_s": m.get("study/search_s"),
        "spec_finalists": parent.data.params.get("finalists"),
        "spec_final_n": parent.data.params.get("final_n"),  # "None": the whole test set
        "final_s": m.get("study/final_s"),
        "parent_start": parent.info.start_time / 1e3,
        "parent_end": parent.info.end_time / 1e3 if parent.info.end_time else None,
        "finalists": len(finalists),
        "final_n": [
            int(r.data.metrics["final/n"]) for r in finalists if "final/n" in r.data.metrics
        ],
        "finalist_metrics": [
            {k: v for k, v in r.data.metrics.items() if k.startswith("final/")} for r in finalists
        ],
        "finalist_run_ids": [r.info.run_id for r in finalists],
        "trials": len(trials),
        "epochs_trained": sum(t["epochs"] for t in per_trial),
        "trial_epoch_s_median": median(
            t["epoch_s_median"] for t in per_trial if t["epoch_s_median"]
        )
        if any(t["epoch_s_median"] for t in per_trial)
        else None,
        "trial_run_s_sum": sum(t["run_s"] or 0.0 for t in per_trial),
        "per_trial": per_trial,
    }


def run_study(extra: list[str], name: str, folder: Path, timeout_s: float = 1800.0) -> dict:
    """``study run --name NAME --tracking-uri ... --storage ... EXTRA`` in ``folder``; timed."""
    uri = f"sqlite:///{(folder / 'mlflow.db').as_posix()}"
    cmd = [str(study_command()), "run", "--name", name, "--tracking-uri", uri]
    cmd += ["--storage", str(folder / "studies"), *extra]
    log = folder / "study-run.log"
    load_before = load_average()
    with log.open("w") as out:
        t_wall = time.time()
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=folder, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
        )
        total = time.perf_counter() - t0
        t_exit = time.time()
    rec: dict[str, Any] = {
        "args": ["study", "run", "--name", name, "--tracking-uri", "sqlite:///<tmp>/mlflow.db"]
        + ["--storage", "<tmp>/studies", *extra],
        "returncode": proc.returncode,
        "total_s": total,
        "load_before": load_before,
        "load_after": load_average(),
    }
    if proc.returncode != 0:
        rec["output_tail"] = _tail(log, folder, 30)
        raise RuntimeError(
            f"study run failed ({proc.returncode}): " + "\n".join(rec["output_tail"])
        )
    store = read_store(uri, name)
    rec.update(store)
    search, final = store["search_s"] or 0.0, store["final_s"] or 0.0
    rec["other_s"] = total - search - final
    # the parent run exists once the store is open: before it, the interpreter, the
    # imports and the store's creation; after its end, Ray's shutdown and the exit
    rec["before_parent_run_s"] = store["parent_start"] - t_wall
    if store["parent_end"]:
        rec["after_parent_end_s"] = t_exit - store["parent_end"]
    printed = re.search(r"final evaluation of (\d+) finalist", log.read_text(errors="replace"))
    rec["printed_finalists"] = int(printed.group(1)) if printed else 0
    rec["output_tail"] = _tail(log, folder, 8)
    return rec


def finalist_breakdown(folder: Path, run_id: str) -> dict[str, Any]:
    """One finalist evaluated again here with 1 torch thread (a finalist task's CPU), as
    ``trainables.loop.evaluate_weights`` does it, in pieces: data and weights, clean +
    PGD, AutoAttack (with the library's per-attack times from its log)."""
    import io

    import torch
    from mlflow.tracking import MlflowClient

    from study.tracking import quiet_mlflow
    from trainables.config import TrainConfig
    from trainables.loop import autoattack_on, measure, resolve_device, trained_model

    quiet_mlflow()  # no download progress bar
    client = MlflowClient(f"sqlite:///{(folder / 'mlflow.db').as_posix()}")
    with tempfile.TemporaryDirectory(prefix="bench-fig7-ckpt-") as tmp:
        path = client.download_artifacts(run_id, "checkpoints/best.pt", tmp)
        state = torch.load(
            io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True
        )
    cfg = TrainConfig.from_dict(state["config"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lines: list[str] = []
    handler = _Lines(lines)
    logger = logging.getLogger("auto-attack")
    try:
        t = time.perf_counter()
        device = resolve_device(cfg.device)
        model, data = trained_model(cfg, state["model"], device=device)
        points = data.test.take(data.test.subset_indices(None, seed=cfg.split_seed))
        load_s = time.perf_counter() - t
        GUARD.wait()
        t = time.perf_counter()
        measure(cfg, model, points, device=device, autoattack=False)
        pgd_s = time.perf_counter() - t
        GUARD.wait()
        logger.addHandler(handler)
        t = time.perf_counter()
        aa = autoattack_on(cfg, model, points, device=device, verbose=True)
        aa_s = time.perf_counter() - t
    finally:
        logger.removeHandler(handler)
        torch.set_num_threads(threads)
    per_attack: dict[str, float] = {}
    prev = 0.0
    for line in lines:
        found = re.search(r"after (\S+): .*total time ([\d.]+) s", line)
        if found:
            per_attack[found.group(1).lower()] = round(float(found.group(2)) - prev, 2)
            prev = float(found.group(2))
    return {
        "test_points": len(points),
        "threads": 1,
        "load_s": load_s,
        "clean_pgd_s": pgd_s,
        "eval_steps": cfg.eval_steps,
        "autoattack_s": aa_s,
        "autoattack_version": cfg.aa_version,
        "autoattack_attacks": list(aa.attacks),
        "autoattack_per_attack_s": per_attack,
        "autoattack_log": lines,
        "aa_acc": aa.robust_acc,
        "clean_acc": aa.clean_acc,
    }


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run(quick: bool) -> dict[str, Any]:
    rounds = 1 if quick else 2
    # later options win: the search-only variant's --finalists 0 follows SMOKE_ARGS
    variants = {v: (SMOKE_ARGS if quick else []) + a for v, a in VARIANTS.items()}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    last_default: dict[str, Any] = {}
    keep = tempfile.TemporaryDirectory(prefix="bench-fig7-keep-")  # the last default store

    def one(variant: str) -> float:
        i = len(runs[variant])
        name = f"bench-default-{variant.replace('_', '-')}-{i + 1}"
        folder = Path(tempfile.mkdtemp(prefix="bench-fig7-", dir=keep.name))
        print(f"[bench] figure 7: study run ({variant}, round {i + 1}/{rounds}) ...", flush=True)
        rec = run_study(variants[variant], name, folder)
        print(
            f"[bench] figure 7: {variant}: total {rec['total_s']:.1f} s = search "
            f"{rec['search_s']:.1f} + final {rec['final_s']:.1f} + other {rec['other_s']:.1f}",
            flush=True,
        )
        runs[variant].append(rec)
        if variant == "default":
            last_default.update(folder=folder, run_ids=rec["finalist_run_ids"])
        return rec["total_s"]

    try:
        alternate({v: (lambda v=v: one(v)) for v in VARIANTS}, repeats=rounds, warmup=0)
        breakdown = None
        if last_default.get("run_ids") and not quick:
            try:
                breakdown = finalist_breakdown(last_default["folder"], last_default["run_ids"][0])
            except Exception as exc:  # noqa: BLE001 - the timed figure stands without it
                breakdown = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        keep.cleanup()

    def med(variant: str, key: str) -> float | None:
        values = [r[key] for r in runs[variant] if r.get(key) is not None]
        return median(values) if values else None

    summary = {
        v: {
            k: med(v, k)
            for k in (
                "total_s",
                "search_s",
                "final_s",
                "other_s",
                "before_parent_run_s",
                "after_parent_end_s",
                "epochs_trained",
                "trial_epoch_s_median",
            )
        }
        for v in VARIANTS
    }
    d = runs["default"]
    finalists = [r["finalists"] for r in d]
    final_n = sorted({n for r in d for n in r["final_n"]})
    total = summary["default"]["total_s"]
    # the target asks for the finalists on the whole test set (final_n unset)
    full_test = bool(final_n) and all(r["spec_final_n"] in (None, "None") for r in d)
    return {
        "setup": {
            "command": "study run --name NAME --tracking-uri sqlite:///<tmp>/mlflow.db "
            "--storage <tmp>/studies [--finalists 0]",
            "cwd": "a fresh temporary folder per run",
            "rounds": rounds,
            "order": "default, search_only, alternately",
            "smoke": quick,
            "extra_args": {v: " ".join(a) for v, a in variants.items()},
        },
        "summary": summary,
        "finalists": finalists,
        "final_n": final_n,
        "runs": without(runs, "finalist_run_ids"),
        "finalist_breakdown": breakdown,
        "targets": {
            "default_total_s": {
                "value": total,
                "target": TARGET,
                "met": None if total is None else bool(total <= TARGET_S and full_test),
            }
        },
    }
