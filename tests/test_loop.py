"""The epoch loop on real data (digits): robustness, resume, checkpoints, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.data import load_data
from trainables.errors import CheckpointError
from trainables.loop import train

# Digits: 8x8 images in [0, 1]. At eps = 0.2 a standard CNN is broken by PGD
# while a few epochs of adversarial training keep much of its accuracy.
FAST = {
    "dataset": "digits",
    "model": "small_cnn",
    "eps": 0.2,
    "step_size": 0.05,
    "attack_steps": 5,
    "val_attack_steps": 10,
    "eval_steps": 20,
    "eval_step_size": 0.05,
    "batch_size": 64,
    "autoattack": False,
    "num_threads": 1,
}


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


class Recorder:
    def __init__(self, stop_after: int | None = None) -> None:
        self.epochs: list[tuple[int, dict, object]] = []
        self.final_metrics: dict | None = None
        self.stop_after = stop_after

    def report(self, epoch, metrics, checkpoint):
        self.epochs.append((epoch, metrics, checkpoint))
        if self.stop_after is not None and epoch == self.stop_after:
            raise KeyboardInterrupt  # as if the process were killed after this epoch

    def final(self, metrics, artifacts):
        self.final_metrics = metrics


@pytest.mark.slow
def test_adversarial_training_beats_standard_training_under_pgd(tmp_path, digits) -> None:
    results, last_val = {}, {}
    for method in ("standard", "trades", "weat_adv"):
        cfg = TrainConfig.from_dict({**FAST, "method": method, "epochs": 6})
        res = train(cfg, output_dir=tmp_path / method, data=digits)
        results[method] = res.test_metrics
        last_val[method] = res.history[-1]
    print({m: (r["test/clean_acc"], r["test/pgd_acc"]) for m, r in results.items()})
    assert last_val["standard"]["val/clean_acc"] > 0.9  # standard training learned the task
    assert results["standard"]["test/pgd_acc"] < 0.25  # ... and PGD breaks it
    for method in ("trades", "weat_adv"):
        assert results[method]["test/pgd_acc"] > results["standard"]["test/pgd_acc"] + 0.3


def test_metrics_vocabulary_and_outputs(tmp_path, digits) -> None:
    rec = Recorder()
    cfg = TrainConfig.from_dict({**FAST, "method": "weat_nat", "epochs": 2})
    res = train(cfg, reporter=rec, output_dir=tmp_path, data=digits)
    assert [e for e, _, _ in rec.epochs] == [1, 2]
    metrics = rec.epochs[-1][1]
    for key in (
        "train/loss",
        "train/clean_acc",
        "train/mean_weight",
        "val/clean_acc",
        "val/pgd_acc",
        "val/energy_nat",
        "val/energy_adv",
        "val/delta_energy",
        "val/delta_energy_joint",
        "lr",
    ):
        assert key in metrics, key
    assert 0 < metrics["train/mean_weight"] < 1  # WEAT weights are below 1
    # untargeted PGD lowers the marginal energy: E(x) - E(x*) > 0 (paper, §1)
    assert metrics["val/delta_energy"] == pytest.approx(
        metrics["val/energy_nat"] - metrics["val/energy_adv"], abs=1e-4
    )
    assert (tmp_path / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "config.yaml").is_file()
    energies = dict(__import__("numpy").load(tmp_path / "energies.npz"))
    assert energies["energy_nat"].shape == energies["y"].shape == (len(digits.test),)
    assert rec.final_metrics is not None and "test/pgd_acc" in rec.final_metrics
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["epoch"] == res.best_epoch


def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, digits) -> None:
    cfg = TrainConfig.from_dict({**FAST, "method": "mail_trades", "epochs": 3, "burn_in": 1})
    full = train(cfg, output_dir=tmp_path / "full", data=digits)

    rec = Recorder(stop_after=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, reporter=rec, output_dir=tmp_path / "cut", data=digits)
    resumed = train(
        cfg,
        output_dir=tmp_path / "cut",
        resume=tmp_path / "cut" / "checkpoints" / "last.pt",
        data=digits,
    )
    strip = lambda h: {k: v for k, v in h.items() if not k.startswith("time/")}  # noqa: E731
    assert [strip(h) for h in resumed.history] == [strip(h) for h in full.history]
    assert resumed.test_metrics == full.test_metrics
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_config(tmp_path, digits) -> None:
    cfg = TrainConfig.from_dict({**FAST, "method": "trades", "epochs": 1})
    train(cfg, output_dir=tmp_path, data=digits)
    with pytest.raises(CheckpointError, match="beta"):
        train(
            cfg.replace(beta=1.0),
            output_dir=tmp_path,
            resume=tmp_path / "checkpoints" / "last.pt",
            data=digits,
        )


def test_corrupt_checkpoint_is_a_clear_error(tmp_path) -> None:
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_cli_train_and_errors(tmp_path, capsys) -> None:
    from study.cli import main

    out = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in FAST.items()]
    code = main(
        ["train", "--no-progress", "-o", str(out), *sets, "--set=epochs=1", "--set=method=sat"]
    )
    assert code == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    assert "test/pgd_acc" in json.loads((out / "final.json").read_text())["metrics"]

    capsys.readouterr()
    assert main(["train", "--set", "beta=-3"]) == 2
    err = capsys.readouterr().err
    assert "beta = -3.0 is out of range" in err and "Traceback" not in err

    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["train", "--resume", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err

    assert main(["train", "--set", "dataset=cifar10", "--set", f"data_root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10" in err.lower() and "download" in err


def test_onecycle_is_defined_for_runs_of_a_few_steps():
    """A warm-up of one step (pct_start · total = 1) ends at the peak instead of dividing
    by zero; every step of runs of 1 to 8 steps has a finite, positive lr."""
    from trainables.loop import onecycle_at

    assert onecycle_at(0, total_steps=4, lr_max=0.1, pct_start=0.25) == (0.1, 0.85)
    for total in range(1, 9):
        for step in range(total):
            lr, momentum = onecycle_at(step, total, lr_max=0.1, pct_start=0.25)
            assert 0 < lr <= 0.1 and 0.85 <= momentum <= 0.95, (total, step, lr)


def test_a_path_written_relative_or_absolute_resumes_as_the_same_config(tmp_path, monkeypatch):
    """A study makes data_root absolute; a checkpoint written with the relative path
    (study train in that folder) still resumes, while another folder does not."""
    from trainables.errors import CheckpointError
    from trainables.loop import _check_resumable

    monkeypatch.chdir(tmp_path)
    now = TrainConfig.from_dict({"data_root": str(tmp_path / "data")})
    state = {"optimizer": {}, "config": {**now.to_dict(), "data_root": "data"}}
    _check_resumable(state, now)
    state["config"]["data_root"] = "elsewhere"
    with pytest.raises(CheckpointError, match="data_root"):
        _check_resumable(state, now)
