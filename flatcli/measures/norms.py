r"""Norm-based measures (Jiang et al. 2020, §C.2–C.3), docs/measures.md.

Weight layers are ``nn.Linear`` and ``nn.Conv1d/2d/3d``; their weights (biases excluded)
are reshaped to ``(out, −1)`` matrices :math:`W_l`. A weight shared by several layers
counts once, under its first module name.

References:
    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. *Fantastic Generalization Measures and
    Where to Find Them.* ICLR 2020. https://arxiv.org/abs/1912.02178

    Neyshabur, Tomioka, Srebro. *Norm-Based Capacity Control in Neural Networks.*
    COLT 2015. https://arxiv.org/abs/1503.00036 (path norm)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import FlatcliError
from .estimate import Estimate
from .params import evaluating, select_params

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def weight_matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{module name: weight reshaped to (out, −1)}``, detached, in float64.

    Raises:
        FlatcliError: The model has no ``nn.Linear`` or ``nn.Conv`` layer.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, WEIGHT_LAYERS) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            w = module.weight.detach().double()
            out[name] = w.reshape(w.shape[0], -1)
    if not out:
        raise FlatcliError("the model has no nn.Linear or nn.Conv layers to take norms of")
    return out


def frobenius_norms(model: nn.Module) -> Estimate:
    r"""Sum of squared per-layer Frobenius norms, with the per-layer norms and their log-product.

    .. math::

        \sum_l \|W_l\|_F^2, \qquad \text{details: } \|W_l\|_F \text{ per layer},\
        \sum_l \log \|W_l\|_F

    Jiang et al.'s ``log_prod_of_fro`` is :math:`\sum_l \log\|W_l\|_F^2`, twice ours.
    """
    norms = {name: float(torch.linalg.matrix_norm(w)) for name, w in weight_matrices(model).items()}
    return _layer_estimate(norms, "Frobenius")


def spectral_norms(model: nn.Module) -> Estimate:
    r"""Sum of squared per-layer spectral norms (largest singular value, by SVD).

    .. math:: \sum_l \|W_l\|_2^2, \qquad \text{details: } \|W_l\|_2,\ \sum_l \log\|W_l\|_2

    A convolution kernel is reshaped to ``(out, c·k·k)``; that matrix's spectral norm is
    not the operator norm of the convolution (Jiang et al.'s ``*_fft`` measures compute
    the latter; flatcli does not).
    """
    matrices = weight_matrices(model)
    norms = {name: float(torch.linalg.matrix_norm(w, ord=2)) for name, w in matrices.items()}
    return _layer_estimate(norms, "spectral")


def _layer_estimate(norms: dict[str, float], kind: str) -> Estimate:
    log_product = math.fsum(math.log(v) if v > 0 else -math.inf for v in norms.values())
    return Estimate(
        math.fsum(v**2 for v in norms.values()),
        None,
        f"exact: sum over {len(norms)} weight layers of squared {kind} norms",
        {"per_layer": norms, "log_product": log_product},
    )


def path_norm(model: nn.Module, input_shape: Sequence[int]) -> Estimate:
    r"""Path norm: square every parameter, feed an all-ones input, sum the outputs.

    .. math:: \sum_{\text{paths } x_j \to \text{out}_k} \prod_{e \in \text{path}} w_e^2

    For a ReLU network of Linear/Conv layers this is the squared :math:`\ell_2` path norm
    of Neyshabur et al. (2015) (``details["sqrt"]`` is the norm itself); biases count as
    paths that start at a constant-1 input. Max pooling picks one path instead of
    summing, and normalization layers in eval mode apply their running statistics to
    squared weights, so for such networks the number is Jiang et al.'s measure, not a
    sum over paths. Runs on a float64 deep copy: the caller's model is never modified.

    Args:
        model: The network.
        input_shape: Shape of one input sample (no batch dimension).
    """
    squared = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in squared.parameters():
            p.pow_(2)
        with evaluating(squared):
            out = squared(torch.ones(1, *input_shape, dtype=torch.float64))
    if not isinstance(out, torch.Tensor):
        raise FlatcliError(f"the model must return a tensor; it returned {type(out).__name__}")
    value = float(out.sum())
    return Estimate(
        value,
        None,
        "exact: squared parameters, all-ones input, sum of outputs",
        {"sqrt": math.sqrt(value) if value >= 0 else math.nan},
    )


def parameter_distance_squared(
    model: nn.Module, init_model: nn.Module, names: Sequence[str]
) -> float:
    r""":math:`\sum_{\text{name}} \|\theta - \theta_0\|^2` over ``names``, in float64.

    Raises:
        FlatcliError: ``init_model`` lacks a parameter or has one of another shape.
    """
    return math.fsum(d**2 for d in _distances(model, init_model, names).values())


def _distances(model: nn.Module, init_model: nn.Module, names: Sequence[str]) -> dict[str, float]:
    params = dict(model.named_parameters())
    init = dict(init_model.named_parameters(remove_duplicate=False))
    out = {}
    for name in names:
        if name not in init:
            raise FlatcliError(f"the initial model has no parameter {name!r}")
        p, p0 = params[name].detach().double(), init[name].detach().double().to(params[name].device)
        if p.shape != p0.shape:
            raise FlatcliError(
                f"{name} has shape {tuple(p.shape)} but {tuple(p0.shape)} in the initial model"
            )
        out[name] = float((p - p0).norm())
    return out


def distance_from_init(model: nn.Module, init_model: nn.Module) -> Estimate:
    r"""Euclidean distance of all trainable parameters from an initial checkpoint.

    .. math:: \|\theta - \theta_0\|_2 = \Bigl(\sum_j (\theta_j - \theta_{0,j})^2\Bigr)^{1/2}

    Parameters are matched by name; biases and normalization parameters are included
    (Jiang et al.'s port, ``l2.dist``, leaves them out: 0.5% less on the bundled digits MLP,
    docs/measures.md). ``details["per_parameter"]`` has each tensor's distance.
    """
    per = _distances(model, init_model, select_params(model, "all"))
    return Estimate(
        math.sqrt(math.fsum(d**2 for d in per.values())),
        None,
        f"exact: ‖θ − θ₀‖ over {len(per)} parameter tensors",
        {"per_parameter": per},
    )
