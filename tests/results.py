"""Result dicts of every command, in their JSON shapes, for the HTML page tests.

Hostile strings (markup in file names, metadata and measure names) are mixed in on
purpose: a page must show them as text, never run or load them.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from flatcli.measures.estimate import Estimate
from flatcli.results import CorrelateResult, MeasureResult
from flatcli.runtime import manifest

EVIL = '<script>alert(1)</script><img src="http://example.invalid/x.png">'
EVIL_FILE = f"zoo/{EVIL}.safetensors"


def run_manifest(*, argv: list[str] | None = None) -> dict[str, Any]:
    extra = {} if argv is None else {"argv": argv}
    return manifest(device="cpu", dtype="float32", seed=3, **extra)


def measure_result() -> dict[str, Any]:
    measures = {
        "relative_flatness": Estimate(1.1676196831949983, None, "exact: closed form"),
        "hessian_trace": Estimate(
            0.9610986396582859,
            0.009535719073916283,
            "hutchinson (rademacher, 1360 probes)",
            {"probes": 1360, "converged": True},
        ),
        "pacbayes_flatness": Estimate(44.84, 9.5, "1/σ'², bisection", {"hit_sigma_max": True}),
        "fisher_rao": Estimate(float("nan"), None, "exact (forward-mode JVP)"),
        "tiny": Estimate(3.2e-7, None, f"a method naming {EVIL}"),
    }
    report = MeasureResult(
        checkpoint={"path": EVIL_FILE, "sha256": "ab" * 32},
        layer={"name": "fc", "type": "Linear", "shape": [10, 32]},
        data={"source": "digits", "split": "train", "n_samples": 1297},
        measures=measures,
        manifest=run_manifest(argv=["flatcli", "measure", EVIL_FILE, "--layer", "fc"]),
        config={"method": "auto", "probes": 64, "note": EVIL},
    ).to_dict()
    # What the degenerate-value check adds to a measure (rendered when present).
    report["measures"]["tiny"]["warnings"] = ["value below 1e-6: probably degenerate"]
    return report


def audit_result() -> dict[str, Any]:
    rows = [
        {
            "measure": "relative_flatness",
            "original": 1.1676470306952165,
            "reparameterized": 1.1676470306953453,
            "relative_change": 1.1029520691697311e-13,
            "invariant": True,
        },
        {
            "measure": "weight_norm",
            "original": 74.76225634186952,
            "reparameterized": 5.147585724988831,
            "relative_change": 0.9311472663231273,
            "invariant": False,
        },
    ]
    return {
        "schema": "flatcli.audit/1",
        "checkpoint": {"path": EVIL_FILE, "sha256": "cd" * 32},
        "layer": {"name": "fc"},
        "data": {"source": "digits", "split": "train", "n_samples": 1297},
        "measures": {
            "relative_flatness": {"value": 1.1676470306952165, "stderr": None, "method": "exact"},
            "weight_norm": {"value": 74.76225634186952, "stderr": None, "method": "exact"},
        },
        "reparameterizations": [
            {
                "kind": "layerwise",
                "refused": None,
                "pairs": [["fc1", "fc2"], ["fc2", "fc"]],
                "alphas": [20.6, 3.81],
                "max_output_change": 1.7763568394002505e-14,
                "rows": rows,
            },
            {
                "kind": "neuronwise",
                "refused": f"tanh is not positively homogeneous {EVIL}",
                "pairs": [],
                "alphas": [],
                "max_output_change": None,
                "rows": [],
            },
        ],
        "manifest": run_manifest(),
        "config": {"method": "auto"},
    }


def correlate_result(n: int = 12) -> dict[str, Any]:
    """A correlate result computed by the library's statistics on a synthetic zoo."""
    from flatcli.correlate import analyse

    rng = np.random.default_rng(0)
    gap = rng.uniform(0.03, 0.1, size=n)
    names = [f"w{8 * (1 + i % 3)}-lr{0.1 if i % 2 else 0.01}-{i}.safetensors" for i in range(n)]
    names[0] = EVIL_FILE.removeprefix("zoo/")
    df = pd.DataFrame(
        {
            "checkpoint": names,
            "path": [f"zoo/{c}" for c in names],
            "sha256": [f"{i:064x}" for i in range(n)],
            "train_loss": rng.uniform(0.005, 0.01, size=n),
            "relative_flatness": np.exp(20 * gap + 0.3 * rng.normal(size=n)),
            "relative_flatness_stderr": [None] * n,
            "weight_norm": 10 - 30 * gap + rng.normal(size=n),
            "hp_width": [8 * (1 + i % 3) for i in range(n)],
            "hp_lr": [0.1 if i % 2 else 0.01 for i in range(n)],
            "hp_note": ["plain"] * (n - 1) + [EVIL],
            "gap_loss": gap,
            "gap_acc": gap / 2 + rng.normal(scale=0.01, size=n),
        }
    )
    measures = ["relative_flatness", "weight_norm"]
    hps = ["hp_width", "hp_lr"]
    result = analyse(df, measures=measures, bootstrap=50, seed=0, granulate_by=hps)
    skipped = [{"checkpoint": f"bad/{EVIL}.pt", "reason": f"cannot load: {EVIL}"}]
    return correlate_json(df, result, skipped, n - 2, ["zoo/a.safetensors"])


def correlate_json(
    df: pd.DataFrame, result: dict[str, Any], skipped: list, computed: int, files: list[str]
) -> dict[str, Any]:
    """What ``flatcli correlate --format json`` writes for :func:`analyse`'s ``result``."""
    return CorrelateResult(
        checkpoints=df,
        analysis=result,
        skipped=skipped,
        computed=computed,
        source=None,
        manifest=run_manifest(argv=["flatcli", "correlate", *files]),
    ).to_dict()


