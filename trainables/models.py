"""Models by name, built through one factory: :func:`create_model`.

All models take images in [0, 1] (there is no normalisation layer outside the
model; an optional per-channel one inside it is asked for with ``mean``/``std``),
any spatial size (adaptive average pooling before the classifier) and any number
of channels, and return logits ``[B, num_classes]``.

===================  =================================================  ===============
name                 model                                              params (K = 10)
===================  =================================================  ===============
``resnet18``         ResNet-18, CIFAR variant (3×3 stem, no max-pool)   11,173,962
``preact_resnet18``  Pre-activation ResNet-18, CIFAR variant            11,172,170
``wrn34_10``         WideResNet-34-10 as in TRADES                      46,160,474
``small_cnn``        three conv-BN-ReLU layers, trains in seconds       94,186 (1 ch.)
===================  =================================================  ===============

``preact_resnet18`` ends with the BN-ReLU of He et al. (2016) after the last
stage, as the adversarial-training code of Wong et al. (2020) and Rice et al.
(2020) does; ``final_bn=False`` drops it (the ``kuangliu/pytorch-cifar`` variant,
11,171,146 parameters).

Every factory in :data:`MODELS` is called as ``factory(num_classes, in_channels,
**options)``; :func:`create_model` checks the options against the factory's
signature, so a misspelt option fails at once with the model's option list.
"""

from __future__ import annotations

import inspect
import numbers
import operator
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.errors import ConfigError
from trainables.registry import Registry

__all__ = [
    "MODELS",
    "BasicBlock",
    "Normalize",
    "PreActBlock",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "WideBasicBlock",
    "WideResNet",
    "accelerate",
    "create_model",
]

#: Model factories by name; each is called as ``factory(num_classes, in_channels, **options)``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

_STAGE_WIDTHS = (64, 128, 256, 512)


