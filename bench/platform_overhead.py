"""Figures 2, 3 and 6: what the platform costs around a training.

All three run real studies through :func:`study.runner.run_study` (Ray Tune,
the trial backends, MLflow logging from the driver into a SQLite store, a
checkpoint per epoch) on one local Ray cluster started once with
:func:`study.runner.init_ray`, exactly as ``study run`` starts it. The Ray
cluster's start and the MLflow store's creation are once-per-study costs and
are reported on their own.

* Figure 2 (platform overhead): one trial of a workload of about a minute
  (TRADES, small CNN, the CIFAR-10 JPEG folder, 2 CPUs) through ``study run``
  with each backend (``direct``, the ``auto`` choice for one CPU worker, and
  ``train``, a Ray Train ``TorchTrainer``), against the same
  :func:`trainables.loop.train` call in-process (no Ray, no MLflow; the cluster
  is up but idle meanwhile, its CPU use is recorded). The three run in turn,
  ``rounds`` times. Per round, the per-epoch ratio compares the loop's own
  epoch times (``time/epoch_s``) of the trial and the in-process call, and the
  fixed start-up is the rest of the wall time beyond the in-process call's
  rest: ``(wall - Σ epoch_s)_trial - (wall - Σ epoch_s)_in-process``; medians
  over rounds. A no-op ``TorchTrainer.fit`` and a no-op Tune trial show where
  the fixed cost goes.
* Figure 3 (concurrency): the same two-trial study of 1-CPU trials run with
  ``max_concurrent`` 1 (one after the other) and 2 (at once); throughput ratio
  = wall(sequential) / wall(concurrent). Threads per trial: what Ray sets
  (``OMP_NUM_THREADS``) and what torch then uses, read inside 1- and 2-CPU
  actors, and the CPU each trial process really used (from ``/proc``).
* Figure 6 (memory): peak resident memory (``VmHWM``) of the trial processes
  and resident memory of the driver sampled during a 16-trial study of tiny
  trials, its growth per finished trial fitted by least squares; the in-process
  peak of the same tiny training, in a fresh process, for comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import CIFAR_JPEG, GUARD, REPO, ProcSampler, median, peak_rss_mib, without

STUDY_ENV_NOTE = (
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2, RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0, "
    "RAY_TRAIN_METRICS_ENABLED=0 (set by study.runner.init_ray on a local cluster)"
)


# --quick (a smoke test of the code paths, not the figures): the same workloads cut down
SMOKE = {"train_subset": 512, "val_subset": 128, "test_subset": 128}


def fig2_config(epochs: int, smoke: bool = False) -> dict[str, Any]:
    cfg = {
        "method": "trades",
        "model": "small_cnn",
        "dataset": "imagefolder",
        "data_root": str(CIFAR_JPEG),
        "epochs": epochs,
        "batch_size": 128,
        "attack_steps": 10,
        "val_subset": 512,
        "val_attack_steps": 10,
        "test_subset": 1000,
        "eval_steps": 20,
        "autoattack": False,
    }
    return {**cfg, **SMOKE} if smoke else cfg


def fig3_config(smoke: bool = False) -> dict[str, Any]:
    if smoke:
        return {**fig2_config(1, smoke), "train_subset": 1024, "val_subset": 64, "test_subset": 64}
    return {**fig2_config(2), "train_subset": 2048, "test_subset": 512}


def _workload(cfg: dict[str, Any]) -> str:
    train = cfg.get("train_subset", 7200)
    return (
        f"TRADES K={cfg['attack_steps']}, small_cnn, CIFAR-10 JPEG folder ({train} train, "
        f"{cfg['val_subset']} val with PGD-{cfg['val_attack_steps']}, {cfg['test_subset']} "
        f"test with PGD-{cfg['eval_steps']}, no AutoAttack), batch {cfg['batch_size']}"
    )


def tiny_config() -> dict[str, Any]:
    return {
        "method": "trades",
        "model": "small_cnn",
        "dataset": "digits",
        "epochs": 1,
        "batch_size": 64,
        "train_subset": 256,
        # 4 steps in all: onecycle's rise must span at least 2 steps (torch's OneCycleLR
        # formula divides by zero for pct_start * steps <= 1)
        "lr_pct_start": 0.5,
        "attack_steps": 2,
        "val_subset": 64,
        "val_attack_steps": 2,
        "test_subset": 64,
        "eval_steps": 2,
        "autoattack": False,
    }


# --- helpers --------------------------------------------------------------------------
class Studies:
    """Runs studies in one temporary storage folder and MLflow store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.count = 0

    def create_store(self) -> float:
        """Create the MLflow store (schema migrations): a once-per-store cost."""
        from study.tracking import MlflowTracker

        t = time.perf_counter()
        MlflowTracker(self.tracking_uri, "bench-store")
        return time.perf_counter() - t

    def run(self, base: dict[str, Any], **spec_kwargs: Any):
        """Run one study; returns (wall seconds, outcome, spec)."""
        from study.runner import run_study
        from study.spec import StudySpec

        self.count += 1
        GUARD.wait()  # no other work on the machine (our last study's workers gone too)
        spec = StudySpec(
            name=f"bench-{self.count}",
            space="fixed",
            base=base,
            asha=False,
            tracking_uri=self.tracking_uri,
            storage=str(self.root / "studies"),
            # no finalists' stage (StudySpec's default is 3): the trials are what is timed
            **{"trials": 1, "finalists": 0, **spec_kwargs},
        )
        t = time.perf_counter()
        outcome = run_study(spec)
        wall = time.perf_counter() - t
        bad = [t for t in outcome.trials if t.status != "FINISHED"]
        if bad:
            raise RuntimeError(f"benchmark study {spec.name}: trial(s) not finished: {bad}")
        return wall, outcome, spec


