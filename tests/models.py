"""Tiny float64 models for the numerical tests, each small enough for a dense Hessian."""

from __future__ import annotations

import torch
from torch import nn

from flatcli import archs


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def classification_data(
    n: int = 24, shape: tuple[int, ...] = (5,), classes: int = 3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic float64 parameters (scale 0.7 keeps softmax away from saturation)."""
    g = seeded(seed)
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.7 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model.eval()


def mlp(activation: str = "relu", bias: bool = True) -> nn.Module:
    """5 → 6 → 4 → 3 with layers fc1, fc2, fc."""
    return init(archs.mlp(5, [6, 4], 3, activation=activation, bias=bias))


class TanhHead(nn.Module):
    """A hidden layer with a non-trivial downstream part: fc1 → tanh → fc2 → tanh → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc = nn.Linear(5, 4), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class WithBatchNorm(nn.Module):
    """fc1 → BatchNorm1d (eval, non-trivial running stats) → ReLU → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc = nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.fc1(x))))


def with_batchnorm() -> nn.Module:
    model = init(WithBatchNorm())
    g = seeded(5)
    with torch.no_grad():
        model.bn.running_mean.copy_(torch.randn(6, generator=g, dtype=torch.float64))
        model.bn.running_var.copy_(torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    return model.eval()


class Residual(nn.Module):
    """A skip connection around the feature layer ``b`` (the fx split needs a context)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.fc(h + torch.tanh(self.b(h)))


class ControlFlow(nn.Module):
    """Data-dependent control flow: not traceable, so the split falls back to hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if float(h.detach().sum()) > -1e9:
            h = torch.tanh(self.b(h))
        return self.fc(h)


class Tied(nn.Module):
    """The feature layer's weight is reused by an earlier layer (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.a.weight = self.b.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.b(torch.tanh(self.a(x)))))


class SmallCNN(nn.Module):
    """conv (2→3, 3×3) → ReLU → conv (3→2, 2×2) → flatten → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 2)
        self.fc = nn.Linear(2 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        return self.fc(torch.tanh(self.conv2(h)).flatten(1))


def saturated_classifier(
    train_loss: float = 3e-6, seed: int = 0
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 ReLU MLP ``6 → 16 → 12 → 3`` (fc1, fc2, fc) trained to near-zero loss.

    Flatness is usually studied on such models, where the softmax is nearly one-hot: 200
    full-batch Adam steps on 240 separable Gaussian blobs reach 100% training accuracy;
    then the logits layer is scaled up (as training further on separable data does) until
    the mean training loss is ``train_loss``. Deterministic, and a fraction of a second.
    """
    g = seeded(seed)
    centres = 3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    y = torch.arange(240) % 3
    x = centres[y] + torch.randn(240, 6, generator=g, dtype=torch.float64)
    model = init(archs.mlp(6, [16, 12], 3), seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert bool((model(x).argmax(1) == y).all()), "the blobs were not separated"
    fc = model.fc
    w0, b0 = fc.weight.detach().clone(), fc.bias.detach().clone()

    def loss_at(scale: float) -> float:
        with torch.no_grad():
            fc.weight.copy_(scale * w0)
            fc.bias.copy_(scale * b0)
            return float(torch.nn.functional.cross_entropy(model(x), y))

    lo, hi = 1.0, 2.0
    while loss_at(hi) > train_loss:  # the loss falls with the scale: all samples are right
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if loss_at(mid) > train_loss else (lo, mid)
    loss_at(hi)
    return model.requires_grad_(True), x, y
