"""The divergence guard: chance levels, the end-of-epoch snapshot, and each named check."""

from __future__ import annotations

import math

import pytest
import torch

from flatcli.fam import FAMRegularizer
from flatcli.guard import Chance, DivergenceGuard, Snapshot, chance_level, snapshot
from flatcli.losses import per_sample_loss
from flatcli.training import EpochStats

from . import models


def test_chance_is_the_best_constant_predictor() -> None:
    """ln C for balanced classes; the label entropy and majority share otherwise; for MSE
    the loss of predicting the mean target. Checked against a constant predictor's loss."""
    balanced = torch.arange(12) % 3
    c = chance_level(balanced, "cross_entropy", 3)
    assert c.loss == pytest.approx(math.log(3), abs=1e-15) and c.accuracy == pytest.approx(1 / 3)
    y = torch.tensor([0] * 7 + [1] * 2 + [2] * 1)
    c = chance_level(y, "cross_entropy", 4)  # an unused fourth class
    freq = torch.tensor([0.7, 0.2, 0.1, 1e-300], dtype=torch.float64)
    prior = per_sample_loss(freq.log().expand(10, 4), y, "cross_entropy").mean()
    assert c.loss == pytest.approx(float(prior), abs=1e-12) and c.accuracy == pytest.approx(0.7)
    targets = torch.randn(50, 3, generator=models.seeded(1), dtype=torch.float64)
    c = chance_level(targets, "mse", 3)
    mean = targets.mean(0).expand(50, 3)
    assert c.loss == pytest.approx(float(per_sample_loss(mean, targets, "mse").mean()), rel=1e-12)
    assert c.accuracy is None
    c = chance_level(y, "mse", 3)  # integer labels under MSE: one-hot targets
    onehot = torch.nn.functional.one_hot(y, 3).double()
    best = per_sample_loss(onehot.mean(0).expand(10, 3), y, "mse").mean()
    assert c.loss == pytest.approx(float(best), rel=1e-12)


def test_snapshot_counts_dead_units_and_measures_the_training_set() -> None:
    net = models.mlp()  # 5 → 6 → 4 → 3, feature layer fc has 4 inputs
    x, y = models.classification_data(n=40)
    with torch.no_grad():  # kill unit 0 of fc's input: fc2 row 0 never positive
        net.fc2.weight[0] = 0.0
        net.fc2.bias[0] = -1.0
    net.train()
    found = snapshot(FAMRegularizer(net, "fc"), x, y)
    assert net.training  # the mode is restored
    net.eval()
    with torch.no_grad():
        out = net(x)
        phi = torch.relu(net.fc2(torch.relu(net.fc1(x))))
    assert found.loss == pytest.approx(float(per_sample_loss(out, y, "cross_entropy").mean()))
    assert found.accuracy == pytest.approx(float((out.argmax(1) == y).double().mean()))
    assert found.phi_sq == pytest.approx(float(phi.pow(2).sum(1).mean()), rel=1e-12)
    alive = int((phi.amax(0) > phi.amin(0)).sum())
    assert (found.live_units, found.units) == (alive, 4) and alive <= 3


START = Snapshot(loss=0.6, accuracy=0.8, phi_sq=2.0, live_units=16, units=16)
CHANCE = Chance(loss=1.1, accuracy=0.4)


def guard(**kw) -> DivergenceGuard:  # noqa: ANN003
    options = {"start": START, "chance": CHANCE, "kappa0": 1.0, "weight0": 10.0, "fam": True}
    return DivergenceGuard(**{**options, **kw})


def now(**kw) -> Snapshot:  # noqa: ANN003
    return Snapshot(**{**START.__dict__, **kw})


def stats(kappa: float = 1.0, stderr: float | None = None, batches: int = 10) -> EpochStats:
    return EpochStats(0.5, kappa, 2.0, 0.9, kappa_stderr=stderr, batches=batches)


def test_each_check_fires_and_names_itself() -> None:
    g = guard()
    assert g.check(now(), stats(), 10.0) is None
    assert "non-finite" in (g.check(now(loss=math.nan), stats(), 10.0) or "")
    assert "non-finite" in (g.check(now(), stats(kappa=math.inf), 10.0) or "")
    # Loss: half the way from 0.6 to chance 1.1 is 0.85.
    assert g.loss_limit() == pytest.approx(0.85)
    assert "loss check" in (g.check(now(loss=0.851), stats(), 10.0) or "")
    assert g.check(now(loss=0.849), stats(), 10.0) is None
    # Accuracy: half the way from 0.8 to chance 0.4 is 0.6.
    assert "accuracy check" in (g.check(now(accuracy=0.59), stats(), 10.0) or "")
    assert g.check(now(accuracy=0.61), stats(), 10.0) is None
    # Features: ‖φ‖² below a tenth, or fewer than half the live units.
    assert "feature-collapse" in (g.check(now(phi_sq=0.19), stats(), 10.0) or "")
    assert g.check(now(phi_sq=0.21), stats(), 10.0) is None
    assert "7 of the layer's 16" in (g.check(now(live_units=7), stats(), 10.0) or "")
    assert g.check(now(live_units=8), stats(), 10.0) is None
    # κ (exact): above 2× its start, unless the model is still being fitted.
    assert "κ-rise check: κ rose" in (g.check(now(), stats(kappa=2.01), 10.0) or "")
    assert g.check(now(loss=0.49), stats(kappa=2.01), 10.0) is None
    assert "saturation" in (g.check(now(), stats(kappa=0.09), 101.0) or "")
    assert g.check(now(), stats(kappa=0.09), 99.0) is None
    plain = guard(fam=False)  # κ is FAM's business; the model's own losses are not
    assert plain.check(now(), stats(kappa=50.0), 1e4) is None
    assert "loss check" in (plain.check(now(loss=0.9), stats(), 10.0) or "")


