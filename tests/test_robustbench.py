"""``study export NAME --robustbench DIR``: plain model definitions with RobustBench's
layout, the explicit name mapping, and the export of a trained run (slow: training, a
real AutoAttack run and a fresh Python process that reloads the export with torch alone).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from reports.vocabulary import TAG_ROLE, TAG_STUDY, TAG_TRIAL
from study import cli
from study.robustbench import (
    INFO_ARTIFACT,
    INFO_FIELDS,
    INFO_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    eps_text,
    percent,
    plain_model,
)
from study.tracking import MlflowTracker
from trainables.checkpoint import load_checkpoint
from trainables.data import load_data, to_float
from trainables.errors import ConfigError
from trainables.models import create_model

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def _randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BN layer statistics and an affine map of its own, so that a BN buffer
    or parameter loaded into the wrong place changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.normal_(1.0, 0.1, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    return model.eval()


# --- the plain definitions, one per architecture ----------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "channels", "size", "zoo_keys"),
    [
        ("resnet18", {"mean": CIFAR_MEAN, "std": CIFAR_STD}, 3, 32,
         ["layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.running_var", "linear.weight"]),
        ("preact_resnet18", {"mean": CIFAR_MEAN, "std": CIFAR_STD}, 3, 32,
         ["layer3.0.shortcut.0.weight", "bn.running_mean", "linear.bias"]),
        ("preact_resnet18", {"final_bn": False}, 3, 32, ["layer4.0.shortcut.0.weight"]),
        ("wrn34_10", {"depth": 16, "widen": 2, "mean": CIFAR_MEAN, "std": CIFAR_STD}, 3, 32,
         ["block1.layer.0.convShortcut.weight", "block2.layer.1.bn2.weight",
          "bn1.running_var", "fc.weight"]),
        ("small_cnn", {"width": 8}, 1, 8, ["conv3.weight", "bn3.running_mean", "fc.weight"]),
    ],
)  # fmt: skip
def test_the_mapping_loads_strictly_and_gives_the_same_logits(
    name, options, channels, size, zoo_keys
) -> None:
    model = create_model(name, num_classes=10, in_channels=channels, **options)
    model = _randomize_batchnorm(model, seed=len(name))
    plain = plain_model(name, options, model.state_dict())
    exported = plain.build()  # strict: every key of the definition filled, none left over
    assert set(plain.state_dict) == set(exported.state_dict())
    assert set(zoo_keys) | {"mu", "sigma"} <= set(plain.state_dict)  # RobustBench's names
    assert len(plain.state_dict) == len(model.state_dict()) + ("mean" not in options) * 2
    if "mean" in options:
        assert torch.equal(plain.state_dict["mu"].flatten(), torch.tensor(options["mean"]))
    else:
        assert torch.equal(plain.state_dict["sigma"], torch.ones(1, channels, 1, 1))
    x = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), exported(x))
    # the plain definition needs nothing of the project's
    assert not any(m.__module__.startswith("trainables") for m in exported.modules())


def test_a_key_without_a_place_or_a_model_without_a_definition_is_refused() -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=4)
    extra = {**model.state_dict(), "conv9.weight": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="conv9.weight"):  # strict load
        plain_model("small_cnn", {"width": 4}, extra)
    with pytest.raises(ConfigError, match="unknown exportable model 'vit'"):
        plain_model("vit", {}, model.state_dict())


def test_eps_and_accuracies_are_written_as_robustbench_writes_them() -> None:
    assert eps_text(8 / 255, "linf") == "8/255"
    assert eps_text(0.1, "linf") == "0.1"
    assert eps_text(0.5, "l2") == "0.5"
    assert percent(0.85671) == "85.67" and percent(1.0) == "100.00"


def test_the_plain_definitions_import_only_torch() -> None:
    import study.robustbench_models as module

    tree = ast.parse(Path(module.__file__).read_text())
    roots = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert roots == {"torch"}


# --- the export of a trained run ----------------------------------------------------------------
STUDY = "rb-digits"
N = 20


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small CNN (with normalisation inside) trained on digits by `study train` into
    MLflow as a study of one, then `study export --robustbench` on 20 test points."""
    folder = tmp_path_factory.mktemp("robustbench")
    db = f"sqlite:///{folder / 'mlflow.db'}"
    args = ["train", "--no-progress", "--tracking-uri", db, "--experiment", STUDY,
            "-o", str(folder / "run")]  # fmt: skip
    sets = {"epochs": 2, "eps": 0.1, "step_size": 0.025, "attack_steps": 3, "autoattack": False,
            "test_subset": 50, "val_subset": 100, "probe_n": 0, "num_threads": 1,
            "model_kwargs.width": 8, "model_kwargs.mean": 0.3, "model_kwargs.std": 0.4}  # fmt: skip
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert cli.main(args) == 0
    out = folder / "export"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(
            ["export", STUDY, "--tracking-uri", db, "--robustbench", str(out), "--n", str(N)]
        )
    assert code == 0, printed.getvalue()
    model = create_model("small_cnn", num_classes=10, in_channels=1, width=8, mean=0.3, std=0.4)
    model.load_state_dict(load_checkpoint(folder / "run" / "checkpoints" / "best.pt")["model"])
    return {"db": db, "folder": folder, "out": out, "printed": printed.getvalue(),
            "model": model.eval()}  # fmt: skip


