"""Theorem 5 on hidden layers with ReLU kinks after them, for docs/theory.md.

    python bench/robustness_kinks.py [--probes 64]

Prints E_F(δ) / (δ²κ/2m) (± its standard error, relative) for δ from 1e-4 to 0.1 on:

* the bundled digits MLP (64 → 64 → 32 → 10, ReLU): layers ``fc`` (the logits layer,
  nothing after it), ``fc2`` and ``fc1`` (ReLUs after them), all 1,297 training digits;
* ReLU and tanh MLPs (13 → 16 → 16 → 3) on scikit-learn's wine (``tests/tabular.py``),
  trained to 5% of chance (fitted) and to 0.87 (under-fitted), the 124 training samples;

in float64, and the digits layers once more in float32 (the default dtype), where the
loss differences at δ = 1e-4 are below the rounding of the loss. 64 antithetic Haar pairs,
seed 0. Also prints, per row, the kinks :func:`flatcli.robustness.feature_robustness`
flags and whether the ratio settled between the two smallest δ.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatcli.checkpoints import load_checkpoint  # noqa: E402
from flatcli.data import load_data  # noqa: E402
from flatcli.robustness import feature_robustness  # noqa: E402
from tests import tabular  # noqa: E402

DELTAS = [1e-4, 1e-3, 1e-2, 3e-2, 0.1]


def row(label: str, model: torch.nn.Module, layer: str, data: tuple, probes: int) -> str:
    r = feature_robustness(model, layer, data, DELTAS, probes=probes, seed=0)
    cells = [f"{p.ratio:.3g} ± {(p.stderr or 0) / p.predicted:.2g}" for p in r.points]
    kinks = ", ".join(r.kinks_after_layer or []) or "none"
    settled = {True: "yes", False: "no", None: "–"}[r.ratio_settled]
    return f"| {label} | `{layer}` | {kinks} | " + " | ".join(cells) + f" | {settled} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=64)
    args = parser.parse_args()
    t0 = time.perf_counter()
    head = "| model | layer | kinks after it | " + " | ".join(f"δ = {d:g}" for d in DELTAS)
    print(head + " | settled |\n|" + " --- |" * (len(DELTAS) + 4))
    digits = load_data("digits")
    net = load_checkpoint(ROOT / "sample_models" / "digits_mlp.safetensors").model
    for dtype, name in ((torch.float64, "digits MLP"), (torch.float32, "digits MLP, float32")):
        model, x = net.to(dtype), digits.x.to(dtype)
        for layer in ("fc", "fc2", "fc1"):
            print(row(name, model, layer, (x, digits.y), args.probes), flush=True)
    xa, ya, _, _ = tabular.dataset("wine")
    chance = float(torch.special.entr(torch.bincount(ya).double() / len(ya)).sum())
    for target, fit in ((0.05 * chance, "fitted"), (0.87, "under-fitted 0.87")):
        for act in ("relu", "tanh"):
            model, _ = tabular.fit_mlp("wine", target, activation=act)
            for layer in ("fc2", "fc1"):
                print(row(f"wine {act}, {fit}", model, layer, (xa, ya), args.probes), flush=True)
    print(f"\n{(time.perf_counter() - t0):.0f} s on 1 thread")


if __name__ == "__main__":
    main()
