r"""Parameter selection and the functional plumbing the whole-network measures share.

The curvature and perturbation measures (Hessian trace and top eigenvalue, Fisher-Rao,
PAC-Bayes flatness, sharpness) all look at the network as a function of a chosen set
of parameters, flattened into one vector :math:`\theta \in \mathbb{R}^p`:

* :func:`select_params` turns ``"all"``, a module name or a parameter name into a list
  of parameter names (tied weights appear once, under their first name).
* :class:`FlatParams` flattens and unflattens those parameters.
* :func:`functional_loss` is :math:`\theta \mapsto \sum_i \ell_i(\theta)` on one batch
  (a per-sample **sum**, so that sums over batches divided by ``n`` give the mean
  risk), with every other parameter held fixed and detached.
* Hessian-vector products of such a function come from :mod:`flatcli.autodiff`
  (:func:`~flatcli.autodiff.hvp`, forward-over-reverse, and
  :class:`~flatcli.autodiff.GradientGraph`, reverse-over-reverse on a kept graph).
* :func:`mean_objective` is the training error or mean loss, optionally with
  replaced parameters (the perturbation measures never touch the model's own weights).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .. import distributed
from ..checkpoints import eval_mode
from ..data import Batches, as_batches
from ..errors import FlatcliError, UsageError
from ..features import ModelInput, batch_len, call_model
from ..losses import per_sample_loss

Target = Literal["error", "loss"]
TARGETS = ("error", "loss")


# --------------------------------------------------------------------------- selection


def select_params(model: nn.Module, spec: str = "all", *, include_bias: bool = True) -> list[str]:
    """Names of the trainable parameters that ``spec`` selects.

    Args:
        model: The network.
        spec: ``"all"`` (every trainable parameter), the name of a module from
            ``model.named_modules()`` (its parameters, recursively), or the exact name of
            a parameter.
        include_bias: Keep parameters whose name ends in ``bias``.

    Returns:
        Canonical names (the first name of a tied parameter), in ``named_parameters`` order.

    Raises:
        UsageError: Unknown name (close matches are suggested), or nothing trainable selected.
    """
    chosen = list(model.parameters()) if spec == "all" else _params_named(model, spec)
    ids = {id(p) for p in chosen if p.requires_grad}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    if not include_bias:
        names = [n for n in names if not n.endswith("bias")]
    if not names:
        what = "" if include_bias else " (biases excluded)"
        raise UsageError(f"{spec!r} selects no trainable parameters{what}")
    return names


def _params_named(model: nn.Module, spec: str) -> list[nn.Parameter]:
    params = dict(model.named_parameters(remove_duplicate=False))
    if spec in params:
        return [params[spec]]
    modules = dict(model.named_modules(remove_duplicate=False))
    if spec in modules:
        return list(modules[spec].parameters())
    candidates = [n for n in modules if n] + list(params)
    close = difflib.get_close_matches(spec, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"no parameter or module named {spec!r}{hint} (or use 'all')")


# --------------------------------------------------------------------------- flattening


@dataclass(frozen=True)
class FlatParams:
    """A fixed set of named parameters viewed as one flat vector.

    Attributes:
        names: Parameter names, in order.
        shapes: Their shapes.
        numels: Their sizes; ``sum(numels)`` is the vector length ``p``.
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str]) -> FlatParams:
        """The flattening of ``names`` (as returned by :func:`select_params`)."""
        params = dict(model.named_parameters())
        return cls(
            tuple(names),
            tuple(params[n].shape for n in names),
            tuple(params[n].numel() for n in names),
        )

    @property
    def size(self) -> int:
        """Length ``p`` of the flat vector."""
        return sum(self.numels)

    def vector(self, model: nn.Module) -> torch.Tensor:
        """The model's current values of these parameters, flattened and detached."""
        params = dict(model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: view}`` of a flat vector (differentiable, works under ``torch.func``)."""
        parts = torch.split(theta, list(self.numels))
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}


def fixed_params(model: nn.Module, flat: FlatParams) -> dict[str, torch.Tensor]:
    """Every parameter *not* in ``flat``, detached: held fixed by :func:`functional_loss`."""
    chosen = set(flat.names)
    return {n: p.detach() for n, p in model.named_parameters() if n not in chosen}


def functional_loss(
    model: nn.Module,
    flat: FlatParams,
    x: ModelInput,
    y: torch.Tensor,
    loss: str,
    *,
    fixed: Mapping[str, torch.Tensor] | None = None,
    outputs: list[torch.Tensor] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    r"""The batch's summed loss as a function of the flat parameters.

    .. math:: f(\theta) = \sum_{i \in \text{batch}} \ell_i(\theta)

    Args:
        model: The network (its own parameters are never modified).
        flat: Which parameters :math:`\theta` holds.
        x, y: One batch.
        loss: ``cross_entropy`` or ``mse`` (see :func:`flatcli.losses.per_sample_loss`).
        fixed: The other parameters (default: :func:`fixed_params`).
        outputs: A list each call appends the model's (detached) logits to.
    """
    others = fixed_params(model, flat) if fixed is None else fixed

    def f(theta: torch.Tensor) -> torch.Tensor:
        out = call_model(model, x, {**others, **flat.unflatten(theta)})
        if outputs is not None:
            outputs.append(out.detach())
        return per_sample_loss(out, y, loss).sum()  # type: ignore[arg-type]

    return f


# --------------------------------------------------------------------------- data and mode


def batches_for(model: nn.Module, data: Any, *, batch_size: int = 256) -> Batches:
    """``data`` as :class:`Batches` on the model's device and in its floating dtype."""
    p = next(model.parameters(), None)
    if p is None:
        raise UsageError("the model has no parameters")
    return as_batches(data, batch_size=batch_size, device=p.device, dtype=p.dtype)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (samples independent, dropout off), restoring the caller's mode after."""
    was_training = model.training
    eval_mode(model)
    try:
        yield
    finally:
        if was_training:
            model.train()


