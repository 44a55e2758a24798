"""FAM fine-tuning: it lowers κ, resumes bit-identically, writes its files, refuses bad input."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from flatcli.checkpoints import load_checkpoint
from flatcli.data import load_data
from flatcli.errors import FlatcliError, UsageError
from flatcli.fam import FAMRegularizer
from flatcli.finetune import (
    LOG_COLUMNS,
    SAFE_STEP_RATIO,
    Diverged,
    FinetuneResult,
    finetune,
)
from flatcli.finetune_report import BATCH_LABEL, FULL_LABEL, history_figure
from flatcli.io import sha256_file

from . import models, tabular

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "sample_models" / "digits_mlp.safetensors"
CNN = ROOT / "sample_models" / "digits_cnn.safetensors"
QUICK = {"max_samples": 300, "device": "cpu", "batch_size": 32}


class Interrupted(Exception):
    """Stands in for a killed process."""


def interrupt_after(epoch: int):  # noqa: ANN201
    def progress(line: str) -> None:
        if line.startswith(f"epoch {epoch}/"):
            raise Interrupted(line)

    return progress


def same_weights(a: FinetuneResult, b: FinetuneResult) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def rows(result: FinetuneResult) -> list[dict]:
    return [{k: v for k, v in r.to_row().items() if k != "seconds"} for r in result.history]


def test_fam_ends_flatter_than_plain_training() -> None:
    kwargs = {**QUICK, "epochs": 2, "seed": 1}
    plain = finetune(MLP, fam_lambda=0.0, **kwargs)
    fam = finetune(MLP, fam_lambda=0.1, **kwargs)
    assert plain.before["relative_flatness"].value == fam.before["relative_flatness"].value
    kappa_plain = plain.after["relative_flatness"].value
    kappa_fam = fam.after["relative_flatness"].value
    assert kappa_fam < 0.95 * kappa_plain, (kappa_fam, kappa_plain)
    assert fam.history[-1].kappa < plain.history[-1].kappa
    assert fam.after["test_accuracy"].value > 0.9
    assert "closed form" in fam.fam_method


@pytest.mark.parametrize(
    ("optimizer", "lam", "gradient"),
    [
        ("sgd", 0.1, "full"),
        ("adam", 0.1, "full"),
        ("sam", 0.1, "full"),
        ("sgd", "auto", "detached"),
    ],
)
def test_resume_after_interruption_is_bit_identical(
    optimizer: str, lam: float | str, gradient: str, tmp_path: Path
) -> None:
    kwargs = {**QUICK, "epochs": 4, "fam_lambda": lam, "optimizer": optimizer, "seed": 3}
    kwargs["fam_gradient"] = gradient
    straight = finetune(MLP, **kwargs)
    out = tmp_path / "tuned.safetensors"
    log = tmp_path / "log.csv"
    with pytest.raises(Interrupted):
        finetune(MLP, **kwargs, out_path=out, log_path=log, progress=interrupt_after(2))
    assert not out.exists() and (tmp_path / "tuned.state.pt").is_file()
    assert len(list(csv.DictReader(log.read_text().splitlines()))) == 2
    resumed = finetune(MLP, **kwargs, out_path=out, log_path=log, resume=True)
    assert resumed.resumed_from == 2
    assert same_weights(straight, resumed)
    assert rows(straight) == rows(resumed)
    assert straight.before == resumed.before
    assert len(list(csv.DictReader(log.read_text().splitlines()))) == 4


def test_constant_schedule_extends_a_finished_run(tmp_path: Path) -> None:
    kwargs = {**QUICK, "fam_lambda": 0.1, "schedule": "constant", "seed": 4}
    straight = finetune(MLP, epochs=4, **kwargs)
    out = tmp_path / "tuned.safetensors"
    finetune(MLP, epochs=2, out_path=out, **kwargs)
    extended = finetune(MLP, epochs=4, out_path=out, resume=True, **kwargs)
    assert extended.resumed_from == 2 and same_weights(straight, extended)


def test_resume_refuses_other_settings(tmp_path: Path) -> None:
    out = tmp_path / "tuned.safetensors"
    finetune(MLP, fam_lambda=0.1, epochs=1, out_path=out, **QUICK)
    with pytest.raises(UsageError, match=r"fam_lambda 0\.1 → 0\.2"):
        finetune(MLP, fam_lambda=0.2, epochs=1, out_path=out, resume=True, **QUICK)
    with pytest.raises(UsageError, match="epochs"):  # cosine: more epochs change the schedule
        finetune(MLP, fam_lambda=0.1, epochs=3, out_path=out, resume=True, **QUICK)
    with pytest.raises(FlatcliError, match="another checkpoint"):
        finetune(CNN, fam_lambda=0.1, epochs=1, out_path=out, resume=True, **QUICK)


def test_output_files(tmp_path: Path) -> None:
    out, log, png = tmp_path / "t.safetensors", tmp_path / "t.csv", tmp_path / "t.png"
    result = finetune(
        MLP, fam_lambda=0.05, epochs=2, out_path=out, log_path=log, plot_path=png, **QUICK
    )
    ck = load_checkpoint(out)
    assert ck.metadata["arch"] == "flatcli.archs:mlp"
    assert ck.metadata["data"] == "digits" and ck.metadata["parent_sha256"] == sha256_file(MLP)
    assert ck.hparams["fam_lambda"] == 0.05 and ck.hparams["layer"] == "fc"
    assert ck.input_shape == (64,) and result.out_sha256 == ck.sha256
    for k, v in ck.model.state_dict().items():
        assert torch.equal(v, result.model.state_dict()[k])
    table = list(csv.DictReader(log.read_text().splitlines()))
    assert [r["epoch"] for r in table] == ["1", "2"]
    assert tuple(table[0]) == LOG_COLUMNS
    assert {"weight_sq_norm", "phi_sq_mean", "max_softmax"} <= set(table[0])
    assert float(table[1]["weight_sq_norm"]) == pytest.approx(
        float(ck.model.fc.weight.detach().double().pow(2).sum()), rel=1e-6
    )
    assert 0.1 <= float(table[1]["max_softmax"]) <= 1.0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    side = json.loads((tmp_path / "t.manifest.json").read_text())
    assert side["checkpoint"] == {"parent_sha256": sha256_file(MLP), "output_sha256": ck.sha256}
    assert side["hparams"]["fam_lambda"] == 0.05 and "torch" in side["manifest"]
    state = torch.load(tmp_path / "t.state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["hparams"]["fam_lambda"] == 0.05
    assert {"relative_flatness", "test_accuracy", "train_loss"} <= set(result.after)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_in_memory_module_and_data_with_hutchinson_on_a_conv_layer() -> None:
    model = models.init(models.SmallCNN())
    x, y = models.classification_data(n=40, shape=(2, 3, 3))
    before = [p.detach().clone() for p in model.parameters()]
    result = finetune(
        model,
        (x, y),
        test_data=(x[:10], y[:10]),
        fam_lambda=0.1,
        layer="conv2",
        epochs=2,
        batch_size=16,
        fam_method="hutchinson",
        fam_probes=2,
        dtype="float64",
        device="cpu",
    )
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert "hutchinson" in result.fam_method and result.layer == "conv2"
    assert result.history[-1].test_accuracy is not None
    assert result.after["relative_flatness"].stderr is not None  # measured by Hutchinson too


def test_layerwise_variant_runs_and_is_logged() -> None:
    result = finetune(MLP, fam_lambda=0.01, layer="fc2", fam_variant="layerwise", epochs=1, **QUICK)
    assert result.hparams["fam_variant"] == "layerwise"
    assert "Identity 2" in result.fam_method


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fam_lambda": -0.1}, "fam_lambda must be"),
        ({"fam_lambda": float("nan")}, "fam_lambda must be"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"optimizer": "lbfgs"}, "optimizer must be one of"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"fam_variant": "rowwise"}, "fam_variant must be one of"),
        ({"fam_method": "dense"}, "fam_method must be one of"),
        ({"layer": "fc_2"}, "did you mean fc2"),
        ({"resume": True}, "resume needs a state file: pass out_path"),
        ({"fam_lambda": "big"}, "fam_lambda must be"),
        ({"fam_lambda": "auto", "optimizer": "adam"}, "fam_lambda auto needs optimizer sgd or sam"),
        ({"fam_scale": "log"}, "fam_scale must be one of"),
        ({"fam_gradient": "half"}, "fam_gradient must be one of"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm must be"),
    ],
)
def test_bad_options_are_usage_errors(kwargs: dict, message: str) -> None:
    options = {"fam_lambda": 0.1, **QUICK, **kwargs}
    with pytest.raises(UsageError, match=re.escape(message)):
        finetune(MLP, **options)


# --------------------------------------------------------------------------- divergence

UNSTABLE = {**QUICK, "schedule": "constant", "clip_grad_norm": 0, "seed": 0}


def test_divergence_writes_the_last_good_epoch(tmp_path: Path) -> None:
    """λ = 1 unclipped: epoch 1 is fine, epoch 2 loses the fit. The run stops and the
    written weights are epoch 1's, bit for bit (a 1-epoch run of the same settings)."""
    one_epoch = finetune(MLP, fam_lambda=1.0, epochs=1, **UNSTABLE)
    out, log = tmp_path / "t.safetensors", tmp_path / "t.csv"
    with pytest.raises(Diverged) as caught:
        finetune(MLP, fam_lambda=1.0, epochs=6, out_path=out, log_path=log, **UNSTABLE)
    e = caught.value
    assert (e.epoch, e.good_epoch, e.exit_code) == (2, 1, 1)
    assert "loss check" in e.reason and "--lr" in str(e) and "--fam-lambda" in str(e)
    written = load_checkpoint(out)
    assert written.hparams["diverged_in_epoch"] == 2
    want = one_epoch.model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in written.model.state_dict().items())
    assert len(list(csv.DictReader(log.read_text().splitlines()))) == 2  # the wreck is logged
    side = json.loads((tmp_path / "t.manifest.json").read_text())
    assert side["diverged"]["weights_of_epoch"] == 1
    state = torch.load(tmp_path / "t.state.pt", weights_only=True)
    assert state["epoch"] == 1  # resuming never starts from the wreck


