"""``study server``: the team's tracking stack in one command (``mlflow server``).

Starts ``mlflow server`` with its backend store, proxied artifacts (``--serve-artifacts``)
and, on any address but the loopback, MLflow's basic-auth app; prints the tracking URI
to give to ``study run --tracking-uri``, then serves until SIGINT/SIGTERM/SIGHUP, which
end the server's whole process group. See ``docs/servers.md``.

- Backend store: ``--backend-store-uri`` (``postgresql://user@host/db``, …); default a
  SQLite file ``<folder>/mlflow.db``. A password in the URI is moved to the server's
  environment (``PGPASSWORD``), never its command line or the console.
- ``--postgres DIR``: a PostgreSQL cluster of this machine's ``postgresql`` package in
  ``DIR`` (made on the first start, reused after; :class:`LocalPostgres`) is the backend
  store: it listens on 127.0.0.1 (``--postgres-host``), password authentication
  (scram-sha-256) with the password of ``PGPASSWORD`` or one generated into
  ``DIR/password`` (mode 600), holds the databases ``mlflow`` and ``optuna`` (for
  ``study run --optuna-storage``, printed without the password), and stops with the server.
- Artifacts: ``--artifacts-destination`` (``s3://bucket/prefix``, S3 credentials and
  endpoint from the usual variables); default the folder ``<folder>/mlartifacts``.
- Security: it listens on 127.0.0.1 unless ``--host`` says otherwise. On any other
  address (or with ``--auth`` or ``--auth-file``) it runs MLflow's basic-auth app, whose
  admin user comes from ``--auth-file`` or the environment
  (``MLFLOW_AUTH_ADMIN_USERNAME``/``_PASSWORD``, else
  ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``), and says so; without credentials it
  refuses to start. Its user store is ``<folder>/basic_auth.db`` (``--auth-database-uri``:
  another database, whose password goes to the server's ``PGPASSWORD``, never into
  ``basic_auth.ini``). Credentials are never printed.

>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
(True, True, False)
>>> parse_auth_text("alice:correct-horse-battery\\n")
('alice', 'correct-horse-battery')
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import glob
import importlib.util
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainables.errors import UserError

DEFAULT_FOLDER = "mlflow-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_WORKERS = 2
#: seconds the server may take to answer on /health (a fresh PostgreSQL store runs
#: MLflow's schema migrations first)
START_TIMEOUT_S = 180.0
#: seconds a database or bucket check may take before it counts as unreachable
CHECK_TIMEOUT_S = 15.0
#: MLflow's minimum password length (mlflow.utils.validation._validate_password)
MIN_PASSWORD_LEN = 12
AUTH_APP = "basic-auth"
AUTH_CONFIG = "basic_auth.ini"
AUTH_DB = "basic_auth.db"
AUTH_STORE = "the basic-auth user store"  # what --auth-database-uri is, in messages
#: ``--postgres DIR``: the superuser role, its databases, port and address by default
PG_USER = "study"
PG_DATABASES = ("mlflow", "optuna")
PG_PORT = 5432
PG_HOST = "127.0.0.1"
#: inside ``DIR``: the data directory, the server's log, the generated password
PG_DATA, PG_LOG, PG_PASSWORD_FILE = "data", "postgresql.log", "password"
#: where Debian's ``postgresql`` package puts each version's programs
PG_LIB = Path("/usr/lib/postgresql")
#: OS users that may run the server when ``study server`` runs as root (PostgreSQL
#: refuses root): the package's own, then one made for it (``useradd``) if none exists
PG_OS_USERS = ("postgres", "energy-study-pg")
#: seconds PostgreSQL may take to start, and to stop after a fast-shutdown request
PG_START_TIMEOUT_S = 60.0
PG_STOP_TIMEOUT_S = 30.0


# --- pieces ------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name to bind) is the loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth_text(text: str) -> tuple[str, str]:
    """``user:password`` (the first non-empty line of an auth file) → ``(user, password)``.

    Raises:
        UserError: no ``:`` or an empty user or password.
    """
    line = next((s.strip() for s in text.splitlines() if s.strip()), "")
    user, sep, password = line.partition(":")
    if not sep or not user or not password:
        raise UserError(
            "the auth file must hold one line 'USER:PASSWORD' (the admin user of MLflow's "
            "basic-auth app) or be an MLflow basic_auth.ini with an [mlflow] section"
        )
    return user, password


@dataclass(frozen=True)
class Admin:
    """The admin user of the basic-auth app and where it came from (never printed: password).

    Attributes:
        username: the admin's user name.
        password: the admin's password.
        source: where both came from, for the console (``--auth-file FILE``, a variable name).
        config: an MLflow ``basic_auth.ini`` the user gave (used as it is), or None.
    """

    username: str
    password: str = field(repr=False)  # credentials: never in a repr
    source: str
    config: Path | None = None


def admin_credentials(auth_file: str | None, env: Mapping[str, str]) -> Admin | None:
    """The admin credentials: ``auth_file`` (``USER:PASSWORD``, or MLflow's ini with
    ``admin_username``/``admin_password``), else ``MLFLOW_AUTH_ADMIN_USERNAME`` /
    ``MLFLOW_AUTH_ADMIN_PASSWORD``, else ``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD`` (user ``admin`` when only a password is set); None
    when none of them gives a password."""
    if auth_file:
        path = Path(auth_file).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"cannot read the auth file {path}: {exc.strerror}") from None
        if path.stat().st_mode & 0o077:
            print(
                f"study server: warning: {path} can be read by other users (chmod 600 it)",
                file=sys.stderr,
            )
        if text.lstrip().startswith("[mlflow]"):
            ini = configparser.ConfigParser()
            ini.read_string(text)
            section = ini["mlflow"]
            user = env.get("MLFLOW_AUTH_ADMIN_USERNAME") or section.get("admin_username", "")
            password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD") or section.get("admin_password", "")
            if not user or not password:
                raise UserError(
                    f"{path} sets no admin_username/admin_password (nor does "
                    "MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD): the basic-auth app needs its admin"
                )
            return Admin(user, password, f"--auth-file {path}", config=path.resolve())
        user, password = parse_auth_text(text)
        return Admin(user, password, f"--auth-file {path}")
    for prefix in ("MLFLOW_AUTH_ADMIN", "MLFLOW_TRACKING"):
        password = env.get(f"{prefix}_PASSWORD", "")
        if password:
            user = env.get(f"{prefix}_USERNAME", "") or "admin"
            return Admin(user, password, f"{prefix}_USERNAME/_PASSWORD")
    return None


def _refuse_without_credentials(host: str) -> UserError:
    return UserError(
        f"refusing to serve MLflow on {host}, an address other machines can reach, without "
        "authentication: give the admin user of MLflow's basic-auth app in the environment "
        "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLflow's own "
        "MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD) or in a file readable only by you "
        "(--auth-file FILE holding 'USER:PASSWORD'); or keep the default --host 127.0.0.1 "
        "and reach it through an SSH tunnel"
    )


def public_address(host: str) -> str:
    """The address clients use for a server bound to ``host`` (for 0.0.0.0/:: the
    address of the interface of the default route, else the host name)."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent
            return str(s.getsockname()[0])
        except OSError:
            return socket.gethostname()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def check_port(host: str, port: int, option: str = "--port") -> None:
    """A one-paragraph :class:`UserError` when ``host:port`` cannot be bound (in use).

    Args:
        host: the address to listen on.
        port: the TCP port.
        option: the option that picks another port, for the message.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another server there? "
                f"Stop it or pick another port with {option} N"
            ) from None


def check_backend(uri: str, env: Mapping[str, str], what: str = "the backend store") -> None:
    """Connect once to a database backend (``postgresql://``, ``mysql://``…) within
    :data:`CHECK_TIMEOUT_S` seconds; a one-paragraph :class:`UserError` naming it when it
    cannot be reached or refuses the credentials. SQLite and file stores are not checked.

    Args:
        uri: the database URL (no password: it is in ``env``).
        env: the server's environment (``PGPASSWORD``…), set for the connection only.
        what: what the database is, for the message (``the backend store``).
    """
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return
    import sqlalchemy

    from study.credentials import applied, redact

    args = {"connect_timeout": int(CHECK_TIMEOUT_S)} if uri.startswith("postgres") else {}
    with applied(env):  # the password variables the driver reads (PGPASSWORD), for now
        try:
            engine = sqlalchemy.create_engine(uri, connect_args=args)
            with engine.connect():
                pass
            engine.dispose()
        except Exception as exc:  # noqa: BLE001 - any driver error is "cannot use the store"
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise UserError(
                f"{what} {redact(uri)} cannot be used: {redact(reason[0] if reason else '')}"
                " (is the database server running and reachable, and the password in "
                "PGPASSWORD or ~/.pgpass?)"
            ) from None


def check_bucket(uri: str, env: Mapping[str, str]) -> None:
    """For an ``s3://bucket/…`` artifacts destination: the bucket exists and answers within
    :data:`CHECK_TIMEOUT_S` seconds (endpoint and keys from ``env``), else a one-paragraph
    :class:`UserError` naming it. Other destinations are not checked."""
    if not uri.startswith("s3://"):
        return
    import boto3
    import botocore.config
    import botocore.exceptions

    bucket = uri[len("s3://") :].split("/", 1)[0]
    endpoint = env.get("MLFLOW_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3")
    endpoint = endpoint or env.get("AWS_ENDPOINT_URL")
    config = botocore.config.Config(
        connect_timeout=CHECK_TIMEOUT_S / 3,
        read_timeout=CHECK_TIMEOUT_S / 3,
        retries={"max_attempts": 1},
    )
    try:
        boto3.client("s3", endpoint_url=endpoint or None, config=config).head_bucket(Bucket=bucket)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        where = f" at {endpoint}" if endpoint else ""
        raise UserError(
            f"the artifacts destination {uri} cannot be used: bucket {bucket!r}{where}: {exc} "
            "(create the bucket; the endpoint comes from MLFLOW_S3_ENDPOINT_URL or "
            "AWS_ENDPOINT_URL, the keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        ) from None


def write_auth_config(folder: Path, database_uri: str) -> Path:
    """``<folder>/basic_auth.ini`` for MLflow's basic-auth app (its user store at
    ``database_uri``, new users may read; no password in it: the admin's come through
    the environment, the database's through ``PGPASSWORD``), mode 600.

    Args:
        folder: the server's folder (``--folder``).
        database_uri: the user store's database URL, without a password.
    """
    path = folder / AUTH_CONFIG
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        # MLflow reads the file with configparser's interpolation: a % is written %%
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path.write_text(text)
    path.chmod(0o600)
    return path


# --- a local PostgreSQL (--postgres DIR) ------------------------------------------------
def pg_bin(lib: Path = PG_LIB, path: str | None = None, version: str | None = None) -> Path | None:
    """The folder of PostgreSQL's server programs (``initdb``, ``postgres``), or None.

    Args:
        lib: where the packages put ``<version>/bin`` (Debian: ``/usr/lib/postgresql``).
        path: the ``PATH`` searched when ``lib`` has none (default: this process's).
        version: a major version to prefer (an existing cluster's ``PG_VERSION``).
    """
    found = sorted(
        (Path(p).parent for p in glob.glob(str(lib / "*" / "bin" / "initdb"))),
        key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0,
    )
    same = [b for b in found if b.parent.name == version]
    if same or found:
        return (same or found)[-1]
    initdb = shutil.which("initdb", path=path)
    return Path(initdb).parent if initdb else None


def require_pg_bin(lib: Path = PG_LIB, path: str | None = None, version: str | None = None) -> Path:
    """:func:`pg_bin`, or a one-paragraph :class:`UserError` saying what to install."""
    found = pg_bin(lib, path, version)
    if found is None or not (found / "postgres").is_file():
        raise UserError(
            f"study server --postgres needs PostgreSQL's server programs (initdb, postgres, "
            f"pg_isready), which are not installed here (looked in {lib}/*/bin and on the "
            "PATH): install them (Debian/Ubuntu: apt-get install postgresql; elsewhere the "
            "PostgreSQL server package), or give the URI of an existing database with "
            "--backend-store-uri"
        )
    return found


def pg_os_user() -> pwd.struct_passwd | None:
    """The unprivileged OS user that runs PostgreSQL when this process is root (the server
    refuses root): the first of :data:`PG_OS_USERS` that exists, else the last one made
    with ``useradd``. None when this process is not root (it runs the server itself)."""
    if os.geteuid() != 0:
        return None
    for name in PG_OS_USERS:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    made = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         PG_OS_USERS[-1]],
        capture_output=True, text=True,
    )  # fmt: skip
    if made.returncode != 0:
        raise UserError(
            f"PostgreSQL refuses to run as root and none of the users {', '.join(PG_OS_USERS)} "
            f"exists; useradd {PG_OS_USERS[-1]} failed ({made.stderr.strip()}): create one "
            "of them, or run study server as an unprivileged user"
        )
    return pwd.getpwnam(PG_OS_USERS[-1])


def _blocking_folder(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first existing folder above ``path`` that ``user`` cannot pass through (no
    search permission for it), or None."""
    groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
    for folder in reversed(path.resolve().parents):
        try:
            st = folder.stat()
        except FileNotFoundError:
            break
        if st.st_uid == user.pw_uid:
            bit = stat.S_IXUSR
        elif st.st_gid in groups:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return folder
    return None


@dataclass
class LocalPostgres:
    """A PostgreSQL cluster in a folder of this machine, run by this process.

    ``folder/data`` is made by ``initdb`` on the first :meth:`start` (superuser ``user``
    with ``password``, scram-sha-256 for every connection) and reused by the next; the
    server (``postgres``) runs as a child in its own process group, as an unprivileged
    OS user when this process is root, its output in ``folder/postgresql.log``, TCP only.

    Attributes:
        folder: the cluster's folder (``--postgres DIR``).
        password: the superuser's password (never printed).
        port: TCP port.
        host: the address it listens on (``listen_addresses``).
        user: the superuser role.
        bin: the folder of ``initdb``/``postgres``/``pg_isready`` (None: found at start).
        settings: more ``postgresql.conf`` settings, given on the command line.
    """

    folder: Path
    password: str = field(repr=False)  # never in a repr, a log or a traceback
    port: int = PG_PORT
    host: str = PG_HOST
    user: str = PG_USER
    bin: Path | None = None
    settings: Mapping[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    os_user: pwd.struct_passwd | None = None

    @property
    def data(self) -> Path:
        """The data directory (``PGDATA``)."""
        return self.folder / PG_DATA

    @property
    def log(self) -> Path:
        """The server's output."""
        return self.folder / PG_LOG

    @property
    def exists(self) -> bool:
        """Whether ``folder`` holds a cluster already (a later start reuses it)."""
        return (self.data / "PG_VERSION").is_file()

    @property
    def env(self) -> dict[str, str]:
        """The variable a client reads the password from."""
        return {"PGPASSWORD": self.password}

    def url(self, db: str = "postgres", host: str | None = None) -> str:
        """``postgresql://user@host:port/db`` (the password: :attr:`env` or ``~/.pgpass``).

        Args:
            db: the database.
            host: the address clients use (default: the loopback for a server listening
                on every address, else its address).
        """
        return f"postgresql://{self.user}@{_url_host(host or self.client_host)}:{self.port}/{db}"

    @property
    def client_host(self) -> str:
        """The address a client on this machine connects to (the loopback for a server
        listening on every address)."""
        return {"0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(
            self.host, self.host
        )

    def _owner_kwargs(self) -> dict[str, Any]:
        user = self.os_user
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []} if user else {}

    def _run(self, cmd: Sequence[str]) -> subprocess.CompletedProcess:
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        env.pop("PGPASSWORD", None)
        return subprocess.run(
            list(cmd), cwd=self.folder, env=env, capture_output=True, text=True,
            **self._owner_kwargs(),
        )  # fmt: skip

    def _prepare_folder(self) -> None:
        """Make ``folder`` (passable by the OS user that runs the server) and ``data``."""
        if self.os_user is not None:
            blocked = _blocking_folder(self.data, self.os_user)
            if blocked is not None:
                raise UserError(
                    f"PostgreSQL runs as the user {self.os_user.pw_name!r} (it refuses root), "
                    f"who cannot pass through {blocked} (no search permission): give --postgres "
                    f"a folder it can reach (e.g. under /srv or /var/lib), or chmod o+x {blocked}"
                )
        new = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        if new:  # root's folder: others may pass (to data/), not list; else the user's own
            self.folder.chmod(0o711 if self.os_user is not None else 0o700)
        if not self.data.exists():
            self.data.mkdir(mode=0o700)
            if self.os_user is not None:
                os.chown(self.data, self.os_user.pw_uid, self.os_user.pw_gid)
        elif self.os_user is not None and self.data.stat().st_uid != 0:
            self.os_user = pwd.getpwuid(self.data.stat().st_uid)  # whoever made it

    def init(self) -> bool:
        """``initdb`` into ``data`` when ``folder`` holds no cluster yet; True if it did.

        Raises:
            UserError: ``initdb`` failed (its output is in the message).
        """
        self.bin = self.bin or require_pg_bin(version=self._version())
        if self.os_user is None:
            self.os_user = pg_os_user()
        self._prepare_folder()
        if self.exists:
            return False
        fd, name = tempfile.mkstemp(prefix=".pwfile-", dir=self.folder)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.password + "\n")
            if self.os_user is not None:
                os.chown(name, self.os_user.pw_uid, self.os_user.pw_gid)
            done = self._run(
                [str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user,
                 "--pwfile", name, "--auth-host=scram-sha-256", "--auth-local=scram-sha-256",
                 "-E", "UTF8", "--no-instructions"]
            )  # fmt: skip
        finally:
            os.unlink(name)
        if done.returncode != 0:
            raise UserError(
                f"initdb could not make a PostgreSQL cluster in {self.data} "
                f"(exit {done.returncode}): {(done.stderr or done.stdout).strip()}"
            )
        with open(self.data / "pg_hba.conf", "a") as hba:  # any address, with the password
            hba.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")
        return True

    def _version(self) -> str | None:
        version = self.data / "PG_VERSION"
        return version.read_text().strip() if version.is_file() else None

    def start(self, stopped: Callable[[], bool] = lambda: False) -> None:
        """:meth:`init`, then run the server and wait until it accepts connections.

        Args:
            stopped: polled while waiting; True ends the wait (a signal came).

        Raises:
            UserError: the server exited or did not answer within
                :data:`PG_START_TIMEOUT_S` seconds (the end of its log in the message).
        """
        self.init()
        assert self.bin is not None
        options = {
            "listen_addresses": self.host, "port": str(self.port),
            "unix_socket_directories": "", **self.settings,
        }  # fmt: skip
        cmd = [str(self.bin / "postgres"), "-D", str(self.data)]
        for key, value in options.items():
            cmd += ["-c", f"{key}={value}"]
        env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        env.pop("PGPASSWORD", None)
        with open(self.log, "ab") as out:
            if self.os_user is not None:
                os.chown(self.log, self.os_user.pw_uid, self.os_user.pw_gid)
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.folder, start_new_session=True, **self._owner_kwargs(),
            )  # fmt: skip
        probe = self.client_host
        deadline = time.monotonic() + PG_START_TIMEOUT_S
        while not stopped():
            ready = subprocess.run(
                [str(self.bin / "pg_isready"), "-q", "-h", probe, "-p", str(self.port), "-t", "2"],
                capture_output=True,
            )  # fmt: skip
            if ready.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                what = (
                    f"exited with code {self.proc.returncode}"
                    if self.proc.poll() is not None
                    else f"did not accept connections within {PG_START_TIMEOUT_S:.0f} s"
                )
                self.stop()
                raise UserError(
                    f"PostgreSQL in {self.folder} {what}: {' / '.join(tail)} (its whole "
                    f"output: {self.log})"
                )
            time.sleep(0.2)

    def create_databases(self, names: Sequence[str] = PG_DATABASES) -> None:
        """Create each database of ``names`` that does not exist yet."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(
            self.url("postgres"),
            isolation_level="AUTOCOMMIT",
            connect_args={"password": self.password, "connect_timeout": int(CHECK_TIMEOUT_S)},
        )
        try:
            with engine.connect() as conn:
                query = sqlalchemy.text("SELECT datname FROM pg_database")
                have = set(conn.execute(query).scalars())
                for name in names:
                    if name not in have:
                        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()

    def request_stop(self) -> None:
        """Ask the server for a fast shutdown (SIGINT: clients cut, a checkpoint written)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGINT)

    def stop(self) -> None:
        """Fast shutdown, waiting up to :data:`PG_STOP_TIMEOUT_S` seconds, then end what is
        left of its process group (:func:`study.ui.stop_group`)."""
        from study.ui import stop_group

        if self.proc is None:
            return
        self.request_stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=PG_STOP_TIMEOUT_S)
        stop_group(self.proc, 10.0)
        self.proc = None


