"""The invariance audit on transformers and ResNets: structural reparameterizations (no fx).

Every reparameterization must keep the logits to 1e-10 in float64; κ at the classifier must
be invariant where it has to be (Theorem 4 where the classifier's input is rescaled
neuron-wise); the Hessian trace and the weight norms must move by the closed-form factors:
for a diagonal reparameterization θ' = c ⊙ θ the loss is the same function of θ'/c, so
``H'_ii = H_ii / c_i²``, checked against a dense float64 Hessian.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from flatcli import archs
from flatcli.audit import audit, plan_measures
from flatcli.cli import app
from flatcli.data import as_batches
from flatcli.errors import FlatcliError
from flatcli.features import call_model
from flatcli.registry import AUDIT_DEFAULT, MeasureConfig
from flatcli.structural import apply_site, copy_model, find_sites

from . import models

transformers = pytest.importorskip("transformers")

from .test_hf import inputs_of, padded_batch, write_tokens  # noqa: E402

TIGHT = 1e-10
HIDDEN, HEAD = 4, 2
LAYER = ("relative_flatness", "relative_flatness_normalized", "layer_hessian_trace", "weight_norm")
NAMES = [*LAYER, "frobenius_norms", "hessian_trace"]


def bert(hidden_act: str = "relu", *, seed: int = 0) -> nn.Module:
    """A one-layer BERT (float64, hidden size 4, two heads of 2) whose LayerNorms have random
    gains and shifts (at initialization they are 1 and 0: folding them would be trivial)."""
    cfg = transformers.BertConfig(
        vocab_size=20, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=6, max_position_embeddings=8, num_labels=3, initializer_range=0.5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, hidden_act=hidden_act,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    g = models.seeded(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(torch.rand(HIDDEN, generator=g, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.randn(HIDDEN, generator=g, dtype=torch.float64) * 0.3)
    return model


def bert_batches(n: int = 12):  # noqa: ANN201
    batch = padded_batch(n)
    return as_batches((inputs_of(batch), batch["labels"]))


class SmallResNet(nn.Module):
    """conv → BN → ReLU → one ResNet BasicBlock → global average pool → fc (2 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2)
        self.act = nn.ReLU()
        self.block = archs.BasicBlock(2, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(self.act(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(h)))


def resnet() -> nn.Module:
    """:class:`SmallResNet` in float64 with random BatchNorm statistics, gains and shifts."""
    model = models.init(SmallResNet())
    g = models.seeded(7)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(2, generator=g, dtype=torch.float64) * 0.3)
                mod.running_var.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
                mod.weight.copy_(torch.rand(2, generator=g, dtype=torch.float64) + 0.5)
                mod.bias.copy_(torch.randn(2, generator=g, dtype=torch.float64) * 0.3 + 0.3)
    return model.eval()


def image_batches(n: int = 12):  # noqa: ANN201
    x, y = models.classification_data(n, (2, 4, 4), classes=3, seed=3)
    return as_batches((x, y), batch_size=12)


def by_kind(result) -> dict:  # noqa: ANN001
    return {r.kind: r for r in result.reparameterizations}


def rows(rep) -> dict:  # noqa: ANN001
    return {r.measure: r for r in rep.rows}


# --------------------------------------------------------------------------- dense oracle


