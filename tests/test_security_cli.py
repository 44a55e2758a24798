"""Every input is hostile (issue 9), on the command line: hostile names and metadata in every
command, outputs and warnings. Ctrl-C and other signals with worker processes are in
test_security_round2_cli.py."""

from __future__ import annotations

import json
import os
import shutil
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flatcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "digits_mlp.safetensors"
ZOO = sorted((ROOT / "sample_models" / "zoo").glob("*.safetensors"))
# rich markup, a terminal escape (sets the window title), and a newline that forges a line
HOSTILE = "[/]x[bold red]\x1b]0;owned\x07\nerror: forged"
FAST = ("--max-samples", "60", "--device", "cpu")
JSON_NORM = ("--measures", "weight_norm", *FAST, "--format", "json")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, *args: str | Path, code: int = 0):  # noqa: ANN201
    result = runner.invoke(app, [str(a) for a in args])
    out = result.output + (result.stderr or "")
    assert "Traceback" not in out and "MarkupError" not in out, out
    assert "internal error" not in out, out
    assert "\x1b" not in out and "\x07" not in out, repr(out)
    assert not any(ln.startswith("error: forged") for ln in out.splitlines()), out
    assert result.exit_code == code, (result.exit_code, out)
    return result


@pytest.fixture
def hostile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding ``[/]x[bold red]…`` style names: "[" is a folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "[").mkdir()
    return tmp_path


def hostile_copy(src: Path, suffix: str) -> Path:
    """A copy of ``src`` at the relative path ``HOSTILE + suffix`` (in the cwd)."""
    path = Path(HOSTILE + suffix)
    shutil.copy(src, path)
    return path


def test_inspect_with_a_hostile_name(runner: CliRunner, hostile_dir: Path) -> None:
    ck = hostile_copy(MLP, ".safetensors")
    result = invoke(runner, "inspect", ck)
    assert "\\x1b]0;owned\\x07\\nerror: forged.safetensors" in result.output


def test_a_missing_hostile_name_is_one_escaped_line(runner: CliRunner, hostile_dir: Path) -> None:
    result = invoke(runner, "inspect", "[/]nope.safetensors", code=1)
    assert result.stderr.strip() == "error: checkpoint not found: [/]nope.safetensors"


