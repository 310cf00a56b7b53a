"""The MLflow UI (and optuna-dashboard) as the place where studies are compared.

* **Run names** that say what a trial tried (:func:`trial_run_name`).
* **The study's runs view**: MLflow 3.x reads a saved view of an experiment's runs
  table from the experiment tag ``mlflow.sharedViewState.<key>`` (JSON: the search
  facets ``orderByKey``/``orderByAsc``/… and the table state ``selectedColumns``,
  ``runsExpanded``, …) when its address carries ``viewStateShareKey=<key>`` (the UI's
  own "share view"; search facets in the address itself would make it ignore the saved
  view). :func:`publish_view` writes that tag, :func:`runs_view_url` gives its address.
* **Training view, not GenAI**: MLflow 3.17's UI picks "GenAI" or "Model training"
  from the address (``workflowType=machine_learning``), else from the browser's last
  choice (GenAI by default); it reads the experiment tag ``mlflow.experimentKind``
  (``custom_model_development``) only where that "GenAI / Model training" switch is
  off (on in 3.17). Every address built here carries the former and every experiment
  the platform creates gets the latter.
* **Compare page**: ``#/compare-runs?runs=[…]&experiments=[…]`` (:func:`compare_url`).
* **The parent run's description** (``mlflow.note.content``, Markdown):
  :func:`study_description`, :func:`describe_study`.
* **``study ui``'s server**: started in its own process group, which SIGTERM, SIGINT
  and SIGHUP end as a whole (:func:`serve`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from reports.ranking import run_metrics
from reports.vocabulary import (
    DESCRIPTION_TAG,
    EXPERIMENT_KIND_TAG,
    PARENT_TAG,
    ROLE_REPLICATE,
    ROLE_STUDY,
    SHARED_VIEW_PREFIX,
    TAG_CONSTRAINT_OK,
    TAG_FINALIST,
    TAG_REPLICATE_OF,
    TAG_REPLICATE_SEED,
    TAG_ROLE,
    TAG_SEARCHED,
    TAG_STUDY,
    TAG_TRIAL,
    TRAINING_KIND,
    VIEW_KEY,
)
from trainables.errors import UserError
from trainables.reporting import energy_histogram  # noqa: F401  (drawn on the worker too)

#: What every experiment the platform creates is tagged with.
EXPERIMENT_TAGS = {EXPERIMENT_KIND_TAG: TRAINING_KIND}
#: The address parameter with which MLflow 3.17's UI shows the "Model training" view.
WORKFLOW_PARAM = ("workflowType", "machine_learning")
#: Metrics shown after the objectives in the runs view, when some trial logged them.
EXTRA_COLUMNS = ("val/clean_acc", "test/clean_acc", "test/pgd_acc", "final/pgd_acc",
                 "final/aa_acc")  # fmt: skip
#: Tags shown as columns of the runs view.
TAG_COLUMNS = (TAG_TRIAL, TAG_FINALIST)
#: Trials linked from the parent's description and compared by ``study show``'s link.
TOP_TRIALS = 5
#: Run names are cut to this many characters (an ellipsis marks a cut).
RUN_NAME_MAX = 60
#: Short symbols of searched keys in run names (else the key's last dotted part).
SYMBOLS = {
    "beta": "β",
    "weight_params.temperature": "T",
    "weight_params.power": "p",
    "weight_params.scale": "s",
    "normalize": "norm",
    "eps": "ε",
    "step_size": "α",
    "attack_steps": "K",
    "lr_max": "lr",
    "bias": "b",
    "slope": "k",
    "burn_in_fraction": "burn",
    "momentum": "μ",
    "noise": "γ",
    "steps": "steps",
    "pca_sigma": "σ",
    "retained_variance": "var",
}
#: ``weight_fn`` values in run names (the others as they are).
WEIGHT_NAMES = {"none": "unweighted"}
#: Seconds ``study ui`` waits for the server to answer, and for its group to end.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0


# --- run names -----------------------------------------------------------------------------
def _pair(key: str, value: Any) -> str:
    """``β=3.39``: a searched key's symbol (:data:`SYMBOLS`, else its last dotted part) and
    its value, floats with 3 significant digits."""
    symbol = SYMBOLS.get(key, key.rsplit(".", 1)[-1])
    return f"{symbol}={value:.3g}" if isinstance(value, float) else f"{symbol}={value}"


def trial_run_name(method: str | None, searched: Mapping[str, Any]) -> str:
    """The MLflow run name of a trial: what it tried, e.g. ``weat_adv β=3.39 exp(T=3.43)``.

    The method comes first, then each searched value in the order of ``searched``
    with a short symbol (:data:`SYMBOLS`); the weighting function carries its own
    parameters, ``exp(T=3.43)``. Cut to :data:`RUN_NAME_MAX` characters.

    Args:
        method: the trial's training method (``cfg.method``); None for runs without one
            (sampler trials).
        searched: the trial's sampled values, dotted keys (``weight_params.temperature``).
    """
    parts = [str(method)] if method else []
    fn_params = [k for k in searched if k.startswith("weight_params.")]
    for key, value in searched.items():
        if key == "method" or key in fn_params and "weight_fn" in searched:
            continue
        if key == "weight_fn":
            inner = ",".join(_pair(k, searched[k]) for k in fn_params)
            name = WEIGHT_NAMES.get(str(value), str(value))
            parts.append(f"{name}({inner})" if inner else name)
        else:
            parts.append(_pair(key, value))
    name = " ".join(parts) or "trial"
    return name if len(name) <= RUN_NAME_MAX else name[: RUN_NAME_MAX - 1] + "…"


def searched_names(space: Any) -> list[str]:
    """The parameters a :class:`search_spaces.space.SearchSpace` searches, in its order
    (``fixed`` ones left out)."""
    return [p.name for p in space.params if p.type != "fixed"]


def searched_values(space: Any, config: Mapping[str, Any]) -> dict[str, Any]:
    """The values of ``config`` (a trial's Tune config, dotted keys) that ``space``
    searched, in the space's order."""
    return {name: config[name] for name in searched_names(space) if name in config}


# --- trial figures ----------------------------------------------------------------------
# --- addresses -----------------------------------------------------------------------------
def _query(pairs: Sequence[tuple[str, str]]) -> str:
    return urllib.parse.urlencode([*pairs, WORKFLOW_PARAM])


def runs_view_url(base: str, experiment_id: str, key: str = VIEW_KEY) -> str:
    """The address of an experiment's runs table in the saved view ``key``.

    Args:
        base: the MLflow UI's address, e.g. ``http://127.0.0.1:5000``.
        experiment_id: the study's experiment.
        key: the saved view (experiment tag ``mlflow.sharedViewState.<key>``).
    """
    query = _query([("viewStateShareKey", key)])
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def experiments_url(base: str) -> str:
    """The address of the MLflow UI's list of experiments (one per study), training view."""
    return f"{base.rstrip('/')}/#/experiments?" + _query([])


def compare_path(experiment_id: str, run_ids: Sequence[str]) -> str:
    """``#/compare-runs?runs=[…]&experiments=[…]``: MLflow's compare page, relative."""
    pairs = [("runs", json.dumps(list(run_ids), separators=(",", ":"))),
             ("experiments", json.dumps([str(experiment_id)]))]  # fmt: skip
    return "#/compare-runs?" + _query(pairs)


def compare_url(base: str, experiment_id: str, run_ids: Sequence[str]) -> str:
    """The address of MLflow's compare-runs page (:func:`compare_path`: parallel
    coordinates, scatter, contour, metrics side by side) on the UI at ``base``, e.g.
    ``http://127.0.0.1:5000``, for the runs ``run_ids``, in order."""
    return f"{base.rstrip('/')}/{compare_path(experiment_id, run_ids)}"


def ui_base(tracking_uri: str, port: int = 5000) -> str:
    """Where the MLflow UI of a store is: the server itself for an HTTP store, else
    ``study ui``'s address on 127.0.0.1:``port``."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{port}"


# --- the saved runs view ------------------------------------------------------------------
#: The runs table's column of run names (its id in the UI's table).
RUN_NAME_COLUMN = "attributes.`Run Name`"


def view_state(
    objectives: Sequence[str],
    modes: Sequence[str],
    searched: Sequence[str],
    *,
    metrics: Sequence[str] = (),
    expanded: Sequence[str] = (),
    tags: Sequence[str] = (),
) -> dict[str, Any]:
    """The saved view of a study's runs table: sorted by the first objective (best
    first), the objectives, ``metrics`` and the searched parameters as columns.

    Args:
        objectives: the study's objective metrics.
        modes: ``max``/``min`` of each objective.
        searched: the searched parameter names (dotted keys).
        metrics: further metric columns, after the objectives.
        expanded: run ids whose child runs are shown (the parent runs).
        tags: further tag columns, after :data:`TAG_COLUMNS` (a constrained study's
            verdict, a replicate's source trial and seed).
    """
    # column keys as MLflow's UI writes them: metrics.`val/pgd_acc`
    goals = [f"metrics.`{m}`" for m in objectives]
    params = [f"params.`{p}`" for p in searched]
    others = [f"metrics.`{m}`" for m in metrics if m not in objectives]
    tags = [f"tags.`{t}`" for t in dict.fromkeys([*TAG_COLUMNS, *tags])]
    # the table's order (the UI's column ids): the objectives and searched parameters
    # right after the run's name, where they are seen without scrolling
    order = [RUN_NAME_COLUMN, "runDateAndNestInfo", *goals, *params, *others, *tags, "duration"]
    return {
        "searchFilter": "",
        "orderByKey": goals[0],
        "orderByAsc": modes[0] == "min",
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": [*goals, *others, *params, *tags],
        "columnOrder": order,
        "columnWidths": {RUN_NAME_COLUMN: 280},
        "runsExpanded": {run_id: True for run_id in expanded},
    }


def _searched_names(parents: Sequence[Any], runs: Sequence[Any]) -> list[str]:
    """The study's searched parameters: those of its space (the parent run's ``space``
    param) when that still loads, else the trials' config keys whose values differ."""
    from search_spaces import load_space

    for parent in parents:
        try:
            return searched_names(load_space(parent.data.params["space"]))
        except Exception:  # noqa: BLE001 - a moved space file: read the trials instead
            continue
    keys = {n for run in runs for n in run.data.tags.get(TAG_SEARCHED, "").split(",") if n}
    varying = [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]
    return sorted(varying, key=lambda n: (n != "method", n))


