"""`study run --address` against a real two-node Ray cluster made with `ray start`.

The cluster is the one an operator would build by hand: ``ray start --head`` and a
second node joined with ``ray start --address``, both on this machine and with one
CPU each, so a two-trial study can only run both trials at once by using both nodes.

It is kept apart from everything else on the host, including the in-process cluster
of the ``ray_cluster`` fixture (which this test does not use): its own short temp dir
(Ray's socket paths must stay under ~107 characters), its own free ports for every
component, worker ports left to the OS, and its own token for Ray's token
authentication (given to every process of the cluster through ``RAY_AUTH_TOKEN``, so
``~/.ray/auth_token`` is neither needed nor touched). Teardown never runs ``ray
stop``, which would take down every Ray cluster of the user: it ends only the
processes that carry this cluster's marker, temp dir or GCS address.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from study.export import trial_runs
from study.tracking import TAG_ROLE, TAG_STUDY, MlflowTracker

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux"), reason="finds the cluster's processes in /proc"
    ),
]

BIN = Path(sys.executable).parent
#: Every process of the test cluster inherits this variable (value: the cluster's id).
MARKER = "ENERGY_STUDY_TEST_CLUSTER"
#: The ports `ray start` would otherwise take from fixed defaults (8265, 52365, …).
HEAD_PORTS = (
    "--port",
    "--node-manager-port",
    "--object-manager-port",
    "--dashboard-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
)
WORKER_PORTS = HEAD_PORTS[1:3] + HEAD_PORTS[4:]
STUDY_TIMEOUT_S = 300
#: The second node's temp dir, inside the head's.
WORKER_DIR = "w"


@dataclass
class RayStartCluster:
    """A cluster made of ``ray start`` processes: where it lives and how to reach it."""

    temp_dir: Path
    env: dict[str, str]
    gcs_port: int = 0
    address: str = ""
    logs: list[str] = field(default_factory=list)

    def owns(self, pid: int) -> bool:
        """Whether process ``pid`` belongs to this cluster (marker, temp dir or GCS address)."""
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone, or not ours to read
            return False
        if f"{MARKER}={self.env[MARKER]}".encode() in environ:
            return True
        needles = [str(self.temp_dir)]
        if self.gcs_port:
            needles += [f"--gcs_server_port={self.gcs_port}", f":{self.gcs_port} "]
        return any(n in cmdline + " " for n in needles)

    def processes(self) -> list[int]:
        """Live (not zombie) processes of this cluster, this test's own process excepted."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            pid = int(entry.name)
            if self.owns(pid) and _alive(pid):
                pids.append(pid)
        return pids

    def run(
        self, *cmd: str | Path, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the cluster's environment; its output is kept for failure reports."""
        proc = subprocess.run(
            [str(c) for c in cmd],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        self.logs.append(f"$ {' '.join(str(c) for c in cmd)}\n(exit {proc.returncode})\n")
        self.logs.append(proc.stdout[-4000:])
        if check and proc.returncode != 0:
            pytest.fail(f"{cmd[0]} {cmd[1]} failed:\n" + "".join(self.logs[-2:]))
        return proc

    def node_of(self, pid: int) -> str:
        """``head`` or ``worker``: whose raylet started worker process ``pid`` (by its log)."""
        nodes = {"head": self.temp_dir, "worker": self.temp_dir / WORKER_DIR}
        found = [
            node
            for node, root in nodes.items()
            if any(root.glob(f"session_latest/logs/worker-*-{pid}.out"))
        ]
        return found[0] if len(found) == 1 else f"unknown ({found})"

    def teardown(self) -> None:
        """SIGTERM every process of the cluster, SIGKILL what is left, remove the temp dir.

        Measured here: the raylets take 10 s to end on SIGTERM, and ``gcs_server`` and
        the autoscaler monitor were still up 30 s after it; hence a short grace, then
        SIGKILL (what ``ray stop`` does too, after its 16 s grace period).
        """
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0), (signal.SIGKILL, 10.0)):
            pids = self.processes()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_alive(p) for p in pids):
                time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (held open together, so never the same twice)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


