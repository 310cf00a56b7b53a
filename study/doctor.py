"""``study doctor``: is this Ray cluster ready for a study?

One small Ray task runs on every alive node, pinned there
(``NodeAffinitySchedulingStrategy(node_id, soft=False)``). It

* imports the project (``study``, ``trainables``, ``search_spaces``) and reports its
  version and git commit, which must match the driver's;
* reads a probe the driver wrote into the study storage (proof that the node sees the
  *same* storage: a local path that is not a shared mount fails here), then writes,
  reads back and deletes a probe of its own;
* reaches the tracking store (HTTP(S): ``GET /health``, then one authenticated API call
  with the node's ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``; PostgreSQL/MySQL: a TCP
  connect; a SQLite file or local folder is the driver's alone and is checked there);
  credentials given in ``--tracking-uri`` or ``--storage`` are taken out of the URIs as
  ``study run`` does (:mod:`study.credentials`) and reach each node's check as a task
  argument, set in that task's environment only while it runs (never in Ray's
  ``runtime_env``, which Ray's runtime-env agent writes to its log);
* counts the GPUs the node's processes can see (``torch.cuda.device_count()``), next to
  the GPUs Ray advertises for it.

Every node has ``timeout_s`` seconds to answer, all nodes at once: a hung node (a stuck
mount, a dead raylet) becomes one FAIL row naming it, never a hung command. The driver's
own checks (its storage probe, its tracking store) run under the same deadline.

:func:`check_cluster` is what ``study run`` can call before a multi-node study starts;
``study doctor`` (:func:`add_parser`, :func:`run_doctor`) prints its table and exits 1
when any check failed.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from study.credentials import applied, redact, take_credentials, taken_env
from study.storage import is_uri, local_path, normalize
from trainables.errors import UserError

#: Seconds each node (and the driver's own checks) may take, by default.
DEFAULT_TIMEOUT_S = 60.0
#: Name prefix of the probe files written into the storage (removed again).
PROBE_PREFIX = ".energy-study-doctor-"
#: The packages a node must import.
PROJECT_PACKAGES = ("study", "trainables", "search_spaces")
#: Tracking URI schemes whose store only the driver touches (nothing to check on nodes).
DRIVER_ONLY_SCHEMES = ("sqlite", "file", "")

OK, FAIL, SKIP = "OK", "FAIL", "-"


@dataclass
class Check:
    """One check's outcome: ``status`` is OK, FAIL or ``-`` (not run / not needed)."""

    status: str
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass
class NodeRow:
    """One row of the table: a Ray node (or the driver) and its checks.

    Attributes:
        name: the node's host name (its Ray node id when it did not answer).
        node_id: Ray's node id (hex); empty for the driver's row.
        ip: the node's IP address as Ray knows it.
        cpus: CPUs Ray advertises for the node.
        ray_gpus: GPUs Ray advertises for the node.
        seen_gpus: GPUs ``torch.cuda.device_count()`` sees on the node (None: not known).
        checks: ``import``, ``storage`` and ``tracking`` outcomes.
        error: why the node's checks did not run at all (no answer, the task failed).
    """

    name: str
    node_id: str = ""
    ip: str = ""
    cpus: float | None = None
    ray_gpus: float | None = None
    seen_gpus: int | None = None
    checks: dict[str, Check] = field(default_factory=dict)
    error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error) or any(c.failed for c in self.checks.values())

    def fail_all(self, reason: str) -> None:
        """The node's checks did not run: every column FAIL, ``reason`` said once."""
        self.error = reason
        self.checks = {name: Check(FAIL) for name in ("import", "storage", "tracking")}


