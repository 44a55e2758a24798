"""Safe loading: every format round-trips; code-executing formats need --trust-code."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flatcli import archs
from flatcli.checkpoints import load_checkpoint, save_checkpoint
from flatcli.errors import FlatcliError, UsageError
from flatcli.io import sha256_file

KWARGS = {"in_features": 5, "hidden": [4], "num_classes": 3}
ARCH = "flatcli.archs:mlp"


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return archs.mlp(**KWARGS)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_flatcli_checkpoints_round_trip_without_flags(tmp_path: Path, suffix: str) -> None:
    model = make_model()
    path = save_checkpoint(
        model,
        tmp_path / f"m{suffix}",
        arch=ARCH,
        arch_kwargs=KWARGS,
        data="digits",
        loss="mse",
        input_shape=(5,),
        hparams={"lr": 0.1},
    )
    ck = load_checkpoint(path)
    assert same_weights(ck.model, model)
    assert ck.metadata["data"] == "digits" and ck.metadata["loss"] == "mse"
    assert ck.hparams == {"lr": 0.1} and ck.input_shape == (5,)
    assert ck.sha256 == sha256_file(path) and len(ck.sha256) == 64
    assert not ck.model.training


@pytest.mark.parametrize(
    "wrap", ["plain", "state_dict", "model_state_dict", "model", "module_prefix", "orig_mod_prefix"]
)
@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_state_dicts_load_with_arch(tmp_path: Path, wrap: str, suffix: str) -> None:
    model = make_model()
    state = model.state_dict()
    obj: object = {
        "plain": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model_state_dict": {"model_state_dict": state, "optimizer": {}},
        "model": {"model": state},
        "module_prefix": {f"module.{k}": v for k, v in state.items()},
        "orig_mod_prefix": {f"_orig_mod.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / f"m{suffix}"
    torch.save(obj, path)
    ck = load_checkpoint(path, arch=ARCH, arch_kwargs=KWARGS)
    assert ck.format == "state_dict" and same_weights(ck.model, model)


def test_plain_safetensors_needs_arch(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(make_model().state_dict(), str(path))
    with pytest.raises(UsageError, match="--arch"):
        load_checkpoint(path)
    assert same_weights(load_checkpoint(path, arch=ARCH, arch_kwargs=KWARGS).model, make_model())


def test_arch_from_a_python_file(tmp_path: Path) -> None:
    (tmp_path / "nets.py").write_text(
        "import torch\n\ndef make(width=4):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(5, width), torch.nn.ReLU(),"
        " torch.nn.Linear(width, 3))\n"
    )
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    ck = load_checkpoint(
        tmp_path / "m.pt", arch=f"{tmp_path / 'nets.py'}:make", arch_kwargs={"width": 6}
    )
    assert same_weights(ck.model, model)


def test_mismatched_weights_are_reported_readably(tmp_path: Path) -> None:
    state = make_model().state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(1)
    state["fc1.weight"] = torch.zeros(7, 5)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(FlatcliError) as info:
        load_checkpoint(tmp_path / "m.pt", arch=ARCH, arch_kwargs=KWARGS)
    msg = str(info.value)
    assert "missing keys fc.bias" in msg and "unexpected keys extra.weight" in msg
    assert "fc1.weight (7, 5) vs (4, 5)" in msg and "\n" not in msg


class _WritesAFile:
    """Unpickling this calls open(path, 'w'): a stand-in for arbitrary code execution."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.path, "w"))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": make_model().state_dict(), "x": _WritesAFile(marker)}, path)
    assert not marker.exists()
    with pytest.raises(FlatcliError, match="--trust-code") as info:
        load_checkpoint(path, arch=ARCH, arch_kwargs=KWARGS)
    assert "pickled Python objects" in str(info.value)
    assert not marker.exists()


def test_whole_pickled_module_needs_trust_code(tmp_path: Path) -> None:
    model = make_model()
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(FlatcliError, match="--trust-code"):
        load_checkpoint(tmp_path / "whole.pt")
    ck = load_checkpoint(tmp_path / "whole.pt", trust_code=True)
    assert ck.format == "pickle" and same_weights(ck.model, model)


