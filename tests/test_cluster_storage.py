"""Studies on a two-node cluster whose second node cannot see the head's disk.

The cluster (:mod:`isolated_cluster`): ``ray start --head`` here, and a second node
in its own mount namespace with an empty tmpfs over the test's folder and the head's
Ray temp dir. The study storage is a bucket of moto's S3 server; MLflow is ``mlflow
server`` on PostgreSQL with its artifacts proxied into another bucket
(:mod:`servers`). Everything a trial on the second node leaves must therefore travel
through S3 or the tracking server.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from isolated_cluster import IsolatedCluster, isolated_cluster  # noqa: F401
from mlflow.tracking import MlflowClient
from servers import (  # noqa: F401
    MlflowServer,
    S3Server,
    mlflow_server_fixture,
    postgres_fixture,
    s3_server_fixture,
)
from test_cluster import BIN

from reports.vocabulary import (
    PARENT_TAG,
    ROLE_GENERATION,
    TAG_PROCESS,
    TAG_ROLE,
    TAG_STUDY,
    TAG_TRIAL,
)
from study.export import trial_runs
from study.tracking import MlflowTracker
from trainables.files import BEST_CHECKPOINT, ENERGIES_FILE, LAST_CHECKPOINT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mount namespaces"),
]

STUDY_TIMEOUT_S = 420
PLUGIN = str(Path(__file__).with_name("standin_extractor.py"))
STANDIN = "energy-study-standin"
#: what every trial of the studies below gets (tiny and quick; its numbers mean little)
SMOKE = ["--space", "smoke", "--set", "test_subset=300", "--finalists", "0", "--no-asha"]


def _seen_from_each_node(cluster: IsolatedCluster, path: Path) -> dict[str, bool]:
    """Whether ``path`` exists, as a task pinned to each node sees it."""
    script = (
        "import json, os, ray\n"
        "from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as N\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
        "@ray.remote(num_cpus=0)\n"
        f"def seen(): return os.path.exists({str(path)!r})\n"
        "nodes = [n for n in ray.nodes() if n['Alive']]\n"
        "out = {n['NodeManagerAddress'] + ':' + str(n['NodeManagerPort']): ray.get(\n"
        "    seen.options(scheduling_strategy=N(n['NodeID'], soft=False)).remote())\n"
        "    for n in nodes}\n"
        "print('SEEN ' + json.dumps(out))\n"
    )
    out = cluster.run(sys.executable, "-c", script, timeout=120).stdout
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("SEEN "))
    return json.loads(line.removeprefix("SEEN "))


def test_the_second_node_cannot_see_the_heads_work_folder(
    isolated_cluster: IsolatedCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The fixture's premise: a file the head writes in the test's folder is invisible
    to a task on the second node, and visible to one on the head."""
    probe = tmp_path / "written-by-the-head"
    probe.write_text("x")
    seen = _seen_from_each_node(isolated_cluster, probe)
    assert sorted(seen.values()) == [False, True], seen


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run (recursively)."""
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out |= _artifact_paths(client, run_id, item.path)
        else:
            out.add(item.path)
    return out


def _epochs(client: MlflowClient, run_id: str, metric: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric))


def _node_of_run(cluster: IsolatedCluster, run) -> str:  # noqa: ANN001
    return cluster.node_of(int(run.data.tags[TAG_PROCESS].rsplit(":", 1)[1]))


def test_a_study_on_s3_with_a_tracking_server_uses_both_nodes_and_loses_nothing(
    isolated_cluster: IsolatedCluster,  # noqa: F811
    mlflow_server: MlflowServer,  # noqa: F811
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two 1-CPU trials at once on two 1-CPU nodes: one runs on the node that cannot
    see the head's disk. Both trial runs hold their checkpoints, energies, a metric at
    every epoch and the test metrics; the report's energy section renders from the
    second node's trial; ``study generate --from`` that trial's run works."""
    cluster = isolated_cluster
    bucket = s3_server.create_bucket(f"studies-{secrets.token_hex(4)}")
    name = f"iso-{secrets.token_hex(3)}"  # the tracking server lives for the whole session
    driver = tmp_path / "driver"
    driver.mkdir()
    proc = cluster.run_in(
        driver, BIN / "study", "run", *SMOKE, "--name", name, "--trials", "2", "--epochs", "2",
        "--max-concurrent", "2", "--address", cluster.address,
        "--tracking-uri", mlflow_server.uri, "--storage", f"{bucket}/studies",
        timeout=STUDY_TIMEOUT_S, check=False,
    )  # fmt: skip
    report = "".join(cluster.logs[-2:])
    assert proc.returncode == 0, report
    # the study's own files are in the bucket, not on the driver's disk
    keys = s3_server.keys(bucket.removeprefix("s3://"), f"studies/{name}/")
    assert f"studies/{name}/study.yaml" in keys, keys[:20]
    assert not (driver / "studies").exists() and not (driver / "s3:").exists()

    client = MlflowClient(mlflow_server.uri)
    runs = trial_runs(MlflowTracker(mlflow_server.uri, name), name)
    assert len(runs) == 2, report
    nodes = sorted(_node_of_run(cluster, r) for r in runs)
    assert nodes == ["head", "worker"], (nodes, report)
    for run in runs:
        run_id = run.info.run_id
        assert run.info.status == "FINISHED", (run_id, run.data.tags, report)
        files = _artifact_paths(client, run_id)
        for needed in (BEST_CHECKPOINT, LAST_CHECKPOINT, ENERGIES_FILE):
            assert needed in files, (_node_of_run(cluster, run), needed, sorted(files))
        assert _epochs(client, run_id, "val/pgd_acc") == [1, 2], run_id
        assert "test/clean_acc" in run.data.metrics and "test/pgd_acc" in run.data.metrics
    (far,) = [r for r in runs if _node_of_run(cluster, r) == "worker"]

    # the report's energy section, drawn from the second node's trial
    out = tmp_path / "report"
    cluster.run_in(
        driver, BIN / "study", "report", name, "--tracking-uri", mlflow_server.uri,
        "-o", out, "--energy-run", far.info.run_id, timeout=300,
    )  # fmt: skip
    page = (out / "index.html").read_text()
    assert '<section id="energy" data-has-data="true"' in page
    assert far.info.run_id in page

    # sampling from the second node's trial: its checkpoint comes from the tracking server
    gen = cluster.run_in(
        driver, BIN / "study", "generate", "--from", far.info.run_id, "--samples", "20",
        "--set", "steps=5", "--tracking-uri", mlflow_server.uri,
        "--storage", f"{bucket}/generation", "--name", f"{name}-gen",
        "--extractor-plugin", PLUGIN, "--feature-extractor", STANDIN,
        timeout=300, check=False,
    )  # fmt: skip
    assert gen.returncode == 0, "".join(cluster.logs[-2:])
    # the sampling run is nested under the source trial's run, in the study's experiment
    sampled = MlflowTracker(mlflow_server.uri, name).find_runs(**{TAG_ROLE: ROLE_GENERATION})
    assert [(r.info.status, r.data.tags.get(PARENT_TAG)) for r in sampled] == [
        ("FINISHED", far.info.run_id)
    ], "".join(cluster.logs[-2:])
    assert _artifact_paths(client, sampled[0].info.run_id), "the sampling run has no artifacts"


