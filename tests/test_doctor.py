"""`study doctor` on real Ray clusters: the shared local one, and a two-node cluster made
with `ray start` (tests/test_cluster.py's fixture) where one node's raylet is frozen."""

from __future__ import annotations

import argparse
import base64
import http.server
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from test_cluster import WORKER_DIR, RayStartCluster, ray_start_cluster  # noqa: F401 - fixture

from study.doctor import (
    FAIL,
    OK,
    PROBE_PREFIX,
    Check,
    add_parser,
    check_cluster,
    check_tracking_from_here,
    project_version,
    run_doctor,
)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _doctor_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="study")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["doctor", *argv])


def _probes_left(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(PROBE_PREFIX)]


def test_doctor_names_an_unreachable_database_without_its_password(
    ray_cluster, tmp_path: Path, monkeypatch
) -> None:
    """A PostgreSQL store nobody listens on: a FAIL naming host and port; the password
    given in the URI moved to PGPASSWORD, as `study run` moves it, and is in no line of
    the report."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    port = _closed_port()
    uri = f"postgresql://study:not-for-print@127.0.0.1:{port}/mlflow"
    report = check_cluster(None, str(tmp_path), uri, 30)
    text = report.table()
    assert not report.ok
    assert "not-for-print" not in text, text
    assert f"tracking: postgresql://study@127.0.0.1:{port}/mlflow" in text, text
    assert os.environ["PGPASSWORD"] == "not-for-print"
    tracking = [r.checks["tracking"] for r in report.rows]
    assert all(c.status == FAIL for c in tracking), text
    assert all(f"127.0.0.1:{port} could not be reached" in c.detail for c in tracking), text
    assert all(r.checks["storage"].status == OK for r in report.rows), text


def test_doctor_passes_on_local_ray(ray_cluster, tmp_path: Path, capsys) -> None:
    """Temp storage (not created yet) and a SQLite store: every check passes, nothing left."""
    storage = tmp_path / "studies"
    report = check_cluster(None, str(storage), f"sqlite:///{tmp_path / 'mlflow.db'}", 60)
    assert report.ok, report.table()
    driver, *nodes = report.rows
    assert driver.name == "driver" and driver.checks["storage"].status == OK
    assert len(nodes) == 1, report.table()
    node = nodes[0]
    assert node.checks["import"].status == OK
    assert node.checks["import"].detail == project_version()
    assert node.checks["storage"] == Check(OK, "shared with the driver")
    assert node.cpus == 2.0 and node.ray_gpus == 0.0 and node.seen_gpus is not None
    # nothing created, nothing left: the probes went into the nearest existing folder
    assert not storage.exists()
    assert _probes_left(tmp_path) == []

    rc = run_doctor(
        _doctor_args("--storage", str(storage), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}")
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all checks passed" in out and "GPUs ray/seen" in out


def test_doctor_fails_naming_the_storage_and_the_tracking_server(
    ray_cluster, tmp_path: Path, capsys
) -> None:
    """Storage under a regular file and a closed tracking port: exit 1, both named,
    within the timeout."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    port = _closed_port()
    started = time.monotonic()
    rc = run_doctor(
        _doctor_args(
            "--storage",
            str(blocker / "studies"),
            "--tracking-uri",
            f"http://127.0.0.1:{port}",
            "--timeout",
            "20",
        )  # fmt: skip
    )
    took = time.monotonic() - started
    out = capsys.readouterr().out
    assert rc == 1, out
    failures = out.split("FAILED (", 1)[1]
    assert "storage: " in failures and f"{blocker} is not a folder" in failures, out
    assert f"tracking: http://127.0.0.1:{port} could not be reached" in failures, out
    node_lines = [ln for ln in failures.splitlines() if ln.strip() and "driver (" not in ln]
    assert any(": storage: " in ln for ln in node_lines), out  # the node's own write fails
    assert any(": tracking: " in ln for ln in node_lines), out
    assert took < 20 + 30, took
    assert blocker.read_text() == "not a folder"


def test_check_cluster_refuses_a_bad_timeout(tmp_path: Path) -> None:
    from trainables.errors import UserError

    with pytest.raises(UserError, match="--timeout must be a positive"):
        check_cluster(None, str(tmp_path), "sqlite:///x.db", 0)


# --- two nodes made with `ray start` --------------------------------------------------

DOCTOR_SCRIPT = """
import json, sys
from study.doctor import check_cluster
report = check_cluster(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
print(report.table())
rows = [{"node_id": r.node_id, "name": r.name, "failed": r.failed,
         "error": r.error,
         "checks": {k: [c.status, c.detail] for k, c in r.checks.items()}} for r in report.rows]
print("ROWS " + json.dumps(rows))
sys.exit(0 if report.ok else 1)
"""


def _doctor_on(cluster: RayStartCluster, tmp_path: Path, timeout_s: float):
    proc = cluster.run(
        sys.executable, "-c", DOCTOR_SCRIPT, cluster.address, tmp_path / "studies",
        f"sqlite:///{tmp_path / 'mlflow.db'}", str(timeout_s),
        timeout=timeout_s + 120, check=False,
    )  # fmt: skip
    print(proc.stdout.split("ROWS ", 1)[0])  # the table, for the log of a failure
    line = next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("ROWS "))
    return proc, json.loads(line.removeprefix("ROWS "))


