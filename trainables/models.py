"""Models by name, built through one factory: :func:`create_model`.

All models take images in [0, 1] (no normalisation layer outside the model),
any spatial size (adaptive average pooling before the classifier) and any
number of channels, and return logits ``[B, num_classes]``.

========================  ===================================================
name                      model
========================  ===================================================
``resnet18``              ResNet-18, CIFAR variant (3×3 stem, no max-pool)
``preact_resnet18``       Pre-activation ResNet-18, CIFAR variant
``wrn34_10``              WideResNet-34-10 (TRADES' architecture)
``small_cnn``             a small BatchNorm CNN that trains in seconds on a CPU
========================  ===================================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.errors import ConfigError
from trainables.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` inside the model (off unless asked for)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def _with_normalization(body: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None):
    if mean is None and std is None:
        return body
    if mean is None or std is None:
        raise ConfigError("model_kwargs: give both mean and std for input normalisation")
    return nn.Sequential(Normalize(mean, std), body)


# --- ResNet-18 (CIFAR variant) ---------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stride-1 stem, four stages, global average pool."""

    def __init__(
        self,
        block: type[nn.Module],
        num_blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        preact: bool = False,
    ) -> None:
        super().__init__()
        self.preact = preact
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)  # pre-act: applied after the last stage instead
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for s in [stride] + [1] * (n - 1):
                layers.append(block(self.in_planes, planes, s))
                self.in_planes = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if preact:
            self.bn1 = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# --- WideResNet-34-10 (TRADES) -----------------------------------------------------
class WideBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.shortcut = (
            None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.equal else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(nn.Module):
    """WideResNet as in TRADES' code (depth 34, widen factor 10 by default)."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"wideresnet depth = {depth}; must be 6n + 4")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for i, stride in enumerate((1, 2, 2)):
            layers = [WideBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                stride if j == 0 else 1) for j in range(n)]  # fmt: skip
            blocks.append(nn.Sequential(*layers))
        self.block1, self.block2, self.block3 = blocks
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


# --- small CNN ------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers and a linear head; ``width`` channels in the first.

    Fast on a CPU: for 8×8 digits it runs at full resolution; larger inputs are
    downsampled by strided convolutions so that 32×32 images stay cheap.
    """

    def __init__(self, num_classes: int, in_channels: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, 1, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False),
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] > 16:  # keep large images cheap: one extra downsampling
            x = F.avg_pool2d(x, 2)
        out = self.features(x)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@MODELS.register("resnet18")
def _resnet18(num_classes: int, in_channels: int) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("preact_resnet18")
def _preact_resnet18(num_classes: int, in_channels: int) -> nn.Module:
    return ResNet(PreActBlock, (2, 2, 2, 2), num_classes, in_channels, preact=True)


@MODELS.register("wrn34_10")
def _wrn34_10(num_classes: int, in_channels: int, depth: int = 34, widen: int = 10) -> nn.Module:
    return WideResNet(depth, widen, num_classes, in_channels)


@MODELS.register("small_cnn")
def _small_cnn(num_classes: int, in_channels: int, width: int = 32) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :data:`MODELS` (``resnet18``, ``preact_resnet18``, ``wrn34_10``,
            ``small_cnn``).
        num_classes: number of output logits.
        in_channels: channels of the input images (1 for digits, 3 for CIFAR).
        mean, std: optional per-channel input normalisation inside the model
            (inputs stay in [0, 1] for the attacks).
        **kwargs: model-specific options (``width`` of ``small_cnn``; ``depth``,
            ``widen`` of ``wrn34_10``); an unknown option is an error.

    Example:
        >>> model = create_model("resnet18", num_classes=10, in_channels=3)
    """
    factory = MODELS.get(name)
    accepted = set(inspect.signature(factory).parameters) - {"num_classes", "in_channels"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"model {name!r} has no option(s) {unknown}; its options: "
            f"{', '.join(sorted(accepted)) or 'none'}"
        )
    return _with_normalization(factory(num_classes, in_channels, **kwargs), mean, std)
