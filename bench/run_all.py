"""Every flatcli benchmark in one run: a table of ratios, also written to bench/results.md.

    python bench/run_all.py [--quick] [--only SECTION[,SECTION...]] [--device cpu|cuda]
                            [--output bench/results.md]

Each figure is a ratio of two times (or a fitted exponent) measured in the same run, on
the same model and data; absolute times depend on the machine and its load. Sections:

``kappa``     exact κ vs the reference code's naive dense-Hessian method (bench_kappa.py);
``scaling``   time and peak memory vs n (1k–8k samples), with the fitted exponent of
              t ∝ n^a per measure (each n in its own process, for its own peak memory);
``trace``     Hutchinson, Hutch++ and Lanczos per Hessian-vector product against the
              real PyHessian, curvlinops beside it, and the exact trace against
              BackPACK's DiagHessian (bench_trace.py);
``to_rtol``   time to 5% relative stderr on ResNet-18 against the real PyHessian run to
              the same stderr (bench_models.py);
``fam``       a FAM step vs a plain SGD step: the digits MLP's logits and hidden layers,
              and a ResNet-18's penultimate Linear (bench_fam.py);
``correlate`` checkpoints per second: one process, ``--jobs 2`` (a reused worker pool)
              and ``torchrun --nproc-per-node 2`` (gloo), all through the CLI;
``huge``      nn.Linear(4096, 32000), n = 512: closed form and feature-space Hutchinson κ,
              time and peak memory over a forward pass (bench_huge.py);
``overhead``  exact κ over one forward pass, nn.Sequential and a custom (fx) module
              (bench_overhead.py);
``defaults``  the default ``flatcli measure`` on ResNet-18 (256 images), MiniLM (192
              sentences) and a tiny BERT: wall time and peak RSS against one forward and
              backward pass, each in its own process (bench_defaults.py).

``--quick`` shrinks every section to a smoke run (about three minutes on two cores).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
SECTIONS = (
    "kappa", "scaling", "trace", "to_rtol", "fam", "correlate", "huge", "overhead", "defaults"
)
DEVICE_SECTIONS = ("trace", "to_rtol", "fam")
"""Sections that take ``--device`` (the others run on the CPU)."""

Row = tuple[str, str, str, str, str, str]
"""(section, case, baseline, flatcli, ratio, note)."""


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "PYTHONWARNINGS": "ignore",
    }


# --------------------------------------------------------------------------- sections


def kappa(quick: bool) -> list[Row]:
    import bench_kappa

    _, rows = bench_kappa.collect(quick=quick)
    out = []
    for name, t_slow, t_fast, v_fast, v_slow in rows:
        rel = "" if v_slow is None else f"rel diff {abs(v_fast - v_slow) / abs(v_slow):.0e}"
        note = "naive time extrapolated" if "extrapolated" in name else rel
        case = name.split(" (")[0].strip()
        out.append(
            ("exact κ vs naive dense Hessian", case, f"{t_slow:.3f} s", f"{t_fast:.4f} s",
             f"{t_slow / t_fast:.0f}× faster", note)
        )  # fmt: skip
    return out


SCALING_MEASURES = ("κ logits (Identity 3)", "κ hidden (Identity 2)", "Tr H (32 probes)",
                    "Fisher-Rao")  # fmt: skip


def _scaling_calls(n_max: int) -> dict[str, object]:
    """The four measures as functions of ``n`` on one MLP and one dataset of ``n_max``."""
    import torch
    from torch import nn

    from flatcli.measures.fisher_rao import fisher_rao
    from flatcli.measures.hessian import hessian_trace
    from flatcli.measures.relative_flatness import relative_flatness

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    ).eval()
    x, y = torch.randn(n_max, 64, generator=g), torch.randint(0, 10, (n_max,), generator=g)
    relative_flatness(model, "4", (x[:64], y[:64]))  # warm-up (first-use compilation)
    relative_flatness(model, "2", (x[:64], y[:64]))
    return {
        SCALING_MEASURES[0]: lambda n: relative_flatness(model, "4", (x[:n], y[:n])),
        SCALING_MEASURES[1]: lambda n: relative_flatness(model, "2", (x[:n], y[:n])),
        SCALING_MEASURES[2]: lambda n: hessian_trace(
            model, (x[:n], y[:n]), method="hutchinson", rtol=1e-12, max_probes=32
        ),
        SCALING_MEASURES[3]: lambda n: fisher_rao(model, (x[:n], y[:n])),
    }


def _scaling_case(n: int) -> dict[str, float]:
    """Peak resident memory of a process that computes all four measures at ``n``."""
    for fn in _scaling_calls(n).values():
        fn(n)  # type: ignore[operator]
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def scaling(quick: bool) -> list[Row]:
    sizes = (1000, 2000, 4000) if quick else (1000, 2000, 4000, 8000)
    mem = []
    for n in sizes:  # each n in its own process, for its own peak memory
        cmd = [sys.executable, __file__, "--scaling-case", str(n)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=True)
        mem.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"])
    calls = _scaling_calls(sizes[-1])
    lo, hi = sizes[0], sizes[-1]
    rows: list[Row] = []
    for name, fn in calls.items():
        times: dict[int, list[float]] = {n: [] for n in sizes}
        rounds = 0
        while rounds < 3 or (rounds < 9 and sum(times[hi]) < 1.0):  # sizes interleaved
            for n in sizes:
                start = time.perf_counter()
                fn(n)  # type: ignore[operator]
                times[n].append(time.perf_counter() - start)
            rounds += 1
        med = [sorted(times[n])[len(times[n]) // 2] for n in sizes]
        a = _slope([math.log(n) for n in sizes], [math.log(t) for t in med])
        rows.append(
            (f"time vs n ({lo}–{hi})", name, f"{med[0]:.3f} s at n={lo}",
             f"{med[-1]:.3f} s at n={hi}", f"t ∝ n^{a:.2f}", "1.00 = linear")
        )  # fmt: skip
    data_mb = (hi - lo) * 64 * 4 / 2**20
    rows.append(
        (f"time vs n ({lo}–{hi})", "peak resident memory of the process (all four)",
         f"{mem[0]:.0f} MB at n={lo}", f"{mem[-1]:.0f} MB at n={hi}",
         f"{mem[-1] / mem[0]:.3f}×",
         f"streamed in batches of 256; the data grows by {data_mb:.1f} MB")
    )  # fmt: skip
    return rows


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def trace(quick: bool, device: str = "cpu") -> list[Row]:
    import bench_trace

    return bench_trace.collect(quick, device)


def to_rtol(quick: bool, device: str = "cpu") -> list[Row]:
    import bench_models

    args = bench_models.parser().parse_args(["--device", device])
    if quick:
        args = bench_models.quick(args)
    fitted, done = bench_models.collect(args)
    base = done["PyHessian"]
    case = f"ResNet-18 (width {args.width}), batch {args.batch}, {args.rtol:.0%} rel. stderr"
    note = (
        f"fitted {args.fit_steps} Adam steps (loss {fitted['loss']:.2f}); PyHessian: "
        f"{base['probes']} probes, {base['value']:.4g} ± {base['stderr']:.2g}"
    )
    rows: list[Row] = []
    for name, r in done.items():
        if name == "PyHessian" or "error" in r:
            continue
        what = "exact" if r["stderr"] is None else f"{r['value']:.4g} ± {r['stderr']:.2g}"
        extra = f"{r['probes']} products, " if r["probes"] else ""
        mark = ", projected" if r["projected"] or base["projected"] else ""
        rows.append(
            ("time to 5% stderr vs the real PyHessian", f"{case}: {name}",
             f"{base['to_rtol']:.1f} s", f"{r['to_rtol']:.1f} s",
             f"{r['to_rtol'] / base['to_rtol']:.3f}×",
             f"{what} ({extra}peak {r['peak_rss'] / 2**30:.2f} GiB{mark}); {note}")
        )  # fmt: skip
    return rows


def fam(quick: bool, device: str = "cpu") -> list[Row]:
    import bench_fam
    import torch

    from flatcli import archs
    from flatcli.checkpoints import load_checkpoint
    from flatcli.data import load_data

    if device == "cpu":
        torch.set_num_threads(1)
        bench_fam.CLOCK = time.process_time  # CPU time: the step's own work
    torch.manual_seed(0)
    digits = load_data("digits")
    x, y = digits.x[:32].to(device), digits.y[:32].to(device)
    steps = 50 if quick else 300
    rows: list[Row] = []
    for layer, label in (("fc", "logits"), ("fc2", "hidden"), ("fc1", "hidden")):
        model = load_checkpoint(ROOT / "sample_models" / "digits_mlp.safetensors").model
        r = bench_fam.compare(
            f"digits MLP, {layer}", model.to(device), layer, x, y, steps=steps, warmup=20
        )
        rows.append(
            ("FAM step vs plain step", f"digits MLP, {layer} ({label}), batch 32",
             f"{r['plain'] * 1e3:.2f} ms", f"{r['fam'] * 1e3:.2f} ms", f"{r['ratio']:.2f}×",
             str(r["path"]))
        )  # fmt: skip
    width = 16 if quick else 64
    xr = torch.randn(32, 3, 32, 32, device=device)
    yr = torch.randint(0, 10, (32,), device=device)
    model = archs.resnet18(width=width, hidden=256).to(device)
    r = bench_fam.compare("ResNet-18 fc1", model, "fc1", xr, yr, steps=3 if quick else 9, warmup=2)
    rows.append(
        ("FAM step vs plain step", f"ResNet-18 (width {width}) + fc1 {8 * width}→256, fc1 "
         "(hidden), batch 32", f"{r['plain'] * 1e3:.0f} ms", f"{r['fam'] * 1e3:.0f} ms",
         f"{r['ratio']:.2f}×", str(r["path"]))
    )  # fmt: skip
    return rows


def correlate(quick: bool) -> list[Row]:
    zoo = sorted((ROOT / "sample_models" / "zoo").glob("*.safetensors"))[: 4 if quick else 8]
    args = ["correlate", *map(str, zoo), "--measures", "relative_flatness,layer_hessian_trace"]
    args += ["--max-samples", "300", "--bootstrap", "20", "--format", "csv"]
    runs = {
        "1 process": [sys.executable, "-m", "flatcli", *args],
        "--jobs 2 (worker pool)": [sys.executable, "-m", "flatcli", *args, "--jobs", "2"],
        "torchrun, 2 ranks (gloo)": [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "flatcli", *args,
        ],
    }  # fmt: skip
    times = {}
    for name, cmd in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run(
                [*cmd, "--cache-dir", tmp], capture_output=True, env=_env(), check=True, cwd=tmp
            )
            times[name] = time.perf_counter() - start
    base = times["1 process"]
    cpus = os.cpu_count()
    return [
        ("correlate throughput", f"{len(zoo)} checkpoints, {name}", f"{base:.1f} s",
         f"{t:.1f} s", f"{base / t:.2f}× the throughput",
         f"wall time incl. start-up, {cpus} cores, 1 thread per process")
        for name, t in times.items()
    ]  # fmt: skip


def huge(quick: bool) -> list[Row]:
    import bench_huge

    d, m, n = (8000, 1024, 256) if quick else (32000, 4096, 512)
    rows = bench_huge.run(d, m, n, probes=8, batch=256)
    fwd = rows[0]
    closed = rows[1]
    out: list[Row] = []
    for r in rows[1:]:
        z = ""
        if r["case"] == "hutchinson":
            z = f"within {abs(r['value'] - closed['value']) / r['stderr']:.2f} stderr"
        out.append(
            (f"huge layer Linear({m}, {d}), n={n}", f"{r['case']} κ",
             f"forward {fwd['seconds']:.2f} s", f"{r['seconds']:.2f} s, peak {r['peak_gb']:.2f} GB",
             f"{r['seconds'] / fwd['seconds']:.2f}× forward, "
             f"{r['seconds'] / closed['seconds']:.2f}× closed form", z)
        )  # fmt: skip
    return out


def overhead(quick: bool) -> list[Row]:
    import bench_overhead
    import torch

    torch.set_num_threads(1)
    out: list[Row] = []
    for n in (2000,) if quick else (2000, 32000):
        for name, fwd, first, kap in bench_overhead.run(n):
            out.append(
                ("exact κ over a forward pass", f"{name}, n={n}", f"{fwd * 1e3:.1f} ms",
                 f"{kap * 1e3:.1f} ms", f"{kap / fwd:.2f}×",
                 f"first call {first / fwd:.2f}×"
                 + (" (traces the module once)" if "fx" in name else ""))
            )  # fmt: skip
    return out


def defaults(quick: bool) -> list[Row]:
    import bench_defaults

    out: list[Row] = []
    for case in ("tiny_bert",) if quick else tuple(bench_defaults.CASES):
        base, got, target = bench_defaults.measure_case(case)
        out.append(
            ("default flatcli measure", case, f"{base['seconds']:.1f} s",
             f"{got['seconds']:.1f} s", f"{got['seconds'] / base['seconds']:.0f}×",
             f"target {target:.0f} s; peak RSS {got['rss'] / 2**30:.2f} GiB; "
             f"load {os.getloadavg()[0]:.1f}")
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- output

NOTES = {
    "kappa": "The naive method builds the dense `(dm)×(dm)` layer Hessian with one backward "
    "pass per row (the reference code); beyond m = 84 its time is extrapolated from 1,000 "
    "rows (`bench_kappa.py --full` builds them all).",
    "scaling": "Fitted slope of log t on log n (medians of 3–9 rounds, the sizes "
    "interleaved); peak memory: each n in its own process.",
    "trace": "One model and batch per case, float32; the sides take turns (interleaved "
    "rounds), medians of CPU time per Hessian-vector product (one thread). Baseline: the "
    "real PyHessian (`pip install pyhessian`): `hessian(...).trace(maxIter=K, tol=-inf)`, "
    "its graph built once; λ_max against its power iteration. The note gives flatcli's "
    "route (its method string). The exact trace: BackPACK's `DiagHessian` summed, against "
    "`hessian_trace(method='exact')` (on these piecewise-linear networks the Gauss-Newton "
    "diagonal, per-sample VJPs).",
    "to_rtol": "Each side in its own process, CPU seconds. PyHessian has no standard error: "
    "the bench computes its samples' after every 16 probes and stops at 5% of their mean, "
    "as flatcli does. `flatcli` is `hessian_trace` with its defaults (on a piecewise-linear "
    "network the exact trace, no probes). Projected: a side capped by `--max-seconds` "
    "before 5%, its time projected from its cost per probe and its samples' spread.",
    "fam": "Plain steps (forward, cross-entropy, backward, SGD) and FAM steps (the same plus "
    "`0.1·κ` of the layer and its full Lemma 1 gradient) alternate; medians of the "
    "process's CPU time per step (one thread).",
    "correlate": "Whole commands, including each process's start-up (about 2 s to import "
    "torch); on a machine whose cores are busy with other jobs extra processes find no idle "
    "core.",
    "huge": "Each case in its own process (peak: that process's maximum resident memory, "
    "including the 0.5 GB weight and torch itself); Hutchinson: 8 feature-space probes.",
    "defaults": "Wall seconds, one thread, each run its own process: the baseline is one "
    "forward and backward pass over the data; the measure row runs the default measures "
    "with the CLI's default --time-budget (one budget for the run). Random weights and data.",
    "overhead": "κ's pass also yields Tr(H), the loss and the accuracy; the fx split is "
    "cached per (model, layer), so only the first call on a custom module traces it.",
}
"""What each section's numbers are, printed under its table (never edited in results.md)."""


