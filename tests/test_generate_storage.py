"""A generation study whose sampling trials run on a node that cannot see the driver's disk.

The cluster (:mod:`isolated_cluster`): ``ray start --head`` here, and a second node in
its own mount namespace with an empty tmpfs over the test's folder. The driver runs
in a folder of the test's, with its temporary folder (``$TMPDIR``, where a study on a
URI storage caches the source checkpoint it fetched from MLflow) there too: the
driver's disk, which the second node cannot see. The study storage is a bucket of
moto's S3 server; MLflow is ``mlflow server`` on PostgreSQL with its artifacts in S3
(:mod:`servers`).
"""

from __future__ import annotations

import math
import secrets
import shutil
import sys
from pathlib import Path

import pytest
from isolated_cluster import IsolatedCluster, isolated_cluster  # noqa: F401
from servers import (  # noqa: F401
    MlflowServer,
    S3Server,
    mlflow_server_fixture,
    postgres_fixture,
    s3_server_fixture,
)
from test_cluster import BIN
from test_cluster_storage import _artifact_paths, _node_of_run

from reports.vocabulary import (
    GENERATION_DIR,
    GRID_FILE,
    INIT_GRID_FILE,
    PARENT_TAG,
    ROLE_GENERATION,
    TAG_ARTIFACT_ERROR,
    TAG_FAILURE,
    TAG_ROLE,
    TAG_STUDY,
)
from study.generate import GenerationSpec
from study.tracking import MlflowTracker
from trainables.files import BEST_CHECKPOINT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mount namespaces"),
]

TIMEOUT_S = 420
PLUGIN = Path(__file__).with_name("standin_extractor.py")
STANDIN = "energy-study-standin"
#: a tiny source classifier: one epoch of SAT on digits, one attack step, no AutoAttack
TRAIN_SETS = {"method": "sat", "epochs": 1, "attack_steps": 1, "val_attack_steps": 1,
              "autoattack": False, "test_subset": 100, "probe_n": 0, "num_threads": 1}  # fmt: skip

#: a detached actor holding the head node's only CPU, so that every trial goes to the other
HOLD_HEAD = """
import ray
ray.init(address={address!r}, namespace="energy-study-test", log_to_driver=False)

@ray.remote(num_cpus=1, resources={{"node:__internal_head__": 0.01}})
class Hold:
    def ready(self):
        return ray.get_runtime_context().get_node_id()

hold = Hold.options(name="hold-head-cpu", lifetime="detached").remote()
head = [n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]]
print("HELD", ray.get(hold.ready.remote()) == head[0])
"""


def test_sampling_trials_on_a_node_without_the_drivers_disk_finish_with_grids_and_scores(
    isolated_cluster: IsolatedCluster,  # noqa: F811
    mlflow_server: MlflowServer,  # noqa: F811
    s3_server: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    """``study generate --from RUN_ID --space …`` with S3 storage, every sampling trial on
    the node that cannot see the driver's disk (the head's CPU is held): the source
    checkpoint the driver fetched into its ``$TMPDIR`` and the extractor plugin in the
    driver's folder reach the trials through Ray; each trial's run is FINISHED under
    the source run, with its scores, energy trace and sample grids in MLflow."""
    cluster = isolated_cluster
    driver, driver_tmp = tmp_path / "driver", tmp_path / "driver-tmp"
    driver.mkdir()
    driver_tmp.mkdir()
    # the driver's own temporary folder is on its disk (the second node sees a tmpfs there)
    cluster.env["TMPDIR"] = str(driver_tmp)
    plugin = shutil.copy(PLUGIN, driver / PLUGIN.name)  # a plugin file only the driver has
    bucket = s3_server.create_bucket(f"gen-{secrets.token_hex(4)}")
    name = f"iso-gen-{secrets.token_hex(3)}"
    storage = f"{bucket}/generation"
    # where the far node keeps its copies: below its $TMPDIR, this process's, not hidden
    far = GenerationSpec(name=name, storage=storage)
    try:
        # the source: a tiny training run on the driver, logged to the tracking server
        train = [a for k, v in TRAIN_SETS.items() for a in ("--set", f"{k}={v}")]
        cluster.run_in(
            driver, BIN / "study", "train", "--no-progress", "--tracking-uri", mlflow_server.uri,
            "--experiment", f"{name}-src", "-o", driver / "run", *train, timeout=TIMEOUT_S,
        )  # fmt: skip
        tracker = MlflowTracker(mlflow_server.uri, f"{name}-src")
        (source,) = tracker.find_runs(**{TAG_ROLE: "trial"})
        source_id = source.info.run_id

        held = cluster.run(sys.executable, "-c", HOLD_HEAD.format(address=cluster.address),
                           timeout=120).stdout  # fmt: skip
        assert "HELD True" in held, held[-3000:]

        proc = cluster.run_in(
            driver, BIN / "study", "generate", "--from", source_id, "--space", "sgld_smoke",
            "--trials", "2", "--name", name, "--address", cluster.address,
            "--tracking-uri", mlflow_server.uri, "--storage", storage,
            "--extractor-plugin", plugin, "--feature-extractor", STANDIN,
            timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
        report = "".join(cluster.logs[-2:])
        # the premise: the driver fetched the source checkpoint into its own $TMPDIR
        assert list(driver_tmp.rglob("best.pt")), report

        runs = tracker.find_runs(**{TAG_ROLE: ROLE_GENERATION, TAG_STUDY: name})
        failures = {r.data.tags.get(TAG_FAILURE) for r in runs}
        assert [r.info.status for r in runs] == ["FINISHED"] * 2, (failures, report)
        assert proc.returncode == 0, report
        for run in runs:
            tags = run.data.tags
            assert tags[PARENT_TAG] == source_id
            assert _node_of_run(cluster, run) == "worker", (tags, report)
            assert TAG_ARTIFACT_ERROR not in tags, tags[TAG_ARTIFACT_ERROR]
            for key in ("gen/fid", "gen/is", "gen/kid", "gen/energy_target_end"):
                assert math.isfinite(run.data.metrics[key]), (key, run.data.metrics)
            files = _artifact_paths(tracker.client, run.info.run_id)
            for needed in (GRID_FILE, INIT_GRID_FILE):
                assert f"{GENERATION_DIR}/{needed}" in files, sorted(files)
            trace = tracker.client.get_metric_history(run.info.run_id, "gen/energy_target")
            assert len(trace) == 11  # the space's steps = 10, and the start
        # the far node got its own copies from the object store, once (both trials ran there)
        shipped = sorted(p.name for p in (far.cache / "shipped").rglob("*") if p.is_file())
        assert shipped == sorted([Path(BEST_CHECKPOINT).name, PLUGIN.name]), shipped
    finally:
        shutil.rmtree(far.local_root.parent, ignore_errors=True)  # the bucket's folder
