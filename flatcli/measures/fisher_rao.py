r"""Fisher-Rao norm (Liang et al. 2019); conventions in docs/measures.md.

.. math::

    \|\theta\|_{\mathrm{fr}}^2 = \frac1n \sum_{i=1}^n \langle \theta, \nabla_\theta \ell_i \rangle^2

References:
    Liang, Poggio, Rakhlin, Stokes. *Fisher-Rao Metric, Geometry, and Complexity of
    Neural Networks.* AISTATS 2019. https://arxiv.org/abs/1711.01530

    Jiang, Neyshabur, Mobahi, Krishnan, Bengio. *Fantastic Generalization Measures and
    Where to Find Them.* ICLR 2020. https://arxiv.org/abs/1912.02178
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import distributed
from ..autodiff import SecondOrder
from ..errors import UsageError
from ..features import ModelInput, batch_len, call_model
from ..losses import check_loss, per_sample_loss
from .estimate import Estimate
from .params import FlatParams, batches_for, empty_data, evaluating, fixed_params, select_params

FR_LABELS = ("true", "model")
"""``--fr-labels``: the data's labels (empirical Fisher) or the model's softmax."""


def fisher_rao(
    model: nn.Module,
    data: Any,
    *,
    loss: str = "cross_entropy",
    params: str = "all",
    include_bias: bool = False,
    batch_size: int = 256,
    labels: str = "true",
) -> Estimate:
    r"""Fisher-Rao norm of the weights, the general definition of Liang et al. (2019).

    .. math:: \mathrm{FR} = \frac1n \sum_{i=1}^n \langle \theta, \nabla_\theta \ell_i \rangle^2

    :math:`\langle \theta, \nabla_\theta \ell_i \rangle` is the directional derivative of
    :math:`\ell_i` along :math:`\theta` itself, so one forward-mode JVP of the
    *unreduced* per-sample losses, with tangent :math:`\theta`, gives all ``n`` of them
    at once (per batch). No extra :math:`(d+1)^2` factor (Jiang et al.'s code multiplies
    by one).

    :math:`\theta` is every trainable parameter selected by ``params`` whose name does not
    end in ``bias`` (unless ``include_bias``). Normalization-layer scales (a BatchNorm's
    ``weight``) therefore count as weights: they multiply like weights, and the norm's
    invariances (docs/measures.md, "Invariances") are only exact for bias- and
    normalization-free ReLU networks anyway.

    For a bias-free ReLU network with ``K`` weight layers and cross-entropy, Euler's
    theorem gives :math:`\langle\theta, \nabla\ell_i\rangle = K(\langle
    \mathrm{softmax}(f_i), f_i\rangle - f_{i,y_i})` (Liang et al. write ``L + 1`` for
    ``K``); the tests check this closed form against this function.

    Args:
        model: The network.
        data: ``(x, y)`` tensors, a DataLoader, or :class:`~flatcli.data.Batches`.
        loss: ``cross_entropy`` or ``mse``.
        params: ``"all"``, a module name, or a parameter name.
        include_bias: Count biases as weights too.
        batch_size: Batch size when ``data`` is in memory.
        labels: ``true`` (default): ``ℓ_i`` is the loss at the data's label, the
            *empirical* Fisher-Rao norm. ``model``: the exact expectation over labels
            drawn from the model's own softmax, :math:`\frac1n\sum_i
            \mathbb{E}_{y\sim p_i}\langle\theta,\nabla_\theta\ell(f_i, y)\rangle^2`
            (Liang et al.'s model Fisher). With :math:`u_i = \partial_\theta f_i[\theta]`
            (one JVP of the outputs), :math:`\langle\theta,\nabla\ell(f_i,y)\rangle =
            \langle p_i, u_i\rangle - u_{iy}`, so the expectation is the variance of
            :math:`u_i` under :math:`p_i`: O(n·classes) on top of the JVP.
            Cross-entropy only.

    Returns:
        An exact :class:`Estimate` (``stderr`` None); ``details["parameters"]`` is
        :math:`|\theta|`.
    """
    loss = check_loss(loss)
    if labels not in FR_LABELS:
        raise UsageError(f"--fr-labels must be one of {', '.join(FR_LABELS)}, got {labels!r}")
    if labels == "model" and loss != "cross_entropy":
        raise UsageError("--fr-labels model needs --loss cross_entropy (a softmax over labels)")
    names = select_params(model, params, include_bias=include_bias)
    batches = batches_for(model, data, batch_size=batch_size)
    with evaluating(model), torch.no_grad():
        flat = FlatParams.of(model, names)
        theta = flat.vector(model)
        fixed = fixed_params(model, flat)
        total, n = 0.0, 0
        ad = SecondOrder()
        for x, y in batches:

            def outputs(t: torch.Tensor, x: ModelInput = x) -> torch.Tensor:
                return call_model(model, x, {**fixed, **flat.unflatten(t)})

            if labels == "true":

                def losses(t: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                    return per_sample_loss(outputs(t), y, loss)

                _, along_theta = _jvp_along(ad, losses, theta)
                total += float(along_theta.double().pow(2).sum())
            else:
                out, u = _jvp_along(ad, outputs, theta)
                p, u = torch.softmax(out.double(), dim=-1), u.double()
                total += float(((p * u * u).sum(-1) - (p * u).sum(-1) ** 2).sum())
            n += batch_len(x)
    total, n = distributed.sum_floats(batches, total, n)
    if n == 0:
        raise empty_data()
    biases = "biases included" if include_bias else "biases excluded"
    variant = (
        "empirical: true labels"
        if labels == "true"
        else "model: exact expectation over the softmax's labels"
    )
    return Estimate(
        total / n,
        None,
        f"exact ({_jvp_words(ad.mode)}, {biases}; {variant})",
        {"parameters": flat.size, "labels": labels},
    )


def _jvp_along(
    ad: SecondOrder, fn: Any, theta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(θ), J_fn(θ) θ)``: one forward-mode JVP, or double backward where an op has none."""

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.func.jvp(fn, (theta,), (theta,))

    def reverse() -> tuple[torch.Tensor, torch.Tensor]:
        # u ↦ Jᵀu is linear in u, and its vjp with cotangent θ is J θ.
        values, pullback = torch.func.vjp(fn, theta)
        u0 = torch.zeros_like(values)
        return values, torch.func.vjp(lambda u: pullback(u)[0], u0)[1](theta)[0]

    return ad(forward, reverse)


def _jvp_words(mode: str) -> str:
    """How the JVP was taken, for the method string (:mod:`flatcli.autodiff` modes)."""
    how = "JVP by double backward" if mode.startswith("reverse") else "forward-mode JVP"
    return how + " along θ" + ("; SDPA math kernel" if "SDPA" in mode else "")
