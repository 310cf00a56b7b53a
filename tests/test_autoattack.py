"""The AutoAttack adapter runs the reference attacks (pyautoattack) on the CPU."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from trainables.autoattack import AutoAttackResult, autoattack_accuracy
from trainables.errors import ConfigError

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")


@pytest.fixture(autouse=True)
def _one_thread():
    """The attacks are thousands of tiny ops: one thread is ~10x faster than two here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Blind(nn.Module):
    """Ignores its input: every point gets the same logits, argmax ``k - 1``."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(k, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 0 * x keeps the input in the graph, so the gradient attacks can run (and get 0).
        return self.bias.expand(x.shape[0], -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class Spy(nn.Module):
    """Linear model that records the mode it ran in."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, k))
        self.seen: set[bool] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(self.training)
        return self.body(x)


def _linear_task(n: int = 32, k: int = 10, wrong: int = 4, seed: int = 0):
    """An undefended linear model on 1x8x8 inputs; the first ``wrong`` labels are wrong."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, k))
    x = torch.rand(n, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:wrong] = (y[:wrong] + 1) % k
    return model, x, y


def _check_result(res: AutoAttackResult, model: nn.Module, x, y, eps: float) -> None:
    """Invariants every result must satisfy (Linf threat model)."""
    n = len(y)
    assert isinstance(res, AutoAttackResult)
    assert isinstance(res.robust_acc, float) and isinstance(res.clean_acc, float)
    assert res.robust_mask.shape == (n,) and res.robust_mask.dtype == torch.bool
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    assert not res.x_adv.requires_grad
    with torch.no_grad():
        clean = model(x).argmax(1).eq(y)
        adv_pred = model(res.x_adv).argmax(1)
    assert res.clean_acc == pytest.approx(clean.float().mean().item())
    assert res.robust_acc == pytest.approx(res.robust_mask.float().mean().item())
    assert res.robust_acc <= res.clean_acc
    assert not (res.robust_mask & ~clean).any(), "a misclassified point counted as robust"
    # points counted as broken really are misclassified at x_adv; robust ones keep x
    broken = clean & ~res.robust_mask
    assert adv_pred[broken].ne(y[broken]).all()
    assert torch.equal(res.x_adv[~broken], x[~broken])
    assert (res.x_adv - x).abs().max().item() <= eps + 1e-6
    assert res.x_adv.min().item() >= 0 and res.x_adv.max().item() <= 1


def test_standard_version_breaks_an_undefended_model_within_the_ball() -> None:
    model, x, y = _linear_task()
    before = model.state_dict()
    res = autoattack_accuracy(model, x, y, eps=0.3, version="standard", batch_size=8)
    _check_result(res, model, x, y, eps=0.3)
    assert res.clean_acc == pytest.approx(28 / 32)
    assert res.robust_acc < res.clean_acc
    assert res.attacks == STANDARD
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_custom_attack_list_runs_only_those_attacks_and_is_seeded() -> None:
    model, x, y = _linear_task(seed=1)
    rng = torch.get_rng_state()
    kw = dict(eps=0.05, version="custom", attacks=["apgd-ce", "apgd-t"], seed=3)
    res = autoattack_accuracy(model, x, y, **kw)
    assert torch.equal(torch.get_rng_state(), rng), "the caller's RNG state must be untouched"
    _check_result(res, model, x, y, eps=0.05)
    assert 0 < res.robust_acc < res.clean_acc  # some points survive, some do not
    assert res.attacks == ("apgd-ce", "apgd-t")
    again = autoattack_accuracy(model, x, y, **kw)
    assert torch.equal(again.x_adv, res.x_adv) and torch.equal(again.robust_mask, res.robust_mask)


def test_l2_threat_model_stays_in_the_l2_ball() -> None:
    model, x, y = _linear_task(seed=2)
    res = autoattack_accuracy(model, x, y, eps=0.5, norm="L2", version="custom", attacks=["fab"])
    dist = (res.x_adv - x).flatten(1).norm(dim=1)
    assert dist.max().item() <= 0.5 + 1e-4
    assert res.robust_acc < res.clean_acc
    assert res.x_adv.min().item() >= 0 and res.x_adv.max().item() <= 1
    # FAB calls .backward(): the model's parameters must not collect gradients
    assert all(p.grad is None for p in model.parameters())


def test_a_model_that_ignores_its_input_keeps_its_accuracy(caplog, capfd) -> None:
    model = Blind(10)
    torch.manual_seed(0)
    x = torch.rand(32, 1, 8, 8)
    y = torch.full((32,), 9)
    y[::4] = 3  # a quarter is misclassified; those stay wrong, the rest stay right
    with caplog.at_level(logging.DEBUG):
        res = autoattack_accuracy(model, x, y, eps=0.3, version="standard")
    _check_result(res, model, x, y, eps=0.3)
    assert res.clean_acc == 0.75
    assert res.robust_acc == res.clean_acc
    assert torch.equal(res.robust_mask, y.eq(9))
    assert res.attacks == STANDARD
    # quiet: nothing printed or logged, but the library's warning is kept
    assert not [r for r in caplog.records if r.name == "auto-attack"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert any("zero gradient" in w for w in res.warnings)


def test_fewer_than_ten_classes() -> None:
    # standard on 3 classes: APGD-T (needs 4) is left out, FAB-T gets 2 targets
    model = Blind(3)
    x = torch.rand(8, 1, 8, 8)
    y = torch.full((8,), 2)
    res = autoattack_accuracy(model, x, y, version="standard")
    assert res.attacks == ("apgd-ce", "fab-t", "square")
    assert res.clean_acc == res.robust_acc == 1.0
    # the targeted attacks run with num_classes - 1 targets and break undefended models
    for k, attacks in ((3, ["fab-t"]), (4, ["apgd-t"])):
        model, x, y = _linear_task(n=16, k=k, wrong=0)
        res = autoattack_accuracy(model, x, y, eps=0.3, version="custom", attacks=attacks)
        _check_result(res, model, x, y, eps=0.3)
        assert res.clean_acc == 1.0 and res.robust_acc < 1.0
    # a custom attack the class count cannot support is a config error
    model, x, y = _linear_task(n=4, k=3, wrong=0)
    with pytest.raises(ConfigError, match=r"\['apgd-t'\] cannot run on 3 classes"):
        autoattack_accuracy(model, x, y, version="custom", attacks=["apgd-t"])


def test_train_eval_modes_and_requires_grad_are_restored() -> None:
    model = Spy()
    x = torch.rand(8, 1, 8, 8)
    y = torch.zeros(8, dtype=torch.long)
    model.train()
    model.body[1].eval()  # a submodule deliberately kept in eval
    model.body[1].bias.requires_grad_(False)
    autoattack_accuracy(model, x, y, eps=0.3, version="custom", attacks=["apgd-ce"])
    assert model.seen == {False}, "the attacks must see the model in eval mode"
    assert model.training and not model.body[1].training and model.body[0].training
    assert model.body[1].weight.requires_grad and not model.body[1].bias.requires_grad
    model.eval()
    autoattack_accuracy(model, x, y, eps=0.3, version="custom", attacks=["apgd-ce"])
    assert not model.training
    # restored when the call fails too (apgd-t cannot run on 3 classes)
    small = Spy(k=3).train()
    with pytest.raises(ConfigError):
        autoattack_accuracy(small, x, y, version="custom", attacks=["apgd-t"])
    assert small.training and all(p.requires_grad for p in small.parameters())


def test_tracer_is_restored_and_verbose_logs() -> None:
    model, x, y = _linear_task(n=8, wrong=0)
    old = sys.gettrace()

    def tracer(frame, event, arg):  # a global tracer that adds no local tracing
        return None

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("auto-attack").addHandler(handler)
    sys.settrace(tracer)
    try:
        autoattack_accuracy(
            model, x, y, eps=0.3, version="custom", attacks=["apgd-ce"], verbose=True
        )
        assert sys.gettrace() is tracer, "the library's sys.settrace(None) must be undone"
    finally:
        sys.settrace(old)
        logging.getLogger("auto-attack").removeHandler(handler)
    assert any("robust accuracy" in r.getMessage() for r in records)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(version="custom", attacks=["apgd-ce", "cw"]), r"\['cw'\] unknown; allowed: apgd-ce"),
        (dict(version="custom", attacks=None), "needs a list of attacks"),
        (dict(version="custom", attacks="apgd-ce"), "list of names"),
        (dict(attacks=["apgd-ce"]), "only used with version 'custom'"),
        (dict(norm="L3"), "norm = 'L3' is unknown; allowed: Linf, L2, L1"),
        (dict(version="fast"), "version = 'fast' is unknown"),
        (dict(eps=0.0), "eps"),
        (dict(batch_size=0), "batch_size"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match) -> None:
    model, x, y = _linear_task(4, wrong=0)
    with pytest.raises(ConfigError, match=match):
        autoattack_accuracy(model, x, y, **kwargs)


def test_bad_data_is_a_value_error() -> None:
    model, x, y = _linear_task(4, wrong=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        autoattack_accuracy(model, x * 2 - 1, y)  # normalized inputs
    with pytest.raises(ValueError, match="y \\[N\\]"):
        autoattack_accuracy(model, x, y[:3])
    with pytest.raises(ValueError, match="labels"):
        autoattack_accuracy(model, x, y + 10)
