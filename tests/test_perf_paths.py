"""The speed options on the CPU: bf16 autocast, channels_last, torch.compile, no host sync.

Their speed is measured by ``python -m bench`` (bench/README.md), never here;
these tests check that each code path is correct: the defaults (off on the
CPU; on for CUDA where the method's numerics allow), the same logits and
gradients in channels_last, a short training with each option on digits that
learns and gives finite metrics, bf16 only where it is asked for (never in the
evaluation), and no host synchronisation inside the attack and batch loops.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import trainables.loop as loop
from trainables.attacks import PGD
from trainables.checkpoint import load_checkpoint
from trainables.config import TrainConfig
from trainables.data import iterate_batches, load_data
from trainables.errors import ConfigError
from trainables.loop import autocast_dtype, train, use_channels_last
from trainables.methods import METHODS
from trainables.models import accelerate, create_model

FAST = {
    "dataset": "digits",
    "model": "small_cnn",
    "method": "trades",
    "eps": 0.2,
    "step_size": 0.05,
    "attack_steps": 3,
    "val_attack_steps": 5,
    "eval_steps": 5,
    "eval_step_size": 0.05,
    "batch_size": 64,
    "autoattack": False,
    "num_threads": 1,
    "epochs": 2,
}


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def _finite(metrics: dict[str, float]) -> bool:
    return all(math.isfinite(v) for v in metrics.values())


def test_one_precision_for_every_method_and_channels_last_on_cuda(monkeypatch) -> None:
    cfg = TrainConfig.from_dict({})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cfg.precision == "auto" and cfg.channels_last is None and cfg.compile is False
    assert autocast_dtype(cfg, cpu) is None
    assert use_channels_last(cfg, cpu) is False
    assert use_channels_last(cfg, cuda) is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    # the default trains every method in fp32, so precision never differs inside a study
    for name in METHODS.names():
        assert autocast_dtype(cfg.replace(method=name), cuda) is None, name
        assert autocast_dtype(cfg.replace(method=name, precision="bf16"), cuda) == torch.bfloat16
    # explicit settings win over the defaults, on any device
    assert autocast_dtype(cfg.replace(method="sat", precision="fp32"), cuda) is None
    assert autocast_dtype(cfg.replace(precision="bf16"), cpu) == torch.bfloat16
    assert use_channels_last(cfg.replace(channels_last=False), cuda) is False
    assert use_channels_last(cfg.replace(channels_last=True), cpu) is True


def test_options_are_validated_and_runtime_only() -> None:
    with pytest.raises(ConfigError, match=r"precision = 'fp16' is not allowed.*bf16"):
        TrainConfig.from_dict({"precision": "fp16"})
    with pytest.raises(ConfigError, match=r"compile = 'maybe'; expected true or false"):
        TrainConfig.from_dict({"compile": "maybe"})
    cfg = TrainConfig.from_dict({"channels_last": "yes", "compile": "false"})
    assert cfg.channels_last is True and cfg.compile is False
    # a run may be resumed with other speed options (like another device)
    assert {"precision", "channels_last", "compile"} <= loop.RUNTIME_KEYS


@pytest.mark.parametrize(
    "name, shape", [("small_cnn", (8, 1, 8, 8)), ("preact_resnet18", (4, 3, 16, 16))]
)
def test_channels_last_view_gives_the_same_logits_and_gradients(name, shape) -> None:
    torch.manual_seed(0)
    plain = create_model(name, num_classes=10, in_channels=shape[1])
    model = copy.deepcopy(plain)
    view = accelerate(model, channels_last=True)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints unchanged

    x = torch.rand(shape)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, lb = plain(xa), view(xb)
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=1e-4)
    la.logsumexp(1).sum().backward()
    lb.logsumexp(1).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, atol=1e-6, rtol=1e-4)
    for (k, pa), pb in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-3, msg=k)
    # mode switches on the view reach the model (the attacks switch to eval and back)
    view.eval()
    assert not model.training
    view.train()
    assert model.training


def test_channels_last_training_matches_the_default_within_tolerance(tmp_path, digits) -> None:
    cfg = TrainConfig.from_dict(FAST)
    plain = train(cfg, output_dir=tmp_path / "plain", data=digits)
    fast = train(cfg.replace(channels_last=True), output_dir=tmp_path / "cl", data=digits)
    for a, b in zip(plain.history, fast.history):
        assert _finite(b)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=0.02)
        assert b["val/clean_acc"] == pytest.approx(a["val/clean_acc"], abs=0.03)
        assert b["val/pgd_acc"] == pytest.approx(a["val/pgd_acc"], abs=0.06)
        assert b["val/delta_energy"] == pytest.approx(a["val/delta_energy"], abs=0.05)
    assert fast.test_metrics["test/clean_acc"] == pytest.approx(
        plain.test_metrics["test/clean_acc"], abs=0.03
    )
    # the checkpoint loads into a plain model
    state = load_checkpoint(tmp_path / "cl" / "checkpoints" / "best.pt")["model"]
    create_model("small_cnn", num_classes=10, in_channels=1).load_state_dict(state)


def test_bf16_autocast_trains_in_bf16_and_evaluates_in_fp32(tmp_path, digits, monkeypatch):
    seen: list[tuple[str, torch.dtype]] = []
    phase = ["train"]
    make, evaluate = loop.create_model, loop.evaluate

    def create_with_hook(*args, **kwargs):
        model = make(*args, **kwargs)
        model.conv2.register_forward_hook(lambda m, i, out: seen.append((phase[0], out.dtype)))
        return model

    def evaluate_marked(*args, **kwargs):
        phase[0] = "eval"
        try:
            return evaluate(*args, **kwargs)
        finally:
            phase[0] = "train"

    monkeypatch.setattr(loop, "create_model", create_with_hook)
    monkeypatch.setattr(loop, "evaluate", evaluate_marked)
    res = train(
        TrainConfig.from_dict({**FAST, "precision": "bf16"}), output_dir=tmp_path, data=digits
    )
    assert {d for p, d in seen if p == "train"} == {torch.bfloat16}
    assert {d for p, d in seen if p == "eval"} == {torch.float32}
    assert all(_finite(h) for h in res.history) and _finite(res.test_metrics)
    assert res.history[-1]["val/clean_acc"] > 0.6  # it learned under autocast


def test_torch_compile_path_trains(tmp_path, digits) -> None:
    small = dataclasses.replace(digits, train=digits.train.subset(256, seed=0))
    cfg = TrainConfig.from_dict(
        {
            **FAST,
            "compile": True,
            "epochs": 2,
            "attack_steps": 2,
            "val_subset": 64,
            "val_attack_steps": 2,
            "test_subset": 64,
            "eval_steps": 2,
        }
    )
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    res = train(cfg, output_dir=tmp_path, data=small)
    assert counters["stats"]["unique_graphs"] >= 3  # attack, no-grad and training forwards
    assert all(_finite(h) for h in res.history) and _finite(res.test_metrics)
    assert res.history[-1]["train/loss"] < res.history[0]["train/loss"] * 1.5
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    assert not any(k.startswith("_orig_mod") for k in state)  # keys of the bare model
    create_model("small_cnn", num_classes=10, in_channels=1).load_state_dict(state)
    torch._dynamo.reset()


SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def sync_counter(monkeypatch):
    """Counts the Python-level calls that read a tensor's value on the host."""
    counts = {name: 0 for name in SYNCS}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_no_host_sync_inside_the_attacks(digits, sync_counter) -> None:
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    x, y = next(iterate_batches(digits.train, 64, shuffle=False, seed=0, epoch=0))
    for objective, start in (("kl", "normal"), ("ce", "uniform")):
        for norm in ("linf", "l2"):
            PGD(0.2, 0.05, 5, norm=norm, objective=objective, start=start)(model, x, y)
    assert sum(sync_counter.values()) == 0, sync_counter


def test_host_reads_per_epoch_do_not_grow_with_the_batches(tmp_path, digits, sync_counter):
    cfg = TrainConfig.from_dict({**FAST, "epochs": 1, "method": "weat_adv", "val_subset": 64})
    counts = []
    for n in (128, 512):  # 2 and 8 training batches; the same validation and test sets
        data = dataclasses.replace(digits, train=digits.train.subset(n, seed=0))
        for k in sync_counter:
            sync_counter[k] = 0
        train(cfg, output_dir=tmp_path / str(n), data=data)
        counts.append(dict(sync_counter))
    assert counts[0]["tolist"] > 0  # the counter sees the once-per-epoch reads
    assert counts[0] == counts[1], counts