@dataclass
class DoctorReport:
    """What :func:`check_cluster` found: one row per node after the driver's row.

    Attributes:
        address: the Ray address asked for (None: a local cluster).
        storage: the study storage checked (a local path or a URI).
        tracking_uri: the tracking store checked, its password hidden.
        rows: the driver's row, then one per alive node.
        problems: cluster-level failures (Ray could not be joined, no node alive).
        timeout_s: seconds each node had to answer.
    """

    address: str | None
    storage: str
    tracking_uri: str
    rows: list[NodeRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not self.problems and not any(r.failed for r in self.rows)

    def failures(self) -> list[str]:
        """One line per failed check: ``<node> (<ip>): <check>: <reason>``."""
        lines = list(self.problems)
        for row in self.rows:
            where = row.name + (f" ({row.ip})" if row.ip else "")
            if row.error:
                lines.append(f"{where}: {row.error}")
                continue
            for name, check in row.checks.items():
                if check.failed:
                    lines.append(f"{where}: {name}: {check.detail}")
        return lines

    def table(self) -> str:
        """The report as text: a header, one line per node, then the failures."""
        cluster = self.address or "a local cluster"
        nodes = sum(1 for r in self.rows if r.node_id)
        head = (
            f"Ray: {cluster} ({nodes} node{'s' if nodes != 1 else ''}); "
            f"storage: {self.storage}; tracking: {self.tracking_uri}"
        )
        cols = ("node", "IP", "CPUs", "GPUs ray/seen", "import", "storage", "tracking")
        cells = [cols]
        for r in self.rows:
            gpus = "-"
            if r.ray_gpus is not None or r.seen_gpus is not None:
                seen = "?" if r.seen_gpus is None else str(r.seen_gpus)
                gpus = f"{_num(r.ray_gpus)}/{seen}"
            imp = r.checks.get("import", Check(SKIP))
            imp_text = imp.status + (f" {imp.detail}" if imp.status == OK and imp.detail else "")
            cells.append(
                (
                    r.name,
                    r.ip or "-",
                    _num(r.cpus),
                    gpus,
                    imp_text,
                    r.checks.get("storage", Check(SKIP)).status,
                    r.checks.get("tracking", Check(SKIP)).status,
                )
            )
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        lines = [head, ""]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        failures = self.failures()
        if failures:
            lines += ["", f"FAILED ({len(failures)}):"]
            lines += [f"  - {f}" for f in failures]
        else:
            lines += ["", "all checks passed"]
        return "\n".join(lines)


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# --- helpers shared by the driver and the nodes --------------------------------------


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def probe_base(storage: str) -> str:
    """Where the probes go: the storage URI itself, or for a local path its nearest
    existing folder (absolute), so that a check creates no folder that stays."""
    path = local_path(storage)
    if path is None:
        return normalize(storage)
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(path)


def _open_fs(base: str) -> tuple[Any, str]:
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(base)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip(": ")


def project_version() -> str:
    """``<version>`` of the installed project, ``+g<commit>`` when it is a git checkout."""
    import study

    version = getattr(study, "__version__", "unknown")
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
            cwd=Path(study.__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


def check_tracking_from_here(uri: str, timeout_s: float, *, driver: bool) -> Check:
    """Whether this process reaches the tracking store ``uri`` within ``timeout_s`` s.

    HTTP(S): ``/health`` answers 2xx, and an API call with this process's
    ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (when set) is not refused.
    PostgreSQL/MySQL/other network stores: a TCP connect to their host and port. A SQLite
    file or local folder is read by the driver only (``driver``: check it; else ``-``).
    """
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        return _check_http(uri, timeout_s)
    if scheme in DRIVER_ONLY_SCHEMES:
        if not driver:
            return Check(SKIP, "the driver's store")
        return _check_local_store(uri)
    host, port = _host_port(uri)
    if not host:
        return Check(FAIL, f"no host in {redact(uri)}")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return Check(FAIL, f"{host}:{port} could not be reached ({_reason(exc)})")
    return Check(OK, f"{host}:{port} answers")


_DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def _host_port(uri: str) -> tuple[str, int]:
    netloc = uri.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = netloc.rpartition(":") if ":" in netloc.strip("[]") else (netloc, "", "")
    default = _DEFAULT_PORTS.get(_scheme(uri), 0)
    return host.strip("[]"), int(port) if port.isdigit() else default


def _check_http(uri: str, timeout_s: float) -> Check:
    base = uri.rstrip("/")
    shown = redact(base)
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as resp:  # noqa: S310
            status = resp.status
    except urllib.error.HTTPError as exc:
        return Check(FAIL, f"{shown}/health answered {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check(FAIL, f"{shown} could not be reached ({reason}; waited up to {timeout_s:g} s)")
    if not 200 <= status < 300:
        return Check(FAIL, f"{shown}/health answered {status}")
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/experiments/search?max_results=1")
    user, password = (
        os.environ.get("MLFLOW_TRACKING_USERNAME"),
        os.environ.get("MLFLOW_TRACKING_PASSWORD"),
    )
    if user and password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):  # noqa: S310
            pass
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            given = "were refused" if user and password else "are not set on this node"
            return Check(
                FAIL,
                f"{shown} answers but asks for credentials: MLFLOW_TRACKING_USERNAME/"
                f"MLFLOW_TRACKING_PASSWORD {given} (HTTP {exc.code})",
            )
        return Check(OK, f"/health ok; API answered {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        return Check(FAIL, f"{shown} stopped answering ({getattr(exc, 'reason', exc)})")
    return Check(OK, "/health and API ok")


def _check_local_store(uri: str) -> Check:
    """A SQLite file (must be a SQLite database when it exists) or a local store folder."""
    scheme = _scheme(uri)
    if scheme == "sqlite":  # sqlite:///relative.db, sqlite:////absolute.db
        path = Path(uri.split(":///", 1)[1])
    else:  # file:///folder or a plain folder
        path = Path(urlsplit(uri).path if scheme == "file" else uri)
    if scheme == "sqlite":
        if path.exists():
            try:
                with open(path, "rb") as handle:
                    header = handle.read(16)
            except OSError as exc:
                return Check(FAIL, f"{path} cannot be read ({_reason(exc)})")
            if header and header != b"SQLite format 3\x00":
                return Check(FAIL, f"{path} is not a SQLite database")
            return Check(OK, str(path))
        path = path.parent
    existing = path.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        return Check(FAIL, f"{existing} is not a writable folder (store {uri})")
    return Check(OK, str(existing))


def _node_probe(
    base: str,
    token: str,
    tracking_uri: str,
    timeout_s: float,
    driver_version: str,
    driver_wrote: bool,
    credentials: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The task run on every node: import, storage, tracking and GPU checks (a dict).

    ``driver_wrote``: whether the driver's probe is in the storage (else the node only
    writes, reads back and deletes its own). ``credentials``: the variables the URIs
    given to the driver filled (:func:`study.credentials.taken_env`), set for the storage
    and tracking checks only (a worker runs one task at a time; they are restored after).
    """
    out: dict[str, Any] = {"host": socket.gethostname(), "checks": {}}
    checks = out["checks"]
    try:
        import importlib

        for name in PROJECT_PACKAGES:
            importlib.import_module(name)
        version = project_version()
        if version != driver_version:
            checks["import"] = (FAIL, f"version {version}, the driver runs {driver_version}")
        else:
            checks["import"] = (OK, version)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        checks["import"] = (FAIL, _reason(exc))
    with applied(credentials or {}):
        checks["storage"] = _storage_probe(base, token, out["host"], driver_wrote)
        tracking = check_tracking_from_here(tracking_uri, timeout_s * 0.5, driver=False)
    checks["tracking"] = (tracking.status, tracking.detail)
    try:
        import torch

        out["seen_gpus"] = int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch, no CUDA: unknown
        out["seen_gpus"] = None
    return out


def _storage_probe(base: str, token: str, host: str, driver_wrote: bool) -> tuple[str, str]:
    """Read the driver's probe (when it wrote one), then write, read back and delete this
    node's own."""
    try:
        fs, root = _open_fs(base)
    except Exception as exc:  # noqa: BLE001
        return FAIL, f"{redact(base)} cannot be opened ({_reason(exc)})"
    driver_probe = f"{root.rstrip('/')}/{PROBE_PREFIX}{token}.driver"
    try:
        if not driver_wrote:
            raise _Skip

        with fs.open_input_stream(driver_probe) as handle:
            seen = handle.readall().decode(errors="replace")
    except _Skip:
        seen = token
    except Exception as exc:  # noqa: BLE001
        return FAIL, (
            f"the driver's probe {driver_probe} is not visible here ({_reason(exc)}): "
            "this node does not see the driver's storage; use a shared mount or an "
            "s3:// (or other pyarrow.fs) URI for --storage"
        )
    if seen != token:
        return FAIL, f"{driver_probe} holds something else than the driver wrote"
    own = f"{root.rstrip('/')}/{PROBE_PREFIX}{token}.{uuid.uuid4().hex[:8]}"
    payload = f"{token} {host}".encode()
    try:
        with fs.open_output_stream(own) as handle:
            handle.write(payload)
        with fs.open_input_stream(own) as handle:
            back = handle.readall()
        fs.delete_file(own)
    except Exception as exc:  # noqa: BLE001
        return FAIL, f"cannot write, read back and delete {own} ({_reason(exc)})"
    if back != payload:
        return FAIL, f"{own} read back differs from what was written"
    return OK, "shared with the driver" if driver_wrote else "writable (driver's probe missing)"


class _Skip(Exception):
    """The driver wrote no probe: nothing to look for."""


# --- the driver ----------------------------------------------------------------------


def _with_deadline(func: Callable[[], Check], timeout_s: float, what: str) -> Check:
    """``func()`` in a daemon thread; a FAIL naming ``what`` when it takes over ``timeout_s``."""
    result: list[Check] = []

    def target() -> None:
        try:
            result.append(func())
        except Exception as exc:  # noqa: BLE001
            result.append(Check(FAIL, _reason(exc)))

    thread = threading.Thread(target=target, daemon=True, name=f"doctor-{what}")
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else Check(FAIL, f"{what} did not answer within {timeout_s:g} s")


def _write_driver_probe(base: str, token: str) -> Check:
    if not is_uri(base) and not Path(base).is_dir():
        return Check(FAIL, f"{redact(base)} is not a folder; the storage cannot be made under it")
    fs, root = _open_fs(base)
    probe = f"{root.rstrip('/')}/{PROBE_PREFIX}{token}.driver"
    try:
        with fs.open_output_stream(probe) as handle:
            handle.write(token.encode())
        with fs.open_input_stream(probe) as handle:
            if handle.readall() != token.encode():
                return Check(FAIL, f"{probe} read back differs from what was written")
    except Exception as exc:  # noqa: BLE001
        return Check(FAIL, f"cannot write {probe} ({_reason(exc)})")
    return Check(OK, probe)


def _remove_probes(base: str, token: str) -> None:
    """Delete every probe of this check (the driver's and any a late node left)."""
    try:
        import pyarrow.fs

        fs, root = _open_fs(base)
        prefix = f"{PROBE_PREFIX}{token}"
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        for info in infos:
            if info.base_name.startswith(prefix):
                fs.delete_file(info.path)
    except Exception:  # noqa: BLE001 - best effort; the check's result stands
        pass


def _join_ray(address: str | None, timeout_s: float) -> bool:
    """Join ``address`` (or start a local cluster); True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    from study import preflight

    preflight.check_ray_address(address, timeout_s)
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=target,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def check_cluster(
    address: str | None,
    storage: str,
    tracking_uri: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DoctorReport:
    """Check every alive node of a Ray cluster; see the module docstring for what.

    Args:
        address: Ray address to join (``host:port``, ``ray://…``, ``auto``); None: the
            running Ray of this process, else ``RAY_ADDRESS``, else a new local cluster
            (shut down again at the end).
        storage: the study storage: a local path (a shared mount on a cluster) or a
            ``pyarrow.fs`` URI (``s3://bucket/prefix``). Nothing stays behind in it.
        tracking_uri: the MLflow tracking store (``http(s)://``, ``postgresql://``,
            ``sqlite:///``…). A password in it (or in ``storage``) moves to this
            process's environment (:func:`study.credentials.take_credentials`) and
            reaches the nodes' checks as a task argument, never a line of the report.
        timeout_s: seconds each node, and the driver's own checks, may take (all nodes
            run at once).

    Returns:
        A :class:`DoctorReport`; ``report.ok`` is False when any check failed. A cluster
        that cannot be joined is a problem of the report, not an exception.

    Raises:
        UserError: a bad ``timeout_s``; a password in a URI whose scheme has no variable.
    """
    if timeout_s <= 0:
        raise UserError(f"--timeout must be a positive number of seconds, not {timeout_s:g}")
    tracking_uri = take_credentials(tracking_uri) or tracking_uri
    storage = normalize(take_credentials(storage) or storage)
    credentials = taken_env([tracking_uri, storage])
    report = DoctorReport(address, redact(storage), redact(tracking_uri), timeout_s=timeout_s)
    base = probe_base(storage)
    token = uuid.uuid4().hex
    driver = NodeRow(name="driver", ip=_driver_ip())
    driver.checks["import"] = Check(SKIP)
    driver.checks["storage"] = _with_deadline(
        lambda: _write_driver_probe(base, token), timeout_s, "the storage"
    )
    driver.checks["tracking"] = _with_deadline(
        lambda: check_tracking_from_here(tracking_uri, timeout_s * 0.5, driver=True),
        timeout_s,
        "the tracking store",
    )
    report.rows.append(driver)
    started = False
    try:
        try:
            started = _join_ray(address, timeout_s)
        except UserError as exc:
            report.problems.append(str(exc))
            return report
        except Exception as exc:  # noqa: BLE001 - e.g. a token mismatch: one clear line
            report.problems.append(
                f"could not join the Ray cluster at {address or 'local'}: {_reason(exc)}"
            )
            return report
        wrote = driver.checks["storage"].status == OK
        report.rows += _probe_nodes(base, token, tracking_uri, timeout_s, wrote, credentials)
        if not any(r.node_id for r in report.rows):
            report.problems.append("the Ray cluster has no alive node")
    finally:
        _remove_probes(base, token)
        if started:
            import ray

            ray.shutdown()
    return report


def _driver_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return ""


def _probe_nodes(
    base: str,
    token: str,
    tracking_uri: str,
    timeout_s: float,
    driver_wrote: bool,
    credentials: dict[str, str] | None = None,
) -> list[NodeRow]:
    """Run :func:`_node_probe` on every alive node at once; ``timeout_s`` for all
    (``credentials``: the variables its checks need, see :func:`_node_probe`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    version = project_version()
    probe = ray.remote(_node_probe)
    here = _driver_ip()
    nodes = sorted(  # the driver's node first
        (n for n in ray.nodes() if n.get("Alive")),
        key=lambda n: (n.get("NodeManagerAddress") != here, n["NodeID"]),
    )
    if not nodes:
        return []
    rows, refs = [], []
    for node in nodes:
        res = node.get("Resources", {})
        row = NodeRow(
            name=node["NodeID"][:12],
            node_id=node["NodeID"],
            ip=node.get("NodeManagerAddress", ""),
            cpus=res.get("CPU", 0.0),
            ray_gpus=res.get("GPU", 0.0),
        )
        rows.append(row)
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        refs.append(
            probe.options(
                num_cpus=0, scheduling_strategy=strategy, max_retries=0, name="study-doctor"
            ).remote(base, token, tracking_uri, timeout_s, version, driver_wrote, credentials)
        )
    deadline = time.monotonic() + timeout_s
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    ready_set = set(ready)
    for row, ref in zip(rows, refs):
        if ref not in ready_set:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            row.fail_all(
                f"did not answer within {timeout_s:g} s (a hung mount or tracking server, "
                "a frozen or dead raylet, or a node still starting its first worker); "
                "--timeout sets the wait"
            )
            continue
        try:
            out = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:  # noqa: BLE001 - e.g. the node cannot import the project
            row.fail_all(f"the checks could not run there: {_reason(exc)}")
            continue
        row.name = out["host"]
        row.seen_gpus = out.get("seen_gpus")
        row.checks = {k: Check(*v) for k, v in out["checks"].items()}
    return rows


# --- the command ---------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``study doctor`` to the ``study`` command's sub-parsers; returns its parser."""
    p = subparsers.add_parser(
        "doctor",
        help="check that every Ray node can import the project, use the storage and reach "
        "the tracking store; GPUs per node",
        description="Run one small task on every alive node of a Ray cluster: it imports "
        "the project, writes, reads and deletes a probe in the study storage (and must see "
        "the driver's), reaches the tracking store, and counts the GPUs. Exit 1 when any "
        "check failed.",
    )
    p.add_argument(
        "--address", help="Ray cluster to check (default: RAY_ADDRESS, else a local one)"
    )
    p.add_argument("--storage", help="study storage: path or s3://… URI (default: ./studies)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///./mlflow.db)")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help="seconds each node may take to answer (default: %(default)g)",
    )
    p.set_defaults(func=run_doctor)
    return p


def run_doctor(args: argparse.Namespace) -> int:
    """``study doctor``: print the report's table; 0 when every check passed, else 1.
    The tracking URI and storage are read as ``study run`` reads them (a password in
    either moves to the environment first)."""
    from study.cli import _storage, _tracking_uri

    report = check_cluster(args.address, _storage(args), _tracking_uri(args), args.timeout)
    print(report.table(), flush=True)
    return 0 if report.ok else 1
