"""The ``study`` command line: shared options, the study built from the arguments, exit
codes, and ``study train --workers N`` with ``--resume`` and ``-o`` (slow: real Ray)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import yaml

from study import cli
from study.runner import StudyOutcome, TrialOutcome
from study.spec import StudySpec
from trainables.errors import ConfigError

SHARED = {  # sub-command: the shared options it takes
    "run": ["--address", "--set", "--metric", "--mode", "--tracking-uri", "--storage"],
    "resume": ["--address", "--tracking-uri", "--storage"],
    "extend": ["--address", "--tracking-uri", "--storage"],
    "replicate": ["--address", "--tracking-uri", "--storage"],
    "export": ["--metric", "--mode", "--tracking-uri", "--storage"],
    "list": ["--tracking-uri", "--storage"],
    "show": ["--tracking-uri", "--storage"],
    "report": ["--tracking-uri", "--storage"],
    "ui": ["--tracking-uri", "--storage"],
    "generate": ["--address", "--set", "--metric", "--mode", "--tracking-uri", "--storage"],
    "train": ["--address", "--set", "--tracking-uri", "--storage"],
    "doctor": ["--address", "--tracking-uri", "--storage"],
    "server": [],
}
#: The values each shared option is given below, as the parser hands them on.
GIVEN = {
    "--address": ("address", "ray://head:10001"),
    "--set": ("set", ["a=1"]),
    "--metric": ("metric", ["val/pgd_acc"]),
    "--mode": ("mode", ["max"]),
    "--tracking-uri": ("tracking_uri", "sqlite:///x.db"),
    "--storage": ("storage", "elsewhere"),
}


def _sub_parsers() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in cli.build_parser()._actions if a.choices and "run" in a.choices]
    return dict(action.choices)


def test_every_sub_command_lists_its_shared_options_once_and_parses_them() -> None:
    parsers = _sub_parsers()
    assert set(parsers) == set(SHARED)
    for command, options in SHARED.items():
        text = parsers[command].format_help()
        for option in options:
            assert text.count(f"  {option} ") == 1, (command, option, text)
        named = ("resume", "extend", "replicate", "export", "show", "report")
        argv = [command, *(["name"] if command in named else [])]
        argv += ["--from", "RUN"] if command == "generate" else []
        argv += ["--trials", "1"] if command == "extend" else []
        for option in options:
            value = GIVEN[option][1]
            argv += [option, value[0] if isinstance(value, list) else value]
        args = cli.build_parser().parse_args(argv)
        for option in options:
            assert getattr(args, GIVEN[option][0]) == GIVEN[option][1], (command, option)


def test_run_options_default_to_the_study_spec() -> None:
    spec = cli._spec_from_args(cli.build_parser().parse_args(["run"]))
    default = StudySpec(name="x")
    for key in ("trials", "grace_period", "asha", "seed", "finalists", "backend", "final_n"):
        assert getattr(spec, key) == getattr(default, key), key
    assert spec.epochs == cli.DEFAULT_EPOCHS and (spec.metrics, spec.modes) == (
        ["val/pgd_acc"],
        ["max"],
    )
    two = ["run", "--metric", "val/clean_acc", "--metric", "val/pgd_acc", "--mode", "min"]
    assert cli._spec_from_args(cli.build_parser().parse_args(two)).modes == ["min", "min"]


def test_run_set_merges_into_a_mapping_of_the_base_config_as_train_does(tmp_path) -> None:
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"weight_fn": "power", "weight_params": {"a": 1, "b": 2}}))
    argv = ["run", "--config", str(config), "--set", "weight_params.b=3"]
    spec = cli._spec_from_args(cli.build_parser().parse_args(argv))
    assert spec.base["weight_params"] == {"a": 1, "b": 3}


def test_resume_exits_1_like_run_when_no_trial_finished(tmp_path, monkeypatch, capsys) -> None:
    import study.runner

    spec = StudySpec(name="nothing", storage=str(tmp_path), tracking_uri="sqlite:///m.db")
    spec.save()
    failed = StudyOutcome(spec, [TrialOutcome("t1", "FAILED", {}, {}, "boom")], "parent")
    monkeypatch.setattr(study.runner, "can_resume", lambda spec: True)
    monkeypatch.setattr(cli, "_run_or_interrupted", lambda spec, **kw: failed)
    assert cli.main(["resume", "nothing", "--storage", str(tmp_path)]) == 1
    resumed = capsys.readouterr().out
    assert cli._finish(failed) == 1
    assert capsys.readouterr().out == resumed.split("\n", 1)[1]  # the same lines as run
    assert "failed: trial t1: boom" in resumed


#: A digits run of a few seconds (see tests/test_study.py).
TINY = {"dataset": "digits", "model": "small_cnn", "eps": 0.1, "step_size": 0.025,
        "attack_steps": 2, "val_attack_steps": 2, "eval_steps": 2, "eval_step_size": 0.025,
        "batch_size": 64, "train_subset": 256, "val_subset": 64, "test_subset": 64,
        "probe_n": 0, "autoattack": False, "epochs": 2}  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_train_on_ray_workers_resumes_and_writes_to_output(tmp_path) -> None:
    """``study train --workers 2 --resume CKPT -o OUT`` continues after the checkpoint's
    epoch and leaves the run's files in OUT, as the single-process path does."""
    from trainables.config import TrainConfig
    from trainables.loop import train
    from trainables.reporting import NullReporter

    class StopAfterEpoch1(NullReporter):
        def report(self, epoch: int, metrics: dict, checkpoint: Path | None) -> None:
            raise KeyboardInterrupt

    first = tmp_path / "first"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig.from_dict(TINY), reporter=StopAfterEpoch1(), output_dir=first)
    out = tmp_path / "out"
    code = cli.main(["train", "--workers", "2", "--resume", str(first / "checkpoints" / "last.pt"),
                     "-o", str(out), "--experiment", "ray-resume", "--no-progress",
                     "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                     "--storage", str(tmp_path / "studies")])  # fmt: skip
    assert code == 0
    epochs = [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert epochs == [2]  # epoch 1 came from the checkpoint, not trained again
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "final.json").is_file()


def test_a_space_study_section_with_null_epochs_or_quoted_counts(tmp_path) -> None:
    """``epochs: null`` in a space's study section gives the default study's epochs; a
    quoted count is a number; a count that is no number is a ConfigError, not a crash."""
    from search_spaces import space_path

    data = yaml.safe_load(space_path("smoke").read_text())
    data["study"].update(epochs=None, trials="3", grace_period="1")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(data))
    spec = cli._spec_from_args(cli.build_parser().parse_args(["run", "--space", str(space)]))
    assert (spec.epochs, spec.trials, spec.grace_period) == (cli.DEFAULT_EPOCHS, 3, 1)
    assert isinstance(spec, StudySpec)
    data["study"]["trials"] = "many"
    space.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="trials = 'many'"):
        cli._spec_from_args(cli.build_parser().parse_args(["run", "--space", str(space)]))


