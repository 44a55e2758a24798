"""Terminal output: full measure names at 80 columns and in pipes; no odd types in --help."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from flatcli.cli import COMMANDS, app

from .results import correlate_result
from .test_html import MLP

NAMES = ["relative_flatness", "relative_flatness_normalized", "weight_norm"]


def test_measure_table_keeps_names_whole_and_methods_as_notes() -> None:
    result = CliRunner().invoke(
        app,
        ["measure", MLP, "--measures", ",".join(NAMES), "--max-samples", "100"],
        env={"COLUMNS": "80"},
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80
    rows = {ln.split("│")[1].strip(): ln for ln in lines if ln.startswith("│")}
    assert set(rows) == set(NAMES)  # every name whole, one line each
    notes = [ln for ln in lines if ln.startswith("[")]
    assert notes[0].startswith("[1] exact: closed form")
    assert rows["relative_flatness"].rstrip("│ ").endswith("[1]")
    assert rows["relative_flatness_normalized"].rstrip("│ ").endswith("[1]")  # shared note
    assert len(notes) == 2


@pytest.mark.parametrize("width", [80, 200])
def test_correlation_tables_keep_names_whole(width: int, monkeypatch, capsys) -> None:
    from flatcli.cli.render import correlations

    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # a terminal of this width, not a pipe
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    saved = json.loads(json.dumps(correlate_result(), default=str))
    table = pd.DataFrame(saved["correlations"])
    result = {"granulated": saved["granulated_kendall"], "hparams": saved["hparams"]}
    correlations(table, result, 12, None)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("│")]
    names = {ln.split("│")[1].strip() for ln in lines} - {""}
    assert names == {"relative_flatness", "weight_norm"}
    assert max(map(len, out.splitlines())) <= width
    assert "…" not in out


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_no_type_for_flags(command: str) -> None:
    result = CliRunner().invoke(app, [*([command] if command else []), "--help"])
    assert result.exit_code == 0
    assert "--help" in result.output and "<bool>" not in result.output


def test_few_checkpoints_show_no_certainty_and_say_why_a_gap_is_na(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's four MiniLM folders: τ-b = +1 is not shown with a [+1.00, +1.00] interval,
    the constant accuracy gap says why it is n/a, and stderr warns about n = 4."""
    from flatcli.cli.render import correlations

    from .results import small_correlate_result

    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("TERM", "dumb")
    saved = json.loads(json.dumps(small_correlate_result(), default=str))
    result = {k: saved[k] for k in ("hparams", "warnings", "gap_notes")}
    result["granulated"] = saved["granulated_kendall"]
    correlations(pd.DataFrame(saved["correlations"]), result, 4, None)
    out, err = capsys.readouterr()
    assert "+1.000" in out and "[+1.00, +1.00]" not in out and "…" not in out
    rows = [ln for ln in out.splitlines() if ln.startswith("│")]
    assert "[no CI]" in rows[1] and "degenerate bootstrap" in out
    assert "0.083" in out  # the permutation p-value of a perfect ranking of four
    flat = " ".join(out.split())
    assert "n/a: gap_acc is 0 in all 4 checkpoints (every train_acc is 1 and every test_acc" in flat
    assert "warning: only 4 checkpoints" in " ".join(err.split())
    assert max(map(len, out.splitlines())) <= 80
