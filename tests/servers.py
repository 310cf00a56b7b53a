"""Real servers for the tests: a throw-away PostgreSQL, an S3 server (moto), ``mlflow server``.

Every server listens on 127.0.0.1 only, on a free port, and is stopped when the test
session ends (its whole process group; no orphans). Import the fixtures into a test
module (``tests/`` is on ``sys.path`` under pytest; ``tests`` itself is not importable
as a package because torch-fidelity installs a package of that name)::

    from servers import mlflow_server_fixture, postgres_fixture  # noqa: F401

The fixtures' names are ``postgres``, ``s3_server``, ``s3_env`` and ``mlflow_server``
(importing the ``*_fixture`` functions keeps ruff from seeing a redefinition in the
test's arguments; importing them by their fixture names works too).

Each server is started once per session however many modules import its fixture.

- ``postgres``: a PostgreSQL cluster from Debian's ``postgresql`` package
  (``initdb``/``postgres`` in ``/usr/lib/postgresql/<version>/bin``), in a temp folder,
  started and stopped by the code of ``study server --postgres``
  (:class:`study.server.LocalPostgres`: as an unprivileged user when run as root, since
  the server refuses root; password authentication, ``scram-sha-256``) on ``127.0.0.1``.
  Skipped, with the reason, where ``initdb`` is not installed (``.ci/run`` installs the
  package).
- ``s3_server``: moto's standalone S3 server (``moto[server]``, the dev extra).
  ``s3_server.env`` holds the variables a client needs; ``s3_env`` applies them for one
  test.
- ``mlflow_server``: ``mlflow server`` with its backend store on ``postgres`` and
  ``--serve-artifacts`` into a bucket of ``s3_server``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from study.server import PG_USER, LocalPostgres
from study.server import pg_bin as server_pg_bin
from study.ui import stop_group  # noqa: F401 - the tests stop their servers with it

HOST = "127.0.0.1"
#: postgresql.conf settings of the tests' cluster: fast, not crash-safe
TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                 "max_connections": "200"}  # fmt: skip
S3_KEY_ID = "testing"
S3_SECRET = "testing-secret"
S3_REGION = "us-east-1"


# --- helpers ---------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Wait until ``url`` answers an HTTP request (any status), at most ``timeout`` seconds.

    Fails at once, with the end of ``log``, if ``proc`` exits first.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}){_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer within {timeout:.0f} s{_tail(log)}")
        time.sleep(0.2)


def _tail(log: Path | None, chars: int = 3000) -> str:
    if log is None or not log.exists():
        return ""
    return "\n--- " + str(log) + " ---\n" + log.read_text(errors="replace")[-chars:]


def start_group(
    cmd: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), output into ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
        )


class _Once:
    """One server per test session however many modules import its fixture.

    pytest makes one fixture instance per module that imports a fixture; they all
    share the server started first, and the first session teardown stops it.
    """

    def __init__(self) -> None:
        self.servers: dict[str, object] = {}

    def get(self, key: str, start):  # noqa: ANN001, ANN201 - a small cache
        if key not in self.servers:
            self.servers[key] = start()
        return self.servers[key]

    def stop(self, key: str) -> None:
        server = self.servers.pop(key, None)
        if server is not None:
            server.stop()  # type: ignore[attr-defined]


_ONCE = _Once()


@atexit.register
def _stop_all() -> None:  # an interrupted session still leaves no server behind
    for key in list(_ONCE.servers):
        with contextlib.suppress(Exception):
            _ONCE.stop(key)


# --- PostgreSQL ------------------------------------------------------------------
def pg_bin() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb``, or None
    (:func:`study.server.pg_bin`)."""
    return server_pg_bin()


