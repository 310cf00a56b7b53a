"""Checks that run before a study creates anything: the storage can be written, the
tracking server and the Ray cluster answer, the cluster has the resources a trial asks
for. Each failure is one :class:`~trainables.errors.UserError` paragraph naming what
could not be reached or used; the CLI prints it and exits 2.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from trainables.errors import UserError

#: Seconds a server (tracking server, Ray address) has to answer; ``--connect-timeout``.
DEFAULT_CONNECT_TIMEOUT_S = 15.0


def check_storage(folder: str | Path, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fail unless ``folder`` can be written, creating nothing that stays.

    A local folder (or shared mount): a probe file is written to and removed from the
    folder, or, when the folder does not exist yet, from its nearest existing parent
    (where it will be made). A URI (``s3://bucket/prefix/name``): a probe object is
    written, read back and deleted within ``timeout`` seconds
    (:func:`study.storage.probe`), so an unreachable endpoint or a missing bucket fails
    here, naming the endpoint.

    Args:
        folder: the study's folder, a path or a URI.
        timeout: seconds a storage server has to answer (URIs only).
    """
    from study import storage

    if storage.is_uri(str(folder)):
        storage.probe(str(folder), timeout)
        return
    folder = storage.local_path(str(folder)) or Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".energy-study-probe-{uuid.uuid4().hex}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        where = "" if existing == folder else f" (its nearest existing folder is {str(existing)!r})"
        raise UserError(
            f"the study storage {str(folder)!r} cannot be written{where}: "
            f"{exc.strerror or exc}. Pick another folder with --storage"
        ) from None


def _host_port(address: str, default_port: int) -> tuple[str, int]:
    text = address.split("://", 1)[-1].split("/", 1)[0]
    if "@" in text:
        text = text.rsplit("@", 1)[1]
    host, _, port = text.rpartition(":") if ":" in text else (text, "", "")
    return (host or text).strip("[]"), int(port) if port.isdigit() else default_port


#: database URL schemes (SQLAlchemy's, a ``+driver`` suffix allowed) -> default port
DATABASE_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mssql": 1433}


def check_database(uri: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                   what: str = "the database") -> None:  # fmt: skip
    """Fail unless a database server answers: a TCP connection to the host and port of
    a ``postgresql://`` (``mysql://``, ``mssql://``) URL within ``timeout`` seconds; a
    SQLite file's folder must be writable. Other URLs, and None, pass.

    Args:
        uri: a SQLAlchemy database URL (without a password: :mod:`study.credentials`).
        timeout: seconds the server has to accept the connection.
        what: what the URL is for, for the error (``the MLflow tracking store``).
    """
    if not uri:
        return
    if uri.startswith("sqlite:///"):
        check_storage(Path(uri[len("sqlite:///") :]).parent)
        return
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in DATABASE_PORTS or "://" not in uri:
        return
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if not parts.hostname:
        return  # a Unix socket (host in the query or libpq's default): libpq's business
    host, port = parts.hostname, parts.port or DATABASE_PORTS[scheme]
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise UserError(
            f"{what} {uri} could not be reached: no {scheme} server accepted a connection "
            f"on {host}:{port} ({error}; waited up to {timeout:g} s). Start it, or fix the "
            "URL; --connect-timeout sets the wait"
        ) from None


def check_tracking(uri: str, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fail unless the MLflow store answers: an HTTP(S) server its ``/health`` page
    within ``timeout`` seconds; a SQLite store's folder must be writable; a
    PostgreSQL/MySQL store's server must accept a connection (:func:`check_database`)."""
    if uri.startswith("sqlite:///") or uri.split("://", 1)[0].split("+", 1)[0] in DATABASE_PORTS:
        check_database(uri, timeout, "the MLflow tracking store")
        return
    if not uri.startswith(("http://", "https://")):
        return  # other stores (databricks, file…) are checked by MLflow itself
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's URI
            if resp.status >= 500:
                raise UserError(f"the MLflow tracking server {uri} answers {resp.status}")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # it answers; credentials are MLflow's business
        if exc.code >= 500:
            raise UserError(
                f"the MLflow tracking server {uri} answered {exc.code} on {url}"
            ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(
            f"the MLflow tracking server {uri} could not be reached ({reason}; waited up to "
            f"{timeout:g} s). "
            "Start it (study ui, or mlflow server) or fix --tracking-uri; "
            "--connect-timeout sets the wait"
        ) from None


def check_ray_address(address: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
    """Fail unless a Ray cluster answers at ``address`` (``host:port`` of its GCS, or
    ``ray://host:port``) within ``timeout`` seconds. ``None``, ``local`` and ``auto``
    need no check."""
    if not address or address in ("local", "auto"):
        return
    host, port = _host_port(address, 10001 if address.startswith("ray://") else 6379)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise UserError(
            f"no Ray cluster answered at {address} ({error}; waited up to {timeout:g} s). "
            "Start one with `ray start --head` there, or fix --address; --connect-timeout "
            "sets the wait"
        ) from None


def check_resources(spec: Any) -> None:
    """Fail unless one node of the running cluster can hold one trial (CPUs, GPUs).

    A trial that asks for GPUs on a cluster without any, or for more CPUs than the
    largest node has, would wait for ever; on an autoscaling cluster
    (``ENERGY_STUDY_AUTOSCALING=1``) this only warns, since nodes may still come.
    """
    import ray

    from study.trial import uses_train_backend

    cpus, gpus = spec.cpus_per_worker, spec.gpus_per_trial
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpu_max = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    gpu_total = sum(n["Resources"].get("GPU", 0.0) for n in nodes)
    gpu_max = max((n["Resources"].get("GPU", 0.0) for n in nodes), default=0.0)
    problems = []
    if gpus > 0 and gpu_total < gpus:
        problems.append(
            f"a trial asks for {gpus:g} GPU(s) but the cluster has {gpu_total:g}; "
            "drop --gpus-per-trial or join a cluster with GPUs"
        )
    elif gpus > 0 and not uses_train_backend(spec) and gpu_max < gpus:
        problems.append(f"a trial asks for {gpus:g} GPU(s); no node has that many")
    if cpus > cpu_max:
        problems.append(
            f"a trial worker asks for {cpus:g} CPU(s) but the largest node has "
            f"{cpu_max:g}; lower --cpus-per-worker"
        )
    if not problems:
        return
    message = "; ".join(problems)
    if os.environ.get("ENERGY_STUDY_AUTOSCALING") == "1":
        print(f"waiting for the autoscaler: {message}", flush=True)
        return
    raise UserError(f"the study cannot run on this Ray cluster: {message}")