@pytest.mark.slow
def test_the_export_reloads_with_torch_alone_and_gives_identical_logits(exported) -> None:
    out, folder = exported["out"], exported["folder"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, WEIGHTS_FILE, INFO_FILE])
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left
    # the model file imports torch and nothing else
    tree = ast.parse((out / MODEL_FILE).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported and all(m.split(".")[0] == "torch" for m in imported), imported
    x = to_float(load_data("digits").test.x[:32])
    torch.save(x, folder / "batch.pt")
    script = (
        "import importlib.util, sys, torch\n"
        "folder, batch, result = sys.argv[1:4]\n"
        "spec = importlib.util.spec_from_file_location('exported', folder + '/model.py')\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "model = module.load_model(folder + '/model.pt')\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(batch)), result)\n"
        "ours = {'study', 'trainables', 'reports', 'search_spaces', 'mlflow', 'ray',\n"
        "        'pyautoattack', 'yaml', 'sklearn'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ours))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-B", "-c", script, str(out), str(folder / "batch.pt"),
         str(folder / "logits.pt")],
        cwd=folder, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # no module of the project or its other dependencies
    with torch.no_grad():
        expected = exported["model"](x)
    assert torch.equal(torch.load(folder / "logits.pt"), expected)
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, WEIGHTS_FILE, INFO_FILE])


@pytest.mark.slow
def test_model_info_has_robustbench_fields_and_the_evaluation_is_in_mlflow(exported) -> None:
    text = (exported["out"] / INFO_FILE).read_text()
    info = json.loads(text)
    assert tuple(info) == INFO_FIELDS
    for key in ("clean_acc", "autoattack_acc", "reported"):
        assert re.fullmatch(r"\d{1,3}\.\d\d", info[key]), (key, info[key])
    assert float(info["autoattack_acc"]) <= float(info["clean_acc"])
    assert info["architecture"] == "SmallCNN" and info["dataset"] == "digits"
    assert info["threat_model"] == "Linf" and info["eps"] == "0.1"
    assert info["number_forward_passes"] == 1 and info["additional_data"] is False
    assert isinstance(info["name"], str) and STUDY in info["name"]
    assert f"first {N} test points" in info["footnote"]
    tracker = MlflowTracker(exported["db"], STUDY)
    (run,) = tracker.find_runs(**{TAG_STUDY: STUDY, TAG_ROLE: "trial"})
    m = run.data.metrics
    assert m["robustbench/n"] == N
    assert percent(m["robustbench/clean_acc"]) == info["clean_acc"]
    assert percent(m["robustbench/aa_acc"]) == info["autoattack_acc"]
    assert m["robustbench/aa_acc_ci_low"] <= m["robustbench/aa_acc"]
    logged = tracker.download(run.info.run_id, INFO_ARTIFACT, exported["folder"] / "logged")
    assert logged.read_text() == text
    assert f"AutoAttack {N}/{N} points" in exported["printed"]  # progress


@pytest.mark.slow
def test_bad_input_is_refused_with_nothing_written(exported, capsys) -> None:
    db, folder = exported["db"], exported["folder"]
    tracker = MlflowTracker(db, "rb-unfinished")  # a study whose only trial is still running
    tracker.create_run("t", {TAG_STUDY: "rb-unfinished", TAG_ROLE: "trial", TAG_TRIAL: "t"})
    full = folder / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    a_file = folder / "a_file"
    a_file.write_text("")
    cases = [  # (study, DIR, --n, what the error says)
        (STUDY, folder / "n0", "0", "--n = 0"),
        ("no-such-study", folder / "unknown", str(N), "no study 'no-such-study'"),
        ("rb-unfinished", folder / "unfinished", str(N), "no finished trial"),
        (STUDY, full, str(N), "not empty"),
        (STUDY, a_file / "sub", str(N), "is not a folder"),
    ]
    before = sorted(p.name for p in folder.iterdir())
    for study, target, n, message in cases:
        argv = ["export", study, "--tracking-uri", db, "--robustbench", str(target), "--n", n]
        assert cli.main(argv) == 2, study
        err = capsys.readouterr().err
        assert message in " ".join(err.split()), err
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing new, nothing hidden
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    (run,) = MlflowTracker(db, STUDY).find_runs(**{TAG_STUDY: STUDY, TAG_ROLE: "trial"})
    assert run.data.metrics["robustbench/n"] == N  # the earlier export's, untouched