def table(rows: list[Row]) -> str:
    head = ("section", "case", "baseline", "flatcli", "ratio", "note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def read_blocks(path: Path) -> dict[str, str]:
    """The ``## section (device)`` blocks of an earlier results.md (none: an empty dict)."""
    if not path.exists():
        return {}
    blocks: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("## "):
            key = line[3:].strip()
            blocks[key] = ""
        elif key is not None:
            blocks[key] += line
    return blocks


def block(name: str, device: str, rows: list[Row], seconds: float, quick: bool) -> str:
    import torch

    cuda = f"cuda: {torch.cuda.get_device_name()}" if device.startswith("cuda") else "cpu"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    command = f"python bench/run_all.py --only {name}{' --quick' if quick else ''}"
    if device != "cpu":
        command += f" --device {device}"
    return (
        f"\n`{command}` on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC: "
        f"torch {torch.__version__}, {cuda}, {os.cpu_count()} cores ({platform.machine()}), "
        f"load average {load:.1f} at the end, one thread per process, {seconds:.0f} s.\n\n"
        f"{table(rows)}\n\n{NOTES[name]}\n\n"
    )


def write_results(path: Path, blocks: dict[str, str]) -> None:
    import torch

    order = [f"{n} ({d})" for d in ("cpu", "cuda") for n in SECTIONS]
    known = [k for k in order if k in blocks]
    gpu = any(k.endswith("(cuda)") for k in known)
    intro = (
        "# flatcli benchmarks\n\nWritten by `python bench/run_all.py` (never edited by hand): "
        "each section below is replaced when it is run again (`--only SECTION`), the others "
        "are kept. Every ratio compares two timings of the same run (interleaved where the "
        "section says so); absolute times depend on the machine and its load.\n\n"
    )
    if not gpu:
        intro += (
            "**No GPU table**: no run so far had a CUDA device "
            f"(this one: {'CUDA available' if torch.cuda.is_available() else 'none'}). "
            "`python bench/run_all.py --only trace,to_rtol,fam --device cuda` adds one.\n\n"
        )
    body = "".join(f"## {k}\n{blocks[k]}" for k in known)
    path.write_text(intro + body.rstrip() + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized runs of every section")
    parser.add_argument("--only", default=None, help=f"comma list of: {', '.join(SECTIONS)}")
    parser.add_argument("--device", default="cpu", help=f"for {', '.join(DEVICE_SECTIONS)}")
    parser.add_argument("--output", type=Path, default=BENCH / "results.md")
    parser.add_argument("--scaling-case", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scaling_case is not None:
        print(json.dumps(_scaling_case(args.scaling_case)))
        return
    chosen = SECTIONS if args.only is None else tuple(args.only.split(","))
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    blocks = read_blocks(args.output)
    for name in chosen:
        device = args.device if name in DEVICE_SECTIONS else "cpu"
        t = time.perf_counter()
        section = globals()[name]
        rows = section(args.quick, device) if name in DEVICE_SECTIONS else section(args.quick)
        seconds = time.perf_counter() - t
        print(table(rows), flush=True)
        print(f"  {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
        blocks[f"{name} ({device})"] = block(name, device, rows, seconds, args.quick)
        write_results(args.output, blocks)  # after every section: a long run keeps its parts
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
