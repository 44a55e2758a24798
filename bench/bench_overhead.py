"""Exact κ of the logits layer over one forward pass, for nn.Sequential and a custom module.

    python bench/bench_overhead.py [--quick]

The same MLP (``64 → 256 → 256 → 10``, ReLU, float32) as an ``nn.Sequential`` and as a
custom ``nn.Module`` (split by ``torch.fx``, whose cut is cached per model and layer).
Baseline: a plain forward pass over the same batches (batch size 256, no grad). flatcli:
``relative_flatness(method="exact")`` (closed form, Identity 3), which also computes the
loss, accuracy and Tr(H) in the same pass. Medians of 11 calls each, the two alternating;
the first κ call (which traces the custom module) is timed separately.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from flatcli.measures.relative_flatness import relative_flatness


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def interleaved(a, b, repeats: int = 11) -> tuple[float, float]:  # noqa: ANN001
    """Median times of ``a`` and ``b``, called alternately so that load drift hits both."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def run(n: int) -> list[tuple[str, float, float, float]]:
    """``(model, forward s, first κ s, κ s)`` for each model kind."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    rows = []
    for name in ("nn.Sequential", "custom module (fx)"):
        custom = Custom()
        model: nn.Module = custom
        if name == "nn.Sequential":
            model = nn.Sequential(custom.fc1, nn.ReLU(), custom.fc2, nn.ReLU(), custom.fc)
        model.eval()
        layer = "fc" if name != "nn.Sequential" else "4"

        def forward(model: nn.Module = model) -> None:
            with torch.no_grad():
                for i in range(0, n, 256):
                    model(x[i : i + 256])

        def kappa(model: nn.Module = model, layer: str = layer) -> None:
            relative_flatness(model, layer, (x, y), method="exact")

        start = time.perf_counter()
        kappa()
        first = time.perf_counter() - start
        t_forward, t_kappa = interleaved(forward, kappa)
        rows.append((name, t_forward, first, t_kappa))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 2,000 only")
    args = parser.parse_args()
    sizes = (2000,) if args.quick else (2000, 32000)
    print(f"{'model':<22} {'n':>6} {'forward s':>10} {'κ s':>8} {'κ/forward':>10} {'1st call':>9}")
    for n in sizes:
        for name, fwd, first, kap in run(n):
            print(f"{name:<22} {n:>6} {fwd:10.4f} {kap:8.4f} {kap / fwd:9.2f}x {first / fwd:8.2f}x")


if __name__ == "__main__":
    main()
