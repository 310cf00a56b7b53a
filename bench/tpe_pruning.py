"""Issue 13's search-quality figure: PRUNED-aware TPE against the old behaviour.

``python -m bench.tpe_pruning [--quick] [--seeds 0,1,2] [--trials 24] [--at 12,24]
[--arms new,old] [--out FILE] [--table-from FILE]`` prints a table and writes
``bench/results/<date>-tpe-pruning-<label>.json`` (``…-quick.json`` for ``--quick``)
with the machine description of :func:`bench.common.machine`. Not a test: nothing
here asserts; the numbers are reported as they come.

Every study is the default ``study run`` (the WEAT space on the bundled digits data,
8 epochs per trial, ASHA with a grace period of 3 epochs, as many trials at once as
the CPUs allow), its spec built by ``study run``'s own argument parsing
(:func:`study.cli.build_parser`, :func:`study.cli._spec_from_args`) from
``run --name NAME --tracking-uri sqlite:///<tmp>/mlflow.db --storage <tmp>/studies
--trials 24 --seed S --finalists 0`` and run by :func:`study.runner.run_study` in this
process, on a fresh local Ray cluster per study (:func:`bench.tracking_scale._fresh_cluster`)
and a fresh SQLite MLflow store per study. ``--finalists 0`` skips the finalists'
PGD-20 + AutoAttack evaluation, which is not part of this measure.

The two arms differ in one thing, what the searcher tells Optuna when a trial ends:

* **new** (what ``study run`` does now): :class:`study.search.StudySearch` as
  :func:`study.search.make_searcher` builds it: a trial ASHA stopped is PRUNED (its
  epochs' values are intermediate values), only a trial that ran its full budget is
  COMPLETE.
* **old** (Ray's plain ``OptunaSearch``, the behaviour before issue 13): every trial
  that ended without an error is COMPLETE with its last result's value, so a trial
  ASHA stopped at epoch 3 counts as finished with its epoch-3 score. This arm is made
  in the benchmark's process only: :func:`study.search.make_searcher` (which
  :func:`study.runner.build_tuner` imports when it builds the Tuner) is replaced, for
  the old arm's studies, by a wrapper that builds the same searcher and sets its
  ``finished`` rule to None, which is ``StudySearch(finished=None, …)``: see
  ``StudySearch._ending``. (It still reports intermediate values; TPE ignores them for a
  COMPLETE trial.) Everything else (sampler, seed, space, scheduler, trainable,
  tracking) is the identical code path.

Both arms wrap ``make_searcher`` the same way to keep a handle on the searcher, so that
each Tune trial's Optuna number and the state Optuna was told can be read after the
study.

**Measure.** Per study: the best ``val/pgd_acc`` of the final epoch among the trials
that ran their full budget (status FINISHED: :meth:`study.spec.StudySpec.ran_full_budget`,
the trials ``study export`` chooses from), counting trials in the order they were
created (Optuna trial number), after the first 12 (``--at``) and after all 24; and how
many trials ran their full budget. The arms alternate (seed 0 new, seed 0 old, seed 1
new, …) so that a drift of the machine hits both. The JSON is written after every
study, so a run cut short keeps what finished; every trial's number, Tune id, status,
epochs, Optuna state, objective, sampled parameters and the seconds (from the study's
first ask) at which Optuna asked for it and was told its end are in it. The table adds
two diagnostics: the first trial whose parameters differ between the arms of a seed
(:func:`first_difference`), and where TPE's good/bad split of the recorded trials could
differ between the two tellings (:func:`replayed_split_differs`).

Trials run two at once, so which trial reaches ASHA's rung first depends on timing: a
study is not reproducible from its seed alone, in either arm.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO, OtherWork, load_average, machine, render

METRIC = "val/pgd_acc"  #: the default study's objective (search_spaces/weat.yaml)
ARMS = ("new", "old")  #: PRUNED-aware StudySearch; every ended trial COMPLETE
#: --quick: a smoke test of the path, not the figure (3 trials of 2 epochs, grace 1)
QUICK = {"trials": 3, "epochs": 2, "grace_period": 1, "at": [2, 3], "seeds": [0]}


@contextlib.contextmanager
def searcher_for(arm: str, kept: list[Any]) -> Iterator[None]:
    """Replace :func:`study.search.make_searcher` while a study of ``arm`` runs.

    Args:
        arm: ``new``: the searcher as built (PRUNED-aware); ``old``: the same searcher
            with its ``finished`` rule set to None (every trial that ended without an
            error is told COMPLETE with its last value, as Ray's OptunaSearch did).
        kept: the searcher built is appended here (to read its Optuna study after).
    """
    from study import search

    original = search.make_searcher

    def make(spec: Any, space: Any, storage: Any = None) -> Any:
        searcher = original(spec, space, storage)
        if arm == "old":
            searcher._finished = None  # = StudySearch(finished=None, ...)
        kept.append(searcher)
        return searcher

    search.make_searcher = make
    try:
        yield
    finally:
        search.make_searcher = original


def study_args(name: str, folder: Path, seed: int, settings: dict[str, Any]) -> list[str]:
    """``study run``'s arguments for one study of this figure.

    Args:
        name: the study's name.
        folder: a fresh temporary folder (the MLflow SQLite file and the storage go there).
        seed: the Optuna sampler's seed (``--seed``).
        settings: ``trials`` and, for ``--quick`` only, ``epochs`` and ``grace_period``.
    """
    args = ["run", "--name", name, "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    args += ["--storage", str(folder / "studies"), "--seed", str(seed), "--finalists", "0"]
    args += ["--trials", str(settings["trials"])]
    if settings.get("epochs"):
        args += ["--epochs", str(settings["epochs"])]
    if settings.get("grace_period"):
        args += ["--grace-period", str(settings["grace_period"])]
    return args


def one_study(arm: str, seed: int, settings: dict[str, Any], at: list[int]) -> dict[str, Any]:
    """Run one study of ``arm`` with sampler seed ``seed`` and read every trial back.

    Args:
        arm: ``new`` or ``old`` (:func:`searcher_for`).
        seed: the Optuna sampler's seed.
        settings: see :func:`study_args`.
        at: trial counts after which the best full-budget objective is taken.
    """
    from bench.tracking_scale import _fresh_cluster
    from study.cli import _spec_from_args, build_parser
    from study.runner import run_study

    with tempfile.TemporaryDirectory(prefix="bench-tpe-") as tmp:
        folder = Path(tmp)
        name = f"tpe-{arm}-seed{seed}"
        args = study_args(name, folder, seed, settings)
        spec = _spec_from_args(build_parser().parse_args(args))
        _fresh_cluster()
        kept: list[Any] = []
        load_before = load_average()
        with OtherWork() as other, searcher_for(arm, kept):
            t0 = time.perf_counter()
            outcome = run_study(spec)
            wall = time.perf_counter() - t0
    searcher = kept[-1]
    ot_study = searcher._ot_study
    frozen = {t.number: t for t in ot_study.get_trials(deepcopy=False)}
    numbers = {tid: t.number for tid, t in searcher._ot_trials.items()}
    starts = [t.datetime_start for t in frozen.values() if t.datetime_start is not None]
    t_ask = min(starts) if starts else None
    trials = []
    for t in outcome.trials:
        number = numbers.get(t.trial_id)
        ft = frozen.get(number) if number is not None else None
        trials.append(
            {
                "number": number,
                "trial_id": t.trial_id,
                "status": t.status,  # FINISHED: ran its full budget; STOPPED: by ASHA
                "epochs": t.metrics.get("epoch"),
                METRIC: t.metrics.get(METRIC),
                "val/clean_acc": t.metrics.get("val/clean_acc"),
                "optuna_state": ft.state.name if ft is not None else None,
                "optuna_value": ft.value if ft is not None and ft.values else None,
                "params": dict(ft.params) if ft is not None else None,
                # when Optuna was asked for it and told its end, seconds after the first ask
                "asked_s": _since(ft.datetime_start, t_ask) if ft is not None else None,
                "told_s": _since(ft.datetime_complete, t_ask) if ft is not None else None,
                "error": t.error,
            }
        )
    trials.sort(key=lambda r: (r["number"] is None, r["number"] or 0, r["trial_id"]))
    rec: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "args": ["study", *args[:4], "sqlite:///<tmp>/mlflow.db", "--storage", "<tmp>/studies"]
        + args[7:],
        "trials_requested": spec.trials,
        "epochs": spec.default_epochs,
        "grace_period": spec.grace_period,
        "scheduler": spec.early_stopping(),
        "max_concurrent": spec.max_concurrent,
        "wall_s": round(wall, 1),
        "search_s": round(outcome.search_s, 1),
        "load_before": load_before,
        "load_after": load_average(),
        "other_work": other.summary(),
        "trials": trials,
    }
    rec.update(best_after(trials, at))
    return rec


def _since(when: Any, origin: Any) -> float | None:
    """Seconds from ``origin`` to ``when`` (datetimes), rounded; None if either is None."""
    if when is None or origin is None:
        return None
    return round((when - origin).total_seconds(), 1)


def best_after(trials: list[dict[str, Any]], at: list[int]) -> dict[str, Any]:
    """Per count ``k`` of ``at``: the best final ``val/pgd_acc`` among the first ``k``
    trials (by Optuna number) that ran their full budget (None if none did), and how many
    of those ``k`` did.

    Args:
        trials: the study's trials, as :func:`one_study` records them, in number order.
        at: trial counts.
    """
    out: dict[str, Any] = {"best": {}, "full_budget": {}}
    for k in at:
        first = [t for t in trials if t["number"] is not None and t["number"] < k]
        full = [t[METRIC] for t in first if t["status"] == "FINISHED" and t[METRIC] is not None]
        out["best"][str(k)] = max(full) if full else None
        out["full_budget"][str(k)] = len(full)
    return out


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> int | None:
    """The first Optuna trial number at which studies ``a`` and ``b`` (the two arms of one
    seed, as :func:`one_study` records them) sampled different parameters; None when
    every trial of both had the same ones. Before it, the arms ran the same trials."""
    pa = {t["number"]: t["params"] for t in a["trials"]}
    pb = {t["number"]: t["params"] for t in b["trials"]}
    for number in sorted(set(pa) | set(pb), key=lambda n: (n is None, n or 0)):
        if pa.get(number) != pb.get(number):
            return number
    return None


def replayed_split_differs(
    trials: list[dict[str, Any]], startup: int = 10, running: int = 2
) -> list[int]:
    """The trial numbers ``k`` at whose ask TPE's split of the ended trials into its
    "good" (below) and "bad" (above) groups could differ between telling the stopped ones
    PRUNED (new) and COMPLETE with their last value (old).

    A replay of one study's recorded trials through Optuna's own split
    (``optuna.samplers._tpe.sampler._split_trials``, a private function of Optuna 5.1,
    with the default gamma ``ceil(0.1 n)`` of the ``n`` ended trials): when trial ``k`` is
    asked for, trials ``0 .. k-1`` have ended except at most ``running`` of them (two run
    at once in the default study, and Tune asks for the next trial while two run), so
    every such history is replayed (the full one, and each with one or two of the trials
    left out); a history of fewer than ``startup`` ended trials is TPE's random start-up,
    the same in both arms. Where the groups are the same, TPE's proposal is the same in
    both arms: its Parzen estimators see only the parameters of each group (running
    trials join the bad group alike in both, constant liar), and the sampler's random
    state is the seed's.

    Args:
        trials: one study's trials, as :func:`one_study` records them, in number order.
        startup: TPE's random start-up trials (``n_startup_trials``, Optuna's default 10).
        running: at most this many earlier trials may still run at an ask.
    """
    import itertools

    import optuna
    from optuna.samplers._tpe.sampler import _split_trials, default_gamma
    from optuna.trial import TrialState, create_trial

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line
    try:
        study = optuna.create_study(direction="maximize", study_name="replay")
    finally:
        optuna.logging.set_verbosity(verbosity)

    def told(t: dict[str, Any], arm: str) -> Any:
        value, epoch = t[METRIC], int(t["epochs"] or 0)
        pruned = arm == "new" and t["status"] != "FINISHED"
        frozen = create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
            value=None if pruned else value,
            intermediate_values={epoch: value},
        )
        frozen.number = t["number"]
        return frozen

    ended = [t for t in trials if t["number"] is not None and t[METRIC] is not None]
    frozen = {arm: {t["number"]: told(t, arm) for t in ended} for arm in ARMS}
    differs = []
    for k in range(startup, len(ended)):
        before = [t["number"] for t in ended if t["number"] < k]
        for r in range(running + 1):
            if any(
                len(before) - r >= startup
                and len(
                    {
                        tuple(
                            f.number
                            for f in _split_trials(
                                study,
                                [frozen[arm][n] for n in before if n not in out],
                                default_gamma(len(before) - r),
                            )[0]
                        )
                        for arm in ARMS
                    }
                )
                > 1
                for out in itertools.combinations(before, r)
            ):
                differs.append(k)
                break
    return differs


def table(studies: list[dict[str, Any]], at: list[int]) -> list[list[str]]:
    """Rows ``seed | arm | best after k … | full-budget trials after k … | first trial
    whose parameters differ from the other arm's (:func:`first_difference`) | trial counts
    where the replayed split differs (:func:`replayed_split_differs`) | wall``; a mean row
    per arm over the seeds that both arms finished."""
    rows = []
    by = {(s["seed"], s["arm"]): s for s in studies}
    for s in studies:
        other = by.get((s["seed"], "old" if s["arm"] == "new" else "new"))
        differ = first_difference(s, other) if other is not None else None
        rows.append(
            [str(s["seed"]), s["arm"]]
            + [_f(s["best"].get(str(k))) for k in at]
            + [str(s["full_budget"].get(str(k))) for k in at]
            + ["n/a" if other is None else "none" if differ is None else f"#{differ}"]
            + [", ".join(map(str, replayed_split_differs(s["trials"]))) or "never"]
            + [f"{s['wall_s']:.0f}"]
        )
    both = sorted(
        {s["seed"] for s in studies if s["arm"] == "new"}
        & {s["seed"] for s in studies if s["arm"] == "old"}
    )
    for arm in ARMS:
        mine = [s for s in studies if s["arm"] == arm and s["seed"] in both]
        if not mine:
            continue
        rows.append(
            [f"mean ({len(mine)} seeds)", arm]
            + [_f(_mean([s["best"].get(str(k)) for s in mine])) for k in at]
            + [_f(_mean([s["full_budget"].get(str(k)) for s in mine]), 1) for k in at]
            + ["", ""]
            + [f"{_mean([s['wall_s'] for s in mine]):.0f}"]
        )
    return rows


def head(at: list[int]) -> list[str]:
    return (
        ["seed", "arm"]
        + [f"best {METRIC} after {k}" for k in at]
        + [f"full-budget trials of first {k}" for k in at]
        + ["first trial # unlike the other arm's", "replayed TPE split differs at k"]
        + ["wall (s)"]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the figure; returns the exit status (1 if a study failed)."""
    parser = argparse.ArgumentParser(prog="python -m bench.tpe_pruning", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 trials of 2 epochs")
    parser.add_argument("--seeds", default=None, help="Optuna sampler seeds (0,1,2)")
    parser.add_argument("--trials", type=int, default=None, help="trials per study (24)")
    parser.add_argument("--at", default=None, help="trial counts to report (12,24)")
    parser.add_argument("--arms", default=",".join(ARMS), help="arms, in turn (new,old)")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/…)")
    parser.add_argument("--table-from", default=None, help="print the table of a results file")
    args = parser.parse_args(argv)
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(render(table(saved["studies"], saved["at"]), head(saved["at"])))
        return 0
    settings: dict[str, Any] = dict(QUICK) if args.quick else {"trials": 24, "at": [12, 24]}
    settings.setdefault("seeds", [0, 1, 2])
    if args.trials:
        settings["trials"] = args.trials
    if args.seeds:
        settings["seeds"] = [int(v) for v in args.seeds.split(",") if v.strip()]
    if args.at:
        settings["at"] = [int(v) for v in args.at.split(",") if v.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in ARMS for a in arms):
        parser.error(f"--arms: each of {ARMS}")
    at = settings["at"]

    import ray

    info = machine()
    started = time.time()
    date = dt.date.today().isoformat()
    name = f"{date}-tpe-pruning-{info['label']}{'-quick' if args.quick else ''}.json"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "date": date,
        "mode": "quick-smoke" if args.quick else "full",
        "machine": info,
        "metric": METRIC,
        "at": at,
        "settings": {k: v for k, v in settings.items() if k != "at"},
        "order": "per seed: " + ", ".join(arms) + " (alternating)",
        "old_arm": "study.search.make_searcher patched in the benchmark process: the same "
        "StudySearch with finished=None (every trial ended without error told COMPLETE)",
        "load": {"at_start": load_average()},
        "studies": [],
        "errors": [],
    }

    def save() -> None:
        payload["duration_s"] = round(time.time() - started, 1)
        payload["load"]["at_end"] = load_average()
        out.write_text(json.dumps(payload, indent=1, default=str) + "\n")

    try:
        for seed in settings["seeds"]:
            for arm in arms:
                print(f"[tpe] seed {seed}, arm {arm}: {settings['trials']} trials ...", flush=True)
                try:
                    rec = one_study(arm, seed, settings, at)
                except Exception as exc:  # noqa: BLE001 - reported; the other studies run
                    import traceback

                    payload["errors"].append(
                        {"arm": arm, "seed": seed, "traceback": traceback.format_exc()[-4000:]}
                    )
                    print(f"[tpe] seed {seed}, arm {arm} failed: {exc}", file=sys.stderr)
                else:
                    payload["studies"].append(rec)
                    best = ", ".join(f"after {k}: {_f(rec['best'][str(k)])}" for k in at)
                    print(
                        f"[tpe] seed {seed}, arm {arm}: {rec['wall_s']:.0f} s; best {best}; "
                        f"full budget {rec['full_budget'][str(at[-1])]}",
                        flush=True,
                    )
                save()
    finally:
        ray.shutdown()
    rows = table(payload["studies"], at)
    print(render(rows, head(at)))
    payload["table"] = [dict(zip(head(at), r)) for r in rows]
    save()
    print(f"[tpe] {time.time() - started:.0f} s; results in {out}")
    return 1 if payload["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
