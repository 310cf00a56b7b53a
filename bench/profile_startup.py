"""Where a trial's fixed start-up goes: CPU and import time of every process a study starts.

``python -m bench.profile_startup [--rounds N]`` runs tiny one-trial studies
(digits, 1 epoch, 256 images: almost all of it fixed cost) through
:func:`study.runner.run_study` with the ``direct`` and the ``train`` backend, in
turn, on one local Ray cluster started with the settings of ``study run``
(:func:`study.runner.set_driver_env`). Two profiles of every new process:

* CPU seconds from ``/proc`` (sampled every 0.2 s), under the name Ray gives it
  (``ray::TrainController``, ``ray::RayTrainWorker``, ...);
* Python's import profiler (``PYTHONPROFILEIMPORTTIME=1`` in the workers'
  environment; each worker's report is read from its log file): the wall time
  of each top-level import and the packages that cost most.

(py-spy was tried first: attached to a Ray worker right after its birth it
stops sampling after a fraction of a second, here, so it misses the start-up.)
The table and the JSON (``bench/results/<date>-<label>-startup-profile.json``)
hold medians over rounds per backend and process role.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, ProcSampler, descendants, machine, median, render
from bench.platform_overhead import Studies, tiny_config


def _role(name: str) -> str:
    """A short name: ``ray::TrainController.run`` -> ``TrainController``."""
    if name.startswith("ray::"):
        return re.split(r"[.\s]", name[5:], maxsplit=1)[0]
    return name.split()[-1].rsplit("/", 1)[-1][:40] if name else "?"


def import_profile(err_file: Path) -> dict[str, Any]:
    """Top-level import wall time (s) of one worker and its costliest packages."""
    total_us = 0
    packages: collections.Counter[str] = collections.Counter()
    if not err_file.is_file():
        return {"import_s": None}
    for line in err_file.read_text(errors="replace").splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (f.strip() for f in line[len("import time:") :].split("|", 2))
        if not cumulative.isdigit():
            continue  # the header line
        raw_name = line.rsplit("|", 1)[1]
        depth = (len(raw_name) - len(raw_name.lstrip(" ")) - 1) // 2
        if depth == 0:
            total_us += int(cumulative)
            packages[name.split(".")[0]] += int(cumulative)
    return {
        "import_s": total_us / 1e6,
        "imported_packages_s": {k: v / 1e6 for k, v in packages.most_common(5)},
    }


def profile(rounds: int) -> dict[str, Any]:
    import ray

    from study.runner import set_driver_env

    env = set_driver_env(local=True)
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {**env, "PYTHONPROFILEIMPORTTIME": "1"}},
    )
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    time.sleep(3.0)  # the cluster's own processes settle
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "train": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
            studies = Studies(Path(tmp))
            studies.create_store()
            for r in range(rounds):
                for backend in ("direct", "train"):
                    before = set(descendants(os.getpid()))
                    with ProcSampler(interval=0.2) as sampler:
                        t = time.perf_counter()
                        studies.run(tiny_config(), backend=backend, cpus_per_worker=1.0)
                        wall = time.perf_counter() - t
                        time.sleep(2.0)  # the run's actors that exit after fit returns
                    procs = []
                    for pid, info in sampler.procs.items():
                        if pid in before or info.cpu_last is None:
                            continue
                        err = next(iter(logs.glob(f"worker-*-{pid}.err")), None)
                        procs.append(
                            {
                                "pid": pid,
                                "role": _role(info.name),
                                "cpu_s": info.cpu_last,
                                **(import_profile(err) if err else {"import_s": None}),
                            }
                        )
                    procs.sort(key=lambda p: -p["cpu_s"])
                    runs[backend].append({"wall_s": wall, "processes": procs})
                    print(
                        f"[profile] round {r + 1} {backend}: {wall:.1f} s, "
                        f"{len(procs)} new processes",
                        flush=True,
                    )
    finally:
        ray.shutdown()
    return {
        "setup": {
            "workload": "tiny one-trial study (digits, 1 epoch, 256 train images, TRADES K=2), "
            "1 CPU per trial",
            "rounds": rounds,
            "env": env,
        },
        "runs": runs,
        "summary": summary(runs),
    }


def summary(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per backend and process role: medians over rounds (roles seen in most rounds)."""
    out: dict[str, Any] = {}
    for backend, rs in runs.items():
        roles: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for run in rs:
            seen: dict[str, dict[str, Any]] = {}
            for p in run["processes"]:
                agg = seen.setdefault(p["role"], {"cpu_s": 0.0, "import_s": 0.0, "n": 0})
                agg["n"] += 1
                agg["cpu_s"] += p["cpu_s"]
                agg["import_s"] += p.get("import_s") or 0.0
                for pkg, sec in (p.get("imported_packages_s") or {}).items():
                    agg.setdefault("packages", collections.Counter())[pkg] += sec
            for role, agg in seen.items():
                roles[role].append(agg)
        per_role = {}
        for role, aggs in roles.items():
            if len(aggs) * 2 <= len(rs):
                continue
            packages: collections.Counter[str] = collections.Counter()
            for a in aggs:
                packages.update(a.get("packages", {}))
            per_role[role] = {
                **{k: median(a[k] for a in aggs) for k in ("cpu_s", "import_s", "n")},
                "top_imports_s": {k: v / len(aggs) for k, v in packages.most_common(3)},
            }
        out[backend] = {
            "wall_s": median(r["wall_s"] for r in rs),
            "new_processes": median(len(r["processes"]) for r in rs),
            "cpu_s_new_processes": median(sum(p["cpu_s"] for p in r["processes"]) for r in rs),
            "import_s_new_processes": median(
                sum(p.get("import_s") or 0.0 for p in r["processes"]) for r in rs
            ),
            "by_role": dict(sorted(per_role.items(), key=lambda kv: -kv[1]["cpu_s"])),
        }
    return out


def table(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for backend, s in res["summary"].items():
        rows.append(
            [
                backend,
                "tiny study: wall (s); new processes; their CPU (s); their imports (s)",
                f"{s['wall_s']:.1f}; {s['new_processes']:.0f}; {s['cpu_s_new_processes']:.1f}; "
                f"{s['import_s_new_processes']:.1f}",
            ]
        )
        for role, r in s["by_role"].items():
            if r["cpu_s"] < 0.3:
                continue
            top = ", ".join(f"{k} {v:.1f}" for k, v in r["top_imports_s"].items())
            rows.append(
                [
                    backend,
                    f"  {role} (x{r['n']:.0f}): CPU (s); imports (s): top packages",
                    f"{r['cpu_s']:.1f}; {r['import_s']:.1f}: {top}",
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_startup", description=__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="studies per backend (default 3)")
    ap.add_argument(
        "--out", help="JSON path (default bench/results/<date>-<label>-startup-profile.json)"
    )
    args = ap.parse_args(argv)
    info = machine()
    res = profile(args.rounds)
    rows = table(res)
    print(render(rows, ["backend", "measure", "value"]))
    date = dt.date.today().isoformat()
    out = (
        Path(args.out)
        if args.out
        else (REPO / "bench" / "results" / f"{date}-{info['label']}-startup-profile.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": date, "machine": info, **res, "table": rows}, indent=1))
    print(f"[profile] results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
