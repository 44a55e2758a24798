"""correlate: resumable per-checkpoint cache, skipping bad files, and the plot command."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from flatcli.cli import app
from flatcli.correlate import CorrelateConfig, measure_checkpoints, results_table

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "sample_models" / "zoo").glob("*.safetensors"))[:5]
CONFIG = CorrelateConfig(
    measures=("relative_flatness", "layer_hessian_trace", "weight_norm"), max_samples=200
)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_recomputes_only_the_rest(tmp_path: Path) -> None:
    done: list[str] = []

    def kill_after_two(checkpoint: str, status: str) -> None:
        if status == "computed":
            done.append(checkpoint)
            if len(done) == 2:
                raise Interrupt

    with pytest.raises(Interrupt):
        measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "cache", on_result=kill_after_two)
    resumed = measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "cache")
    assert resumed.computed == len(ZOO) - 2
    fresh = measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "fresh")
    assert fresh.computed == len(ZOO)
    pd.testing.assert_frame_equal(results_table(resumed), results_table(fresh))
    again = measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "cache")
    assert again.computed == 0


def test_cache_key_changes_with_the_configuration() -> None:
    other = CorrelateConfig(measures=CONFIG.measures, max_samples=100)
    assert other.key() != CONFIG.key()
    assert (
        CorrelateConfig(
            measures=CONFIG.measures, max_samples=200, device="cuda", batch_size=7
        ).key()
        == CONFIG.key()
    )


def test_corrupt_checkpoint_is_skipped_and_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    run = measure_checkpoints(
        [ZOO[0], bad, tmp_path / "missing.safetensors", ZOO[1]],
        CONFIG,
        cache_dir=tmp_path / "cache",
    )
    assert [r["checkpoint"] for r in run.rows] == [ZOO[0].name, ZOO[1].name]
    reasons = {Path(s["checkpoint"]).name: s["reason"] for s in run.skipped}
    assert "not a valid safetensors" in reasons["bad.safetensors"]
    assert "not found" in reasons["missing.safetensors"]


def test_results_carry_hparams_and_gaps(tmp_path: Path) -> None:
    run = measure_checkpoints(ZOO[:3], CONFIG, cache_dir=tmp_path)
    df = results_table(run)
    assert {"hp_width", "hp_lr", "gap_loss", "gap_acc", "relative_flatness"} <= set(df.columns)
    assert (df["gap_loss"] == df["test_loss"] - df["train_loss"]).all()
    assert df["sha256"].str.len().eq(64).all()


def test_cli_json_csv_and_plots(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "correlate",
        *map(str, ZOO),
        "--measures",
        "relative_flatness,weight_norm",
        "--max-samples",
        "200",
        "--bootstrap",
        "50",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "flatcli.correlate/1" and len(report["checkpoints"]) == 5
    assert {r["measure"] for r in report["correlations"]} == {"relative_flatness", "weight_norm"}
    assert "sha256" in report["checkpoints"][0] and "torch" in report["manifest"]
    out = tmp_path / "res.csv"
    result = runner.invoke(
        app, [*args, "--output", str(out), "--plots", str(tmp_path / "figs"), "--color-by", "width"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "res.correlations.csv").is_file()
    side = json.loads((tmp_path / "res.manifest.json").read_text())
    assert "torch" in side["manifest"] and len(side["sha256"]) == 5
    assert side["sha256"][0]["sha256"] == report["checkpoints"][0]["sha256"]
    assert (tmp_path / "figs" / "tau_gap_loss.png").stat().st_size > 1000
    assert (tmp_path / "figs" / "scatter_gap_acc.svg").is_file()
    replot = runner.invoke(
        app, ["plot", str(out), "--plots", str(tmp_path / "figs2"), "--bootstrap", "50"]
    )
    assert replot.exit_code == 0, replot.output
    assert (tmp_path / "figs2" / "tau_gap_acc.png").is_file()


def test_plot_with_missing_columns_is_a_clear_error(tmp_path: Path) -> None:
    csv = tmp_path / "r.csv"
    pd.DataFrame({"checkpoint": ["a", "b"], "relative_flatness": [1.0, 2.0]}).to_csv(csv)
    result = CliRunner().invoke(app, ["plot", str(csv)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "lacks the column(s) gap_loss, gap_acc" in result.stderr


def test_all_checkpoints_bad_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"x")
    result = CliRunner().invoke(app, ["correlate", str(bad), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no checkpoint could be measured" in result.stderr