def test_cli_divergence_in_epoch_one_exits_1_and_writes_the_start(tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    result = invoke(
        str(MLP), "--fam-lambda", "3", "--schedule", "constant", "--clip-grad-norm", "0",
        "--max-samples", "300", "--epochs", "3", "--out", str(out), "--device", "cpu",
    )  # fmt: skip
    line = one_line_error(result, 1)
    assert "diverged in epoch 1" in line and "train loss rose" in line and "--lr" in line
    start = load_checkpoint(MLP).model.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in load_checkpoint(out).model.state_dict().items())


# Collapses to chance that the old guard (loss > 10·loss₀ + 0.1) let exit 0 (issue 21), from
# under-fitted ReLU MLPs on scikit-learn's wine and iris, float64, 5 epochs, cosine.
COLLAPSES = {
    "wine 0.87, λ 10, lr 0.01, no clip": ("wine", 0.87, "10", "0.01", ["--clip-grad-norm", "0"]),
    "wine 0.87, λ 10, lr 0.1, clip 1": ("wine", 0.87, "10", "0.1", []),
    "wine 0.87, detached λ 30, lr 0.1": ("wine", 0.87, "30", "0.1", ["--fam-gradient", "detached"]),
    "wine 0.87, detached λ 100": ("wine", 0.87, "100", "0.1", ["--fam-gradient", "detached"]),
    "iris 0.65, λ 3, lr 0.1": ("iris", 0.65, "3", "0.1", []),
    "wine 0.40, λ 10, lr 0.01, no clip": ("wine", 0.40, "10", "0.01", ["--clip-grad-norm", "0"]),
}


