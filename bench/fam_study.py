"""FAM stability study for docs/finetune.md: plain, FAM (full, unclipped, detached) and SAM.

    python bench/fam_study.py [--epochs 5] [--lrs 1e-3,1e-2] [--seeds 0,1,2] [--out docs]

Models: the bundled digits MLP and digits CNN (``sample_models/``), FAM on their logits
layer ``fc`` (the closed form). Every run: SGD momentum 0.9 (SAM: over the same SGD,
ρ = 0.05), batch 32, cosine schedule, the given epochs and peak learning rates, seeds
(the seed changes the batch order). Settings:

* ``plain``: λ = 0;
* ``FAM full``: the exact Lemma 1 gradient, with the default clipping (global norm 1.0);
* ``FAM full, no clip``: the same without clipping (the old default);
* ``FAM detached``: the published code's gradient (Hessian held constant), clipped at 1.0;
* ``SAM``: ρ = 0.05, λ = 0;

each FAM setting at λ ∈ {0.1, 1, 10}; and ``FAM full λ=auto`` (λ for a step ratio
R = 0.003 at step 0), with and without clipping. A run that the divergence guard stops counts as
diverged and is left out of the means. Per setting: test accuracy, test loss, κ and κ̃
(Theorem 4, ``relative_flatness_normalized``) of ``fc`` on the training set, ``‖W‖²`` of
``fc``, the step ratio R at step 0, and κ of the temperature-matched start (the starting
model with its logits scaled to the run's final train loss), as mean ± std over seeds.

A second part follows one unclipped FAM run of the MLP (λ = 0.1, lr 1e-3, constant) step
by step: the norms of the data-loss gradient and of λ∇κ per parameter group, the
full-data train loss and κ, and ‖W_fc‖². It is repeated with clipping at 1.0.

Writes ``fam_study.csv`` (one row per run), ``fam_study.md`` (the tables), and replaces
the tables between the markers ``<!-- fam_study -->`` / ``<!-- /fam_study -->`` and
``<!-- fam_gradnorms -->`` / ``<!-- /fam_gradnorms -->`` in ``docs/finetune.md``.
Run with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flatcli.checkpoints import load_checkpoint
from flatcli.data import fit_inputs, load_data
from flatcli.fam import FAMRegularizer
from flatcli.finetune import Diverged, finetune
from flatcli.losses import per_sample_loss
from flatcli.measures.relative_flatness import layer_measures

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "digits MLP": ROOT / "sample_models" / "digits_mlp.safetensors",
    "digits CNN": ROOT / "sample_models" / "digits_cnn.safetensors",
}
LAMBDAS = (0.1, 1.0, 10.0)
COMMON = {"momentum": 0.9, "batch_size": 32, "schedule": "cosine", "device": "cpu"}
METRICS = (
    "lambda_used",
    "test_accuracy",
    "test_loss",
    "kappa",
    "kappa_tilde",
    "weight_sq",
    "ratio0",
    "kappa_t",
)


def settings() -> list[tuple[str, dict]]:
    # plain and SAM unclipped, as when this table was measured (0.1 clipped plain runs too)
    grid: list[tuple[str, dict]] = [("plain", {"fam_lambda": 0.0, "clip_grad_norm": 0})]
    for label, extra in (
        ("FAM full", {}),
        ("FAM full, no clip", {"clip_grad_norm": 0}),
        ("FAM detached", {"fam_gradient": "detached"}),
    ):
        grid += [(f"{label} λ={lam:g}", {"fam_lambda": lam, **extra}) for lam in LAMBDAS]
    grid.append(("FAM full λ=auto", {"fam_lambda": "auto"}))
    grid.append(("FAM full λ=auto, no clip", {"fam_lambda": "auto", "clip_grad_norm": 0}))
    sam = {"fam_lambda": 0.0, "optimizer": "sam", "sam_rho": 0.05, "clip_grad_norm": 0}
    grid.append(("SAM ρ=0.05", sam))
    return grid


def train_data(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    ck = load_checkpoint(path)
    data = load_data("digits")
    return fit_inputs(data.x, ck.model, ck.input_shape).float(), data.y


def one_run(path: Path, lr: float, seed: int, epochs: int, kwargs: dict, tmp: Path) -> dict:
    out = tmp / "run.safetensors"
    row: dict = {"diverged": False}
    try:
        r = finetune(path, epochs=epochs, lr=lr, seed=seed, out_path=out, **COMMON, **kwargs)
    except Diverged as e:
        row.update(diverged=True, epoch=e.epoch, reason=e.reason)
        return row
    x, y = train_data(path)
    tilde = layer_measures(r.model, "fc", (x, y), method="exact", normalize=True)
    t = r.temperature_matched
    row.update(
        test_accuracy=r.after["test_accuracy"].value,
        test_loss=r.after["test_loss"].value,
        kappa=r.after["relative_flatness"].value,
        kappa_start=r.before["relative_flatness"].value,
        kappa_tilde=tilde["relative_flatness_normalized"].value,
        weight_sq=r.after["weight_norm"].value,
        train_loss=r.after["train_loss"].value,
        ratio0=r.hparams["fam_step_ratio"],
        lambda_used=r.hparams["fam_lambda_used"],
        kappa_t=None if t is None else t["relative_flatness"].value,
        temperature_c=r.temperature_c,
    )
    return row


def start_row(model: str, path: Path) -> dict:
    """The starting model's measures, as a row of the study."""
    ck = load_checkpoint(path)
    net = ck.model.float().eval()
    x, y = train_data(path)
    test = load_data("digits", split="test")
    tx = fit_inputs(test.x, net, ck.input_shape).float()
    m = layer_measures(net, "fc", (x, y), method="exact", normalize=True)
    with torch.no_grad():
        out = net(tx)
    return {
        "model": model,
        "lr": math.nan,
        "setting": "start",
        "seed": 0,
        "diverged": False,
        "test_accuracy": float((out.argmax(-1) == test.y).double().mean()),
        "test_loss": float(per_sample_loss(out, test.y, "cross_entropy").double().mean()),
        "kappa": m["relative_flatness"].value,
        "kappa_start": m["relative_flatness"].value,
        "kappa_tilde": m["relative_flatness_normalized"].value,
        "weight_sq": m["weight_norm"].value,
        "train_loss": m["train_loss"].value,
    }


