"""``flatcli finetune``'s machine-readable outputs on the bundled MLP, against a stored golden.

The run (2 epochs, 200 samples, seeded, on the CPU) writes three machine-readable things:
the per-epoch CSV log, the log's manifest beside it, and the result JSON embedded in the
``--report`` page. All three are compared with ``tests/golden/finetune_mlp.json``, numbers
to a relative 1e-6 (the BLAS thread count may reorder sums), everything else exactly.

Ignored, and only these (:data:`IGNORED`): the wall time of each epoch (``seconds``), the
versions and host in each manifest (``flatcli``, ``torch``, ``python``, ``platform``), and
the sha256 of the written checkpoint (``output_sha256``), which changes with the last bit
of any weight. To regenerate after an intended change: ``FLATCLI_REGEN_GOLDEN=1 pytest
tests/test_finetune_golden.py``, and say why in the commit.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "digits_mlp.safetensors"
GOLDEN = Path(__file__).parent / "golden" / "finetune_mlp.json"
ARGS = [
    "finetune",
    "digits_mlp.safetensors",
    "--fam-lambda",
    "0.1",
    "--epochs",
    "2",
    "--max-samples",
    "200",
    "--device",
    "cpu",
    "--seed",
    "3",
    "--out",
    "tuned.safetensors",
    "--report",
    "ft.html",
]
IGNORED = {
    "seconds": "wall time of an epoch",
    "flatcli": "manifest: the package version",
    "torch": "manifest: the torch version",
    "python": "manifest: the Python version",
    "platform": "manifest: the host",
    "output_sha256": "sha256 of the written checkpoint: its last bits",
}


def strip(value: Any) -> Any:
    """``value`` without the :data:`IGNORED` keys, at any depth."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def run_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    from typer.testing import CliRunner

    from flatcli.cli import app
    from flatcli.html import load_result

    monkeypatch.chdir(tmp_path)
    shutil.copy(MLP, tmp_path / MLP.name)
    result = CliRunner().invoke(app, ARGS)
    assert result.exit_code == 0, result.output
    with open(tmp_path / "tuned.csv", newline="") as f:
        log = list(csv.DictReader(f))
    manifest = json.loads((tmp_path / "tuned.manifest.json").read_text())
    return strip({"log": log, "log_manifest": manifest, "result": load_result("ft.html")})


def assert_same(got: Any, want: Any, where: str = "") -> None:
    """Equal, numbers (and numbers written as CSV text) to a relative 1e-6."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (where, got, want)
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or (isinstance(want, str) and _number(want)):
        g, w = float(got), float(want)
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=1e-6, abs=1e-12), (
            where,
            got,
            want,
        )
    else:
        assert got == want, (where, got, want)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return any(c.isdigit() for c in text) and text.strip() == text


def test_finetune_outputs_match_the_golden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got = run_outputs(tmp_path, monkeypatch)
    if os.environ.get("FLATCLI_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, ensure_ascii=False) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert_same(got, want)
    assert len(want["log"]) == 2 and want["result"]["schema"].startswith("flatcli.finetune")


def test_the_golden_comparison_can_fail() -> None:
    want = json.loads(GOLDEN.read_text())
    changed = json.loads(GOLDEN.read_text())
    changed["result"]["after"]["relative_flatness"]["value"] *= 1 + 1e-5
    with pytest.raises(AssertionError):
        assert_same(changed, want)
    changed = json.loads(GOLDEN.read_text())
    changed["log"][0]["kappa"] = str(float(want["log"][0]["kappa"]) * 1.001)
    with pytest.raises(AssertionError):
        assert_same(changed, want)


def test_the_library_result_is_what_the_cli_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``flatcli.finetune(...)`` with the CLI's options: ``to_dict()`` is the page's JSON
    (apart from the command line, which only the CLI knows), ``to_frame()`` the CSV log."""
    import flatcli
    from flatcli.finetune import FinetuneConfig, FinetuneResult

    cli = run_outputs(tmp_path, monkeypatch)
    config = FinetuneConfig(
        fam_lambda=0.1, epochs=2, max_samples=200, device="cpu", seed=3,
        out_path="lib.safetensors", log_path="lib.csv", plot_path="lib.png",
    )  # fmt: skip
    result = flatcli.finetune(MLP.name, None, config)
    assert isinstance(result, FinetuneResult)
    got = strip(json.loads(json.dumps(result.to_dict())))
    want = {**cli["result"], "manifest": {**cli["result"]["manifest"]}}
    assert want["manifest"].pop("argv")[:2] == ["flatcli", "finetune"]
    for where in (got, want):  # the file names differ by choice
        where["checkpoint"]["output"] = where["files"] = None
    assert_same(got, want)
    frame = result.to_frame().drop(columns="seconds")
    rows = [{k: str(v) for k, v in row.items()} for row in frame.to_dict("records")]
    assert_same(rows, cli["log"])
    with open(tmp_path / "lib.csv", newline="") as f:
        assert_same([strip(r) for r in csv.DictReader(f)], cli["log"])
    assert result.to_dict()["schema"] == "flatcli.finetune/1"
    log_manifest = json.loads((tmp_path / "lib.manifest.json").read_text())
    assert log_manifest["schema"] == "flatcli.finetune-log/1"


def test_option_errors_name_parameters_and_the_cli_names_flags() -> None:
    from typer.testing import CliRunner

    from flatcli.cli import app
    from flatcli.finetune import ConfigError, FinetuneConfig

    with pytest.raises(ConfigError, match="^epochs must be at least 1, got 0$") as e:
        FinetuneConfig(epochs=0)
    assert e.value.parameters == ("epochs",)
    with pytest.raises(ConfigError, match="^fam_lambda auto needs optimizer sgd or sam"):
        FinetuneConfig(optimizer="adam")
    result = CliRunner().invoke(app, ["finetune", str(MLP), "--optimizer", "adam"])
    assert result.exit_code == 2
    assert "error: --fam-lambda auto needs --optimizer sgd or sam" in result.stderr
    result = CliRunner().invoke(app, ["finetune", str(MLP), "--sam-rho", "0"])
    assert result.exit_code == 2 and "error: --sam-rho must be > 0, got 0.0" in result.stderr