@pytest.mark.parametrize("case", COLLAPSES.values(), ids=COLLAPSES.keys())
def test_cli_collapse_to_chance_exits_1_with_the_last_good_weights(
    case: tuple, tmp_path: Path
) -> None:
    name, start_loss, lam, lr, extra = case
    ck, data = tabular.write_start(tmp_path, name, start_loss)
    out = tmp_path / "t.safetensors"
    result = invoke(
        str(ck), "--fam-lambda", lam, "--lr", lr, *extra, "--epochs", "5", "--dtype",
        "float64", "--device", "cpu", "--out", str(out),
    )  # fmt: skip
    line = one_line_error(result, 1)
    assert "check:" in line and "--fam-lambda" in line, line
    written = load_checkpoint(out)
    good = written.hparams["weights_of_epoch"]
    assert good == written.hparams["diverged_in_epoch"] - 1
    if good == 0:
        start = load_checkpoint(ck).model.state_dict()
        assert all(torch.equal(v, start[k]) for k, v in written.model.state_dict().items())
    # The written model is one the guard accepts: not the collapsed one.
    xa, ya, _, _ = tabular.dataset(name)
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(written.model.double()(xa), ya))
    assert loss < 0.5 * (start_loss + math.log(3)) + 0.05, loss


def test_hutchinson_kappa_rise_stops_the_run() -> None:
    """The κ-rise check used to be off for a Hutchinson κ. The published (detached) gradient
    at lr 0.01 raises κ; with 4 probes per batch the t-test on the epoch's mean stops it."""
    with pytest.raises(Diverged) as caught:
        finetune(
            MLP, fam_lambda=10.0, lr=0.01, fam_gradient="detached", fam_method="hutchinson",
            fam_probes=4, epochs=3, device="cpu", seed=0,
        )  # fmt: skip
    assert caught.value.reason.startswith("κ-rise check (Hutchinson)"), caught.value.reason


