"""MLflow and Optuna on real servers: PostgreSQL, an S3 server (moto), ``mlflow server``.

The servers are started by the fixtures of ``tests/servers.py`` on 127.0.0.1; every
test that starts one is ``slow``; the checks of ``study server``'s options are quick.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from servers import (  # noqa: F401
    MlflowServer,
    Postgres,
    S3Server,
    free_port,
    mlflow_server_fixture,
    postgres_fixture,
    s3_server_fixture,
    start_group,
    stop_group,
)

slow = pytest.mark.slow  # every test that starts a server


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@slow
def test_postgres_checks_the_password(postgres: Postgres) -> None:
    """Host connections need the password: a wrong one is refused, the right one works."""
    import sqlalchemy

    wrong = postgres.url().replace(postgres.password, "not-the-password")
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        sqlalchemy.create_engine(wrong).connect().close()
    engine = sqlalchemy.create_engine(postgres.url())
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT current_user")).scalar() == postgres.user
    engine.dispose()


@slow
def test_tracker_through_mlflow_server(
    mlflow_server: MlflowServer, s3_server: S3Server, postgres: Postgres, tmp_path: Path
) -> None:
    """``MlflowTracker`` on ``mlflow server`` (PostgreSQL store, artifacts proxied to S3):
    params, metrics and an artifact go in and come back; the artifact's bytes are in
    the bucket and the run is a row of the PostgreSQL store."""
    from study.tracking import MlflowTracker

    experiment = _name("servers")
    tracker = MlflowTracker(mlflow_server.uri, experiment)
    run_id = tracker.create_run("trial-0", {"energy_study.study": experiment})
    tracker.log_params(run_id, {"lr": 0.05, "method": "weat_adv"})
    for epoch in (1, 2, 3):
        tracker.log_metrics(run_id, {"val_acc": 0.5 + epoch / 10}, step=epoch)
    payload = b"checkpoint bytes " + uuid.uuid4().bytes
    (tmp_path / "best.pt").write_bytes(payload)
    tracker.log_artifact(run_id, tmp_path / "best.pt", "checkpoints")
    tracker.end_run(run_id)

    run = tracker.get_run(run_id)
    assert run.data.params == {"lr": "0.05", "method": "weat_adv"}
    assert run.data.metrics["val_acc"] == pytest.approx(0.8)
    history = tracker.client.get_metric_history(run_id, "val_acc")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert run.info.status == "FINISHED"
    assert [r.info.run_id for r in tracker.find_runs(**{"energy_study.study": experiment})] == [
        run_id
    ]
    # proxied: the client sees mlflow-artifacts:/, the bytes are in the bucket
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    got = tracker.download(run_id, "checkpoints/best.pt", tmp_path / "down")
    assert got.read_bytes() == payload
    keys = [k for k in s3_server.keys(mlflow_server.bucket or "") if run_id in k]
    assert [k.rsplit("/", 2)[-2:] for k in keys] == [["checkpoints", "best.pt"]]
    assert s3_server.get(mlflow_server.bucket or "", keys[0]) == payload
    # the store is PostgreSQL: the run is a row there
    assert run_id in postgres.psql("SELECT run_uuid FROM runs", db="mlflow")


@slow
def test_optuna_storage_on_postgres(postgres: Postgres, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optuna's RDB storage on the same PostgreSQL: trials written with the password in
    the URL are loaded back by a URL without it, the password coming from PGPASSWORD."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = postgres.create_database("optuna")
    name = _name("optuna")
    study = optuna.create_study(study_name=name, storage=url, direction="minimize")
    study.optimize(lambda t: (t.suggest_float("x", -3, 3) - 1) ** 2, n_trials=4)
    best = study.best_value

    for key, value in postgres.env.items():
        monkeypatch.setenv(key, value)
    loaded = optuna.load_study(study_name=name, storage=postgres.url("optuna", password=False))
    assert len(loaded.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in loaded.trials)
    assert loaded.best_value == best
    assert [t.params["x"] for t in loaded.trials] == [t.params["x"] for t in study.trials]
    assert name in postgres.dump("optuna")


# --- study server ------------------------------------------------------------------
_CREDENTIAL_VARS = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_TRACKING_URI",
    "PGPASSWORD",
)


class StudyServer:
    """``python -m study.server ARGS`` (what ``study server ARGS`` runs) as a subprocess."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path) -> None:
        self.log = folder.parent / f"{folder.name}-server.log"
        self.proc = start_group([sys.executable, "-m", "study.server", *args], self.log, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 180.0) -> str:
        """Wait for the printed tracking URI (the server answers by then); returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"^MLflow tracking server: (\S+)$", self.output(), re.M)
            if match:
                return match.group(1)
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"study server exited {self.proc.returncode}:\n{self.output()}"
                )
            time.sleep(0.2)
        raise AssertionError(f"study server printed no URI in {timeout} s:\n{self.output()}")

    def stop(self) -> int | None:
        """SIGTERM to ``study server`` alone (it ends its MLflow server), then the group."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=30)
        code = self.proc.poll()
        stop_group(self.proc)
        return code


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CREDENTIAL_VARS}
    return {**env, **extra}


