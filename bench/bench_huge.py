"""κ of a language-model-sized output layer: closed form vs feature-space Hutchinson.

    python bench/bench_huge.py [--quick] [--d 32000] [--m 4096] [--n 512] [--probes 8]

Model: one ``nn.Linear(m, d)`` (default 4096 → 32000, a language model's output layer),
float32, ``n`` Gaussian inputs with random labels, one thread. Each case runs in its own
process so that its peak memory (``ru_maxrss``) is its own: a plain forward pass over the
data (the baseline), the exact closed form (Identity 3), and Hutchinson κ with
``--probes`` Rademacher probes in feature space (Identity 2). The table prints seconds,
peak resident memory, the ratio to the forward pass and to the closed form, and how many
standard errors the Hutchinson value lies from the exact one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _case(kind: str, d: int, m: int, n: int, probes: int, batch: int) -> dict[str, float]:
    import torch
    from torch import nn

    from flatcli.measures.relative_flatness import relative_flatness

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(m, d))
    with torch.no_grad():
        model[0].weight.normal_(0, m**-0.5, generator=gen)
    x = torch.randn(n, m, generator=gen)
    y = torch.randint(0, d, (n,), generator=gen)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out: dict[str, float] = {}
    if kind == "forward":
        with torch.no_grad():
            for i in range(0, n, batch):
                model(x[i : i + batch])
    else:
        method = "exact" if kind == "closed form" else "hutchinson"
        est = relative_flatness(
            model, "0", (x, y), method=method, probes=probes, batch_size=batch, seed=0
        )
        out = {"value": est.value, "stderr": est.stderr or 0.0}
    out["seconds"] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_gb"] = peak * 1024 / 1e9  # ru_maxrss is in KiB on Linux
    out["extra_gb"] = (peak - base) * 1024 / 1e9
    return out


def run(d: int, m: int, n: int, probes: int, batch: int) -> list[dict[str, object]]:
    """Each case in a fresh process; returns one dict per case."""
    rows = []
    for kind in ("forward", "closed form", "hutchinson"):
        cmd = [sys.executable, __file__, "--case", kind, "--d", str(d), "--m", str(m)]
        cmd += ["--n", str(n), "--probes", str(probes), "--batch-size", str(batch)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows.append({"case": kind, **json.loads(res.stdout.strip().splitlines()[-1])})
    return rows


def table(rows: list[dict[str, object]], probes: int) -> list[str]:
    fwd = float(rows[0]["seconds"])  # type: ignore[arg-type]
    closed = next(r for r in rows if r["case"] == "closed form")
    lines = [
        f"{'case':<24} {'s':>8} {'peak GB':>8} {'/ forward':>10} {'/ closed':>9} {'|Δ|/se':>7}"
    ]
    for r in rows:
        t = float(r["seconds"])  # type: ignore[arg-type]
        z = ""
        if r["case"] == "hutchinson" and float(r["stderr"]) > 0:  # type: ignore[arg-type]
            z = f"{abs(float(r['value']) - float(closed['value'])) / float(r['stderr']):.2f}"  # type: ignore[arg-type]
        name = f"hutchinson ({probes} probes)" if r["case"] == "hutchinson" else str(r["case"])
        lines.append(
            f"{name:<24} {t:8.2f} {float(r['peak_gb']):8.2f} {t / fwd:9.2f}x "  # type: ignore[arg-type]
            f"{t / float(closed['seconds']):8.2f}x {z:>7}"  # type: ignore[arg-type]
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Linear(1024, 8000), n = 256")
    parser.add_argument("--d", type=int, default=32000)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        res = _case(args.case, args.d, args.m, args.n, args.probes, args.batch_size)
        print(json.dumps(res))
        return
    d, m, n = (8000, 1024, 256) if args.quick else (args.d, args.m, args.n)
    print(f"nn.Linear({m}, {d}), n = {n}, float32, 1 thread, each case in its own process")
    for line in table(run(d, m, n, args.probes, args.batch_size), args.probes):
        print(line)


if __name__ == "__main__":
    main()
