"""correlate: resumable per-checkpoint cache, skipping bad files, and the plot command."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from flatcli.cli import app
from flatcli.correlate import CorrelateConfig, measure_checkpoints, results_table
from flatcli.errors import FlatcliError, FlatcliWarning

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted((ROOT / "sample_models" / "zoo").glob("*.safetensors"))[:5]
CONFIG = CorrelateConfig(
    measures=("relative_flatness", "layer_hessian_trace", "weight_norm"), max_samples=200
)


class Interrupt(Exception):
    pass


def test_resume_after_interruption_recomputes_only_the_rest(tmp_path: Path) -> None:
    done: list[str] = []

    def kill_after_two(checkpoint: str, status: str) -> None:
        if status == "computed":
            done.append(checkpoint)
            if len(done) == 2:
                raise Interrupt

    with pytest.raises(Interrupt):
        measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "cache", on_result=kill_after_two)
    resumed = measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "cache")
    assert resumed.computed == len(ZOO) - 2
    fresh = measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "fresh")
    assert fresh.computed == len(ZOO)
    pd.testing.assert_frame_equal(results_table(resumed), results_table(fresh))
    again = measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path / "cache")
    assert again.computed == 0


VOLATILE = {"device", "batch_size"}
"""The configuration fields that do not change a result, so not the cache key."""


def changed(value: Any, annotation: str = "") -> Any:
    """A different value of the same kind (for a cache-key test that needs no field list)."""
    if value is None and ("Mapping" in annotation or "dict" in annotation):
        return {"changed": 1}
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "-changed"
    if isinstance(value, tuple):
        return (*value, "extra")
    if isinstance(value, Mapping):
        return {**value, "changed": 1}
    if value is None:
        return "changed"
    raise TypeError(f"no rule to change {value!r}")


def config_variants() -> dict[str, CorrelateConfig]:
    """One configuration per field (and per measure option) with that value changed."""
    out = {}
    for f in dataclasses.fields(CorrelateConfig):
        value = getattr(CONFIG, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                new = changed(getattr(value, g.name), str(g.type))
                inner = dataclasses.replace(value, **{g.name: new})
                out[f"{f.name}.{g.name}"] = dataclasses.replace(CONFIG, **{f.name: inner})
        else:
            new = changed(value, str(f.type))
            out[f.name] = dataclasses.replace(CONFIG, **{f.name: new})
    return out


VARIANTS = config_variants()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_option_but_device_and_batch_size_is_in_the_cache_key(name: str) -> None:
    config = VARIANTS[name]
    if name in VOLATILE:
        assert config.key() == CONFIG.key(), name
    else:
        assert config.key() != CONFIG.key(), name
    assert config.key() == dataclasses.replace(config).key()  # a key is a pure function


def test_cache_entry_of_another_option_is_not_served(tmp_path: Path) -> None:
    first = measure_checkpoints(ZOO[:1], CONFIG, cache_dir=tmp_path)
    seeded = dataclasses.replace(
        CONFIG,
        measures=("relative_flatness",),
        options=dataclasses.replace(CONFIG.options, method="hutchinson", seed=1),
    )
    second = measure_checkpoints(ZOO[:1], seeded, cache_dir=tmp_path)
    assert second.computed == 1
    assert second.rows[0]["relative_flatness_stderr"] is not None
    assert second.rows[0]["relative_flatness"] != first.rows[0]["relative_flatness"]


def test_corrupt_checkpoint_is_skipped_and_reported(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    run = measure_checkpoints(
        [ZOO[0], bad, tmp_path / "missing.safetensors", ZOO[1]],
        CONFIG,
        cache_dir=tmp_path / "cache",
    )
    assert [r["checkpoint"] for r in run.rows] == [ZOO[0].name, ZOO[1].name]
    reasons = {Path(s["checkpoint"]).name: s["reason"] for s in run.skipped}
    assert "not a valid safetensors" in reasons["bad.safetensors"]
    assert "not found" in reasons["missing.safetensors"]


def test_results_carry_hparams_and_gaps(tmp_path: Path) -> None:
    run = measure_checkpoints(ZOO[:3], CONFIG, cache_dir=tmp_path)
    df = results_table(run)
    assert {"hp_width", "hp_lr", "gap_loss", "gap_acc", "relative_flatness"} <= set(df.columns)
    assert (df["gap_loss"] == df["test_loss"] - df["train_loss"]).all()
    assert df["sha256"].str.len().eq(64).all()


def test_cli_json_csv_and_plots(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "correlate",
        *map(str, ZOO),
        "--measures",
        "relative_flatness,weight_norm",
        "--max-samples",
        "200",
        "--bootstrap",
        "50",
        "--cache-dir",
        str(tmp_path / "c"),
    ]
    result = runner.invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == "flatcli.correlate/1" and len(report["checkpoints"]) == 5
    assert {r["measure"] for r in report["correlations"]} == {"relative_flatness", "weight_norm"}
    assert "sha256" in report["checkpoints"][0] and "torch" in report["manifest"]
    out = tmp_path / "res.csv"
    result = runner.invoke(
        app, [*args, "--output", str(out), "--plots", str(tmp_path / "figs"), "--color-by", "width"]
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "res.correlations.csv").is_file()
    side = json.loads((tmp_path / "res.manifest.json").read_text())
    assert "torch" in side["manifest"] and len(side["sha256"]) == 5
    assert side["sha256"][0]["sha256"] == report["checkpoints"][0]["sha256"]
    assert (tmp_path / "figs" / "tau_gap_loss.png").stat().st_size > 1000
    assert (tmp_path / "figs" / "scatter_gap_acc.svg").is_file()
    replot = runner.invoke(
        app, ["plot", str(out), "--plots", str(tmp_path / "figs2"), "--bootstrap", "50"]
    )
    assert replot.exit_code == 0, replot.output
    assert (tmp_path / "figs2" / "tau_gap_acc.png").is_file()


def test_plot_with_missing_columns_is_a_clear_error(tmp_path: Path) -> None:
    csv = tmp_path / "r.csv"
    pd.DataFrame({"checkpoint": ["a", "b"], "relative_flatness": [1.0, 2.0]}).to_csv(csv)
    result = CliRunner().invoke(app, ["plot", str(csv)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "lacks the column(s) gap_loss, gap_acc" in result.stderr


def test_all_checkpoints_bad_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"x")
    result = CliRunner().invoke(app, ["correlate", str(bad), "--cache-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no checkpoint could be measured" in result.stderr


def split_data(tmp_path: Path, *, with_test: bool = True) -> Path:
    """Digits with a test split unlike the train split: other images, labels shifted by one."""
    import numpy as np

    d = np.load(ROOT / "flatcli" / "_bundled" / "digits.npz")
    arrays = {"x": d["x"][:120], "y": d["y"][:120]}
    if with_test:
        arrays |= {"x_test": d["x_test"][:70], "y_test": (d["y_test"][:70] + 1) % 10}
    path = tmp_path / "split.npz"
    np.savez(path, **arrays)
    return path


def test_train_and_test_columns_come_from_their_own_splits(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from flatcli.checkpoints import load_checkpoint

    data = split_data(tmp_path)
    config = dataclasses.replace(CONFIG, data=str(data), max_samples=None)
    row = measure_checkpoints(ZOO[:1], config, cache_dir=tmp_path / "c").rows[0]
    model = load_checkpoint(ZOO[0]).model.eval()
    d = np.load(data)
    for split, (kx, ky) in {"train": ("x", "y"), "test": ("x_test", "y_test")}.items():
        x, y = torch.as_tensor(d[kx]), torch.as_tensor(d[ky]).long()
        with torch.no_grad():
            out = model(x).double()
        loss = float(torch.nn.functional.cross_entropy(out, y))
        acc = float((out.argmax(-1) == y).double().mean())
        assert row[f"n_{split}"] == len(y)
        assert row[f"{split}_loss"] == pytest.approx(loss, rel=1e-5), split
        assert row[f"{split}_acc"] == pytest.approx(acc, abs=1e-12), split
    assert row["test_acc"] < 0.3 < 0.9 < row["train_acc"]  # the splits really differ
    df = results_table(measure_checkpoints(ZOO[:1], config, cache_dir=tmp_path / "c"))
    assert df["gap_acc"].iloc[0] == pytest.approx(row["train_acc"] - row["test_acc"])
    assert df["gap_loss"].iloc[0] == pytest.approx(row["test_loss"] - row["train_loss"])


def test_data_without_a_test_split_is_a_clear_skip(tmp_path: Path) -> None:
    data = split_data(tmp_path, with_test=False)
    config = dataclasses.replace(CONFIG, data=str(data), max_samples=None)
    run = measure_checkpoints(ZOO[:1], config, cache_dir=tmp_path / "c")
    assert run.rows == [] and run.computed == 0
    assert "has no test split" in run.skipped[0]["reason"]
    assert "\n" not in run.skipped[0]["reason"]
    result = CliRunner().invoke(
        app, ["correlate", str(ZOO[0]), "--data", str(data), "--cache-dir", str(tmp_path / "c")]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no test split" in result.output


def test_a_damaged_cache_entry_is_recomputed(tmp_path: Path) -> None:
    first = measure_checkpoints(ZOO[:2], CONFIG, cache_dir=tmp_path)
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 2
    entries[0].write_text('{"relative_flatness": 1.0, "trunc')  # an interrupted write
    with pytest.warns(FlatcliWarning, match=r"is damaged \(not JSON\); measuring again"):
        again = measure_checkpoints(ZOO[:2], CONFIG, cache_dir=tmp_path)
    assert again.computed == 1
    pd.testing.assert_frame_equal(results_table(again), results_table(first))
    assert json.loads(entries[0].read_text())  # rewritten whole


def test_two_jobs_give_the_same_table_as_one(tmp_path: Path) -> None:
    one = measure_checkpoints(ZOO[:2], CONFIG, cache_dir=tmp_path / "one")
    seen: list[tuple[str, str]] = []
    two = measure_checkpoints(
        ZOO[:2],
        CONFIG,
        cache_dir=tmp_path / "two",
        jobs=2,
        on_result=lambda c, s: seen.append((c, s)),
    )
    assert two.computed == 2 and sorted(seen) == sorted((str(p), "computed") for p in ZOO[:2])
    pd.testing.assert_frame_equal(results_table(two), results_table(one))
    assert len(list((tmp_path / "two").glob("*.json"))) == 2


def test_hparams_table_is_merged_by_file_name(tmp_path: Path) -> None:
    run = measure_checkpoints(ZOO[:3], CONFIG, cache_dir=tmp_path / "c")
    csv = tmp_path / "hp.csv"
    pd.DataFrame(
        {
            "path": [f"/elsewhere/{p.name}" for p in ZOO[:3]],  # matched by file name
            "lr": [0.5, 0.25, 0.125],  # replaces the metadata's hp_lr
            "optimizer": ["sgd", "adam", "sgd"],
        }
    ).to_csv(csv, index=False)
    df = results_table(run, hparams_csv=csv)
    assert df["hp_lr"].tolist() == [0.5, 0.25, 0.125]
    assert df["hp_optimizer"].tolist() == ["sgd", "adam", "sgd"]
    assert df["hp_width"].tolist() == results_table(run)["hp_width"].tolist()  # kept
    assert "path" in df.columns and "hp_path" not in df.columns
    assert df["path"].tolist() == [str(p) for p in ZOO[:3]]
    with pytest.raises(FlatcliError, match="needs a 'checkpoint' column"):
        pd.DataFrame({"name": ["a"], "lr": [1]}).to_csv(csv, index=False)
        results_table(run, hparams_csv=csv)
    with pytest.raises(FlatcliError, match="not found"):
        results_table(run, hparams_csv=tmp_path / "missing.csv")


# --------------------------------------------------------------------------- the pieces,
# one by one (each of these failed under a mutant of correlate.py that the tests above let
# live: bench/mutation.sh correlate)

SHA = "ab" * 32


def valid_row() -> dict[str, Any]:
    row: dict[str, Any] = {
        "sha256": SHA,
        "layer": "fc",
        "n_train": 200,
        "n_test": 50,
        "train_loss": 0.1,
        "test_loss": 0.25,
        "train_acc": 1,  # an int is a number
        "test_acc": 0.8,
        "hparams": {"lr": 0.1},
    }
    for m in CONFIG.measures:
        row |= {m: 1.5, f"{m}_stderr": None}  # None: no standard error
    return row


def _with(**changes: Any) -> dict[str, Any]:
    row = valid_row()
    for k, v in changes.items():
        if v is KeyError:
            row.pop(k)
        else:
            row[k] = v
    return row


@pytest.mark.parametrize(
    "content, reason",
    [
        ([1, 2], "a JSON list, not a result"),
        (_with(n_test=KeyError, hparams=KeyError), "missing n_test, hparams"),
        (_with(bogus=1, fisher_rao=2.0), "unexpected bogus, fisher_rao"),
        (_with(sha256="cd" * 32), "another checkpoint's result"),
        (_with(layer=3), "wrong types"),
        (_with(hparams=[1]), "wrong types"),
        (_with(n_train=0), "sample counts are not positive integers"),
        (_with(n_test=True), "sample counts are not positive integers"),
        (_with(n_train=2.0), "sample counts are not positive integers"),
        (_with(train_loss="0.1", test_acc=[1]), "non-numeric train_loss, test_acc"),
        (_with(weight_norm=False), "non-numeric weight_norm"),
        (_with(a=1, b=2, c=3, d=4), "unexpected a, b, c"),  # the first three
        (
            _with(train_loss="x", test_loss="x", train_acc="x", test_acc="x"),
            "non-numeric train_loss, test_loss, train_acc",
        ),
        (_with(n_test=1, layer="fc", hparams={}), None),  # one sample is enough
    ],
)
def test_a_cache_entry_is_checked_against_the_result_schema(
    tmp_path: Path, content: Any, reason: str
) -> None:
    from flatcli.correlate import read_cache_entry

    entry = tmp_path / "e.json"
    entry.write_text(json.dumps(valid_row()))
    assert read_cache_entry(entry, CONFIG, SHA) == (valid_row(), "")
    entry.write_text(json.dumps(content))
    want = (content, "") if reason is None else (None, reason)
    assert read_cache_entry(entry, CONFIG, SHA) == want


def test_an_unreadable_cache_entry_says_why(tmp_path: Path) -> None:
    from flatcli.correlate import read_cache_entry

    entry = tmp_path / "e.json"
    entry.write_bytes(b"\xff\xfe{}")
    assert read_cache_entry(entry, CONFIG, SHA) == (None, "not UTF-8")
    entry.write_text("{")
    assert read_cache_entry(entry, CONFIG, SHA) == (None, "not JSON")
    entry.unlink()
    entry.mkdir()
    assert read_cache_entry(entry, CONFIG, SHA) == (None, "a directory, not a regular file")


def test_cached_and_skipped_checkpoints_are_reported_as_they_go(tmp_path: Path) -> None:
    from flatcli.data import data_sha256

    seen: list[tuple[str, str]] = []
    missing = tmp_path / "gone.safetensors"
    paths = [ZOO[0], missing]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    measure_checkpoints(
        [bad], CONFIG, cache_dir=tmp_path / "b", on_result=lambda *a: seen.append(a)
    )
    ((where, status),) = seen
    assert where == str(bad) and status.startswith("skipped: ") and "safetensors" in status
    seen.clear()
    first = measure_checkpoints(
        paths, CONFIG, cache_dir=tmp_path / "c", on_result=lambda *a: seen.append(a)
    )
    assert seen == [(str(missing), f"skipped: not found: {missing}"), (str(ZOO[0]), "computed")]
    assert first.skipped == [{"checkpoint": str(missing), "reason": f"not found: {missing}"}]
    assert first.data_sha256 == {"digits": data_sha256("digits")}
    row = first.rows[0]
    assert (row["checkpoint"], row["path"], row["layer"]) == (ZOO[0].name, str(ZOO[0]), "fc")
    assert (row["n_train"], row["n_test"]) == (200, 200)  # --max-samples caps both splits
    seen.clear()
    again = measure_checkpoints(
        paths, CONFIG, cache_dir=tmp_path / "c", on_result=lambda *a: seen.append(a)
    )
    assert seen == [(str(ZOO[0]), "cached"), (str(missing), f"skipped: not found: {missing}")]
    assert again.rows == first.rows and again.computed == 0


def test_bad_arguments_to_measure_checkpoints(tmp_path: Path) -> None:
    from flatcli.errors import UsageError

    with pytest.raises(UsageError, match="^--jobs must be at least 1, got 0$"):
        measure_checkpoints(ZOO, CONFIG, cache_dir=tmp_path, jobs=0)
    with pytest.raises(UsageError, match="^no checkpoints given$"):
        measure_checkpoints([], CONFIG, cache_dir=tmp_path)
    nested = tmp_path / "new" / "deeper"  # parents are created
    measure_checkpoints(ZOO[:1], CONFIG, cache_dir=nested)
    assert len(list(nested.glob("*.json"))) == 1
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FlatcliError) as info:
        measure_checkpoints(ZOO, CONFIG, cache_dir=blocker / "cache")
    assert str(info.value) == f"cannot create cache directory {blocker / 'cache'}: Not a directory"


def test_arch_kwargs_table(tmp_path: Path) -> None:
    from flatcli.correlate import arch_kwargs_table

    csv = tmp_path / "hp.csv"
    pd.DataFrame(
        {
            "file": ["/runs/a.pt", "b.pt", "c.pt"],
            "arch.hidden": ["[32, 32]", "64", ""],  # JSON; an empty cell is left out
            "arch.act": ["relu", "", ""],  # not JSON: text
            "arch.": ["x", "y", "z"],  # no argument name: not an argument
            "lr": [0.1, 0.2, 0.3],
        }
    ).to_csv(csv, index=False)
    assert arch_kwargs_table(csv) == {
        "a.pt": {"hidden": [32, 32], "act": "relu"},
        "b.pt": {"hidden": 64},
    }  # c.pt has none
    pd.DataFrame({"checkpoint": ["a.pt"], "lr": [0.1]}).to_csv(csv, index=False)
    assert arch_kwargs_table(csv) == {}
    pd.DataFrame({"name": ["a.pt"], "arch.w": [8]}).to_csv(csv, index=False)
    with pytest.raises(FlatcliError) as info:
        arch_kwargs_table(csv)
    assert str(info.value) == f"{csv} needs a 'checkpoint' column with the checkpoint file names"
    with pytest.raises(FlatcliError, match="^hyperparameter table not found: "):
        arch_kwargs_table(tmp_path / "none.csv")


def test_hparams_table_keyed_by_file_or_checkpoint(tmp_path: Path) -> None:
    run = measure_checkpoints(ZOO[:3], CONFIG, cache_dir=tmp_path / "c")
    csv = tmp_path / "hp.csv"
    for key in ("file", "checkpoint"):
        other = {"path": ["x", "y", "z"]} | ({"file": ["u", "v", "w"]} if key != "file" else {})
        pd.DataFrame({key: [p.name for p in ZOO[:3]], "lr": [1.0, 2.0, 3.0], **other}).to_csv(
            csv, index=False
        )
        df = results_table(run, hparams_csv=csv)
        assert df["hp_lr"].tolist() == [1.0, 2.0, 3.0], key
        assert "file" not in df.columns and "hp_file" not in df.columns and "hp_path" not in df
        assert df["path"].tolist() == [str(p) for p in ZOO[:3]]  # the checkpoints' own paths
        assert "hp_checkpoint" not in df.columns and df["checkpoint"].tolist() == [
            p.name for p in ZOO[:3]
        ]
    assert "hparams" not in results_table(run).columns  # spread into hp_* columns
    pd.DataFrame({"checkpoint": [ZOO[1].name], "lr": [9.0]}).to_csv(csv, index=False)
    df = results_table(run, hparams_csv=csv)  # a checkpoint the table lacks keeps its row
    assert df["checkpoint"].tolist() == [p.name for p in ZOO[:3]]
    assert df["hp_lr"].isna().tolist() == [True, False, True]
    from flatcli.correlate import CorrelateRun

    assert results_table(CorrelateRun()).empty


def test_psi_groups_by_settings_not_by_what_finetune_derived() -> None:
    """λ used and the step ratio vary with λ (and with every run): grouping by them left no
    group in which λ alone varies, so ψ_λ was n/a. They are outputs, not hyperparameters."""
    from flatcli.correlate import analyse, hparam_columns
    from flatcli.stats import granulated_kendall

    from .results import small_zoo

    df = small_zoo()
    assert hparam_columns(df) == ["hp_fam_lambda", "hp_clip_grad_norm"]
    out = analyse(df, measures=["relative_flatness"], bootstrap=0, seed=0)
    got = out["granulated"]["gap_loss"]["relative_flatness"]
    want = granulated_kendall(df, "relative_flatness", "gap_loss", out["hparams"])
    assert got == want and got["groups"] == {"hp_fam_lambda": 2, "hp_clip_grad_norm": 2}
    assert got["Psi"] == 1.0  # κ ranks each pair that differs in one setting as the gap
    assert "gap_acc" not in out["granulated"]  # constant: no Ψ, and a note says why
    assert out["gap_notes"]["gap_acc"].startswith("gap_acc is 0 in all 4 checkpoints")


def test_hparam_and_measure_columns_and_analyse() -> None:
    import numpy as np

    from flatcli.correlate import analyse, hparam_columns, measure_columns

    rng = np.random.default_rng(0)
    n = 12
    df = pd.DataFrame(
        {
            "hp_lr": np.tile([0.1, 0.01], n // 2),
            "hp_seed": np.arange(n),  # replicates, not a hyperparameter
            "hp_width": 64,  # constant
            "hp_note": [None] * n,
            "hp_opt": ["sgd"] * (n - 1) + [None],  # one value and a gap: constant
            "hp_bs": np.repeat([32, 256], n // 2),
            "weight_norm": rng.normal(size=n),
            "train_loss": rng.normal(size=n),
            "train_accuracy": rng.normal(size=n),
            "relative_flatness": rng.normal(size=n),
            "gap_loss": rng.normal(size=n),
            "gap_acc": rng.normal(size=n),
        }
    )
    assert hparam_columns(df) == ["hp_lr", "hp_bs"]
    assert measure_columns(df) == ["relative_flatness", "weight_norm"]  # registry order
    out = analyse(df, measures=["relative_flatness"], bootstrap=0, seed=0)
    assert out["hparams"] == ["hp_lr", "hp_bs"]
    assert set(out["granulated"]) == {"gap_loss", "gap_acc"}
    assert set(out["granulated"]["gap_loss"]) == {"relative_flatness"}
    assert set(out["correlations"]["gap"]) == {"gap_loss", "gap_acc"}
    none = analyse(df, measures=["relative_flatness"], bootstrap=0, seed=0, granulate_by=[])
    assert none["granulated"] == {} and none["hparams"] == []
    with pytest.raises(FlatcliError) as info:
        analyse(df.iloc[:2], measures=["relative_flatness"], bootstrap=0, seed=0)
    assert str(info.value) == "correlations need at least 3 measured checkpoints, got 2"
    three = analyse(df.iloc[:3], measures=["relative_flatness"], bootstrap=0, seed=0)
    assert set(three["correlations"]["n"]) == {3}
    lo = "kendall_tau_b_lo"

    def boot(seed: int) -> pd.Series:
        kw = {"measures": ["relative_flatness"], "bootstrap": 30, "granulate_by": []}
        return analyse(df, seed=seed, **kw)["correlations"][lo]

    assert boot(1).notna().all() and boot(1).tolist() == boot(1).tolist()
    assert three["correlations"][lo].isna().all()  # bootstrap=0 is passed on: no intervals
    assert boot(1).tolist() != boot(2).tolist()  # the seed is passed on


def test_correlate_spreads_workers_over_the_visible_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from flatcli.correlate import _devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _devices("cuda", 4) == ["cuda"] and _devices("auto", 4) == ["auto"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _devices("cuda", 3) == ["cuda:0", "cuda:1"]
    assert _devices("auto", 2) == ["cuda:0", "cuda:1"]
    assert _devices("cuda", 1) == ["cuda"] and _devices("cpu", 4) == ["cpu"]
    assert _devices("cuda:1", 4) == ["cuda:1"]  # a device the user chose stays chosen


def test_workers_share_the_default_memory_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from flatcli.correlate import _memory_share, _share_memory
    from flatcli.measures import budget

    assert _memory_share(4, ["cpu"]) == 4  # four workers on one machine's RAM
    assert _memory_share(3, ["cuda:0", "cuda:1"]) == 2  # round robin: two on cuda:0
    assert _memory_share(2, ["cuda:0", "cuda:1"]) == 1
    monkeypatch.setattr(budget, "DEFAULT_MEMORY_FRACTION", 0.5)
    monkeypatch.setattr(budget, "available_memory", lambda device: 8_000)
    assert budget.resolve_max_memory(None) == 4_000
    _share_memory(4)
    assert budget.resolve_max_memory(None) == 1_000
    assert budget.resolve_max_memory(3_000) == 3_000  # an explicit budget is per worker


def test_one_job_measures_in_this_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flatcli.correlate

    def fake(path: str | Path, config: CorrelateConfig, *, device: str | None = None) -> dict:
        return {"checkpoint": Path(path).name, "path": str(path), **valid_row()}

    monkeypatch.setattr(flatcli.correlate, "measure_one", fake)
    run = measure_checkpoints(ZOO[:2], CONFIG, cache_dir=tmp_path)  # jobs=1 by default
    assert [r["train_loss"] for r in run.rows] == [0.1, 0.1] and run.computed == 2


def test_per_checkpoint_arch_kwargs_merge_over_the_shared_ones(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, measures=("weight_norm",), max_samples=50)
    bad = {ZOO[0].name: {"hidden": [7]}}  # only this checkpoint gets the wrong width
    run = measure_checkpoints(ZOO[:2], config, cache_dir=tmp_path / "a", arch_kwargs_for=bad)
    assert [r["checkpoint"] for r in run.rows] == [ZOO[1].name]
    assert "does not fit the architecture" in run.skipped[0]["reason"]
    shared = dataclasses.replace(config, arch_kwargs={"hidden": [16]})
    own = {ZOO[0].name: {"in_features": 64}}  # merged with the shared hidden=[16]: fits
    run = measure_checkpoints(ZOO[:1], shared, cache_dir=tmp_path / "b", arch_kwargs_for=own)
    assert len(run.rows) == 1, run.skipped


def test_measure_one_passes_every_option_on(tmp_path: Path) -> None:
    from flatcli.correlate import measure_one
    from flatcli.measures.relative_flatness import relative_flatness

    base = dataclasses.replace(CONFIG, measures=("relative_flatness",), max_samples=100)
    row = measure_one(ZOO[0], base)
    mse = measure_one(ZOO[0], dataclasses.replace(base, loss="mse"))
    assert mse["train_loss"] != pytest.approx(row["train_loss"], rel=1e-3)
    fc1 = measure_one(ZOO[2], dataclasses.replace(base, layer="fc1", dtype="float64"))
    from flatcli.prepare import prepare

    prep = prepare(ZOO[2], split="train", max_samples=100, dtype="float64")
    want = relative_flatness(prep.model, "fc1", prep.batches)
    assert fc1["layer"] == "fc1"
    assert fc1["relative_flatness"] == pytest.approx(want.value, rel=1e-10)
    with pytest.raises(FlatcliError, match="does not fit the architecture"):
        measure_one(ZOO[0], dataclasses.replace(base, arch_kwargs={"hidden": [7]}))
    with pytest.raises(FlatcliError):
        measure_one(ZOO[0], dataclasses.replace(base, arch="flatcli.archs:cnn"))
    # The worker's device wins over the configuration's (round robin over GPUs).
    assert measure_one(ZOO[0], dataclasses.replace(base, device="cuda"), device="cpu")
    import torch

    pickled = tmp_path / "whole.pt"
    torch.save(prep.model, pickled)
    on_digits = dataclasses.replace(base, data="digits")
    with pytest.raises(FlatcliError, match="--trust-code"):
        measure_one(pickled, on_digits)
    assert measure_one(pickled, dataclasses.replace(on_digits, trust_code=True))["n_train"] == 100


def test_a_csv_without_a_test_split_is_read_with_its_target(tmp_path: Path) -> None:
    import numpy as np

    d = np.load(ROOT / "flatcli" / "_bundled" / "digits.npz")
    csv = tmp_path / "d.csv"
    frame = pd.DataFrame(d["x"][:50], columns=[f"p{i}" for i in range(64)])
    frame.assign(label=d["y"][:50]).to_csv(csv, index=False)
    config = dataclasses.replace(CONFIG, data=str(csv), target="label", max_samples=None)
    run = measure_checkpoints(ZOO[:1], config, cache_dir=tmp_path / "c")
    assert "has no test split" in run.skipped[0]["reason"]  # read with --target: got that far
    missing = dataclasses.replace(CONFIG, data=str(tmp_path / "gone.npz"))
    run = measure_checkpoints(ZOO[:1], missing, cache_dir=tmp_path / "c")
    assert run.data_sha256 == {} and "not found" in run.skipped[0]["reason"]


def test_an_unreadable_entry_without_an_os_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flatcli.correlate import read_cache_entry

    def fail(*_: object) -> int:
        raise OSError

    (tmp_path / "e.json").write_text("{}")
    monkeypatch.setattr(os, "open", fail)
    assert read_cache_entry(tmp_path / "e.json", CONFIG, SHA) == (None, "unreadable")


def test_arch_kwargs_table_keys_and_numeric_cells(tmp_path: Path) -> None:
    from flatcli.correlate import arch_kwargs_table

    csv = tmp_path / "hp.csv"
    for key in ("checkpoint", "path"):
        pd.DataFrame({key: ["/r/a.pt", "b.pt"], "arch.width": [8, 16]}).to_csv(csv, index=False)
        assert arch_kwargs_table(csv) == {"a.pt": {"width": 8}, "b.pt": {"width": 16}}, key


def _zoo_copy(
    folder: Path, data: str | None = "keep", *, src: Path = ZOO[0], half: bool = False
) -> Path:
    """``src`` re-saved in ``folder``: its metadata naming ``data`` (a file beside it),
    nothing (None) or its own data ("keep"), its weights in float16 if ``half``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata() or {})
    if data != "keep":
        meta.pop("flatcli.data", None)
        if data is not None:
            meta["flatcli.data"] = data
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"half-{src.name}" if half else src.name)
    weights = load_file(str(src))
    save_file(
        {k: v.half() for k, v in weights.items()} if half else weights, str(path), metadata=meta
    )
    return path