def _status(url: str, auth: tuple[str, str] | None = None, timeout: float = 60.0) -> int | None:
    """HTTP status of a GET (None: no answer within ``timeout`` seconds; each basic-auth
    check hashes the password, slow on a loaded machine)."""
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def _cmdlines() -> list[bytes]:
    """The command line of every process (NUL-separated arguments)."""
    out = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            out.append(path.read_bytes())
    return out


def _log_one_run(uri: str, tmp_path: Path) -> tuple[str, bytes]:
    from study.tracking import MlflowTracker

    tracker = MlflowTracker(uri, _name("served"))
    run_id = tracker.create_run("trial-0", {"energy_study.role": "trial"})
    tracker.log_metrics(run_id, {"val_acc": 0.75}, step=1)
    payload = uuid.uuid4().bytes * 8
    (tmp_path / "energies.npz").write_bytes(payload)
    tracker.log_artifact(run_id, tmp_path / "energies.npz")
    tracker.end_run(run_id)
    assert tracker.get_run(run_id).data.metrics["val_acc"] == 0.75
    got = tracker.download(run_id, "energies.npz", tmp_path / "down")
    assert got.read_bytes() == payload
    return run_id, payload


@slow
def test_study_server_on_loopback_serves_without_auth(tmp_path: Path) -> None:
    """Default: SQLite store and artifacts in --folder, 127.0.0.1, no auth; a tracker
    logs to the printed URI; SIGTERM ends the server (the port is free again)."""
    folder = tmp_path / "stack"
    port = free_port()
    server = StudyServer(["--folder", str(folder), "--port", str(port), "--workers", "1"],
                         _server_env(), folder)  # fmt: skip
    try:
        uri = server.wait_ready()
        assert uri == f"http://127.0.0.1:{port}"
        assert "authentication: none" in server.output()
        run_id, payload = _log_one_run(uri, tmp_path)
        stored = list((folder / "mlartifacts").rglob("energies.npz"))
        assert len(stored) == 1 and run_id in str(stored[0])
        assert stored[0].read_bytes() == payload
        assert (folder / "mlflow.db").is_file()
    finally:
        code = server.stop()
    assert code == 0
    assert not _listening(port)  # nothing left serving