@dataclass
class Plan:
    """What ``study server`` runs: the command, its environment, what to print.

    Attributes:
        cmd: the ``mlflow server`` command line (no credentials in it).
        env: the server's environment (credentials in their variables).
        uri: the tracking URI clients use.
        health: the URL polled until the server answers.
        admin: the basic-auth admin, or None without authentication.
        lines: what the console shows once the server answers.
        backend: the backend store URI (no password).
        artifacts: the artifacts destination (no credentials).
        folders: the folders to create before the server starts.
        auth_ini: ``(folder, user store URI)`` of the basic-auth config to write, or None.
        database: the local PostgreSQL to run first (``--postgres DIR``), or None.
        password_file: the file to write the database's generated password into, or None.
    """

    cmd: list[str]
    env: dict[str, str] = field(repr=False)  # credentials: never in a repr
    uri: str
    health: str
    admin: Admin | None
    lines: list[str]
    backend: str
    artifacts: str
    folders: list[Path]
    auth_ini: tuple[Path, str] | None
    database: LocalPostgres | None = None
    password_file: Path | None = None

    def prepare(self) -> None:
        """Create the folders, the basic-auth config and the local database's password
        file (after every check passed)."""
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        if self.auth_ini is not None:
            write_auth_config(*self.auth_ini)
        if self.database is not None and self.password_file is not None:
            self.password_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(self.database.password + "\n")


def plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Plan:
    """Check the options and build the :class:`Plan` (creates nothing).

    Args:
        args: the parsed ``study server`` options.
        environ: the environment to read credentials from and give the server (default:
            this process's).

    Raises:
        UserError: no credentials on a non-loopback address, a bad auth file, a password
            shorter than MLflow accepts; ``--postgres`` with ``--backend-store-uri``, or an
            existing ``--postgres`` cluster whose password is nowhere; different passwords
            in ``--backend-store-uri`` and ``--auth-database-uri`` (one ``PGPASSWORD``).
    """
    from study.credentials import check_one_password, redact, split_credentials

    environ = dict(os.environ if environ is None else environ)
    folder = Path(args.folder).expanduser().resolve()
    host = args.host
    labels = ("--backend-store-uri", "--auth-database-uri")
    check_one_password(args.backend_store_uri, args.auth_database_uri, labels=labels)
    backend, backend_env = split_credentials(args.backend_store_uri or "")
    auth_db_given, auth_db_env = split_credentials(args.auth_database_uri or "")
    database, password_file, database_lines = None, None, []
    if args.postgres:
        if backend:
            raise UserError(
                "--postgres DIR runs the backend store, --backend-store-uri names another "
                "one: give one of them"
            )
        database, password_file, database_lines = _local_postgres(args, environ)
        backend, backend_env = database.url(PG_DATABASES[0]), database.env
        if auth_db_env.get("PGPASSWORD", database.password) != database.password:
            raise UserError(
                "--auth-database-uri carries a password other than the --postgres cluster's, "
                "and the server's PGPASSWORD holds one: give the URI without it and the "
                "password in ~/.pgpass (one line per server), or use the cluster's"
            )
    if not backend:
        backend = f"sqlite:///{(folder / 'mlflow.db').as_posix()}"
    artifacts, artifacts_env = split_credentials(args.artifacts_destination or "")
    if not artifacts:
        artifacts = str(folder / "mlartifacts")
    auth = args.auth or bool(args.auth_file) or not is_loopback(host)
    admin = admin_credentials(args.auth_file, environ) if auth else None
    if auth and admin is None:
        raise _refuse_without_credentials(host)
    if admin is not None and importlib.util.find_spec("flask_wtf") is None:
        raise UserError(
            "MLflow's basic-auth app needs Flask-WTF, which is not installed: "
            "pip install 'mlflow[auth]' (or reinstall this project: pip install .)"
        )
    if admin is not None and len(admin.password) < MIN_PASSWORD_LEN:
        raise UserError(
            f"the admin password from {admin.source} is shorter than the "
            f"{MIN_PASSWORD_LEN} characters MLflow's basic-auth app accepts"
        )
    env = {**environ, **auth_db_env, **backend_env, **artifacts_env}
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend,
        "--artifacts-destination", artifacts,
        "--serve-artifacts",
        "--host", host,
        "--port", str(args.port),
        "--workers", str(args.workers),
    ]  # fmt: skip
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", args.allowed_hosts]
    address = public_address(host)
    uri = f"http://{_url_host(address)}:{args.port}"
    probe = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    lines = [
        f"MLflow tracking server: {uri}",
        f"  backend store: {redact(backend)}",
        f"  artifacts:     {redact(artifacts)} (proxied: clients need no storage credentials)",
        *database_lines,
    ]
    folders = [folder]
    if backend.startswith("sqlite:///"):
        folders.append(Path(backend[len("sqlite:///") :]).parent)
    if "://" not in artifacts:
        folders.append(Path(artifacts))
    auth_ini: tuple[Path, str] | None = None
    if admin is not None:
        auth_db = auth_db_given or f"sqlite:///{(folder / AUTH_DB).as_posix()}"
        config = admin.config or folder / AUTH_CONFIG
        if admin.config is None:
            auth_ini = (folder, auth_db)
        cmd += ["--app-name", AUTH_APP]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
        env["MLFLOW_AUTH_ADMIN_USERNAME"] = admin.username
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = admin.password
        # CSRF key of the auth app's pages: one per start unless the environment gives one
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", secrets.token_hex(32))
        lines += [
            f"  authentication: MLflow basic-auth, admin user {admin.username!r} from "
            f"{admin.source}; users in {redact(auth_db) if not admin.config else admin.config}",
            "  clients: export MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=... "
            "(an admin creates more users: docs/servers.md)",
        ]
    else:
        lines.append("  authentication: none (listening on the loopback only)")
    lines.append(f"  use it: study run --tracking-uri {uri}")
    health = f"http://{_url_host(probe)}:{args.port}/health"
    return Plan(
        cmd, env, uri, health, admin, lines, backend, artifacts, folders, auth_ini,
        database, password_file,
    )  # fmt: skip


