"""The study storage as a path or a URI: the study's files and Tune state on an S3 server.

S3 tests run against moto's standalone server, started here on 127.0.0.1 (slow);
``tests/servers.py`` has the shared fixture the lead merges in.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from study import preflight, storage
from study.spec import SPEC_FILE, StudySpec
from trainables.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "energy-study-test"
AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- paths and URIs (no server) ---------------------------------------------------------


def test_join_and_normalize_keep_a_uri_a_uri(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("s3://bucket/studies/") == "s3://bucket/studies"
    assert storage.normalize("rel") == str(tmp_path / "rel")
    assert storage.normalize(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert storage.join("s3://b/p", "n", "study.yaml") == "s3://b/p/n/study.yaml"
    assert (
        storage.join("s3://b/p?endpoint_override=h:9000&scheme=http", "n", "tune")
        == "s3://b/p/n/tune?endpoint_override=h:9000&scheme=http"
    )
    assert storage.join("/a/b/", "n") == "/a/b/n"


def test_a_uri_storage_is_never_made_a_local_folder(tmp_path: Path, monkeypatch) -> None:
    """The bug of issue 11: `--storage s3://bucket/x` became `./s3:/bucket/x`."""
    monkeypatch.chdir(tmp_path)
    spec = StudySpec(name="n", storage="s3://bucket/studies/")
    assert spec.storage == "s3://bucket/studies" and spec.remote
    assert spec.location() == "s3://bucket/studies/n"
    assert spec.location("tune") == "s3://bucket/studies/n/tune"
    assert "s3:" not in spec.folder.parts and spec.folder.is_absolute()
    assert not spec.folder.is_relative_to(tmp_path)
    local = StudySpec(name="n", storage="studies")
    assert not local.remote and local.location("tune") == str(tmp_path / "studies" / "n" / "tune")
    assert local.folder == tmp_path / "studies" / "n"


def test_local_storage_round_trip_and_study_listing(tmp_path: Path) -> None:
    root = str(tmp_path / "studies")
    assert storage.subfolders_with(root, SPEC_FILE) == []  # no folder yet: none
    StudySpec(name="one", storage=root).save()
    StudySpec(name="two", storage=root).save()
    (tmp_path / "studies" / "not-a-study").mkdir()
    assert storage.subfolders_with(root, SPEC_FILE) == ["one", "two"]
    with pytest.raises(ConfigError, match="studies there: one, two"):
        StudySpec.load(root, "three")
    assert [p.name for p in (tmp_path / "studies" / "one").iterdir()] == [SPEC_FILE]  # no tmp
    with pytest.raises(ConfigError, match="already exists"):
        StudySpec(name="one", storage=root).check_new()


def test_a_study_read_from_a_mount_elsewhere_keeps_that_storage(tmp_path: Path) -> None:
    """A shared mount seen at another path on this machine: the spec follows the path
    it was read from, not the one it was written at."""
    StudySpec(name="moved", storage=str(tmp_path / "a")).save()
    (tmp_path / "a").rename(tmp_path / "b")
    spec = StudySpec.load(str(tmp_path / "b"), "moved")
    assert spec.storage == str(tmp_path / "b")
    assert spec.location(SPEC_FILE) == str(tmp_path / "b" / "moved" / SPEC_FILE)


def test_database_preflight_names_what_it_could_not_reach() -> None:
    port = _free_port()  # nothing listens there
    start = time.monotonic()
    with pytest.raises(UserError, match=f"127.0.0.1:{port}") as caught:
        preflight.check_database(f"postgresql://u@127.0.0.1:{port}/db", 5, "the Optuna storage")
    assert "the Optuna storage" in str(caught.value) and time.monotonic() - start < 30
    with pytest.raises(UserError, match="MLflow tracking store"):
        preflight.check_tracking(f"postgresql+psycopg2://u@127.0.0.1:{port}/db", 5)
    with socket.socket() as server:  # a listening server passes
        server.bind(("127.0.0.1", 0))
        server.listen()
        preflight.check_database(f"postgresql://u@127.0.0.1:{server.getsockname()[1]}/db", 5)
    preflight.check_database(None)


# --- an S3 server (moto) ------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; the AWS variables (endpoint included) set in this
    process, so that pyarrow, Ray and subprocesses reach it; yields the endpoint URL."""
    boto3 = pytest.importorskip("boto3")
    moto_server = Path(sys.executable).with_name("moto_server")
    if not moto_server.exists():
        pytest.skip("moto[server] is not installed (pip install 'moto[server]')")
    port = _free_port()
    proc = subprocess.Popen(
        [str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*AWS, "AWS_ENDPOINT_URL"]}
    os.environ.update(AWS, AWS_ENDPOINT_URL=endpoint)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _keys(endpoint: str, prefix: str = "") -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.mark.slow