def test_working_dir_ships_the_checkout_without_environments_or_outputs(tmp_path) -> None:
    """``--working-dir DIR`` on run/resume/generate becomes Ray's runtime_env
    ``working_dir`` (absolute) with what nodes never need left out."""
    from study.runner import WORKING_DIR_EXCLUDES, runtime_env
    from trainables.errors import UserError

    for command in (["run"], ["resume", "n"], ["generate", "--from", "RUN"]):
        args = cli.build_parser().parse_args([*command, "--working-dir", "code"])
        assert args.working_dir == "code", command
    assert runtime_env({"A": "1"}) == {"env_vars": {"A": "1"}}  # no option: nothing shipped
    env = runtime_env({"A": "1"}, str(tmp_path))
    assert env["working_dir"] == str(tmp_path) and env["env_vars"] == {"A": "1"}
    assert {".venv/", ".git/", "mlruns/", "studies/", "*.pt"} <= set(env["excludes"])
    assert env["excludes"] == WORKING_DIR_EXCLUDES
    with pytest.raises(UserError, match="no such folder"):
        runtime_env({}, str(tmp_path / "missing"))


@pytest.mark.slow
def test_working_dir_reaches_the_workers_on_a_real_cluster(tmp_path) -> None:
    """A Ray task started by ``init_ray(..., working_dir=DIR)`` runs in a copy of DIR:
    the code is there, the excluded folders and files are not."""
    import subprocess
    import sys

    code = tmp_path / "checkout"
    for name in ("pkg_marker.py", ".venv/lib.py", "studies/s/study.yaml", "mlruns/x", "w.pt"):
        (code / name).parent.mkdir(parents=True, exist_ok=True)
        (code / name).write_text("x = 1\n")
    script = (
        "import os, ray\n"
        "from study.runner import init_ray\n"
        f"init_ray(None, working_dir={str(code)!r})\n"
        "@ray.remote(num_cpus=0)\n"
        "def look():\n"
        "    import pkg_marker\n"
        "    return sorted(os.listdir('.')), os.getcwd(), pkg_marker.x\n"
        "print(ray.get(look.remote()))\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import ast

    listing, cwd, value = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert listing == ["pkg_marker.py"] and value == 1
    assert cwd != str(code)  # a copy unpacked by Ray, not the folder itself


# --- passwords in --tracking-uri and --optuna-storage ------------------------------------
_PG_VARIABLES = ("PGPASSWORD", "MLFLOW_TRACKING_URI")


def test_run_refuses_two_postgres_passwords_as_a_spec_does(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Different passwords in --tracking-uri and --optuna-storage: exit 2, one paragraph
    naming both options and ~/.pgpass, no password shown or moved; StudySpec refuses the
    same pair with the same message."""
    for name in _PG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    tracking, optuna = "postgresql://a:first-pw@h1/mlflow", "postgresql://a:second-pw@h2/optuna"
    argv = ["run", "--storage", str(tmp_path), "--tracking-uri", tracking,
            "--optuna-storage", optuna]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("study run: error: --tracking-uri and --optuna-storage carry different")
    assert "~/.pgpass" in err and "same user and password" in err
    assert "first-pw" not in err and "second-pw" not in err
    assert "postgresql://a:***@h1/mlflow" in err.replace("\n", " ")
    assert "PGPASSWORD" not in os.environ  # refused before anything moved
    with pytest.raises(ConfigError) as caught:
        StudySpec(name="two", storage=str(tmp_path), tracking_uri=tracking, optuna_storage=optuna)
    flat = " ".join(err.split()).removeprefix("study run: error: ")
    assert " ".join(str(caught.value).split()) == flat


def test_run_takes_one_postgres_password_given_twice(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same password in both URIs is fine: both URIs lose it, PGPASSWORD holds it."""
    for name in _PG_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    argv = ["run", "--storage", str(tmp_path),
            "--tracking-uri", "postgresql://a:same-pw@h1/mlflow",
            "--optuna-storage", "postgresql://b@h2/optuna?password=same-pw"]  # fmt: skip
    spec = cli._spec_from_args(cli.build_parser().parse_args(argv))
    assert spec.tracking_uri == "postgresql://a@h1/mlflow"
    assert spec.optuna_storage == "postgresql://b@h2/optuna"
    assert os.environ["PGPASSWORD"] == "same-pw"