@slow
def test_study_server_on_all_addresses_needs_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--host 0.0.0.0 with credentials in the environment: basic auth on (said so), an
    unauthenticated request gets 401, a tracker with the credentials works; the password
    is never printed."""
    folder = tmp_path / "stack"
    port = free_port()
    user, password = "team-admin", "pw-" + uuid.uuid4().hex
    env = _server_env(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    server = StudyServer(
        ["--folder", str(folder), "--host", "0.0.0.0", "--port", str(port), "--workers", "1"],
        env,
        folder,
    )
    try:
        server.wait_ready()
        output = server.output()
        assert "MLflow basic-auth, admin user 'team-admin'" in output
        local = f"http://127.0.0.1:{port}"
        search = f"{local}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search) == 401
        assert _status(search, (user, "wrong-password-123")) == 401
        assert _status(search, (user, password)) == 200
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        _log_one_run(local, tmp_path)
        assert (folder / "basic_auth.db").is_file()
        assert password not in (folder / "basic_auth.ini").read_text()
    finally:
        code = server.stop()
    assert code == 0
    assert password not in server.output()


@slow
def test_study_server_refuses_other_addresses_without_credentials(tmp_path: Path) -> None:
    """No credentials on a non-loopback address: one paragraph, exit 2, nothing created."""
    folder = tmp_path / "stack"
    done = subprocess.run(
        [sys.executable, "-m", "study.server", "--folder", str(folder), "--host", "0.0.0.0",
         "--port", str(free_port())],
        env=_server_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("study server: error: refusing to serve MLflow on 0.0.0.0")
    assert "MLFLOW_TRACKING_PASSWORD" in done.stderr and "Traceback" not in done.stderr
    assert not folder.exists()


@slow
def test_study_server_with_postgres_and_s3(
    tmp_path: Path, postgres: Postgres, s3_server: S3Server
) -> None:
    """The team stack: PostgreSQL store (password given in the URI: moved to PGPASSWORD,
    absent from the output and from every process's command line) and S3 artifacts."""
    folder = tmp_path / "stack"
    postgres.create_database("served")
    bucket = s3_server.create_bucket("served-artifacts")
    port = free_port()
    server = StudyServer(
        ["--folder", str(folder), "--port", str(port), "--workers", "1",
         "--backend-store-uri", postgres.url("served"),
         "--artifacts-destination", f"{bucket}/mlartifacts"],
        _server_env(**s3_server.env),
        folder,
    )  # fmt: skip
    try:
        uri = server.wait_ready()
        run_id, payload = _log_one_run(uri, tmp_path)
        keys = [k for k in s3_server.keys("served-artifacts") if run_id in k]
        assert len(keys) == 1 and s3_server.get("served-artifacts", keys[0]) == payload
        assert run_id in postgres.psql("SELECT run_uuid FROM runs", db="served")
        # the MLflow server's processes (not `study server`, whose own command line the
        # test gave the password) carry no password on their command lines
        marker = f"--port\0{port}".encode()
        served = [c for c in _cmdlines() if marker in c and b"study.server" not in c]
        assert served
        assert not [c for c in served if postgres.password.encode() in c]
    finally:
        code = server.stop()
    assert code == 0
    assert postgres.password not in server.output()


@slow
def test_study_server_unreachable_store_fails_fast(tmp_path: Path) -> None:
    """A PostgreSQL store nobody listens on: one paragraph naming it, well within 30 s."""
    folder = tmp_path / "stack"
    port = free_port()
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "study.server", "--folder", str(folder), "--port", str(free_port()),
         "--backend-store-uri", f"postgresql://u:secret-pw@127.0.0.1:{port}/mlflow"],
        env=_server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert time.monotonic() - start < 30
    assert done.returncode == 2
    assert f"the backend store postgresql://u@127.0.0.1:{port}/mlflow cannot be used" in done.stderr
    assert "secret-pw" not in done.stderr + done.stdout
    assert not folder.exists()  # nothing half-created


# --- study server's options (quick: nothing is started) --------------------------------
def _args(*argv: str) -> argparse.Namespace:
    from study.server import add_parser

    parser = argparse.ArgumentParser(prog="study")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["server", *argv])


def test_server_plan_auth_file_turns_auth_on_and_keeps_the_password_out(tmp_path: Path) -> None:
    """--auth-file: basic auth (even on 127.0.0.1), the admin from the file, its password
    in the server's environment only: not in the command line, the console lines or the
    config file written for MLflow; nothing is created by the plan."""
    from study.server import plan

    secret = tmp_path / "admin.txt"
    secret.write_text("team-admin:" + "p" * 20 + "\n")
    secret.chmod(0o600)
    folder = tmp_path / "stack"
    p = plan(_args("--folder", str(folder), "--auth-file", str(secret)), environ={})
    assert p.cmd[p.cmd.index("--app-name") + 1] == "basic-auth"
    assert p.env["MLFLOW_AUTH_ADMIN_USERNAME"] == "team-admin"
    assert p.env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "p" * 20
    assert "p" * 20 not in " ".join(p.cmd + p.lines)
    assert p.uri.startswith("http://127.0.0.1:5000")
    assert not folder.exists()
    p.prepare()
    ini = (folder / "basic_auth.ini").read_text()
    assert "p" * 20 not in ini and f"sqlite:///{folder}/basic_auth.db" in ini
    assert (folder / "basic_auth.ini").stat().st_mode & 0o777 == 0o600


