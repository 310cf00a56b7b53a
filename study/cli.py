"""The ``study`` command.

Sub-commands:

* ``study run``: a Ray Tune + Optuna study recorded in MLflow (no arguments: a small
  WEAT study on the bundled digits). A trial with one CPU worker trains inside its
  Tune trial; several workers or GPUs train through a Ray Train TorchTrainer
  (``--backend``).
* ``study resume NAME``: continue an interrupted study.
* ``study export NAME -o best.yaml``: the best config(s) for final training;
  ``--robustbench DIR``: the best trial's weights as a RobustBench-ready model;
  ``--register MODEL``: its model registered in MLflow, alias ``candidate``
  (``study train --register MODEL``: alias ``champion`` when it beats the champion).
* ``study list`` / ``study show NAME``: studies in the MLflow store and their trials.
* ``study report NAME``: tables, figures and one HTML report read back from MLflow.
* ``study ui [NAME]``: the MLflow UI on 127.0.0.1 for the store in use, and the address
  of the study's runs sorted by its objective (``--open``: in a browser).
* ``study generate --from RUN``: sample images from a trained classifier with
  SGLD, score them (IS/FID/KID), optionally search the sampler with Optuna.
* ``study doctor``: check every Ray node (import, storage, tracking server, GPUs);
  exit 1 on a failure (docs/cluster.md).
* ``study server``: the team's MLflow tracking server, secure by default
  (docs/servers.md).
* ``study train``: one training run (in this process, or through Ray Train with
  ``--workers N``), recorded in MLflow as a study of one.

Errors the user can fix (a bad config value, a missing dataset, a corrupt
checkpoint) are printed as one paragraph, with no traceback, and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.errors import ConfigError, UserError
from trainables.files import METRICS_LOG

if TYPE_CHECKING:
    from study.runner import StudyOutcome
    from study.spec import StudySpec
    from trainables.config import TrainConfig

#: Epochs per trial of the default study (no ``--config``, a space that sets none): with
#: StudySpec's trials and grace period it ends in well under 5 minutes on 2 CPU cores.
DEFAULT_EPOCHS = 8

#: ``study run`` options that are StudySpec fields of that name and default: (field, type, help)
_SPEC_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("max_failures", int, "retries of a failed trial"),
    ("workers_per_trial", int, "Ray Train workers (DDP if > 1)"),
    ("cpus_per_worker", float, "CPUs per Train worker"),
    ("gpus_per_trial", float, "GPUs per trial (fractions ok)"),
    ("optuna_storage", str, "Optuna RDB URL, e.g. sqlite:///optuna.db"),
    ("finalists", int, "top trials evaluated with PGD + AutoAttack at the end (0: none; "
     "multi-objective: the Pareto set)"),
    ("final_n", int, "test points of that final evaluation (None: all)"),
    ("connect_timeout", float, "seconds the tracking server and --address may take to answer"),
)  # fmt: skip


def _given_tracking_uri(args: argparse.Namespace) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite default, as given
    (a password in it still there)."""
    from study.tracking import default_tracking_uri

    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _tracking_uri(args: argparse.Namespace) -> str:
    """:func:`_given_tracking_uri` with its password moved to the environment
    (:func:`study.credentials.take_credentials`)."""
    from study.credentials import take_credentials

    uri = _given_tracking_uri(args)
    return take_credentials(uri) or uri


def _storage(args: argparse.Namespace) -> str:
    """``--storage`` (default ``./studies``): an absolute path, or a URI as given (less a
    password, which moves to the environment)."""
    from study.credentials import take_credentials
    from study.storage import normalize

    return normalize(take_credentials(args.storage or "studies") or "studies")