def study(epochs: int, lrs: list[float], seeds: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, path in MODELS.items():
            rows.append(start_row(model, path))
            for lr in lrs:
                for label, kwargs in settings():
                    for seed in seeds:
                        t0 = time.perf_counter()
                        row = {"model": model, "lr": lr, "setting": label, "seed": seed}
                        row.update(one_run(path, lr, seed, epochs, kwargs, Path(tmp)))
                        row["seconds"] = round(time.perf_counter() - t0, 2)
                        rows.append(row)
                        print(row, flush=True)
    return rows


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.4g} ± {s:.2g}"


def table(rows: list[dict]) -> str:
    head = (
        "| model | lr | setting | λ used | test acc | test loss | κ | κ̃ | ‖W‖² | R₀ "
        "| κ temp.-matched | diverged |\n|" + " --- |" * 12 + "\n"
    )
    lines = []
    keys = list(dict.fromkeys((r["model"], r["lr"], r["setting"]) for r in rows))
    for model, lr, setting in keys:
        group = [
            r
            for r in rows
            if (r["model"], r["setting"]) == (model, setting)
            and (r["lr"] == lr or (math.isnan(r["lr"]) and math.isnan(lr)))
        ]
        ok = [r for r in group if not r["diverged"]]
        cells = [mean_std([r[k] for r in ok if r.get(k) is not None]) for k in METRICS]
        diverged = sum(r["diverged"] for r in group)
        lr_cell = "" if math.isnan(lr) else f"{lr:g}"
        runs = "" if setting == "start" else f"{diverged}/{len(group)}"
        row = " | ".join([model, lr_cell, setting, *cells, runs])
        lines.append(f"| {row} |")
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- gradient norms


