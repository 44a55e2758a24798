r"""Exact Hessian trace of a piecewise-linear network, from its Gauss-Newton diagonal.

The Hessian of the mean loss splits into the Gauss-Newton part and a residual,

.. math::

    H = \frac1n \sum_i J_i^\top \nabla^2_f \ell_i\, J_i
        + \frac1n \sum_i \sum_c \frac{\partial \ell_i}{\partial f_c}\,
          \nabla^2_\theta f_c(x_i),

with :math:`J_i` the Jacobian of sample :math:`i`'s logits in the parameters. When the
logits are linear in every *single* parameter — every weight enters once, through an
``nn.Linear``, a convolution or an eval-mode BatchNorm, and everything after it is
piecewise linear (ReLU-type activations, max and average pooling, sums, flattening) —
each :math:`\partial^2 f_c / \partial\theta_j^2` is zero (almost everywhere, and in
autograd's own convention at the kinks), so the diagonals agree and

.. math::

    \mathrm{Tr}\,H = \mathrm{Tr}\,G = \frac1n \sum_i \sum_c \|J_i^\top l_{ic}\|^2,
    \qquad L_i L_i^\top = \nabla^2_f \ell_i,

with :math:`l_{ic} = \sqrt{p_{ic}}\,(e_c - p_i)` for softmax cross-entropy (its factor
:math:`\mathrm{diag}(p) - pp^\top`) and :math:`\sqrt{2/C}\,e_c` for MSE. Each term is
a per-sample vector-Jacobian product: one forward pass per chunk of samples and ``C``
pullbacks, vmapped (``torch.func``). The value is exact — no probes, no standard error —
at the cost of about ``C`` per-sample backward passes over the data, whatever the number
of parameters (BackPACK's ``DiagGGNExact`` computes the same diagonal with its own
per-layer rules).

References:
    Martens. *New insights and perspectives on the natural gradient method.* JMLR 2020
    (the Gauss-Newton matrix and its factorization through the loss Hessian).

    Dangel, Kunstner, Hennig. *BackPACK: Packing more into backprop.* ICLR 2020.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..data import Batches, take
from ..errors import FlatcliError
from ..features import ModelInput, batch_len, call_model
from ..losses import per_sample_loss
from .budget import activation_bytes, format_bytes, row_chunks, rows_of
from .estimate import Estimate
from .params import FlatParams, empty_data, fixed_params

LINEAR_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)
"""Layers whose output is linear in each of their parameters (BatchNorm in eval mode,
with running statistics)."""
PIECEWISE_LINEAR: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Hardtanh,  # and ReLU6
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
"""Parameter-free modules that are piecewise linear in their input (in eval mode)."""
_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    operator.add,
    operator.sub,
    operator.neg,
    operator.getitem,
    getattr,
    torch.add,
    torch.sub,
    torch.relu,
    torch.flatten,
    torch.cat,
    torch.mean,
    torch.sum,
    F.relu,
    F.leaky_relu,
    F.hardtanh,
    F.relu6,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
)
_METHODS = (
    "relu", "add", "sub", "neg", "flatten", "view", "reshape", "contiguous", "size", "mean",
    "sum", "permute", "transpose", "squeeze", "unsqueeze",
)  # fmt: skip
MAX_CLASSES = 1000
"""``hessian_trace(method="auto")`` takes this route for at most this many logits."""


def piecewise_linear_network(model: nn.Module) -> bool:
    """True when the logits are linear in every single parameter (module docstring).

    Read from the structure (a ``torch.fx`` trace of the whole model), conservatively:
    only the layers of :data:`LINEAR_LAYERS`, each called once, with untied parameters;
    only the parameter-free modules of :data:`PIECEWISE_LINEAR`; only sums, indexing,
    reshaping, concatenation, means and the piecewise-linear functions between them. A
    model that does not trace, or uses anything else, is not claimed.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    if len(named) != len({id(p) for _, p in named}):
        return False  # a tied weight enters twice
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: no claim
        return False
    called: set[str] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module":
            if node.target in called or not _known_module(gm.get_submodule(str(node.target))):
                return False
            called.add(str(node.target))
        elif node.op == "call_function":
            if node.target not in _FUNCTIONS:
                return False
        elif node.op == "call_method":
            if node.target not in _METHODS:
                return False
        else:  # get_attr: a parameter or buffer used by a function, not by its layer
            return False
    return True


def _known_module(module: nn.Module) -> bool:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return module.running_var is not None  # else batch statistics even in eval mode
    return isinstance(module, (*LINEAR_LAYERS, *PIECEWISE_LINEAR))