def _local_postgres(
    args: argparse.Namespace, environ: Mapping[str, str]
) -> tuple[LocalPostgres, Path | None, list[str]]:
    """``--postgres DIR``: the cluster (nothing started or written), the file its generated
    password goes to (None: the password exists already), and its console lines.

    The password: ``PGPASSWORD``, else ``DIR/password`` from an earlier start, else a new
    one (written by :meth:`Plan.prepare`).
    """
    folder = Path(args.postgres).expanduser().resolve()
    pg = LocalPostgres(folder, password="", port=args.postgres_port, host=args.postgres_host)
    password_path = folder / PG_PASSWORD_FILE
    write: Path | None = None
    if environ.get("PGPASSWORD"):
        pg.password, where = environ["PGPASSWORD"], "from PGPASSWORD"
    elif password_path.is_file():
        pg.password, where = password_path.read_text().strip(), f"in {password_path}"
    elif pg.exists:
        raise UserError(
            f"{folder} holds a PostgreSQL cluster, but its password is neither in PGPASSWORD "
            f"nor in {password_path}: set PGPASSWORD to the password it was made with"
        )
    else:
        pg.password, write = secrets.token_urlsafe(24), password_path
        where = f"generated into {password_path} (mode 600)"
    public = pg.client_host if is_loopback(pg.client_host) else public_address(pg.host)
    optuna = pg.url(PG_DATABASES[1], host=public)
    reach = "this machine only" if is_loopback(pg.client_host) else "other machines too"
    lines = [
        f"  PostgreSQL:    {folder} on {_url_host(pg.host)}:{pg.port} ({reach}), user "
        f"{pg.user!r}, password {where}; it stops with this server",
        f"  Optuna:        study run --optuna-storage {optuna}   # password: PGPASSWORD or "
        "a ~/.pgpass line",
    ]
    return pg, write, lines