def test_a_killed_driver_resumes_from_another_folder_without_duplicates(
    isolated_cluster: IsolatedCluster,  # noqa: F811
    mlflow_server: MlflowServer,  # noqa: F811
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``study run`` is killed once a trial has finished and another has reported an
    epoch; ``study resume`` run from a different working folder (same --storage and
    --tracking-uri) finishes the study: one run per trial, each epoch logged once."""
    cluster = isolated_cluster
    bucket = s3_server.create_bucket(f"studies-{secrets.token_hex(4)}")
    storage = f"{bucket}/studies"
    name = f"iso-resume-{secrets.token_hex(3)}"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    tracker = MlflowTracker(mlflow_server.uri, name)
    cmd = [
        str(BIN / "study"), "run", *SMOKE, "--name", name, "--trials", "3", "--epochs", "3",
        "--max-concurrent", "2", "--address", cluster.address,
        "--tracking-uri", mlflow_server.uri, "--storage", storage,
    ]  # fmt: skip
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=first, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        finished_before: dict[str, int] = {}
        deadline = time.time() + STUDY_TIMEOUT_S
        try:
            while time.time() < deadline and proc.poll() is None:
                time.sleep(1.0)
                runs = trial_runs(tracker, name) if "started" in log_path.read_text() else []
                done = {
                    r.data.tags[TAG_TRIAL]: r.info.end_time
                    for r in runs
                    if r.info.status == "FINISHED"
                }
                going = [
                    r for r in runs if r.info.status == "RUNNING" and "epoch" in r.data.metrics
                ]
                if done and going:
                    finished_before = done
                    break
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert finished_before, log_path.read_text()[-4000:]
    time.sleep(2.0)  # let the killed driver's trials go away

    proc = cluster.run_in(
        second, BIN / "study", "resume", name, "--address", cluster.address,
        "--tracking-uri", mlflow_server.uri, "--storage", storage,
        timeout=STUDY_TIMEOUT_S, check=False,
    )  # fmt: skip
    report = "".join(cluster.logs[-2:])
    assert proc.returncode == 0, report
    client = MlflowClient(mlflow_server.uri)
    runs = trial_runs(tracker, name)
    ids = [r.data.tags[TAG_TRIAL] for r in runs]
    assert len(ids) == len(set(ids)) == 3, (ids, report)
    for run in runs:
        assert run.info.status == "FINISHED", (run.data.tags, report)
        assert _epochs(client, run.info.run_id, "val/pgd_acc") == [1, 2, 3], run.data.tags
        assert "test/clean_acc" in run.data.metrics
        tid = run.data.tags[TAG_TRIAL]
        if tid in finished_before:  # finished before the kill: not rerun
            assert run.info.end_time == finished_before[tid]
    parents = tracker.find_runs(**{TAG_STUDY: name, TAG_ROLE: "study"})
    assert [p.info.status for p in parents] == ["FINISHED"]


def test_a_storage_the_second_node_cannot_see_is_refused_before_any_trial(
    isolated_cluster: IsolatedCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The old local-path default on nodes that share no disk: instead of a trial that
    fails at its first checkpoint on the second node, ``study run`` refuses before
    anything of the study exists, naming the storage check that failed."""
    cluster = isolated_cluster
    storage = tmp_path / "studies"
    proc = cluster.run_in(
        tmp_path, BIN / "study", "run", *SMOKE, "--name", "local", "--trials", "2",
        "--epochs", "1", "--address", cluster.address,
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", storage,
        timeout=STUDY_TIMEOUT_S, check=False,
    )  # fmt: skip
    out = proc.stdout
    assert proc.returncode == 2, out[-4000:]
    assert "not ready for this study" in out and "storage" in out, out[-4000:]
    assert not (storage / "local").exists()
