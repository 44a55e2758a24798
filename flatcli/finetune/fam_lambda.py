"""λ of a fine-tuning run: absolute, relative to the starting loss, in the FAM paper's units,
or ``auto`` (the λ whose relative step R at step 0 is :data:`SAFE_STEP_RATIO`), and the
warnings about it (a large R, a negligible penalty).

The relative step at step 0 is :math:`R = \\frac{lr}{1-\\beta}\\,\\lambda\\,
\\|\\nabla\\kappa_0\\|^2/\\kappa_0` (β the momentum), on up to
:data:`~flatcli.training.GRADIENT_SAMPLES` training samples in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import FlatcliError
from ..fam import FAMRegularizer
from ..measures.estimate import Estimate
from ..training import kappa_gradient

#: ``fam_lambda="auto"`` picks λ so that the relative step R at step 0 equals this.
SAFE_STEP_RATIO = 0.003
#: A step-0 R above this is reported as a warning (the stability study's mixed range).
WARN_STEP_RATIO = 0.01
#: A penalty λκ₀ below this share of the starting train loss E₀ is reported as negligible.
NEGLIGIBLE_PENALTY = 1e-3


def resolve_lambda(
    fam_lambda: float | str,
    fam_scale: str,
    *,
    before: Mapping[str, Estimate],
    kappa_key: str,
    reg: FAMRegularizer,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    beta: float | None,
) -> dict[str, Any]:
    """λ for the run, and the relative step R at step 0 (None for Adam or λ = 0)."""
    if fam_lambda == "auto":
        lam = None
    elif fam_scale == "paper":  # the published regularizer is κ/m: λ_paper·κ/m = (λ_paper/m)·κ
        lam = float(fam_lambda) / reg.split.weight_matrix().shape[1]
    elif fam_scale == "relative":
        kappa0, loss0 = before[kappa_key].value, before["train_loss"].value
        if not kappa0 > 0:
            raise FlatcliError(
                f"κ of the starting model is {kappa0:g}: --fam-scale relative needs κ > 0"
            )
        lam = float(fam_lambda) * loss0 / kappa0
    else:
        lam = float(fam_lambda)
    if beta is None or lam == 0:
        return {"fam_lambda_used": lam, "fam_step_ratio": None}
    kappa0, grad_sq = kappa_gradient(reg, x, y)
    if not (kappa0 > 0 and grad_sq > 0):
        if lam is None:
            raise FlatcliError(
                f"--fam-lambda auto needs κ > 0 and a non-zero gradient of κ at the start "
                f"(κ = {kappa0:g}, ‖∇κ‖² = {grad_sq:g})"
            )
        return {"fam_lambda_used": lam, "fam_step_ratio": None}
    per_lambda = lr / (1 - beta) * grad_sq / kappa0
    if lam is None:
        lam = SAFE_STEP_RATIO / per_lambda
    return {"fam_lambda_used": lam, "fam_step_ratio": lam * per_lambda}


def announce_lambda(hparams: Mapping[str, Any], note: Callable[[str], None]) -> list[str]:
    """Say which λ the run uses and its step ratio R; the warnings, if R is large."""
    lam, ratio = hparams["fam_lambda_used"], hparams["fam_step_ratio"]
    if hparams["fam_lambda"] != lam:
        how = "auto" if hparams["fam_lambda"] == "auto" else hparams["fam_scale"]
        note(f"λ = {lam:.4g} ({how})")
    if ratio is None:
        return []
    note(f"relative step at step 0: R = {ratio:.3g}")
    if ratio <= WARN_STEP_RATIO:
        return []
    return [
        f"the relative step at step 0 is R = {ratio:.3g}, above {WARN_STEP_RATIO:g}: FAM "
        "may be unstable; lower --lr or --fam-lambda, or use --fam-lambda auto "
        f"(R = {SAFE_STEP_RATIO:g})"
    ]


def penalty_share(lam: float, before: Mapping[str, Estimate], kappa_key: str) -> list[str]:
    """A warning when the penalty λκ₀ is negligible against the starting train loss E₀."""
    kappa0, loss0 = before[kappa_key].value, before["train_loss"].value
    penalty = lam * kappa0
    if not (lam > 0 and loss0 > 0 and math.isfinite(penalty)):
        return []
    share = penalty / loss0
    if share >= NEGLIGIBLE_PENALTY:
        return []
    return [
        f"the penalty is negligible against the loss: λκ₀ = {penalty:.2g} (λ = {lam:.2g}, "
        f"κ₀ = {kappa0:.3g}) is {share:.2g} of the train loss E₀ = {loss0:.3g}, below "
        f"{NEGLIGIBLE_PENALTY:g}; this run is close to plain training. For a penalty that "
        "is a fraction f of the loss, pass --fam-scale relative --fam-lambda f"
    ]