def _answers(url: str, admin: Admin | None, timeout: float = 5.0) -> int | None:
    """HTTP status of a GET of ``url`` (with the admin's basic auth if given); None: no
    answer within ``timeout`` seconds."""
    request = urllib.request.Request(url)
    if admin is not None:
        token = b64encode(f"{admin.username}:{admin.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


def serve(p: Plan, out: Any = None, start_timeout: float = START_TIMEOUT_S) -> int:
    """Run ``p.cmd`` in its own process group until it exits or this process gets
    SIGTERM/SIGINT/SIGHUP (which end the whole group); print ``p.lines`` once it
    answers on ``/health``. Returns 0 after a signal, else the server's exit code.

    A ``p.database`` (``--postgres``) starts first (its databases made, the store
    checked) and stops after the MLflow server, whichever way that ends.

    Raises:
        UserError: it exited or did not answer within ``start_timeout`` seconds, or the
            admin credentials are refused (an existing user store with another password).
    """
    out = out or sys.stdout
    stopped: list[int] = []
    procs: list[subprocess.Popen] = []

    def stop(signum: int, frame: Any) -> None:  # noqa: ARG001 - a signal handler
        stopped.append(signum)
        for started in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(started.pid, signal.SIGTERM)
        # a --postgres cluster stops in `finally`, once MLflow (its client) has stopped

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, stop) for s in handled}
    try:
        if p.database is not None:
            p.database.start(stopped=lambda: bool(stopped))
            if stopped:
                return 0
            p.database.create_databases()
            check_backend(p.backend, p.env)
            if p.auth_ini is not None:
                check_backend(p.auth_ini[1], p.env, AUTH_STORE)
        proc = subprocess.Popen(p.cmd, env=p.env, start_new_session=True)
        procs.append(proc)
        if stopped:
            stop(stopped[-1], None)
        deadline = time.monotonic() + start_timeout
        while not stopped and proc.poll() is None and _answers(p.health, None) != 200:
            if time.monotonic() > deadline:
                raise UserError(
                    f"the MLflow server did not answer on {p.health} within {start_timeout:.0f} s "
                    "(its output is above); it was stopped"
                )
            time.sleep(0.25)
        if proc.poll() is not None and not stopped:
            raise UserError(
                f"the MLflow server exited with code {proc.returncode} before it served "
                "(its output is above)"
            )
        if not stopped and p.admin is not None:
            search = p.health.rsplit("/", 1)[0] + "/api/2.0/mlflow/experiments/search?max_results=1"
            status = _answers(search, p.admin, timeout=30)
            while status not in (200, 401, 403) and proc.poll() is None and not stopped:
                if time.monotonic() > deadline:  # a loaded machine: the first answer is slow
                    break
                time.sleep(0.5)
                status = _answers(search, p.admin, timeout=30)
            if status not in (200, 401, 403) and not stopped:
                raise UserError(
                    f"the MLflow server did not answer an authenticated request on {search} "
                    f"within {start_timeout:.0f} s (its output is above); it was stopped"
                )
            if status in (401, 403) and not stopped:
                raise UserError(
                    f"the server refuses (HTTP {status}) the admin user {p.admin.username!r} from "
                    f"{p.admin.source}: its user store already holds that user with another "
                    "password (MLflow sets it only when it creates the user); give that "
                    "password, or change it through the server (docs/servers.md)"
                )
        if not stopped:
            print("\n".join(p.lines), file=out, flush=True)
        code = proc.wait()
    finally:
        from study.ui import stop_group

        for started in procs:
            stop_group(started, 10.0)
        if p.database is not None:  # after MLflow, which holds connections to it
            p.database.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped else code