@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"])
def test_pyarrow_and_so_ray_find_the_endpoint_in_either_variable(
    s3_server: str, variable: str, monkeypatch
) -> None:
    """What study/storage.py's docstring says: pyarrow (which Ray's storage_path goes
    through) honours both variables; without either it would go to AWS."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv(variable, s3_server)
    from ray.train._internal.storage import get_fs_and_path

    fs, path = get_fs_and_path(f"s3://{BUCKET}/endpoint-{variable}")  # Ray's own resolution
    with fs.open_output_stream(f"{path}/x.txt") as stream:
        stream.write(b"ok")
    assert _keys(s3_server, f"endpoint-{variable}/") == [f"endpoint-{variable}/x.txt"]


@pytest.mark.slow
def test_s3_round_trip_spec_save_load_and_check_new(s3_server: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = f"s3://{BUCKET}/unit"
    assert storage.subfolders_with(root, SPEC_FILE) == []
    spec = StudySpec(name="remote", storage=root, tracking_uri="sqlite:///m.db")
    assert spec.save() == f"{root}/remote/{SPEC_FILE}"
    assert _keys(s3_server, "unit/") == [f"unit/remote/{SPEC_FILE}"]
    assert storage.subfolders_with(root, SPEC_FILE) == ["remote"]
    again = StudySpec.load(root, "remote")
    assert again.to_dict() == spec.to_dict()
    with pytest.raises(ConfigError, match="already exists"):
        again.check_new()
    with pytest.raises(ConfigError, match="studies there: remote"):
        StudySpec.load(root, "other")
    assert list(tmp_path.iterdir()) == []  # nothing local, no ./s3: folder


@pytest.mark.slow
def test_storage_preflight_on_s3(s3_server: str, monkeypatch) -> None:
    """A probe object is written, read back and deleted; a missing bucket, a closed port
    and a server that never answers fail in one paragraph naming what, within bounds."""
    preflight.check_storage(f"s3://{BUCKET}/probe", 10)
    # the probe is gone; pyarrow keeps the prefix as an empty "folder" marker
    assert _keys(s3_server, "probe") in ([], ["probe/"])

    with pytest.raises(UserError, match="no-such-bucket") as caught:
        preflight.check_storage("s3://no-such-bucket/studies/x", 10)
    assert "bucket" in str(caught.value).lower() and s3_server in str(caught.value)

    closed = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    start = time.monotonic()
    with pytest.raises(UserError, match=f"endpoint {closed}"):
        preflight.check_storage(f"s3://{BUCKET}/studies/x", 25)
    assert time.monotonic() - start < 30

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.monotonic()
        with pytest.raises(UserError, match="no answer within 3 s"):
            preflight.check_storage(f"s3://{BUCKET}/studies/x", 3)
        assert time.monotonic() - start < 30


@pytest.mark.slow
def test_an_unreachable_storage_fails_the_run_before_anything_is_created(
    s3_server: str, tmp_path, monkeypatch, capsys
) -> None:
    from study import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["run", "--space", "smoke", "--name", "never", "--trials", "1", "--epochs", "1",
            "--storage", f"s3://{BUCKET}/studies", "--tracking-uri", tracking,
            "--connect-timeout", "10"]  # fmt: skip
    start = time.monotonic()
    assert cli.main(argv) == 2
    assert time.monotonic() - start < 30
    err = " ".join(capsys.readouterr().err.split())  # one paragraph, wrapped
    assert "could not be reached" in err and "s3://energy-study-test/studies (endpoint" in err
    assert list(tmp_path.iterdir()) == []  # no MLflow store, no local folder


#: A digits trial of a few seconds (tests/test_study.py's BASE, one epoch).
BASE = {"dataset": "digits", "model": "small_cnn", "eps": 0.1, "step_size": 0.025,
        "attack_steps": 2, "val_attack_steps": 2, "eval_steps": 2, "eval_step_size": 0.025,
        "batch_size": 64, "autoattack": False, "train_subset": 256, "val_subset": 64,
        "test_subset": 64}  # fmt: skip


def _study(cwd: Path, *argv: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``python -m study ARGV`` in ``cwd`` (its own local Ray cluster, this environment)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "study", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_a_study_on_s3_is_resumed_and_exported_from_another_folder(
    s3_server: str, tmp_path: Path
) -> None:
    """`study run --storage s3://…` keeps study.yaml and the Tune state in the bucket (no
    local `s3:` folder); `study resume` and `study export` in another working folder,
    given the same --storage and --tracking-uri, find the study there."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    where = ["--storage", f"s3://{BUCKET}/studies", "--tracking-uri", tracking]
    sets = [arg for k, v in BASE.items() for arg in ("--set", f"{k}={v}")]
    ran = _study(first, "run", "--space", "smoke", "--name", "s3study", "--trials", "2",
                 "--epochs", "1", "--no-asha", "--finalists", "0", "--backend", "direct",
                 *where, *sets)  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "study s3study: 2 finished" in ran.stdout
    keys = _keys(s3_server, "studies/s3study/")
    assert f"studies/s3study/{SPEC_FILE}" in keys and "studies/s3study/outcome.yaml" in keys
    assert any(k.startswith("studies/s3study/tune/experiment_state-") for k in keys), keys
    assert "studies/s3study/tune/tuner.pkl" in keys
    assert not (first / "s3:").exists() and not (first / "studies").exists()

    # the study has ended: resume from elsewhere finds it and says so
    done = _study(second, "resume", "s3study", *where)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "has ended already" in done.stdout and "2 finished" in done.stdout

    # a driver that died after Tune's last save and before the end: Tune restores
    # from the bucket, runs nothing again, and the study ends
    import boto3

    boto3.client("s3", endpoint_url=s3_server).delete_object(
        Bucket=BUCKET, Key="studies/s3study/outcome.yaml"
    )
    resumed = _study(second, "resume", "s3study", *where)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming study s3study from s3://" in resumed.stdout
    assert "study s3study: 2 finished" in resumed.stdout
    trials = yaml.safe_load(storage.read_text(f"s3://{BUCKET}/studies/s3study/outcome.yaml"))[
        "trials"
    ]
    first_ids = sorted(t["trial_id"] for t in trials)
    assert len(first_ids) == 2

    from reports.vocabulary import TAG_TRIAL
    from study.export import trial_runs
    from study.tracking import MlflowTracker

    runs = trial_runs(MlflowTracker(tracking, "s3study"), "s3study")
    assert sorted(r.data.tags[TAG_TRIAL] for r in runs) == first_ids  # none rerun

    exported = _study(second, "export", "s3study", *where, "-o", "best.yaml")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (second / "best.yaml").is_file()
    assert not (second / "s3:").exists() and not (second / "studies").exists()


