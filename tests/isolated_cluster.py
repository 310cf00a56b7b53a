"""A two-node Ray cluster whose second node cannot see the head's disk.

The head is ``ray start --head`` in this machine's mount namespace. The second
node is ``ray start --address`` run inside its own mount namespace (``unshare
--mount``, private propagation) with an empty tmpfs mounted over every folder the
head writes: the test's work folder (the study storage of a local-path study, the
SQLite store, the working folders) and the head's Ray temp dir. So a trial placed
on the second node sees none of the head's files, as on a real cluster whose
nodes share no disk; what it needs must come through the study storage (S3 here)
or the tracking server, both on 127.0.0.1.

Tests run as root here and in CI; where ``unshare`` is refused the fixture skips
with the reason. Teardown ends only this cluster's processes (see
:mod:`test_cluster`), never ``ray stop``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import S3Server
from test_cluster import (
    BIN,
    HEAD_PORTS,
    MARKER,
    WORKER_PORTS,
    RayStartCluster,
    _cluster_state,
    _free_ports,
)


def unshare_refusal() -> str | None:
    """Why a private mount namespace with a tmpfs cannot be made here (None: it can)."""
    probe = tempfile.mkdtemp(prefix="unshare-probe-")
    try:
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", f"mount -t tmpfs none {probe} && test ! -e {probe}/x"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare could not run: {exc}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    if proc.returncode != 0:
        return f"unshare --mount refused (exit {proc.returncode}): {proc.stderr.strip()}"
    return None


class IsolatedCluster(RayStartCluster):
    """A :class:`RayStartCluster` whose worker node lives in its own mount namespace.

    Attributes (besides the parent's):
        worker_dir: the worker node's Ray temp dir (outside the hidden folders, so the
            test can read which node a process belonged to from its logs).
        hidden: the folders the worker node sees as empty tmpfs mounts.
    """

    worker_dir: Path
    hidden: list[Path]

    def node_of(self, pid: int) -> str:
        """``head`` or ``worker``: whose raylet started worker process ``pid``."""
        nodes = {"head": self.temp_dir, "worker": self.worker_dir}
        found = [
            node
            for node, root in nodes.items()
            if any(root.glob(f"session_latest/logs/worker-*-{pid}.out"))
        ]
        return found[0] if len(found) == 1 else f"unknown ({found})"

    def run_in(
        self, cwd: Path, *cmd: str | Path, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """:meth:`run` with ``cwd`` as the working folder (a driver started elsewhere)."""
        proc = subprocess.run(
            [str(c) for c in cmd], env=self.env, cwd=cwd, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=timeout,
        )  # fmt: skip
        self.logs.append(
            f"$ (in {cwd}) {' '.join(str(c) for c in cmd)}\n(exit {proc.returncode})\n"
        )
        self.logs.append(proc.stdout[-6000:])
        if check and proc.returncode != 0:
            pytest.fail(f"{cmd[0]} {cmd[1]} failed:\n" + "".join(self.logs[-2:]))
        return proc

    def teardown(self) -> None:
        super().teardown()
        shutil.rmtree(self.worker_dir, ignore_errors=True)


@pytest.fixture
def isolated_cluster(tmp_path: Path, s3_server: S3Server) -> Iterator[IsolatedCluster]:
    """Head node + a worker node that cannot see ``tmp_path`` nor the head's temp dir;
    one CPU each. The environment of every node (and of the commands the test runs
    with :meth:`IsolatedCluster.run`) carries the cluster's token (``RAY_AUTH_TOKEN``)
    and the S3 server's endpoint and keys (``s3_server.env``), as a cluster's nodes
    get them from their deployment."""
    refusal = unshare_refusal()
    if refusal:
        print(f"SKIP: {refusal}")
        pytest.skip(refusal)
    temp_dir = Path(tempfile.mkdtemp(prefix="ri-", dir="/tmp"))  # short: socket paths
    worker_dir = Path(f"{temp_dir}-w")
    worker_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        {
            MARKER: temp_dir.name,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
            **s3_server.env,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
    )
    cluster = IsolatedCluster(temp_dir=temp_dir, env=env)
    cluster.worker_dir = worker_dir
    cluster.hidden = [tmp_path, temp_dir]
    ports = iter(_free_ports(len(HEAD_PORTS) + len(WORKER_PORTS)))
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
              "--object-store-memory", str(100 * 1024**2),
              "--min-worker-port", "0", "--max-worker-port", "0"]  # fmt: skip
    try:
        head_ports = [str(a) for flag in HEAD_PORTS for a in (flag, next(ports))]
        cluster.gcs_port = int(head_ports[1])
        cluster.run(BIN / "ray", "start", "--head", "--include-dashboard=false",
                    "--temp-dir", temp_dir, *head_ports, *common, timeout=120)  # fmt: skip
        cluster.address = (temp_dir / "ray_current_cluster").read_text().strip()
        worker_ports = [str(a) for flag in WORKER_PORTS for a in (flag, next(ports))]
        mounts = " && ".join(f"mount -t tmpfs none {h}" for h in cluster.hidden)
        start = " ".join(
            [str(BIN / "ray"), "start", "--address", cluster.address,
             "--temp-dir", str(worker_dir), *worker_ports, *common]
        )  # fmt: skip
        cluster.run("unshare", "--mount", "--propagation", "private", "--",
                    "sh", "-c", f"{mounts} && exec {start}", timeout=120)  # fmt: skip
        deadline = time.monotonic() + 60
        while (state := _cluster_state(cluster))["nodes"] < 2 and time.monotonic() < deadline:
            time.sleep(1.0)
        assert state == {"nodes": 2, "cpus": 2.0}, state
        yield cluster
    finally:
        cluster.teardown()
        left = cluster.processes()
        assert not left, f"processes of the test cluster survived its teardown: {left}"
