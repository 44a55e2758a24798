"""Whole-network Hutchinson trace on real-size models vs a PyHessian-style loop.

    python bench/bench_models.py [--models resnet18,minilm] [--batch 64] [--probes 16]
                                 [--rtol 0.05] [--width 64] [--vmap]

For each model (random weights, a fixed random batch, float32, one thread), every side
runs in its own subprocess so that its peak RSS (``resource.getrusage`` maxrss) is its own:

* ``loop``: a PyHessian-style loop: one Rademacher probe at a time, each a forward pass, a
  ``create_graph`` backward pass and a second backward pass (``dataloader_hv_product``);
* ``flatcli``: ``hessian_trace(method="hutchinson")`` with the default plan (on these
  models: double backward, the gradient graph of a batch shared by a round of probes),
  ``rtol=0`` and ``max_probes=--probes``;
* ``hutch++``: ``hessian_trace(trace_method="hutch++")`` with ``--hutchpp-probes``
  products in all (a sketch of 16, 16 more for its exact part, the rest residual probes);
* ``vmap`` (with ``--vmap``): the former default, 16 probes vmapped forward-over-reverse.

Before the sides run, the driver fits the model (in eval mode) to the batch for
``--fit-steps`` Adam steps (so that the Hessian is that of a model near a minimum, not of
a random one whose trace is near 0 and whose relative stderr is meaningless) and saves
it; every side loads that state.

Reported: CPU seconds per probe (``time.process_time`` of the one-thread process, model
build and imports excluded: wall time is meaningless on a shared machine), peak RSS, the
relative stderr after the probes, and the CPU time to ``--rtol`` relative stderr,
projected from the measured cost per product and sample variance of each side: probes
needed = k·(rel/rtol)² (Hutch++: its 32 sketch products plus the residual probes needed).
Ratios are against the loop of the same run.

Models: ``resnet18`` is :func:`flatcli.archs.resnet18` (11.2 M parameters at width 64)
on 3×32×32 inputs, 10 classes; ``minilm`` is a MiniLM-L6-sized BERT (6 layers, hidden 384,
12 heads, 22.7 M parameters) built from a ``transformers.BertConfig`` with random weights
and eager attention, on 16-token sequences, 2 classes, wrapped in a plain ``nn.Module``
that returns the logits (skipped if transformers is not installed).
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- one side


def build(name: str, batch: int, width: int):  # noqa: ANN201
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    if name == "resnet18":
        from flatcli import archs

        torch.manual_seed(0)
        model = archs.resnet18(width=width).eval()
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        return model, x, y
    if name == "minilm":
        from transformers import BertConfig, BertForSequenceClassification

        torch.manual_seed(0)
        config = BertConfig(
            hidden_size=384,
            num_hidden_layers=6,
            num_attention_heads=12,
            intermediate_size=1536,
            num_labels=2,
            attn_implementation="eager",
        )
        bert = BertForSequenceClassification(config).eval()

        class Logits(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                return self.bert(input_ids=ids).logits

        x = torch.randint(0, config.vocab_size, (batch, 16), generator=gen)
        y = torch.randint(0, 2, (batch,), generator=gen)
        return Logits().eval(), x, y
    raise SystemExit(f"unknown model {name}")


def fit(args: argparse.Namespace) -> None:
    """Fit the model to its batch for a few Adam steps and save the state."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    model, x, y = build(args.model, args.batch, args.width)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    # eval mode: BatchNorm's statistics stay fixed, so the loss that is fitted is the one
    # measured (train-mode statistics would lag behind after a few steps)
    for _ in range(args.fit_steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(x), y))
        acc = float((model(x).argmax(-1) == y).float().mean())
    torch.save(model.state_dict(), args.state)
    print(json.dumps({"loss": loss, "accuracy": acc}))


def side(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from flatcli.measures.estimate import mean_and_stderr
    from flatcli.measures.hessian import hessian_trace

    torch.set_num_threads(1)
    model, x, y = build(args.model, args.batch, args.width)
    if args.state:
        model.load_state_dict(torch.load(args.state, weights_only=True))
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict = {"parameters": sum(p.numel() for p in model.parameters())}
    t0 = time.process_time()
    if args.side == "loop":
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(args.seed)
        samples = []
        for _ in range(args.probes):
            v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p) for p in params]
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            hv = torch.autograd.grad(grads, params, grad_outputs=v)
            samples.append(float(sum((h * vi).sum() for h, vi in zip(hv, v, strict=True))))
            del loss, grads, hv
        mean, se = mean_and_stderr(samples)
        out |= {"value": mean, "stderr": se, "probes": len(samples)}
    else:
        kwargs: dict = {"method": "hutchinson", "seed": args.seed, "batch_size": args.batch}
        if args.side == "hutch++":
            kwargs |= {"trace_method": "hutch++", "rtol": 0.0, "max_probes": args.hutchpp_probes}
        else:
            kwargs |= {"rtol": 0.0, "max_probes": args.probes}
        if args.side == "vmap":
            kwargs["probe_batch"] = 16
        est = hessian_trace(model, (x, y), **kwargs)
        out |= {
            "value": est.value,
            "stderr": est.stderr,
            "probes": est.details["probes"],
            "engine": est.details["engine"],
            "method": est.method,
            "sketch": est.details.get("sketch", 0),
        }
    out["seconds"] = time.process_time() - t0
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["start_rss"] = start_rss
    return out