def _worker_raylet(cluster: RayStartCluster) -> int:
    """The pid of the second node's raylet (its temp dir is ``<head temp dir>/w``)."""
    worker_dir = str(cluster.temp_dir / WORKER_DIR)
    for pid in cluster.processes():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if cmdline and cmdline[0].endswith(b"raylet") and worker_dir.encode() in b" ".join(cmdline):
            return pid
    raise AssertionError("the second node's raylet was not found")


def _node_ids(cluster: RayStartCluster) -> dict[str, str]:
    """``head``/``worker`` → Ray node id, read from each node's raylet log."""
    ids = {}
    for node, root in (("head", cluster.temp_dir), ("worker", cluster.temp_dir / WORKER_DIR)):
        text = (root / "session_latest" / "logs" / "raylet.out").read_text(errors="replace")
        marker = "node id: "
        lower = text.lower()
        at = lower.find(marker)
        assert at >= 0, f"no node id in {node}'s raylet.out"
        ids[node] = text[at + len(marker) :].split()[0].strip(",")
    return ids


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and SIGSTOP")
def test_doctor_on_two_nodes_names_a_hung_node(
    ray_start_cluster: RayStartCluster,  # noqa: F811 - the imported fixture
    tmp_path: Path,
) -> None:
    """Both nodes pass; with the second node's raylet frozen (SIGSTOP), doctor returns 1
    within its timeout and names that node, the head's row still OK."""
    cluster = ray_start_cluster
    deadline = time.monotonic() + 60
    proc, rows = _doctor_on(cluster, tmp_path, 60)
    while len([r for r in rows if r["node_id"]]) < 2 and time.monotonic() < deadline:
        time.sleep(1.0)
        proc, rows = _doctor_on(cluster, tmp_path, 60)
    report = "".join(cluster.logs[-2:])
    nodes = [r for r in rows if r["node_id"]]
    assert len(nodes) == 2, report
    assert proc.returncode == 0, report
    assert all(r["checks"]["storage"][0] == OK for r in rows), report

    ids = _node_ids(cluster)
    raylet = _worker_raylet(cluster)
    os.kill(raylet, signal.SIGSTOP)
    try:
        started = time.monotonic()
        proc, rows = _doctor_on(cluster, tmp_path, 10)
        took = time.monotonic() - started
    finally:
        os.kill(raylet, signal.SIGCONT)
    report = "".join(cluster.logs[-2:])
    assert proc.returncode == 1, report
    by_id = {r["node_id"]: r for r in rows if r["node_id"]}
    assert set(by_id) == set(ids.values()), (ids, report)
    assert not by_id[ids["head"]]["failed"], report
    hung = by_id[ids["worker"]]
    assert hung["failed"], report
    assert hung["checks"]["import"][0] == FAIL, report
    assert "did not answer within 10 s" in hung["error"], report
    assert f"{ids['worker'][:12]} (" in proc.stdout, report  # the failure line names it
    # 10 s for the nodes, plus joining the cluster and starting Python: never "for ever"
    assert took < 10 + 60, (took, report)
    assert _probes_left(tmp_path) == []


# --- the tracking check against an HTTP server with basic auth ------------------------


class _BasicAuthServer(http.server.BaseHTTPRequestHandler):
    """/health answers 200 to anyone (as MLflow's basic-auth app does); the API 401
    unless the request carries ``alice:correct-horse-battery``."""

    expected = "Basic " + base64.b64encode(b"alice:correct-horse-battery").decode()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            status = 200
        elif self.headers.get("Authorization") == self.expected:
            status = 200
        else:
            status = 401
        body = b"{}"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture
def auth_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_tracking_check_needs_this_nodes_mlflow_credentials(auth_server, monkeypatch) -> None:
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    missing = check_tracking_from_here(auth_server, 5, driver=False)
    assert missing.status == FAIL and "are not set on this node (HTTP 401)" in missing.detail

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password-here")
    wrong = check_tracking_from_here(auth_server, 5, driver=False)
    assert wrong.status == FAIL and "were refused (HTTP 401)" in wrong.detail
    assert "wrong-password-here" not in wrong.detail

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "correct-horse-battery")
    assert check_tracking_from_here(auth_server, 5, driver=False) == Check(OK, "/health and API ok")


def test_doctor_takes_the_credentials_out_of_the_tracking_uri_for_every_node(
    ray_cluster, auth_server, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`study doctor --tracking-uri http://alice:PW@host:port`, as `study run` takes it: the
    driver and the node (whose Ray workers started before PW was in any environment) both
    pass the authenticated check, PW is in no line of the output, and the workers'
    environment is as before once the check is done."""
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)

    @ray_cluster.remote(num_cpus=0)
    def worker_password() -> str | None:
        return os.environ.get("MLFLOW_TRACKING_PASSWORD")

    assert ray_cluster.get(worker_password.remote()) is None  # the nodes lack it
    secret = "correct-horse-battery"
    given = auth_server.replace("http://", f"http://alice:{secret}@")
    rc = run_doctor(_doctor_args("--storage", str(tmp_path / "studies"), "--tracking-uri", given))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "all checks passed" in out
    assert f"tracking: {auth_server}\n" in out  # the URI as shown: no user, no password
    assert secret not in out and "alice" not in out
    node_rows = [ln for ln in out.splitlines() if ln and ln.split()[0] not in ("driver", "node")]
    assert any(ln.rstrip().endswith("OK") for ln in node_rows), out  # the node's tracking
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"  # moved, as study run does
    assert ray_cluster.get(worker_password.remote()) is None  # set for the check only
