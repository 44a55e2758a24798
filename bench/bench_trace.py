"""Hessian trace and top eigenvalue per product: flatcli against the real PyHessian,
curvlinops and BackPACK, measured in one run.

    python bench/bench_trace.py [--quick] [--device cpu|cuda] [--repeats 3]

Each configuration is one model and one batch (float32, one thread on the CPU). Every
side computes the same quantity through its own package's public API, as a new user
would call it; the sides take turns (``--repeats`` rounds, interleaved, so that a change
in machine load hits all of them alike), and the table prints medians of the time per
Hessian-vector product and the ratio to the real PyHessian of the same round set:

* ``PyHessian trace``: ``hessian(model, CrossEntropyLoss(), data=(x, y)).trace(maxIter=K,
  tol=-inf)`` (its constructor's forward pass and ``create_graph`` backward pass included,
  then one backward pass per probe);
* ``flatcli Hutchinson``: ``hessian_trace(model, (x, y), method="hutchinson", rtol=0,
  max_probes=K)`` with the default route (its method string is printed);
* ``flatcli Hutch++``: the same with ``trace_method="hutch++"`` (sketch of 16 products,
  16 for its exact part, the rest residual probes), time per product;
* ``in-repo loop``: the PyHessian-style loop this repository used to compare against
  (every probe a forward pass, a ``create_graph`` backward pass and a backward pass);
* ``curvlinops``: ``hutchinson_trace(HessianLinearOperator(...), K)`` (its products are
  vmapped forward-over-reverse over all ``K`` probes at once);
* ``PyHessian λ_max`` (power iteration, ``eigenvalues(maxIter=K, tol=-inf)``) against
  ``flatcli Lanczos`` (``hessian_top_eigenvalue(max_iters=K, tol=0)``), time per HVP;
* the exact trace as the sum of BackPACK's ``DiagHessian`` against flatcli's
  ``method="exact"`` (the diagonal by HVPs), on the small models, with both values.

Time is the process's CPU time on the CPU (one thread: the work itself, which other jobs
on a shared machine do not inflate) and synchronized wall time on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatcli import archs
from flatcli.checkpoints import load_checkpoint
from flatcli.data import fit_inputs, load_data
from flatcli.measures.hessian import hessian_top_eigenvalue, hessian_trace

ROOT = Path(__file__).resolve().parents[1]
NO_STOP = float("-inf")  # PyHessian's tol: never stop before maxIter


@dataclass
class Config:
    """One model and batch, with the number of products each side runs."""

    name: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    probes: int
    iters: int
    hutchpp: int | None
    exact: bool


def configs(quick: bool, device: str) -> list[Config]:
    """MLP 13-96-64-3 (n 512), the digits CNN (n 128) and ResNet-18 (batch 64)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(13, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 3)
    )
    xm, ym = torch.randn(512, 13, generator=g), torch.randint(0, 3, (512,), generator=g)
    ck = load_checkpoint(ROOT / "sample_models" / "digits_cnn.safetensors")
    digits = load_data("digits")
    xc = fit_inputs(digits.x, ck.model, ck.input_shape)[:128]
    width, batch = (16, 16) if quick else (64, 64)
    resnet = archs.resnet18(width=width)
    xr = torch.randn(batch, 3, 32, 32, generator=g)
    yr = torch.randint(0, 10, (batch,), generator=g)
    k = 32 if quick else 64
    out = [
        Config("MLP 13-96-64-3, n=512", mlp, xm, ym, k, k // 2, 48, True),
        Config("digits CNN, n=128", ck.model, xc, digits.y[:128], k, k // 2, 48, True),
        Config(f"ResNet-18 (width {width}), batch {batch}", resnet, xr, yr, 8, 6, None, False),
    ]
    for c in out:
        c.model = c.model.to(device).eval()
        c.x, c.y = c.x.to(device), c.y.to(device)
    return out


# --------------------------------------------------------------------------- sides


def pyhessian_trace(c: Config) -> int:
    from pyhessian import hessian

    h = hessian(c.model, nn.CrossEntropyLoss(), data=(c.x, c.y), cuda=c.x.is_cuda)
    h.trace(maxIter=c.probes, tol=NO_STOP)
    c.model.zero_grad(set_to_none=True)  # PyHessian leaves .grad holding its graph
    return c.probes


def pyhessian_eigen(c: Config) -> int:
    from pyhessian import hessian

    h = hessian(c.model, nn.CrossEntropyLoss(), data=(c.x, c.y), cuda=c.x.is_cuda)
    h.eigenvalues(maxIter=c.iters, tol=NO_STOP)
    c.model.zero_grad(set_to_none=True)
    return c.iters


def flatcli_trace(c: Config, trace_method: str = "hutchinson") -> tuple[int, str]:
    k = c.probes if trace_method == "hutchinson" else (c.hutchpp or 0)
    est = hessian_trace(
        c.model, (c.x, c.y), method="hutchinson", trace_method=trace_method, rtol=0.0,
        max_probes=k, batch_size=len(c.x),
    )  # fmt: skip
    return est.details["probes"], est.method


def flatcli_lanczos(c: Config) -> tuple[int, str]:
    est = hessian_top_eigenvalue(
        c.model, (c.x, c.y), max_iters=c.iters, tol=0.0, batch_size=len(c.x)
    )
    return est.details["iterations"] + 1, est.method  # + the residual's HVP


def loop_trace(c: Config) -> int:
    """The in-repository PyHessian-style loop: every probe from a fresh forward pass."""
    params = [p for p in c.model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    for _ in range(c.probes):
        v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
        loss = F.cross_entropy(c.model(c.x), c.y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        float(sum((h * u).sum() for h, u in zip(hv, v, strict=True)))
    return c.probes


def curvlinops_trace(c: Config) -> int:
    from curvlinops import HessianLinearOperator
    from curvlinops.trace.hutchinson import hutchinson_trace

    params = [p for p in c.model.parameters() if p.requires_grad]
    k = c.probes if c.exact else 2  # all probes in one vmapped call: memory grows with K
    op = HessianLinearOperator(
        c.model, nn.CrossEntropyLoss(), params, [(c.x, c.y)], check_deterministic=False
    )
    float(hutchinson_trace(op, k))
    return k


def backpack_exact(c: Config) -> tuple[int, float]:
    from backpack import backpack, extend
    from backpack.extensions import DiagHessian

    # on a copy: BackPACK's extend() hooks the modules it extends for good
    model, loss_fn = extend(copy.deepcopy(c.model)), extend(nn.CrossEntropyLoss())
    with backpack(DiagHessian()):
        loss_fn(model(c.x), c.y).backward()
    return 1, sum(float(p.diag_h.double().sum()) for p in model.parameters())


def flatcli_exact(c: Config) -> tuple[int, float]:
    est = hessian_trace(c.model, (c.x, c.y), method="exact", batch_size=len(c.x))
    return 1, est.value


# --------------------------------------------------------------------------- timing


def clock_for(device: str) -> Callable[[], float]:
    if device.startswith("cuda"):

        def wall() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()

        return wall
    return time.process_time


def interleaved(
    sides: dict[str, Callable[[], Any]], repeats: int, clock: Callable[[], float]
) -> dict[str, dict[str, Any]]:
    """Median seconds per product of each side, the sides taking turns; one warm-up each."""
    for fn in sides.values():
        fn()
    out: dict[str, dict[str, Any]] = {n: {"per": [], "info": None} for n in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = clock()
            got = fn()
            seconds = clock() - start
            count, info = got if isinstance(got, tuple) else (got, None)
            out[name]["per"].append(seconds / count)
            out[name]["info"] = info
    for r in out.values():
        r["per"] = statistics.median(r["per"])
    return out


Row = tuple[str, str, str, str, str, str]


def collect(quick: bool, device: str = "cpu", repeats: int | None = None) -> list[Row]:
    """Rows (section, case, baseline, flatcli, ratio, note) for run_all.py."""
    warnings.filterwarnings("ignore")  # PyHessian's backward(create_graph=True) warning
    if device == "cpu":
        torch.set_num_threads(1)
    clock = clock_for(device)
    repeats = repeats or (2 if quick else 3)
    rows: list[Row] = []
    for c in configs(quick, device):
        sides: dict[str, Callable[[], Any]] = {
            "PyHessian trace": lambda c=c: pyhessian_trace(c),
            "flatcli Hutchinson": lambda c=c: flatcli_trace(c),
            "in-repo loop": lambda c=c: loop_trace(c),
            "curvlinops": lambda c=c: curvlinops_trace(c),
            "PyHessian λ_max": lambda c=c: pyhessian_eigen(c),
            "flatcli Lanczos": lambda c=c: flatcli_lanczos(c),
        }
        if c.hutchpp:
            sides["flatcli Hutch++"] = lambda c=c: flatcli_trace(c, "hutch++")
        t = interleaved(sides, repeats, clock)
        rows += _rows(c, t)
        print(f"  done: {c.name}", flush=True)
        if c.exact:
            rows.append(_exact_row(c, repeats, clock))
    return rows


def _rows(c: Config, t: dict[str, dict[str, Any]]) -> list[Row]:
    base, eig = t["PyHessian trace"]["per"], t["PyHessian λ_max"]["per"]

    def ms(s: float) -> str:
        return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"

    def route(name: str) -> str:
        info = t[name]["info"] or ""
        return info[info.find(";") + 2 : info.rfind(")")].split(";")[0] if ";" in info else info

    section = "Hessian product vs the real PyHessian"
    rows: list[Row] = [
        (section, f"{c.name}: Hutchinson, per probe", ms(base), ms(t["flatcli Hutchinson"]["per"]),
         f"{t['flatcli Hutchinson']['per'] / base:.2f}×", route("flatcli Hutchinson")),
    ]  # fmt: skip
    if "flatcli Hutch++" in t:
        hpp = t["flatcli Hutch++"]["per"]
        rows.append(
            (section, f"{c.name}: Hutch++, per product", ms(base), ms(hpp), f"{hpp / base:.2f}×",
             f"{c.hutchpp} products: sketch 16, its exact part 16, the rest residual probes")
        )  # fmt: skip
    lan = t["flatcli Lanczos"]["per"]
    rows.append(
        (section, f"{c.name}: λ_max, per HVP", ms(eig) + " (power iteration)", ms(lan),
         f"{lan / eig:.2f}×", "Lanczos, full reorthogonalization")
    )  # fmt: skip
    for name, note in (
        ("in-repo loop", "the loop this repository compared against before"),
        ("curvlinops", "curvlinops HessianLinearOperator + hutchinson_trace"),
    ):
        other = t[name]["per"]
        rows.append(
            (f"{name} vs the real PyHessian", f"{c.name}: Hutchinson, per probe", ms(base),
             ms(other), f"{other / base:.2f}×", note)
        )  # fmt: skip
    return rows


def _exact_row(c: Config, repeats: int, clock: Callable[[], float]) -> Row:
    t = interleaved(
        {"backpack": lambda: backpack_exact(c), "flatcli": lambda: flatcli_exact(c)},
        repeats,
        clock,
    )
    a, b = t["backpack"], t["flatcli"]
    rel = abs(b["info"] - a["info"]) / abs(a["info"])
    return (
        "exact Tr(H) vs BackPACK DiagHessian", c.name, f"{a['per']:.3f} s", f"{b['per']:.3f} s",
        f"{b['per'] / a['per']:.2f}×", f"rel diff {rel:.0e}",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer probes, a narrow ResNet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    rows = collect(args.quick, args.device, args.repeats)
    print(f"\ntorch {torch.__version__}, {args.device}, {torch.get_num_threads()} thread(s)")
    for r in rows:
        print(" | ".join(r))


if __name__ == "__main__":
    main()
