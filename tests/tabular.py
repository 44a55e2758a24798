"""Small tabular models nobody here designed: scikit-learn's wine, breast cancer and iris.

Each data set is standardized (with the training split's mean and std) and split 70/30,
stratified and seeded. :func:`fit_mlp` trains a ReLU MLP with two hidden layers by
full-batch Adam until its train loss first falls to a target: an *under-fitted* start
(0.87 on wine is far from fitted; 0.05 is close to it). :func:`write_start` saves the model
and data as a flatcli checkpoint and ``.npz`` file, so ``flatcli finetune`` reads them with
no flags. Used by the divergence-guard tests and by ``bench/fam_guard_grid.py`` and
``bench/fam_tabular.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatcli import archs
from flatcli.checkpoints import save_checkpoint

DATASETS = ("wine", "breast_cancer", "iris")
HIDDEN = (16, 16)


def dataset(name: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)`` in float64, standardized, 70/30 stratified."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
    mean, std = xa.mean(0), xa.std(0)
    std[std == 0] = 1.0
    return (
        torch.from_numpy((xa - mean) / std),
        torch.from_numpy(ya).long(),
        torch.from_numpy((xb - mean) / std),
        torch.from_numpy(yb).long(),
    )


def fit_mlp(
    name: str,
    target_loss: float,
    *,
    seed: int = 0,
    activation: str = "relu",
    lr: float = 0.01,
    max_steps: int = 5000,
) -> tuple[nn.Module, dict]:
    """A float64 MLP (in → 16 → 16 → classes) trained until its train loss ≤ ``target_loss``.

    Returns the model (eval mode) and its architecture keyword arguments.
    """
    xa, ya, _, _ = dataset(name)
    kwargs = {
        "in_features": xa.shape[1],
        "hidden": list(HIDDEN),
        "num_classes": int(ya.max()) + 1,
        "activation": activation,
    }
    with torch.random.fork_rng():  # nn.Linear's own initialisation, seeded, RNG left alone
        torch.manual_seed(seed)
        net = archs.mlp(**kwargs).double()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(max_steps):
        loss = F.cross_entropy(net(xa), ya)
        if float(loss.detach()) <= target_loss:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), kwargs


def write_start(
    folder: Path, name: str, target_loss: float, *, seed: int = 0, activation: str = "relu"
) -> tuple[Path, Path]:
    """The under-fitted start and its data as files: ``(checkpoint, data.npz)``."""
    folder.mkdir(parents=True, exist_ok=True)
    net, kwargs = fit_mlp(name, target_loss, seed=seed, activation=activation)
    xa, ya, xb, yb = dataset(name)
    data = folder / f"{name}.npz"
    np.savez(data, x=xa.numpy(), y=ya.numpy(), x_test=xb.numpy(), y_test=yb.numpy())
    stem = f"{name}_{activation}_{target_loss:g}_s{seed}"
    ck = save_checkpoint(
        net,
        folder / f"{stem}.safetensors",
        arch="flatcli.archs:mlp",
        arch_kwargs=kwargs,
        data=data.name,
        loss="cross_entropy",
        input_shape=(xa.shape[1],),
    )
    return ck, data
