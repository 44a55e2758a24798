"""Exact relative flatness vs the reference code's naive dense Hessian, in one run.

    python bench/bench_kappa.py [--quick]

The naive method (the authors' reference code) builds the layer's dense ``(dm)×(dm)``
Hessian with one backward pass per gradient entry, then reads κ off it. flatcli uses the
closed form (Identity 3) for a logits layer and batched per-sample HVPs (Identity 2) for
a hidden layer. Both run on the same model and data here, in float64, and the table
prints the speed-up and the relative difference of the values.

flatcli's time is the median of 5 calls; the naive method is timed once (seconds).

Model: ``Linear(64, m) → ReLU → Linear(m, 10)`` (and a hidden-layer variant), n = 2,000
Gaussian inputs with random labels (timing only; the values are compared, not judged).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from flatcli.measures.relative_flatness import relative_flatness


def naive_kappa(
    model: nn.Module, layer: nn.Linear, x: torch.Tensor, y: torch.Tensor, max_rows: int | None
) -> tuple[float | None, float, str]:
    """The reference code's method: one backward pass per entry of the gradient.

    With ``max_rows``, only that many Hessian rows are built and the time is extrapolated
    linearly to all ``d·m`` rows (each row costs one identical backward pass); the value
    is then not available.
    """
    start = time.perf_counter()
    w = layer.weight
    loss = F.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, w, create_graph=True)
    g = g.reshape(-1)
    total = g.numel()
    k = total if max_rows is None else min(max_rows, total)
    rows = [torch.autograd.grad(g[i], w, retain_graph=True)[0].reshape(-1) for i in range(k)]
    if k < total:
        elapsed = (time.perf_counter() - start) * total / k
        return None, elapsed, f"(time extrapolated from {k} of {total} rows)"
    d, m = w.shape
    h = torch.stack(rows).reshape(d, m, d, m)
    t = torch.einsum("atbt->ab", h)
    value = float(((w @ w.T).detach() * t).sum())
    return value, time.perf_counter() - start, ""


def timed(fn, repeats: int = 5):  # noqa: ANN001, ANN201
    """The value and the median wall time over ``repeats`` calls (flatcli's calls are ms)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, statistics.median(times)


def warm_up() -> None:
    """First use of forward-mode AD loads decompositions; keep that out of the timings."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    relative_flatness(model, "0", (torch.randn(5, 4, dtype=torch.float64), torch.zeros(5).long()))


def collect(quick: bool = False, full: bool = False) -> tuple[int, list[tuple]]:
    """``(n, rows)``; each row ``(case, naive s, flatcli s, flatcli κ, naive κ or None)``."""
    max_rows = None if full else 1000
    warm_up()
    torch.manual_seed(0)
    n = 400 if quick else 2000
    x = torch.randn(n, 64, dtype=torch.float64)
    y = torch.randint(0, 10, (n,))
    rows = []
    widths = (84,) if quick else (84, 256, 512)
    for m in widths:
        model = nn.Sequential(nn.Linear(64, m), nn.ReLU(), nn.Linear(m, 10)).double().eval()
        fast, t_fast = timed(
            lambda model=model: relative_flatness(model, "2", (x, y), batch_size=n)
        )
        slow, t_slow, note = naive_kappa(model, model[2], x, y, max_rows)
        rows.append((f"logits layer d=10, m={m} {note}", t_slow, t_fast, fast.value, slow))
    hidden = 32 if quick else 64
    model = (
        nn.Sequential(
            nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 32), nn.ReLU(), nn.Linear(32, 10)
        )
        .double()
        .eval()
    )
    fast, t_fast = timed(lambda: relative_flatness(model, "0", (x, y), batch_size=500))
    slow, t_slow, note = naive_kappa(model, model[0], x, y, max_rows)
    rows.append((f"hidden layer d={hidden}, m=64 {note}", t_slow, t_fast, fast.value, slow))
    return n, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="build every naive Hessian in full (slow: tens of minutes)",
    )
    args = parser.parse_args()
    n, rows = collect(args.quick, args.full)
    print(f"n = {n} samples, float64, {torch.get_num_threads()} threads")
    print(f"{'case':<64} {'naive s':>9} {'flatcli s':>10} {'speed-up':>9} {'rel diff':>9}")
    for name, t_slow, t_fast, v_fast, v_slow in rows:
        rel = "n/a" if v_slow is None else f"{abs(v_fast - v_slow) / abs(v_slow):.1e}"
        print(f"{name:<64} {t_slow:9.3f} {t_fast:10.4f} {t_slow / t_fast:8.0f}x {rel:>9}")


if __name__ == "__main__":
    main()