def test_each_checkpoints_own_data_file_is_hashed_into_its_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from flatcli.data import data_sha256

    folders = [tmp_path / "a", tmp_path / "b"]
    shas = []
    for k, folder in enumerate(folders):
        folder.mkdir()
        split_data(folder).rename(folder / "d.npz")
        d = dict(np.load(folder / "d.npz"))
        np.savez(
            folder / "d.npz", **{**d, "x": d["x"][: 100 - 20 * k], "y": d["y"][: 100 - 20 * k]}
        )
        shas.append(data_sha256(str(folder / "d.npz")))
    assert shas[0] != shas[1]
    # Named by each checkpoint's metadata: a file beside it.
    named = [_zoo_copy(f, "d.npz") for f in folders]
    run = measure_checkpoints(named, CONFIG, cache_dir=tmp_path / "c1")
    assert [r["n_train"] for r in run.rows] == [100, 80]
    assert run.data_sha256 == {str(f / "d.npz"): s for f, s in zip(folders, shas, strict=True)}
    suffixes = sorted(p.stem.rsplit("-", 1)[1] for p in (tmp_path / "c1").glob("*.json"))
    assert suffixes == sorted(s[:16] for s in shas)
    # --data d.npz, not in the working directory: each checkpoint's folder has its own.
    monkeypatch.chdir(tmp_path)
    plain = [_zoo_copy(f / "plain", None) for f in folders]
    for f, p in zip(folders, plain, strict=True):
        (f / "d.npz").rename(p.parent / "d.npz")
    config = dataclasses.replace(CONFIG, data="d.npz")
    run = measure_checkpoints(plain, config, cache_dir=tmp_path / "c2")
    assert [r["n_train"] for r in run.rows] == [100, 80]
    suffixes = sorted(p.stem.rsplit("-", 1)[1] for p in (tmp_path / "c2").glob("*.json"))
    assert suffixes == sorted(s[:16] for s in shas)


