"""Time to a 5% relative standard error of the Hessian trace on ResNet-18: flatcli against
the real PyHessian run to the same standard error.

    python bench/bench_models.py [--quick] [--batch 64] [--width 64] [--rtol 0.05]
                                 [--max-probes 1024] [--max-seconds 3600]
                                 [--fit-steps 60] [--device cpu|cuda]

The model is :func:`flatcli.archs.resnet18` (11.2 M parameters at width 64) on one batch
of random 3×32×32 inputs with 10 classes, float32, one thread. Before the sides run, the
driver fits it to the batch for ``--fit-steps`` Adam steps in eval mode (a Hessian near a
minimum, not a random network's, whose trace is near 0 next to its spread) and saves the
state; every side loads it and runs in its own process (so that its peak RSS is its own):

* ``PyHessian``: ``hessian(model, CrossEntropyLoss(), data=(x, y))`` built once, then
  ``trace(maxIter=16, tol=-inf)`` again and again. PyHessian's trace has no standard
  error (its own stop is "the mean moved by less than 0.1%"), so the bench computes the
  standard error of its samples after every 16 probes and stops once it is at most
  ``rtol`` times their mean (after at least 32 probes), as flatcli does;
* ``flatcli``: ``hessian_trace(model, (x, y), rtol=...)`` with its defaults (on this
  piecewise-linear network: the exact trace from the Gauss-Newton diagonal);
* ``flatcli Hutchinson`` and ``flatcli Hutch++``: ``method="hutchinson"`` with
  ``trace_method="hutchinson"`` / ``"hutch++"``, stopping at ``rtol``.

A side that reaches ``--max-probes`` or ``--max-seconds`` first is reported with the time
it *would* need, projected from its cost per probe and its samples' spread (marked
"projected"). Times are CPU seconds of the one-thread process (``time.process_time``;
synchronized wall time on CUDA), model build and imports excluded; ratios are against
PyHessian. ``--quick``: width 16, batch 16, 10 fit steps, a 600-second cap.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("PyHessian", "flatcli", "flatcli Hutchinson", "flatcli Hutch++")


def build(args: argparse.Namespace):  # noqa: ANN201
    import torch

    from flatcli import archs

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = archs.resnet18(width=args.width).eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    return model.to(args.device), x.to(args.device), y.to(args.device)


def fit(args: argparse.Namespace) -> dict[str, float]:
    """Fit to the batch for a few Adam steps (eval mode: the loss fitted is the one measured)."""
    import torch
    import torch.nn.functional as F

    model, x, y = build(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    for _ in range(args.fit_steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        out = model(x)
    torch.save(model.state_dict(), args.state)
    return {
        "loss": float(F.cross_entropy(out, y)),
        "accuracy": float((out.argmax(-1) == y).float().mean()),
    }


def side(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(1)
    model, x, y = build(args)
    model.load_state_dict(torch.load(args.state, weights_only=True))
    from bench_trace import clock_for  # bench/ is on the path: run as a script

    clock = clock_for(args.device)
    start = clock()
    if args.side == "PyHessian":
        out = _pyhessian(model, x, y, args, clock, start)
    else:
        from flatcli.measures.hessian import hessian_trace

        kwargs: dict[str, Any] = {"rtol": args.rtol, "max_probes": args.max_probes}
        if args.side != "flatcli":
            kwargs["method"] = "hutchinson"
            kwargs["trace_method"] = "hutch++" if "++" in args.side else "hutchinson"
            kwargs["time_budget"] = args.max_seconds
        est = hessian_trace(model, (x, y), batch_size=len(x), **kwargs)
        out = {
            "value": est.value,
            "stderr": est.stderr,
            "probes": est.details.get("probes", 0),
            "sketch": est.details.get("sketch", 0),
            "reached": est.stderr is None or est.details.get("stop") == "rtol",
            "method": est.method,
        }
    out["seconds"] = clock() - start
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _pyhessian(model: Any, x: Any, y: Any, args: argparse.Namespace, clock: Any, start: float):  # noqa: ANN202
    import warnings

    from pyhessian import hessian
    from torch import nn

    from flatcli.measures.estimate import mean_and_stderr

    warnings.filterwarnings("ignore")  # its backward(create_graph=True) reference cycle
    h = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
    samples: list[float] = []
    reached = False
    while len(samples) < args.max_probes and clock() - start < args.max_seconds:
        samples += h.trace(maxIter=16, tol=float("-inf"))
        mean, se = mean_and_stderr(samples)
        if len(samples) >= 32 and se is not None and se <= args.rtol * abs(mean):
            reached = True
            break
    mean, se = mean_and_stderr(samples)
    return {"value": mean, "stderr": se, "probes": len(samples), "sketch": 0, "reached": reached}


# --------------------------------------------------------------------------- driver


def run_side(name: str, args: argparse.Namespace, state: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", name, "--state", state]
    for key in ("batch", "width", "rtol", "max_probes", "max_seconds", "fit_steps", "lr"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    cmd += ["--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def to_rtol(r: dict[str, Any], rtol: float) -> tuple[float, bool]:
    """Seconds to ``rtol``: measured, or projected from the cost per probe and the spread."""
    if r["reached"]:
        return r["seconds"], False
    fixed = 2 * r["sketch"]
    k = r["probes"] - fixed
    rel = r["stderr"] / abs(r["value"])
    per = r["seconds"] / r["probes"]
    return per * (fixed + k * (rel / rtol) ** 2), True


def collect(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """The fit, and each side's result (with ``to_rtol`` and ``projected``)."""
    with tempfile.TemporaryDirectory() as tmp:
        state = str(Path(tmp) / "state.pt")
        fitted = run_side("fit", args, state)
        if "error" in fitted:
            raise SystemExit(f"fit failed: {fitted['error']}")
        done = {}
        for name in SIDES:
            r = run_side(name, args, state)
            if "error" not in r:
                r["to_rtol"], r["projected"] = to_rtol(r, args.rtol)
            done[name] = r
            print(f"  done: {name}", file=sys.stderr, flush=True)
    return fitted, done


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    p.add_argument("--rtol", type=float, default=0.05)
    p.add_argument("--max-probes", type=int, default=1024)
    p.add_argument("--max-seconds", type=float, default=3600.0)
    p.add_argument("--fit-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--state", help=argparse.SUPPRESS)
    return p


