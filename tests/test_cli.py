"""The command line: outputs, exit codes, and one-line errors for every bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flatcli import archs
from flatcli.checkpoints import save_checkpoint
from flatcli.cli import app

ROOT = Path(__file__).resolve().parents[1]
MLP = str(ROOT / "sample_models" / "digits_mlp.safetensors")
CNN = str(ROOT / "sample_models" / "digits_cnn.safetensors")


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def run(runner: CliRunner, *args: str):  # noqa: ANN201
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def one_line_error(result, code: int = 1) -> str:  # noqa: ANN001
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    return errors[0]


def test_measure_json_has_the_stable_shape(runner: CliRunner) -> None:
    result = run(runner, "measure", MLP, "--format", "json", "--max-samples", "300")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "flatcli.measure/1"
    assert set(report) >= {"checkpoint", "layer", "data", "measures", "manifest"}
    assert len(report["checkpoint"]["sha256"]) == 64
    assert report["layer"] == {"name": "fc", "type": "Linear", "shape": [10, 32]}
    assert report["data"] == {"source": "digits", "split": "train", "n_samples": 300}
    kappa = report["measures"]["relative_flatness"]
    assert kappa["stderr"] is None and "closed form" in kappa["method"]
    assert set(report["manifest"]) >= {"flatcli", "torch", "python", "device", "dtype", "seed"}
    # The numbers are the library's (float32, as the CLI's default dtype).
    from flatcli.measures import fisher_rao, norms
    from flatcli.measures.relative_flatness import layer_measures

    model, data = digits_mlp(300, torch.float32)
    layer = layer_measures(model, "fc", data)
    out = report["measures"]
    for name in ("relative_flatness", "layerwise_flatness", "layer_hessian_trace", "weight_norm"):
        assert out[name]["value"] == pytest.approx(layer[name].value, rel=1e-6), name
    assert out["train_loss"]["value"] == pytest.approx(layer["train_loss"].value, rel=1e-6)
    assert out["train_accuracy"]["value"] == layer["train_accuracy"].value
    assert out["fisher_rao"]["value"] == pytest.approx(
        fisher_rao.fisher_rao(model, data).value, rel=1e-5
    )
    assert out["frobenius_norms"]["value"] == pytest.approx(
        norms.frobenius_norms(model).value, rel=1e-6
    )
    from flatcli.measures.hessian import hessian_trace

    # a ReLU network: the exact trace from the Gauss-Newton diagonal, no probes
    assert out["hessian_trace"]["stderr"] is None
    assert "Gauss-Newton diagonal" in out["hessian_trace"]["method"]
    assert out["hessian_trace"]["value"] == pytest.approx(
        hessian_trace(model, data).value, rel=1e-6
    )
    assert out["pacbayes_flatness"]["stderr"] > 0


def digits_mlp(n: int, dtype: torch.dtype, split: str = "train"):  # noqa: ANN201
    """The sample MLP and the first ``n`` digits of ``split``, as the CLI loads them."""
    from flatcli.checkpoints import load_checkpoint
    from flatcli.data import load_data

    ds = load_data("digits", split=split, max_samples=n)
    return load_checkpoint(MLP).model.to(dtype), (ds.x.to(dtype), ds.y)


def test_measure_matches_the_python_api(runner: CliRunner) -> None:
    from flatcli import relative_flatness
    from flatcli.checkpoints import load_checkpoint
    from flatcli.data import load_data

    result = run(
        runner,
        "measure",
        MLP,
        "--format",
        "json",
        "--layer",
        "fc2",
        "--dtype",
        "float64",
        "--max-samples",
        "200",
        "--measures",
        "relative_flatness",
    )
    cli_value = json.loads(result.stdout)["measures"]["relative_flatness"]["value"]
    model = load_checkpoint(MLP).model.double()
    ds = load_data("digits", max_samples=200)
    api = relative_flatness(model, "fc2", (ds.x.double(), ds.y))
    assert cli_value == pytest.approx(api.value, rel=1e-12)


def test_measure_hutchinson_on_conv_reports_stderr_and_seed(runner: CliRunner) -> None:
    args = [
        "measure",
        CNN,
        "--layer",
        "conv1",
        "--method",
        "hutchinson",
        "--probes",
        "8",
        "--max-samples",
        "100",
        "--format",
        "json",
        "--seed",
        "7",
        "--measures",
        "relative_flatness,layer_hessian_trace",
    ]
    first = json.loads(run(runner, *args).stdout)
    again = json.loads(run(runner, *args).stdout)
    kappa = first["measures"]["relative_flatness"]
    assert kappa["stderr"] > 0 and kappa["probes"] == 8
    assert first["manifest"]["seed"] == 7
    assert kappa["value"] == again["measures"]["relative_flatness"]["value"]
    from flatcli.checkpoints import load_checkpoint
    from flatcli.data import load_data
    from flatcli.measures.relative_flatness import layer_measures

    ds = load_data("digits", max_samples=100)
    model = load_checkpoint(CNN).model
    want = layer_measures(
        model, "conv1", (ds.x.reshape(-1, 1, 8, 8), ds.y), method="hutchinson", probes=8, seed=7
    )
    for name in ("relative_flatness", "layer_hessian_trace"):
        got = first["measures"][name]
        assert got["value"] == pytest.approx(want[name].value, rel=1e-5), name
        assert got["stderr"] == pytest.approx(want[name].stderr, rel=1e-5), name


def test_csv_and_output_file(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    result = run(
        runner, "measure", MLP, "--format", "csv", "--output", str(out), "--max-samples", "50"
    )
    assert result.exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "measure,value,stderr,method,warnings"
    assert lines[1].startswith("relative_flatness,")
    assert out.read_text() == result.stdout
    import pandas as pd

    from flatcli.measures.relative_flatness import layer_measures

    table = pd.read_csv(out).set_index("measure")
    model, data = digits_mlp(50, torch.float32)
    want = layer_measures(model, "fc", data)
    for name in ("relative_flatness", "layer_hessian_trace", "weight_norm", "train_loss"):
        assert table.loc[name, "value"] == pytest.approx(want[name].value, rel=1e-6), name
        assert np.isnan(table.loc[name, "stderr"])  # exact
    assert np.isnan(table.loc["hessian_trace", "stderr"])  # exact: a ReLU network
    assert "Gauss-Newton" in table.loc["hessian_trace", "method"]
    side = json.loads((tmp_path / "r.manifest.json").read_text())
    assert side["checkpoint"]["sha256"] == hashlib.sha256(Path(MLP).read_bytes()).hexdigest()
    assert side["manifest"]["seed"] == 0 and "torch" in side["manifest"]
    assert side["config"]["layer"] == "fc"


def test_table_output_and_normalize(runner: CliRunner) -> None:
    from flatcli.measures.relative_flatness import layer_measures
    from flatcli.report import format_value

    args = ["measure", MLP, "--normalize", "--max-samples", "100", "--dead-units", "drop"]
    args += ["--measures", "relative_flatness,relative_flatness_normalized,weight_norm"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})  # names not cut short
    assert result.exit_code == 0, result.output
    model, data = digits_mlp(100, torch.float32)
    want = layer_measures(model, "fc", data, normalize=True, dead_units="drop")
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.split("│") if c.strip()]
        if len(cells) >= 3 and cells[0] in want:
            rows[cells[0]] = cells[1]
    assert set(rows) == {"relative_flatness", "relative_flatness_normalized", "weight_norm"}
    for name, shown in rows.items():
        assert shown == format_value(want[name].value), name
    assert want["relative_flatness_normalized"].value != pytest.approx(
        want["relative_flatness"].value, rel=0.01
    )


def test_inspect(runner: CliRunner) -> None:
    result = run(runner, "inspect", MLP, "--format", "json")
    info = json.loads(result.stdout)
    assert info["default_layer"] == "fc"
    assert [r["name"] for r in info["layers"] if r["weight_shape"]] == ["fc1", "fc2", "fc"]
    methods = {r["name"]: r["measures"] for r in info["layers"]}
    assert methods["fc"].startswith("κ exact closed form (Identity 3), κ̃ (--normalize);")
    assert methods["fc1"].startswith("κ exact (Identity 2, ")
    table = run(runner, "inspect", CNN)
    assert table.exit_code == 0 and "conv2" in table.stdout and "sha256" in table.stdout


def test_version_and_help(runner: CliRunner) -> None:
    assert run(runner, "--version").stdout.startswith("flatcli ")
    for cmd in ("inspect", "measure"):
        result = run(runner, cmd, "--help")
        assert result.exit_code == 0 and "Examples" in result.stdout


def test_python_dash_m_and_lazy_imports() -> None:
    code = (
        "import sys; import flatcli.cli; "
        "print(sorted(m for m in ('matplotlib', 'scipy', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    res = subprocess.run(
        [sys.executable, "-m", "flatcli", "--version"], capture_output=True, text=True, check=True
    )
    assert res.stdout.startswith("flatcli ")


# --------------------------------------------------------------------------- bad input


def test_missing_checkpoint(runner: CliRunner) -> None:
    assert "not found" in one_line_error(run(runner, "measure", "nope.safetensors"))


def test_corrupt_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert "not a valid safetensors" in one_line_error(run(runner, "measure", str(bad)))


def test_unsafe_checkpoint_needs_opt_in(runner: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(archs.mlp(64, [8], 10), path)
    assert "--trust-code" in one_line_error(run(runner, "inspect", str(path)))
    assert run(runner, "inspect", str(path), "--trust-code").exit_code == 0


def test_unknown_layer_suggests(runner: CliRunner) -> None:
    err = one_line_error(run(runner, "measure", MLP, "--layer", "fc_2"), code=2)
    assert "did you mean" in err and "fc2" in err


def test_unsupported_method_for_layer(runner: CliRunner) -> None:
    err = one_line_error(run(runner, "measure", CNN, "--layer", "conv1", "--normalize"), code=2)
    assert "nn.Linear" in err


@pytest.mark.parametrize(
    ("x_shape", "labels", "needle"),
    [
        ((20, 63), [0, 9], "does not fit the model"),
        ((20, 64), [0, 12], "labels range over [0, 12]"),
    ],
    ids=["shape", "label-range"],
)
def test_data_that_does_not_fit(runner: CliRunner, tmp_path: Path, x_shape, labels, needle):
    y = np.array([labels[i % 2] for i in range(x_shape[0])])
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.default_rng(0).random(x_shape).astype(np.float32), y=y)
    err = one_line_error(run(runner, "measure", MLP, "--data", str(path)))
    assert needle in err


def test_nan_in_data(runner: CliRunner, tmp_path: Path) -> None:
    x = np.zeros((10, 64), np.float32)
    x[3, 5] = np.nan
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(10, np.int64))
    assert "NaN" in one_line_error(run(runner, "measure", MLP, "--data", str(tmp_path / "d.npz")))


def test_nan_in_weights(runner: CliRunner, tmp_path: Path) -> None:
    model = archs.mlp(64, [8], 10)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")
    path = save_checkpoint(
        model,
        tmp_path / "m.safetensors",
        arch="flatcli.archs:mlp",
        arch_kwargs={"in_features": 64, "hidden": [8], "num_classes": 10},
        data="digits",
    )
    err = one_line_error(run(runner, "measure", str(path)))
    assert "fc.weight contains NaN or Inf" in err


def test_empty_dataset(runner: CliRunner, tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64))
    assert "empty" in one_line_error(run(runner, "measure", MLP, "--data", str(tmp_path / "d.npz")))


def test_max_samples_zero(runner: CliRunner) -> None:
    assert "--max-samples" in one_line_error(
        run(runner, "measure", MLP, "--max-samples", "0"), code=2
    )


def test_missing_data_file(runner: CliRunner) -> None:
    assert "not found" in one_line_error(run(runner, "measure", MLP, "--data", "nope.npz"))


def test_bad_arch_kwargs(runner: CliRunner, tmp_path: Path) -> None:
    torch.save(archs.mlp(64, [8], 10).state_dict(), tmp_path / "m.pt")
    err = one_line_error(
        run(
            runner,
            "measure",
            str(tmp_path / "m.pt"),
            "--arch",
            "flatcli.archs:mlp",
            "--arch-kwargs",
            "{width: 3",
        ),
        code=2,
    )
    assert "not valid JSON" in err
    err = one_line_error(run(runner, "measure", str(tmp_path / "m.pt")), code=2)
    assert "--arch" in err


def measure_to(runner: CliRunner, target: Path):  # noqa: ANN201
    return run(
        runner, "measure", MLP, "--format", "json", "--output", str(target), "--max-samples", "20"
    )


def test_unwritable_output_leaves_no_file(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "no_such_dir" / "r.json"
    err = one_line_error(measure_to(runner, target))
    assert "cannot write" in err and not target.exists()
    # A path under a regular file: refused even for root.
    plain = tmp_path / "plain.txt"
    plain.write_text("keep")
    err = one_line_error(measure_to(runner, plain / "r.json"))
    assert "cannot write" in err and plain.read_text() == "keep"
    # The target is a directory: the temporary file is written, then the rename fails;
    # the temporary file must not stay behind.
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    err = one_line_error(measure_to(runner, occupied))
    assert "cannot write" in err and occupied.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied", "plain.txt"]
    assert list(occupied.iterdir()) == []


def test_read_only_output_directory(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):
            # Root (as in CI) ignores the mode: make the write fail as a read-only
            # directory would, where the temporary file is created.
            import errno

            import flatcli.io

            def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                raise PermissionError(errno.EACCES, "Permission denied")

            monkeypatch.setattr(flatcli.io.tempfile, "mkstemp", refuse)
        err = one_line_error(measure_to(runner, ro / "r.json"))
        assert "cannot write" in err and "Permission denied" in err
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o700)


def test_a_failed_write_removes_its_temporary_file(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The disk fills up after the temporary file exists: no partial output, no leftovers.
    import errno

    import flatcli.io

    def full(src, dst):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(flatcli.io.os, "replace", full)
    err = one_line_error(measure_to(runner, tmp_path / "r.json"))
    assert "No space left on device" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_option_values(runner: CliRunner) -> None:
    one_line_error(run(runner, "measure", MLP, "--format", "xml"), code=2)
    one_line_error(run(runner, "measure", MLP, "--device", "tpu"), code=2)
    one_line_error(run(runner, "measure", MLP, "--measures", "relative_flatnes"), code=2)
    one_line_error(run(runner, "measure", MLP, "--loss", "hinge"), code=2)


def test_whole_network_measures_match_the_library(runner: CliRunner, tmp_path: Path) -> None:
    from flatcli.checkpoints import load_checkpoint
    from flatcli.data import load_data
    from flatcli.measures import fisher_rao, hessian, norms, pac_bayes, sharpness

    names = (
        "hessian_trace,hessian_top_eigenvalue,fisher_rao,pacbayes_flatness,pacbayes_bound,"
        "sharpness,frobenius_norms,path_norm,distance_from_init"
    )
    init = tmp_path / "init.safetensors"
    model = load_checkpoint(MLP).model
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    save_checkpoint(
        model,
        init,
        arch="flatcli.archs:mlp",
        arch_kwargs={"in_features": 64, "hidden": [64, 32], "num_classes": 10},
        data="digits",
    )
    args = [
        "measure",
        MLP,
        "--measures",
        names,
        "--init",
        str(init),
        "--max-samples",
        "150",
        "--dtype",
        "float64",
        "--seed",
        "3",
        "--trace-params",
        "fc2",
        "--rtol",
        "0.05",
        "--mc-samples",
        "4",
        "--search-depth",
        "6",
        "--fr-include-bias",
        "--format",
        "json",
    ]
    got = json.loads(run(runner, *args).stdout)
    out = got["measures"]
    assert list(out) == names.split(",")
    assert got["config"]["init"] == load_checkpoint(init).sha256

    ck = load_checkpoint(MLP)
    net = ck.model.double()
    ds = load_data("digits", max_samples=150)
    data = (ds.x.double(), ds.y)
    expect = {
        "hessian_trace": hessian.hessian_trace(net, data, params="fc2", rtol=0.05, seed=3),
        "hessian_top_eigenvalue": hessian.hessian_top_eigenvalue(net, data, params="fc2", seed=3),
        "fisher_rao": fisher_rao.fisher_rao(net, data, include_bias=True),
        "pacbayes_flatness": pac_bayes.pacbayes_flatness(
            net, data, mc_samples=4, search_depth=6, seed=3
        ),
        "pacbayes_bound": pac_bayes.pacbayes_bound(
            net,
            data,
            mc_samples=4,
            search_depth=6,
            seed=3,
            init_model=load_checkpoint(init).model.double(),
        ),
        "sharpness": sharpness.sharpness(net, data, search_depth=6, seed=3),
        "frobenius_norms": norms.frobenius_norms(net),
        "path_norm": norms.path_norm(net, (64,)),
    }
    for name, est in expect.items():
        assert out[name]["value"] == pytest.approx(est.value, rel=1e-10), name
        assert out[name]["method"] == est.method, name
    for name, est in expect.items():
        if est.stderr is None:
            assert out[name]["stderr"] is None, name
        else:
            assert out[name]["stderr"] == pytest.approx(est.stderr, rel=1e-10), name
    for name in ("pacbayes_flatness", "pacbayes_bound"):
        for key in ("sigma", "sigma_stderr", "increase", "mc_stderr"):
            assert out[name][key] == pytest.approx(expect[name].details[key], rel=1e-10)
    # every parameter halved: the distance is half the norm of the parameters
    half = 0.5 * torch.cat([p.detach().flatten() for p in net.parameters()]).norm().item()
    assert out["distance_from_init"]["value"] == pytest.approx(half, rel=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--measures", "distance_from_init"], "needs --init"),
        (["--pacbayes-target", "margin"], "--pacbayes-target must be error or loss"),
        (["--rtol", "0"], "--rtol must be positive"),
        (["--mc-samples", "1"], "--mc-samples must be at least 2"),
        (["--trace-params", "fc9", "--measures", "hessian_trace"], "did you mean"),
        (["--init", "missing.safetensors"], "not found"),
    ],
)
def test_measure_option_errors_are_one_line(
    runner: CliRunner, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["measure", MLP, "--max-samples", "50", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_every_public_name_resolves() -> None:
    import flatcli

    for name in flatcli.__all__:
        assert getattr(flatcli, name) is not None, name
    from flatcli.fam import FAMRegularizer

    assert flatcli.FAMRegularizer is FAMRegularizer


def test_a_failed_measure_is_a_row_and_the_others_are_written(
    runner: CliRunner, tmp_path: Path
) -> None:
    out = tmp_path / "r.json"
    args = ["measure", MLP, "--measures", "frobenius_norms,hessian_trace,weight_norm"]
    result = run(runner, *args, "--max-memory", "1K", "--max-samples", "50", "-o", str(out))
    assert result.exit_code == 1
    assert "1 measure(s) failed: hessian_trace" in result.stderr
    assert "failed" in result.stdout and "raise --max-memory" in result.stdout
    report = json.loads(out.read_text())["measures"]
    assert report["frobenius_norms"]["value"] > 0 and report["weight_norm"]["value"] > 0
    assert report["hessian_trace"]["value"] is None
    assert "raise --max-memory" in report["hessian_trace"]["error"]
    assert report["frobenius_norms"]["warnings"] == []


def test_interrupt_reports_what_was_computed_and_exits_130(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flatcli import registry

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    produces = registry.GROUPS["hessian"][1]
    monkeypatch.setitem(registry.GROUPS, "hessian", (interrupted, produces))
    out = tmp_path / "r.json"
    names = "weight_norm,hessian_trace,frobenius_norms"  # groups run layer, hessian, ..., norms
    args = ["measure", MLP, "--measures", names, "--max-samples", "50", "--format", "json"]
    result = run(runner, *args, "-o", str(out))
    assert result.exit_code == 130
    report = json.loads(out.read_text())["measures"]
    assert json.loads(result.stdout)["measures"] == report
    assert report["weight_norm"]["value"] > 0
    assert report["hessian_trace"]["interrupted"] and report["frobenius_norms"]["interrupted"]
    assert report["frobenius_norms"]["value"] is None


def test_budget_options(runner: CliRunner) -> None:
    args = ["measure", MLP, "--measures", "hessian_trace", "--max-samples", "100"]
    args += ["--method", "hutchinson", "--format", "json", "--rtol", "0.2"]
    got = json.loads(
        run(runner, *args, "--trace-method", "hutch++", "--probe-batch", "1").stdout
    )["measures"]["hessian_trace"]
    assert got["method"].startswith("hutch++ (rank-16 sketch exact")
    assert got["engine"] == "retained" and got["warnings"] == []
    assert "one gradient graph kept for every probe, one backward pass per probe" in got["method"]
    one_line_error(run(runner, *args, "--max-memory", "lots"), code=2)
    one_line_error(run(runner, *args, "--trace-method", "xtrace"), code=2)
    one_line_error(run(runner, *args, "--probe-batch", "0"), code=2)
    one_line_error(run(runner, *args, "--time-budget", "-1"), code=2)


# --------------------------------------------------------------------------- less used paths


def test_measure_split_test_uses_the_test_split(runner: CliRunner) -> None:
    from flatcli.measures.relative_flatness import layer_measures

    args = ["measure", MLP, "--measures", "relative_flatness,train_loss", "--format", "json"]
    args += ["--max-samples", "120", "--dtype", "float64"]
    test = json.loads(run(runner, *args, "--split", "test").stdout)
    train = json.loads(run(runner, *args).stdout)
    assert test["data"] == {"source": "digits", "split": "test", "n_samples": 120}
    for split, report in (("test", test), ("train", train)):
        model, data = digits_mlp(120, torch.float64, split=split)
        want = layer_measures(model, "fc", data)
        for name in ("relative_flatness", "train_loss"):
            assert report["measures"][name]["value"] == pytest.approx(want[name].value, rel=1e-10)
    kappas = [r["measures"]["relative_flatness"]["value"] for r in (test, train)]
    assert kappas[0] != pytest.approx(kappas[1], rel=1e-3)


def test_pacbayes_mag_flatness_through_registry_and_cli(runner: CliRunner) -> None:
    from flatcli import registry
    from flatcli.data import as_batches
    from flatcli.measures.pac_bayes import pacbayes_flatness

    model, data = digits_mlp(100, torch.float64)
    opts = dict(mc_samples=3, search_depth=6, seed=2, threshold=0.05)
    want = {
        "pacbayes_mag_flatness": pacbayes_flatness(model, data, magnitude_aware=True, **opts),
        "pacbayes_flatness": pacbayes_flatness(model, data, **opts),
    }
    assert want["pacbayes_mag_flatness"].value != pytest.approx(
        want["pacbayes_flatness"].value, rel=0.01
    )
    config = registry.MeasureConfig(
        layer="fc", mc_samples=3, search_depth=6, seed=2, pacbayes_threshold=0.05
    )
    names = ["pacbayes_mag_flatness", "pacbayes_flatness"]
    got = registry.run_measures(model, as_batches(data, batch_size=256), names, config)
    cli = json.loads(
        run(
            runner,
            "measure",
            MLP,
            "--measures",
            ",".join(names),
            "--max-samples",
            "100",
            "--dtype",
            "float64",
            "--mc-samples",
            "3",
            "--search-depth",
            "6",
            "--seed",
            "2",
            "--pacbayes-threshold",
            "0.05",
            "--format",
            "json",
        ).stdout
    )["measures"]
    for name, est in want.items():
        assert got[name].value == pytest.approx(est.value, rel=1e-12), name
        assert got[name].stderr == pytest.approx(est.stderr, rel=1e-12), name
        assert cli[name]["value"] == pytest.approx(est.value, rel=1e-10), name
        assert cli[name]["stderr"] == pytest.approx(est.stderr, rel=1e-10), name
        assert cli[name]["sigma"] == pytest.approx(est.details["sigma"], rel=1e-10), name
    assert "σ²w² + ε²" in cli["pacbayes_mag_flatness"]["method"]


def test_cuda_device_resolution(monkeypatch: pytest.MonkeyPatch, runner: CliRunner) -> None:
    from flatcli.correlate import _devices
    from flatcli.errors import FlatcliError, UsageError
    from flatcli.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(FlatcliError, match=f"--device {spec}: CUDA is not available"):
            resolve_device(spec)
    assert _devices("cuda", 4) == ["cuda"]
    err = one_line_error(run(runner, "measure", MLP, "--device", "cuda", "--max-samples", "10"))
    assert "CUDA is not available" in err
    with pytest.raises(UsageError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(FlatcliError, match=r"--device cuda:2: only 2 CUDA device\(s\) visible"):
        resolve_device("cuda:2")
    # correlate: one device per worker, round robin, only with several jobs
    assert _devices("cuda", 3) == ["cuda:0", "cuda:1"]
    assert _devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert _devices("cuda", 1) == ["cuda"] and _devices("cpu", 4) == ["cpu"]
