"""Exact Tr(H) of piecewise-linear networks as Tr(G), against dense float64 Hessians."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from flatcli import archs
from flatcli.checkpoints import load_checkpoint
from flatcli.errors import FlatcliError
from flatcli.measures.gauss_newton import gauss_newton_trace, piecewise_linear_network
from flatcli.measures.hessian import hessian_trace
from flatcli.measures.params import batches_for, evaluating, select_params

from . import models
from .dense import dense_hessian

ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    """conv → BN → ReLU → conv → BN, plus a skip connection, then LeakyReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.act(h + x)


def residual_net() -> nn.Module:
    """Every kind of piece the route allows: convs, eval BatchNorm with non-trivial
    statistics, a residual sum, max and average pooling, flatten, ReLU6, dropout."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        Block(2),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(8, 5),
        nn.ReLU6(),
        nn.Linear(5, 3),
    ).double()
    g = models.seeded(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(2, generator=g, dtype=torch.float64))
                m.running_var.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(1 + 0.3 * torch.randn(2, generator=g, dtype=torch.float64))
        model[-3].weight.mul_(3.0)  # some units past ReLU6's upper kink
    return model.eval()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    return models.classification_data(n=10, shape=(2, 4, 4))


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("params", ["all", "3", "8.weight"])
def test_trace_is_the_dense_hessian_trace(loss: str, params: str) -> None:
    model = residual_net()
    x, y = data()
    assert piecewise_linear_network(model)
    got = hessian_trace(model, (x, y), loss=loss, params=params, method="exact", batch_size=4)
    want = float(dense_hessian(model, select_params(model, params), x, y, loss).trace())
    assert got.stderr is None and abs(want) > 1e-3
    assert got.value == pytest.approx(want, rel=1e-10)
    assert got.method.startswith("exact (Gauss-Newton diagonal: the network is piecewise linear")
    assert got.details["classes"] == 3 and got.details["engine"] == "gauss_newton"


def test_a_small_budget_chunks_the_samples_and_gives_the_same_trace() -> None:
    model = residual_net()
    x, y = data()
    names = select_params(model)
    with evaluating(model), torch.no_grad():
        batches = batches_for(model, (x, y), batch_size=10)
        free = gauss_newton_trace(model, batches, "cross_entropy", names, budget=2**30)
        p = sum(q.numel() for q in model.parameters())
        tight = gauss_newton_trace(model, batches, "cross_entropy", names, budget=40 * p * 8)
        with pytest.raises(FlatcliError, match="--max-memory .* raise --max-memory"):
            gauss_newton_trace(model, batches, "cross_entropy", names, budget=100)
    assert free.details["chunk_rows"] >= 10 > tight.details["chunk_rows"]
    assert "samples at a time" in tight.method
    assert tight.value == pytest.approx(free.value, rel=1e-12)


def test_auto_takes_it_for_a_piecewise_linear_network_of_any_size() -> None:
    ck = load_checkpoint(ROOT / "sample_models" / "digits_mlp.safetensors")  # 6,570 > 2,000
    x = torch.rand(40, 64, generator=models.seeded(1))
    y = torch.randint(0, 10, (40,), generator=models.seeded(2))
    got = hessian_trace(ck.model, (x, y))
    assert got.stderr is None
    assert got.method.endswith("10 per-sample backward passes; auto: a piecewise-linear network)")
    probes = hessian_trace(ck.model, (x, y), method="hutchinson", rtol=0.02, seed=1)
    assert abs(probes.value - got.value) <= 4 * probes.stderr  # Hutchinson when asked


def test_the_structure_decides_and_only_known_pieces_count() -> None:
    assert piecewise_linear_network(residual_net())
    assert piecewise_linear_network(archs.resnet18(width=2))
    assert piecewise_linear_network(archs.cnn())
    assert not piecewise_linear_network(models.mlp("tanh"))
    assert not piecewise_linear_network(models.mlp("gelu"))
    assert not piecewise_linear_network(models.Tied())  # a weight entering twice
    assert not piecewise_linear_network(models.ControlFlow())  # does not trace
    no_stats = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False))
    assert not piecewise_linear_network(no_stats)  # batch statistics: samples interact
    twice = nn.Linear(4, 4)
    assert not piecewise_linear_network(nn.Sequential(twice, nn.ReLU(), twice))

    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h * h)  # a product of two activations is not piecewise linear

    assert not piecewise_linear_network(Bilinear())
    tanh_net = models.init(models.TanhHead())
    x, y = models.classification_data()
    assert hessian_trace(tanh_net, (x, y), method="exact").method == "exact (diagonal by HVP)"
