"""Make the bundled sample checkpoints deterministically.

    python sample_models/make_samples.py

Trains two small networks on the bundled UCI digits (train split, 1,297 images) to
near-zero training loss and writes flatcli safetensors checkpoints whose metadata
names the architecture and data, so ``flatcli measure sample_models/digits_mlp.safetensors``
needs no flags.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from flatcli import archs
from flatcli.checkpoints import save_checkpoint
from flatcli.data import load_data

HERE = Path(__file__).resolve().parent


def train(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    """Plain SGD with momentum, seeded shuffling."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def main() -> None:
    torch.use_deterministic_algorithms(True)
    train_set = load_data("digits", split="train")
    test_set = load_data("digits", split="test")
    specs = {
        "digits_mlp": ("mlp", {"in_features": 64, "hidden": [64, 32], "num_classes": 10}, [64]),
        "digits_cnn": (
            "cnn",
            {
                "in_channels": 1,
                "channels": [8, 16],
                "hidden": 32,
                "num_classes": 10,
                "image_size": 8,
            },
            [1, 8, 8],
        ),
    }
    for name, (arch, kwargs, shape) in specs.items():
        torch.manual_seed(0)
        model = getattr(archs, arch)(**kwargs)
        x = train_set.x.reshape(len(train_set), *shape)
        train(model, x, train_set.y, epochs=60, lr=0.05, batch_size=32, seed=0)
        model.eval()
        with torch.no_grad():
            tr = F.cross_entropy(model(x), train_set.y).item()
            xt = test_set.x.reshape(len(test_set), *shape)
            acc = (model(xt).argmax(1) == test_set.y).float().mean().item()
        save_checkpoint(
            model,
            HERE / f"{name}.safetensors",
            arch=f"flatcli.archs:{arch}",
            arch_kwargs=kwargs,
            data="digits",
            loss="cross_entropy",
            input_shape=tuple(shape),
            hparams={"epochs": 60, "lr": 0.05, "batch_size": 32, "seed": 0},
        )
        print(f"{name}: train loss {tr:.2e}, test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
