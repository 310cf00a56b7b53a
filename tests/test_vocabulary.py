"""The MLflow vocabulary (reports/vocabulary.py): each tag and artifact name declared once,
and every write to MLflow retried while the store is busy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reports import vocabulary
from reports.build import log_report
from reports.vocabulary import (
    CONFIG_FILE,
    REPORT_ARTIFACT,
    ROLE_STUDY,
    ROLES,
    SHARED_VIEW_PREFIX,
    TAG_EARLY,
    TAG_ROLE,
    TAG_STUDY,
    VIEW_KEY,
)
from study.tracking import MlflowTracker, default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
#: Files that still spell names the vocabulary declares (their owners are to import them).
NOT_YET: set[str] = set()
DECLARED = {k: v for k, v in vars(vocabulary).items() if k.isupper() and isinstance(v, str)}
#: Names that look like names (tags, paths): a literal equal to one of them is a stray copy.
NAMES = {v for v in DECLARED.values() if "." in v or "/" in v}


def _literals(path: Path) -> set[str]:
    """The string literals of a module, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
    }


def test_study_and_reports_import_every_name_instead_of_spelling_it() -> None:
    strays = {}
    for path in sorted([*ROOT.glob("study/*.py"), *ROOT.glob("reports/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "reports/vocabulary.py":
            continue
        found = {s for s in _literals(path) if "energy_study." in s or s in NAMES}
        if found:
            strays[rel] = sorted(found)
    assert set(strays) <= NOT_YET, {k: v for k, v in strays.items() if k not in NOT_YET}


def test_names_and_roles_are_unique() -> None:
    names = [v for v in DECLARED.values() if "." in v or "/" in v]
    assert len(names) == len(set(names))
    assert len(set(ROLES)) == len(ROLES) and set(ROLES) <= set(DECLARED.values())
    tags = {k: v for k, v in DECLARED.items() if k.startswith("TAG_")}
    assert all(v.startswith("energy_study.") for v in tags.values()), tags


def test_writes_are_retried_while_the_store_is_busy(tmp_path, monkeypatch) -> None:
    """Each client method fails once as a locked SQLite store does; the writes go through."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tmp_path)
    tracker = MlflowTracker(uri, "busy")
    run_id = tracker.create_run("busy", {TAG_STUDY: "busy", TAG_ROLE: ROLE_STUDY})
    calls: list[str] = []
    flaky_methods = ("log_batch", "log_text", "log_artifact", "log_artifacts",
                     "set_experiment_tag", "set_terminated")  # fmt: skip
    for name in flaky_methods:
        real = getattr(MlflowClient, name)

        def flaky(self, *args, _name=name, _real=real, **kwargs):
            calls.append(_name)
            if calls.count(_name) == 1:
                raise MlflowException("(sqlite3.OperationalError) database is locked")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, name, flaky)
    tracker.set_tags(run_id, {TAG_EARLY: "false"})
    tracker.log_text(run_id, "method: standard\n", CONFIG_FILE)
    tracker.set_experiment_tags({SHARED_VIEW_PREFIX + VIEW_KEY: "{}"})
    (tmp_path / "report" / "tables").mkdir(parents=True)
    (tmp_path / "report" / "index.md").write_text("# report\n")
    (tmp_path / "report" / "tables" / "trials.csv").write_text("trial\n")
    assert log_report("busy", uri, tmp_path / "report") == run_id  # reports/ writes too
    tracker.end_run(run_id)
    assert set(calls) == set(flaky_methods)  # each failed once: what follows was retried
    run = tracker.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_EARLY] == "false"
    assert tracker.client.get_experiment(tracker.experiment_id).tags[SHARED_VIEW_PREFIX + VIEW_KEY]
    listed = {a.path for a in tracker.client.list_artifacts(run_id, REPORT_ARTIFACT)}
    assert listed == {f"{REPORT_ARTIFACT}/index.md", f"{REPORT_ARTIFACT}/tables"}
    assert tracker.download(run_id, CONFIG_FILE, tmp_path).read_text() == "method: standard\n"

    # any other error is not a busy store: it is raised at once
    def broken(self, *args, **kwargs):
        calls.append("broken")
        raise MlflowException("INVALID_PARAMETER_VALUE: no such run")

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    with pytest.raises(MlflowException, match="INVALID_PARAMETER"):
        tracker.set_tags(run_id, {TAG_EARLY: "true"})
    assert calls.count("broken") == 1
