"""Cost of a FAM training step relative to a plain SGD step, measured in the same run.

    python bench/bench_fam.py [--quick] [--device cpu|cuda] [--steps N] [--threads T]
                              [--clock wall|cpu] [--mlp-only]

``--clock cpu`` times each step by the process's CPU time (``time.process_time``) instead
of the wall clock. With ``--threads 1`` on the CPU that is the step's own work, which a
machine shared with other jobs does not inflate (a preempted step does not count).
``--mlp-only`` skips the ResNet-18 rows.

For each configuration, one model and one batch are used. Plain steps
(``CE(model(x), y)``, backward, SGD) and FAM steps (``reg.forward(x)`` → ``CE + λ κ``,
backward, SGD) alternate after a warm-up, so that drift in machine load hits both alike.
The table prints the median of each and their ratio. The FAM step computes the exact
regularizer and its full Lemma 1 gradient (flatcli.fam):

* the bundled digits MLP, FAM on ``fc``: closed form (Identity 3);
* a ResNet-18 (11.2 M parameters, 3×32×32 random inputs, batch 32), FAM on ``fc``: closed
  form;
* hidden layers: the MLP's ``fc1`` and ``fc2``, and ``fc1`` of a ResNet-18 with a
  penultimate ``Linear(512, 256)``. Their downstream parts are ReLU and Linear only, so
  ``auto`` takes Identity 2 through the downstream Jacobian (one VJP per class). Each is
  also timed on the general route, ``min(d, m)`` downstream HVPs under double backward
  (``[HVP route]`` rows: the same κ and gradient, ``tests/test_fam.py``), so the two
  routes' ratios come from the same run;
* for reference, a ResNet-18 conv layer (``layer4.1.conv2``) with one Hutchinson probe
  (Identity 1, double backward through the downstream part).

For comparison, docs/finetune.md ("How this differs from the published FAM code") quotes
the published FAM code at 1.57 s per step against 0.97 s for a plain step (1.62×), for
ResNet-18 at batch 32 on CPU, a figure not re-measured here. That code also computes a
different, detached quantity.
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

from flatcli import archs
from flatcli.checkpoints import load_checkpoint
from flatcli.data import load_data
from flatcli.fam import FAMRegularizer

ROOT = Path(__file__).resolve().parents[1]


def plain_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def fam_step(reg: FAMRegularizer, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):  # noqa: ANN201
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out, cut = reg.forward(x)
        (F.cross_entropy(out, y) + 0.1 * reg.penalty(cut, y)).backward()
        opt.step()

    return step


CLOCK: Callable[[], float] = time.perf_counter


def timed(fn: Callable[[], None], sync: Callable[[], None]) -> float:
    sync()
    start = CLOCK()
    fn()
    sync()
    return CLOCK() - start


def compare(
    name: str,
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    warmup: int,
    method: str = "auto",
    hvp: bool = False,
) -> dict[str, object]:
    """Median plain and FAM step times on the same model and batch, interleaved.

    ``hvp`` forces the general Identity 2 route (downstream HVPs) on a piecewise-linear
    downstream part, for comparison with the Jacobian route that ``auto`` takes there.
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    reg = FAMRegularizer(model, layer, method=method, probes=1)  # type: ignore[arg-type]
    if hvp:
        reg.piecewise_linear = False
        name += " [HVP route]"
    plain, fam = plain_step(model, opt, x, y), fam_step(reg, opt, x, y)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        plain()
        fam()
    tp, tf = [], []
    for _ in range(steps):
        tp.append(timed(plain, sync))
        tf.append(timed(fam, sync))
    p, f = statistics.median(tp), statistics.median(tf)
    return {"config": name, "path": reg.describe(), "plain": p, "fam": f, "ratio": f / p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, narrow ResNet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is steadier on a busy machine)",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall clock, or the process's CPU time (steady on a shared machine, 1 thread)",
    )
    parser.add_argument("--mlp-only", action="store_true", help="skip the ResNet-18 rows")
    args = parser.parse_args()
    global CLOCK
    if args.clock == "cpu":
        if args.device != "cpu":
            parser.error("--clock cpu needs --device cpu")
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    small_steps = args.steps or (20 if args.quick else 200)
    big_steps = args.steps or (2 if args.quick else 7)
    width = 16 if args.quick else 64

    digits = load_data("digits")
    xd = digits.x[:32].to(device)
    yd = digits.y[:32].to(device)
    rows = []

    def mlp() -> nn.Module:
        return load_checkpoint(ROOT / "sample_models" / "digits_mlp.safetensors").model.to(device)

    rows.append(
        compare("digits MLP, fc (logits)", mlp(), "fc", xd, yd, steps=small_steps, warmup=10)
    )
    for hidden in ("fc2", "fc1"):
        for hvp in (False, True):
            rows.append(
                compare(
                    f"digits MLP, {hidden} (hidden)",
                    mlp(),
                    hidden,
                    xd,
                    yd,
                    steps=small_steps,
                    warmup=10,
                    hvp=hvp,
                )
            )
    x = torch.randn(32, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (32,), device=device)
    hidden_name = f"ResNet-18 + fc1 {8 * width}→256, fc1 (hidden)"
    cfgs = [
        ("ResNet-18, fc (logits)", {}, "fc", "auto", False),
        (hidden_name, {"hidden": 256}, "fc1", "auto", False),
        (hidden_name, {"hidden": 256}, "fc1", "auto", True),
        ("ResNet-18, layer4.1.conv2 (1 probe)", {}, "layer4.1.conv2", "hutchinson", False),
    ]
    for name, kwargs, layer, method, hvp in [] if args.mlp_only else cfgs:
        model = archs.resnet18(width=width, **kwargs).to(device)
        rows.append(
            compare(name, model, layer, x, y, steps=big_steps, warmup=2, method=method, hvp=hvp)
        )
        print(f"  done: {name}", flush=True)

    print(
        f"\ndevice {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"ResNet width {width}, batch 32, {args.clock} clock; medians over interleaved "
        "steps\n"
    )
    head = f"{'configuration':52} {'plain step':>11} {'FAM step':>11} {'ratio':>7}  FAM path"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['config']:52} {1e3 * r['plain']:9.2f}ms {1e3 * r['fam']:9.2f}ms "
            f"{r['ratio']:6.2f}×  {r['path']}"
        )


if __name__ == "__main__":
    main()