# --------------------------------------------------------------------------- λ, clipping


def train_300() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_data("digits", max_samples=300)
    return data.x.float(), data.y


def test_relative_scale_gives_the_requested_ratio_at_step_0() -> None:
    result = finetune(MLP, fam_lambda=0.05, fam_scale="relative", epochs=1, **QUICK)
    lam = result.hparams["fam_lambda_used"]
    model = load_checkpoint(MLP).model.eval()
    x, y = train_300()
    with torch.no_grad():
        kappa0 = float(FAMRegularizer(model.double(), "fc")(x.double(), y))
        loss0 = float(torch.nn.functional.cross_entropy(model(x.double()), y))
    assert lam * kappa0 / loss0 == pytest.approx(0.05, rel=1e-4)
    assert result.hparams["fam_lambda"] == 0.05 and result.hparams["fam_scale"] == "relative"


def test_paper_scale_is_lambda_over_m_of_the_published_regularizer() -> None:
    # The published neuron-wise regularizer is Σ ⟨w_i, w_j⟩ Tr(H_ij)/m = κ/m (m = 32 here):
    # λ from the paper is λ/m in flatcli's units, and the run is the same as with that λ.
    paper = finetune(MLP, fam_lambda=0.1, fam_scale="paper", epochs=1, **QUICK)
    plain = finetune(MLP, fam_lambda=0.1 / 32, epochs=1, **QUICK)
    assert paper.hparams["fam_lambda_used"] == 0.1 / 32 and paper.hparams["fam_scale"] == "paper"
    assert same_weights(paper, plain)
    with pytest.raises(UsageError, match="layer-wise"):
        finetune(MLP, fam_lambda=0.1, fam_scale="paper", fam_variant="layerwise", **QUICK)
    with pytest.raises(UsageError, match="nn.Linear"):
        finetune(CNN, fam_lambda=0.1, fam_scale="paper", layer="conv2", **QUICK)
    with pytest.raises(UsageError, match="drop fam_scale paper"):
        finetune(MLP, fam_lambda="auto", fam_scale="paper", **QUICK)


def test_auto_lambda_gives_the_safe_step_ratio() -> None:
    result = finetune(MLP, fam_lambda="auto", epochs=1, lr=2e-3, momentum=0.8, **QUICK)
    lam = result.hparams["fam_lambda_used"]
    model = load_checkpoint(MLP).model.double().eval()
    x, y = train_300()
    kappa = FAMRegularizer(model, "fc")(x.double(), y)
    grads = torch.autograd.grad(kappa, list(model.parameters()))
    grad_sq = sum(float(g.pow(2).sum()) for g in grads)
    ratio = 2e-3 / (1 - 0.8) * lam * grad_sq / float(kappa.detach())
    assert ratio == pytest.approx(SAFE_STEP_RATIO, rel=1e-4)
    assert result.hparams["fam_step_ratio"] == pytest.approx(SAFE_STEP_RATIO, rel=1e-9)
    assert not result.warnings
    loud = finetune(MLP, fam_lambda=1.0, epochs=1, **QUICK)  # R ≈ 0.6 here
    assert loud.warnings and "relative step" in loud.warnings[0]