def publish_view(
    tracker: Any, study: str, key: str = VIEW_KEY, *, searched: Sequence[str] | None = None
) -> str:
    """Write the study's saved runs view into its experiment; returns the experiment id.

    The columns are the study's objectives, those of :data:`EXTRA_COLUMNS` some trial
    logged, and the searched parameters; the experiment also gets
    :data:`EXPERIMENT_TAGS` (a store written before them lacks them).

    Args:
        tracker: the study's :class:`study.tracking.MlflowTracker`.
        study: the study name.
        key: the view's key (``viewStateShareKey`` of :func:`runs_view_url`).
        searched: the searched parameter names (default: read from the store).
    """
    from study.export import study_objectives, trial_runs

    objectives, modes = study_objectives(tracker, study)
    runs = trial_runs(tracker, study)
    logged = {k for r in runs for k in r.data.metrics}
    found = tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: ROLE_STUDY})
    parents = sorted(found, key=lambda r: r.info.start_time or 0)
    if searched is None:
        searched = _searched_names(parents, runs)
    extra = [m for m in EXTRA_COLUMNS if m in logged]
    expanded = [r.info.run_id for r in parents]
    tags = [TAG_CONSTRAINT_OK] if any(TAG_CONSTRAINT_OK in r.data.tags for r in runs) else []
    if replicates := tracker.find_runs(**{TAG_STUDY: study, TAG_ROLE: ROLE_REPLICATE}):
        # the replicated trials open, their replicates nested under them
        expanded += list(dict.fromkeys(r.data.tags.get(PARENT_TAG, "") for r in replicates))
        tags += [TAG_REPLICATE_OF, TAG_REPLICATE_SEED]
    state = view_state(
        objectives, modes, searched, metrics=extra, expanded=[e for e in expanded if e], tags=tags
    )
    tracker.set_experiment_tags({SHARED_VIEW_PREFIX + key: json.dumps(state), **EXPERIMENT_TAGS})
    return str(tracker.experiment_id)