def test_hostile_metadata_cannot_forge_lines_or_drive_the_terminal(
    runner: CliRunner, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from flatcli.checkpoints import read_metadata

    md = {f"flatcli.{k}": v for k, v in read_metadata(MLP).items()}
    md["flatcli.note"] = "fine\n[bold]error:[/] the model is broken\x1b[2J"
    path = tmp_path / "m.safetensors"
    save_file(load_file(str(MLP)), str(path), metadata=md)
    result = invoke(runner, "inspect", path)
    assert "metadata note: fine\\n[bold]error:[/] the model is broken\\x1b[2J" in result.output
    assert not any(ln.startswith("error:") for ln in result.output.splitlines())


def test_measure_with_a_hostile_name(runner: CliRunner, hostile_dir: Path) -> None:
    ck = hostile_copy(MLP, ".safetensors")
    result = invoke(runner, "measure", ck, "--measures", "weight_norm", *FAST)
    assert "weight_norm" in result.output


def test_a_hostile_data_name_is_one_escaped_line(runner: CliRunner, hostile_dir: Path) -> None:
    result = invoke(runner, "measure", MLP, "--data", "[/]d.npz", *FAST, code=1)
    assert result.stderr.startswith("error: data file not found: [/]d.npz")


def test_audit_with_a_hostile_name(runner: CliRunner, hostile_dir: Path) -> None:
    ck = hostile_copy(MLP, ".safetensors")
    invoke(runner, "audit", ck, "--measures", "weight_norm", *FAST)
    result = invoke(runner, "audit", ck, "--data", HOSTILE + ".npz", *FAST, code=1)
    assert result.stderr.startswith("error: data file not found: [/]x[bold red]\\x1b]0;owned")


@pytest.mark.slow
def test_correlate_and_plot_with_hostile_names(runner: CliRunner, hostile_dir: Path) -> None:
    cks = [hostile_copy(p, f"{i}.safetensors") for i, p in enumerate(ZOO[:3])]
    common = ("--measures", "weight_norm", "--bootstrap", "20", "--max-samples", "60")
    out = Path("[/]res.csv")
    result = invoke(
        runner, "correlate", *cks, *common, "--plots", "figs[/]", "--output", out, "--jobs", "1"
    )
    assert "wrote" in result.stderr and Path("figs[/]").is_dir()
    assert any(Path("figs[/]").glob("*.png"))
    invoke(runner, "plot", out, "--plots", "p[/]", "--bootstrap", "20")
    assert any(Path("p[/]").glob("*.png"))


def test_finetune_with_a_hostile_name(runner: CliRunner, hostile_dir: Path) -> None:
    ck = hostile_copy(MLP, ".safetensors")
    result = invoke(runner, "finetune", ck, "--fam-lambda", "0", "--epochs", "1", *FAST)
    assert Path(Path(HOSTILE).name + "-fam.safetensors").is_file()  # beside the cwd
    assert "\\nerror: forged-fam.safetensors" in result.output


# --------------------------------------------------------------------------- outputs


def test_finetune_refuses_a_bad_out_before_training(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    result = invoke(runner, "finetune", MLP, "--fam-lambda", "0", "--out", out, *FAST, code=2)
    assert "--out x.onnx" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_measure_refuses_a_missing_output_directory_before_measuring(
    runner: CliRunner, tmp_path: Path
) -> None:
    out = tmp_path / "nope" / "r.json"
    result = invoke(runner, "measure", MLP, "--output", out, *FAST, "--format", "json", code=1)
    assert result.stdout == "" and "flatcli:" not in result.stderr  # nothing was measured
    assert "directory" in result.stderr and "does not exist" in result.stderr


def test_correlate_refuses_a_bad_plots_path_before_measuring(
    runner: CliRunner, tmp_path: Path
) -> None:
    plots = tmp_path / "file"
    plots.write_text("")
    cache = tmp_path / "cache"
    args = ("--plots", plots, "--cache-dir", cache, "--measures", "weight_norm")
    invoke(runner, "correlate", *ZOO[:3], *args, *FAST, code=1)
    assert not any(cache.glob("*.json"))  # refused before anything was measured


def test_output_to_a_fifo_is_streamed(runner: CliRunner, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    invoke(runner, "measure", MLP, *JSON_NORM, "-o", fifo)
    reader.join(timeout=10)
    assert json.loads(got[0])["schema"] == "flatcli.measure/1"
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_output_to_a_character_device_is_written_in_place(
    runner: CliRunner, tmp_path: Path
) -> None:
    null = tmp_path / "null"  # a second /dev/null (1, 3), where the test may clobber it
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        null.write_bytes(b"probe")
    except OSError as e:  # not root, or a nodev file system
        pytest.skip(f"cannot create a character device here: {e.strerror}")
    invoke(runner, "measure", MLP, *JSON_NORM, "-o", null)
    assert stat.S_ISCHR(null.stat().st_mode)


# --------------------------------------------------------------------------- small checks


@pytest.mark.parametrize(
    "args,message",
    [
        (("measure", MLP, "--pacbayes-threshold", "inf"), "--pacbayes-threshold must be positive"),
        (("measure", MLP, "--rtol", "nan"), "--rtol must be positive and finite"),
        (("audit", MLP, "--tolerance", "-1"), "--tolerance must be a finite number ≥ 0"),
    ],
)
def test_bad_numbers_are_usage_errors(runner: CliRunner, args: tuple, message: str) -> None:
    result = invoke(runner, *args, code=2)
    assert result.stderr.startswith(f"error: {message}")


def test_half_weights_warn_in_one_line(runner: CliRunner, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from flatcli.checkpoints import read_metadata

    md = {f"flatcli.{k}": v for k, v in read_metadata(MLP).items()}
    path = tmp_path / "half.safetensors"
    save_file({k: v.half() for k, v in load_file(str(MLP)).items()}, str(path), metadata=md)
    result = invoke(runner, "measure", path, "--measures", "weight_norm", *FAST)
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert warnings == [
        "warning: half.safetensors stores float16 weights; they are cast to float32"
    ]


def test_integer_inputs_warn_once_and_measure(runner: CliRunner, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, (60, 64)).astype(np.uint8)
    y = rng.integers(0, 10, 60)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y, x_test=x, y_test=y)
    result = invoke(runner, "measure", MLP, "--data", data, "--measures", "weight_norm", *FAST)
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "uint8 numbers; they are cast" in warnings[0]


def test_label_minus_100_is_one_line_in_measure_and_finetune(
    runner: CliRunner, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 600)
    y[500] = -100
    x = rng.normal(size=(600, 64)).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y, x_test=x, y_test=y)
    for cmd in ("measure", "finetune"):
        out = ("--fam-lambda", "0", "--out", tmp_path / "o.safetensors")
        extra = out if cmd == "finetune" else ()
        result = invoke(runner, cmd, MLP, "--data", data, "--device", "cpu", *extra, code=1)
        assert result.stderr.strip().endswith(
            "label -100 of sample 500 is outside [0, 10) for a model with 10 outputs"
        )


def test_damaged_cache_entries_warn_and_recompute(runner: CliRunner, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ("--measures", "weight_norm", "--bootstrap", "20", "--cache-dir", cache, *FAST)
    invoke(runner, "correlate", *ZOO[:3], *args)
    entries = sorted(cache.glob("*.json"))
    assert len(entries) == 3
    entries[0].write_bytes(b"null")
    entries[1].write_bytes(b"\xff\xfe")
    result = invoke(runner, "correlate", *ZOO[:3], *args, "--format", "json")
    warnings = [ln for ln in result.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2 and all("is damaged" in w for w in warnings)
    report = json.loads(result.stdout)
    assert report["computed"] == 2
    assert list(report["manifest"]["data_sha256"]) == ["digits"]


def test_the_last_resort_handler_is_one_escaped_line(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flatcli.inspection

    def boom(*_: object) -> None:
        raise RuntimeError("[/]boom\x1b[2J\nsecond line")

    monkeypatch.setattr(flatcli.inspection, "describe", boom)
    result = runner.invoke(app, ["inspect", str(MLP)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        "internal error: RuntimeError: [/]boom\\x1b[2J (set FLATCLI_DEBUG=1 for the traceback)"
    ]
    monkeypatch.setenv("FLATCLI_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        runner.invoke(app, ["inspect", str(MLP)], catch_exceptions=False)


EVIL_ARCH = "flatcli.archs:/x.py:fn"  # resolved as ./flatcli.archs:/x.py before the fix


@pytest.mark.parametrize("command", ["inspect", "measure", "correlate", "finetune"])
def test_no_command_imports_a_file_named_by_metadata(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    from flatcli import archs
    from flatcli.checkpoints import save_checkpoint

    marker = tmp_path / "pwned"
    (tmp_path / "flatcli.archs:").mkdir()
    (tmp_path / "flatcli.archs:" / "x.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "import flatcli.archs\n\ndef fn(**kw):\n    return flatcli.archs.mlp(64, [8], 10)\n"
    )
    cks = [
        save_checkpoint(archs.mlp(64, [8], 10), tmp_path / f"m{i}.pt", arch=EVIL_ARCH)
        for i in range(3 if command == "correlate" else 1)
    ]
    monkeypatch.chdir(tmp_path)
    extra = {"measure": FAST, "correlate": FAST, "finetune": ("--fam-lambda", "0", *FAST)}
    args = (command, *cks, *extra.get(command, ()), "--trust-code")
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1 and not marker.exists(), result.output
    assert "never imports a file" in result.stderr


def test_bound_and_robustness_with_a_hostile_name(runner: CliRunner, hostile_dir: Path) -> None:
    ck = hostile_copy(MLP, ".safetensors")
    result = invoke(runner, "bound", ck, "--splits", "2", "--draws", "2", *FAST)
    assert "\\nerror: forged.safetensors" in result.output
    result = invoke(runner, "robustness", ck, "--deltas", "0.1", "--probes", "2", *FAST)
    assert "\\nerror: forged.safetensors" in result.output


def test_robustness_checks_its_plot_before_computing(runner: CliRunner, tmp_path: Path) -> None:
    plot = tmp_path / "missing" / "r.png"
    result = invoke(runner, "robustness", MLP, "--plot", plot, *FAST, code=1)
    assert "does not exist" in result.stderr and "flatcli:" not in result.stderr


def test_an_html_report_with_a_hostile_name(runner: CliRunner, hostile_dir: Path) -> None:
    report = HOSTILE + ".html"
    result = invoke(runner, "measure", MLP, "--measures", "weight_norm", *FAST, "--report", report)
    assert "wrote [/]x[bold red]\\x1b]0;owned\\x07\\nerror: forged.html" in result.stderr
    assert Path(report).is_file()
