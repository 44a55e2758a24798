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
    assert kappa["value"] > 0 and kappa["stderr"] is None and "closed form" in kappa["method"]
    assert set(report["manifest"]) >= {"flatcli", "torch", "python", "device", "dtype", "seed"}


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
    side = json.loads((tmp_path / "r.manifest.json").read_text())
    assert side["checkpoint"]["sha256"] == hashlib.sha256(Path(MLP).read_bytes()).hexdigest()
    assert side["manifest"]["seed"] == 0 and "torch" in side["manifest"]
    assert side["config"]["layer"] == "fc"


def test_table_output_and_normalize(runner: CliRunner) -> None:
    result = run(runner, "measure", MLP, "--normalize", "--max-samples", "100")
    assert result.exit_code == 0
    assert (
        "relative_flatness_normalized" in result.stdout or "relative_flatness_norm" in result.stdout
    )


def test_inspect(runner: CliRunner) -> None:
    result = run(runner, "inspect", MLP, "--format", "json")
    info = json.loads(result.stdout)
    assert info["default_layer"] == "fc"
    assert [r["name"] for r in info["layers"] if r["weight_shape"]] == ["fc1", "fc2", "fc"]
    assert "closed form" in next(r for r in info["layers"] if r["name"] == "fc")["measures"]
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


def test_unwritable_output_leaves_no_file(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "no_such_dir" / "r.json"
    err = one_line_error(
        run(
            runner,
            "measure",
            MLP,
            "--format",
            "json",
            "--output",
            str(target),
            "--max-samples",
            "20",
        )
    )
    assert "cannot write" in err and not target.exists()
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            return
        err = one_line_error(
            run(
                runner,
                "measure",
                MLP,
                "--format",
                "json",
                "--output",
                str(ro / "r.json"),
                "--max-samples",
                "20",
            )
        )
        assert list(ro.iterdir()) == []
    finally:
        os.chmod(ro, 0o700)


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
    assert out["hessian_trace"]["stderr"] == pytest.approx(expect["hessian_trace"].stderr)
    assert out["pacbayes_flatness"]["stderr"] > 0 and "sigma" in out["pacbayes_flatness"]
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
    assert got["engine"] == "double_backward" and got["warnings"] == []
    one_line_error(run(runner, *args, "--max-memory", "lots"), code=2)
    one_line_error(run(runner, *args, "--trace-method", "xtrace"), code=2)
    one_line_error(run(runner, *args, "--probe-batch", "0"), code=2)
    one_line_error(run(runner, *args, "--time-budget", "-1"), code=2)