# --- the parent run's description ----------------------------------------------------------
def _range(param: Any) -> str:
    """One searched parameter's values: ``∈ [1, 10] log``, ``∈ {a, b} (when …)``."""
    if param.type == "categorical":
        text = "{" + ", ".join(str(c) for c in param.choices) + "}"
    elif param.type == "fixed":
        text = f"= {param.value}"
    else:
        text = f"[{param.low:g}, {param.high:g}]" + (" log" if param.log else "")
        text += f" step {param.step:g}" if param.step else ""
        text += " int" if param.type == "int" else ""
    when = "; ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}" for k, v in param.when.items())
    return ("" if param.type == "fixed" else "∈ ") + text + (f" (when {when})" if when else "")


def command_text(argv: Sequence[str] | None = None) -> str:
    """The command that started this process, as a user would type it (``study run …``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.basename(argv[0]) in ("study", "__main__.py"):
        argv = ["study", *argv[1:]]
    return shlex.join(argv)


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def study_description(
    spec: Any,
    *,
    best: Sequence[Any] = (),
    experiment_id: str | None = None,
    command: str | None = None,
) -> str:
    """The parent run's description (Markdown): space, objective, command, best trials.

    Args:
        spec: the :class:`study.spec.StudySpec`.
        best: the best trial runs (MLflow runs, best first); empty while the study runs.
        experiment_id: the study's experiment (for the links to runs and the compare page).
        command: the command that started the study (default: this process's).
    """
    space = spec.load_space()
    objective = ", ".join(f"`{m}` ({o})" for m, o in zip(spec.metrics, spec.modes))
    lines = [
        f"**Study `{spec.name}`**: {spec.trials} trials of the space `{spec.space}` "
        f"(`{space.source}`); epochs per trial: {spec.default_epochs}; early "
        f"stopping: {spec.early_stopping()}; finalists: {spec.finalists}; "
        f"seed {spec.seed}.",
        "",
        f"**Objective**: {objective}" + (" (multi-objective)" if spec.multi_objective else ""),
        "",
        "**Searched**:",
        "",
        *(f"- `{p.name}` {_range(p)}" for p in space.params),
        "",
        f"**Command**: `{command or command_text()}`",
        "",
    ]
    if not best:
        lines.append("**Best trials**: the study is running (or ended without a scored trial).")
        return "\n".join(lines)
    finals = [c for c in ("final/pgd_acc", "final/aa_acc", "final/robust_acc")
              if any(c in r.data.metrics for r in best)]  # fmt: skip
    columns = list(dict.fromkeys([*spec.metrics, "val/clean_acc", "test/pgd_acc", *finals]))
    title = f"**Best trials** by {spec.metrics[0]} ({spec.modes[0]})"
    if experiment_id is not None:
        link = compare_path(experiment_id, [r.info.run_id for r in best])
        title += f", [compare them]({link})"
    lines += [
        title + ":",
        "",
        "| # | run | trial | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    for rank, run in enumerate(best, start=1):
        name = run.info.run_name or run.info.run_id
        if experiment_id is not None:
            name = f"[{name}](#/experiments/{experiment_id}/runs/{run.info.run_id})"
        cells = [_cell(run_metrics(run).get(c)) for c in columns]  # ΔE stop: the kept epoch
        trial = run.data.tags.get(TAG_TRIAL, "?")
        lines.append(f"| {rank} | {name} | {trial} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_trial_runs(tracker: Any, study: str, top: int = TOP_TRIALS) -> list[Any]:
    """The study's ``top`` best trial runs with its first objective, best first (the
    ranking of ``study show`` and ``study export``; early-stopped trials included)."""
    from reports.ranking import rank_runs
    from study.export import study_objectives, trial_runs

    objectives, modes = study_objectives(tracker, study)
    finished = [r for r in trial_runs(tracker, study) if r.info.status == "FINISHED"]
    scored = [r for r in finished if math.isfinite(run_metrics(r).get(objectives[0], math.nan))]
    return rank_runs(scored, objectives, modes)[:top]


def describe_study(tracker: Any, spec: Any, parent_run_id: str, *, ended: bool) -> None:
    """Write the ``spec``'s description into the parent run ``parent_run_id``; once the
    study ``ended`` (its search and final evaluation are over), with its best trials, and
    its saved runs view (:func:`publish_view`)."""
    best = best_trial_runs(tracker, spec.name) if ended else []
    text = study_description(spec, best=best, experiment_id=str(tracker.experiment_id))
    tracker.set_tags(parent_run_id, {DESCRIPTION_TAG: text})
    if ended:
        publish_view(tracker, spec.name, searched=searched_names(spec.load_space()))


# --- optuna-dashboard ----------------------------------------------------------------------
def name_optuna_study(ot_study: Any, spec: Any) -> None:
    """Speak the study's vocabulary in optuna-dashboard: the objectives' names (instead
    of "Objective 0") and user attributes with the space, objective and searched ranges.

    Args:
        ot_study: the ``optuna.Study`` (in the study's ``--optuna-storage``).
        spec: the :class:`study.spec.StudySpec`.
    """
    import warnings

    space = spec.load_space()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_metric_names is "experimental"
        ot_study.set_metric_names(list(spec.metrics))
    ot_study.set_user_attr("objective", [f"{m} ({o})" for m, o in zip(spec.metrics, spec.modes)])
    ot_study.set_user_attr("searched_params", {p.name: _range(p) for p in space.params})
    ot_study.set_user_attr("space", f"{spec.space} ({space.source})")
    ot_study.set_user_attr("mlflow_experiment", spec.name)


# --- study ui's server ---------------------------------------------------------------------
def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise a one-paragraph :class:`UserError` naming the port when something listens on
    (or holds) ``host:port`` (a bind test, as the server will do it: with ``SO_REUSEADDR``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(
                f"port {port} on {host} is already in use (another study ui or MLflow server?): "
                f"stop what listens there, or pick another port with --port N"
            ) from None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """End a process group started with ``start_new_session=True``: SIGTERM to the group,
    then SIGKILL to whatever is left after ``timeout`` seconds."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
    proc.poll()


def wait_until_ready(url: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> bool:
    """Poll ``url`` (the server's ``/health``) until it answers 200; False when the server
    exited first or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return True
        time.sleep(0.25)
    return False


def serve(
    cmd: Sequence[str],
    env: Mapping[str, str],
    port: int,
    *,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run the MLflow server ``cmd`` in its own process group until it exits or this
    process gets SIGTERM, SIGINT or SIGHUP, which end the whole group (server and
    uvicorn worker); returns 0 after a signal, else the server's exit code.

    Args:
        cmd: the server's command line.
        env: its environment.
        port: the port it serves on 127.0.0.1 (checked free first).
        on_ready: called once the server answers on ``/health``.
    """
    check_port(port)
    stopped: list[int] = []
    procs: list[subprocess.Popen] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        for started in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGTERM)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, stop) for s in handled}  # before the server exists
    try:
        proc = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True)
        procs.append(proc)
        if stopped:  # a signal came while it started
            stop(stopped[-1], None)
        ready = wait_until_ready(f"http://127.0.0.1:{port}/health", proc)
        if ready and not stopped and on_ready is not None:
            on_ready()
        code = proc.wait()
    finally:
        for started in procs:  # none when the server failed to start
            stop_group(started)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped else code
