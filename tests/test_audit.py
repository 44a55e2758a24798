"""The invariance audit, and Theorem 4's handling of dead units."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flatcli.audit import audit, dead_unit_note
from flatcli.cli import app
from flatcli.data import as_batches
from flatcli.measures.relative_flatness import layer_measures
from flatcli.registry import MeasureConfig, select
from flatcli.reparam import find_pairs, layerwise, log_uniform, neuronwise

from . import models
from .reference import dense_kappa

ROOT = Path(__file__).resolve().parents[1]


def rows_by_measure(rep) -> dict:  # noqa: ANN001
    return {r.measure: r for r in rep.rows}


def test_relu_mlp_kappa_invariant_trace_and_norm_not() -> None:
    x, y = models.classification_data()
    reps = audit(
        models.mlp(),
        as_batches((x, y)),
        select(None, normalize=True),
        MeasureConfig(layer="fc"),
        seed=1,
    ).reparameterizations
    layer, neuron = reps
    assert layer.refused is None and neuron.refused is None
    assert layer.max_output_change < 1e-12 and neuron.max_output_change < 1e-12
    lw, nw = rows_by_measure(layer), rows_by_measure(neuron)
    assert lw["relative_flatness"].invariant and lw["relative_flatness_normalized"].invariant
    assert nw["relative_flatness_normalized"].invariant
    assert not nw["relative_flatness"].invariant
    for name in ("layer_hessian_trace", "weight_norm"):
        assert not lw[name].invariant and not nw[name].invariant
    # ‖W‖²·Tr(H) is exactly invariant to layer-wise rescaling (W → W/α, H → α²H), and it
    # changes neuron-wise (docs/measures.md, "Invariances").
    assert lw["layerwise_flatness"].invariant and not nw["layerwise_flatness"].invariant
    assert lw["train_loss"].invariant and nw["train_loss"].invariant


def test_tanh_is_refused_not_silently_wrong() -> None:
    model = models.init(models.TanhHead())
    x, y = models.classification_data()
    reps = audit(
        model, as_batches((x, y)), ["relative_flatness"], MeasureConfig(layer="fc")
    ).reparameterizations
    assert all(r.refused for r in reps)
    assert "tanh" in reps[0].refused and "not positively homogeneous" in reps[0].refused
    assert not any(r.rows for r in reps)


def test_pairs_through_pooling_are_layerwise_only() -> None:
    from flatcli import archs

    pairs, reasons = find_pairs(archs.cnn())
    assert [(p.first, p.second, p.neuronwise) for p in pairs] == [
        ("conv1", "conv2", False),
        ("conv2", "fc1", False),
        ("fc1", "fc", True),
    ]
    assert reasons == []


def test_reparameterizations_preserve_the_function() -> None:
    model = models.mlp()
    x, _ = models.classification_data()
    pairs, _ = find_pairs(model)
    gen = torch.Generator().manual_seed(0)
    alphas = log_uniform(gen, len(pairs))
    assert torch.all((alphas >= 1 / 25) & (alphas <= 25))
    torch.testing.assert_close(layerwise(model, pairs, alphas)(x), model(x))
    torch.testing.assert_close(neuronwise(model, pairs[-1], log_uniform(gen, 4))(x), model(x))


def with_dead_unit() -> torch.nn.Module:
    """The ReLU MLP with unit 1 of fc2's output dead on every input."""
    model = models.mlp()
    with torch.no_grad():
        model.fc2.weight[1].zero_()
        model.fc2.bias[1] = -1.0
    return model


def test_dead_units_unscaled_follow_math_md_and_drop_is_invariant() -> None:
    model = with_dead_unit()
    x, y = models.classification_data()
    alphas = torch.tensor([2.0, 9.0, 0.5, 3.0], dtype=torch.float64)  # unit 1 rescaled by 9
    twin = neuronwise(model, find_pairs(model)[0][-1], alphas)
    torch.testing.assert_close(twin(x), model(x))
    values = {}
    for mode in ("unscaled", "drop"):
        a, b = (
            layer_measures(m, "fc", (x, y), normalize=True, dead_units=mode)[
                "relative_flatness_normalized"
            ]
            for m in (model, twin)
        )
        assert a.details["dead_units"] == 1
        values[mode] = (a.value, b.value)
    assert values["drop"][1] == pytest.approx(values["drop"][0], rel=1e-10)
    assert values["unscaled"][1] != pytest.approx(values["unscaled"][0], rel=1e-3)


