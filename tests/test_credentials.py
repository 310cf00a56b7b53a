"""Passwords in URIs move to the environment; no record made from a spec carries them."""

from __future__ import annotations

import pytest
import yaml

from study.credentials import (
    applied,
    check_one_password,
    redact,
    split_credentials,
    take_credentials,
    taken_env,
)
from study.spec import StudySpec
from trainables.errors import ConfigError

#: every variable the module may set, cleared around each test
VARIABLES = (
    "PGPASSWORD",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MYSQL_PWD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("uri", "clean", "env"),
    [
        (
            "postgresql://alice:s3cr%40t@db.example:5433/mlflow",
            "postgresql://alice@db.example:5433/mlflow",
            {"PGPASSWORD": "s3cr@t"},
        ),
        (
            "postgresql+psycopg2://alice:pw@127.0.0.1/optuna?sslmode=disable",
            "postgresql+psycopg2://alice@127.0.0.1/optuna?sslmode=disable",
            {"PGPASSWORD": "pw"},
        ),
        (
            "http://bob:hunter2@mlflow.example:5000",
            "http://mlflow.example:5000",
            {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "hunter2"},
        ),
        (
            "https://bob:pw@[::1]:8443/prefix",
            "https://[::1]:8443/prefix",
            {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "pw"},
        ),
        ("mysql://carol:pw@db/optuna", "mysql://carol@db/optuna", {"MYSQL_PWD": "pw"}),
        (
            "s3://AKIA:secretkey@bucket/studies",
            "s3://bucket/studies",
            {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "secretkey"},
        ),
    ],
)
def test_split_moves_the_password_to_the_clients_variable(
    uri: str, clean: str, env: dict[str, str]
) -> None:
    assert split_credentials(uri) == (clean, env)


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:///mlflow.db",
        "postgresql://alice@db/mlflow",
        "http://127.0.0.1:5000",
        "/local/folder",
        "s3://bucket/prefix?endpoint_override=127.0.0.1:9000",
    ],
)
def test_a_uri_without_password_is_left_alone(uri: str) -> None:
    assert split_credentials(uri) == (uri, {})
    assert take_credentials(uri) == uri


def test_a_password_of_an_unknown_scheme_is_refused_without_showing_it() -> None:
    with pytest.raises(ConfigError) as caught:
        split_credentials("ftp://dave:topsecret@files.example/x")
    assert "topsecret" not in str(caught.value)
    assert "ftp://dave:***@files.example/x" in str(caught.value)


def test_take_sets_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("PGPASSWORD", "old")
    assert take_credentials("postgresql://u:new@h/db") == "postgresql://u@h/db"
    assert os.environ["PGPASSWORD"] == "new"  # the password given for this command wins


def test_two_passwords_for_one_variable_are_refused() -> None:
    check_one_password("postgresql://u:pw@a/db", "postgresql://u:pw@a/optuna")  # same: fine
    with pytest.raises(ConfigError, match="PGPASSWORD") as caught:
        check_one_password("postgresql://u:one@a/db", "postgresql://u:two@b/optuna")
    assert ":one@" not in str(caught.value)
    assert ":two@" not in str(caught.value)
    assert str(caught.value).startswith("--tracking-uri and --optuna-storage carry different")
    # a password in the query counts the same; the labels name the options given
    with pytest.raises(ConfigError, match="^--backend-store-uri and --auth-database-uri") as c2:
        check_one_password(
            "postgresql://u@a/db?password=pw-one",
            "postgresql://u:pw-two@b/auth",
            labels=("--backend-store-uri", "--auth-database-uri"),
        )
    assert "pw-one" not in str(c2.value) and "pw-two" not in str(c2.value)


def test_redact_hides_every_password_in_free_text() -> None:
    text = (
        "could not reach postgresql://u:p%40ss@h:5432/db; tried http://me:pw@x:5000 "
        "and s3://bucket/key@v and http://host:5000/a@b and mysql://u:p@ss@h/db"
    )
    assert redact(text) == (
        "could not reach postgresql://u:***@h:5432/db; tried http://me:***@x:5000 "
        "and s3://bucket/key@v and http://host:5000/a@b and mysql://u:***@h/db"
    )


