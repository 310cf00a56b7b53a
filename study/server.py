"""``study server``: the team's tracking stack in one command (``mlflow server``).

Starts ``mlflow server`` with its backend store, proxied artifacts (``--serve-artifacts``)
and, on any address but the loopback, MLflow's basic-auth app; prints the tracking URI
to give to ``study run --tracking-uri``, then serves until SIGINT/SIGTERM/SIGHUP, which
end the server's whole process group. See ``docs/servers.md``.

- Backend store: ``--backend-store-uri`` (``postgresql://user@host/db``, …); default a
  SQLite file ``<folder>/mlflow.db``. A password in the URI is moved to the server's
  environment (``PGPASSWORD``), never its command line or the console.
- Artifacts: ``--artifacts-destination`` (``s3://bucket/prefix``, S3 credentials and
  endpoint from the usual variables); default the folder ``<folder>/mlartifacts``.
- Security: it listens on 127.0.0.1 unless ``--host`` says otherwise. On any other
  address (or with ``--auth`` or ``--auth-file``) it runs MLflow's basic-auth app, whose
  admin user comes from ``--auth-file`` or the environment
  (``MLFLOW_AUTH_ADMIN_USERNAME``/``_PASSWORD``, else
  ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``), and says so; without credentials it
  refuses to start. Its user store is ``<folder>/basic_auth.db``. Credentials are never
  printed.

>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
(True, True, False)
>>> parse_auth_text("alice:correct-horse-battery\\n")
('alice', 'correct-horse-battery')
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import importlib.util
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    password: str
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


def check_port(host: str, port: int) -> None:
    """A one-paragraph :class:`UserError` when ``host:port`` cannot be bound (in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}): another server there? "
                "Stop it or pick another port with --port N"
            ) from None


def check_backend(uri: str, env: Mapping[str, str]) -> None:
    """Connect once to a database backend (``postgresql://``, ``mysql://``…) within
    :data:`CHECK_TIMEOUT_S` seconds; a one-paragraph :class:`UserError` naming it when it
    cannot be reached or refuses the credentials. SQLite and file stores are not checked."""
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return
    import sqlalchemy

    from study.credentials import redact

    args = {"connect_timeout": int(CHECK_TIMEOUT_S)} if uri.startswith("postgres") else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the password variables the driver reads (PGPASSWORD)
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=args)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver error is "cannot use the store"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise UserError(
            f"the backend store {redact(uri)} cannot be used: {redact(reason[0] if reason else '')}"
            " (is the database server running and reachable, and the password in PGPASSWORD "
            "or ~/.pgpass?)"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    the environment), mode 600."""
    path = folder / AUTH_CONFIG
    text = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = {database_uri}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    path.write_text(text)
    path.chmod(0o600)
    return path


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
    """

    cmd: list[str]
    env: dict[str, str]
    uri: str
    health: str
    admin: Admin | None
    lines: list[str]
    backend: str
    artifacts: str
    folders: list[Path]
    auth_ini: tuple[Path, str] | None

    def prepare(self) -> None:
        """Create the folders and the basic-auth config (after every check passed)."""
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        if self.auth_ini is not None:
            write_auth_config(*self.auth_ini)


def plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Plan:
    """Check the options and build the :class:`Plan` (creates nothing).

    Raises:
        UserError: no credentials on a non-loopback address, a bad auth file, a password
            shorter than MLflow accepts.
    """
    from study.credentials import redact, split_credentials

    environ = dict(os.environ if environ is None else environ)
    folder = Path(args.folder).expanduser().resolve()
    host = args.host
    backend, backend_env = split_credentials(args.backend_store_uri or "")
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
    env = {**environ, **backend_env, **artifacts_env}
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
    ]
    folders = [folder]
    if backend.startswith("sqlite:///"):
        folders.append(Path(backend[len("sqlite:///") :]).parent)
    if "://" not in artifacts:
        folders.append(Path(artifacts))
    auth_ini: tuple[Path, str] | None = None
    if admin is not None:
        auth_db = args.auth_database_uri or f"sqlite:///{(folder / AUTH_DB).as_posix()}"
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
    return Plan(cmd, env, uri, health, admin, lines, backend, artifacts, folders, auth_ini)


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

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, stop) for s in handled}
    try:
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
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopped else code


def run_server(args: argparse.Namespace) -> int:
    """``study server``: check the options, the port, the store and the bucket (nothing is
    created before they pass), then serve."""
    p = plan(args)
    check_port(args.host, args.port)
    check_backend(p.backend, p.env)
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