def test_loss_limit_from_fitted_and_chance_starts() -> None:
    fitted = guard(start=now(loss=4e-4))  # near zero: 10× the start + 0.1
    assert fitted.loss_limit() == pytest.approx(0.104)
    chance_start = guard(start=now(loss=1.1))  # nothing to lose: the floor of 0.1
    assert chance_start.loss_limit() == pytest.approx(1.2)
    small_lead = guard(start=now(accuracy=0.42))  # a lead of 0.02: the floor, 0.05
    assert "accuracy check" in (small_lead.check(now(accuracy=0.369), stats(), 10.0) or "")
    assert small_lead.check(now(accuracy=0.371), stats(), 10.0) is None
    at_chance = guard(start=now(accuracy=0.4))  # no lead: the check is off
    assert at_chance.check(now(accuracy=0.1), stats(), 10.0) is None


def test_exact_kappa_is_compared_on_the_whole_set_in_eval_mode() -> None:
    """κ₀ is the whole training set in eval mode, so an exact κ is compared in the same
    way when the snapshot has it: train-mode batch means (with dropout, 100× κ₀ in a digits
    MLP with input dropout) do not fire the check, a rise of the comparable κ does."""
    g = guard()
    assert g.check(now(kappa=1.5), stats(kappa=80.0), 10.0) is None
    assert "κ rose to 2.01" in (g.check(now(kappa=2.01), stats(kappa=1.0), 10.0) or "")
    assert "saturation" in (g.check(now(kappa=0.09), stats(kappa=1.0), 101.0) or "")
    assert "non-finite" in (g.check(now(kappa=math.nan), stats(), 10.0) or "")
    hutchinson = guard(kappa_exact=False)  # its test needs the batches' standard error
    assert "Hutchinson" in (hutchinson.check(now(kappa=1.0), stats(3.0, 0.3), 10.0) or "")


def test_snapshot_kappa_is_the_penalty_on_the_whole_set_and_leaves_the_probes() -> None:
    net = models.init(models.SmallCNN())
    x, y = models.classification_data(n=300, shape=(2, 3, 3))
    exact = FAMRegularizer(net, "fc")
    found = snapshot(exact, x, y, kappa=True)
    with torch.no_grad():
        assert found.kappa == pytest.approx(float(exact(x, y)), rel=1e-12)  # one batch of 300
    assert snapshot(exact, x, y).kappa is None
    reg = FAMRegularizer(net, "conv2", method="hutchinson", seed=3)
    before = reg.generator.get_state()
    first = snapshot(reg, x, y, kappa=True).kappa
    assert torch.equal(reg.generator.get_state(), before)
    assert first is not None and math.isfinite(first)
    assert snapshot(reg, x, y, kappa=True).kappa == first  # the same probes again


def test_hutchinson_kappa_rise_is_a_test_on_its_stderr() -> None:
    g = guard(kappa_exact=False)
    # 3.0 ± 0.3 over 10 batches: t = 3.33 > t_0.99(9) = 2.82.
    assert "Hutchinson" in (g.check(now(), stats(kappa=3.0, stderr=0.3), 10.0) or "")
    assert g.check(now(), stats(kappa=3.0, stderr=0.4), 10.0) is None  # t = 2.5
    assert g.check(now(), stats(kappa=3.0, stderr=0.3, batches=3), 10.0) is None  # t_0.99(2) = 6.96
    assert g.check(now(), stats(kappa=3.0, stderr=None), 10.0) is None
    big = stats(kappa=3.0, stderr=0.01, batches=1000)
    assert "t = 100.00 > 2.33" in (g.check(now(), big, 10.0) or "")  # the z-test's 2.33


def test_snapshot_units_are_channels_of_a_convolution() -> None:
    net = models.init(models.SmallCNN())  # conv1 (2→3) → ReLU → conv2 (3→2) → fc
    x, y = models.classification_data(n=10, shape=(2, 3, 3))
    found = snapshot(FAMRegularizer(net, "conv2"), x, y)
    with torch.no_grad():
        phi = torch.relu(net.conv1(x))  # conv2's input: 3 channels
    alive = int((phi.amax((0, 2, 3)) > phi.amin((0, 2, 3))).sum())
    assert (found.units, found.live_units) == (3, alive)
    assert found.phi_sq == pytest.approx(float(phi.pow(2).sum((1, 2, 3)).mean()), rel=1e-12)