def test_server_plan_moves_a_store_password_to_the_environment(tmp_path: Path) -> None:
    """A password in --backend-store-uri goes to PGPASSWORD, not the command or output."""
    from study.server import plan

    uri = "postgresql://mlflow:s3cret-pw@db.internal:5432/mlflow"
    p = plan(_args("--folder", str(tmp_path), "--backend-store-uri", uri), environ={})
    assert p.env["PGPASSWORD"] == "s3cret-pw"
    assert p.backend == "postgresql://mlflow@db.internal:5432/mlflow"
    assert "s3cret-pw" not in " ".join(p.cmd + p.lines)
    assert "authentication: none" in "\n".join(p.lines)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--host", "0.0.0.0"], {}, "refusing to serve MLflow on 0.0.0.0"),
        (["--host", "10.1.2.3"], {"MLFLOW_TRACKING_PASSWORD": "short"}, "shorter than the 12"),
        (["--auth"], {"MLFLOW_TRACKING_USERNAME": "admin"}, "refusing to serve MLflow"),
    ],
)
def test_server_plan_refuses_bad_credentials(
    tmp_path: Path, argv: list[str], environ: dict[str, str], message: str
) -> None:
    """No password, or one MLflow would refuse: one paragraph, nothing created."""
    from study.server import plan
    from trainables.errors import UserError

    with pytest.raises(UserError, match=message):
        plan(_args("--folder", str(tmp_path / "stack"), *argv), environ=environ)
    assert not (tmp_path / "stack").exists()


def test_server_auth_file_must_hold_user_and_password(tmp_path: Path) -> None:
    """An auth file without ``USER:PASSWORD`` is refused, saying what it must hold."""
    from study.server import admin_credentials
    from trainables.errors import UserError

    bad = tmp_path / "admin.txt"
    bad.write_text("just-a-password-without-user\n")
    with pytest.raises(UserError, match="one line 'USER:PASSWORD'"):
        admin_credentials(str(bad), {})
    ini = tmp_path / "basic_auth.ini"
    ini.write_text("[mlflow]\nadmin_username = boss\nadmin_password = a-long-enough-pw\n")
    admin = admin_credentials(str(ini), {})
    assert admin is not None and (admin.username, admin.config) == ("boss", ini.resolve())


# --- the basic-auth user store on PostgreSQL, and study server --postgres DIR ------------
def test_server_plan_keeps_the_user_store_password_out_of_the_ini(tmp_path: Path) -> None:
    """A password in --auth-database-uri goes to the server's PGPASSWORD; basic_auth.ini
    names the database without it; a different password than the store's is refused."""
    from study.server import plan
    from trainables.errors import UserError

    folder = tmp_path / "stack"
    auth = "postgresql://users:auth-pw-12345@db.internal/mlflow_users?sslmode=require"
    argv = ("--folder", str(folder), "--auth", "--auth-database-uri", auth)
    p = plan(_args(*argv), environ={"MLFLOW_TRACKING_PASSWORD": "a" * 16})
    assert p.env["PGPASSWORD"] == "auth-pw-12345"
    assert "auth-pw-12345" not in " ".join(p.cmd + p.lines)
    p.prepare()
    ini = (folder / "basic_auth.ini").read_text()
    assert "auth-pw-12345" not in ini
    assert "database_uri = postgresql://users@db.internal/mlflow_users?sslmode=require\n" in ini
    with pytest.raises(UserError, match="--backend-store-uri and --auth-database-uri") as caught:
        plan(
            _args(*argv, "--backend-store-uri", "postgresql://m:other-pw@db.internal/mlflow"),
            environ={"MLFLOW_TRACKING_PASSWORD": "a" * 16},
        )
    assert "other-pw" not in str(caught.value) and "auth-pw" not in str(caught.value)


def test_server_plan_postgres_dir_builds_the_store_and_says_where_the_password_is(
    tmp_path: Path,
) -> None:
    """--postgres DIR: the store is the cluster's database mlflow on 127.0.0.1, a generated
    password (to be written to DIR/password) or PGPASSWORD's, never shown; the Optuna URI
    printed without it; nothing created by the plan; --backend-store-uri with it refused."""
    from study.server import plan
    from trainables.errors import UserError

    pg = tmp_path / "pg"
    argv = ("--folder", str(tmp_path / "stack"), "--postgres", str(pg), "--postgres-port", "6543")
    p = plan(_args(*argv), environ={})
    assert p.database is not None and p.password_file == pg / "password"
    assert p.backend == "postgresql://study@127.0.0.1:6543/mlflow"
    assert p.env["PGPASSWORD"] == p.database.password and len(p.database.password) >= 24
    shown = "\n".join(p.cmd + p.lines)
    assert p.database.password not in shown
    assert "--optuna-storage postgresql://study@127.0.0.1:6543/optuna" in shown
    assert f"password generated into {pg / 'password'} (mode 600)" in shown
    assert not pg.exists()

    given = plan(_args(*argv), environ={"PGPASSWORD": "from-the-environment"})
    assert given.database is not None and given.password_file is None
    assert given.env["PGPASSWORD"] == "from-the-environment"
    assert "password from PGPASSWORD" in "\n".join(given.lines)
    with pytest.raises(UserError, match="give one of them"):
        plan(_args(*argv, "--backend-store-uri", "postgresql://u@h/db"), environ={})