def trial_epochs(spec, trial_id: str) -> list[dict[str, float]]:
    from study.trial import trial_files

    with trial_files(spec, trial_id) as folder:  # the trial's last checkpoint, in storage
        lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(ln) for ln in lines if ln.strip()]


_IN_PROCESS = """
import json, sys, tempfile, time
import torch
from trainables.config import TrainConfig
from trainables.loop import train
torch.set_num_threads(int(sys.argv[2]))
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
with tempfile.TemporaryDirectory(prefix="bench-inproc-") as tmp:
    t = time.perf_counter()
    result = train(cfg, output_dir=tmp)
    wall = time.perf_counter() - t
print(json.dumps({"wall_s": wall, "history": result.history}))
"""


def in_process(base: dict[str, Any], threads: int = 2) -> dict[str, Any]:
    """The same training called in-process (no Ray, no MLflow), timed around ``train()``.

    It runs in a fresh interpreter that imports only torch and the trainables, as
    ``study train`` would: this benchmark's own process holds Ray, MLflow and the
    other figures' state, whose garbage collection slowed its epochs measurably.
    """
    GUARD.wait()
    done = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, json.dumps(base), str(threads)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if done.returncode != 0:
        raise RuntimeError(f"in-process training failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["epoch_s"] = [h["time/epoch_s"] for h in out["history"]]
    return out


def _rest(wall: float, epochs: list[float]) -> float:
    return wall - sum(epochs)


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0


def thread_probe() -> dict[str, Any]:
    """OMP_NUM_THREADS and torch threads inside Ray actors given 1 and 2 CPUs."""
    import ray

    @ray.remote
    class Probe:
        def read(self, cpus: float) -> dict[str, Any]:
            import torch

            seen = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
            seen["torch_threads_at_start"] = torch.get_num_threads()
            torch.set_num_threads(max(1, int(cpus)))  # what trainables.ray_adapter does
            seen["torch_threads_after_adapter"] = torch.get_num_threads()
            return seen

    out = {}
    for cpus in (1, 2):
        actor = Probe.options(num_cpus=cpus).remote()
        out[f"{cpus}_cpu"] = ray.get(actor.read.remote(cpus))
        ray.kill(actor)
    return out


# --- figures ----------------------------------------------------------------------------
def _tree_cpu_s() -> float:
    """CPU seconds used so far by the processes below this one (the Ray cluster)."""
    from bench.common import _cpu_seconds, descendants

    return sum(_cpu_seconds(pid) or 0.0 for pid in descendants(os.getpid()))


def fig2(studies: Studies, epochs: int, rounds: int, smoke: bool = False) -> dict[str, Any]:
    """In-process, ``direct`` and ``train`` in turn, ``rounds`` times; the order rotates
    each round, so no path always runs first (the one right after figure 1's machine
    state, or another study's leftovers)."""
    runs: dict[str, list[dict[str, Any]]] = {"in_process": [], "direct": [], "train": []}
    names = list(runs)
    base = fig2_config(epochs, smoke)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            if name == "in_process":
                t, c = time.perf_counter(), _tree_cpu_s()
                b = in_process(base)
                cpus = os.cpu_count() or 1
                used = max(0.0, _tree_cpu_s() - c)  # workers that exit meanwhile drop out
                b["idle_cluster_cpu_share"] = used / (time.perf_counter() - t) / cpus
                runs["in_process"].append(b)
                print(f"[bench] fig2 round {r + 1} in-process: {b['wall_s']:.1f} s", flush=True)
                continue
            # a slow sampler: the trial uses both cores; the peak (VmHWM) is kept anyway
            with ProcSampler(interval=5.0) as sampler:
                wall, outcome, spec = studies.run(base, backend=name, cpus_per_worker=2.0)
            hist = trial_epochs(spec, outcome.trials[0].trial_id)
            peaks = [
                p.peak_mib
                for p in sampler.procs.values()
                if "ImplicitFunc" in p.name or "RayTrainWorker" in p.name
            ]
            runs[name].append(
                {
                    "wall_s": wall,
                    "epoch_s": [h["time/epoch_s"] for h in hist],
                    "trial_peak_rss_mib": max(peaks) if peaks else None,
                }
            )
            print(f"[bench] fig2 round {r + 1} {name}: {wall:.1f} s", flush=True)

    per_round: dict[str, list[dict[str, float]]] = {"direct": [], "train": []}
    for i, base_run in enumerate(runs["in_process"]):
        for backend in ("direct", "train"):
            run_ = runs[backend][i]
            per_round[backend].append(
                {
                    "per_epoch_ratio": sum(run_["epoch_s"]) / sum(base_run["epoch_s"]),
                    "fixed_startup_s": _rest(run_["wall_s"], run_["epoch_s"])
                    - _rest(base_run["wall_s"], base_run["epoch_s"]),
                    "wall_ratio": run_["wall_s"] / base_run["wall_s"],
                }
            )
    summary: dict[str, Any] = {
        "in_process": {
            "wall_s": median(r["wall_s"] for r in runs["in_process"]),
            "epochs_s": median(sum(r["epoch_s"]) for r in runs["in_process"]),
            "rest_s": median(_rest(r["wall_s"], r["epoch_s"]) for r in runs["in_process"]),
            "idle_cluster_cpu_share": median(
                r["idle_cluster_cpu_share"] for r in runs["in_process"]
            ),
            # the noise of this machine: the same in-process run, round to round
            "epochs_s_min_max_over_median": [
                min(sum(r["epoch_s"]) for r in runs["in_process"])
                / median(sum(r["epoch_s"]) for r in runs["in_process"]),
                max(sum(r["epoch_s"]) for r in runs["in_process"])
                / median(sum(r["epoch_s"]) for r in runs["in_process"]),
            ],
        }
    }
    targets = {}
    for backend in ("direct", "train"):
        rows = per_round[backend]
        summary[backend] = {
            "wall_s": median(r["wall_s"] for r in runs[backend]),
            "epochs_s": median(sum(r["epoch_s"]) for r in runs[backend]),
            "rest_s": median(_rest(r["wall_s"], r["epoch_s"]) for r in runs[backend]),
            **{k: median(row[k] for row in rows) for k in rows[0]},
        }
        ratio, fixed = summary[backend]["per_epoch_ratio"], summary[backend]["fixed_startup_s"]
        targets[f"{backend}_per_epoch_ratio"] = {
            "value": ratio,
            "target": "<= 1.05",
            "met": ratio <= 1.05,
        }
        targets[f"{backend}_fixed_startup_s"] = {
            "value": fixed,
            "target": "<= 15",
            "met": fixed <= 15,
        }
    return {
        "setup": {
            "workload": _workload(base),
            "epochs": epochs,
            "rounds": rounds,
            "smoke": smoke,
            "cpus_per_trial": 2,
            "env": STUDY_ENV_NOTE,
        },
        "summary": summary,
        "per_round": per_round,
        "runs": without(runs, "history"),
        "targets": targets,
        "history_in_process": runs["in_process"][0]["history"],
    }


def startup_breakdown(root: Path, repeats: int, imports: bool = True) -> dict[str, Any]:
    """Where the fixed cost of the two backends goes, with trials that do no work.

    * a bare ``TorchTrainer.fit`` (one 1-CPU worker, no-op loop) from the driver:
      until the worker process exists, from its start to the loop's first line
      (imports, Ray Train worker set-up, torch process group), and from the loop's
      end until ``fit`` returns (Train's polling and teardown);
    * a plain Tune function trial with no work (what ``direct`` starts per trial);
    * importing torch and the trainables in a fresh interpreter (every new trial
      or worker process pays it).
    """
    import ray
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def noop_loop(config: dict[str, Any]) -> None:  # pickled by value: no bench import
        import json as _json
        import os as _os
        import time as _time

        started = _time.time()
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        born = btime + ticks / _os.sysconf("SC_CLK_TCK")
        with open(config["out"], "w") as f:
            _json.dump({"fn_start": started, "proc_start": born, "fn_end": _time.time()}, f)

    def noop_trial(config: dict[str, Any]) -> None:
        tune.report({"done": 1})

    train_rows, tune_walls = [], []
    for r in range(repeats):
        GUARD.wait()
        out = root / f"startup-{r}.json"
        t0 = time.time()
        TorchTrainer(
            noop_loop,
            train_loop_config={"out": str(out)},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=f"startup-{r}", storage_path=str(root / "train")),
        ).fit()
        t_end = time.time()
        stamps = json.loads(out.read_text())
        train_rows.append(
            {
                "fit_s": t_end - t0,
                "until_worker_process_s": stamps["proc_start"] - t0,
                "worker_process_to_loop_s": stamps["fn_start"] - stamps["proc_start"],
                "loop_end_to_fit_return_s": t_end - stamps["fn_end"],
            }
        )
        GUARD.wait()
        t0 = time.time()
        tune.Tuner(
            tune.with_resources(noop_trial, {"cpu": 1}),
            run_config=tune.RunConfig(
                name=f"startup-tune-{r}", storage_path=str(root / "tune"), verbose=0
            ),
        ).fit()
        tune_walls.append(time.time() - t0)
    import_s = {}
    for what in ("torch", "trainables.loop", "ray.train.torch") if imports else ():
        GUARD.wait()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {what}"], check=True, cwd=REPO)
        import_s[what] = time.perf_counter() - t0
    assert ray.is_initialized()
    keys = train_rows[0].keys()
    return {
        "torch_trainer_noop": {k: median(row[k] for row in train_rows) for k in keys},
        "torch_trainer_runs": train_rows,
        "tune_function_trial_noop_s": median(tune_walls),
        "fresh_interpreter_import_s": import_s,
        "env": STUDY_ENV_NOTE,
    }


