"""PyHessian's default Hessian trace against the exact trace, beside flatcli's default.

    pip install pyhessian   # a bench-only extra
    python bench/pyhessian_default.py [--seeds 10]

On the bundled digits MLP and CNN (float32, the whole digits training split as one batch,
the mean cross-entropy over it), for each seed:

* **PyHessian** (the real package, ``hessian(model, criterion, data=(x, y), cuda=False)
  .trace()`` with its defaults ``maxIter=100, tol=1e-3``): Rademacher probes until the
  running mean moves by less than ``tol`` relative. It reports the probes' values and no
  error bar; the table shows the mean of its probes (its answer), how many it drew, the
  relative standard error those probes actually had, and its error against the exact trace.
* **flatcli** (``hessian_trace`` with its defaults, ``rtol=0.01``): value ± stderr, probes,
  and the error against the exact trace in units of its own stderr.

The exact trace is ``hessian_trace(method="exact")`` of the same weights in float64.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from flatcli.checkpoints import load_checkpoint
from flatcli.data import fit_inputs, load_data
from flatcli.measures.hessian import hessian_trace

ROOT = Path(__file__).resolve().parents[1]


def pyhessian_default(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):  # noqa: ANN201
    """PyHessian's default trace: (answer, probes, relative standard error of its probes)."""
    from pyhessian import hessian

    torch.manual_seed(seed)  # PyHessian draws its probes from the global generator
    probes = hessian(model, F.cross_entropy, data=(x, y), cuda=False).trace()
    mean = statistics.fmean(probes)
    rel_se = statistics.stdev(probes) / len(probes) ** 0.5 / abs(mean) if len(probes) > 1 else None
    model.zero_grad(set_to_none=True)
    return mean, len(probes), rel_se


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("digits")
    for name in ("mlp", "cnn"):
        ck = load_checkpoint(ROOT / "sample_models" / f"digits_{name}.safetensors")
        model = ck.model.eval()
        x = fit_inputs(data.x, model, ck.input_shape)
        exact = hessian_trace(model.double(), (x.double(), data.y), method="exact").value
        model.float()
        print(f"digits {name}: exact trace {exact:.6g}")
        print(f"  {'seed':>4} {'PyHessian':>10} {'probes':>6} {'its rel se':>10} {'rel err':>8}"
              f"   {'flatcli':>10} {'± stderr':>9} {'probes':>6} {'err/se':>6}")  # fmt: skip
        errors, ses, counts, z = [], [], [], []
        for seed in range(args.seeds):
            value, k, rel_se = pyhessian_default(model, x, data.y, seed)
            est = hessian_trace(model, (x, data.y), seed=seed)
            err = (value - exact) / exact
            errors.append(abs(err))
            ses.append(rel_se or float("nan"))
            counts.append(k)
            z.append(abs(est.value - exact) / est.stderr)
            rse = "n/a" if rel_se is None else f"{rel_se:.1%}"
            probes = est.details["probes"]
            print(
                f"  {seed:>4} {value:10.4g} {k:>6} {rse:>10} {err:+8.1%}   "
                f"{est.value:10.4g} {est.stderr:9.2g} {probes:>6} {z[-1]:6.2f}"
            )
        median = statistics.median
        print(
            f"  PyHessian: median |error| {median(errors):.1%}, max {max(errors):.1%}, "
            f"median probes {median(counts):g}, median rel se {median(ses):.1%}"
        )
        print(f"  flatcli: median |error| / stderr {median(z):.2f}, max {max(z):.2f}")


if __name__ == "__main__":
    main()
