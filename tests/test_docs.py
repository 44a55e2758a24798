"""Documentation cannot rot: every sample-model example in README and docs/ is run."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flatcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    return re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S)


def examples() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for _, block in code_blocks(path):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.strip()
                for prefix in ("python -m flatcli ", "flatcli "):
                    if line.startswith(prefix) and "sample_models/" in line:
                        found.append((f"{path.name}: {line}", line[len(prefix) :]))
    return found


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    blocks = [b.strip() for lang, b in code_blocks(ROOT / "README.md") if lang == "bash"]
    assert ci in blocks, "the README's test command and .ci/run differ"
    assert "pytest" in ci and "flatcli measure sample_models/" in readme


@pytest.mark.parametrize(("where", "args"), examples(), ids=[e[0] for e in examples()])
def test_documented_example_runs(
    where: str, args: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    monkeypatch.chdir(tmp_path)
    argv = []
    for arg in shlex.split(args):  # the shell would expand globs
        argv += sorted(glob.glob(arg)) if "*" in arg else [arg]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, f"{where}\n{result.output}"
    check_output(argv, result.stdout, tmp_path)


def check_output(argv: list[str], stdout: str, cwd: Path) -> None:
    """What a documented example printed or wrote, beyond its exit code."""
    command = argv[0]
    if "--format" in argv and argv[argv.index("--format") + 1] == "json":
        assert json.loads(stdout)["schema"] == f"flatcli.{command}/1"
    if "--output" in argv:
        assert (cwd / argv[argv.index("--output") + 1]).stat().st_size > 0
    if command == "measure" and "--measures" in argv:
        for name in argv[argv.index("--measures") + 1].split(","):
            assert name in stdout, name
    if "docs/correlate/zoo.csv" in argv:
        # The committed results are what this command computes (exact measures to
        # rounding; loss and accuracy exactly as recorded).
        import pandas as pd

        got = pd.read_csv(cwd / "docs" / "correlate" / "zoo.csv")
        want = pd.read_csv(ROOT / "docs" / "correlate" / "zoo.csv")
        assert got["sha256"].tolist() == want["sha256"].tolist()
        exact = ["train_loss", "test_loss", "train_acc", "test_acc", "relative_flatness"]
        exact += ["relative_flatness_normalized", "layer_hessian_trace", "fisher_rao"]
        exact += ["weight_norm", "gap_loss", "gap_acc"]
        for col in exact:
            np.testing.assert_allclose(got[col], want[col], rtol=1e-4, atol=1e-9, err_msg=col)
        se = np.hypot(got["pacbayes_flatness_stderr"], want["pacbayes_flatness_stderr"])
        assert (abs(got["pacbayes_flatness"] - want["pacbayes_flatness"]) <= 4 * se + 1e-9).all()


def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    blocks = [b for lang, b in code_blocks(ROOT / "README.md") if lang == "python"]
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # noqa: S102 - our own documentation


def doc_python_blocks() -> list[tuple[str, str]]:
    return [
        (path.name, block)
        for path in DOCS[1:]
        for lang, block in code_blocks(path)
        if lang == "python"
    ]


@pytest.mark.parametrize(
    ("where", "block"), doc_python_blocks(), ids=[b[0] for b in doc_python_blocks()]
)
def test_docs_python_example_runs(
    where: str, block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, where, "exec"), {})  # noqa: S102 - our own documentation


def test_there_are_examples() -> None:
    assert len(examples()) >= 5


# --------------------------------------------------------------------------- documented numbers


def signed(text: str) -> float:
    return float(text.replace("−", "-"))


def test_correlate_doc_table_and_reading_match_the_committed_results() -> None:
    # The numbers in docs/correlate.md come from docs/correlate/zoo.csv and
    # zoo.correlations.csv; Ψ and ψ_k are recomputed here from the per-checkpoint table.
    import pandas as pd

    from flatcli.correlate import hparam_columns
    from flatcli.stats import granulated_kendall

    text = (ROOT / "docs" / "correlate.md").read_text(encoding="utf-8")
    df = pd.read_csv(ROOT / "docs" / "correlate" / "zoo.csv")
    corr = pd.read_csv(ROOT / "docs" / "correlate" / "zoo.correlations.csv")
    hps = hparam_columns(df)
    assert sorted(hps) == ["hp_batch_size", "hp_depth", "hp_lr", "hp_weight_decay", "hp_width"]
    num = r"([+−-]\d\.\d\d)"
    cell = rf"\*{{0,2}}{num}\*{{0,2}} \[{num}, {num}\]"
    pattern = rf"^\| `(\w+)`[^|]*\| {cell} \| {num} \| {cell} \| {num} \|$"
    rows = re.findall(pattern, text, flags=re.M)
    assert len(rows) == 6
    granulated = {
        (m, gap): granulated_kendall(df, m, gap, hps)
        for m in [r[0] for r in rows]
        for gap in ("gap_loss", "gap_acc")
    }
    for measure, *cells in rows:
        for gap, (tau, lo, hi, psi) in (("gap_loss", cells[:4]), ("gap_acc", cells[4:])):
            row = corr[(corr["measure"] == measure) & (corr["gap"] == gap)].iloc[0]
            for shown, col in ((tau, "kendall_tau_b"), (lo, "_lo"), (hi, "_hi")):
                value = row[col if col == "kendall_tau_b" else f"kendall_tau_b{col}"]
                assert signed(shown) == pytest.approx(value, abs=0.005 + 1e-9), (measure, gap)
            got = granulated[measure, gap]["Psi"]
            assert signed(psi) == pytest.approx(got, abs=0.005 + 1e-9), (measure, gap)
    # The reading's per-hyperparameter numbers.
    fr = granulated["fisher_rao", "gap_loss"]["psi"]
    kappa = granulated["relative_flatness", "gap_loss"]["psi"]
    assert f"ψ_depth = {fr['hp_depth']:+.2f}" in text
    assert f"ψ_weight_decay = {fr['hp_weight_decay']:+.2f}".replace("-", "−") in text
    assert f"κ's ψ_depth is {kappa['hp_depth']:+.2f}".replace("+", "").replace("-", "−") in text
    assert "96.6–98.6%" in text
    assert (df["test_acc"].min(), df["test_acc"].max()) == pytest.approx((0.966, 0.986))


def test_measure_doc_json_sample_matches_a_real_run() -> None:
    text = (ROOT / "docs" / "measure.md").read_text(encoding="utf-8")
    (sample,) = [b for lang, b in code_blocks(ROOT / "docs" / "measure.md") if lang == "json"]
    doc = json.loads(sample)
    result = CliRunner().invoke(
        app,
        ["measure", str(ROOT / "sample_models" / "digits_mlp.safetensors"), "--measures",
         "relative_flatness", "--format", "json"],
    )
    assert result.exit_code == 0, result.output
    real = json.loads(result.stdout)
    assert real["schema"] == doc["schema"] and real["layer"] == doc["layer"]
    assert real["data"] == doc["data"]
    want = doc["measures"]["relative_flatness"]
    got = real["measures"]["relative_flatness"]
    assert got["value"] == pytest.approx(want["value"], abs=5e-5)  # shown to 4 decimals
    assert got["stderr"] is None and got["method"] == want["method"]
    assert set(doc["manifest"]) <= set(real["manifest"])
    assert {k for k in doc["config"] if k != "..."} <= set(real["config"])
    assert "flatcli.measure/1" in text


def test_audit_doc_expectations_hold_on_the_sample_mlp() -> None:
    # docs/audit.md's "What to expect" table, with dead units dropped (so that κ̃ is
    # invariant neuron-wise), on the documented command's JSON output.
    text = (ROOT / "docs" / "audit.md").read_text(encoding="utf-8")
    table = re.findall(r"^\| (`[^|]+)\| \**(\w+)\** \| (\w+)[^|]*\|$", text, flags=re.M)
    expected = {}
    for names, layerwise, neuronwise in table:
        if "--dead-units" in names and "--dead-units drop" not in names:
            continue  # the row of the other dead-unit option
        for name in re.findall(r"`(\w+)`", names):
            expected[name] = {"layerwise": layerwise, "neuronwise": neuronwise}
    assert len(expected) == 7
    result = CliRunner().invoke(
        app,
        ["audit", str(ROOT / "sample_models" / "digits_mlp.safetensors"), "--normalize",
         "--dead-units", "drop", "--measures", ",".join(expected), "--max-samples", "300",
         "--format", "json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for rep in report["reparameterizations"]:
        assert rep["refused"] is None and rep["max_output_change"] < 1e-9
        for row in rep["rows"]:
            want = expected[row["measure"]][rep["kind"]]
            assert row["invariant"] is (want == "invariant"), (rep["kind"], row)
    assert report["measures"]["relative_flatness_normalized"]["dead_units"] == 1
    assert "one dead unit in `fc2`'s output" in text