def fig3(studies: Studies, quick: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"threads": thread_probe()}
    runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "concurrent": []}
    rounds = 1 if quick else 2
    for _ in range(rounds):
        for name, conc in (("sequential", 1), ("concurrent", 2)):
            with ProcSampler(interval=0.5) as sampler:
                wall, outcome, spec = studies.run(
                    fig3_config(quick), trials=2, max_concurrent=conc, cpus_per_worker=1.0
                )
            epoch_s = [
                sum(h["time/epoch_s"] for h in trial_epochs(spec, t.trial_id))
                for t in outcome.trials
            ]
            utils = [
                p.cpu_util
                for p in sampler.procs.values()
                if "ImplicitFunc" in p.name and p.cpu_util is not None and p.last_t - p.first_t > 5
            ]
            # the trial phase: the first trial process taking its actor to the last one's end
            pids = {int(t.metrics.get("pid", -1)) for t in outcome.trials}
            trial_procs = [p for pid, p in sampler.procs.items() if pid in pids and p.named_t]
            phase = (
                max(p.last_t for p in trial_procs) - min(p.named_t for p in trial_procs)
                if trial_procs
                else wall  # trials too short for the sampler to see them named
            )
            runs[name].append(
                {
                    "wall_s": wall,
                    "trial_phase_s": phase,
                    "trial_epochs_s": epoch_s,
                    "trial_process_cpu_util": utils,
                }
            )
            print(f"[bench] fig3 {name}: {wall:.1f} s", flush=True)
    seq = median(r["wall_s"] for r in runs["sequential"])
    par = median(r["wall_s"] for r in runs["concurrent"])
    seq_phase = median(r["trial_phase_s"] for r in runs["sequential"])
    par_phase = median(r["trial_phase_s"] for r in runs["concurrent"])
    seq_epochs = median(median(r["trial_epochs_s"]) for r in runs["sequential"])
    par_epochs = median(median(r["trial_epochs_s"]) for r in runs["concurrent"])
    out.update(
        {
            "setup": {
                "workload": f"2 trials, 1 CPU each, backend auto (direct), "
                f"{fig3_config(quick)['epochs']} epoch(s): {_workload(fig3_config(quick))}",
                "rounds": rounds,
                "smoke": quick,
            },
            "sequential_wall_s": seq,
            "concurrent_wall_s": par,
            "throughput_ratio": seq / par,
            "sequential_trial_phase_s": seq_phase,
            "concurrent_trial_phase_s": par_phase,
            "trial_phase_throughput_ratio": seq_phase / par_phase,
            "trial_epochs_s_sequential": seq_epochs,
            "trial_epochs_s_concurrent": par_epochs,
            "compute_slowdown_when_concurrent": par_epochs / seq_epochs,
            "runs": runs,
            "targets": {
                "throughput_ratio": {
                    "value": seq / par,
                    "target": ">= 1.7",
                    "met": seq / par >= 1.7,
                },
                "trial_phase_throughput_ratio": {
                    "value": seq_phase / par_phase,
                    "target": ">= 1.7",
                    "met": seq_phase / par_phase >= 1.7,
                },
            },
        }
    )
    return out


