"""Plain PyTorch definitions of the models ``study export --robustbench`` writes.

This module imports nothing but ``torch``: ``study export NAME --robustbench DIR``
copies it into ``DIR/model.py`` (with ``build_model()`` and ``load_model(path)`` for
the exported run appended), so that the exported weights load with torch alone.

The state-dict names are those of RobustBench's model zoo
(``robustbench/model_zoo/architectures``):

* :class:`ResNet` (with :class:`BasicBlock`): RobustBench's ``ResNet``
  (``ResNet18()`` = ``ResNet(BasicBlock, [2, 2, 2, 2])``).
* :class:`PreActResNet` (with :class:`PreActBlockV2`): RobustBench's ``PreActResNet``
  with ``PreActBlockV2`` (the projection shortcut takes the pre-activated input, as
  in Wong et al., 2020 and Rice et al., 2020) and ``bn_before_fc``.
* :class:`WideResNet` (with :class:`NetworkBlock` and :class:`WideBasicBlock`):
  RobustBench's (TRADES') ``WideResNet`` without ``sub_block1``.
* :class:`SmallCNN`: no RobustBench counterpart (three conv-BN-ReLU layers).

Inputs are images in [0, 1]; the per-channel normalisation is inside the model, as
the buffers ``mu`` and ``sigma`` of shape ``[1, C, 1, 1]`` (RobustBench's convention,
e.g. its ``Rice2020OverfittingNetL2``); a model trained without normalisation has
``mu = 0`` and ``sigma = 1``. The classifier pools with a global average pool (the
same as RobustBench's ``avg_pool2d(out, 4)``/``(out, 8)`` on 32×32 images, and it
works at any input size). Every model returns logits ``[B, num_classes]``.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Normalized(nn.Module):
    """Holds the input normalisation buffers ``mu`` and ``sigma`` (``[1, C or 1, 1, 1]``).

    Args:
        in_channels: channels C of the input images.
        mean: per-channel mean of the normalisation (one value for all channels, or C).
        std: per-channel standard deviation (one value or C values, positive).
    """

    mu: Tensor
    sigma: Tensor

    def __init__(self, in_channels: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        mu = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        sigma = torch.tensor([float(s) for s in std], dtype=torch.float32)
        if len(mu) not in (1, in_channels) or len(sigma) not in (1, in_channels):
            raise ValueError(f"mean and std: give one value or {in_channels} (one per channel)")
        self.register_buffer("mu", mu.view(1, -1, 1, 1))
        self.register_buffer("sigma", sigma.view(1, -1, 1, 1))

    def normalize(self, x: Tensor) -> Tensor:
        """``(x - mu) / sigma`` of images ``x`` in [0, 1]."""
        return (x - self.mu) / self.sigma


def _pool_flatten(x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


# --- ResNet-18 -----------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

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


def _stages(block: type[nn.Module], num_blocks: tuple[int, ...]) -> list[nn.Sequential]:
    """Four stages of ``block``s, widths 64, 128, 256, 512, strides 1, 2, 2, 2."""
    stages, in_planes = [], 64
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
        layers = []
        for stride in [1 if i == 0 else 2] + [1] * (n - 1):
            layers.append(block(in_planes, planes, stride))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return stages


class ResNet(_Normalized):
    """CIFAR-style ResNet (3×3 stride-1 stem, no max-pool), RobustBench's layout.

    Args:
        num_blocks: blocks per stage (``(2, 2, 2, 2)``: ResNet-18).
        num_classes: number of logits.
        in_channels: channels of the input images.
        mean: per-channel input mean (normalisation inside the model).
        std: per-channel input standard deviation.
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
    ) -> None:
        super().__init__(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(BasicBlock, num_blocks)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(_pool_flatten(out))


# --- PreAct-ResNet-18 ----------------------------------------------------------------------
class PreActBlockV2(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv plus the shortcut; a projection
    shortcut (where the shape changes) takes the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(_Normalized):
    """CIFAR-style pre-activation ResNet, RobustBench's layout (``PreActBlockV2``).

    Args:
        num_blocks: blocks per stage (``(2, 2, 2, 2)``: PreAct-ResNet-18).
        num_classes: number of logits.
        in_channels: channels of the input images.
        bn_before_fc: BN-ReLU after the last stage (module ``bn``).
        mean: per-channel input mean (normalisation inside the model).
        std: per-channel input standard deviation.
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        bn_before_fc: bool = True,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
    ) -> None:
        super().__init__(in_channels, mean, std)
        self.bn_before_fc = bn_before_fc
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(PreActBlockV2, num_blocks)
        if bn_before_fc:
            self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.bn_before_fc:
            out = F.relu(self.bn(out))
        return self.linear(_pool_flatten(out))


# --- WideResNet-34-10 ----------------------------------------------------------------------
class WideBasicBlock(nn.Module):
    """WideResNet block (TRADES): BN-ReLU-conv-BN-ReLU-conv plus the shortcut; where the
    widths differ, a 1×1 ``convShortcut`` takes the pre-activated input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.convShortcut(out) if self.convShortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    """``n`` :class:`WideBasicBlock`\\ s in ``layer``; the first one strided."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1
                )
                for i in range(n)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(_Normalized):
    """WideResNet-``depth``-``widen_factor`` (TRADES), RobustBench's layout.

    Args:
        depth: ``6n + 4`` (34 for WRN-34-10).
        widen_factor: widening factor (10 for WRN-34-10).
        num_classes: number of logits.
        in_channels: channels of the input images.
        mean: per-channel input mean (normalisation inside the model).
        std: per-channel input standard deviation.
    """

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
    ) -> None:
        super().__init__(in_channels, mean, std)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth = {depth}; must be 6n + 4 with n >= 1")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        return self.fc(_pool_flatten(out))


# --- small CNN -----------------------------------------------------------------------------
class SmallCNN(_Normalized):
    """Three conv-BN-ReLU layers (``width``, ``2 width``, ``4 width`` channels), global
    average pool and a linear layer.

    Args:
        num_classes: number of logits.
        in_channels: channels of the input images.
        width: channels of the first convolution.
        stem_stride: stride of the first convolution (1 or 2); ``None``: 1 for inputs of
            at most 16×16 pixels, 2 for larger ones.
        mean: per-channel input mean (normalisation inside the model).
        std: per-channel input standard deviation.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 32,
        stem_stride: int | None = None,
        mean: tuple[float, ...] = (0.0,),
        std: tuple[float, ...] = (1.0,),
    ) -> None:
        super().__init__(in_channels, mean, std)
        self.stem_stride = stem_stride
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.normalize(x)
        stride = self.stem_stride
        if stride is None:
            stride = 2 if min(x.shape[-2:]) > 16 else 1
        out = F.relu(self.bn1(F.conv2d(x, self.conv1.weight, None, stride, 1)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.fc(_pool_flatten(out))