def test_torchscript_needs_trust_code(tmp_path: Path) -> None:
    model = make_model()
    with warnings.catch_warnings():  # torch deprecates TorchScript; files of it still exist
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(model, torch.randn(2, 5))
        traced.save(str(tmp_path / "ts.pt"))
    with pytest.raises(FlatcliError, match="TorchScript.*--trust-code"):
        load_checkpoint(tmp_path / "ts.pt")
    ck = load_checkpoint(tmp_path / "ts.pt", trust_code=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(ck.model(x), model(x))


def test_torch_export_needs_trust_code(tmp_path: Path) -> None:
    model = make_model()
    program = torch.export.export(model, (torch.randn(2, 5),))
    torch.export.save(program, str(tmp_path / "m.pt2"))
    with pytest.raises(FlatcliError, match="torch.export.*--trust-code"):
        load_checkpoint(tmp_path / "m.pt2")
    ck = load_checkpoint(tmp_path / "m.pt2", trust_code=True)
    x = torch.randn(2, 5)  # exported with a static batch size
    torch.testing.assert_close(ck.model(x), model(x))


def test_foreign_arch_in_metadata_is_not_imported(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    meta = {"flatcli.arch": "os:system", "flatcli.arch_kwargs": json.dumps({"command": "true"})}
    save_file(make_model().state_dict(), str(path), metadata=meta)
    with pytest.raises(FlatcliError, match="not one of flatcli's"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_files_give_one_line_errors(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(FlatcliError) as info:
        load_checkpoint(path, arch=ARCH, arch_kwargs=KWARGS)
    assert "\n" not in str(info.value)


def test_truncated_safetensors(tmp_path: Path) -> None:
    good = save_checkpoint(make_model(), tmp_path / "m.safetensors", arch=ARCH, arch_kwargs=KWARGS)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FlatcliError, match="not a valid safetensors"):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_missing_file() -> None:
    with pytest.raises(FlatcliError, match="not found"):
        load_checkpoint("does/not/exist.safetensors")


def test_tied_weights_round_trip(tmp_path: Path) -> None:
    from tests.models import Tied

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return Tied()

    (tmp_path / "tied.py").write_text(
        "import tests.models\n\ndef make():\n    return tests.models.Tied()\n"
    )
    model = make()
    path = save_checkpoint(model, tmp_path / "t.safetensors", arch=f"{tmp_path}/tied.py:make")
    ck = load_checkpoint(path, arch=f"{tmp_path / 'tied.py'}:make")
    assert ck.model.a.weight is ck.model.b.weight
    assert torch.equal(ck.model.b.weight, model.b.weight)


def test_safetensors_saves_are_byte_reproducible(tmp_path: Path) -> None:
    model = make_model()
    meta = {
        "arch": ARCH,
        "arch_kwargs": KWARGS,
        "data": "digits",
        "loss": "mse",
        "input_shape": (5,),
        "hparams": {"b": 1, "a": 2},
    }
    first = save_checkpoint(model, tmp_path / "a.safetensors", **meta).read_bytes()
    second = save_checkpoint(model, tmp_path / "b.safetensors", **meta).read_bytes()
    assert first == second
    assert load_checkpoint(tmp_path / "a.safetensors").hparams == {"a": 2, "b": 1}


# --------------------------------------------------------------------------- inspect's labels


class _Tokens(torch.nn.Module):
    """A Linear per position (token), mean-pooled, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(x)).mean(1))


@pytest.mark.parametrize(
    "metadata, mix, head",
    [
        (
            {},
            "κ exact (Identity 2, fx split) and κ̃ (--normalize) if one output row per "
            "sample, else κ hutchinson (Identity 1, applied per token), exact if small; Tr(H)",
            "κ exact closed form (Identity 3) and κ̃ (--normalize) if one output row per sample",
        ),
        (
            {"input_shape": "[5, 6]"},
            "κ hutchinson (Identity 1, applied per token), exact if small; Tr(H); ‖W‖²·Tr(H)",
            "κ exact closed form (Identity 3), κ̃ (--normalize); Tr(H); ‖W‖²·Tr(H)",
        ),
    ],
    ids=["unknown-input", "input-shape"],
)
def test_inspect_tells_per_token_layers_from_per_sample_ones(
    metadata: dict, mix: str, head: str
) -> None:
    from flatcli.checkpoints import Checkpoint
    from flatcli.inspection import describe

    ck = Checkpoint(_Tokens(), Path("tokens.pt"), "0" * 64, "state_dict", metadata)
    methods = {r["name"]: r["measures"] for r in describe(ck)["layers"]}
    assert methods["mix"].startswith(mix) and methods["head"].startswith(head)


# --------------------------------------------------------------------------- --layer


def test_layer_names_from_the_weights_refuse_typos_but_not_tied_layers(tmp_path: Path) -> None:
    from collections import OrderedDict

    from flatcli.features import LayerSplit
    from flatcli.prepare import check_layer_name, weight_names

    from . import models

    mlp = tmp_path / "mlp.safetensors"
    save_checkpoint(archs.mlp(4, [8], 3), mlp, arch="flatcli.archs:mlp")
    check_layer_name(mlp, "fc1")
    with pytest.raises(UsageError, match=r"no layer with a weight named 'fc_1' in mlp.safetensors; "
                       r"did you mean fc1"):
        check_layer_name(mlp, "fc_1")
    check_layer_name(mlp, "zzz")  # nothing close: the loaded model decides
    tied = tmp_path / "tied.safetensors"
    save_checkpoint(models.Tied(), tied, arch="tests.models:Tied")
    assert "b.weight" not in (weight_names(tied) or [])  # stored once, under a.weight
    check_layer_name(tied, "b")  # a tied layer is never refused from the names
    assert weight_names(tmp_path / "missing.safetensors") is None
    block = torch.nn.Sequential(
        OrderedDict(
            block=torch.nn.Sequential(OrderedDict(lin=torch.nn.Linear(4, 4), act=torch.nn.ReLU())),
            fc=torch.nn.Linear(4, 2),
        )
    )
    with pytest.raises(UsageError, match=r"'block' \(Sequential\) has no weight; its parts with "
                       r"one: block.lin$"):
        LayerSplit(block, "block")
    path = tmp_path / "block.safetensors"
    from safetensors.torch import save_model

    save_model(block, str(path))
    with pytest.raises(UsageError, match=r"'block' has no weight in block.safetensors; its parts"):
        check_layer_name(path, "block")
