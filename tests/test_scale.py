"""1,100 trial runs of one study: every reader sees all of them, not the first page.

MLflow returns at most 1,000 runs per search call. The store is a real SQLite MLflow
store: the experiment, the study's parent run and trial ``t_00000`` (the best trial and
the oldest, so the last page of a newest-first search) are written through
``MlflowClient``; the other 1,099 trial runs are inserted in one transaction through
MLflow's own SQLAlchemy models, row for row what ``create_run`` + ``log_batch`` +
``set_terminated`` write (checked against ``t_00000``), because 1,100 client round
trips take minutes on a loaded machine.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from reports.vocabulary import (
    CONFIG_FILE,
    ENERGIES_FILE,
    PARENT_STUDY,
    PARENT_TAG,
    ROLE_STUDY,
    ROLE_TRIAL,
    TAG_EARLY,
    TAG_METHOD,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
)

pytestmark = pytest.mark.slow

N_TRIALS = 1100
STUDY = "scale-study"
T0_MS = 1_780_000_000_000  # the first trial's start time (ms since the epoch)


def _trial_id(i: int) -> str:
    return f"t_{i:05d}"


def _pgd(i: int) -> float:
    """val/pgd_acc of trial ``i``: all distinct, trial 0 the best (no ties)."""
    return 0.9 - i * 0.0005


def _trial_tags(i: int, parent_id: str) -> dict[str, str]:
    return {
        TAG_STUDY: STUDY,
        TAG_ROLE: ROLE_TRIAL,
        TAG_TRIAL: _trial_id(i),
        PARENT_TAG: parent_id,
        TAG_METHOD: "weat_adv",
        TAG_EARLY: "false",
    }


def _trial_metrics(i: int) -> dict[str, float]:
    return {"val/pgd_acc": _pgd(i), "val/clean_acc": 0.95 - i * 0.0001, "epoch": 8.0}


def _build_store(uri: str, artifacts: Path) -> tuple[str, str]:
    """The study in ``uri``; returns ``(experiment_id, run id of trial t_00000)``."""
    from mlflow.entities import Metric, Param
    from mlflow.store.tracking.dbmodels.models import (
        SqlLatestMetric,
        SqlMetric,
        SqlParam,
        SqlRun,
        SqlTag,
    )
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(STUDY, artifact_location=artifacts.as_uri())
    parent = client.create_run(
        exp,
        start_time=T0_MS - 1000,
        run_name=STUDY,
        tags={TAG_STUDY: STUDY, TAG_ROLE: ROLE_STUDY, TAG_PARENT: PARENT_STUDY},
    ).info.run_id
    # what the runner logs: the spec's fields as params (lists as their str())
    client.log_batch(
        parent, params=[Param("metrics", "['val/pgd_acc']"), Param("modes", "['max']")]
    )

    def api_trial(i: int) -> str:
        run = client.create_run(
            exp, start_time=T0_MS + i * 1000, tags=_trial_tags(i, parent), run_name=_trial_id(i)
        )
        run_id = run.info.run_id
        metrics = [Metric(k, v, T0_MS + i * 1000, 8) for k, v in _trial_metrics(i).items()]
        client.log_batch(run_id, metrics=metrics, params=[Param("method", "weat_adv")])
        client.log_text(run_id, f"method: weat_adv\nseed: {i}\n", CONFIG_FILE)
        energies = artifacts.parent / ENERGIES_FILE
        rng = np.random.default_rng(i)
        np.savez(energies, energy_nat=rng.normal(-5, 1, 64), energy_adv=rng.normal(-3, 1, 64))
        client.log_artifact(run_id, str(energies))
        client.set_terminated(run_id, "FINISHED", end_time=T0_MS + i * 1000 + 500)
        return run_id

    best = api_trial(0)
    template = client.get_run(best)  # the client's own tags (user, source) are copied
    own = {k: v for k, v in template.data.tags.items() if k.startswith("mlflow.")}
    store = SqlAlchemyStore(uri, artifacts.as_uri())
    with store.ManagedSessionMaker(read_only=False) as session:
        for i in range(1, N_TRIALS):
            run_id = uuid.uuid4().hex
            start = T0_MS + i * 1000
            tags = {**own, **_trial_tags(i, parent), "mlflow.runName": _trial_id(i)}
            run = SqlRun(
                name=_trial_id(i),
                artifact_uri=f"{artifacts.as_uri()}/{run_id}/artifacts",
                run_uuid=run_id,
                experiment_id=int(exp),
                source_type="UNKNOWN",
                source_name="",
                entry_point_name="",
                user_id=template.info.user_id,
                status="FINISHED",
                start_time=start,
                end_time=start + 500,
                deleted_time=None,
                source_version="",
                lifecycle_stage="active",
            )
            run.tags = [SqlTag(key=k, value=v) for k, v in tags.items()]
            run.params = [SqlParam(key="method", value="weat_adv")]
            session.add(run)
            for key, value in _trial_metrics(i).items():
                row = {"key": key, "value": value, "timestamp": start, "step": 8, "is_nan": False}
                session.add(SqlMetric(run_uuid=run_id, **row))
                session.add(SqlLatestMetric(run_uuid=run_id, **row))
    # the rows look like the client's: same tag keys, params, metrics and status
    a = client.get_run(best)
    (b,) = client.search_runs([exp], f"tags.`{TAG_TRIAL}` = '{_trial_id(1)}'")
    assert set(a.data.tags) == set(b.data.tags)
    assert a.info.user_id == b.info.user_id
    assert (a.data.params, a.info.status) == (b.data.params, b.info.status)
    assert set(a.data.metrics) == set(b.data.metrics)
    return exp, best


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, Path]:
    """``(tracking URI, run id of the best and oldest trial, folder)`` of the 1,100-trial study."""
    from study.tracking import quiet_mlflow

    quiet_mlflow()
    folder = tmp_path_factory.mktemp("scale")
    uri = f"sqlite:///{(folder / 'mlflow.db').as_posix()}"
    _, best = _build_store(uri, folder / "mlartifacts")
    return uri, best, folder


def test_a_search_page_is_smaller_than_the_study(big_store: tuple[str, str, Path]) -> None:
    """The premise: one plain search call (MLflow's page) misses trials of this study."""
    from mlflow.tracking import MlflowClient

    uri, best, _ = big_store
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(STUDY).experiment_id
    page = client.search_runs([exp], f"tags.`{TAG_ROLE}` = '{ROLE_TRIAL}'", max_results=1000,
                              order_by=["attributes.start_time DESC"])  # fmt: skip
    assert len(page) == 1000 and page.token
    assert best not in {r.info.run_id for r in page}


def test_tracker_and_report_data_see_every_trial(
    big_store: tuple[str, str, Path], tmp_path: Path
) -> None:
    """``MlflowTracker.find_runs`` and the report's ``load_study`` read every page."""
    from reports.data import load_study
    from study.tracking import MlflowTracker

    uri, best, _ = big_store
    tracker = MlflowTracker(uri, STUDY)
    found = tracker.find_runs(**{TAG_STUDY: STUDY, TAG_ROLE: ROLE_TRIAL})
    assert len(found) == N_TRIALS
    assert len({r.info.run_id for r in found}) == N_TRIALS
    assert found[-1].info.run_id == best  # newest first: the oldest comes last
    data = load_study(STUDY, uri, tmp_path)
    assert data.parent is not None
    assert len(data.trials) == N_TRIALS
    assert {t.trial_id for t in data.trials} == {_trial_id(i) for i in range(N_TRIALS)}


def test_study_list_show_export_see_every_trial(
    big_store: tuple[str, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``study list``, ``study show`` and ``study export`` count, list and rank all 1,100
    trials: the best one is the oldest, on the second page of a newest-first search."""
    from study.cli import main

    uri, best, folder = big_store
    store = ["--tracking-uri", uri, "--storage", str(folder / "studies")]
    assert main(["list", *store]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^{STUDY}\s+{N_TRIALS} trials \({N_TRIALS} finished\)$", listed, re.M)

    assert main(["show", STUDY, *store]) == 0
    shown = capsys.readouterr().out
    assert f"{N_TRIALS} trial(s), best first" in shown
    rows = re.findall(r"^\s*(\d+)\s+(t_\d{5})\s+FINISHED", shown, re.M)
    assert len(rows) == N_TRIALS
    assert rows[0] == ("1", _trial_id(0))
    assert rows[-1] == (str(N_TRIALS), _trial_id(N_TRIALS - 1))

    out = tmp_path / "best.yaml"
    assert main(["export", STUDY, "-o", str(out), *store]) == 0
    text = out.read_text()
    assert f"# MLflow run {best}, trial {_trial_id(0)}" in text
    assert "seed: 0" in text


def test_report_sees_every_trial(big_store: tuple[str, str, Path], tmp_path: Path) -> None:
    """The report of 1,100 trials: all in its header count, trials table and CSV, each
    with its config file; the energy section shows the best (oldest) trial."""
    import pandas as pd

    from reports.build import build_report

    uri, best, _ = big_store
    index = build_report(STUDY, uri, tmp_path / "report", "md")
    text = index.read_text()
    assert f"| trials | {N_TRIALS} FINISHED |" in text
    assert len(re.findall(r"^\| t_\d{5} \| FINISHED \|", text, re.M)) == N_TRIALS
    table = pd.read_csv(tmp_path / "report" / "tables" / "trials.csv")
    assert len(table) == N_TRIALS and set(table["run_id"]) >= {best}
    configs = sorted((tmp_path / "report" / "configs").glob("t_*.yaml"))
    assert len(configs) == N_TRIALS
    assert "seed: 0" in (tmp_path / "report" / "configs" / "t_00000.yaml").read_text()
    assert f"Run {best} (trial {_trial_id(0)}, the best by val/pgd_acc with energies)" in text


def test_every_experiment_page_is_read(tmp_path: Path) -> None:
    """A store of 1,001 experiments (studies): one search call returns 1,000, the report's
    ``experiment_ids`` all of them. The experiments are inserted in one transaction
    through MLflow's own model, as ``create_experiment`` writes them."""
    from mlflow.store.tracking.dbmodels.models import SqlExperiment
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    from reports.build import experiment_ids

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    client = MlflowClient(uri)
    first = client.create_experiment("study-0000")
    template = client.get_experiment(first)
    store = SqlAlchemyStore(uri, (tmp_path / "mlartifacts").as_uri())
    with store.ManagedSessionMaker(read_only=False) as session:
        for i in range(1, 1000):
            session.add(
                SqlExperiment(
                    name=f"study-{i:04d}",
                    artifact_location=f"{(tmp_path / 'mlartifacts').as_uri()}/{i}",
                    lifecycle_stage="active",
                    creation_time=template.creation_time + i,
                    last_update_time=template.creation_time + i,
                )
            )
    names = {e.name for e in client.search_experiments()}
    assert len(names) == 1000  # "Default" and 999 studies: one page
    ids = experiment_ids(client)
    with store.ManagedSessionMaker() as session:
        stored = {str(row[0]) for row in session.query(SqlExperiment.experiment_id)}
    assert len(stored) == 1001
    assert len(ids) == len(set(ids)) and set(ids) == stored
