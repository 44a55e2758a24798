"""Sharpness against a closed-form worst case (docs/measures.md, "sharpness").

The oracle: a linear model fitted exactly (``t_i = W x_i + b``) with
``ℓ_i = (1/d) ‖z_i − t_i‖²`` and inputs with **non-negative** entries. Perturbing all
parameters by ``U`` (bias as the last column, ``x̃_i = (x_i, 1) ≥ 0``) gives

    L(w + u) − L(w) = (1/d) Σ_s mean_i (u_s · x̃_i)²,

a convex quadratic whose maximum over a box ``|u_st| ≤ r_st`` is at the corner
``u_s = r_s`` (every ``x̃_i ≥ 0``, so that one corner maximizes every term at once):

    max increase = (1/d) Σ_s mean_i (r_s · x̃_i)².

Isotropic box (``r = α``): ``α² mean_i (1 + Σ_t x_it)²``, so ``α' = √(τ / that mean)``.
Magnitude-aware box (``r = α|w̃| + ε``): a quadratic in α, solved below.
"""

from __future__ import annotations

import math

import pytest
import torch

from flatcli.errors import FlatcliError, UsageError
from flatcli.measures.sharpness import sharpness

from . import models
from .test_pac_bayes import exact_fit

TAU = 0.1
DEPTH = 15


def augmented(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def test_isotropic_alpha_matches_the_box_corner() -> None:
    model, x, t = exact_fit(positive=True)
    want = math.sqrt(TAU / float(augmented(x).sum(1).pow(2).mean()))
    got = sharpness(model, (x, t), loss="mse", target="loss", alpha_max=0.5, batch_size=16)
    resolution = 0.5 / 2 ** (DEPTH + 1)
    assert abs(got.details["alpha"] - want) <= resolution
    assert got.value == 1 / got.details["alpha"] ** 2
    assert got.stderr is None
    assert got.details["increase"] == pytest.approx(TAU, rel=1e-3)


def test_magnitude_aware_alpha_matches_the_box_corner() -> None:
    model, x, t = exact_fit(positive=True)
    eps = 1e-3
    d = model.out_features
    w = torch.cat([model.weight, model.bias[:, None]], 1).detach().abs()  # (d, m + 1)
    xt = augmented(x)
    # increase(α) = (1/d) Σ_s mean_i (α a_si + ε b_i)² = A α² + B α + C,
    # with a_si = |w̃_s| · x̃_i and b_i = Σ_t x̃_it
    a, b = xt @ w.T, xt.sum(1, keepdim=True)
    qa = float((a**2).mean(0).sum()) / d
    qb = float((2 * eps * a * b).mean(0).sum()) / d
    qc = eps**2 * float((b**2).mean())
    want = (-qb + math.sqrt(qb**2 - 4 * qa * (qc - TAU))) / (2 * qa)
    got = sharpness(model, (x, t), loss="mse", target="loss", magnitude_aware=True, epsilon=eps)
    assert abs(got.details["alpha"] - want) <= 2.0 / 2 ** (DEPTH + 1)


def test_error_target_on_a_classifier_leaves_the_model_untouched() -> None:
    model = models.mlp().train()
    x, _ = models.classification_data(n=60)
    y = model.eval()(x).argmax(-1)  # the model's own labels: training error 0
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = sharpness(model, (x, y), search_depth=8, ascent_steps=5)
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert got.details["base"] == 0.0
    assert 0 < got.details["alpha"] < 2 and not got.details["hit_alpha_max"]
    assert all(p.grad is None for p in model.parameters())


def test_ascent_finds_more_than_the_random_start() -> None:
    model, x, t = exact_fit(positive=True)
    kwargs = dict(loss="mse", target="loss", alpha_max=0.5, search_depth=10)
    climbed = sharpness(model, (x, t), ascent_steps=20, **kwargs)
    random_only = sharpness(model, (x, t), ascent_steps=0, **kwargs)
    assert random_only.details["alpha"] > 1.2 * climbed.details["alpha"]


def test_bad_inputs() -> None:
    model, x, t = exact_fit(n=10, m=3, d=2)
    with pytest.raises(UsageError, match="class labels"):
        sharpness(model, (x, t), loss="mse")
    with pytest.raises(UsageError, match="ascent_steps"):
        sharpness(model, (x, t), loss="mse", target="loss", ascent_steps=-1)
    with pytest.raises(UsageError, match="alpha_max"):
        sharpness(model, (x, t), loss="mse", target="loss", alpha_max=0)
    with pytest.raises(FlatcliError, match="empty"):
        sharpness(model, (x[:0], t[:0]), loss="mse", target="loss")