def test_drop_mode_equals_dense_kappa_without_the_dead_column() -> None:
    model = with_dead_unit()
    x, y = models.classification_data()
    got = layer_measures(model, "fc", (x, y), normalize=True, dead_units="drop")
    with torch.no_grad():
        phi = torch.relu(model.fc2(torch.relu(model.fc1(x))))
    sigma = phi.std(0, unbiased=False)
    alive = sigma > 0
    twin = torch.nn.Sequential(torch.nn.Linear(int(alive.sum()), 3).double())
    with torch.no_grad():
        twin[0].weight.copy_(model.fc.weight[:, alive] * sigma[alive])
        twin[0].bias.copy_(model.fc.bias)
    want = float(dense_kappa(twin, "0", phi[:, alive] / sigma[alive], y))
    assert got["relative_flatness_normalized"].value == pytest.approx(want, rel=1e-8)


def test_audit_explains_dead_units() -> None:
    x, y = models.classification_data()
    result = audit(
        with_dead_unit(),
        as_batches((x, y)),
        select(None, normalize=True),
        MeasureConfig(layer="fc", dead_units="unscaled"),
        seed=1,
    )
    note = dead_unit_note(result.measures, result.reparameterizations)
    assert note is not None and "--dead-units drop" in note
    result = audit(  # the default, drop, is invariant: nothing to explain
        with_dead_unit(),
        as_batches((x, y)),
        select(None, normalize=True),
        MeasureConfig(layer="fc"),
        seed=1,
    )
    reps = result.reparameterizations
    assert dead_unit_note(result.measures, reps) is None
    neuron = next(r for r in reps if r.kind == "neuronwise")
    row = next(r for r in neuron.rows if r.measure == "relative_flatness_normalized")
    assert row.invariant


def test_audit_cli_json_and_refusal(tmp_path: Path) -> None:
    runner = CliRunner()
    mlp = str(ROOT / "sample_models" / "digits_mlp.safetensors")
    result = runner.invoke(
        app,
        [
            "audit",
            mlp,
            "--normalize",
            "--dead-units",
            "drop",
            "--max-samples",
            "200",
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "flatcli.audit/1"
    neuron = next(r for r in report["reparameterizations"] if r["kind"] == "neuronwise")
    row = next(r for r in neuron["rows"] if r["measure"] == "relative_flatness_normalized")
    assert row["invariant"] is True
    table = runner.invoke(app, ["audit", mlp, "--max-samples", "100"])
    assert table.exit_code == 0 and "layerwise reparameterization" in table.stdout
    bad = runner.invoke(app, ["audit", mlp, "--alpha-low", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_audit_cli_alpha_range_and_tolerance() -> None:
    mlp = str(ROOT / "sample_models" / "digits_mlp.safetensors")
    base = ["audit", mlp, "--measures", "relative_flatness,weight_norm", "--max-samples", "60"]
    base += ["--format", "json", "--alpha-low", "2", "--alpha-high", "3"]

    def reps(*extra: str) -> list[dict]:
        result = CliRunner().invoke(app, [*base, *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["reparameterizations"]

    strict, loose = reps(), reps("--tolerance", "100")
    for rep in strict:
        assert rep["alphas"] and all(2 <= a <= 3 for a in rep["alphas"]), rep["kind"]
    for a, b in zip(strict, loose, strict=True):
        assert a["alphas"] == b["alphas"]  # the same draws: only the verdict differs
        for row_a, row_b in zip(a["rows"], b["rows"], strict=True):
            change = row_a["relative_change"]
            assert change == row_b["relative_change"]
            assert row_a["invariant"] is (change <= 1e-6)
            assert row_b["invariant"] is (change <= 100)
    layerwise = next(r for r in strict if r["kind"] == "layerwise")
    rows = {r["measure"]: r for r in layerwise["rows"]}
    assert rows["relative_flatness"]["invariant"] and not rows["weight_norm"]["invariant"]
    assert all(r["invariant"] for rep in loose for r in rep["rows"])
    # ‖W‖² of fc rescaled by 1/α² with α ∈ [2, 3]: a relative change in [1 − 1/4, 1 − 1/9].
    fc_alpha = layerwise["alphas"][[p[1] for p in layerwise["pairs"]].index("fc")]
    assert rows["weight_norm"]["relative_change"] == pytest.approx(1 - 1 / fc_alpha**2)
    bad = CliRunner().invoke(app, [*base, "--alpha-high", "1"])
    assert bad.exit_code == 2 and "--alpha-low and --alpha-high" in bad.output
