"""Hutchinson trace: flatcli's batched estimator vs a PyHessian-style loop, in one run.

    python bench/bench_trace.py [--batch-size 256] [--seeds 3]

On the bundled digits MLP and CNN (float32, the whole digits training split):

(a) Cost of one Hutchinson probe (one HVP, forward-over-reverse, vmapped over a round of
    probes) relative to one gradient (``loss.backward()``) on the same model and batch.
(b) Wall time to reach a 1% relative standard error of the trace over the whole data:
    flatcli's ``hessian_trace`` (rounds of 16 probes, stop on stderr ≤ 1% of |mean|) vs a
    PyHessian-style loop (one probe at a time, a double-backward HVP per data batch per
    probe). The loop is timed twice: with PyHessian's own stop ("the mean moved by less
    than tol = 1e-3 relative", at most 100 probes) — which reports no error bar, so the
    table shows the standard error it actually had — and run on until its standard error
    also reaches 1%, the equal-accuracy comparison. Times are medians over ``--seeds``
    probe seeds; the ratio column is baseline time / flatcli time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flatcli.checkpoints import load_checkpoint
from flatcli.data import Batches, as_batches, fit_inputs, load_data
from flatcli.measures.estimate import mean_and_stderr
from flatcli.measures.hessian import hessian_trace
from flatcli.measures.params import FlatParams, functional_loss, hvp, select_params

ROOT = Path(__file__).resolve().parents[1]
RTOL = 0.01
MAX_PROBES = 50_000


def load(name: str, batch_size: int) -> tuple[nn.Module, Batches]:
    ckpt = load_checkpoint(ROOT / "sample_models" / f"digits_{name}.safetensors")
    data = load_data("digits")
    x = fit_inputs(data.x, ckpt.model, ckpt.input_shape)
    return ckpt.model, as_batches((x, data.y), batch_size=batch_size)


def median_time(fn: Callable[[], object], repeats: int = 7) -> float:
    fn()  # warm-up (forward-AD decompositions are compiled on first use)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------- (a)


def probe_cost(model: nn.Module, batches: Batches) -> dict[str, float]:
    """Seconds per gradient and per probe (probe rounds of 1, 16 and 64) on one batch."""
    x, y = batches.first()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y, reduction="sum").backward()

    out = {"gradient": median_time(gradient)}
    flat = FlatParams.of(model, select_params(model))
    theta = flat.vector(model)
    f = functional_loss(model, flat, x, y, "cross_entropy")
    gen = torch.Generator().manual_seed(0)
    for k in (1, 16, 64):
        v = (torch.randint(0, 2, (k, flat.size), generator=gen) * 2 - 1).to(theta)
        with torch.no_grad():
            out[f"probe@{k}"] = median_time(lambda v=v: hvp(f, theta, v)) / k
    model.zero_grad(set_to_none=True)
    del params
    return out


# --------------------------------------------------------------------------- (b)


def pyhessian_hv(model: nn.Module, batches: Batches, v: list[torch.Tensor]) -> float:
    """PyHessian's ``dataloader_hv_product``: vᵀ H v of the mean loss, batch by batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        total = [t + h * x.shape[0] for t, h in zip(total, hv, strict=True)]
        n += x.shape[0]
    return float(sum((t / n * vi).sum() for t, vi in zip(total, v, strict=True)))


def pyhessian_trace(
    model: nn.Module, batches: Batches, *, seed: int, rule: str
) -> tuple[float, float, int, float]:
    """(mean, stderr, probes, seconds) of the one-probe-at-a-time loop.

    ``rule="pyhessian"``: stop when the running mean moved by < 1e-3 relative (at most
    100 probes, PyHessian's defaults). ``rule="stderr"``: stop when stderr ≤ 1% of |mean|.
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    samples: list[float] = []
    previous = 0.0
    start = time.perf_counter()
    while len(samples) < (100 if rule == "pyhessian" else MAX_PROBES):
        v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
        samples.append(pyhessian_hv(model, batches, v))
        mean, se = mean_and_stderr(samples)
        if rule == "pyhessian":
            if abs(mean - previous) / (abs(previous) + 1e-6) < 1e-3:
                break
            previous = mean
        elif se is not None and se <= RTOL * abs(mean):
            break
    seconds = time.perf_counter() - start
    mean, se = mean_and_stderr(samples)
    return mean, float(se or float("nan")), len(samples), seconds


def flatcli_trace(
    model: nn.Module, batches: Batches, *, seed: int
) -> tuple[float, float, int, float]:
    start = time.perf_counter()
    est = hessian_trace(
        model, batches, method="hutchinson", rtol=RTOL, max_probes=MAX_PROBES, seed=seed
    )
    seconds = time.perf_counter() - start
    return est.value, float(est.stderr or float("nan")), est.details["probes"], seconds


def medians(runs: list[tuple[float, float, int, float]]) -> tuple[float, float, float, float]:
    cols = list(zip(*runs, strict=True))
    return tuple(statistics.median(c) for c in cols)  # type: ignore[return-value]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=3, help="probe seeds per method")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"batch size {args.batch_size}, target relative stderr {RTOL:.0%}"
    )
    for name in ("mlp", "cnn"):
        model, batches = load(name, args.batch_size)
        n = sum(x.shape[0] for x, _ in batches)
        p = sum(q.numel() for q in model.parameters())
        print(f"\n== digits {name}: {p} parameters, n = {n} training samples")
        cost = probe_cost(model, batches)
        print(f"(a) one batch of {args.batch_size}: gradient {cost['gradient'] * 1e3:.2f} ms")
        for k in (1, 16, 64):
            t = cost[f"probe@{k}"]
            print(f"    probe in rounds of {k:>2}: {t * 1e3:6.2f} ms = {t / cost['gradient']:.2f}x")
        seeds = range(args.seeds)
        ours = medians([flatcli_trace(model, batches, seed=s) for s in seeds])
        loop = medians([pyhessian_trace(model, batches, seed=s, rule="stderr") for s in seeds])
        stop = medians([pyhessian_trace(model, batches, seed=s, rule="pyhessian") for s in seeds])
        print(
            f"(b) {'method (median over ' + str(args.seeds) + ' seeds)':<44} {'trace':>9} "
            f"{'stderr':>8} {'rel se':>7} {'probes':>7} {'seconds':>8} {'ratio':>7}"
        )
        rows = [
            ("flatcli, rounds of 16, stop at 1% stderr", ours),
            ("PyHessian-style loop, run to 1% stderr", loop),
            ("PyHessian-style loop, its own stop rule", stop),
        ]
        for label, (mean, se, k, seconds) in rows:
            print(
                f"    {label:<44} {mean:9.4f} {se:8.4f} {se / abs(mean):7.2%} {k:7.0f} "
                f"{seconds:8.2f} {seconds / ours[3]:6.2f}x"
            )


if __name__ == "__main__":
    main()
