"""Models by name: shapes for any input, standard parameter counts, clear errors."""

from __future__ import annotations

import pytest
import torch

from trainables.errors import ConfigError
from trainables.models import MODELS, create_model


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 32), (3, 64)])
@pytest.mark.parametrize("classes", [10, 100])
def test_any_input_size_and_channels(name, channels, size, classes) -> None:
    if name == "wrn34_10" and (size > 32 or classes == 100):
        pytest.skip("big model: one shape is enough")
    model = create_model(name, num_classes=classes, in_channels=channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, classes)


def test_standard_parameter_counts() -> None:
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(create_model("resnet18", num_classes=10)) == 11_173_962
    assert count(create_model("wrn34_10", num_classes=10)) == 46_160_474
    # pre-activation ResNet-18 with the final BN-ReLU of He et al. (2016)
    assert count(create_model("preact_resnet18", num_classes=10)) == 11_172_170


def test_unknown_names_and_options() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'vit'.*resnet18"):
        create_model("vit", num_classes=10)
    with pytest.raises(ConfigError, match=r"no option\(s\) \['depth'\].*width"):
        create_model("small_cnn", num_classes=10, depth=3)


def test_input_normalisation_inside_the_model() -> None:
    model = create_model("small_cnn", num_classes=3, in_channels=1, mean=[0.5], std=[0.25]).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), model[1]((x - 0.5) / 0.25))


def test_small_cnn_learns_a_separable_task() -> None:
    torch.manual_seed(0)
    x = torch.rand(256, 1, 8, 8)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    model = create_model("small_cnn", num_classes=2, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
