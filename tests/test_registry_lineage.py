"""Model lineage in MLflow (study/registry.py): ``study export NAME --register MODEL`` and
``study train --config best.yaml --register MODEL`` on a real SQLite store with its model
registry (slow: three small trainings on the bundled digits)."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch
import yaml

from reports.vocabulary import (
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    TAG_MODEL_RUN,
    TAG_OBJECTIVE,
    TAG_OBJECTIVE_MODE,
    TAG_ROLE,
    TAG_SOURCE_RUN,
    TAG_SOURCE_STUDY,
    TAG_SOURCE_TRIAL,
    TAG_STUDY,
    TAG_TRIAL,
    TRAIN_TRIAL,
)
from study import cli
from study.export import read_source, source_line
from study.registry import beats, check_model_name, judged_metric
from study.tracking import MlflowTracker
from trainables.checkpoint import load_checkpoint
from trainables.config import build_config
from trainables.data import load_data, to_float
from trainables.errors import UserError
from trainables.models import create_model

STUDY = "lineage-digits"
FINAL = "lineage-final"
MODEL = "digits-classifier"
#: A small CNN on digits, cheap to train, AutoAttack off (the final runs' --set too).
TINY = {"epochs": 2, "eps": 0.1, "step_size": 0.025, "attack_steps": 3, "autoattack": False,
        "test_subset": 50, "val_subset": 100, "probe_n": 0, "num_threads": 1,
        "model_kwargs.width": 8, "model_kwargs.mean": 0.3, "model_kwargs.std": 0.4}  # fmt: skip


# --- the rules, without a store ----------------------------------------------------------------
def test_beating_is_strictly_better_in_the_objectives_mode() -> None:
    assert beats(0.5, 0.4, "max") and not beats(0.4, 0.5, "max")
    assert beats(0.4, 0.5, "min") and not beats(0.5, 0.4, "min")
    assert not beats(0.5, 0.5, "max") and not beats(0.5, 0.5, "min")  # a tie keeps the champion
    assert not beats(math.nan, 0.1, "max") and not beats(0.9, math.nan, "max")


def test_a_final_run_is_judged_on_the_test_score_of_the_studys_objective() -> None:
    metrics = {"val/pgd_acc": 0.5, "test/pgd_acc": 0.4, "train/loss": 1.0}
    assert judged_metric("val/pgd_acc", metrics) == "test/pgd_acc"
    assert judged_metric("train/loss", metrics) == "train/loss"  # no test/loss logged


def test_model_names_that_break_model_uris_are_refused() -> None:
    assert check_model_name(" ok-name ") == "ok-name"
    for bad in ("", "  ", "a/b", "a:b", "a@b"):
        with pytest.raises(UserError, match="registered model name"):
            check_model_name(bad)


def test_an_exported_configs_source_is_read_back_and_the_file_still_loads(tmp_path) -> None:
    body = yaml.safe_dump({"epochs": 1, "method": "trades"})
    new = tmp_path / "new.yaml"
    new.write_text("# best config #1 of study 's' by val/pgd_acc (max) = 0.5\n"
                   + source_line("s 'x'", "abc_00003", "r1") + body)  # fmt: skip
    assert read_source(new) == {"study": "s 'x'", "trial": "abc_00003", "run": "r1"}
    assert build_config(new).epochs == 1  # the header is comments only
    old = tmp_path / "old.yaml"  # written before the source line existed
    old.write_text("# best config #1 of study 'old-study' by val/pgd_acc (max) = 0.5000\n"
                   "# MLflow run 0123abcd, trial abc_00001\n" + body)  # fmt: skip
    assert read_source(old) == {"study": "old-study", "trial": "abc_00001", "run": "0123abcd"}
    hand = tmp_path / "hand.yaml"
    hand.write_text("# my settings\n" + body)
    assert read_source(hand) is None and read_source(tmp_path / "missing.yaml") is None


# --- a real store --------------------------------------------------------------------------------
def _main(argv: list[str]) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(argv)
    return code, printed.getvalue()


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """A study of one (``study train``), its export with ``--register``, and two final
    trainings from the exported config with ``--register``: the first as exported, the
    second with a learning rate of 1e-9 (it stays at its initialisation, a far lower
    score; fixed seeds, so the same numbers every time)."""
    folder = tmp_path_factory.mktemp("lineage")
    db = f"sqlite:///{folder / 'mlflow.db'}"
    store = ["--tracking-uri", db]
    code, _ = _main(["train", "--no-progress", *store, "--experiment", STUDY,
                     "-o", str(folder / "trial"), *_sets(TINY)])  # fmt: skip
    assert code == 0
    best = folder / "best.yaml"
    code, exported = _main(["export", STUDY, *store, "-o", str(best), "--register", MODEL])
    assert code == 0, exported
    finals = []
    for i, extra in enumerate([{}, {"lr_max": 1e-9}]):
        argv = ["train", "--no-progress", *store, "--experiment", FINAL, "--config", str(best),
                "-o", str(folder / f"final{i}"), "--register", MODEL,
                *_sets({"autoattack": False, **extra})]  # fmt: skip
        code, printed = _main(argv)
        assert code == 0, printed
        finals.append(printed)
    return {"db": db, "folder": folder, "best": best, "exported": exported, "finals": finals}


def _trial_run(db: str, study: str):
    (run,) = MlflowTracker(db, study).find_runs(**{TAG_STUDY: study, TAG_ROLE: "trial"})
    return run


def _final_runs(db: str) -> list:
    runs = MlflowTracker(db, FINAL).find_runs(**{TAG_STUDY: FINAL, TAG_ROLE: "trial"})
    return sorted(runs, key=lambda r: r.info.start_time)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(to_float(load_data("digits").test.x[:32]))


@pytest.mark.slow
def test_export_registers_the_best_trials_model_as_candidate(lineage) -> None:
    from mlflow import MlflowClient

    db = lineage["db"]
    trial = _trial_run(db, STUDY)
    run_id = trial.info.run_id
    client = MlflowClient(db)
    version = client.get_model_version_by_alias(MODEL, ALIAS_CANDIDATE)
    assert str(version.version) == "1" and version.run_id == run_id
    assert version.tags[TAG_SOURCE_STUDY] == STUDY and version.tags[TAG_SOURCE_RUN] == run_id
    assert version.tags[TAG_SOURCE_TRIAL] == TRAIN_TRIAL and version.tags[TAG_MODEL_RUN] == run_id
    assert version.tags[TAG_OBJECTIVE] == "val/pgd_acc"
    assert version.tags[TAG_OBJECTIVE_MODE] == "max"
    # the version's source is a logged model of the trial's run, in the study's experiment
    model_id = version.source.removeprefix("models:/")
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run_id
    assert logged.experiment_id == MlflowTracker(db, STUDY).experiment_id
    assert logged.params["model_kwargs.width"] == "8"  # the training config
    assert model_id in [o.model_id for o in client.get_run(run_id).outputs.model_outputs]
    assert "registered digits-classifier version 1 as candidate" in lineage["exported"]
    assert read_source(lineage["best"]) == {"study": STUDY, "trial": TRAIN_TRIAL, "run": run_id}
    # the registered model gives the checkpoint's logits, loaded with MLflow's model API
    import mlflow.pytorch
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(db):
        registered = mlflow.pytorch.load_model(f"models:/{MODEL}@{ALIAS_CANDIDATE}")
    own = create_model("small_cnn", num_classes=10, in_channels=1, width=8, mean=0.3, std=0.4)
    checkpoint = load_checkpoint(lineage["folder"] / "trial" / "checkpoints" / "best.pt")
    own.load_state_dict(checkpoint["model"])
    assert torch.equal(_logits(registered), _logits(own.eval()))


@pytest.mark.slow
def test_final_trainings_record_their_source_and_only_a_better_one_is_champion(lineage) -> None:
    from mlflow import MlflowClient

    db = lineage["db"]
    client = MlflowClient(db)
    trial_run = _trial_run(db, STUDY).info.run_id
    first, second = _final_runs(db)
    for run in (first, second):
        assert run.data.tags[TAG_SOURCE_STUDY] == STUDY
        assert run.data.tags[TAG_SOURCE_TRIAL] == TRAIN_TRIAL
        assert run.data.tags[TAG_SOURCE_RUN] == trial_run
        assert run.data.tags[TAG_TRIAL] == TRAIN_TRIAL  # a study of one, as study train makes
    strong, weak = first.data.metrics["test/pgd_acc"], second.data.metrics["test/pgd_acc"]
    assert weak < strong, (weak, strong)  # the fixture's premise: lr 1e-9 stays untrained
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{MODEL}'")}
    assert sorted(versions) == ["1", "2", "3"]
    assert versions["2"].run_id == first.info.run_id and versions["3"].run_id == second.info.run_id
    for v in ("2", "3"):
        tags = versions[v].tags
        assert tags[TAG_SOURCE_STUDY] == STUDY and tags[TAG_SOURCE_RUN] == trial_run
        assert tags[TAG_MODEL_RUN] == versions[v].run_id
        assert tags[TAG_OBJECTIVE] == "test/pgd_acc"
    assert str(client.get_model_version_by_alias(MODEL, ALIAS_CHAMPION).version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, ALIAS_CANDIDATE).version) == "1"
    assert "version 2 (" in lineage["finals"][0]
    assert "as champion: no earlier champion" in lineage["finals"][0]
    assert (
        f"test/pgd_acc {weak:.4f} does not beat champion version 2's {strong:.4f} (max)"
        in lineage["finals"][1]
    )
    assert "alias unchanged" in lineage["finals"][1]


@pytest.mark.slow
def test_bad_input_is_refused_with_nothing_written_or_registered(lineage, capsys) -> None:
    from mlflow import MlflowClient

    db, folder = lineage["db"], lineage["folder"]
    store = ["--tracking-uri", db]
    before = sorted(p.name for p in folder.iterdir())
    cases = [  # (argv, what the error says)
        (["export", "no-such-study", *store, "-o", str(folder / "x.yaml"), "--register", MODEL],
         "no study 'no-such-study'"),
        (["export", STUDY, *store, "-o", str(folder / "x.yaml"), "--register", "a/b"],
         "registered model name"),
        (["export", STUDY, *store, "-o", str(folder / "x.yaml"), "--register", MODEL, "--top",
          "2"], "best trial only"),
        (["train", *store, "--config", str(lineage["best"]), "--no-mlflow", "--register", MODEL,
          "-o", str(folder / "x")], "drop --no-mlflow"),
        (["train", *store, "--config", str(lineage["best"]), "--register", "", "-o",
          str(folder / "x")], "registered model name"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), err
    assert sorted(p.name for p in folder.iterdir()) == before
    versions = MlflowClient(db).search_model_versions(f"name='{MODEL}'")
    assert sorted(str(v.version) for v in versions) == ["1", "2", "3"]


#: A digits run of a few seconds for Ray Train (as tests/test_cli.py's).
RAY_TINY = {"dataset": "digits", "model": "small_cnn", "eps": 0.1, "step_size": 0.025,
            "attack_steps": 2, "val_attack_steps": 2, "eval_steps": 2, "eval_step_size": 0.025,
            "batch_size": 64, "train_subset": 256, "val_subset": 64, "test_subset": 64,
            "probe_n": 0, "autoattack": False, "epochs": 1}  # fmt: skip


@pytest.mark.slow
@pytest.mark.usefixtures("ray_cluster")
def test_a_final_training_on_ray_train_records_its_source_and_registers(tmp_path) -> None:
    """``study train --workers 2 --config best.yaml --register MODEL``: the study of one's
    parent and trial run carry the source; the trial's model is the first champion (its
    source study is not in this store: judged on test/pgd_acc, max)."""
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    best = tmp_path / "best.yaml"
    best.write_text(source_line("elsewhere", "abc_00002", "0123abcd") + yaml.safe_dump(RAY_TINY))
    code, printed = _main(["train", "--workers", "2", "--config", str(best), "--register", MODEL,
                           "--experiment", "ray-final", "--no-progress", "--tracking-uri", db,
                           "--storage", str(tmp_path / "studies")])  # fmt: skip
    assert code == 0, printed
    runs = MlflowTracker(db, "ray-final").find_runs(**{TAG_STUDY: "ray-final"})
    assert sorted(r.data.tags[TAG_ROLE] for r in runs) == ["study", "trial"]
    for run in runs:
        assert run.data.tags[TAG_SOURCE_STUDY] == "elsewhere"
        assert run.data.tags[TAG_SOURCE_TRIAL] == "abc_00002"
        assert run.data.tags[TAG_SOURCE_RUN] == "0123abcd"
    (trial,) = [r for r in runs if r.data.tags[TAG_ROLE] == "trial"]
    champion = MlflowClient(db).get_model_version_by_alias(MODEL, ALIAS_CHAMPION)
    assert str(champion.version) == "1" and champion.run_id == trial.info.run_id
    assert champion.tags[TAG_OBJECTIVE] == "test/pgd_acc"
    assert champion.tags[TAG_SOURCE_STUDY] == "elsewhere"
    assert "as champion: no earlier champion" in printed


def test_a_champion_judged_otherwise_is_not_compared() -> None:
    """Another judged metric or mode on the champion's version, or another dataset or ε
    in its run, makes the two scores incomparable; equal settings do not."""
    from types import SimpleNamespace

    from study.registry import _not_comparable

    def run(**params: str) -> SimpleNamespace:
        base = {"dataset": "digits", "eps": "0.1", "eval_steps": "20",
                "eval_step_size": "0.01", "test_subset": "None"}  # fmt: skip
        return SimpleNamespace(data=SimpleNamespace(params={**base, **params}))

    tags = {"energy_study.objective": "test/pgd_acc", "energy_study.objective_mode": "max"}
    assert _not_comparable(tags, run(), "test/pgd_acc", "max", run()) == []
    assert _not_comparable(tags, run(), "test/clean_acc", "max", run()) == [
        "on test/pgd_acc, not test/clean_acc"
    ]
    assert _not_comparable(tags, run(), "test/pgd_acc", "max", run(eps="0.2")) == ["eps 0.1 vs 0.2"]


def test_the_tracking_uri_of_the_environment_survives_a_registration(monkeypatch) -> None:
    import os

    from study.registry import _tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/env-store.db")
    with _tracking("sqlite:////tmp/other-store.db"):
        pass
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/env-store.db"