def gradient_norms(lam: float, lr: float, steps: int, clip: float | None) -> str:
    """Step-by-step norms of ∇E and λ∇κ per parameter group, one unclipped (or clipped) run."""
    path = MODELS["digits MLP"]
    net = load_checkpoint(path).model.float()
    x, y = train_data(path)
    reg = FAMRegularizer(net, "fc")
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    names = [n for n, _ in net.named_parameters()]
    params = list(net.parameters())
    groups = list(dict.fromkeys(n.split(".")[0] for n in names))
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    batches = [order[i : i + 32] for i in range(0, len(y), 32)]
    log_at = {0, 1, 2, 5, 10, 20, 30, 50, 100, 200, steps - 1}
    lines = []
    for step in range(steps):
        idx = batches[step % len(batches)]
        net.train()
        out, cut = reg.forward(x[idx])
        e = per_sample_loss(out, y[idx], "cross_entropy").mean()
        k = reg.penalty(cut, y[idx])
        g_e = torch.autograd.grad(e, params, retain_graph=True)
        g_k = torch.autograd.grad(lam * k, params)
        if step in log_at:
            with torch.no_grad():
                net.eval()
                full_e = float(per_sample_loss(net(x), y, "cross_entropy").mean())
                full_k = float(reg(x, y))
                w_sq = float(net.fc.weight.pow(2).sum())
            per = []
            for g in groups:
                ge, gk = (group_norm(names, grads, g) for grads in (g_e, g_k))
                per.append(f"{ge:.2g} / {gk:.2g} ({gk / ge if ge else math.inf:.3g}×)")
            cells = [str(step), f"{full_e:.3g}", f"{full_k:.4g}", f"{w_sq:.4g}", *per]
            lines.append("| " + " | ".join(cells) + " |")
        for p, a, b in zip(params, g_e, g_k, strict=True):
            p.grad = a + b
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
    head = (
        "| step | train loss (all) | κ (all) | ‖W_fc‖² | "
        + " | ".join(f"{g}: ‖∇E‖ / ‖λ∇κ‖" for g in groups)
        + " |\n|"
        + " --- |" * (4 + len(groups))
        + "\n"
    )
    clipping = "no clipping" if clip is None else f"clipped at {clip:g}"
    title = f"λ = {lam:g}, lr {lr:g}, constant, {clipping}"
    return f"**{title}**\n\n" + head + "\n".join(lines) + "\n"


def group_norm(names: list[str], grads: tuple[torch.Tensor, ...], group: str) -> float:
    """The norm of the gradients of the parameters named ``group.*``."""
    pairs = zip(names, grads, strict=True)
    return math.sqrt(sum(float(t.pow(2).sum()) for n, t in pairs if n.startswith(group + ".")))


def replace_between(text: str, tag: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {tag} -->\n).*?(<!-- /{tag} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"docs/finetune.md has no <!-- {tag} --> markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lrs", default="1e-3,1e-2")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=120, help="steps of the gradient-norm runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lrs = [float(v) for v in args.lrs.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    norms = "\n".join(gradient_norms(0.1, 1e-3, args.steps, c) for c in (None, 1.0))
    print(norms, flush=True)
    rows = study(args.epochs, lrs, seeds)
    first = ("model", "lr", "setting", "seed")
    fields = sorted({k for r in rows for k in r}, key=lambda k: (k not in first, k))
    with open(args.out / "fam_study.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    summary = table(rows)
    elapsed = time.perf_counter() - t0
    summary += (
        f"\n{len(rows)} runs, {args.epochs} epochs each, seeds {args.seeds}; "
        f"{elapsed / 60:.1f} min on 1 thread.\n"
    )
    print(summary)
    (args.out / "fam_study.md").write_text(summary + "\n" + norms, encoding="utf-8")
    doc = args.out / "finetune.md"
    if doc.is_file():
        text = replace_between(doc.read_text(encoding="utf-8"), "fam_study", summary)
        text = replace_between(text, "fam_gradnorms", norms)
        doc.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
