"""``python -m bench [--quick] [--only 1,2,...] [--out FILE] [--no-wait] [--table-from FILE]``.

Runs the benchmarks of ``bench/README.md``, prints one table and writes every
figure with the machine description to ``bench/results/<date>-<label>.json``
(``<date>-<label>-quick.json`` for ``--quick``).

``--quick`` is a smoke test, not a measurement: every figure runs once on a tiny
workload (a few batches, one round, a two-trial default study), without waiting
for a quiet machine (``--no-wait`` implied), in a few minutes on 2 cores. Its
table and file say so (``"mode": "quick-smoke"``); the full run is the figure of
record.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import (
    GUARD,
    REPO,
    OtherWork,
    load_average,
    machine,
    render,
    wait_for_idle,
    wait_for_quiet,
)

FIGURES = ("1", "2", "3", "4", "5", "6", "7", "paths")


def _x(v: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:.{digits}f}{unit}"


def _met(flag: bool | None) -> str:
    return {True: "yes", False: "NO", None: ""}[flag]


SMOKE = "quick-smoke"
SMOKE_NOTE = (
    "SMOKE TEST (--quick): tiny workloads, one round, no wait for a quiet machine; "
    "not figures of record, targets in brackets not judged (run without --quick)"
)


def table(res: dict[str, Any]) -> list[list[str]]:
    """Rows: figure, what, value, target, met."""
    rows: list[list[str]] = []
    f = res.get("1")
    if f:
        rows.append(
            [
                "1",
                "TRADES K=10 batch (s): ours / reference / floor",
                " / ".join(
                    f"{f[k]:.3f}" for k in ("ours_batch_s", "reference_batch_s", "floor_batch_s")
                ),
                "",
                "",
            ]
        )
        for key, label, digits, unit, target in (
            (
                "speedup_vs_reference",
                "ours faster than the TRADES-style reference",
                2,
                "x",
                ">= 1.2x",
            ),
            (
                "ours_over_floor",
                "ours / arithmetic floor ((K+1) input-grad passes + 1 training step)",
                3,
                "",
                "<= 1.1",
            ),
        ):
            met = _met(f["targets"][key]["met"])
            rows.append(["1", label, _x(f[key], digits, unit), target, met])
        rows.append(
            [
                "1",
                "ours / TRADES floor (p(x) + K input-grad passes + TRADES step, bare)",
                _x(f["ours_over_trades_floor"], 3),
                "",
                "",
            ]
        )
        b = f.get("breakdown")
        if b:
            ms = list(b["ms"].values())
            rows.append(
                [
                    "1",
                    "ms: attack + TRADES step + batch | (K+1) input-grads + plain step",
                    f"{ms[0]:.0f} + {ms[1]:.0f} + {ms[2]:.1f} | {ms[3]:.0f} + {ms[4]:.0f}",
                    "",
                    "",
                ]
            )
    f = res.get("2")
    if f:
        t = f["targets"]
        for backend in ("direct", "train"):
            rows.append(
                [
                    "2",
                    f"per-epoch time, study run ({backend}) / in-process",
                    _x(t[f"{backend}_per_epoch_ratio"]["value"], 3),
                    "<= 1.05",
                    _met(t[f"{backend}_per_epoch_ratio"]["met"]),
                ]
            )
            rows.append(
                [
                    "2",
                    f"fixed start-up per trial, {backend} backend (s)",
                    _x(t[f"{backend}_fixed_startup_s"]["value"], 1),
                    "<= 15",
                    _met(t[f"{backend}_fixed_startup_s"]["met"]),
                ]
            )
        main = f["summary"]
        rows.append(
            [
                "2",
                f"wall (s) of {f['setup']['epochs']} epochs: in-process / direct / train "
                f"(median of {f['setup']['rounds']})",
                " / ".join(_x(main[k]["wall_s"], 1) for k in ("in_process", "direct", "train")),
                "",
                "",
            ]
        )
        rows.append(
            [
                "2",
                "per-round per-epoch ratios direct; train",
                ", ".join(f"{r['per_epoch_ratio']:.3f}" for r in f["per_round"]["direct"])
                + "; "
                + ", ".join(f"{r['per_epoch_ratio']:.3f}" for r in f["per_round"]["train"]),
                "",
                "",
            ]
        )
        spread = main["in_process"].get("epochs_s_min_max_over_median")
        if spread and f["setup"]["rounds"] > 1:
            rows.append(
                [
                    "2",
                    "noise: in-process epochs, fastest / slowest round over the median",
                    f"{spread[0]:.3f} / {spread[1]:.3f}",
                    "",
                    "",
                ]
            )
        sb = f.get("startup_breakdown")
        if sb:
            tt = sb["torch_trainer_noop"]
            rows.append(
                [
                    "2",
                    "no-op TorchTrainer.fit (s): total = to worker process + worker start "
                    "to loop + loop end to return",
                    f"{tt['fit_s']:.1f} = {tt['until_worker_process_s']:.1f} + "
                    f"{tt['worker_process_to_loop_s']:.1f} + {tt['loop_end_to_fit_return_s']:.1f}",
                    "",
                    "",
                ]
            )
            imp = sb["fresh_interpreter_import_s"]
            rows.append(
                [
                    "2",
                    "no-op Tune function trial (s); fresh-process import of torch / "
                    "trainables.loop / ray.train.torch (s)",
                    f"{sb['tune_function_trial_noop_s']:.1f}; "
                    + (" / ".join(f"{v:.1f}" for v in imp.values()) or "not run (quick)"),
                    "",
                    "",
                ]
            )
        once = f["once_per_study_s"]
        rows.append(
            [
                "2",
                "once per study (s): Ray cluster start / MLflow store creation",
                f"{once['ray_cluster_start']:.1f} / {once['mlflow_store']:.1f}",
                "",
                "",
            ]
        )
    f = res.get("3")
    if f:
        rows.append(
            [
                "3",
                "2 one-CPU trials: throughput at once / one after the other, whole study",
                _x(f["throughput_ratio"], 2, "x"),
                ">= 1.7x",
                _met(f["targets"]["throughput_ratio"]["met"]),
            ]
        )
        if "trial_phase_throughput_ratio" in f:
            rows.append(
                [
                    "3",
                    "the same, trial phase only (first trial start to last trial end)",
                    _x(f["trial_phase_throughput_ratio"], 2, "x")
                    + f" ({f['sequential_trial_phase_s']:.1f} / "
                    f"{f['concurrent_trial_phase_s']:.1f} s)",
                    ">= 1.7x",
                    _met(f["targets"]["trial_phase_throughput_ratio"]["met"]),
                ]
            )
        rows.append(
            [
                "3",
                "wall (s): sequential / concurrent; epoch-time slowdown when concurrent",
                f"{f['sequential_wall_s']:.1f} / {f['concurrent_wall_s']:.1f}; "
                f"{f['compute_slowdown_when_concurrent']:.2f}x",
                "",
                "",
            ]
        )
        th = f["threads"]
        utils = [u for r in f["runs"]["concurrent"] for u in r["trial_process_cpu_util"]]
        rows.append(
            [
                "3",
                "OMP_NUM_THREADS set by Ray (1/2-CPU actor); torch threads after adapter",
                f"{th['1_cpu']['OMP_NUM_THREADS']}/{th['2_cpu']['OMP_NUM_THREADS']}; "
                f"{th['1_cpu']['torch_threads_after_adapter']}/"
                f"{th['2_cpu']['torch_threads_after_adapter']}",
                "= CPUs",
                _met(
                    th["1_cpu"]["torch_threads_after_adapter"] == 1
                    and th["2_cpu"]["torch_threads_after_adapter"] == 2
                ),
            ]
        )
        if utils:
            rows.append(
                [
                    "3",
                    "CPUs used by each concurrent 1-CPU trial process (avg)",
                    ", ".join(f"{u:.2f}" for u in utils),
                    "<= ~1",
                    _met(max(utils) <= 1.1),
                ]
            )
    f = res.get("4")
    if f:
        for key, label in (("cifar_jpeg", "CIFAR-10 JPEG"), ("digits_default", "digits default")):
            name = "cifar_val_share" if key == "cifar_jpeg" else "digits_val_share"
            rows.append(
                [
                    "4",
                    f"validation share of an epoch, {label} (val {f['setup']['val_subset']}, "
                    f"PGD-{f['setup']['val_attack_steps']})",
                    _x(100 * f[key]["val_share"], 1, "%"),
                    "<= 15%",
                    _met(f["targets"][name]["met"]),
                ]
            )
        fe = f["final_evaluation"]
        rows.append(
            [
                "4",
                f"final test evaluation once (PGD-{fe['eval_steps']} on {fe['test_points']}, "
                f"AutoAttack on {fe['test_points'] if fe.get('autoattack', True) else 0}) (s)",
                _x(fe["seconds"], 1),
                "once",
                "",
            ]
        )
    f = res.get("5")
    if f:
        for steps, r in f["steps"].items():
            rows.append(
                [
                    "5",
                    f"SGLD N={steps} img/s: sampler / floor ({f['sampler'][:28]})",
                    f"{r['sampler_images_per_s']:.0f} / {r['floor_images_per_s']:.0f} "
                    f"({r['sampler_over_floor']:.2f}x floor time)",
                    "",
                    "",
                ]
            )
    f = res.get("6")
    if f:
        rows.append(
            [
                "6",
                "peak RSS (MiB): tiny trial process / same training in a fresh process",
                f"{_x(f['trial_peak_rss_mib'], 0)} / {_x(f['in_process_peak_rss_mib'], 0)}",
                "",
                "",
            ]
        )
        peaks = [
            r.get("trial_peak_rss_mib") for r in res.get("2", {}).get("runs", {}).get("direct", [])
        ]
        if any(peaks):
            rows.append(
                [
                    "6",
                    "peak RSS (MiB) of the figure-2 trial (CIFAR JPEG, direct)",
                    _x(max(p for p in peaks if p), 0),
                    "",
                    "",
                ]
            )
        rows.append(
            [
                "6",
                f"driver RSS growth over a {f['setup']['trials']}-trial study (MiB/trial); peak",
                f"{_x(f['driver_rss_growth_mib_per_trial'], 2)}; "
                f"{_x(f['driver_peak_rss_mib'], 0)} MiB",
                "~0",
                _met(f["targets"]["driver_growth_per_trial_mib"]["met"]),
            ]
        )
    f = res.get("7")
    if f:
        rows.extend(_fig7_rows(f))
    f = res.get("paths")
    if f:
        for name, r in f["options"].items():
            if name.startswith("default"):
                rows.append(["P", f"TRADES batch, {name} (s)", _x(r["batch_s"], 3), "", ""])
                continue
            extra = ""
            if "compile_overhead_s" in r:
                extra = f"; compiling {r['compile_overhead_s']:.0f} s"
            rows.append(
                [
                    "P",
                    f"{name} on this CPU: speed-up per batch",
                    f"{r['speedup']:.2f}x{extra}",
                    "off on CPU",
                    "",
                ]
            )
        pg = f["pgd_linf_attack_s"]
        rows.append(
            [
                "P",
                "PGD-linf attack, K=10 (ms): step before (7 ops) / after (3 in-place)",
                f"{1e3 * pg['before']:.1f} / {1e3 * pg['after']:.1f} "
                f"({pg['before'] / pg['after']:.3f}x)",
                "",
                "",
            ]
        )
        bk = f["bookkeeping_s_per_batch"]
        rows.append(
            [
                "P",
                "epoch bookkeeping per batch (us): before / after",
                f"{1e6 * bk['before']:.0f} / {1e6 * bk['after']:.0f}",
                "no sync",
                "",
            ]
        )
        rows.append(
            [
                "P",
                "data: batches of an epoch from memory / epoch training time",
                _x(100 * f["data"]["share"], 2, "%"),
                "",
                "",
            ]
        )
    return rows


def _fig7_rows(f: dict[str, Any]) -> list[list[str]]:
    """Figure 7: the default study's wall time, split into search and finalists."""
    rows: list[list[str]] = []
    rounds = f["setup"]["rounds"]
    for variant, label in (
        ("default", "default study"),
        ("search_only", "search only (--finalists 0)"),
    ):
        s = f["summary"][variant]
        rows.append(
            [
                "7",
                f"{label} wall (s): total = search + finalists + start-up/other "
                f"(median of {rounds})",
                f"{_x(s['total_s'], 1)} = {_x(s['search_s'], 1)} + {_x(s['final_s'], 1)} + "
                f"{_x(s['other_s'], 1)}",
                "",
                "",
            ]
        )
    t = f["targets"]["default_total_s"]
    n = "/".join(str(v) for v in f["final_n"]) or "0"
    k = "/".join(str(v) for v in sorted(set(f["finalists"])))
    rows.append(
        [
            "7",
            f"default study wall (s), {k} finalists on {n} test points each (PGD-20 + AutoAttack)",
            _x(t["value"], 1),
            "<= 90 s, full test set",
            _met(t["met"]),
        ]
    )
    rows.append(
        [
            "7",
            "per-round totals (s): default; search only",
            "; ".join(
                ", ".join(f"{r['total_s']:.1f}" for r in f["runs"][v])
                for v in ("default", "search_only")
            ),
            "",
            "",
        ]
    )
    d = f["summary"]["default"]
    trials = {r["trials"] for r in f["runs"]["default"]}
    rows.append(
        [
            "7",
            "search: trials; epochs trained; median epoch (s) (default study)",
            f"{'/'.join(map(str, sorted(trials)))}; {_x(d['epochs_trained'], 0)}; "
            f"{_x(d['trial_epoch_s_median'], 2)}",
            "",
            "",
        ]
    )
    rows.append(
        [
            "7",
            "start-up/other (s): until the parent run exists; after it ends (default)",
            f"{_x(d['before_parent_run_s'], 1)}; {_x(d['after_parent_end_s'], 1)}",
            "",
            "",
        ]
    )
    b = f.get("finalist_breakdown")
    if b and "error" not in b:
        per = " / ".join(f"{k} {v:.1f}" for k, v in b["autoattack_per_attack_s"].items())
        rows.append(
            [
                "7",
                f"one finalist alone, 1 thread, {b['test_points']} points (s): data + "
                f"clean/PGD-{b['eval_steps']} + AutoAttack ({per})",
                f"{b['load_s']:.1f} + {b['clean_pgd_s']:.1f} + {b['autoattack_s']:.1f}",
                "",
                "",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test of every figure on tiny workloads, not figures of record "
        "(a few minutes on 2 cores; implies --no-wait)",
    )
    ap.add_argument("--only", default=",".join(FIGURES), help="figures to run, e.g. 1,5,paths")
    ap.add_argument(
        "--out", default=None, help="JSON file (default bench/results/<date>-<label>[-quick].json)"
    )
    ap.add_argument(
        "--table-from", metavar="FILE", help="rebuild the table of a results file; runs nothing"
    )
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    ap.add_argument("--max-wait", type=float, default=20.0, help="minutes to wait (default 20)")
    ap.add_argument("--load-threshold", type=float, default=0.7, help="1-min load to wait for")
    args = ap.parse_args(argv)
    if args.table_from:
        path = Path(args.table_from)
        finish(json.loads(path.read_text()), path)
        return 0
    if args.quick:
        args.no_wait = True  # a smoke test: no waiting for a quiet machine
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - set(FIGURES)
    if unknown:
        ap.error(f"unknown figure(s) {sorted(unknown)}; choose from {', '.join(FIGURES)}")

    import torch

    torch.set_num_threads(2 if (torch.get_num_threads() >= 2) else 1)
    wait = (
        {"waited_s": 0.0, "quiet": None, "load_at_start": load_average()}
        if args.no_wait
        else wait_for_quiet(args.load_threshold, 60 * args.max_wait)
    )
    info = machine()
    started = time.time()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    loads: dict[str, list[float]] = {}

    idle: dict[str, Any] = {}
    other: dict[str, Any] = {}
    GUARD.enabled = not args.no_wait

    def settle(name: str) -> None:
        if not args.no_wait:
            idle[name] = wait_for_idle(60 * args.max_wait / 2)

    def step(name: str, fn) -> None:
        settle(name)
        t = time.perf_counter()
        print(f"[bench] figure {name} ...", flush=True)
        with OtherWork() as work:
            try:
                results[name] = fn()
            except Exception:  # noqa: BLE001 - report and go on with the other figures
                errors[name] = traceback.format_exc()
                print(errors[name], file=sys.stderr, flush=True)
        other[name] = work.summary()
        loads[name] = load_average()
        print(f"[bench] figure {name}: {time.perf_counter() - t:.0f} s", flush=True)

    if "1" in only:
        from bench import attack_step

        step("1", lambda: attack_step.run(args.quick))
        if "1" in results:
            results["1"]["passes"] = attack_step.passes_per_batch()
    if "5" in only:
        from bench import sampler

        step("5", lambda: sampler.run(args.quick))
    if "paths" in only:
        from bench import paths

        step("paths", lambda: paths.run(args.quick))
    ray_figs = only & {"2", "3", "6"}
    if ray_figs:
        from bench import platform_overhead

        settle("2,3,6")
        t = time.perf_counter()
        with OtherWork() as work:
            try:
                results.update(platform_overhead.run(args.quick, ray_figs))
            except Exception:  # noqa: BLE001
                errors["ray"] = traceback.format_exc()
                print(errors["ray"], file=sys.stderr, flush=True)
        other["2,3,6"] = work.summary()
        loads["2,3,6"] = load_average()
        print(f"[bench] figures {sorted(ray_figs)}: {time.perf_counter() - t:.0f} s", flush=True)
    if "4" in only:
        from bench import evaluation

        history = results.get("2", {}).pop("history_in_process", None)
        step("4", lambda: evaluation.run(args.quick, history))
    results.get("2", {}).pop("history_in_process", None)
    if "7" in only:
        from bench import default_study

        step("7", lambda: default_study.run(args.quick))

    date = dt.date.today().isoformat()
    name = f"{date}-{info['label']}{'-quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "date": date,
        "mode": SMOKE if args.quick else "full",
        "note": SMOKE_NOTE if args.quick else "full run",
        "machine": info,
        "load": {
            **wait,
            "after_each_figure": loads,
            "other_work_before_each_figure": idle,
            "other_processes_during_each_figure": other,
            "guard_between_timed_pieces": GUARD.summary(),
            "at_end": load_average(),
        },
        "duration_s": round(time.time() - started, 1),
        "table": None,
        "figures": results,
        "errors": errors,
    }
    # the measurements are saved before the table is built from them: a table that
    # fails loses nothing (rebuild it with --table-from FILE)
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    finish(payload, out)
    kind = " (smoke test, not figures of record)" if args.quick else ""
    print(f"[bench] {time.time() - started:.0f} s{kind}; results in {out}")
    return 1 if errors else 0


def finish(payload: dict[str, Any], out: Path) -> None:
    """Build, print and store the table of a results file."""
    other = payload["load"]["other_processes_during_each_figure"]
    rows = table(payload["figures"])
    smoke = payload.get("mode") == SMOKE
    rows.append(
        [
            "-",
            "CPU share other processes took during each figure",
            ", ".join(f"{k}: {100 * v['other_share_of_machine']:.1f}%" for k, v in other.items()),
            "~0",
            _met(all(v["other_share_of_machine"] < 0.05 for v in other.values())),
        ]
    )
    if smoke:  # nothing in a smoke run is judged: the met column goes in brackets
        rows = [r[:4] + [f"({r[4]})" if r[4] else ""] for r in rows]
        rows.insert(0, ["-", SMOKE_NOTE, "", "", ""])
        print(f"[bench] {SMOKE_NOTE}")
    print(render(rows))
    payload["table"] = [dict(zip(["fig", "measure", "value", "target", "met"], r)) for r in rows]
    out.write_text(json.dumps(payload, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
