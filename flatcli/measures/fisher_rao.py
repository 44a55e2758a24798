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

from ..errors import UsageError
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
        for x, y in batches:

            def outputs(t: torch.Tensor, x: torch.Tensor = x) -> torch.Tensor:
                return torch.func.functional_call(model, {**fixed, **flat.unflatten(t)}, (x,))

            if labels == "true":

                def losses(t: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                    return per_sample_loss(outputs(t), y, loss)

                _, along_theta = torch.func.jvp(losses, (theta,), (theta,))
                total += float(along_theta.double().pow(2).sum())
            else:
                out, u = torch.func.jvp(outputs, (theta,), (theta,))
                p, u = torch.softmax(out.double(), dim=-1), u.double()
                total += float(((p * u * u).sum(-1) - (p * u).sum(-1) ** 2).sum())
            n += int(x.shape[0])
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
        f"exact (forward-mode JVP along θ, {biases}; {variant})",
        {"parameters": flat.size, "labels": labels},
    )