def test_postgres_dir_without_the_server_programs_says_what_to_install(tmp_path: Path) -> None:
    from study.server import require_pg_bin
    from trainables.errors import UserError

    with pytest.raises(UserError, match="apt-get install postgresql"):
        require_pg_bin(lib=tmp_path, path=str(tmp_path))


@slow
def test_study_server_user_store_on_postgres_without_its_password_in_the_ini(
    tmp_path: Path, postgres: Postgres
) -> None:
    """--auth-database-uri postgresql://user:PW@…: basic_auth.ini has no PW, the server
    (PW in its PGPASSWORD) keeps its users in PostgreSQL: 401 without credentials, 200
    with the admin's; PW never printed."""
    folder = tmp_path / "stack"
    postgres.create_database("auth_users")
    port = free_port()
    user, password = "team-admin", "pw-" + uuid.uuid4().hex
    server = StudyServer(
        ["--folder", str(folder), "--port", str(port), "--workers", "1", "--auth",
         "--auth-database-uri", postgres.url("auth_users")],
        _server_env(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password),
        folder,
    )  # fmt: skip
    try:
        server.wait_ready()
        ini = (folder / "basic_auth.ini").read_text()
        assert postgres.password not in ini
        assert f"database_uri = {postgres.url('auth_users', password=False)}\n" in ini
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search) == 401
        assert _status(search, (user, password)) == 200
        assert user in postgres.psql("SELECT username FROM users", db="auth_users")
    finally:
        code = server.stop()
    assert code == 0
    assert postgres.password not in server.output()


@slow
def test_study_server_postgres_dir_keeps_the_runs_across_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """study server --postgres DIR: a cluster made in DIR with a generated password
    (DIR/password, mode 600, never printed) holds a logged run and an Optuna study;
    SIGTERM stops MLflow and PostgreSQL (both ports free); a restart on DIR serves the run."""
    import tempfile

    import optuna
    from mlflow.tracking import MlflowClient
    from servers import pg_bin

    if pg_bin() is None:
        pytest.skip("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    base = Path(tempfile.mkdtemp(prefix="study-served-pg-"))
    base.chmod(0o711)  # as root, PostgreSQL runs as another user, who must pass through
    pg, folder = base / "pg", tmp_path / "stack"
    port, pg_port = free_port(), free_port()
    argv = ["--folder", str(folder), "--port", str(port), "--workers", "1",
            "--postgres", str(pg), "--postgres-port", str(pg_port)]  # fmt: skip
    try:
        server = StudyServer(argv, _server_env(), folder)
        try:
            uri = server.wait_ready()
            password = (pg / "password").read_text().strip()
            assert (pg / "password").stat().st_mode & 0o777 == 0o600
            output = server.output()
            assert f"password generated into {pg / 'password'}" in output
            optuna_url = f"postgresql://study@127.0.0.1:{pg_port}/optuna"
            assert f"study run --optuna-storage {optuna_url} " in output
            run_id, _ = _log_one_run(uri, tmp_path)
            monkeypatch.setenv("PGPASSWORD", password)
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.create_study(study_name="served", storage=optuna_url)
            study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
        finally:
            code = server.stop()
        assert code == 0
        assert not _listening(port) and not _listening(pg_port)  # both stopped
        assert password not in server.output()

        server.log.unlink()
        again = StudyServer(argv, _server_env(), folder)
        try:
            uri = again.wait_ready()
            assert f"password in {pg / 'password'}" in again.output()
            run = MlflowClient(uri).get_run(run_id)
            assert run.data.metrics["val_acc"] == 0.75
            assert len(optuna.load_study(study_name="served", storage=optuna_url).trials) == 2
        finally:
            code = again.stop()
        assert code == 0
        assert not _listening(pg_port)
        assert password not in again.output()
    finally:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