@dataclass
class Postgres:
    """A running throw-away PostgreSQL cluster: ``study server --postgres``'s
    :class:`study.server.LocalPostgres` in a temp folder, tuned for tests (no fsync).

    Attributes:
        bin: folder of ``initdb``, ``postgres``, ``psql``, ``pg_dump``.
        root: the temp folder (data directory ``root/data``, log ``root/postgresql.log``).
        port: TCP port on 127.0.0.1.
        user: the superuser role the tests connect as.
        password: its password (scram-sha-256; every host connection needs it).
    """

    bin: Path
    root: Path
    port: int
    user: str = PG_USER
    password: str = field(default_factory=lambda: "pw-" + secrets.token_hex(12))
    host: str = HOST
    _server: LocalPostgres | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "postgresql.log"

    def url(self, db: str = "postgres", password: bool = True) -> str:
        """``postgresql://user[:password]@127.0.0.1:port/db``; without the password a
        client takes it from ``PGPASSWORD`` (see :attr:`env`) or ``~/.pgpass``."""
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{db}"

    @property
    def env(self) -> dict[str, str]:
        """The libpq variables that carry the credentials (``PGPASSWORD``, ``PGUSER``)."""
        return {"PGPASSWORD": self.password, "PGUSER": self.user}

    def _client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env, "PGHOST": self.host, "PGPORT": str(self.port)}

    def start(self) -> None:
        """initdb (superuser ``user`` with ``password``), then the server, waiting."""
        self.root.chmod(0o711)  # the OS user that runs it (when root) passes through
        self._server = LocalPostgres(
            self.root, self.password, port=self.port, host=self.host, user=self.user,
            bin=self.bin, settings=TEST_SETTINGS,
        )  # fmt: skip
        self._server.start()

    def stop(self) -> None:
        """Fast shutdown, then whatever is left of its process group; removes the folder."""
        if self._server is not None:
            self._server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run ``sql`` through ``psql`` (over TCP, with the password); returns its output."""
        done = subprocess.run(
            [
                str(self.bin / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                db,
                "-c",
                sql,
            ],
            env=self._client_env(),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"psql failed: {done.stderr}")
        return done.stdout

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if missing); returns its URL with the password."""
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if not exists:
            self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def databases(self) -> list[str]:
        """Every database but the templates."""
        out = self.psql("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY 1")
        return [line for line in out.splitlines() if line]

    def dump(self, db: str | None = None) -> str:
        """``pg_dump`` of ``db`` as SQL text (schema and every row); None: every database
        but the templates, one after the other."""
        out = []
        for name in [db] if db else self.databases():
            done = subprocess.run(
                [str(self.bin / "pg_dump"), "--no-owner", "-d", name],
                env=self._client_env(),
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"pg_dump {name} failed: {done.stderr}")
            out.append(done.stdout)
        return "\n".join(out)


def _started(server):  # noqa: ANN001, ANN202 - any of the servers below
    """``server`` started; stopped again (nothing left behind) when its start fails."""
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


def start_postgres() -> Postgres:
    """Start a throw-away cluster (skips the test where ``initdb`` is not installed)."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb; Debian: apt-get install postgresql)")
    server = Postgres(bin=bindir, root=Path(tempfile.mkdtemp(prefix="study-pg-")), port=free_port())
    return _started(server)


@pytest.fixture(scope="session", name="postgres")
def postgres_fixture() -> Iterator[Postgres]:
    """A throw-away PostgreSQL on 127.0.0.1 (one per session); see :class:`Postgres`."""
    yield _ONCE.get("postgres", start_postgres)  # type: ignore[misc]
    _ONCE.stop("postgres")


# --- S3 (moto) -------------------------------------------------------------------
@dataclass
class S3Server:
    """moto's standalone S3 server on 127.0.0.1.

    Attributes:
        port: its TCP port.
        endpoint: ``http://127.0.0.1:<port>``.
        env: the variables a client needs (keys, region, ``AWS_ENDPOINT_URL``,
            ``AWS_ENDPOINT_URL_S3``, ``MLFLOW_S3_ENDPOINT_URL``); set nowhere by the fixture.
    """

    port: int
    root: Path
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": S3_REGION,
            "AWS_REGION": S3_REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self):  # noqa: ANN201 - a boto3 S3 client
        """A boto3 S3 client of this server (independent of the process environment)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=S3_KEY_ID,
            aws_secret_access_key=S3_SECRET,
            region_name=S3_REGION,
        )

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (if missing); returns ``s3://name``."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in ``bucket`` under ``prefix`` (all pages)."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def get(self, bucket: str, key: str) -> bytes:
        """The bytes of one object."""
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = self.root / "moto.log"
        cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)]
        self.proc = start_group(cmd, log, env={**os.environ, **self.env}, cwd=self.root)
        wait_http(self.endpoint + "/moto-api/", 60, self.proc, log)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
        shutil.rmtree(self.root, ignore_errors=True)


