"""The options of a fine-tuning run, declared once: :class:`FinetuneConfig`.

Its defaults are the CLI's defaults, and its checks run when it is built. A bad value raises
:class:`ConfigError`, a :class:`~flatcli.errors.UsageError` whose message names the
parameters (``epochs must be at least 1``); the CLI maps those names to its flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import UsageError
from ..fam import GRADIENTS as FAM_GRADIENTS
from ..fam import METHODS as FAM_METHODS
from ..fam import VARIANTS as FAM_VARIANTS

OptimizerName = Literal["sgd", "adam", "sam"]
Schedule = Literal["cosine", "constant"]
OPTIMIZERS = ("sgd", "adam", "sam")
SCHEDULES = ("cosine", "constant")
SCALES = ("absolute", "relative", "paper")
#: Gradient clipping when ``clip_grad_norm`` is not given, for λ = 0 and λ > 0 alike, so that
#: plain training and FAM are compared under the same step.
DEFAULT_CLIP = 1.0


class ConfigError(UsageError):
    """A bad option of :class:`FinetuneConfig`.

    Attributes:
        parameters: The parameter names the message mentions, so that a front end can
            replace them by its own names (the CLI's flags).
    """

    def __init__(self, message: str, *parameters: str) -> None:
        super().__init__(message)
        self.parameters = parameters


@dataclass(frozen=True)
class FinetuneConfig:
    """Every option of :func:`flatcli.finetune.finetune`, with its default, checked when built.

    Attributes:
        fam_lambda: λ ≥ 0. With λ = 0 the run is plain training, and κ is still logged.
            With ``fam_scale="relative"`` it is the fraction ``λκ₀/E₀`` instead. ``"auto"``
            (the default) picks λ so that the relative step R at step 0 is
            :data:`~flatcli.finetune.SAFE_STEP_RATIO` (SGD and SAM only).
        fam_scale: ``absolute`` (λ as given), ``paper`` (λ in the units of the FAM paper's
            experiments and code, whose neuron-wise regularizer is κ/m: the run uses
            λ/m, ``m`` the layer's ``in_features``; nn.Linear, neuron-wise only) or
            ``relative``: λ = ``fam_lambda`` · E₀/κ₀, with E₀ and κ₀ the starting model's
            full-data train loss and κ, so that λκ₀ is that fraction of E₀.
        layer: The FAM layer. Default: the last ``nn.Linear``.
        epochs: Total number of epochs, including those restored by ``resume``.
        optimizer: ``sgd`` (with ``momentum``), ``adam``, or ``sam``: sharpness-aware
            minimization (Foret et al. 2021) over SGD with ``momentum``, radius
            ``sam_rho``. SAM's second forward pass leaves BatchNorm running statistics
            alone.
        sam_rho: SAM's neighbourhood radius ρ.
        lr: Learning rate (the peak, for ``cosine``).
        momentum: SGD momentum (``sgd`` and ``sam``).
        weight_decay: L2 weight decay of the optimizer.
        batch_size: Mini-batch size. κ is computed on the same mini-batch. A last batch
            of one sample is merged into the batch before it, because BatchNorm needs two.
        schedule: ``cosine`` anneals the learning rate to 0 over all steps of all
            ``epochs``; ``constant`` keeps it fixed.
        fam_variant: ``neuronwise`` (κ) or ``layerwise`` (‖W‖²_F · Tr H), see
            :class:`~flatcli.fam.FAMRegularizer`.
        fam_method: ``auto``, ``exact`` or ``hutchinson``, see
            :class:`~flatcli.fam.FAMRegularizer`.
        fam_probes: Hutchinson probes per step.
        fam_gradient: ``full`` (the exact Lemma 1 gradient) or ``detached`` (the published
            code's: Hessian held constant, term (I) only), see
            :class:`~flatcli.fam.FAMRegularizer`.
        clip_grad_norm: Clip the global gradient norm of each step to this. None: 1.0
            (:data:`DEFAULT_CLIP`), for plain training (λ = 0) as for FAM, so that the
            two are compared under the same step; 0 turns it off. The threshold is in the
            units of the gradient, so it is not scale-free.
        loss: ``cross_entropy`` or ``mse``. Default: the checkpoint's metadata, else
            cross-entropy.
        target: The label column, when the data is a CSV file.
        max_samples: Use only the first N samples of each split.
        seed: Seeds the shuffling, the Hutchinson probes and dropout, and the measures'
            probes. The caller's global RNG state is restored afterwards.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: ``float32`` or ``float64``.
        out_path: Write the fine-tuned checkpoint here (``.safetensors`` or ``.pt``; for a
            Hugging Face model, a ``save_pretrained`` folder with a ``flatcli.json``).
        log_path: Write the per-epoch CSV log here.
        plot_path: Write a PNG of the curves here.
        state_path: The resumable state file. Default: next to ``out_path``, with suffix
            ``.state.pt``.
        resume: Continue from ``state_path`` if it exists. The recorded hyperparameters
            must match, except ``epochs`` under a ``constant`` schedule.
        overwrite_input: Allow ``out_path`` to be the input checkpoint (refused by
            default). No other output may be an input, or another output.

    Raises:
        ConfigError: A value out of range, an unknown choice, or options that do not go
            together.
    """

    fam_lambda: float | Literal["auto"] = "auto"
    fam_scale: str = "absolute"
    layer: str | None = None
    epochs: int = 5
    optimizer: OptimizerName = "sgd"
    sam_rho: float = 0.05
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    schedule: Schedule = "cosine"
    fam_variant: str = "neuronwise"
    fam_method: str = "auto"
    fam_probes: int = 1
    fam_gradient: str = "full"
    clip_grad_norm: float | None = None
    loss: str | None = None
    target: str | None = None
    max_samples: int | None = None
    seed: int = 0
    device: str | torch.device = "auto"
    dtype: str | torch.dtype = "float32"
    out_path: str | Path | None = None
    log_path: str | Path | None = None
    plot_path: str | Path | None = None
    state_path: str | Path | None = None
    resume: bool = False
    overwrite_input: bool = False

    def __post_init__(self) -> None:
        self._check_lambda()
        self._check_training()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @property
    def clip(self) -> float | None:
        """The clipping threshold of the run, the same for λ = 0 and λ > 0 (None: off)."""
        if self.clip_grad_norm is None:
            return DEFAULT_CLIP
        return float(self.clip_grad_norm) if self.clip_grad_norm > 0 else None

    @property
    def kappa_key(self) -> str:
        """The measure that is the penalty: κ, or ‖W‖²·Tr H for the layer-wise variant."""
        return "relative_flatness" if self.fam_variant == "neuronwise" else "layerwise_flatness"

    @property
    def beta(self) -> float | None:
        """The momentum of the step R assumes (None for Adam, where R is undefined)."""
        return None if self.optimizer == "adam" else self.momentum

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict."""
        return asdict(self)

    def _check_lambda(self) -> None:
        lam, scale = self.fam_lambda, self.fam_scale
        if lam == "auto":
            _need(
                self.optimizer != "adam",
                "fam_lambda auto needs optimizer sgd or sam (R assumes an SGD step); "
                "with adam, pass a number",
                "fam_lambda",
                "optimizer",
            )
            _need(
                scale == "absolute",
                f"fam_lambda auto picks λ itself: drop fam_scale {scale}",
                "fam_lambda",
                "fam_scale",
            )
        else:
            _need(
                isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0,
                f"fam_lambda must be a finite number ≥ 0 or auto, got {lam}",
                "fam_lambda",
            )
        _need(scale in SCALES, f"fam_scale must be one of {', '.join(SCALES)}", "fam_scale")
        _need(
            scale != "paper" or self.fam_variant == "neuronwise",
            "fam_scale paper converts λ of the published neuron-wise regularizer (κ/m); the "
            "published layer-wise one (‖W‖·Tr H, norm unsquared) is no rescaling of ‖W‖²·Tr H",
            "fam_scale",
        )

    def _check_training(self) -> None:
        clip = self.clip_grad_norm
        checks = [
            (
                self.fam_gradient in FAM_GRADIENTS,
                f"fam_gradient must be one of {', '.join(FAM_GRADIENTS)}",
                "fam_gradient",
            ),
            (
                clip is None or (math.isfinite(clip) and clip >= 0),
                f"clip_grad_norm must be a number ≥ 0 (0: off), got {clip}",
                "clip_grad_norm",
            ),
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}", "epochs"),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer must be one of {', '.join(OPTIMIZERS)}",
                "optimizer",
            ),
            (
                math.isfinite(self.sam_rho) and self.sam_rho > 0,
                f"sam_rho must be > 0, got {self.sam_rho}",
                "sam_rho",
            ),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}", "lr"),
            (
                0 <= self.momentum < 1,
                f"momentum must be in [0, 1), got {self.momentum}",
                "momentum",
            ),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"weight_decay must be ≥ 0, got {self.weight_decay}",
                "weight_decay",
            ),
            (
                self.batch_size >= 1,
                f"batch_size must be at least 1, got {self.batch_size}",
                "batch_size",
            ),
            (
                self.schedule in SCHEDULES,
                f"schedule must be one of {', '.join(SCHEDULES)}",
                "schedule",
            ),
            (
                self.fam_variant in FAM_VARIANTS,
                f"fam_variant must be one of {', '.join(FAM_VARIANTS)}",
                "fam_variant",
            ),
            (
                self.fam_method in FAM_METHODS,
                f"fam_method must be one of {', '.join(FAM_METHODS)}",
                "fam_method",
            ),
            (
                self.fam_probes >= 1,
                f"fam_probes must be at least 1, got {self.fam_probes}",
                "fam_probes",
            ),
        ]
        for ok, message, name in checks:
            _need(ok, message, name)


def _need(ok: bool, message: str, *parameters: str) -> None:
    if not ok:
        raise ConfigError(message, *parameters)