def _cluster_state(cluster: RayStartCluster) -> dict[str, float]:
    """Alive nodes and total CPUs, as a driver connecting to ``cluster.address`` sees them."""
    script = (
        "import json, ray\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
        "nodes = [n for n in ray.nodes() if n['Alive']]\n"
        "print('STATE ' + json.dumps({'nodes': len(nodes),"
        " 'cpus': ray.cluster_resources().get('CPU', 0)}))\n"
    )
    out = cluster.run(sys.executable, "-c", script, timeout=120).stdout
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("STATE "))
    return json.loads(line.removeprefix("STATE "))


@pytest.fixture
def ray_start_cluster() -> Iterator[RayStartCluster]:
    """A head node and a joined worker node, each with 1 CPU, torn down afterwards."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        {
            MARKER: temp_dir.name,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
            "RAY_USAGE_STATS_ENABLED": "0",
        }
    )
    cluster = RayStartCluster(temp_dir=temp_dir, env=env)
    ports = iter(_free_ports(len(HEAD_PORTS) + len(WORKER_PORTS)))
    common = ["--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats",
              "--object-store-memory", str(100 * 1024**2),
              "--min-worker-port", "0", "--max-worker-port", "0"]  # fmt: skip
    try:
        head_ports = [str(a) for flag in HEAD_PORTS for a in (flag, next(ports))]
        cluster.gcs_port = int(head_ports[1])
        cluster.run(BIN / "ray", "start", "--head", "--include-dashboard=false",
                    "--temp-dir", temp_dir, *head_ports, *common, timeout=120)  # fmt: skip
        # `ray start --head` writes the address it chose (node IP:GCS port) into its temp dir
        cluster.address = (temp_dir / "ray_current_cluster").read_text().strip()
        assert cluster.address.endswith(f":{cluster.gcs_port}"), cluster.address
        worker_ports = [str(a) for flag in WORKER_PORTS for a in (flag, next(ports))]
        cluster.run(BIN / "ray", "start", "--address", cluster.address, "--temp-dir",
                    temp_dir / WORKER_DIR, *worker_ports, *common, timeout=120)  # fmt: skip
        yield cluster
    finally:
        cluster.teardown()
        left = cluster.processes()
        assert not left, f"processes of the test cluster survived its teardown: {left}"


def test_study_run_joins_a_two_node_cluster_made_with_ray_start(
    ray_start_cluster: RayStartCluster, tmp_path: Path
) -> None:
    """Both nodes join; `study run --address` runs 2 trials on it and records them in MLflow."""
    cluster = ray_start_cluster
    deadline = time.monotonic() + 60
    while (state := _cluster_state(cluster))["nodes"] < 2 and time.monotonic() < deadline:
        time.sleep(1.0)
    assert state == {"nodes": 2, "cpus": 2.0}, state

    name = "two-nodes"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.monotonic()
    proc = cluster.run(
        BIN / "study", "run", "--space", "smoke", "--name", name, "--trials", "2",
        "--epochs", "1", "--address", cluster.address, "--tracking-uri", tracking,
        "--storage", tmp_path / "studies", "--set", "test_subset=300", "--finalists", "0",
        timeout=STUDY_TIMEOUT_S, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    report = "".join(cluster.logs[-2:])
    assert proc.returncode == 0, report
    assert "best trials by val/pgd_acc" in proc.stdout, report
    print(f"\nstudy run --address {cluster.address}: {took:.1f} s")

    tracker = MlflowTracker(tracking, name)
    runs = trial_runs(tracker, name)
    assert len(runs) == 2, report
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_id, run.info.status, report)
        assert "val/pgd_acc" in run.data.metrics, (run.data.metrics, report)
    # one CPU a node, two 1-CPU trials at once: one trial ran on each node
    pids = [int(r.data.tags["energy_study.process"].rsplit(":", 1)[1]) for r in runs]
    assert sorted(cluster.node_of(pid) for pid in pids) == ["head", "worker"], (pids, report)
    parents = tracker.find_runs(**{TAG_STUDY: name, TAG_ROLE: "study"})
    assert [p.info.status for p in parents] == ["FINISHED"], report
    # the study's driver left the cluster as it found it: both nodes still there
    assert _cluster_state(cluster) == {"nodes": 2, "cpus": 2.0}