# --- input normalisation -----------------------------------------------------------
class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``, so that attacks still work on [0, 1] inputs.

    Args:
        mean: one value per input channel (or one value for all channels).
        std: one positive value per input channel (or one value for all channels).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def _as_floats(field: str, value: Any, in_channels: int) -> list[float]:
    """``value`` (a number or a sequence of numbers) as one float or one per channel."""
    try:
        values = [float(value)] if isinstance(value, numbers.Real) else [float(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"model option {field} = {value!r}; must be numbers") from None
    if len(values) not in (1, in_channels):
        raise ConfigError(
            f"model option {field} has {len(values)} values for {in_channels} input channels; "
            f"give one value or one per channel"
        )
    return values


def _with_normalization(
    body: nn.Module,
    in_channels: int,
    mean: Sequence[float] | float | None,
    std: Sequence[float] | float | None,
) -> nn.Module:
    """``body`` itself, or ``Sequential(normalize=Normalize(mean, std), model=body)``."""
    if mean is None and std is None:
        return body
    if mean is None or std is None:
        raise ConfigError("model options: give both mean and std for input normalisation")
    mean_ = _as_floats("mean", mean, in_channels)
    std_ = _as_floats("std", std, in_channels)
    if min(std_) <= 0:
        raise ConfigError(f"model option std = {std_}; every value must be positive")
    return nn.Sequential(OrderedDict(normalize=Normalize(mean_, std_), model=body))


def _pool_flatten(x: Tensor) -> Tensor:
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


# --- ResNet-18 (CIFAR variant) -----------------------------------------------------
class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

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
    """Pre-activation residual block (He et al., 2016): BN-ReLU-conv-BN-ReLU-conv + shortcut.

    A projection shortcut, where one is needed, takes the pre-activated input.
    """

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


def _stages(
    block: Callable[[int, int, int], nn.Module], num_blocks: Sequence[int]
) -> list[nn.Sequential]:
    """Four stages of ``block``s, widths 64..512, the first stride 1 and the others 2."""
    stages, in_planes = [], _STAGE_WIDTHS[0]
    for i, (planes, n) in enumerate(zip(_STAGE_WIDTHS, num_blocks, strict=True)):
        strides = [1 if i == 0 else 2] + [1] * (n - 1)
        layers = []
        for stride in strides:
            layers.append(block(in_planes, planes, stride))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    return stages


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stride-1 stem without max-pool, four stages, global pool.

    Args:
        num_blocks: blocks per stage (``(2, 2, 2, 2)`` for ResNet-18).
        num_classes: number of logits.
        in_channels: channels of the input images.
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(BasicBlock, num_blocks)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(_pool_flatten(out))


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet (3×3 stride-1 stem, no max-pool).

    Args:
        num_blocks: blocks per stage (``(2, 2, 2, 2)`` for PreActResNet-18).
        num_classes: number of logits.
        in_channels: channels of the input images.
        final_bn: BN-ReLU after the last stage (He et al., 2016; Wong et al., 2020;
            Rice et al., 2020); without it the pooled features are the raw residual sum.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int,
        in_channels: int,
        final_bn: bool = True,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.layer1, self.layer2, self.layer3, self.layer4 = _stages(PreActBlock, num_blocks)
        self.bn = nn.BatchNorm2d(512) if final_bn else None
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        if self.bn is not None:
            out = F.relu(self.bn(out))
        return self.linear(_pool_flatten(out))


# --- WideResNet (TRADES) -----------------------------------------------------------
class WideBasicBlock(nn.Module):
    """WideResNet block as in TRADES: BN-ReLU-conv-BN-ReLU-(dropout)-conv + shortcut.

    Where input and output widths differ, the 1×1 projection shortcut takes the
    pre-activated input (as TRADES' ``BasicBlock`` does).
    """

    def __init__(
        self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.drop_rate = drop_rate
        self.shortcut: nn.Module | None = None
        if in_planes != out_planes:
            self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WideResNet-``depth``-``widen`` as in TRADES' ``models/wideresnet.py``.

    Three groups of ``(depth - 4) / 6`` blocks, widths ``16k, 32k, 64k``, strides
    1, 2, 2, then BN-ReLU, global average pool and a linear layer. Initialisation
    as in the reference: convolutions He-normal (fan-out), BN weight 1 and bias 0,
    linear bias 0.

    Args:
        depth: ``6n + 4`` (34 for WRN-34-10).
        widen: widening factor ``k`` (10 for WRN-34-10).
        num_classes: number of logits.
        in_channels: channels of the input images.
        drop_rate: dropout between the two convolutions of a block (0 in TRADES).
    """

    def __init__(
        self,
        depth: int,
        widen: int,
        num_classes: int,
        in_channels: int,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        depth = _positive_int("wrn34_10", "depth", depth)
        widen = _positive_int("wrn34_10", "widen", widen)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(f"model 'wrn34_10': depth = {depth}; must be 6n + 4 with n >= 1")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"model 'wrn34_10': drop_rate = {drop_rate}; must be in [0, 1)")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        groups = []
        for i, stride in enumerate((1, 2, 2)):
            blocks = [
                WideBasicBlock(
                    widths[i] if j == 0 else widths[i + 1],
                    widths[i + 1],
                    stride if j == 0 else 1,
                    drop_rate,
                )
                for j in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
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
        return self.fc(_pool_flatten(out))


# --- small CNN ---------------------------------------------------------------------
class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (``width``, ``2 width``, ``4 width`` channels) and a linear head.

    The second and third convolutions have stride 2 (8×8 digits: 8 → 4 → 2). The
    first has stride ``stem_stride``; by default (``None``) it is chosen per input:
    1 for inputs of at most 16×16, 2 for larger ones, so that a 32×32 CIFAR image
    costs about as much as a 16×16 one (32 → 16 → 8 → 4). The weights are the same
    either way.

    Args:
        num_classes: number of logits.
        in_channels: channels of the input images.
        width: channels of the first convolution.
        stem_stride: stride of the first convolution (1 or 2), or ``None`` for automatic.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: int = 32,
        stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        width = _positive_int("small_cnn", "width", width)
        if stem_stride not in (None, 1, 2):
            raise ConfigError(
                f"model 'small_cnn': stem_stride = {stem_stride}; must be 1, 2 or null"
            )
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
        stride = self.stem_stride
        if stride is None:
            stride = 2 if min(x.shape[-2:]) > 16 else 1
        out = F.conv2d(x, self.conv1.weight, None, stride, 1)
        out = F.relu(self.bn1(out))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        return self.fc(_pool_flatten(out))


# --- registered factories ----------------------------------------------------------
@MODELS.register("resnet18")
def _resnet18(num_classes: int, in_channels: int) -> nn.Module:
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


@MODELS.register("preact_resnet18")
def _preact_resnet18(num_classes: int, in_channels: int, final_bn: bool = True) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, final_bn=final_bn)


@MODELS.register("wrn34_10")
def _wrn34_10(
    num_classes: int,
    in_channels: int,
    depth: int = 34,
    widen: int = 10,
    drop_rate: float = 0.0,
) -> nn.Module:
    return WideResNet(depth, widen, num_classes, in_channels, drop_rate=drop_rate)


@MODELS.register("small_cnn")
def _small_cnn(
    num_classes: int, in_channels: int, width: int = 32, stem_stride: int | None = None
) -> nn.Module:
    return SmallCNN(num_classes, in_channels, width=width, stem_stride=stem_stride)


def _positive_int(model: str, field: str, value: Any) -> int:
    """``value`` as an int (numpy integers included) if it is one and >= 1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise ConfigError(f"model {model!r}: {field} = {value!r}; must be an integer >= 1")
    return number


def _options(factory: Callable[..., nn.Module]) -> tuple[list[str], bool]:
    """The keyword options of ``factory`` (after its two positional arguments), and
    whether it takes ``**kwargs``."""
    params = list(inspect.signature(factory).parameters.values())[2:]
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model; inputs in [0, 1], any size, logits ``[B, num_classes]``.

    Args:
        name: a name in :data:`MODELS`: ``resnet18``, ``preact_resnet18``, ``wrn34_10``
            or ``small_cnn``; an unknown name raises :class:`ConfigError` listing them.
        num_classes: number of output logits (>= 1).
        in_channels: channels of the input images (1 for digits, 3 for CIFAR).
        mean: optional per-channel input mean (one value, or one per channel) of a
            normalisation inside the model; give it together with ``std``. Off by
            default. With it, the model is ``Sequential(normalize=..., model=...)``.
        std: optional per-channel input standard deviation (positive), with ``mean``.
        **kwargs: options of the chosen model; an unknown one raises
            :class:`ConfigError` naming the model, the option and the model's options.

            * ``small_cnn``: ``width`` (default 32), ``stem_stride`` (1, 2 or ``None``
              for 1 up to 16×16 inputs and 2 above).
            * ``preact_resnet18``: ``final_bn`` (default ``True``).
            * ``wrn34_10``: ``depth`` (34), ``widen`` (10), ``drop_rate`` (0.0).
            * ``resnet18``: none.

    Returns:
        The model (an ``nn.Module`` in training mode, on the CPU, float32).

    Example:
        >>> import torch
        >>> model = create_model("small_cnn", num_classes=10, in_channels=1, width=16)
        >>> model(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
        >>> cifar_mean, cifar_std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
        >>> cifar = create_model("resnet18", num_classes=10, mean=cifar_mean, std=cifar_std)
    """
    factory = MODELS.get(name)
    num_classes = _positive_int(name, "num_classes", num_classes)
    in_channels = _positive_int(name, "in_channels", in_channels)
    options, open_ended = _options(factory)
    unknown = sorted(set(kwargs) - set(options))
    if unknown and not open_ended:
        raise ConfigError(
            f"model {name!r} has no option(s) {', '.join(map(repr, unknown))}; its options: "
            f"{', '.join(sorted([*options, 'mean', 'std']))}"
        )
    body = factory(num_classes, in_channels, **kwargs)
    return _with_normalization(body, in_channels, mean, std)


# --- runtime views for the hot loops -------------------------------------------------
class ChannelsLast(nn.Module):
    """``model`` fed channels_last (NHWC) inputs; its weights must be channels_last too
    (see :func:`accelerate`). Logits and input gradients are unchanged up to rounding."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def accelerate(
    model: nn.Module, *, channels_last: bool = False, compile: bool = False
) -> nn.Module:
    """A faster view of ``model`` for the attack, training and evaluation loops.

    The view shares ``model``'s parameters and buffers (an optimiser built on
    ``model.parameters()`` trains it; ``model.train()``/``eval()`` and the view's own
    mode switches reach the same modules), so checkpoints keep coming from
    ``model.state_dict()`` with unchanged keys.

    Args:
        model: the model (already on its device).
        channels_last: convert its 4-D weights to channels_last in place and feed it
            channels_last inputs (faster convolutions on GPUs with tensor cores).
        compile: ``torch.compile`` the view (one compilation per mode and input shape;
            the first batches are slow).

    Returns:
        ``model`` itself when neither option is on.
    """
    view = model
    if channels_last:
        model.to(memory_format=torch.channels_last)
        view = ChannelsLast(model)
    if compile:
        view = torch.compile(view)
    return view
