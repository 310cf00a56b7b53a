"""Models by name: logits for any input size and channel count, standard parameter
counts, clear errors for unknown names and options, and a small CNN that learns."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.errors import ConfigError
from trainables.models import MODELS, Normalize, create_model

SHAPES = {1: (8,), 3: (32, 64)}  # input channels -> spatial sizes run through one model


@cache
def _model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """One eval-mode model per (name, classes, channels): the big ones are slow to build."""
    return create_model(name, num_classes=num_classes, in_channels=in_channels).eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_registered_names() -> None:
    assert MODELS.names() == ["preact_resnet18", "resnet18", "small_cnn", "wrn34_10"]


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("in_channels", sorted(SHAPES))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_logits_for_any_input_size_and_channels(
    name: str, in_channels: int, num_classes: int
) -> None:
    model = _model(name, num_classes, in_channels)
    sizes = SHAPES[in_channels]
    if name == "wrn34_10" and num_classes == 100:
        sizes = sizes[:1]  # 64x64 through WRN-34-10 takes seconds; done once, with 10 classes
    torch.manual_seed(0)
    for size in sizes:
        with torch.no_grad():
            out = model(torch.rand(2, in_channels, size, size))
        assert out.shape == (2, num_classes), (name, in_channels, size)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_standard_parameter_counts() -> None:
    assert _count(_model("resnet18", 10, 3)) == 11_173_962
    assert _count(_model("wrn34_10", 10, 3)) == 46_160_474
    # with the final BN-ReLU of He et al. (2016), as in Wong et al. / Rice et al.
    assert _count(_model("preact_resnet18", 10, 3)) == 11_172_170
    # without it, as in kuangliu/pytorch-cifar
    no_final = create_model("preact_resnet18", num_classes=10, final_bn=False)
    assert _count(no_final) == 11_171_146
    assert _count(create_model("small_cnn", num_classes=10, in_channels=1)) == 94_186
    assert _count(create_model("small_cnn", num_classes=10, in_channels=1, width=8)) == 6_274


def test_every_model_has_batchnorm() -> None:
    # the training methods rely on train/eval differences
    for name in MODELS.names():
        model = _model(name, 10, 3)
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), name


def test_wrn_initialisation_follows_trades() -> None:
    model = create_model("wrn34_10", num_classes=10, depth=10, widen=1)
    conv = model.block2[0].conv1  # 3x3, 16 -> 32 channels: He-normal std sqrt(2 / (9 * 32))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 32)) ** 0.5, rel=0.1)
    assert torch.all(model.bn.weight == 1) and torch.all(model.bn.bias == 0)
    assert torch.all(model.fc.bias == 0)


def test_unknown_model_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'vit'") as info:
        create_model("vit", num_classes=10)
    for name in MODELS.names():
        assert name in str(info.value)


@pytest.mark.parametrize(
    "name,kwargs,pattern",
    [
        ("small_cnn", {"depth": 3}, r"model 'small_cnn' has no option\(s\) 'depth'.*width"),
        ("resnet18", {"width": 3}, r"model 'resnet18' has no option\(s\) 'width'"),
        ("wrn34_10", {"widen_factor": 4}, r"'wrn34_10' has no option\(s\) 'widen_factor'.*widen"),
    ],
)
def test_unknown_option_names_the_model_and_the_option(
    name: str, kwargs: dict[str, int], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        create_model(name, num_classes=10, **kwargs)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("small_cnn", {"width": 0}),
        ("small_cnn", {"stem_stride": 3}),
        ("wrn34_10", {"depth": 33}),
        ("wrn34_10", {"widen": 0}),
        ("small_cnn", {"num_classes": 0}),
        ("small_cnn", {"in_channels": 0}),
        ("small_cnn", {"mean": [0.5]}),  # std missing
        ("small_cnn", {"mean": [0.5, 0.5], "std": [0.2, 0.2]}),  # 2 values, 3 channels
        ("small_cnn", {"mean": 0.5, "std": 0.0}),
    ],
)
def test_bad_option_values_are_config_errors(name: str, kwargs: dict) -> None:
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ConfigError):
        create_model(name, **kwargs)


def test_input_normalisation_inside_the_model_is_off_by_default() -> None:
    assert not any(
        isinstance(m, Normalize) for m in create_model("small_cnn", num_classes=3).modules()
    )
    model = create_model(
        "small_cnn", num_classes=3, in_channels=2, mean=[0.5, 0.25], std=[0.25, 0.5]
    ).eval()
    x = torch.rand(4, 2, 8, 8)
    expected = (x - torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)) / torch.tensor([0.25, 0.5]).view(
        1, 2, 1, 1
    )
    with torch.no_grad():
        assert torch.allclose(model(x), model.model(expected), atol=1e-6)
    assert set(model.state_dict()) >= {"normalize.mean", "normalize.std"}
    # one value serves every channel
    one = create_model("small_cnn", num_classes=3, in_channels=2, mean=0.5, std=0.25).eval()
    with torch.no_grad():
        assert torch.allclose(one(x), one.model((x - 0.5) / 0.25), atol=1e-6)


def test_small_cnn_stem_stride_is_automatic_by_input_size() -> None:
    torch.manual_seed(0)
    auto = create_model("small_cnn", num_classes=5, width=8).eval()
    for stride, size in [(1, 8), (1, 16), (2, 32)]:
        fixed = create_model("small_cnn", num_classes=5, width=8, stem_stride=stride).eval()
        fixed.load_state_dict(auto.state_dict())
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            assert torch.allclose(auto(x), fixed(x)), (stride, size)
    with torch.no_grad():  # the other stride gives other logits: the choice is real
        other = create_model("small_cnn", num_classes=5, width=8, stem_stride=1).eval()
        other.load_state_dict(auto.state_dict())
        x = torch.rand(2, 3, 32, 32)
        assert not torch.allclose(auto(x), other(x))


def test_small_cnn_gives_input_gradients_and_differs_between_train_and_eval() -> None:
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    x = torch.rand(16, 1, 8, 8, requires_grad=True)
    loss = F.cross_entropy(model(x), torch.arange(16) % 10)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(model.train()(x), model.eval()(x))


def test_small_cnn_learns_a_separable_task() -> None:
    gen = torch.Generator().manual_seed(0)
    prototypes = torch.rand(4, 1, 8, 8, generator=gen)  # four classes, one prototype each
    y = torch.arange(128) % 4
    x = (prototypes[y] + 0.15 * torch.randn(128, 1, 8, 8, generator=gen)).clamp(0, 1)
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=4, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(50):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.0  # chance level is ln 4 = 1.39
    assert losses[-1] < 0.2 * losses[0]
    # in eval mode (running BN statistics), on the training set and on fresh samples
    x_new = (prototypes[y] + 0.15 * torch.randn(128, 1, 8, 8, generator=gen)).clamp(0, 1)
    with torch.no_grad():
        assert (model.eval()(x).argmax(1) == y).float().mean().item() >= 0.95
        assert (model(x_new).argmax(1) == y).float().mean().item() >= 0.9