# --------------------------------------------------------------------------- driver


def run_side(model: str, which: str, args: argparse.Namespace, state: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--side",
        which,
        "--model",
        model,
        "--batch",
        str(args.batch),
        "--probes",
        str(args.probes),
        "--rtol",
        str(args.rtol),
        "--hutchpp-probes",
        str(args.hutchpp_probes),
        "--width",
        str(args.width),
        "--seed",
        str(args.seed),
        "--state",
        state,
        "--fit-steps",
        str(args.fit_steps),
        "--lr",
        str(args.lr),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def common_reference(done: dict, rtol: float) -> None:
    """Time to ``rtol`` with one reference trace for every side.

    A side's own relative stderr divides by its own noisy mean; near a zero trace that
    dominates. Here the reference is the estimate with the smallest stderr, and each
    side needs ``(σ / (rtol·|T_ref|))²`` probes, ``σ = stderr·√k`` its per-probe spread.
    """
    ok = {n: r for n, r in done.items() if r.get("stderr")}
    if not ok or "loop" not in ok:
        return
    ref = min(ok.values(), key=lambda r: r["stderr"])
    t_ref = abs(ref["value"])
    print("  trace estimates: " + ", ".join(
        f"{n} {r['value']:.4g} ± {r['stderr']:.2g}" for n, r in ok.items()
    ))
    base = None
    for name, r in ok.items():
        sigma = r["stderr"] * math.sqrt(r["k"])
        need = (sigma / (rtol * t_ref)) ** 2
        to = r["per"] * (r["fixed"] + need)
        base = to if name == "loop" else base
        print(
            f"  {name:<9} per-probe σ {sigma:.4g}: {need:.0f} probes to {rtol:.0%} of "
            f"|T| = {t_ref:.4g}, {to:.0f} CPU s = {to / base:.2f}x the loop",
            flush=True,
        )


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default="resnet18,minilm")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--rtol", type=float, default=0.05)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vmap", action="store_true", help="also the vmapped engine")
    parser.add_argument("--hutchpp-probes", type=int, default=64)
    parser.add_argument("--fit-steps", type=int, default=20, help="Adam steps before")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "fit":
        fit(args)
        return
    if args.side:
        print(json.dumps(side(args)))
        return
    import torch

    print(
        f"torch {torch.__version__}, 1 thread, float32, batch {args.batch}, "
        f"{args.probes} probes per side, Hutch++ to {args.rtol:.0%} relative stderr"
    )
    sides = ["loop", "flatcli", "hutch++"] + (["vmap"] if args.vmap else [])
    for model in args.models.split(","):
        if model == "minilm":
            try:
                import transformers  # noqa: F401
            except ImportError:
                print("\n== minilm: skipped (transformers is not installed)")
                continue
        with tempfile.TemporaryDirectory() as tmp:
            state = str(Path(tmp) / "state.pt")
            fitted = run_side(model, "fit", args, state)
            if "error" in fitted:
                print(f"\n== {model}: fit failed: {fitted['error']}")
                continue
            print(
                f"\n== {model}: after {args.fit_steps} Adam steps: loss {fitted['loss']:.3f}, "
                f"accuracy {fitted['accuracy']:.0%} on the batch",
                flush=True,
            )
            print(
                f"{'side':<9} {'probes':>6} {'CPU s/pr':>8} {'ratio':>6} {'peak RSS GiB':>12} "
                f"{'ratio':>6} {'rel se':>7} {'s to ' + format(args.rtol, '.0%'):>9} {'ratio':>6}",
                flush=True,
            )
            base: dict = {}
            methods = []
            done: dict = {}
            for name in sides:
                r = run_side(model, name, args, state)
                if "error" in r:
                    print(f"{name:<9} failed: {r['error']}", flush=True)
                    continue
                fixed = 2 * r.get("sketch", 0)
                per = r["seconds"] / r["probes"]
                rel = r["stderr"] / abs(r["value"]) if r["stderr"] else math.nan
                k = r["probes"] - fixed
                to = per * (fixed + max(k, k * (rel / args.rtol) ** 2))
                if name == "loop":
                    base = {"per": per, "rss": r["peak_rss"], "to": to}
                print(
                    f"{name:<9} {r['probes']:>6} {per:>8.2f} {per / base['per']:>5.2f}x "
                    f"{gib(r['peak_rss']):>12} {r['peak_rss'] / base['rss']:>5.2f}x {rel:>7.2%} "
                    f"{to:>9.1f} {to / base['to']:>5.2f}x",
                    flush=True,
                )
                if "method" in r:
                    methods.append(f"  {name}: {r['method']} ({r['parameters'] / 1e6:.1f} M)")
                done[name] = {**r, "per": per, "k": k, "fixed": fixed}
            print("\n".join(methods), flush=True)
            common_reference(done, args.rtol)


if __name__ == "__main__":
    main()