def empty_data() -> FlatcliError:
    """The error every measure raises on a dataset with no samples."""
    return FlatcliError("the dataset is empty")


def saturation_warning(
    model: nn.Module,
    batches: Batches,
    loss: str,
    *,
    logits: Iterable[torch.Tensor] | None = None,
) -> str | None:
    r"""A warning when the softmax is saturated on every sample, else None.

    With cross-entropy every curvature term of a sample carries a factor
    :math:`p_j(1-p_j)`, at most :math:`1 - \max_j p_j`. When that is below the float
    resolution of the model's dtype on *every* sample, Hessian (and gradient) measures
    are rounding noise, however small or exactly 0 they print. One forward pass, or none
    when the caller already has the ``logits`` of every batch.
    """
    if loss != "cross_entropy":
        return None
    worst, n = -math.inf, 0
    outputs = logits if logits is not None else (call_model(model, x) for x, _ in batches)
    for out in outputs:
        if out.ndim != 2 or out.shape[1] < 2:
            return None
        top = out.max(-1, keepdim=True).values
        rest = torch.where(out == top, torch.full_like(out, -math.inf), out)
        # log(1 − max p) = logsumexp(the other logits) − logsumexp(all logits)
        gap = torch.logsumexp(rest, -1) - torch.logsumexp(out, -1)
        worst = max(worst, float(gap.max()))
        n += int(out.shape[0])
        eps = torch.finfo(out.dtype).eps
        if worst >= math.log(eps):
            return None
    if n == 0:
        return None
    return (
        f"softmax saturated on all {n} samples (1 − max p < {eps:.1e}, the float "
        "resolution): curvature below float resolution, the value is rounding noise"
    )


def check_target(target: str, y: torch.Tensor) -> None:
    """``target`` is ``error`` or ``loss``, and ``error`` has class labels to count."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "error" and y.is_floating_point():
        raise UsageError(
            "target 'error' (1 − accuracy) needs integer class labels; use target='loss'"
        )


def mean_objective(
    model: nn.Module,
    batches: Batches,
    *,
    target: str,
    loss: str,
    params: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Training error (``1 − accuracy``) or mean loss, and the sample count ``n``.

    Args:
        model: The network, evaluated as it is (call inside :func:`evaluating`).
        batches: The data; summed per sample, divided by ``n`` once at the end.
        target: ``error`` or ``loss``.
        loss: The loss for ``target="loss"``.
        params: Parameters to use instead of the model's own (through
            ``torch.func.functional_call``, so the model itself is never modified).
    """
    total, n = 0.0, 0
    for x, y in batches:
        check_target(target, y)
        out = call_model(model, x, params)
        if target == "error":
            total += float((out.argmax(-1) != y).sum())
        else:
            total += float(per_sample_loss(out, y, loss).double().sum())  # type: ignore[arg-type]
        n += batch_len(x)
    total, n_sum = distributed.sum_floats(batches, total, n)
    n = int(n_sum)
    if n == 0:
        raise empty_data()
    value = total / n
    if not math.isfinite(value):
        raise FlatcliError("the loss is NaN or Inf on this data")
    return value, n
