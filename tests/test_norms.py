"""Norm-based measures against hand computation (docs/measures.md, "Norms")."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from flatcli.errors import FlatcliError
from flatcli.measures.norms import (
    distance_from_init,
    frobenius_norms,
    path_norm,
    spectral_norms,
)


def conv_and_linear() -> nn.Module:
    """conv kernel (2, 1, 2, 2) → rows e₁ and 2e₂ of R⁴; fc weight diag(3, 4)."""
    model = nn.ModuleDict({"conv": nn.Conv2d(1, 2, 2), "fc": nn.Linear(2, 2)}).double()
    with torch.no_grad():
        model["conv"].weight.zero_()
        model["conv"].weight[0, 0, 0, 0] = 1.0
        model["conv"].weight[1, 0, 0, 1] = 2.0
        model["conv"].bias.fill_(100.0)  # biases are not weights: must not count
        model["fc"].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        model["fc"].bias.fill_(100.0)
    return model


def test_frobenius_by_hand() -> None:
    got = frobenius_norms(conv_and_linear())
    assert got.value == pytest.approx(5 + 25)  # ‖conv‖² = 1 + 4, ‖fc‖² = 9 + 16
    assert got.details["per_layer"] == pytest.approx({"conv": math.sqrt(5), "fc": 5.0})
    assert got.details["log_product"] == pytest.approx(math.log(math.sqrt(5)) + math.log(5))
    assert got.stderr is None


def test_spectral_by_hand() -> None:
    got = spectral_norms(conv_and_linear())
    assert got.value == pytest.approx(2**2 + 4**2)
    assert got.details["per_layer"] == pytest.approx({"conv": 2.0, "fc": 4.0})
    assert got.details["log_product"] == pytest.approx(math.log(2) + math.log(4))


def test_tied_weight_counts_once() -> None:
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    b.weight = a.weight
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    got = frobenius_norms(nn.Sequential(a, b))
    assert got.value == pytest.approx(25.0)
    assert list(got.details["per_layer"]) == ["0"]


def test_path_norm_by_hand() -> None:
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(2, 2), act=nn.ReLU(), fc2=nn.Linear(2, 1))
    ).double()
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
        model.fc1.bias.copy_(torch.tensor([-1.0, 2.0]))
        model.fc2.weight.copy_(torch.tensor([[2.0, -1.0]]))
        model.fc2.bias.copy_(torch.tensor([0.5]))
    before = copy.deepcopy(model.state_dict())
    got = path_norm(model, (2,))
    # squared: h = [1 + 4 + 1, 9 + 0.25 + 4] = [6, 13.25]; out = 4·6 + 1·13.25 + 0.25
    assert got.value == pytest.approx(37.5)
    assert got.details["sqrt"] == pytest.approx(math.sqrt(37.5))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_distance_from_init_by_hand() -> None:
    model = conv_and_linear()
    init = copy.deepcopy(model)
    with torch.no_grad():
        init["fc"].weight[0, 1] += 3.0
        init["conv"].bias[0] -= 4.0  # biases count in the distance
    got = distance_from_init(model, init)
    assert got.value == pytest.approx(5.0)
    assert got.details["per_parameter"]["fc.weight"] == pytest.approx(3.0)
    assert got.details["per_parameter"]["conv.bias"] == pytest.approx(4.0)
    assert got.details["per_parameter"]["conv.weight"] == 0.0


def test_bad_inputs() -> None:
    with pytest.raises(FlatcliError, match="no nn.Linear or nn.Conv"):
        frobenius_norms(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    model = conv_and_linear()
    other = nn.ModuleDict({"conv": nn.Conv2d(1, 3, 2), "fc": nn.Linear(2, 2)}).double()
    with pytest.raises(FlatcliError, match="shape"):
        distance_from_init(model, other)
    with pytest.raises(FlatcliError, match="no parameter 'fc.weight'"):
        distance_from_init(model, nn.ModuleDict({"conv": nn.Conv2d(1, 2, 2)}))