def hessian_diagonal(model: nn.Module, batches, names: list[str]) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The diagonal of the dense Hessian of the mean cross-entropy in the parameters
    ``names`` (each reshaped like its parameter), by torch.autograd.functional.hessian."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    data = list(batches)

    def mean_loss(t: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = t[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        total = sum(
            nn.functional.cross_entropy(
                call_model(model, x, params=values), y, reduction="sum"
            )
            for x, y in data
        )
        return total / sum(len(y) for _, y in data)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
        diag = torch.diagonal(torch.autograd.functional.hessian(mean_loss, theta))
    out, offset = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        out[name] = diag[offset : offset + shape.numel()].reshape(shape)
        offset += shape.numel()
    return out


def predicted_trace(diag: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> float:
    """``Σ H_ii / c_i²`` (parameters without a factor keep c = 1)."""
    return sum(float((d / factors.get(n, torch.ones_like(d)) ** 2).sum()) for n, d in diag.items())


def frobenius(model: nn.Module, factors: dict[str, torch.Tensor]) -> float:
    """Σ ‖c ⊙ W‖² over the Linear/Conv weights."""
    total = 0.0
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            w = mod.weight.detach() * factors.get(f"{name}.weight", 1.0)
            total += float(w.pow(2).sum())
    return total


# --------------------------------------------------------------------------- transformers


ATTN = "bert.encoder.layer.0.attention"


def test_every_bert_reparameterization_keeps_the_padded_logits() -> None:
    model = bert("relu")
    batch = padded_batch(10, seed=4)  # lengths 2..6: padded positions in every batch
    x = inputs_of(batch)
    structure = find_sites(model, x, feature_layer="classifier")
    kinds = {k: [s.describe() for s in v] for k, v in structure.sites.items() if v}
    assert set(kinds) == {"attention_qk", "attention_vo", "norm_fold", "relu_neurons"}
    assert structure.feature_source == "bert.pooler.activation"
    g = models.seeded(0)
    with torch.no_grad():
        reference = call_model(model, x)
    for sites in structure.sites.values():
        for site in sites:
            new, mods = copy_model(model)
            factors = torch.exp(torch.randn(site.size, generator=g, dtype=torch.float64))
            apply_site(mods, site, factors if site.size else None)
            with torch.no_grad():
                change = float((call_model(new, x) - reference).abs().max())
            residual = site.kind == "norm_fold" and "pooler" not in site.describe()
            # Folding a LayerNorm that also feeds a residual addition changes the function
            # (the audit screens these out); every other site keeps it to rounding.
            assert (change > 1e-3) if residual else (change < TIGHT), (site, change)


def test_attention_factors_are_per_head_rows_and_columns() -> None:
    model = bert("gelu")
    structure = find_sites(model, inputs_of(padded_batch(4)))
    qk, vo = structure.sites["attention_qk"][0], structure.sites["attention_vo"][0]
    alpha = torch.tensor([3.0, 0.25], dtype=torch.float64)
    new, mods = copy_model(model)
    apply_site(mods, qk, alpha)
    apply_site(mods, vo, alpha)
    old = dict(model.named_modules())
    rows_of_head = alpha.repeat_interleave(HEAD)
    for part, factor in (("query", rows_of_head), ("key", 1 / rows_of_head),
                         ("value", rows_of_head)):  # fmt: skip
        a, b = old[f"{ATTN}.self.{part}"], mods[f"{ATTN}.self.{part}"]
        torch.testing.assert_close(b.weight, a.weight * factor[:, None], rtol=0, atol=1e-15)
        torch.testing.assert_close(b.bias, a.bias * factor, rtol=0, atol=1e-15)
    a, b = old[f"{ATTN}.output.dense"], mods[f"{ATTN}.output.dense"]
    torch.testing.assert_close(b.weight, a.weight / rows_of_head[None, :], rtol=0, atol=1e-15)
    torch.testing.assert_close(b.bias, a.bias, rtol=0, atol=0)


def test_bert_audit_kappa_invariant_trace_and_norms_by_closed_form() -> None:
    model, batches = bert("relu"), bert_batches()
    config = MeasureConfig(layer="classifier", method="exact", trace_params=ATTN)
    result = audit(model, batches, NAMES, config, seed=3)
    reps = by_kind(result)
    assert reps["layerwise"].refused and "torch.fx" in reps["layerwise"].refused
    assert "Tanh" in reps["neuronwise"].refused  # the pooler: no neuron-wise rescaling
    applied = {k for k, r in reps.items() if r.refused is None}
    assert applied == {"attention_qk", "attention_vo", "norm_fold", "relu_neurons"}
    params = [n for n, _ in model.named_parameters() if n.startswith(ATTN)]
    diag = hessian_diagonal(model, batches, params)
    original = result.measures
    assert original["hessian_trace"].value == pytest.approx(
        sum(float(d.sum()) for d in diag.values()), rel=1e-9
    )
    for kind in applied:
        rep = reps[kind]
        assert rep.max_output_change < TIGHT, kind
        r = rows(rep)
        for name in LAYER:  # the classifier and its input are untouched: exactly invariant
            assert r[name].invariant and r[name].relative_change < TIGHT, (kind, name)
    # Closed forms from the reported factors: per head (2 heads), rows and columns.
    for kind, parts in (("attention_qk", {"query": 1, "key": -1}),
                        ("attention_vo", {"value": 1, "dense": -1})):  # fmt: skip
        alpha = torch.tensor(reps[kind].alphas, dtype=torch.float64).repeat_interleave(HEAD)
        factors = {}
        for part, sign in parts.items():
            where = f"{ATTN}.output.dense" if part == "dense" else f"{ATTN}.self.{part}"
            if part == "dense":
                factors[f"{where}.weight"] = (alpha**sign)[None, :].expand(HIDDEN, HIDDEN)
            else:
                factors[f"{where}.weight"] = (alpha**sign)[:, None].expand(HIDDEN, HIDDEN)
                factors[f"{where}.bias"] = alpha ** sign
        r = rows(reps[kind])
        assert r["hessian_trace"].reparameterized == pytest.approx(
            predicted_trace(diag, factors), rel=1e-9
        ), kind
        assert not r["hessian_trace"].invariant
        assert r["frobenius_norms"].reparameterized == pytest.approx(
            frobenius(model, factors), rel=1e-12
        ), kind
    # Norm folding: only the last LayerNorm (read by the pooler alone) folds; W diag γ.
    fold = reps["norm_fold"]
    assert fold.sites == ["bert.encoder.layer.0.output.LayerNorm → bert.pooler.dense"]
    assert len(fold.refused_sites) == 2 and all("residual" in s for s in fold.refused_sites)
    gain = dict(model.named_modules())["bert.encoder.layer.0.output.LayerNorm"].weight.detach()
    assert rows(fold)["frobenius_norms"].reparameterized == pytest.approx(
        frobenius(model, {"bert.pooler.dense.weight": gain[None, :]}), rel=1e-12
    )


def test_gelu_feed_forward_is_skipped_and_said() -> None:
    result = audit(
        bert("gelu"), bert_batches(8), ["relative_flatness"], MeasureConfig(layer="classifier")
    )
    relu = by_kind(result)["relu_neurons"]
    assert relu.refused and "not positively homogeneous" in relu.refused
    assert any("GELUActivation is not positively homogeneous" in s for s in relu.refused_sites)
    assert any("Tanh" in s for s in relu.refused_sites)
    assert any("was not applied" in line for line in result.theorem4)


class GroupedAttention(nn.Module):
    """Llama-style names (q_proj, k_proj, v_proj, o_proj) and grouped key/value heads:
    4 query heads share 2 key/value heads (``repeat_interleave``, as Hugging Face does)."""

    num_heads, num_key_value_heads, head_dim = 4, 2, 3

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(6, 12)
        self.k_proj = nn.Linear(6, 6)
        self.v_proj = nn.Linear(6, 6)
        self.o_proj = nn.Linear(12, 6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        n, t, _ = h.shape
        q = self.q_proj(h).view(n, t, 4, 3).transpose(1, 2)
        k = self.k_proj(h).view(n, t, 2, 3).transpose(1, 2).repeat_interleave(2, dim=1)
        v = self.v_proj(h).view(n, t, 2, 3).transpose(1, 2).repeat_interleave(2, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(3), dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(n, t, 12))


class TinyDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = GroupedAttention()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = -x
        return self.fc(self.attn(x).mean(1))


def test_grouped_attention_with_llama_names() -> None:
    model = models.init(TinyDecoder())
    x, y = models.classification_data(10, (4, 6), classes=3, seed=2)
    result = audit(model, as_batches((x, y)), ["relative_flatness", "frobenius_norms"],
                   MeasureConfig(layer="fc"), seed=1)  # fmt: skip
    reps = by_kind(result)
    assert reps["attention_qk"].max_output_change < TIGHT
    assert reps["attention_vo"].max_output_change < TIGHT
    assert len(reps["attention_qk"].alphas) == 2  # one factor per key/value head
    assert rows(reps["attention_qk"])["relative_flatness"].invariant


class Opaque(nn.Module):
    """Neither fx-traceable (data-dependent branch) nor built from recognized modules."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = -x
        return self.fc(torch.tanh(self.a(x)))


def opaque() -> nn.Module:
    return models.init(Opaque()).float()


def test_a_model_that_traces_neither_way_gets_one_line(tmp_path: Path) -> None:
    from flatcli.checkpoints import save_checkpoint

    nets = tmp_path / "nets.py"
    root = Path(__file__).resolve().parents[1]
    nets.write_text(f"import sys\nsys.path.insert(0, {str(root)!r})\n"
                    "from tests.test_audit_models import opaque\n")  # fmt: skip
    ck = save_checkpoint(opaque(), tmp_path / "opaque.safetensors", arch=f"{nets}:opaque")
    x, y = models.classification_data(12)
    import numpy as np

    np.savez(tmp_path / "d.npz", x=x.float().numpy(), y=y.numpy())
    cli = CliRunner().invoke(
        app, ["audit", str(ck), "--arch", f"{nets}:opaque", "--data", str(tmp_path / "d.npz")]
    )
    assert cli.exit_code == 1 and "Traceback" not in cli.output
    line = " ".join(cli.output.split())  # one line, wrapped by the terminal width
    assert "error: the reparameterization audit found nothing to rescale in Opaque" in line
    x, y = models.classification_data()
    with pytest.raises(FlatcliError) as err:
        audit(models.init(Opaque()), as_batches((x, y)), ["weight_norm"], MeasureConfig(layer="fc"))
    message = str(err.value)
    assert "\n" not in message
    assert "nothing to rescale in Opaque: does not trace with torch.fx (TraceError)" in message
    for missing in ("attention module", "LayerNorm/RMSNorm", "ReLU", "BatchNorm"):
        assert missing in message


# --------------------------------------------------------------------------- ResNets


def test_resnet_batchnorm_reparameterizations() -> None:
    model, batches = resnet(), image_batches()
    config = MeasureConfig(layer="fc", method="exact", trace_params="block")
    result = audit(model, batches, NAMES, config, seed=5)
    reps = by_kind(result)
    assert "BatchNorm2d" in reps["layerwise"].refused
    applied = {k for k, r in reps.items() if r.refused is None}
    assert applied == {"neuronwise", "batchnorm_fold", "batchnorm_channels"}
    for kind in applied:
        assert reps[kind].max_output_change < TIGHT, kind
    # The stem's BN → ReLU also feeds the block's identity shortcut: screened out.
    channels = reps["batchnorm_channels"]
    assert channels.sites == ["block.act1 (block.bn1 → block.conv2)"]
    assert len(channels.refused_sites) == 1 and channels.refused_sites[0].startswith("act ")
    # Neuron-wise into fc through the residual stream (Theorem 4): κ moves, κ̃ does not.
    neuron = rows(reps["neuronwise"])
    producers = {a for a, _ in reps["neuronwise"].pairs}
    assert producers == {"bn1", "block.bn2"}  # the stem's BatchNorm too: identity shortcut
    assert {c for _, b in reps["neuronwise"].pairs for c in b.split(" + ")} == {"block.conv1", "fc"}
    assert not neuron["relative_flatness"].invariant
    assert neuron["relative_flatness_normalized"].relative_change < TIGHT
    assert any(line.startswith("holds under neuronwise") for line in result.theorem4)
    for kind in ("batchnorm_fold", "batchnorm_channels"):  # fc and its input untouched
        for name in LAYER:
            assert rows(reps[kind])[name].relative_change < TIGHT, (kind, name)
    params = [n for n, _ in model.named_parameters() if n.startswith("block.")]
    diag = hessian_diagonal(model, batches, params)
    mods = dict(model.named_modules())
    alpha = torch.tensor(reps["neuronwise"].alphas, dtype=torch.float64)
    b = alpha[None, :, None, None]
    beta = torch.tensor(reps["batchnorm_channels"].alphas, dtype=torch.float64)
    diagonal_kinds = {
        "neuronwise": {
            "bn1.weight": alpha, "bn1.bias": alpha, "block.bn2.weight": alpha,
            "block.bn2.bias": alpha, "block.conv1.weight": (1 / b).expand(2, 2, 3, 3),
            "fc.weight": (1 / alpha)[None, :].expand(3, 2),
        },
        "batchnorm_channels": {
            "block.bn1.weight": beta, "block.bn1.bias": beta,
            "block.conv2.weight": (1 / beta[None, :, None, None]).expand(2, 2, 3, 3),
        },
    }  # fmt: skip
    for kind, factors in diagonal_kinds.items():
        r = rows(reps[kind])
        assert r["hessian_trace"].reparameterized == pytest.approx(
            predicted_trace(diag, factors), rel=1e-9
        ), kind
        assert r["frobenius_norms"].reparameterized == pytest.approx(
            frobenius(model, factors), rel=1e-12
        ), kind
    # Folding: each conv's rows times γ/√(var+ε) of its BatchNorm.
    fold = {}
    for conv, bn in (("conv1", "bn1"), ("block.conv1", "block.bn1"), ("block.conv2", "block.bn2")):
        m = mods[bn]
        scale = (m.weight / torch.sqrt(m.running_var + m.eps)).detach()
        fold[f"{conv}.weight"] = scale[:, None, None, None]
    assert rows(reps["batchnorm_fold"])["frobenius_norms"].reparameterized == pytest.approx(
        frobenius(model, fold), rel=1e-12
    )


def test_flatcli_resnet18_builder_is_recognized() -> None:
    model = archs.resnet18(num_classes=3, in_channels=2, width=2).double().eval()
    structure = find_sites(model, torch.randn(2, 2, 8, 8, dtype=torch.float64), feature_layer="fc")
    assert len(structure.sites["batchnorm_fold"]) == 20  # every conv's BatchNorm
    assert len(structure.sites["batchnorm_channels"]) == 9  # 8 blocks and the stem


def test_resnet18_layerwise_refusal_names_three_convs_then_a_count() -> None:
    """A BatchNorm after each of the 20 convolutions: the refusal names three, then counts
    the rest (it once listed them all, 60 layer names in one line)."""
    model = archs.resnet18(num_classes=3, in_channels=2, width=2).double().eval()
    x, y = models.classification_data(4, (2, 8, 8), classes=3, seed=3)
    config = MeasureConfig(layer="fc", method="exact")
    result = audit(model, as_batches((x, y), batch_size=4), list(LAYER), config, seed=0)
    why = by_kind(result)["layerwise"].refused
    assert why is not None and why.endswith("; and 17 more)")
    assert why.count("BatchNorm2d") == 3 and len(why) < 400


# --------------------------------------------------------------------------- the budget


def test_refused_everywhere_measures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    import flatcli.audit as audit_module

    monkeypatch.setattr(audit_module, "run_measures", lambda *a, **k: calls.append(a) or {})
    x, y = models.classification_data()
    result = audit(models.init(models.TanhHead()), as_batches((x, y)),
                   ["hessian_top_eigenvalue"], MeasureConfig(layer="fc"))  # fmt: skip
    assert calls == [] and result.measures == {}
    assert all(r.refused for r in result.reparameterizations)


def test_plan_skips_the_default_measures_that_do_not_fit() -> None:
    model, batches = resnet(), image_batches()
    names = [*LAYER, "fisher_rao", "hessian_top_eigenvalue"]
    config = MeasureConfig(layer="fc")
    names.insert(4, "frobenius_norms")
    plan = plan_measures(model, batches, names, config, runs=4, optional=names,
                         time_budget=1e-6)  # fmt: skip
    # The layer measures are the audit's subject, the norms cost nothing: kept.
    assert plan.names == [*LAYER, "frobenius_norms"]
    assert set(plan.skipped) == {"fisher_rao", "hessian_top_eigenvalue"}
    assert "does not fit the time budget" in plan.skipped["hessian_top_eigenvalue"]
    assert plan.costs["hessian_top_eigenvalue"] > plan.costs["fisher_rao"] > 0
    asked = plan_measures(model, batches, names, config, runs=4, time_budget=10.0)
    assert asked.names == names and not asked.skipped  # named: computed within a share
    assert 1.0 <= asked.config.time_budget <= 10.0 / 4
    free = plan_measures(model, batches, names, config, runs=4, optional=names)
    assert free.names == names and free.config.time_budget is None


# --------------------------------------------------------------------------- the command


def test_cli_audit_on_a_bert_folder_with_a_report(tmp_path: Path) -> None:
    folder = tmp_path / "bert"
    bert("relu").float().save_pretrained(str(folder))
    tokens = write_tokens(tmp_path / "tokens.npz")
    page, out = tmp_path / "audit.html", tmp_path / "audit.json"
    result = CliRunner().invoke(
        app,
        ["audit", str(folder), "--data", str(tokens), "--format", "json", "-o", str(out),
         "--report", str(page), "--time-budget", "10", "--max-memory", "1G"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    kinds = {r["kind"]: r for r in report["reparameterizations"]}
    for kind in ("attention_qk", "attention_vo", "norm_fold", "relu_neurons"):
        assert kinds[kind]["refused"] is None and kinds[kind]["max_output_change"] < 1e-5
    assert report["audit"]["time_budget"] == 10 and report["audit"]["max_memory"] == 2**30
    assert "relative_flatness_normalized" in report["measures"]  # κ̃ by default
    for name in AUDIT_DEFAULT:  # each default measure was computed, or skipped with why
        if name != "path_norm":  # undefined for token ids
            skipped = report["skipped"].get(name, "")
            assert (name in report["measures"]) != ("time budget" in skipped)
    html = page.read_text()
    for text in ("Function-preservation check", "attention_qk", "before-after-norm_fold",
                 "Theorem 4"):  # fmt: skip
        assert text in html


def test_progress_has_an_eta_and_theorem4_flags_a_conv_layer_in_float32() -> None:
    model = archs.cnn(in_channels=1, channels=(2, 3), hidden=4, num_classes=3).eval()
    x, y = models.classification_data(8, (1, 8, 8), classes=3)
    notes: list[str] = []
    result = audit(model, as_batches((x.float(), y)), ["weight_norm"],
                   MeasureConfig(layer="conv2"), note=notes.append)  # fmt: skip
    assert any("ETA" in n and n.startswith("run 2/") for n in notes)
    flags = " ".join(result.theorem4)
    assert "conv2 is a Conv2d, not nn.Linear" in flags and "not float64" in flags
    neuron = by_kind(result)["neuronwise"]  # conv1 → ReLU → max-pool → conv2: per channel
    assert neuron.refused is None and neuron.pairs == [("conv1", "conv2")]


def test_hostile_site_names_are_escaped_in_the_page() -> None:
    from flatcli.html import render_html

    from .results import audit_result

    evil = '<img src=x onerror="alert(1)">'
    result = audit_result()
    result["reparameterizations"][0].update(
        sites=[f"{evil} (q → k)"], refused_sites=[f"{evil}: changed the outputs by 1"],
        description=evil, tolerance=1e-9,
    )  # fmt: skip
    result["skipped"] = {evil: evil}
    result["theorem4"] = [evil]
    page = render_html(result)
    assert evil not in page and "&lt;img src=x" in page


def test_runs_that_would_overrun_the_budget_are_not_measured_and_said() -> None:
    x, y = models.classification_data()
    result = audit(models.mlp(), as_batches((x, y)), ["weight_norm"], MeasureConfig(layer="fc"),
                   time_budget=1e-9)  # fmt: skip
    assert "weight_norm" in result.measures  # the original model's run always happens
    for rep in result.reparameterizations:
        assert rep.refused is None and rep.max_output_change < 1e-12  # checked all the same
        assert rep.rows == [] and "of the time budget is left" in rep.unmeasured