def test_within_bounds_a_call_that_hangs() -> None:
    never = threading.Event()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="waiting"):
        storage.within(0.5, "waiting", never.wait)
    assert time.monotonic() - start < 5
    assert storage.within(5, "adding", lambda: 1 + 1) == 2
    with pytest.raises(ZeroDivisionError):
        storage.within(5, "dividing", lambda: 1 / 0)


@pytest.mark.parametrize("option", ["--tracking-uri", "--optuna-storage"])
def test_an_unreachable_postgresql_fails_the_run_before_anything_is_created(
    option: str, tmp_path, monkeypatch, capsys
) -> None:
    from study import cli

    monkeypatch.chdir(tmp_path)
    url = f"postgresql://u@127.0.0.1:{_free_port()}/db"
    argv = ["run", "--space", "smoke", "--name", "pg", "--trials", "1", "--epochs", "1",
            "--storage", str(tmp_path / "studies"), "--connect-timeout", "5",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", option, url]  # fmt: skip
    start = time.monotonic()
    assert cli.main(argv) == 2
    assert time.monotonic() - start < 30
    err = " ".join(capsys.readouterr().err.split())
    assert "could not be reached" in err and url in err
    assert list(tmp_path.iterdir()) == []  # no study folder, no MLflow store


def test_study_train_workers_refuses_a_uri_storage(tmp_path, monkeypatch, capsys) -> None:
    from study import cli

    monkeypatch.chdir(tmp_path)
    argv = ["train", "--workers", "2", "--storage", "s3://bucket/studies", "--no-mlflow"]
    assert cli.main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "s3://bucket/studies is a URI" in err
    assert list(tmp_path.iterdir()) == []