def gauss_newton_trace(
    model: nn.Module,
    batches: Batches,
    loss: str,
    names: list[str],
    *,
    budget: int,
    note: str = "",
    outputs: list[torch.Tensor] | None = None,
) -> Estimate:
    r"""Exact :math:`\mathrm{Tr}\,H` over ``names`` as :math:`\mathrm{Tr}\,G` (module docstring).

    Call inside :func:`~flatcli.measures.params.evaluating` and only on a model for
    which :func:`piecewise_linear_network` holds. Per-sample gradients are taken for
    ``rows`` samples and ``classes`` logits at a time, so that they fit ``budget``
    bytes (about ``3 · rows · classes · p`` parameter-sized numbers at once). The logits
    of every chunk are appended to ``outputs`` when given.
    """
    flat = FlatParams.of(model, names)
    theta = flat.vector(model)
    others = {**fixed_params(model, flat), **dict(model.named_buffers())}
    x, y = batches.first()
    classes = int(call_model(model, take(x, slice(0, 1))).shape[-1])
    rows, per_call = _plan(model, x, y, loss, theta, classes, budget)

    def logits(t: torch.Tensor, xi: ModelInput) -> torch.Tensor:
        one = {k: v.unsqueeze(0) for k, v in xi.items()} if isinstance(xi, Mapping) else xi[None]
        return call_model(model, one, {**others, **flat.unflatten(t)})[0]

    chunk = None if per_call >= classes else per_call

    def per_sample(xi: ModelInput, factors: torch.Tensor) -> torch.Tensor:
        _, pullback = torch.func.vjp(lambda t: logits(t, xi), theta)
        g = torch.func.vmap(lambda v: pullback(v)[0], chunk_size=chunk)(factors)
        return torch.linalg.vecdot(g, g)  # ‖J_iᵀ l_ic‖² for each c: (C,)

    total, n = torch.zeros((), dtype=torch.float64), 0
    for xc, yc in row_chunks(batches, rows):
        out = call_model(model, xc)
        if outputs is not None:
            outputs.append(out)
        factors = loss_factors(out, yc, loss).to(out.dtype)
        total += torch.func.vmap(per_sample)(xc, factors).double().sum().cpu()
        n += batch_len(xc)
    total = distributed.sum_over_shards(batches, total)
    n = int(distributed.sum_floats(batches, n)[0])
    if n == 0:
        raise empty_data()
    how = f"{classes} per-sample backward passes"
    if rows < rows_of(x):
        how += f", {rows} samples at a time"
    method = (
        "exact (Gauss-Newton diagonal: the network is piecewise linear in each parameter, "
        f"so diag H = diag G; {how}{note})"
    )
    details = {
        "parameters": flat.size,
        "classes": classes,
        "engine": "gauss_newton",
        "chunk_rows": rows,
        "max_memory": budget,
    }
    return Estimate(float(total) / n, None, method, details)


def loss_factors(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    r"""``L_i`` with :math:`L_i L_i^\top = \nabla^2_f \ell_i`, as rows: ``(n, C, C)``.

    Softmax cross-entropy: row ``c`` is :math:`\sqrt{p_{ic}}(e_c - p_i)` (computed in
    float64); MSE (``ℓ = ‖f − t‖²/C``): :math:`\sqrt{2/C}\, e_c`, whatever ``y``.
    """
    n, c = out.shape
    eye = torch.eye(c, dtype=torch.float64, device=out.device)
    if loss == "mse":
        return (math.sqrt(2 / c) * eye).expand(n, c, c)
    p = torch.softmax(out.double(), dim=-1)
    return (eye[None] - p[:, None, :]) * p.sqrt()[:, :, None]


def _plan(
    model: nn.Module,
    x: Any,
    y: torch.Tensor,
    loss: str,
    theta: torch.Tensor,
    classes: int,
    budget: int,
) -> tuple[int, int]:
    """Samples per chunk and logits per vmapped pullback that fit ``budget``.

    A sample's pullbacks hold ``per_call`` parameter-sized gradients (and their squares)
    and about twice its activations per logit.
    """
    acts = activation_bytes(
        lambda _t, xx, yy: per_sample_loss(call_model(model, xx), yy, loss).sum(),  # type: ignore[arg-type]
        model,
        x,
        y,
    )
    grad_bytes = 3.0 * theta.numel() * theta.element_size()
    per_call = max(1, min(classes, int(budget // 2 // grad_bytes)))
    per_row = per_call * grad_bytes + 2 * (1 + per_call) * acts.per_row
    if acts.fixed + per_row > budget:
        raise FlatcliError(
            f"--max-memory {format_bytes(budget)} is below what one sample's per-sample "
            f"gradients need (about {format_bytes(acts.fixed + per_row)}); raise --max-memory"
        )
    return max(1, int((budget - acts.fixed) // per_row)), per_call
