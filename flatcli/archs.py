"""Architectures that flatcli's own checkpoints name in their metadata.

A checkpoint's ``flatcli.arch`` metadata is only followed automatically when it
names a callable in this module: anything else executes code chosen by whoever
made the file, so it needs ``--arch`` (the user's own choice) or ``--trust-code``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

BUILDERS: tuple[str, ...] = ("mlp", "cnn", "resnet18")
"""The builders a checkpoint's metadata may name (``flatcli.archs:<name>``), and no others."""


def mlp(
    in_features: int = 64,
    hidden: Sequence[int] = (64, 32),
    num_classes: int = 10,
    *,
    bias: bool = True,
    activation: str = "relu",
) -> nn.Sequential:
    """A fully connected network ``in → hidden… → num_classes``.

    Layers are named ``fc1``, ``fc2``, … and the last one ``fc`` (the default feature layer),
    with activations ``act1``, ``act2``, … between them.
    """
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity}
    if activation not in acts:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(acts)}")
    layers: dict[str, nn.Module] = {}
    width = in_features
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"] = nn.Linear(width, h, bias=bias)
        layers[f"act{i}"] = acts[activation]()
        width = h
    layers["fc"] = nn.Linear(width, num_classes, bias=bias)
    return nn.Sequential(OrderedDict(layers))


def cnn(
    in_channels: int = 1,
    channels: Sequence[int] = (8, 16),
    hidden: int = 32,
    num_classes: int = 10,
    image_size: int = 8,
) -> nn.Sequential:
    """A small ReLU CNN for 8×8 digits: ``conv1 → conv2 → fc1 → fc``.

    Convolutions use 3×3 kernels with padding 1 and a 2×2 max-pool after each.
    """
    layers: dict[str, nn.Module] = {}
    c, side = in_channels, image_size
    for i, ch in enumerate(channels, start=1):
        layers[f"conv{i}"] = nn.Conv2d(c, ch, 3, padding=1)
        layers[f"act_conv{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        c, side = ch, side // 2
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(c * side * side, hidden)
    layers["act1"] = nn.ReLU()
    layers["fc"] = nn.Linear(hidden, num_classes)
    return nn.Sequential(OrderedDict(layers))


class BasicBlock(nn.Module):
    """ResNet's two 3×3 convolutions with BatchNorm and an identity (or 1×1) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(channels),
            )
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


def resnet18(
    num_classes: int = 10, in_channels: int = 3, width: int = 64, *, hidden: int | None = None
) -> nn.Sequential:
    """ResNet-18 for small images (He et al. 2016), as used on CIFAR-10 by FAM and SAM.

    A 3×3 stem without max-pooling, four stages of two :class:`BasicBlock` each with
    ``width·(1, 2, 4, 8)`` channels (strides 1, 2, 2, 2), global average pooling and the
    classifier ``fc``: 11.2 M parameters at ``width=64`` and 10 classes. ``hidden`` inserts
    a penultimate ``fc1 → ReLU`` of that width before ``fc``, to put FAM on a hidden layer.
    """
    layers: dict[str, nn.Module] = {
        "conv1": nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
        "bn1": nn.BatchNorm2d(width),
        "act": nn.ReLU(),
    }
    c = width
    for i, (mult, stride) in enumerate(((1, 1), (2, 2), (4, 2), (8, 2)), start=1):
        out = width * mult
        layers[f"layer{i}"] = nn.Sequential(BasicBlock(c, out, stride), BasicBlock(out, out))
        c = out
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    if hidden is not None:
        layers["fc1"] = nn.Linear(c, hidden)
        layers["act1"] = nn.ReLU()
        c = hidden
    layers["fc"] = nn.Linear(c, num_classes)
    return nn.Sequential(OrderedDict(layers))