def test_gradient_clipping_is_the_same_for_plain_and_fam_and_bounds_the_step() -> None:
    fam = finetune(MLP, fam_lambda=0.1, epochs=1, **QUICK)
    plain = finetune(MLP, fam_lambda=0.0, epochs=1, **QUICK)
    assert fam.hparams["clip_grad_norm"] == plain.hparams["clip_grad_norm"] == 1.0
    clipped = finetune(MLP, fam_lambda=0.0, epochs=1, clip_grad_norm=1.0, **QUICK)
    assert same_weights(plain, clipped)
    start = torch.cat([p.detach().flatten() for p in load_checkpoint(MLP).model.parameters()])

    def moved(clip: float, lam: float = 0.1) -> float:
        r = finetune(MLP, fam_lambda=lam, epochs=1, clip_grad_norm=clip, **QUICK)
        end = torch.cat([p.detach().flatten() for p in r.model.parameters()])
        return float((end - start).norm())

    # 10 SGD steps, momentum 0.9: ‖Δθ‖ ≤ steps · lr · clip / (1 − β) = 10 · 1e-3 · c / 0.1.
    assert moved(1e-6) <= 1e-7 * (1 + 1e-4)
    assert moved(1e-6, lam=0.0) <= 1e-7 * (1 + 1e-4)  # plain training is clipped the same way
    assert moved(0) > 1e-4


def test_a_negligible_penalty_is_a_warning() -> None:
    """λκ₀ a millionth of the loss (what `auto` picked on MiniLM) says FAM is nearly off."""
    tiny = finetune(MLP, fam_lambda=1e-6, fam_scale="relative", epochs=1, **QUICK)
    (line,) = [w for w in tiny.warnings if "negligible" in w]
    kappa0, loss0 = tiny.before["relative_flatness"].value, tiny.before["train_loss"].value
    share = tiny.hparams["fam_lambda_used"] * kappa0 / loss0
    assert share == pytest.approx(1e-6, rel=1e-6)
    assert f"is {share:.2g} of the train loss" in line and "close to plain training" in line
    for lam, scale in ((0.05, "relative"), (0.0, "absolute")):
        result = finetune(MLP, fam_lambda=lam, fam_scale=scale, epochs=1, **QUICK)
        assert not any("negligible" in w for w in result.warnings), (lam, result.warnings)


def test_detached_gradient_runs_and_differs_from_full() -> None:
    full = finetune(MLP, fam_lambda=0.1, epochs=1, **QUICK)
    detached = finetune(MLP, fam_lambda=0.1, epochs=1, fam_gradient="detached", **QUICK)
    assert detached.hparams["fam_gradient"] == "detached" and "term I only" in detached.fam_method
    assert not same_weights(full, detached)


# --------------------------------------------------------------------------- reporting


def test_temperature_matched_baseline() -> None:
    result = finetune(MLP, fam_lambda=0.1, epochs=2, **QUICK)
    matched, c = result.temperature_matched, result.temperature_c
    assert matched is not None and c is not None and c > 0
    assert matched["train_loss"].value == pytest.approx(result.after["train_loss"].value, rel=1e-4)
    assert matched["test_accuracy"].value == result.before["test_accuracy"].value  # argmax kept
    start = load_checkpoint(MLP).model
    assert matched["weight_norm"].value == pytest.approx(
        c**2 * float(start.fc.weight.detach().double().pow(2).sum()), rel=1e-5
    )


def lines_by_label(ax) -> dict[str, tuple[list[float], list[float]]]:  # noqa: ANN001
    return {
        ln.get_label(): ([float(v) for v in ln.get_xdata()], [float(v) for v in ln.get_ydata()])
        for ln in ax.lines
    }


def test_plot_starts_at_epoch_0_and_drops_the_test_panel_without_a_test_split() -> None:
    with_test = finetune(MLP, fam_lambda=0.1, epochs=1, **QUICK)
    fig = history_figure(with_test.history, start=with_test.before)
    assert len(fig.axes) == 3
    assert list(fig.axes[0].lines[0].get_xdata()) == [0, 1]
    assert fig.axes[1].lines[0].get_ydata()[0] == with_test.before["relative_flatness"].value
    x, y = train_300()
    no_test = finetune(load_checkpoint(MLP), (x, y), fam_lambda=0.1, epochs=1, device="cpu")
    fig = history_figure(no_test.history, start=no_test.before)
    assert len(fig.axes) == 2
    assert set(lines_by_label(fig.axes[0])) == {FULL_LABEL, BATCH_LABEL}  # no test line


