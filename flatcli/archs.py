"""Architectures that flatcli's own checkpoints name in their metadata.

A checkpoint's ``flatcli.arch`` metadata is only followed automatically when it
names a callable in this module: anything else executes code chosen by whoever
made the file, so it needs ``--arch`` (the user's own choice) or ``--trust-code``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


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