def test_a_spec_keeps_no_password_anywhere(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import pickle

    spec = StudySpec(
        name="secret",
        space="smoke",
        storage=str(tmp_path / "studies"),
        tracking_uri="postgresql://alice:Pa55word@127.0.0.1:5432/mlflow",
        optuna_storage="postgresql://alice:Pa55word@127.0.0.1:5432/optuna",
    )
    assert spec.tracking_uri == "postgresql://alice@127.0.0.1:5432/mlflow"
    assert spec.optuna_storage == "postgresql://alice@127.0.0.1:5432/optuna"
    assert os.environ["PGPASSWORD"] == "Pa55word"
    saved = spec.save()
    assert "Pa55word" not in open(saved).read()
    assert b"Pa55word" not in pickle.dumps(spec)
    again = StudySpec.load(spec.storage, "secret")
    assert yaml.safe_dump(again.to_dict()) == yaml.safe_dump(spec.to_dict())


def test_a_spec_refuses_two_passwords_for_pgpassword(tmp_path) -> None:
    with pytest.raises(ConfigError, match="~/.pgpass"):
        StudySpec(
            name="two",
            storage=str(tmp_path),
            tracking_uri="postgresql://a:one@h1/mlflow",
            optuna_storage="postgresql://a:two@h2/optuna",
        )


@pytest.mark.parametrize(
    ("uri", "clean", "env"),
    [
        (
            "postgresql://alice@db:5432/mlflow?password=s3cr%26t&sslmode=require",
            "postgresql://alice@db:5432/mlflow?sslmode=require",
            {"PGPASSWORD": "s3cr&t"},
        ),
        (
            "postgresql+psycopg2://alice@db/optuna?sslmode=disable&PASSWORD=pw&application_name=x",
            "postgresql+psycopg2://alice@db/optuna?sslmode=disable&application_name=x",
            {"PGPASSWORD": "pw"},
        ),
        (  # the same password twice in one URI: one variable, both places cleaned
            "postgresql://alice:pw@db/mlflow?password=pw",
            "postgresql://alice@db/mlflow",
            {"PGPASSWORD": "pw"},
        ),
        ("mysql://carol@db/optuna?password=pw", "mysql://carol@db/optuna", {"MYSQL_PWD": "pw"}),
    ],
)
def test_a_password_in_the_query_moves_like_one_in_the_user_part(
    uri: str, clean: str, env: dict[str, str]
) -> None:
    import os

    assert split_credentials(uri) == (clean, env)
    assert take_credentials(uri) == clean
    assert {name: os.environ[name] for name in env} == env


def test_a_query_password_is_refused_where_it_has_no_variable_or_differs() -> None:
    with pytest.raises(ConfigError) as caught:
        split_credentials("sqlite:///mlflow.db?password=topsecret")
    assert "topsecret" not in str(caught.value) and "password=***" in str(caught.value)
    with pytest.raises(ConfigError, match="two different passwords") as caught:
        split_credentials("postgresql://u:pw-first@h/db?password=pw-second")
    assert "pw-first" not in str(caught.value) and "pw-second" not in str(caught.value)


def test_redact_hides_query_passwords() -> None:
    text = (
        "cannot connect to postgresql://u@h/db?password=p%40ss&sslmode=require "
        "nor mysql://u@h/db?sslmode=x&Password=hunter2; ?passwords=fine stays"
    )
    assert redact(text) == (
        "cannot connect to postgresql://u@h/db?password=***&sslmode=require "
        "nor mysql://u@h/db?sslmode=x&Password=***; ?passwords=fine stays"
    )


def test_taken_env_holds_what_uris_gave_not_what_the_user_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only variables a URI filled travel to other machines, for the schemes asked."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "users-own-key")  # set by the user: stays home
    take_credentials("http://bob:hunter2@mlflow.example:5000")
    take_credentials("postgresql://u:pg-pw@db/optuna")
    http = taken_env(["http://mlflow.example:5000", "s3://bucket/prefix"])
    assert http == {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "hunter2"}
    assert taken_env(["postgresql://u@db/optuna"]) == {"PGPASSWORD": "pg-pw"}
    assert taken_env(["sqlite:///x.db", "/a/folder"]) == {}


def test_applied_sets_variables_for_a_block_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    monkeypatch.setenv("PGPASSWORD", "before")
    with applied({"PGPASSWORD": "during", "MYSQL_PWD": "during-too"}):
        assert (os.environ["PGPASSWORD"], os.environ["MYSQL_PWD"]) == ("during", "during-too")
    assert os.environ["PGPASSWORD"] == "before" and "MYSQL_PWD" not in os.environ
    with pytest.raises(RuntimeError), applied({"MYSQL_PWD": "x"}):
        raise RuntimeError("a failing check")
    assert "MYSQL_PWD" not in os.environ


# --- end to end: a study on PostgreSQL with the password in the URIs (slow) ---------------

from servers import postgres_fixture  # noqa: E402, F401 - the `postgres` fixture

#: A digits trial of a few seconds.
BASE = {"dataset": "digits", "model": "small_cnn", "eps": 0.1, "step_size": 0.025,
        "attack_steps": 2, "val_attack_steps": 2, "eval_steps": 2, "eval_step_size": 0.025,
        "batch_size": 64, "autoattack": False, "train_subset": 256, "val_subset": 64,
        "test_subset": 64}  # fmt: skip


def _files_with(root, secret: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``secret``."""
    return [str(p) for p in sorted(root.rglob("*")) if p.is_file() and secret in p.read_bytes()]


@pytest.mark.slow
def test_a_password_in_the_uris_reaches_no_record_and_resume_takes_it_from_the_env(
    postgres, tmp_path
) -> None:
    """`study run --tracking-uri postgresql://user:PW@… --optuna-storage postgresql://user:PW@…`:
    PW is nowhere in the PostgreSQL dump, the MLflow artifacts, the study's storage
    (study.yaml, Tune state), the report or the console; `study resume` works with
    PGPASSWORD in the environment and the URIs as study.yaml keeps them."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    secret = postgres.password
    tracking = postgres.create_database("cred_mlflow")  # URLs with the password
    optuna_url = postgres.create_database("cred_optuna")
    assert secret in tracking and secret in optuna_url
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES and k != "PGUSER"}
    env["PYTHONPATH"] = str(root)

    def study(*argv: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "study", *argv],
            cwd=work,
            env={**env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=500,
        )

    storage = str(tmp_path / "studies")
    sets = [arg for k, v in BASE.items() for arg in ("--set", f"{k}={v}")]
    ran = study("run", "--space", "smoke", "--name", "pgsecret", "--trials", "2", "--epochs",
                "1", "--no-asha", "--finalists", "0", "--backend", "direct",
                "--tracking-uri", tracking, "--optuna-storage", optuna_url,
                "--storage", storage, *sets)  # fmt: skip
    console = ran.stdout + ran.stderr
    assert ran.returncode == 0, console[-4000:]
    assert "study pgsecret: 2 finished" in ran.stdout
    assert secret not in console

    clean = postgres.url("cred_mlflow", password=False)
    saved = yaml.safe_load((tmp_path / "studies" / "pgsecret" / "study.yaml").read_text())
    assert saved["tracking_uri"] == clean
    assert saved["optuna_storage"] == postgres.url("cred_optuna", password=False)

    # resume from the password-less URIs, the password in the environment: Tune
    # restores from storage, MLflow and Optuna connect to PostgreSQL again
    (tmp_path / "studies" / "pgsecret" / "outcome.yaml").unlink()
    no_password = study("resume", "pgsecret", "--storage", storage)
    assert no_password.returncode != 0  # PostgreSQL refuses: the password is nowhere
    assert secret not in no_password.stdout + no_password.stderr
    resumed = study("resume", "pgsecret", "--storage", storage, extra={"PGPASSWORD": secret})
    console += resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "resuming study pgsecret" in resumed.stdout and "2 finished" in resumed.stdout

    report = study("report", "pgsecret", "--tracking-uri", clean, "-o", str(work / "report"),
                   extra={"PGPASSWORD": secret})  # fmt: skip
    console += report.stdout + report.stderr
    assert report.returncode == 0, (report.stdout + report.stderr)[-4000:]
    html = list((work / "report").rglob("*.html"))
    assert html and "pgsecret" in html[0].read_text()

    assert secret not in console
    for db in ("cred_mlflow", "cred_optuna"):
        dump = postgres.dump(db)
        assert "pgsecret" in dump, db  # the study's records are there...
        assert secret not in dump, db  # ...the password is not
    # the study's storage (study.yaml, Tune state, trial outputs), the MLflow artifacts
    # (below the working folder) and the report
    assert (work / "mlruns").is_dir() or (work / "mlartifacts").is_dir() or any(work.rglob("*.pt"))
    assert _files_with(tmp_path, secret.encode()) == []