def test_curves_show_one_quantity_per_line_from_epoch_0() -> None:
    """The solid lines are the whole training set in eval mode at every epoch, the start
    included; the train-mode batch means are a second, labelled line from epoch 1."""
    trained = load_checkpoint(MLP).model  # with input dropout: train mode differs from eval
    model = torch.nn.Sequential(
        OrderedDict([("drop", torch.nn.Dropout(0.2)), *trained.named_children()])
    )
    x, y = train_300()
    result = finetune(model, (x, y), fam_lambda=0.1, epochs=3, device="cpu", seed=2)
    fig = history_figure(result.history, start=result.before)
    loss, kappa = lines_by_label(fig.axes[0]), lines_by_label(fig.axes[1])
    first, last = result.history[0], result.history[-1]
    for lines, key, batch in (
        (loss, "train_loss", [r.train_loss for r in result.history]),
        (kappa, "relative_flatness", [r.kappa for r in result.history]),
    ):
        xs, full = lines[FULL_LABEL]
        assert xs == [0, 1, 2, 3]
        assert full[0] == result.before[key].value
        # The last epoch's point is the fine-tuned model as `after` measures it, independently
        # (float32: the penalty's per-batch means against layer_measures' own sums).
        assert full[-1] == pytest.approx(result.after[key].value, rel=1e-4)
        assert lines[BATCH_LABEL] == ([1, 2, 3], batch)
    assert first.full_train_loss != first.train_loss and first.full_kappa != first.kappa
    assert last.full_train_accuracy == pytest.approx(result.after["train_accuracy"].value)


# --------------------------------------------------------------------------- CLI


def invoke(*args: str):  # noqa: ANN201
    from typer.testing import CliRunner

    from flatcli.cli import app

    result = CliRunner().invoke(app, ["finetune", *args])
    assert "Traceback" not in result.output, result.output
    return result


def one_line_error(result, code: int) -> str:  # noqa: ANN001
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))]
    assert len(errors) == 1 and errors[0].startswith("error:"), result.stderr
    return errors[0]


def test_cli_bundled_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(str(MLP), "--fam-lambda", "0.1", "--epochs", "2", "--max-samples", "300")
    assert result.exit_code == 0, result.output
    assert "before → after" in result.stdout and "relative_flatness" in result.stdout
    assert "T-matched" in result.stdout and "R = " in result.stdout
    assert "clip 1" in result.stdout
    for suffix in (".safetensors", ".csv", ".png", ".state.pt"):
        assert (tmp_path / f"digits_mlp-fam{suffix}").is_file(), suffix
    assert load_checkpoint(tmp_path / "digits_mlp-fam.safetensors").hparams["fam_lambda"] == 0.1


def test_cli_explicit_data_out_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "tuned.safetensors"
    args = [
        str(MLP),
        "--data",
        "digits",
        "--fam-lambda",
        "0.1",
        "--layer",
        "fc",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--max-samples",
        "200",
        "--device",
        "cpu",
        "--seed",
        "5",
    ]
    first = invoke(*args, "--fam-gradient", "detached", "--clip-grad-norm", "none")
    assert first.exit_code == 0, first.output
    assert "detached gradient" in first.stdout and "clip off" in first.stdout
    again = invoke(*args, "--fam-gradient", "detached", "--clip-grad-norm", "0", "--resume")
    assert again.exit_code == 0 and "resumed after epoch 2" in again.stdout
    assert load_checkpoint(out).metadata["data"] == "digits"
    assert (tmp_path / "tuned.csv").is_file() and (tmp_path / "tuned.png").is_file()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--fam-lambda", "-0.1"], 2, "--fam-lambda must be"),
        (["--layer", "fc_2"], 2, "did you mean fc2"),
        (["--optimizer", "lbfgs"], 2, "--optimizer"),
        (["--fam-lambda", "lots"], 2, "--fam-lambda must be"),
        (["--clip-grad-norm", "tight"], 2, "--clip-grad-norm must be"),
        (["--fam-gradient", "half"], 2, "--fam-gradient"),
        (["--fam-scale", "log"], 2, "--fam-scale"),
        (["--data", "nope.npz"], 1, "data file not found"),
    ],
)
def test_cli_bad_inputs_are_one_line_errors(
    args: list[str], code: int, message: str, tmp_path: Path
) -> None:
    result = invoke(str(MLP), *args, "--out", str(tmp_path / "t.safetensors"))
    assert message in one_line_error(result, code)
    assert not (tmp_path / "t.safetensors").exists()