def quick(args: argparse.Namespace) -> argparse.Namespace:
    args.width, args.batch, args.fit_steps, args.max_seconds = 16, 16, 10, 600.0
    return args


def main() -> None:
    args = parser().parse_args()
    if args.side == "fit":
        print(json.dumps(fit(args)))
        return
    if args.side:
        print(json.dumps(side(args)))
        return
    if args.quick:
        args = quick(args)
    fitted, done = collect(args)
    print(
        f"ResNet-18 width {args.width}, batch {args.batch}, {args.device}; after "
        f"{args.fit_steps} Adam steps: loss {fitted['loss']:.3f}, accuracy "
        f"{fitted['accuracy']:.0%}; time to {args.rtol:.0%} relative stderr"
    )
    base = done["PyHessian"].get("to_rtol", math.nan)
    for name, r in done.items():
        if "error" in r:
            print(f"{name:<20} failed: {r['error']}")
            continue
        se = "exact" if r["stderr"] is None else f"± {r['stderr']:.3g}"
        mark = " (projected)" if r["projected"] else ""
        print(
            f"{name:<20} {r['value']:10.4g} {se:>10} {r['probes']:>5} products "
            f"{r['to_rtol']:8.1f} s{mark} = {r['to_rtol'] / base:.3f}× PyHessian, "
            f"peak {r['peak_rss'] / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