def small_zoo() -> pd.DataFrame:
    """The issue's four fine-tuned MiniLM folders: every accuracy 1, κ ranked exactly as the
    loss gap, and the λ each run used and its step ratio beside the settings."""
    return pd.DataFrame(
        {
            "checkpoint": [f"minilm_{k}" for k in range(4)],
            "train_loss": [0.002, 0.03, 0.031, 0.1],
            "test_loss": [0.0023, 0.044, 0.046, 0.13],
            "train_acc": [1.0] * 4,
            "test_acc": [1.0] * 4,
            "relative_flatness": [0.07, 0.33, 0.331, 0.38],
            "weight_norm": [5.0, 4.0, 6.0, 4.5],
            "hp_fam_lambda": [0.0, 0.0, 0.1, 0.1],
            "hp_clip_grad_norm": [0.0, 1.0, 0.0, 1.0],
            "hp_fam_lambda_used": [0.0, 0.0, 0.1, 0.1],
            "hp_fam_step_ratio": [None, None, 0.35, 0.34],
            "hp_seed": [0, 0, 0, 0],
        }
    ).assign(
        gap_loss=lambda d: d["test_loss"] - d["train_loss"],
        gap_acc=lambda d: d["train_acc"] - d["test_acc"],
    )


def small_correlate_result() -> dict[str, Any]:
    """:func:`small_zoo` through :func:`flatcli.correlate.analyse`, in its JSON shape."""
    from flatcli.correlate import analyse

    df = small_zoo()
    result = analyse(df, measures=["relative_flatness", "weight_norm"], bootstrap=200, seed=0)
    return correlate_json(df, result, [], 4, ["minilm_*"])


def finetune_result(tmp_path: Path) -> dict[str, Any]:
    """A fine-tuning result in its JSON shape, from a :class:`FinetuneResult`."""
    from flatcli.finetune import EpochRecord, FinetuneResult
    from flatcli.html import finetune_result as as_dict

    history = tuple(
        EpochRecord(
            epoch=e,
            lr=1e-3 / e,
            train_loss=0.5 / e,
            kappa=2.0 - 0.3 * e,
            test_loss=0.6 / e,
            test_accuracy=0.8 + 0.05 * e,
            weight_sq_norm=70.0 + e,
            phi_sq_mean=3.0,
            max_softmax=0.9,
            seconds=0.25,
            full_train_loss=0.4 / e,
            full_train_accuracy=0.85,
            full_kappa=1.9 - 0.3 * e,
        )
        for e in (1, 2, 3)
    )
    res = FinetuneResult(
        model=torch.nn.Identity(),
        history=history,
        before={"relative_flatness": Estimate(2.0, None, "exact"),
                "train_loss": Estimate(0.6, None, "exact"),
                "test_accuracy": Estimate(0.8, None, "exact")},
        after={"relative_flatness": Estimate(1.5, None, "exact"),
               "train_loss": Estimate(0.2, None, "exact"),
               "test_accuracy": Estimate(0.95, None, "exact")},
        layer="fc",
        fam_method="exact: closed form",
        hparams={"fam_lambda": "auto", "fam_lambda_used": 0.0123, "optimizer": "sgd",
                 "lr": 1e-3, "schedule": "cosine", "batch_size": 32, "data": EVIL,
                 "fam_gradient": "full"},
        resumed_from=1,
        out_path=tmp_path / "tuned.safetensors",
        out_sha256="ef" * 32,
        parent_sha256="01" * 32,
        temperature_matched={"relative_flatness": Estimate(1.8, None, "exact"),
                             "train_loss": Estimate(0.2, None, "exact"),
                             "test_accuracy": Estimate(0.8, None, "exact")},
        temperature_c=1.7,
        warnings=(f"κ rose above twice its start {EVIL}",),
    )
    return as_dict(res, manifest=run_manifest(argv=["flatcli", "finetune", "m.safetensors"]))


# --------------------------------------------------------------------------- page parsing


class Page(HTMLParser):
    """The parts of a page the tests look at: elements, tables, images, scripts, text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.tables: dict[str, list[list[tuple[dict[str, str | None], str]]]] = {}
        self.headers: dict[str, list[str]] = {}
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self.text: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._cell_attrs: dict[str, str | None] = {}
        self._script: list[str] | None = None
        self._n_tables = 0
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.elements.append((tag, a))
        if tag == "table":
            self._n_tables += 1
            self._table = a.get("id") or f"table{self._n_tables}"
            self.tables[self._table] = []
            self.headers[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell, self._cell_attrs = [], a
        elif tag == "script":
            self._script = []
            self._script_attrs = a

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            text = " ".join("".join(self._cell).split())
            if tag == "th":
                self.headers[self._table].append(text)
            else:
                self.tables[self._table][-1].append((self._cell_attrs, text))
            self._cell = None
        elif tag == "table":
            self.tables[self._table] = [r for r in self.tables[self._table] if r]  # type: ignore[index]
            self._table = None
        elif tag == "script" and self._script is not None:
            self.scripts.append((self._script_attrs, "".join(self._script)))
            self._script = None

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self._script.append(data)
            return
        if self._cell is not None:
            self._cell.append(data)
        self.text.append(data)

    def row(self, table: str, first: str) -> list[tuple[dict[str, str | None], str]]:
        """The row of ``table`` whose first cell reads ``first``."""
        hits = [r for r in self.tables[table] if r[0][1] == first]
        assert len(hits) == 1, f"{len(hits)} rows start with {first!r} in {table}"
        return hits[0]