def test_cli_missing_checkpoint(tmp_path: Path) -> None:
    result = invoke(str(tmp_path / "missing.safetensors"))
    assert "checkpoint not found" in one_line_error(result, 1)


# --------------------------------------------------------------------------- SAM and weight decay


def one_full_batch_step(optimizer: str, sam_rho: float, weight_decay: float):  # noqa: ANN201
    """The parameters after one step on one full batch, by hand (λ = 0, momentum 0).

    SGD: ``w − η (∇L(w) + wd·w)``. SAM (Foret et al. 2021, as pytorch_optimizer's SAM over
    SGD): ``e = ρ ∇L(w)/‖∇L(w)‖``, then ``w − η (∇L(w + e) + wd·w)``.
    """
    from torch.func import functional_call, grad

    from flatcli.data import load_data

    model = load_checkpoint(MLP).model.double()
    ds = load_data("digits", max_samples=64)
    x, y = ds.x.double(), ds.y
    w0 = {k: v.detach() for k, v in model.named_parameters()}

    def loss(params: dict) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    g = grad(loss)(w0)
    if optimizer == "sam":
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        g = grad(loss)({k: w0[k] + sam_rho * g[k] / (norm + 1e-12) for k in w0})
    return {k: w0[k] - 0.1 * (g[k] + weight_decay * w0[k]) for k in w0}


@pytest.mark.parametrize(
    ("optimizer", "sam_rho", "weight_decay"),
    [("sgd", 0.05, 0.0), ("sgd", 0.05, 0.02), ("sam", 0.5, 0.0), ("sam", 0.5, 0.02)],
)
def test_one_step_matches_sgd_and_sam_by_hand(
    optimizer: str, sam_rho: float, weight_decay: float
) -> None:
    result = finetune(
        MLP,
        fam_lambda=0.0,
        epochs=1,
        optimizer=optimizer,  # type: ignore[arg-type]
        sam_rho=sam_rho,
        lr=0.1,
        momentum=0.0,
        weight_decay=weight_decay,
        batch_size=64,
        schedule="constant",
        max_samples=64,
        device="cpu",
        dtype="float64",
        clip_grad_norm=0,  # the hand-written step is unclipped
    )
    want = one_full_batch_step(optimizer, sam_rho, weight_decay)
    before = {k: v.double() for k, v in load_checkpoint(MLP).model.state_dict().items()}
    got = result.model.state_dict()
    for k, w in want.items():
        step = got[k] - before[k]
        torch.testing.assert_close(step, w - before[k], rtol=1e-6, atol=1e-9)
    # The options matter: SAM's step is not SGD's, weight decay moves the weights.
    other = one_full_batch_step("sgd" if optimizer == "sam" else "sam", 0.5, weight_decay)
    decayed = one_full_batch_step(optimizer, sam_rho, 0.02 - weight_decay)
    for reference in (other, decayed):
        diff = max(float((got[k] - reference[k]).abs().max()) for k in want)
        assert diff > 1e-5


def test_cli_passes_optimizer_sam_rho_and_weight_decay(tmp_path: Path) -> None:
    kwargs = dict(epochs=1, lr=0.05, batch_size=64, max_samples=128, seed=3, device="cpu")
    out = tmp_path / "sam.safetensors"
    result = invoke(
        str(MLP),
        "--fam-lambda",
        "0",
        "--optimizer",
        "sam",
        "--sam-rho",
        "0.3",
        "--weight-decay",
        "0.01",
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "--batch-size",
        "64",
        "--max-samples",
        "128",
        "--seed",
        "3",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(out)
    assert ck.hparams["optimizer"] == "sam"
    assert ck.hparams["sam_rho"] == 0.3 and ck.hparams["weight_decay"] == 0.01
    lib = finetune(
        MLP, fam_lambda=0.0, optimizer="sam", sam_rho=0.3, weight_decay=0.01, **kwargs
    )
    plain = finetune(MLP, fam_lambda=0.0, optimizer="sgd", weight_decay=0.01, **kwargs)
    state, lib_state = ck.model.state_dict(), lib.model.state_dict()
    for k, v in lib_state.items():
        assert torch.equal(state[k], v), k
    assert any(not torch.equal(v, plain.model.state_dict()[k]) for k, v in lib_state.items())
