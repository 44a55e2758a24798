"""``flatcli robustness``, ``flatcli bound`` and the new measure options on the command line."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flatcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "sample_models" / "digits_mlp.safetensors")


def invoke(*args: str):  # noqa: ANN201
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def test_robustness_json_and_plot(tmp_path: Path) -> None:
    plot = tmp_path / "rob.png"
    result = invoke(
        "robustness", MLP, "--deltas", "0.01,0.3", "--probes", "4", "--max-samples", "200",
        "--label-change", "--plot", str(plot), "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "flatcli.robustness/1"
    assert report["m"] == 32 and report["kappa"] > 0 and "manifest" in report
    first = report["deltas"][0]
    for key in ("delta", "feature_robustness", "stderr", "predicted", "ratio", "label_change"):
        assert key in first
    assert first["predicted"] == 0.01**2 * report["kappa"] / (2 * 32)
    assert plot.stat().st_size > 1000


def test_robustness_table_and_bad_deltas() -> None:
    table = invoke("robustness", MLP, "--deltas", "0.1", "--probes", "2", "--max-samples", "50")
    assert table.exit_code == 0 and "δ²κ/(2m)" in table.stdout and "Theorem 5" in table.stdout
    bad = invoke("robustness", MLP, "--deltas", "0.1,x")
    assert bad.exit_code == 2 and "--deltas" in bad.output
    negative = invoke("robustness", MLP, "--deltas", "-1", "--max-samples", "20")
    assert negative.exit_code == 2


def test_robustness_flags_relu_kinks_after_a_hidden_layer() -> None:
    args = ["--deltas", "0.01,0.1", "--probes", "2", "--max-samples", "50"]
    hidden = invoke("robustness", MLP, "--layer", "fc2", *args, "--format", "json")
    assert hidden.exit_code == 0, hidden.output
    report = json.loads(hidden.stdout)
    assert report["kinks_after_layer"] == ["act2 (ReLU)"]
    assert all(d["kinks"] for d in report["deltas"])
    table = invoke("robustness", MLP, "--layer", "fc2", *args)
    assert table.exit_code == 0 and "flag" in table.stdout
    assert "kinks after the layer" in table.stdout
    logits = json.loads(invoke("robustness", MLP, *args, "--format", "json").stdout)
    assert logits["kinks_after_layer"] == [] and not any(d["kinks"] for d in logits["deltas"])


def test_bound_json_has_terms_and_actual_gap() -> None:
    result = invoke(
        "bound", MLP, "--layer", "fc", "--splits", "2", "--draws", "1", "--max-samples", "300",
        "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "flatcli.bound/1"
    assert report["estimate_is"] == "an approximation, not a bound"
    m, n = report["m"], report["n"]
    assert report["sample_term"] == n ** (-2 / (4 + m))
    assert report["gap"] == report["test_loss"] - report["train_loss"]
    # The digits MLP: δ = |S|^(−1/(4+m)) = 0.84 is far outside Theorem 5's expansion.
    assert report["robustness_delta"] == n ** (-1 / (4 + m))
    assert report["measured_robustness"] > 10 * report["robustness_term"]
    assert "does not hold at this δ" in report["notes"][0]
    table = invoke("bound", MLP, "--splits", "2", "--draws", "1", "--max-samples", "200")
    assert table.exit_code == 0 and "NOT a bound" in table.stdout


def test_measure_defaults_and_new_options() -> None:
    result = invoke(
        "measure", MLP, "--measures", "relative_flatness,fisher_rao", "--normalize",
        "--fr-labels", "model", "--l2", "1e-4", "--max-samples", "100", "--format", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["dead_units"] == "drop"
    assert report["config"]["fr_labels"] == "model" and report["config"]["l2"] == 1e-4
    assert "softmax" in report["measures"]["fisher_rao"]["method"]
    assert "L2 term" in report["measures"]["relative_flatness"]["method"]
    assert report["measures"]["relative_flatness_normalized"]["dead_unit_handling"] == "drop"
    bad = invoke("measure", MLP, "--fr-labels", "predicted")
    assert bad.exit_code == 2 and "--fr-labels" in bad.output
    bad = invoke("measure", MLP, "--l2", "-1")
    assert bad.exit_code == 2 and "--l2" in bad.output


def test_robustness_csv_output_has_manifest_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "rob.csv"
    result = invoke(
        "robustness", MLP, "--deltas", "0.1", "--probes", "2", "--max-samples", "50",
        "--format", "csv", "--output", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[0].startswith("delta,feature_robustness,stderr")
    sidecar = json.loads((tmp_path / "rob.manifest.json").read_text())
    assert sidecar["schema"] == "flatcli.robustness/1" and "manifest" in sidecar
