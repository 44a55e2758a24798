"""The temperature baseline: the starting model at the fine-tuned model's train loss by a
softmax temperature alone (its logits layer scaled by ``c``, found by a root find).

A fine-tuned model with a lower κ may only be more (or less) confident. Scaling the logits
layer's ``W`` and ``b`` by ``c`` changes confidence and κ but not the predictions, so the
starting model scaled to the same train loss shows how much of the change in κ a
temperature alone gives.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..data import take
from ..features import LayerSplit, ModelInput, batch_len, call_model, default_layer
from ..finetune_report import EVAL_BATCH
from ..losses import per_sample_loss
from ..measures.estimate import Estimate


def temperature_scale(
    net: nn.Module, x: ModelInput, y: torch.Tensor, target_loss: float, *, loss: str
) -> tuple[nn.Module, float] | str:
    """The model with its logits layer's ``W`` and ``b`` multiplied by ``c``, at the ``c``
    where its mean training loss equals ``target_loss``.

    Scaling the logits layer by ``c`` is a softmax temperature ``1/c``: predictions stay,
    confidence changes. ``c`` is found by bracketing over ``c ∈ [1e-4, 1e4]`` (log grid,
    outward from 1) and Brent's method (:func:`scipy.optimize.brentq`, relative tolerance
    1e-10 in ``log c``).

    Returns:
        ``(scaled copy, c)``, or a one-line reason when there is no such ``c``: the loss is
        not cross-entropy, the last ``nn.Linear`` does not produce the output, or no ``c``
        in the range reaches ``target_loss``.
    """
    from scipy.optimize import brentq

    if loss != "cross_entropy":
        return "defined for cross-entropy only"
    head = default_layer(net)
    split = LayerSplit(net, head)
    was_training = net.training
    net.eval()
    if split.mechanism == "hook" and batch_len(x) > 0:  # a Hugging Face head shows itself
        with torch.no_grad():  # only when run (LayerSplit.run)
            split.run(take(x, slice(0, 2)))
    if split.kind != "linear" or not split.produces_output or split.tied:
        net.train(was_training)
        return f"the last nn.Linear ({head}) does not produce the logits"
    with torch.no_grad():
        n = batch_len(x)
        chunks = [slice(lo, lo + EVAL_BATCH) for lo in range(0, n, EVAL_BATCH)]
        logits = torch.cat([call_model(net, take(x, s)) for s in chunks])
    net.train(was_training)
    logits = logits.double()

    def gap(log_c: float) -> float:
        mean = per_sample_loss(logits * math.exp(log_c), y, "cross_entropy").mean()
        return float(mean) - target_loss

    at_one = gap(0.0)
    if at_one == 0.0:
        root = 0.0
    else:
        step = 1 if at_one > 0 else -1  # a sharper softmax lowers a fitted model's loss
        pairs = []
        for sign in (step, -step):  # outward from c = 1, the likely side first
            grid = [sign * math.log(10) * k / 4 for k in range(17)]
            pairs += list(zip(grid, grid[1:], strict=False))
        bracket = next(((a, b) for a, b in pairs if gap(a) * gap(b) <= 0), None)
        if bracket is None:
            return f"no temperature in [1e-4, 1e4] reaches train loss {target_loss:.4g}"
        root = brentq(gap, *bracket, xtol=1e-12, rtol=1e-10)
    c = math.exp(root)
    scaled = copy.deepcopy(net)
    layer = dict(scaled.named_modules())[head]
    with torch.no_grad():
        layer.weight.mul_(c)
        if getattr(layer, "bias", None) is not None:
            layer.bias.mul_(c)
    return scaled, c


def temperature_baseline(
    start_net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    after: Mapping[str, Estimate],
    loss: str,
    measures: Callable[[nn.Module], dict[str, Estimate]],
) -> tuple[dict[str, Estimate] | None, float | None, str | None]:
    """The ``measures`` of the starting model at the fine-tuned model's train loss, by a
    temperature alone, with its ``c``; or ``(None, None, why not)``."""
    found = temperature_scale(start_net, x, y, after["train_loss"].value, loss=loss)
    if isinstance(found, str):
        return None, None, found
    scaled, c = found
    scaled.eval()
    return measures(scaled), c, None
