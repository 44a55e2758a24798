"""The typed results: a library call gives what the CLI writes, and each output is whole."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

import flatcli
from flatcli.cli import app
from flatcli.errors import ParameterError

ROOT = Path(__file__).resolve().parents[1]
MLP = "sample_models/digits_mlp.safetensors"
HOST_FIELDS = ("python", "torch", "platform")
"""Manifest keys that describe the machine; ``argv`` exists only for a command line."""


def _without_host(report: dict) -> dict:
    manifest = {k: v for k, v in report["manifest"].items() if k not in (*HOST_FIELDS, "argv")}
    return {**report, "manifest": manifest}


@pytest.fixture
def in_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def cli_json(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_library_measure_equals_the_cli_json(in_root: None) -> None:
    options = {"max_samples": 50, "max_memory": "1G", "max_probes": 20}
    result = flatcli.measure(MLP, layer="fc", **options)
    assert isinstance(result, flatcli.MeasureResult)
    cli = cli_json(
        "measure", MLP, "--layer", "fc", "--max-samples", "50", "--max-memory", "1G",
        "--max-probes", "20",
    )  # fmt: skip
    assert "argv" in cli["manifest"] and "argv" not in result.manifest
    library = result.to_dict()
    for report in (cli, library):
        for est in report["measures"].values():
            est.pop("seconds", None)  # wall-clock time of the Hutchinson trace
    assert _without_host(library) == _without_host(cli)


def test_measure_frame_is_the_csv(in_root: None) -> None:
    result = flatcli.measure(MLP, measures="weight_norm,train_loss", max_samples=30)
    frame = result.to_frame()
    assert list(frame["measure"]) == ["weight_norm", "train_loss"]
    assert frame["value"].tolist() == [result.measures[n].value for n in frame["measure"]]
    assert result.to_csv().splitlines()[0] == ",".join(frame.columns)


def test_library_errors_name_parameters_and_the_cli_names_flags(in_root: None) -> None:
    with pytest.raises(ParameterError, match=r"^probes must be at least 1, got 0$"):
        flatcli.measure(MLP, probes=0)
    with pytest.raises(ParameterError, match=r"^max_probes must be at least 2"):
        flatcli.MeasureOptions(max_probes=1).checked()
    result = CliRunner().invoke(app, ["measure", MLP, "--probes", "0"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --probes must be at least 1, got 0"


def test_bound_csv_sidecar_holds_the_provenance_not_the_row(in_root: None, tmp_path: Path) -> None:
    out = tmp_path / "bound.csv"
    args = ["bound", MLP, "--max-samples", "60", "--splits", "2", "--draws", "2"]
    result = CliRunner().invoke(app, [*args, "--probes", "2", "--format", "csv", "-o", str(out)])
    assert result.exit_code == 0, result.output
    row = pd.read_csv(out)
    side = json.loads((tmp_path / "bound.manifest.json").read_text())
    assert len(row) == 1 and "kappa" in row.columns
    assert side["schema"] == "flatcli.bound/1" and "manifest" in side and "checkpoint" in side
    # the sidecar says what the CSV cannot: no term of the row is repeated in it
    assert not set(row.columns) & set(side), sorted(set(row.columns) & set(side))
    assert side["notes"]


def test_robustness_result_frame_and_provenance(in_root: None) -> None:
    result = flatcli.check_robustness(MLP, deltas=[0.1], probes=2, max_samples=40)
    assert result.to_frame()["delta"].tolist() == [0.1]
    assert "deltas" not in result.provenance() and "kappa" in result.provenance()