def start_s3() -> S3Server:
    server = S3Server(port=free_port(), root=Path(tempfile.mkdtemp(prefix="study-s3-")))
    return _started(server)


@pytest.fixture(scope="session", name="s3_server")
def s3_server_fixture() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1 (one per session); see :class:`S3Server`."""
    yield _ONCE.get("s3", start_s3)  # type: ignore[misc]
    _ONCE.stop("s3")


@pytest.fixture(name="s3_env")
def s3_env_fixture(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server.env`` set in this process for one test (AWS config files ignored)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    return s3_server


# --- mlflow server ---------------------------------------------------------------
@dataclass
class MlflowServer:
    """A running ``mlflow server``.

    Attributes:
        uri: its tracking URI, ``http://127.0.0.1:<port>``.
        backend: the backend store URI as given (PostgreSQL without the password: the
            server takes it from ``PGPASSWORD``).
        artifacts: the ``--artifacts-destination``.
        bucket: the S3 bucket of the artifacts (None when not on S3).
        log: the server's output.
    """

    port: int
    backend: str
    artifacts: str
    log: Path
    env: dict[str, str]
    extra_args: tuple[str, ...] = ()
    bucket: str | None = None
    proc: subprocess.Popen | None = None
    owns_folder: bool = False

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        """Start ``mlflow server`` and wait until ``/health`` answers (``timeout`` seconds)."""
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", self.backend,
            "--artifacts-destination", self.artifacts,
            "--serve-artifacts",
            "--host", HOST,
            "--port", str(self.port),
            "--workers", "1",
            *self.extra_args,
        ]  # fmt: skip
        self.proc = start_group(cmd, self.log, env={**os.environ, **self.env}, cwd=self.log.parent)
        wait_http(self.uri + "/health", timeout, self.proc, self.log)

    def stop(self) -> None:
        """Stop the server's process group; remove its folder if :func:`start_mlflow_server`
        made it."""
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None
        if self.owns_folder:
            shutil.rmtree(self.log.parent, ignore_errors=True)


def start_mlflow_server(
    postgres: Postgres,
    s3: S3Server,
    db: str = "mlflow",
    bucket: str = "mlflow",
    folder: Path | None = None,
) -> MlflowServer:
    """``mlflow server`` on database ``db`` of ``postgres`` (created if missing) with its
    artifacts proxied into ``s3://bucket/mlartifacts`` (bucket created if missing)."""
    postgres.create_database(db)
    s3.create_bucket(bucket)
    owns_folder = folder is None
    folder = Path(folder or tempfile.mkdtemp(prefix="study-mlflow-"))
    server = MlflowServer(
        port=free_port(),
        backend=postgres.url(db, password=False),
        artifacts=f"s3://{bucket}/mlartifacts",
        log=folder / "mlflow-server.log",
        env={**s3.env, **postgres.env},
        bucket=bucket,
        owns_folder=owns_folder,
    )
    return _started(server)


@pytest.fixture(scope="session", name="mlflow_server")
def mlflow_server_fixture(postgres: Postgres, s3_server: S3Server) -> Iterator[MlflowServer]:
    """``mlflow server`` on PostgreSQL (database ``mlflow``) with artifacts proxied into
    moto's bucket ``mlflow`` (one per session); use a new experiment name per test."""
    yield _ONCE.get("mlflow", lambda: start_mlflow_server(postgres, s3_server))  # type: ignore[misc]
    _ONCE.stop("mlflow")


# the fixtures under their own names too, as the other test modules may import them
# (``from servers import postgres`` makes ruff see a redefinition in the test's arguments)
postgres = postgres_fixture
s3_server = s3_server_fixture
s3_env = s3_env_fixture
mlflow_server = mlflow_server_fixture