def _cmd_train(args: argparse.Namespace) -> int:
    from trainables.checkpoint import load_checkpoint
    from trainables.config import TrainConfig, build_config, parse_overrides
    from trainables.loop import train
    from trainables.reporting import ConsoleReporter, JsonlReporter, MultiReporter

    if args.resume and not args.config:
        # The checkpoint carries its config; --set may change runtime keys only.
        saved = load_checkpoint(args.resume)
        cfg = TrainConfig.from_dict({**saved["config"], **parse_overrides(args.set)})
        start_epoch = int(saved.get("epoch", 0))
    else:
        cfg = build_config(args.config, args.set, preset=args.preset)
        start_epoch = int(load_checkpoint(args.resume)["epoch"]) if args.resume else 0
    out = Path(args.output or cfg.output_dir)
    from study.export import read_source
    from study.registry import check_model_name, source_tags

    source = read_source(args.config) if args.config else None  # study export's header
    if args.register is not None:  # refused before any training
        check_model_name(args.register)
        if args.no_mlflow:
            raise UserError("--register registers a training recorded in MLflow: drop "
                            "--no-mlflow")  # fmt: skip
    if args.workers > 1 or args.gpus > 0:
        return _train_on_ray(args, cfg, source)
    print(
        f"training {cfg.method} on {cfg.dataset} with {cfg.model} for {cfg.epochs} epochs "
        f"(eps={cfg.eps:.4g}, {cfg.norm}); writing to {out}",
        flush=True,
    )
    reporters: list = [
        ConsoleReporter(),
        JsonlReporter(out / METRICS_LOG, resume_epoch=start_epoch),
    ]
    mlflow_reporter = None
    if not args.no_mlflow:
        from study.tracking import MlflowRunReporter, MlflowTracker

        tracker = MlflowTracker(_tracking_uri(args), args.experiment)
        mlflow_reporter = MlflowRunReporter(tracker, cfg.to_dict(), out.name)
        reporters.append(mlflow_reporter)
        if source:  # the lineage: this final training's study, trial and run
            for run_id in (mlflow_reporter.parent_id, mlflow_reporter.run_id):
                tracker.set_tags(run_id, source_tags(source))
            print(f"config from trial {source['trial']} of study {source['study']!r} "
                  f"(run {source['run']})", flush=True)  # fmt: skip
    try:
        result = train(
            cfg,
            reporter=MultiReporter(*reporters),
            output_dir=out,
            resume=args.resume,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        if mlflow_reporter is not None:
            mlflow_reporter.end("KILLED")
        print(
            f"\ninterrupted; continue with: study train --resume {out / 'checkpoints' / 'last.pt'}",
            file=sys.stderr,
        )
        return 130
    except Exception:
        if mlflow_reporter is not None:
            mlflow_reporter.end("FAILED")
        raise
    print(f"best epoch {result.best_epoch}; outputs in {result.output_dir}")
    if mlflow_reporter is not None:
        print(f"MLflow: experiment {args.experiment!r}, run {mlflow_reporter.run_id}")
    if args.register is not None and mlflow_reporter is not None:
        from study.registry import register_final

        register_final(tracker, mlflow_reporter.run_id, args.register, source=source)
    return 0


def _train_on_ray(
    args: argparse.Namespace, cfg: TrainConfig, source: dict[str, str] | None = None
) -> int:
    """``study train --workers N``: a study of one through Ray Train (DDP when N > 1).

    ``--resume`` travels through the study's folder (:data:`study.trial.START_FOLDER`);
    ``-o`` gets a copy of the trial's folder. ``source``: the study, trial and run the
    config came from (tagged on its runs; :func:`study.registry.record_final`).
    """
    import shutil

    from study.runner import run_study
    from study.spec import StudySpec
    from study.storage import is_uri
    from study.trial import trial_files

    name = (
        args.experiment if args.experiment != "train" else f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if is_uri(_storage(args)):
        raise UserError(
            f"study train --workers keeps its run in a local or shared folder; --storage "
            f"{_storage(args)} is a URI: give a path (a mount every node sees), or run a "
            "study of one with `study run --space fixed --trials 1 --storage URI`"
        )
    spec = StudySpec(
        name=name,
        space="fixed",
        base=cfg.to_dict(),
        trials=1,
        asha=False,
        workers_per_trial=args.workers,
        gpus_per_trial=args.gpus,
        backend="train",
        tracking_uri=_tracking_uri(args),
        storage=_storage(args),
        address=args.address,
    )
    if args.resume:  # its trial continues the run from START_FOLDER (last.pt, best.pt)
        from study.trial import START_FOLDER

        spec.validate()  # nothing is written for a bad spec
        start = spec.folder / START_FOLDER
        start.mkdir(parents=True, exist_ok=True)
        shutil.copy2(args.resume, start / "last.pt")
        if (best := Path(args.resume).with_name("best.pt")).is_file():
            shutil.copy2(best, start / "best.pt")
        spec.start_from = str(start)
    outcome = run_study(spec)
    trial = outcome.trials[0]
    print(f"trial {trial.trial_id}: {trial.status}")
    for key in sorted(k for k in trial.metrics if k.startswith("test/")):
        print(f"  {key:<28s} {trial.metrics[key]:.4f}")
    if trial.error:
        print(f"error: {trial.error}", file=sys.stderr)
    if args.output:  # the run's files, from its newest checkpoint in the storage
        with trial_files(spec, trial.trial_id) as folder:
            if folder is not None:
                ignore = shutil.ignore_patterns(".resume*")
                shutil.copytree(folder, args.output, dirs_exist_ok=True, ignore=ignore)
                print(f"outputs in {args.output}")
    if trial.status == "FINISHED" and (source or args.register is not None):
        from study.registry import record_final

        record_final(spec.tracking_uri, name, outcome.parent_run_id, trial.trial_id,
                     source=source, register=args.register)  # fmt: skip
    return 0 if trial.status == "FINISHED" else 1


def _spec_from_args(args: argparse.Namespace) -> StudySpec:
    """The study of ``study run``: options given > the space's ``study`` section >
    :class:`StudySpec`'s defaults (epochs: :data:`DEFAULT_EPOCHS` without ``--config``)."""
    from search_spaces import load_space
    from search_spaces.space import SpaceError
    from study.credentials import check_one_password
    from study.spec import DEFAULT_SPACE, StudySpec, _merge, base_config
    from trainables.config import parse_overrides

    # as StudySpec does, on the URIs as given: once the tracking URI's password is in
    # PGPASSWORD, the spec could no longer tell that the Optuna storage's differs
    check_one_password(_given_tracking_uri(args), args.optuna_storage)
    space_name = args.space or DEFAULT_SPACE
    try:
        suggested = dict(load_space(space_name).study)
    except SpaceError as exc:
        raise ConfigError(str(exc)) from None
    if not args.config and not suggested.get("epochs"):
        suggested["epochs"] = DEFAULT_EPOCHS
    values: dict[str, Any] = {}
    for key in ("trials", "epochs", "grace_period"):  # None: not given (0 is checked)
        value = suggested.get(key) if getattr(args, key) is None else getattr(args, key)
        try:
            values[key] = None if value is None else int(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"{key} = {value!r} in the space's study section; give a whole number"
            ) from None
    values["scheduler"] = _scheduler(args, suggested)
    for key, option in (("metric", args.metric), ("mode", args.mode)):
        values[f"{key}s"] = option or (_as_list(suggested[key]) if key in suggested else None)
    spec = StudySpec(
        name=args.name or f"{Path(space_name).stem}-{time.strftime('%Y%m%d-%H%M%S')}",
        space=space_name,
        base=_merge(base_config(args.config), parse_overrides(args.set)),  # as study train
        tracking_uri=_tracking_uri(args),
        storage=_storage(args),
        **{key: getattr(args, key) for key, _, _ in _SPEC_OPTIONS},
        seed=args.seed,
        max_concurrent=args.max_concurrent,
        backend=args.backend,
        address=args.address,
        constraints=list(args.constraint or []),
        warm_start=args.warm_start,
        stop_on_energy_divergence=args.stop_on_energy_divergence,
        divergence_window=args.divergence_window,
        divergence_threshold=args.divergence_threshold,
        divergence_min_epoch=args.divergence_min_epoch,
        divergence_min_drop=args.divergence_min_drop,
        **{key: value for key, value in values.items() if value is not None},
    )
    if len(spec.modes) == 1 and len(spec.metrics) > 1:
        spec.modes = spec.modes * len(spec.metrics)
    return spec


def _scheduler(args: argparse.Namespace, suggested: dict[str, Any]) -> str | None:
    """``--scheduler``, else ``--asha`` (= asha) / ``--no-asha`` (= none), else the space's
    ``scheduler`` or ``asha: false`` (= none); None: StudySpec's default."""
    if args.asha is not None:
        flag = "asha" if args.asha else "none"
        if args.scheduler is not None and args.scheduler != flag:
            option = "--asha" if args.asha else "--no-asha"
            raise ConfigError(
                f"{option} means --scheduler {flag}; not --scheduler {args.scheduler}"
            )
        return flag
    if args.scheduler is not None:
        return args.scheduler
    if "scheduler" in suggested:
        return str(suggested["scheduler"])
    if suggested.get("asha") is False:
        return "none"
    return None


def _as_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _print_outcome(outcome) -> None:
    spec = outcome.spec
    counts = {}
    for t in outcome.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    kept = sum(t.kept_epoch is not None for t in outcome.trials)
    print(
        f"\nstudy {spec.name}: "
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + (f" ({kept} by the ΔE stopper, each with an epoch kept as its result)" if kept else "")
    )
    columns = [*spec.metrics]
    for extra in ("val/clean_acc", "test/clean_acc", "test/pgd_acc"):  # AutoAttack: finalists
        if extra not in columns:
            columns.append(extra)
    if spec.multi_objective:  # the front of the trials that count: the finalists' rule
        from study.runner import pareto_front

        kept = [t for t in outcome.trials if t.is_result and t.feasible]
        front = {t.trial_id for t in pareto_front(kept, spec.metrics, spec.modes)}
        rows = [t for t in outcome.ranked() if t.trial_id in front]
        objectives = " & ".join(f"{m} {o}" for m, o in zip(spec.metrics, spec.modes))
        title = f"Pareto-optimal finished trials ({objectives})"
    else:
        rows = [t for t in outcome.ranked() if t.is_result and t.feasible][:5]
        title = f"best trials by {spec.metrics[0]} ({spec.modes[0]})"
    if spec.constraints:
        violating = [t.trial_id for t in outcome.trials if not t.feasible]
        title += f" meeting {', '.join(spec.constraints)}"
        if violating:
            title += f" (not listed, violating: {' '.join(violating)})"
    searched = {p.name for p in spec.load_space().params}
    print(title + ":")
    header = ["trial", *columns, "config"]
    print(
        "  ".join(f"{h:>14s}" if i else f"{h:<12s}" for i, h in enumerate(header[:-1])) + "  config"
    )
    for t in rows:
        cells = [f"{t.trial_id:<12s}"] + [
            f"{t.metrics[c]:>14.4f}" if c in t.metrics else f"{'-':>14s}" for c in columns
        ]
        conf = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(t.config.items())
            if k in searched
        )
        print("  ".join(cells) + "  " + conf)
    for t in outcome.trials:
        if t.status == "FAILED":
            print(f"failed: trial {t.trial_id}: {t.error}")
    _print_finals(outcome)
    store = f" --tracking-uri {spec.tracking_uri}"
    print("\nlook at it:")
    print(f"  study ui {spec.name}{store}")
    print(f"  study show {spec.name}{store}")
    print(
        f"  study export {spec.name}{store} -o best.yaml"
        "   # then: study train --config best.yaml --set epochs=100"
    )


def _print_finals(outcome) -> None:
    """The second stage: each finalist's accuracies on the same test points, with n and
    95 % Wilson intervals."""
    from trainables.stats import interval_text

    if not outcome.finals:
        return
    print(
        f"\nfinalists (search {outcome.search_s:.0f} s, final evaluation "
        f"{outcome.final_s:.0f} s): PGD and AutoAttack on the same test points, 95 % intervals"
    )
    for f in outcome.finals:
        m, n = f.metrics, f.metrics.get("final/n", 0)
        parts = [
            f"{k.split('/')[1]} {interval_text(m[k], n)}"
            for k in ("final/clean_acc", "final/pgd_acc", "final/aa_acc")
            if k in m
        ]
        print(f"  {f.rank}. {f.trial_id:<12s} " + "; ".join(parts))


def _cmd_run(args: argparse.Namespace) -> int:
    """``study run``: a new study; with ``--resume``, the study of that name is started
    when the storage has none, continued when it has an unfinished one, and reported
    (exit 0) when it has ended: a retried job's entrypoint never starts a second study."""
    from study.spec import SPEC_FILE
    from study.storage import exists

    if args.resume and not args.name:
        raise UserError(
            "study run --resume needs --name: without one every start gets a new "
            "timestamped name, so a retried job would start a second study"
        )
    spec = _spec_from_args(args)
    spec.validate()  # before any Ray process starts
    if spec.remote:  # reachable before it is asked whether the study exists
        from study.preflight import check_storage

        check_storage(spec.storage, spec.connect_timeout)
    if args.resume and exists(spec.location(SPEC_FILE)):
        print(
            f"study {spec.name} exists in {spec.storage}: --resume continues it with its "
            "saved settings (of the options given, only --address, --tracking-uri and "
            "--working-dir apply)",
            flush=True,
        )
        return _continue(spec.storage, spec.name, args)
    if not args.resume:
        spec.check_new()  # an existing name is `study resume`'s (or --resume's), not ours
    print(
        f"study {spec.name}: {spec.trials} trials of {spec.space} "
        f"(objective {', '.join(f'{m} {o}' for m, o in zip(spec.metrics, spec.modes))}); "
        f"MLflow {spec.tracking_uri}; storage {spec.location()}",
        flush=True,
    )
    return _finish(
        _run_or_interrupted(spec, resume=False, verbose=args.verbose, working_dir=args.working_dir)
    )


def _continue(storage: str, name: str, args: argparse.Namespace) -> int:
    """Continue the saved study ``name`` (``study resume``, ``study run --resume``): print
    its outcome if it has ended, resume its Tune state if there is one, else start it
    (its driver stopped before Tune saved anything). ``--address`` and ``--tracking-uri``
    given here win over the saved ones (a cluster or server that moved)."""
    from study.runner import can_resume, load_outcome

    spec = _saved_spec(storage, name, args)
    ended = load_outcome(spec)
    if ended is not None:
        print(f"study {spec.name} has ended already ({spec.location()}); its outcome:")
        _print_outcome(ended)
        return 0
    resume = can_resume(spec)
    what = "resuming" if resume else "starting (no Tune state saved yet)"
    print(f"{what} study {spec.name} from {spec.location()}", flush=True)
    return _finish(
        _run_or_interrupted(spec, resume=resume, verbose=args.verbose, working_dir=args.working_dir)
    )


def _saved_spec(storage: str, name: str, args: argparse.Namespace) -> StudySpec:
    """The saved spec of study ``name``, with ``--address`` and ``--tracking-uri`` given
    now winning over the saved ones (a cluster or server that moved)."""
    from study.spec import StudySpec

    spec = StudySpec.load(storage, name)
    if args.address:
        spec.address = args.address
    if args.tracking_uri:
        spec.tracking_uri = _tracking_uri(args)
    return spec


def _finish(outcome: StudyOutcome | int) -> int:
    """Print the outcome of ``study run``/``resume``; 1 if no trial has a result (ran to
    its end, or kept an epoch when the ΔE stopper stopped it). An int is
    the exit status of an interrupted study (128 + the signal: 130 Ctrl-C, 143 SIGTERM)."""
    if isinstance(outcome, int):
        return outcome
    _print_outcome(outcome)
    return 0 if any(t.is_result for t in outcome.trials) else 1


def _run_or_interrupted(spec, *, resume: bool, verbose: bool, working_dir: str | None = None):
    """``run_study``; after a Ctrl-C or SIGTERM, say what finished and how to continue,
    and return the exit status (128 + the signal)."""
    from study.runner import StudyInterrupted, resume_command, run_study

    try:
        return run_study(spec, resume=resume, verbose=verbose, working_dir=working_dir)
    except StudyInterrupted as stop:
        done = sum(t.is_result for t in stop.outcome.trials)
        print(
            f"\nstudy {spec.name} interrupted ({stop.stopped_by}): {done} trial(s) finished, "
            f"the rest saved; continue with:\n  {resume_command(spec)}",
            file=sys.stderr,
            flush=True,
        )
        return 128 + stop.signum


def _cmd_resume(args: argparse.Namespace) -> int:
    """``study resume NAME``: continue the study saved in ``--storage`` (see
    :func:`_continue`); a study whose storage has no Tune state is an error."""
    from study.runner import can_resume, load_outcome
    from study.spec import StudySpec

    spec = StudySpec.load(_storage(args), args.name)
    if load_outcome(spec) is None and not can_resume(spec):
        raise UserError(
            f"study {args.name!r} has no Tune state under {spec.location()} to resume "
            f"(start it again with `study run --name {args.name} --resume`)"
        )
    return _continue(spec.storage, args.name, args)


def _cmd_extend(args: argparse.Namespace) -> int:
    """``study extend NAME --trials N``: N more trials in the same study (the same Tune
    and Optuna search, MLflow parent run and space), ended or not; the space file must
    not have changed since the study started."""
    from study import storage
    from study.callbacks import add_search_samples
    from study.runner import OUTCOME_FILE, TUNE_DIR, can_resume

    if args.trials < 1:
        raise UserError(f"--trials {args.trials}: extend by at least 1 trial")
    spec = _saved_spec(_storage(args), args.name, args)
    if not can_resume(spec):
        raise UserError(
            f"study {args.name!r} has no Tune state under {spec.location()} to extend "
            f"(start it with `study run --name {args.name} --resume`)"
        )
    if spec.space_sha256 and spec.space_digest() != spec.space_sha256:
        raise UserError(
            f"the search space {spec.load_space().source} changed since study "
            f"{args.name!r} started: its trials would not be comparable; start a new study "
            f"(`study run --warm-start {args.name}` seeds it with this one's trials) or put "
            "the file back"
        )
    total = add_search_samples(spec.location(TUNE_DIR), args.trials)
    before, spec.trials = spec.trials, total
    spec.save()
    storage.delete(spec.location(OUTCOME_FILE))  # it has not ended any more
    print(f"extending study {spec.name} from {before} to {total} trials", flush=True)
    return _finish(
        _run_or_interrupted(spec, resume=True, verbose=args.verbose, working_dir=args.working_dir)
    )


def _cmd_replicate(args: argparse.Namespace) -> int:
    """``study replicate NAME --top K --seeds S``: the K best trials' configurations
    trained S more times with new seeds (:mod:`study.replicate`), then the replicated
    trials ranked by the replicates' mean."""
    from study.replicate import check_counts, print_summaries, replicate_study
    from study.runner import signal_text

    check_counts(args.top, args.seeds, args.first_seed)
    spec = _saved_spec(_storage(args), args.name, args)
    again = f"study replicate {spec.name} --top {args.top} --seeds {args.seeds}"
    again += "" if args.first_seed is None else f" --first-seed {args.first_seed}"
    again += f" --storage {spec.storage} --tracking-uri {spec.tracking_uri}"
    again += f" --address {spec.address}" if spec.address else ""
    done = replicate_study(
        spec, args.top, args.seeds, args.first_seed, verbose=args.verbose,
        working_dir=args.working_dir, again=again,
    )  # fmt: skip
    print_summaries(done.summaries, spec.metrics[0], spec.modes[0])
    if done.signum is not None:
        print(f"\nstudy replicate {spec.name} interrupted ({signal_text(done.signum)}): "
              f"{len(done.missing)} training(s) left; continue with:\n  {again}",
              file=sys.stderr, flush=True)  # fmt: skip
        return 128 + done.signum
    if done.missing:
        print(f"{len(done.missing)} of the {len(done.asked)} trainings asked for did not "
              f"finish; run the command again to train them:\n  {again}", file=sys.stderr,
              flush=True)  # fmt: skip
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from study.export import export_best
    from study.spec import StudySpec
    from study.tracking import MlflowTracker

    if len(args.metric or []) > 1:
        raise ConfigError("study export ranks by one --metric")
    metric, mode = (args.metric or [None])[0], (args.mode or [None])[0]
    from study.spec import SPEC_FILE
    from study.storage import exists, join

    if exists(join(_storage(args), args.name, SPEC_FILE)):
        spec = StudySpec.load(_storage(args), args.name)
        metric = metric or spec.metrics[0]
        if mode is None and metric in spec.metrics:
            mode = spec.modes[spec.metrics.index(metric)]
    if args.robustbench is not None:  # the best trial's weights, evaluated (study/robustbench.py)
        from study.robustbench import export_robustbench

        if args.top != 1:
            raise ConfigError("--robustbench exports the best trial only; drop --top")
        if args.register is not None:
            raise ConfigError("--robustbench and --register: one at a time")
        done = export_robustbench(_tracking_uri(args), args.name, args.robustbench, n=args.n,
                                  metric=metric or "val/pgd_acc", mode=mode or "max")  # fmt: skip
        print(f"wrote {done.folder}: " + ", ".join(sorted(p.name for p in done.folder.iterdir())))
        return 0
    candidate = None
    if args.register is not None:  # checked before anything is written (study/registry.py)
        from study.registry import prepare_candidate

        if args.top != 1:
            raise ConfigError("--register registers the best trial only; drop --top")
        candidate = prepare_candidate(
            _tracking_uri(args), args.name, args.register,
            metric=metric or "val/pgd_acc", mode=mode or "max",
        )  # fmt: skip
    tracker = MlflowTracker(_tracking_uri(args), args.name)
    files = export_best(
        tracker,
        args.name,
        args.output,
        metric=metric or "val/pgd_acc",
        mode=mode or "max",
        top=args.top,
    )
    for f in files:
        print(f"wrote {f}")
    if candidate is not None:
        from study.registry import register_candidate

        done = register_candidate(candidate)
        print(f"registered {done.name} version {done.version} as {done.alias} "
              f"({done.model_uri}, logged to run {done.run_id}): {done.reason}")  # fmt: skip
    if len(files) < args.top:
        print(
            f"only {len(files)} trial(s) trained to the end (early-stopped and failed "
            "trials are not exported)",
            file=sys.stderr,
        )
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from reports.data import all_experiments, search_runs, tags_filter
    from reports.vocabulary import ROLE_TRIAL, TAG_ROLE
    from study.tracking import quiet_mlflow

    quiet_mlflow()
    client = MlflowClient(_tracking_uri(args))
    found = False
    for exp in all_experiments(client):
        runs = search_runs(client, [exp.experiment_id], tags_filter({TAG_ROLE: ROLE_TRIAL}))
        if not runs:
            continue
        found = True
        states = {}
        for r in runs:
            states[r.info.status] = states.get(r.info.status, 0) + 1
        text = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
        print(f"{exp.name:<32s} {len(runs):>3d} trials ({text})")
    if not found:
        print(f"no studies in {_tracking_uri(args)}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from study.export import show_lines, study_objectives, trial_runs
    from study.tracking import MlflowTracker

    tracker = MlflowTracker(_tracking_uri(args), args.name)
    runs = trial_runs(tracker, args.name)
    if not runs:
        raise UserError(f"study {args.name!r} has no trials in {_tracking_uri(args)}")
    objectives, modes = study_objectives(tracker, args.name)
    print(f"study {args.name}: " + "\n".join(show_lines(runs, objectives, modes)))
    from study.ui import best_trial_runs, compare_url, ui_base

    best = best_trial_runs(tracker, args.name)
    if len(best) > 1:
        base = args.ui or ui_base(_tracking_uri(args))
        link = compare_url(base, tracker.experiment_id, [r.info.run_id for r in best])
        print(f"compare the top {len(best)} trials in the MLflow UI (study ui {args.name}):")
        print(f"  {link}")
    return 0


def _latest_study(uri: str) -> str | None:
    """The study whose parent run started last in the store (None: no study, no store)."""
    from mlflow.tracking import MlflowClient

    from reports.data import all_experiments, tags_filter
    from reports.vocabulary import ROLE_STUDY, TAG_ROLE, TAG_STUDY
    from study.tracking import quiet_mlflow, store_lock

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        return None
    quiet_mlflow()
    with store_lock(uri):
        client = MlflowClient(uri)
    ids = [e.experiment_id for e in all_experiments(client)]
    runs = client.search_runs(
        ids,
        tags_filter({TAG_ROLE: ROLE_STUDY}),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].data.tags.get(TAG_STUDY) if runs else None


def _study_view(uri: str, name: str, base: str) -> str:
    """Write study ``name``'s runs view into the store; returns its address on ``base``."""
    from mlflow.tracking import MlflowClient

    from reports.data import all_experiments
    from study.tracking import MlflowTracker, quiet_mlflow
    from study.ui import publish_view, runs_view_url

    quiet_mlflow()
    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        known = sorted(e.name for e in all_experiments(client) if e.name != "Default")
        raise UserError(f"no study {name!r} in {uri}; studies there: {', '.join(known) or 'none'}")
    return runs_view_url(base, publish_view(MlflowTracker(uri, name), name))


def _cmd_ui(args: argparse.Namespace) -> int:
    """``study ui [NAME]``: the address of the study's runs view (sorted by its objective,
    objectives and searched parameters as columns); a SQLite store gets its MLflow UI
    on 127.0.0.1, which SIGTERM/SIGINT/SIGHUP end as a whole."""
    import webbrowser

    from study.ui import check_port, experiments_url, serve, ui_base

    uri = _tracking_uri(args)
    remote = uri.startswith(("http://", "https://"))
    if not remote and not uri.startswith("sqlite:///"):
        raise UserError(
            f"study ui serves a local SQLite store or shows a study on an MLflow server; "
            f"{uri} is neither: start `mlflow ui --backend-store-uri {uri}` yourself"
        )
    base = ui_base(uri, args.port)
    if not remote:
        check_port(args.port)  # before anything is written or started
    name = args.name or _latest_study(uri)
    view = _study_view(uri, name, base) if name else None
    target = view or experiments_url(base)
    if remote:
        print(f"study {name}: {target}" if view else f"studies: {target}", flush=True)
        if args.open:
            webbrowser.open(target)
        return 0
    from study.tracking import artifact_root_for

    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", "127.0.0.1", "--port", str(args.port), "--workers", "1"]  # fmt: skip
    root = artifact_root_for(uri)
    if root:
        # runs logged over HTTP to this UI keep their artifacts beside the store too
        cmd += ["--artifacts-destination", root]
    # no background job runner: the UI starts in ~5 s instead of ~13 s on 2 cores
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI for {uri} on {base} (Ctrl-C stops it)", flush=True)
    if view:
        print(f"study {name}, its trials sorted by the objective:\n  {view}", flush=True)
    print(f"all studies:\n  {experiments_url(base)}", flush=True)

    def ready() -> None:
        print(f"ready: {base}", flush=True)
        if args.open:
            webbrowser.open(target)

    return serve(cmd, env, args.port, on_ready=ready)


def _cmd_generate(args: argparse.Namespace) -> int:
    from study.generate import GenerationSpec, run_generation, validate_space
    from trainables.config import parse_overrides

    base = parse_overrides(args.set)
    for key in ("samples", "feature_extractor", "inception_weights", "extractor_plugin"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.classes:
        base["classes"] = [c for item in args.classes for c in str(item).split(",") if c]
    if args.no_score:
        base["score"] = False
    defaults = dict(validate_space(args.space).study) if args.space else {}
    metrics = args.metric or _as_list(defaults.get("metric", "gen/fid"))
    modes = args.mode or _as_list(defaults.get("mode", "min"))
    if len(modes) == 1 and len(metrics) > 1:
        modes = modes * len(metrics)
    spec = GenerationSpec(
        name=args.name or f"gen-{time.strftime('%Y%m%d-%H%M%S')}",
        space=args.space,
        trials=args.trials or int(defaults.get("trials", 8)),
        metrics=metrics,
        modes=modes,
        max_concurrent=args.max_concurrent,
        seed=args.seed,
        tracking_uri=_tracking_uri(args),
        storage=_storage(args),
        address=args.address,
        source=args.source,
        base=base,
        experiment=args.experiment,
    )
    what = (
        f"a study of {spec.trials} trials over {args.space}" if args.space else "one sampling run"
    )
    print(f"generate {spec.name}: {what} from {args.source}", flush=True)
    outcomes = run_generation(spec, working_dir=args.working_dir)
    key, mode = metrics[0], modes[0]
    done = [o for o in outcomes if key in o.metrics]
    done.sort(key=lambda o: o.metrics[key], reverse=mode == "max")
    cols = ["gen/fid", "gen/is", "gen/kid", "gen/energy_target_end"]
    print(f"\n{'trial':<12s} " + " ".join(f"{c:>22s}" for c in cols) + "  config")
    for o in done:
        cells = " ".join(
            f"{o.metrics[c]:>22.4f}" if c in o.metrics else f"{'-':>22s}" for c in cols
        )
        conf = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(o.config.items())
        )
        print(f"{o.trial_id:<12s} {cells}  {conf if args.space else ''}")
    for o in outcomes:
        if o.status == "FAILED":
            print(f"failed: trial {o.trial_id}: {o.error}")
    print(f"\nsample grids and energy traces: study ui --tracking-uri {_tracking_uri(args)}")
    return 0 if done else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``study`` command."""
    from study.spec import BACKENDS, DEFAULT_SPACE, SCHEDULERS, StudySpec

    # options shared by several sub-commands, declared once (parent parsers)
    # fmt: off
    store, cluster, sets, objective, search = (argparse.ArgumentParser(add_help=False)
                                               for _ in range(5))
    store.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    store.add_argument("--storage", help="studies' files and Ray state: a folder, a mount "
                       "every node shares, or a URI such as s3://bucket/prefix (S3-compatible "
                       "servers: AWS_ENDPOINT_URL) (default: ./studies)")
    cluster.add_argument("--address", help="join this Ray cluster instead of starting one "
                         "(train: with --workers; generate: with --space)")
    ship = argparse.ArgumentParser(add_help=False)
    ship.add_argument("--working-dir", metavar="DIR",
                      help="ship this folder (the project's checkout) to every Ray node "
                      "(Ray runtime_env working_dir; .venv, .git, mlruns, studies, data and "
                      "checkpoints stay behind): for nodes that lack the code")
    sets.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="set one config key (repeatable; a.b=V sets b in the mapping a, "
                      "keeping its other keys), e.g. --set eps=8/255")
    objective.add_argument("--metric", action="append", help="objective (repeat: multi-objective; "
                           "default: the study's or space's, else val/pgd_acc; generate: gen/fid)")
    objective.add_argument("--mode", action="append", choices=["max", "min"], help="per --metric")
    search.add_argument("--seed", type=int, default=StudySpec.seed, help="Optuna sampler's seed")
    search.add_argument("--max-concurrent", type=int, default=StudySpec.max_concurrent,
                        help="trials at once (0: no limit)")
    # fmt: on
    verbose = {"action": "store_true", "help": "show Ray's own output"}
    parser = argparse.ArgumentParser(
        prog="study",
        description="Hyperparameter studies of energy-based adversarial training.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run",
        parents=[sets, objective, search, cluster, ship, store],
        help="run a Ray Tune + Optuna study (default: small WEAT on digits)",
    )
    p.add_argument("--space", help=f"search space YAML or shipped name (default: {DEFAULT_SPACE})")
    p.add_argument("--config", help="base training config YAML (default: digits settings)")
    p.add_argument(
        "--trials", type=int, help=f"trials (default: the space's, else {StudySpec.trials})"
    )
    p.add_argument("--epochs", type=int, help="epochs per trial (default: the space's, else "
                   f"{DEFAULT_EPOCHS} on the digits default, else the config's)")  # fmt: skip
    p.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial "
                   f"(default: the space's, else {StudySpec.grace_period})")  # fmt: skip
    p.add_argument("--name", help="study name, new in --storage (default: <space>-<date>-<time>)")
    p.add_argument("--resume", action="store_true",
                   help="with --name: start the study if --storage has none of that name, "
                   "continue it if it is unfinished, print its outcome if it has ended (for "
                   "retried jobs)")  # fmt: skip
    p.add_argument("--scheduler", help="what stops poor trials early: "
                   f"{'|'.join(SCHEDULERS)} (default: the space's, else "
                   f"{StudySpec.scheduler}; multi-objective: asha by non-dominated "
                   "sorting, or none)")  # fmt: skip
    p.add_argument("--asha", dest="asha", action="store_true", default=None,
                   help="= --scheduler asha")  # fmt: skip
    p.add_argument("--no-asha", dest="asha", action="store_false", help="= --scheduler none")
    p.add_argument("--warm-start", metavar="OTHER",
                   help="seed the search with the finished trials of study OTHER, read "
                   "from the MLflow store (--tracking-uri); trials outside this space are "
                   "skipped")  # fmt: skip
    p.add_argument("--constraint", action="append", metavar="'METRIC>=BOUND'",
                   help="a bound a trial must meet to count as best, e.g. "
                   "'val/clean_acc>=0.80' (operators >=, <=, >, <; repeatable); Optuna's "
                   "TPE learns it, export/show/report pass violating trials over")  # fmt: skip
    p.add_argument("--stop-on-energy-divergence", action="store_true",
                   help="stop a trial when its training-probe ΔE (train_probe/delta_energy) "
                   "falls by --divergence-threshold of its peak over the --divergence-window "
                   "epochs before (and by --divergence-min-drop at least), from epoch "
                   "--divergence-min-epoch on; the trial keeps its "
                   "best checkpoint before the fall (study/stopper.py)")  # fmt: skip
    p.add_argument("--divergence-window", type=int, default=StudySpec.divergence_window,
                   help="epochs over which the ΔE peak is taken "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--divergence-threshold", type=float,
                   default=StudySpec.divergence_threshold, help="least relative fall of ΔE "
                   "from that peak that stops (default: %(default)s)")  # fmt: skip
    p.add_argument("--divergence-min-epoch", type=int, default=StudySpec.divergence_min_epoch,
                   help="first epoch at which the ΔE rule may stop a trial, >= 2 "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--divergence-min-drop", type=float,
                   default=StudySpec.divergence_min_drop, help="least fall of ΔE from that "
                   "peak that stops, in energy units (default: %(default)s)")  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS, default=StudySpec.backend,
                   help="train: TorchTrainer per trial; direct: loop in the trial; auto: "
                   "direct for one CPU worker, else train (default: %(default)s)")  # fmt: skip
    for key, kind, text in _SPEC_OPTIONS:
        p.add_argument(f"--{key.replace('_', '-')}", type=kind, default=getattr(StudySpec, key),
                       help=f"{text} (default: %(default)s)")  # fmt: skip
    p.add_argument("-v", "--verbose", **verbose)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "resume", parents=[cluster, ship, store], help="continue an interrupted study"
    )
    p.add_argument("name")
    p.add_argument("-v", "--verbose", **verbose)
    p.set_defaults(func=_cmd_resume)

    p = sub.add_parser(
        "extend", parents=[cluster, ship, store], help="add trials to a study (ended or not)"
    )
    p.add_argument("name")
    p.add_argument("--trials", type=int, required=True, help="how many trials to add")
    p.add_argument("-v", "--verbose", **verbose)
    p.set_defaults(func=_cmd_extend)

    p = sub.add_parser(
        "replicate",
        parents=[cluster, ship, store],
        help="train the best trials' configurations again with new seeds",
    )
    p.add_argument("name")
    p.add_argument("--top", type=int, default=3, help="how many of the best trials "
                   "(K, the order of study export; default: %(default)s)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=3, help="new seeds per trial "
                   "(S; default: %(default)s)")  # fmt: skip
    p.add_argument("--first-seed", type=int, help="the first seed (default: each trial's "
                   "own seed + 1)")  # fmt: skip
    p.add_argument("-v", "--verbose", **verbose)
    p.set_defaults(func=_cmd_replicate)

    p = sub.add_parser(
        "export", parents=[objective, store], help="write the best config(s) of a study as YAML"
    )
    p.add_argument("name")
    p.add_argument("--top", type=int, default=1, help="how many configs")
    p.add_argument("-o", "--output", default="best.yaml", help="output YAML file")
    p.add_argument("--robustbench", metavar="DIR", help="instead: write the best trial's weights, "
                   "a torch-only model.py and model_info.json (standard AutoAttack on --n test "
                   "points) into the new or empty folder DIR")  # fmt: skip
    p.add_argument("--n", type=int, default=10_000, help="--robustbench: the first N test points "
                   "AutoAttack evaluates (default: %(default)s)")  # fmt: skip
    p.add_argument("--register", metavar="MODEL", help="also log the best trial's model to "
                   "its run, registered as a new version of MODEL, alias 'candidate'")  # fmt: skip
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("list", parents=[store], help="studies in the MLflow store")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("show", parents=[store], help="the trials of a study")
    p.add_argument("name")
    p.add_argument("--ui", metavar="URL",
                   help="MLflow UI address of the compare link (default: the tracking server, "
                   "else http://127.0.0.1:5000 as study ui serves it)")  # fmt: skip
    p.set_defaults(func=_cmd_show)

    p = sub.add_parser(
        "report", parents=[store], help="an HTML/Markdown report of a study, from MLflow"
    )
    from reports.cli import configure as configure_report

    configure_report(p, store_args=False)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "ui", parents=[store], help="the MLflow UI of a study (started on 127.0.0.1 for SQLite)"
    )
    p.add_argument("name", nargs="?", help="study to show (default: the latest in the store)")
    p.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    p.add_argument("--open", action="store_true", help="open the address in a web browser")
    p.set_defaults(func=_cmd_ui)

    p = sub.add_parser(
        "generate",
        parents=[sets, objective, search, cluster, ship, store],
        help="sample images from a trained classifier (SGLD), score them, search the sampler",
    )
    p.add_argument("--from", dest="source", required=True,
                   help="MLflow run id of a training run, or a checkpoint file")  # fmt: skip
    p.add_argument("--space", help="sampler search space (e.g. sgld, sgld_smoke); none: one run")
    p.add_argument("--trials", type=int, help="trials of the search (default: the space's)")
    p.add_argument("--samples", type=int, help="images drawn per run (default 500)")
    p.add_argument("--classes", action="append", help="class indices to sample (default all)")
    p.add_argument("--name", help="name of the generation study (default gen-<date>-<time>)")
    p.add_argument("--experiment", default="generation",
                   help="MLflow experiment when --from is a file")  # fmt: skip
    p.add_argument("--feature-extractor", help="torch-fidelity extractor name")
    p.add_argument("--inception-weights", help="local Inception weights file")
    p.add_argument("--extractor-plugin", help=".py file or module registering an extractor")
    p.add_argument("--no-score", action="store_true", help="sample only, no IS/FID/KID")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser(
        "train",
        parents=[sets, cluster, store],
        help="train one model (in this process, or on Ray Train with --workers)",
        description="Train one robust classifier; config keys are those of "
        "trainables.config.TrainConfig.",
    )
    p.add_argument("--config", help="YAML file with config keys (default: built-in defaults)")
    p.add_argument(
        "--preset",
        help="start from a paper preset, e.g. cifar10-weat_adv (docs/methods.md lists them); "
        "--config and --set win over it",
    )
    p.add_argument("-o", "--output", help="output folder (default: the config's output_dir; "
                   "--workers: the trial's folder under --storage)")  # fmt: skip
    p.add_argument("--resume", help="checkpoint (checkpoints/last.pt) to continue from")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--experiment", default="train", help="MLflow experiment (default: train)")
    p.add_argument("--no-mlflow", action="store_true", help="do not record in MLflow")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP if > 1)")
    p.add_argument("--gpus", type=float, default=0.0, help="GPUs for the Ray Train run")
    p.add_argument("--register", metavar="MODEL", help="log the model to the run, register it "
                   "as a new version of MODEL, alias 'champion' when it beats the current "
                   "champion on the source study's objective (test score)")  # fmt: skip
    p.set_defaults(func=_cmd_train)
    from study.doctor import add_parser as add_doctor_parser
    from study.server import add_parser as add_server_parser

    add_doctor_parser(sub)
    add_server_parser(sub)
    return parser


def _cmd_report(args: argparse.Namespace) -> int:
    """``study report``: :func:`reports.cli.run` with the tracking URI's password (if
    any) moved to the environment first, so no error or page can show it."""
    from reports.cli import run as run_report

    args.tracking_uri = _tracking_uri(args)
    return run_report(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``study`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        from study.credentials import redact

        message = textwrap.fill(redact(str(exc)), width=100, break_long_words=False)
        print(f"study {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