def test_a_hugging_face_folder_is_hashed_as_a_folder(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from flatcli.correlate import _checkpoint_sha256
    from flatcli.hf import folder_sha256
    from flatcli.io import sha256_file

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["X"]}')
    assert _checkpoint_sha256(folder) == sha256_file(folder / "config.json")  # no weights yet
    import torch

    save_file({"w": torch.ones(2)}, str(folder / "model.safetensors"))
    want = folder_sha256(folder)
    assert want != sha256_file(folder / "config.json")
    assert _checkpoint_sha256(folder) == want
    assert _checkpoint_sha256(folder / "config.json") == want  # the same checkpoint
    assert _checkpoint_sha256(tmp_path / "absent") is None


def test_measure_one_prepares_with_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    import flatcli.prepare
    from flatcli.correlate import measure_one

    seen: dict[str, Any] = {}
    real = flatcli.prepare.prepare

    def spy(path: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(flatcli.prepare, "prepare", spy)
    config = dataclasses.replace(
        CONFIG, measures=("path_norm", "weight_norm"), batch_size=17, max_samples=40
    )
    row = measure_one(ZOO[0], config, device="cpu")
    assert seen == {
        "arch": None,
        "arch_kwargs": None,
        "trust_code": False,
        "data": None,
        "split": "train",
        "target": None,
        "max_samples": 40,
        "batch_size": 17,
        "device": "cpu",
        "dtype": "float32",
        "loss": None,
    }
    assert row["path_norm"] > 0  # needs the input shape measure_one reads off the data


class _Done:
    """A finished future."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self) -> Any:
        return self.value


def test_jobs_share_out_checkpoints_devices_threads_and_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool itself, in this process: what each worker is started with and given."""
    import concurrent.futures
    import multiprocessing

    import flatcli.correlate

    pools: list[dict[str, Any]] = []

    class Worker:
        def __init__(self, alive: bool, stubborn: bool) -> None:
            self.alive, self.stubborn, self.calls = alive, stubborn, []

        def is_alive(self) -> bool:
            return self.alive

        def terminate(self) -> None:
            self.calls.append("terminate")
            self.alive = self.stubborn

        def join(self, timeout: float) -> None:
            self.calls.append(f"join {timeout}")

        def kill(self) -> None:
            self.calls.append("kill")
            self.alive = False

    class Pool:
        def __init__(self, **kwargs: Any) -> None:
            self.kwargs, self.tasks = kwargs, []
            self._processes = {1: Worker(alive=True, stubborn=False), 2: Worker(True, True)}
            self._processes[3] = Worker(alive=False, stubborn=False)
            pools.append({"kwargs": kwargs, "tasks": self.tasks, "workers": self._processes})

        def submit(self, fn: Any, *args: Any) -> _Done:
            self.tasks.append(args)
            path = args[0]
            if "fail" in str(args[1]):
                return _Done("could not load")
            return _Done({"checkpoint": Path(path).name, "path": path, **valid_row()})

        def shutdown(self, **kwargs: Any) -> None:
            pools[-1].setdefault("shutdown", []).append(kwargs)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(concurrent.futures, "as_completed", lambda fs: list(fs)[::-1])
    asked: list[tuple[str, int]] = []

    def devices(device: str, jobs: int) -> list[str]:
        asked.append((device, jobs))
        return ["cuda:0", "cuda:1"]

    monkeypatch.setattr(flatcli.correlate, "_devices", devices)
    seen: list[tuple[str, str]] = []
    config = dataclasses.replace(CONFIG, device="cuda")
    run = measure_checkpoints(
        ZOO[:3], config, cache_dir=tmp_path, jobs=3, threads=2, on_result=lambda *a: seen.append(a)
    )
    assert asked == [("cuda", 3)]
    (pool,) = pools
    kwargs = pool["kwargs"]
    assert kwargs["max_workers"] == 3 and kwargs["initializer"] is flatcli.correlate._worker_init
    assert kwargs["initargs"] == (2, 2)  # 2 threads each; 2 workers share a GPU's memory
    assert kwargs["mp_context"].get_start_method() == "spawn"
    assert isinstance(kwargs["mp_context"], type(multiprocessing.get_context("spawn")))
    paths = [t[0] for t in pool["tasks"]]
    assert paths == [str(p) for p in ZOO[:3]]
    assert [t[3] for t in pool["tasks"]] == ["cuda:0", "cuda:1", "cuda:0"]  # round robin
    assert all(t[2] == config for t in pool["tasks"])
    assert pool["shutdown"] == [{"wait": True}]  # the workers are waited for
    entries = [t[1] for t in pool["tasks"]]
    assert len(set(entries)) == 3 and all(e.parent == tmp_path for e in entries)
    assert seen == [(p, "computed") for p in paths[::-1]]  # as they finish
    assert [r["checkpoint"] for r in run.rows] == [p.name for p in ZOO[:3]]  # in path order
    assert run.computed == 3
    pools.clear()
    measure_checkpoints(ZOO[:2], CONFIG, cache_dir=tmp_path / "t", jobs=2)
    assert pools[0]["kwargs"]["initargs"] == (1, 1)  # one thread each by default
    pools.clear()
    measure_checkpoints(ZOO[:1], CONFIG, cache_dir=tmp_path / "one", jobs=4)
    assert pools == []  # one checkpoint: no pool
    # A checkpoint that fails is reported as skipped.
    seen.clear()
    failing = tmp_path / "fail"  # its cache entry's path says "fail" to the fake pool
    run = measure_checkpoints(
        ZOO[:2], CONFIG, cache_dir=failing, jobs=2, on_result=lambda *a: seen.append(a)
    )
    assert sorted(s for _, s in seen) == ["skipped: could not load"] * 2
    assert [s["reason"] for s in run.skipped] == ["could not load"] * 2
    # Ctrl-C while waiting: queued work is cancelled and every live worker ended, the one
    # that ignores SIGTERM killed; then the interrupt goes on.
    pools.clear()

    def interrupted(fs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(concurrent.futures, "as_completed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        measure_checkpoints(ZOO[:2], CONFIG, cache_dir=tmp_path / "int", jobs=2)
    (pool,) = pools
    assert pool["shutdown"] == [{"wait": False, "cancel_futures": True}]
    workers = pool["workers"]
    assert workers[1].calls == ["terminate", "join 5"]
    assert workers[2].calls == ["terminate", "join 5", "kill"]
    assert workers[3].calls == ["join 5"]


def test_the_cache_key_is_the_same_for_the_same_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import flatcli.correlate

    def key(**changes: Any) -> str:
        return dataclasses.replace(CONFIG, **changes).key()

    assert key(arch_kwargs=None) == key(arch_kwargs={})
    assert key(arch_kwargs={"a": 1, "b": [2]}) == key(arch_kwargs={"b": [2], "a": 1})
    before = CONFIG.key()
    monkeypatch.setattr(flatcli.correlate, "CACHE_VERSION", flatcli.correlate.CACHE_VERSION + 1)
    assert CONFIG.key() != before  # a new cache version invalidates every entry


def test_data_named_by_a_hugging_face_folder_lies_beside_the_folder(tmp_path: Path) -> None:
    from flatcli.correlate import _data_of
    from flatcli.data import data_sha256
    from flatcli.hf import FLATCLI_META

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / FLATCLI_META).write_text(json.dumps({"data": "d.npz"}))
    data = split_data(tmp_path).rename(tmp_path / "d.npz")
    want = (str(data), data_sha256(str(data)))
    for spelling in (folder, folder / "config.json"):
        assert _data_of(spelling, CONFIG, {}) == want, spelling


def test_measure_and_cache_uses_the_workers_device_and_reports_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flatcli.correlate
    from flatcli.correlate import _measure_and_cache

    cuda = dataclasses.replace(CONFIG, device="cuda", measures=("weight_norm",))
    row = _measure_and_cache(str(ZOO[0]), tmp_path / "e.json", cuda, "cpu")
    assert isinstance(row, dict) and json.loads((tmp_path / "e.json").read_text())["n_train"]

    def boom(message: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise ValueError(message)

        return fail

    for message, want in (("first line\nsecond", "ValueError: first line"), ("", "ValueError: ")):
        monkeypatch.setattr(flatcli.correlate, "measure_one", boom(message))
        assert _measure_and_cache(str(ZOO[0]), tmp_path / "f.json", CONFIG, "cpu") == want
    assert not (tmp_path / "f.json").exists()


def test_only_missing_checkpoints_are_all_skipped(tmp_path: Path) -> None:
    run = measure_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"], CONFIG, cache_dir=tmp_path)
    assert run.rows == [] and [s["reason"][:10] for s in run.skipped] == ["not found:"] * 2


def test_a_worker_task_runs_on_the_workers_device_marked_as_in_a_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flatcli.correlate
    from flatcli.correlate import _worker_task

    cuda = dataclasses.replace(CONFIG, device="cuda", measures=("weight_norm",))
    assert isinstance(_worker_task(str(ZOO[0]), tmp_path / "e.json", cuda, "cpu"), dict)
    assert flatcli.correlate._in_task is False
    during: list[Any] = []
    real = flatcli.correlate._measure_and_cache

    def spy(*args: Any) -> Any:
        during.append(flatcli.correlate._in_task)  # SIGTERM now unwinds the task
        return real(*args)

    monkeypatch.setattr(flatcli.correlate, "_measure_and_cache", spy)
    _worker_task(str(ZOO[0]), tmp_path / "f.json", cuda, "cpu")
    assert during == [True] and flatcli.correlate._in_task is False


@pytest.mark.slow
def test_workers_show_each_warning_on_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Worker processes print flatcli warnings as one line each, and nothing else."""
    halves = [_zoo_copy(tmp_path, src=src, half=True) for src in ZOO[:2]]
    config = dataclasses.replace(CONFIG, measures=("weight_norm",))
    run = measure_checkpoints(halves, config, cache_dir=tmp_path / "c", jobs=2)
    assert run.computed == 2, run.skipped
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sorted(lines) == sorted(
        f"warning: {p.name} stores float16 weights; they are cast to float32" for p in halves
    ), err