def run_server(args: argparse.Namespace) -> int:
    """``study server``: check the options, the ports, the stores and the bucket (nothing is
    created before they pass; a ``--postgres`` cluster is checked once it runs), then
    serve."""
    p = plan(args)
    check_port(args.host, args.port)
    if p.database is not None:
        require_pg_bin(version=p.database._version())
        check_port(p.database.host, p.database.port, "--postgres-port")
    else:  # the stores on a --postgres cluster are checked once it runs (serve)
        check_backend(p.backend, p.env)
        if p.auth_ini is not None:
            check_backend(p.auth_ini[1], p.env, AUTH_STORE)
    check_bucket(p.artifacts, p.env)
    p.prepare()
    return serve(p)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``study server`` on ``subparsers`` (argparse's ``add_subparsers()``)."""
    p = subparsers.add_parser(
        "server",
        help="start the team's MLflow tracking server (127.0.0.1 unless --host; basic auth "
        "on any other address)",
        description=__doc__.split("\n\n>>>")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--folder",
        default=DEFAULT_FOLDER,
        help="folder of the default SQLite store, artifacts and user store "
        f"(default: ./{DEFAULT_FOLDER})",
    )
    p.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="MLflow's backend store, e.g. postgresql://user@db-host/mlflow "
        "(password: PGPASSWORD or ~/.pgpass; default sqlite:///FOLDER/mlflow.db)",
    )
    p.add_argument(
        "--postgres",
        metavar="DIR",
        help="run a PostgreSQL cluster in DIR (Debian: apt-get install postgresql; made on the "
        "first start, reused after, stopped with the server) as the backend store, with the "
        "databases mlflow and optuna; password: PGPASSWORD, else generated into DIR/password",
    )
    p.add_argument(
        "--postgres-host",
        default=PG_HOST,
        help=f"address the --postgres cluster listens on (default {PG_HOST})",
    )
    p.add_argument(
        "--postgres-port",
        type=int,
        default=PG_PORT,
        help=f"TCP port of the --postgres cluster (default {PG_PORT})",
    )
    p.add_argument(
        "--artifacts-destination",
        metavar="URI",
        help="where the server stores artifacts, e.g. s3://bucket/mlartifacts "
        "(default FOLDER/mlartifacts)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (default 127.0.0.1; any other address needs "
        "credentials and turns basic auth on)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default 5000)")
    p.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help=f"server worker processes (default {DEFAULT_WORKERS})",
    )
    p.add_argument(
        "--auth",
        action="store_true",
        help="basic auth on the loopback too (always on for other addresses and with --auth-file)",
    )
    p.add_argument(
        "--auth-file",
        metavar="FILE",
        help="the admin user: a file (mode 600) holding USER:PASSWORD, or an "
        "MLflow basic_auth.ini (default: MLFLOW_TRACKING_USERNAME/_PASSWORD)",
    )
    p.add_argument(
        "--auth-database-uri",
        metavar="URI",
        help="the basic-auth user store (default sqlite:///FOLDER/basic_auth.db)",
    )
    p.add_argument(
        "--allowed-hosts",
        metavar="HOSTS",
        help="Host headers the server accepts, comma-separated (MLflow's default: "
        "localhost and private addresses); needed for a DNS name",
    )
    p.set_defaults(func=run_server)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m study.server``: the same as ``study server`` (its errors too)."""
    from study.cli import main as study_main

    return study_main(["server", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