def _in_process_peak(base: dict[str, Any]) -> float:
    """Peak RSS (MiB) of a fresh Python process that runs the training in-process.

    Read from the child's own ``VmHWM``: ``ru_maxrss`` would not do, Linux carries
    the parent's peak over ``exec`` into it.
    """
    code = (
        "import json, sys, tempfile, torch\n"
        "from trainables.config import TrainConfig\n"
        "from trainables.loop import train\n"
        "torch.set_num_threads(1)\n"
        "cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    train(cfg, output_dir=tmp)\n"
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
        "print(int(hwm.split()[1]) / 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(base)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return float(done.stdout.strip().splitlines()[-1])


def fig6(studies: Studies, quick: bool) -> dict[str, Any]:
    from study.spec import StudySpec

    # quick: a smoke test of 5 trials, the growth fitted from the 1st finished trial on
    trials, first = (5, 1) if quick else (16, 4)
    name_next = f"bench-{studies.count + 1}"
    folder = StudySpec(name=name_next, storage=str(studies.root / "studies")).folder / "trials"

    def finished() -> float:
        return float(len(list(folder.glob("*/final.json")))) if folder.is_dir() else 0.0

    rss_before = peak_rss_mib()
    with ProcSampler(interval=0.5, probe=finished) as sampler:
        wall, outcome, spec = studies.run(tiny_config(), trials=trials, cpus_per_worker=1.0)
    assert spec.name == name_next
    # driver resident memory after k trials finished: the last sample before the (k+1)-th
    by_k: dict[int, float] = {}
    for _, rss, k in sampler.series:
        by_k[int(k)] = rss
    ks = sorted(k for k in by_k if k >= 1)
    # from the 4th finished trial to the last one still inside the study (the sample
    # for k = trials is taken after the study ended and the driver let memory go)
    tail = [k for k in ks if first <= k < trials]
    slope = _slope([float(k) for k in tail], [by_k[k] for k in tail]) if len(tail) > 2 else None
    trial_pids = {int(t.metrics.get("pid", -1)) for t in outcome.trials}
    trial_procs = [p for pid, p in sampler.procs.items() if pid in trial_pids]
    ray_system = {
        p.name.split()[0].rsplit("/", 1)[-1][:40]: round(p.rss_mib, 1)
        for p in sampler.procs.values()
        if not p.name.startswith("ray::")
    }
    baseline = _in_process_peak(tiny_config())
    trial_peak = max((p.peak_mib for p in trial_procs), default=None)
    return {
        "setup": {
            "trials": trials,
            "workload": "TRADES K=2, small_cnn, digits, 256 train images, 1 epoch, 1 CPU each",
            "backend": "auto (direct)",
            "growth_fitted_from_trial": first,
            "smoke": quick,
        },
        "wall_s": wall,
        "trial_processes": len(trial_pids),
        "trial_peak_rss_mib": trial_peak,
        "in_process_peak_rss_mib": baseline,
        "driver_rss_mib_by_trials_finished": {str(k): round(by_k[k], 1) for k in ks},
        "driver_rss_growth_mib_per_trial": slope,
        "driver_peak_rss_mib": max(r for _, r, _ in sampler.series),
        "driver_peak_rss_before_mib": rss_before,
        "ray_system_processes_rss_mib": ray_system,
        "targets": {
            "driver_growth_per_trial_mib": {
                "value": slope,
                "target": "~0 (no growth per trial; < 2 MiB/trial)",
                "met": slope is not None and slope < 2.0,
            }
        },
    }


def run(quick: bool, only: set[str]) -> dict[str, Any]:
    """Figures 2, 3 and 6 (those in ``only``) on one Ray cluster."""
    import ray

    from study.runner import init_ray

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-studies-") as tmp:
        studies = Studies(Path(tmp))
        t = time.perf_counter()
        init_ray(None)
        cluster_s = time.perf_counter() - t
        time.sleep(0.5 if quick else 3.0)  # let the fresh cluster's processes settle
        store_s = studies.create_store()
        try:
            if "2" in only:
                results["2"] = (
                    fig2(studies, epochs=2, rounds=1, smoke=True)
                    if quick
                    else fig2(studies, epochs=4, rounds=3)
                )
                results["2"]["startup_breakdown"] = (
                    startup_breakdown(Path(tmp), 1, imports=False)
                    if quick
                    else startup_breakdown(Path(tmp), 3)
                )
                results["2"]["once_per_study_s"] = {
                    "ray_cluster_start": cluster_s,
                    "mlflow_store": store_s,
                }
            if "3" in only:
                results["3"] = fig3(studies, quick)
            if "6" in only:
                results["6"] = fig6(studies, quick)
        finally:
            ray.shutdown()
    return results
