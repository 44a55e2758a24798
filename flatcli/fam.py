r"""FAM: relative-flatness-aware minimization (Adilova et al. 2023), as a PyTorch component.

The objective on a mini-batch is

.. math:: E_{\text{batch}}(\theta) + \lambda\, \kappa(W^l),

with :math:`\kappa` the relative flatness of one layer (Petzka et al. 2021, Definition 3),
evaluated on the same mini-batch (docs/measures.md). :class:`FAMRegularizer` returns that
:math:`\kappa` as a differentiable scalar. Backpropagating it gives **the full gradient of
FAM's Lemma 1**, with respect to every parameter of the network:

* (I) :math:`2\,T W` on the layer itself, with :math:`T[s,s'] = \sum_t H[s,t,s',t]`, and
* (II) the derivative of the Hessian itself (third derivatives of the loss). This term
  reaches the trunk through the features :math:`\phi_i` and the downstream part through
  :math:`B_i = \nabla^2_z \ell_i`.

Nothing is assembled by hand. Each path computes :math:`\kappa` with a differentiable
expression, and ordinary autograd does the rest:

* **Closed form** (docs/measures.md, Identity 3), for a layer that produces cross-entropy or MSE
  logits. :math:`\kappa = \frac1n\sum_i \|\phi_i\|^2 \big(\sum_s p_{is}\|w_s\|^2 -
  \|W^\top p_i\|^2\big)` costs about one extra head matmul.
* **Identity 2**, for any other untied ``nn.Linear`` layer:
  :math:`\kappa = \frac1n\sum_i \|\phi_i\|^2\,\mathrm{Tr}(W^\top B_i W)`, in one of
  two ways:

  - **through the downstream Jacobian** (path ``jacobian``), when every operation after
    the layer is piecewise linear (``Linear``, ``ReLU``, ``LeakyReLU``, ``Hardtanh``,
    eval-mode ``BatchNorm1d`` and ``Dropout``, ``Flatten``, sums; see
    :data:`PIECEWISE_LINEAR_MODULES`) up to the logits. Their second derivative is zero
    almost everywhere, so :math:`B_i = J_i^\top H_i J_i` with :math:`J_i` the
    :math:`C\times d` Jacobian of the logits in :math:`z_i` and :math:`H_i` the loss
    Hessian in the logits (``diag(p_i) − p_i p_iᵀ`` for cross-entropy, ``(2/C) I`` for
    MSE). Then :math:`\mathrm{Tr}(W^\top B_i W) = \mathrm{Tr}(M_i^\top H_i M_i)` with
    :math:`M_i = J_i W`: :math:`C` (classes) vector-Jacobian products of the downstream
    part, batched over the samples, and one backward through them (no double backward
    through a Hessian). This is the same function as the HVP route wherever the ReLU
    pattern is fixed, so its value and full Lemma 1 gradient are exact, as autograd's own
    dense Hessian is (it also takes ``ReLU'' = 0``).
  - otherwise :math:`\min(d, m)` batched Hessian-vector products of the downstream part,
    run under autograd (double backward), path ``identity2``.
* **Identity 1** (``method="hutchinson"``, or ``auto`` for a Conv2d or tied layer):
  :math:`\kappa = \mathrm{Tr}\,\nabla^2_A E(W + WA)|_{A=0}`. This is estimated as
  :math:`\langle Z, \nabla^2_A E\, Z\rangle` with Rademacher :math:`Z`, or summed over
  the :math:`m^2` basis directions with ``method="exact"``. :math:`Z` does not depend on
  the parameters, so the estimate's gradient is an unbiased estimate of the exact one.

The layer-wise variant of FAM §3.2 is :math:`\hat\kappa = \|W\|_F^2\,\mathrm{Tr}(H)`, with
the same paths for :math:`\mathrm{Tr}(H)`.

**Training mode.** In train mode, BatchNorm makes samples interact, and dropout makes the
downstream part random. Identity 2 needs neither to happen. The regularizer therefore takes
:math:`\phi_i` from the training forward pass itself: trunk BatchNorm uses batch statistics,
and gradients flow through them exactly. It then evaluates the Hessian of the downstream
part with the network temporarily in eval mode: running statistics, no dropout, and no
running-statistics updates from the extra evaluations. The result is the κ that
``flatcli measure`` reports, taken at the training batch's features. The closed form has
no downstream part, so this choice does not affect it.

References:
    Adilova, Abourayya, Li, Dada, Petzka, Egger, Kleesiek, Kamp. *FAM: Relative Flatness
    Aware Minimization.* 2023. https://arxiv.org/abs/2307.02337

    Petzka, Kamp, Adilova, Sminchisescu, Boley. *Relative Flatness and Generalization.*
    NeurIPS 2021. https://arxiv.org/abs/2001.00939
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .autodiff import hvp
from .errors import UsageError
from .features import Cut, LayerSplit, ModelInput, call_model, default_layer
from .losses import SoftmaxCurvature, check_loss, per_sample_loss
from .measures.relative_flatness import MAX_EXACT_DIRECTIONS

Variant = Literal["neuronwise", "layerwise"]
Method = Literal["auto", "exact", "hutchinson"]
Gradient = Literal["full", "detached"]
VARIANTS = ("neuronwise", "layerwise")
METHODS = ("auto", "exact", "hutchinson")
GRADIENTS = ("full", "detached")
FAMPath = Literal["closed_form", "jacobian", "identity2", "identity1"]

#: Modules whose output is piecewise linear in their input (zero second derivative almost
#: everywhere) when the downstream part runs in eval mode, as FAM evaluates it.
PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.Hardtanh,
    nn.Identity,
    nn.Dropout,
    nn.Flatten,
    nn.BatchNorm1d,
)
_PIECEWISE_LINEAR_FUNCTIONS = (
    torch.relu,
    F.relu,
    F.leaky_relu,
    F.linear,
    torch.flatten,
    torch.add,
    torch.sub,
    operator.add,
    operator.sub,
    operator.neg,
)
_PIECEWISE_LINEAR_METHODS = ("relu", "flatten", "view", "reshape", "add", "sub", "contiguous")


class FAMRegularizer:
    r"""The relative flatness κ of one layer on a batch, differentiable in every parameter.

    The object holds no parameters of its own. It is deliberately not an ``nn.Module``:
    registering the model as a child would list the model's parameters twice, in
    ``.parameters()`` and in ``state_dict()``.

    Args:
        model: The network. It is used in place: the penalty's gradients land in its
            parameters' ``.grad``.
        layer: The FAM layer, a name from ``model.named_modules()``. Default: the last
            ``nn.Linear``.
        loss: ``cross_entropy`` or ``mse``. This is the loss whose Hessian defines κ,
            with mean reduction over the batch.
        variant: ``neuronwise`` for κ (Petzka et al., Definition 3), or ``layerwise``
            for :math:`\|W\|_F^2\,\mathrm{Tr}(H)` (FAM §3.2).
        method: ``auto`` is exact for an untied ``nn.Linear`` with ``(batch, features)``
            outputs, and Hutchinson otherwise. ``exact`` uses the closed form, Identity 2,
            or, for Conv2d and tied weights, Identity 1 summed over its basis directions.
            ``hutchinson`` uses Identity 1 with Rademacher probes.
        probes: Rademacher probes per call (Hutchinson only). Any count gives an unbiased
            gradient; more probes lower its variance at proportional cost.
        gradient: ``full`` (default) backpropagates through the whole expression: the
            exact Lemma 1 gradient, terms (I) and (II). ``detached`` is the published FAM
            code's variant: the Hessian is held constant, so only term (I), ``2 T W``,
            reaches the layer's weight; no third-derivative term, nothing to the bias, the
            trunk (through φ) or the layers after it. The value is the same κ either way.
        generator: Source of the probes. Default: a CPU generator seeded with ``seed``.
        seed: Seed of the default generator.

    Example:
        Reuse the training step's own forward pass, so no second forward is needed:

        >>> import torch
        >>> from flatcli import archs
        >>> from flatcli.fam import FAMRegularizer
        >>> model = archs.mlp(4, [8], 3)
        >>> reg = FAMRegularizer(model, "fc")
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> out, cut = reg.forward(x)  # the same output as model(x)
        >>> loss = torch.nn.functional.cross_entropy(out, y) + 0.1 * reg.penalty(cut, y)
        >>> loss.backward()
        >>> model.fc1.weight.grad is not None  # term (II) reaches the trunk
        True
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str | None = None,
        *,
        loss: str = "cross_entropy",
        variant: Variant = "neuronwise",
        method: Method = "auto",
        probes: int = 1,
        gradient: Gradient = "full",
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        if variant not in VARIANTS:
            raise UsageError(
                f"unknown FAM variant {variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        if method not in METHODS:
            raise UsageError(f"unknown FAM method {method!r}; choose one of {', '.join(METHODS)}")
        if probes < 1:
            raise UsageError(f"--fam-probes must be at least 1, got {probes}")
        if gradient not in GRADIENTS:
            raise UsageError(
                f"unknown FAM gradient {gradient!r}; choose one of {', '.join(GRADIENTS)}"
            )
        self.model = model
        self.split = LayerSplit(model, layer or default_layer(model))
        self.loss = check_loss(loss)
        self.variant: Variant = variant
        self.method: Method = method
        self.probes = probes
        self.gradient: Gradient = gradient
        self.generator = generator if generator is not None else torch.Generator()
        if generator is None:
            self.generator.manual_seed(seed)
        self.piecewise_linear = _piecewise_linear_downstream(self.split)
        self._chain = _module_chain(self.split) if self.piecewise_linear else None
        if self.split.kind == "other" and method != "hutchinson":
            raise UsageError(
                f"layer {self.split.name!r} ({type(self.split.layer).__name__}) is neither "
                "nn.Linear nor nn.Conv2d: use --fam-method hutchinson"
            )

    # ------------------------------------------------------------------ public API

    @property
    def layer(self) -> str:
        """The FAM layer's name."""
        return self.split.name

    def forward(self, x: ModelInput) -> tuple[torch.Tensor, Cut]:
        """One full forward pass: the model output, and the batch cut at the layer.

        The output is the same as ``model(x)``, with the same autograd graph. Pass the cut
        to :meth:`penalty` to regularize without a second forward pass.
        """
        return self.split.run(x)

    def penalty(self, cut: Cut, y: torch.Tensor) -> torch.Tensor:
        r"""κ (or :math:`\hat\kappa`) of the batch in ``cut``, averaged over its samples.

        With ``gradient="full"`` the result is differentiable with respect to every
        parameter that ``cut`` depends on: the full Lemma 1 gradient (module docstring).
        With ``gradient="detached"`` its gradient is term (I) alone, on the layer's weight.
        Under ``torch.no_grad()`` it is just the value.
        """
        if self.gradient == "detached":
            return self._detached(cut, y)
        return self._value(cut, y)

    def _value(self, cut: Cut, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """κ by the chosen path; ``weight`` replaces the layer weight where it enters
        quadratically, with the Hessian taken at the detached weight (see :meth:`_detached`)."""
        path = self.path(cut)
        if path == "identity1":
            with _downstream_eval(self.model):
                return self._identity1(cut, y, weight)
        if path == "jacobian" and self._chain is not None:  # evaluated in eval mode by hand
            return self._identity2(cut, y, weight, jacobian=True)
        if path in ("identity2", "jacobian"):
            with _downstream_eval(self.model):
                return self._identity2(cut, y, weight, jacobian=path == "jacobian")
        return self._identity2(cut, y, weight)

    def _detached(self, cut: Cut, y: torch.Tensor) -> torch.Tensor:
        r"""κ whose gradient is term (I) of Lemma 1 only: :math:`2\,T W` on the weight.

        κ is a quadratic form in W with the Hessian as its matrix. It is evaluated on a
        frozen cut (φ, z and the context detached) with a fresh leaf ``V = W`` in the
        quadratic slots and the Hessian taken at the detached W; its gradient in ``V``
        is ``2 T W`` (or ``2 Tr(H) W`` for the layer-wise variant). That gradient is then
        attached to the real weight with a zero-valued term.
        """
        weight = self.split.weight
        if not torch.is_grad_enabled() or not weight.requires_grad:
            with torch.no_grad():
                return self._value(cut, y)
        frozen = Cut(
            x=cut.x.detach(),
            phi=cut.phi.detach(),
            z=cut.z.detach(),
            context=tuple(c.detach() if isinstance(c, torch.Tensor) else c for c in cut.context),
        )
        leaf = weight.detach().requires_grad_()
        value = self._value(frozen, y, leaf)
        (grad,) = torch.autograd.grad(value, leaf)
        return value.detach() + ((weight - weight.detach()) * grad).sum()

    def __call__(self, x: ModelInput, y: torch.Tensor) -> torch.Tensor:
        """κ of the batch ``(x, y)``: :meth:`forward`, then :meth:`penalty`."""
        _, cut = self.forward(x)
        return self.penalty(cut, y)

    def path(self, cut: Cut | None = None) -> FAMPath:
        """Which computation :meth:`penalty` uses (the module docstring lists them).

        An ``nn.Linear`` whose output has more than two dimensions (a sequence, for
        example) uses Identity 1. A hidden ``nn.Linear`` uses ``jacobian`` when the part
        after it is piecewise linear (:attr:`piecewise_linear`), else ``identity2``. Pass
        a cut to take its shape into account.
        """
        split = self.split
        exact_linear = split.kind == "linear" and not split.tied and self.method != "hutchinson"
        if cut is not None and cut.z.ndim != 2:
            exact_linear = False
        if not exact_linear:
            return "identity1"
        if split.produces_output and self.loss in ("cross_entropy", "mse"):
            return "closed_form"
        return "jacobian" if self.piecewise_linear else "identity2"

    def describe(self, cut: Cut | None = None) -> str:
        """The path in words, for logs and reports."""
        path = self.path(cut)
        if path == "closed_form":
            text = "exact: closed form (Identity 3, logits layer)"
        elif path == "jacobian":
            how = (
                "chained through the modules"
                if self._chain is not None
                else "one VJP per class"
            )
            text = (
                f"exact: Identity 2 through the downstream Jacobian, {how} "
                f"(piecewise-linear downstream, B_i = J_iᵀ H_i J_i; {self.split.mechanism} split)"
            )
        elif path == "identity2":
            how = f"Identity 2, {self.split.mechanism} split"
            text = f"exact: per-sample downstream HVPs under autograd ({how})"
        elif self.method == "exact":
            text = "exact: Identity 1, basis directions"
        else:
            text = f"hutchinson: Identity 1, {self.probes} Rademacher probe(s) per step"
        if self.gradient == "detached":
            text += "; detached-Hessian gradient (term I only)"
        return text

    # ------------------------------------------------------------------ paths

    def _identity2(
        self,
        cut: Cut,
        y: torch.Tensor,
        weight: torch.Tensor | None = None,
        *,
        jacobian: bool = False,
    ) -> torch.Tensor:
        """Closed form or Identity 2: ``(1/n) Σ_i ‖φ_i‖² Tr(Wᵀ B_i W)``.

        The layer-wise variant is ``‖W‖² (1/n) Σ_i ‖φ_i‖² Tr B_i``. ``B_i`` is taken at
        ``cut.z``; ``weight`` (default: the layer's) is the W of the quadratic form. With
        ``jacobian``, ``B_i = J_iᵀ H_i J_i`` (:meth:`_jacobian_forms`).
        """
        w = self.split.weight_matrix(weight)
        phi = cut.phi.reshape(cut.phi.shape[0], -1)
        sq_norms = (phi * phi).sum(1)
        layerwise = self.variant == "layerwise"
        if jacobian:
            q = self._jacobian_forms(cut, w, trace=layerwise)
            value = torch.dot(sq_norms, q) / phi.shape[0]
            return (w * w).sum() * value if layerwise else value
        q, tr = self.split.quadratic_forms(cut, y, self.loss, [w], trace=layerwise)
        if layerwise:
            assert tr is not None
            return (w * w).sum() * (sq_norms * tr).mean()
        return (sq_norms * q[:, 0]).mean()

    def _jacobian_forms(self, cut: Cut, w: torch.Tensor, *, trace: bool) -> torch.Tensor:
        r"""Per-sample ``Tr(Mᵀ H_i M)`` with ``M = J_i W`` (``trace``: ``M = J_i``, ``Tr B_i``).

        Valid when the downstream part is piecewise linear, so that
        :math:`B_i = J_i^\top H_i J_i` exactly (no curvature term). For cross-entropy,
        :math:`\mathrm{Tr}(M^\top H_i M) = \sum_c p_{ic}\|M_c\|^2 - \|M^\top p_i\|^2`
        (by :class:`~flatcli.losses.SoftmaxCurvature`, exact on a saturated softmax);
        for MSE, :math:`(2/C)\|M\|_F^2`. Differentiable in ``z``, ``w`` and the downstream
        parameters (:meth:`_downstream_jacobian`).
        """
        out, jac = self._downstream_jacobian(cut)
        n, c = out.shape
        m = jac if trace else (jac.reshape(-1, w.shape[0]) @ w).view(*jac.shape[:-1], -1)
        # m: (n, C, r), or (C, r) when no factor of J depends on the sample
        if self.loss == "cross_entropy":  # exact on a saturated softmax too
            return SoftmaxCurvature.of(out).forms(m, summed=True)
        return ((2 / c) * (m * m).sum((-2, -1))).expand(n)

    def _downstream_jacobian(self, cut: Cut) -> tuple[torch.Tensor, torch.Tensor]:
        """The downstream output (eval mode) and its Jacobian ``J_i`` in ``z``: ``(n, C, d)``.

        An ``nn.Sequential`` downstream part is chained module by module: ``J = W_L D_{L-1}
        … `` with ``D`` the diagonal derivative of each piecewise-linear module at its input
        (no autograd pass of its own: the cheapest route, and ``(C, d)`` when nothing depends
        on the sample). Any other downstream part (a ``torch.fx`` graph) takes ``C``
        vector-Jacobian products in one batched backward pass, each over the whole batch at
        once (the part maps row ``i`` of ``z`` to row ``i`` of the output in eval mode), kept
        differentiable when grad mode is on.
        """
        if self._chain is not None:
            return _chain_jacobian(self._chain, cut.z)
        graph = torch.is_grad_enabled()
        with torch.enable_grad():  # J_i needs autograd even when only the value is wanted
            z = cut.z if cut.z.requires_grad else cut.z.detach().requires_grad_()
            out = self.split.downstream(z, cut.context)
            n, c = out.shape
            eye = torch.eye(c, dtype=out.dtype, device=out.device)
            # jac[k, i] = e_kᵀ J_i, the k-th row of sample i's Jacobian: one batched backward
            (jac,) = torch.autograd.grad(
                out,
                z,
                grad_outputs=eye[:, None, :].expand(c, n, c),
                is_grads_batched=True,
                create_graph=graph,
            )
        if not graph:
            out = out.detach()
        return out, jac.transpose(0, 1)

    def _identity1(
        self, cut: Cut, y: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""Identity 1 in the weight: ``Tr ∇²_A E(W + WA)`` (or ``‖W‖² Tr ∇²_W E``).

        Quadratic forms ``⟨Z, ∇²_P E Z⟩`` at ``P = 0``. They are summed over basis
        directions when exact, and averaged over Rademacher probes otherwise. With
        ``weight`` given, the Hessian is taken at ``weight.detach()`` and ``weight`` is the
        W of the directions ``WA`` (and of ``‖W‖²``).
        """
        w = self.split.weight if weight is None else weight
        point = w if weight is None else weight.detach()
        w2 = self.split.weight_matrix(w)
        m = w2.shape[1]
        layerwise = self.variant == "layerwise"
        shape = tuple(w.shape) if layerwise else (m, m)
        size = w.numel() if layerwise else m * m

        def to_weight(p: torch.Tensor) -> torch.Tensor:
            return point + p if layerwise else point + (w2 @ p).reshape(w.shape)

        def mean_loss(p: torch.Tensor) -> torch.Tensor:
            out = self.split.weight_output(cut, to_weight(p))
            return per_sample_loss(out, y, self.loss).mean()

        p0 = w.new_zeros(shape)
        exact = self.method == "exact"
        if exact and size > MAX_EXACT_DIRECTIONS:
            raise UsageError(
                f"exact FAM on {self.split.name!r} needs {size} Hessian-vector products "
                "per step: use --fam-method hutchinson"
            )
        total = w.new_zeros(())
        for dirs in self._directions(size, shape, exact=exact, like=w):
            total = total + (dirs * hvp(mean_loss, p0, dirs, ad=self.split.ad)).sum()
        value = total if exact else total / self.probes
        return (w * w).sum() * value if layerwise else value

    def _directions(
        self, size: int, shape: tuple[int, ...], *, exact: bool, like: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        """Chunks of unit basis directions (exact) or of Rademacher probes."""
        chunk = 64
        if exact:
            for lo in range(0, size, chunk):
                hi = min(lo + chunk, size)
                rows = torch.zeros(hi - lo, size, dtype=like.dtype, device=like.device)
                rows[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
                yield rows.reshape(hi - lo, *shape)
            return
        for lo in range(0, self.probes, chunk):
            k = min(chunk, self.probes - lo)
            z = torch.randint(0, 2, (k, *shape), generator=self.generator, dtype=torch.int8)
            yield (z.to(device=like.device, dtype=like.dtype) * 2 - 1).reshape(k, *shape)


def detached_hessian_gradient(
    model: nn.Module, layer: str, x: ModelInput, y: torch.Tensor, *, loss: str = "cross_entropy"
) -> dict[str, torch.Tensor]:
    r"""The gradient that the published FAM code effectively uses: term (I) of Lemma 1 only.

    This is :math:`2\,T W` on the layer's weight, with :math:`T[s,s'] = \sum_t H[s,t,s',t]`
    computed from a *detached* Hessian. Every other parameter gets zero. This is what
    wrapping the Hessian in ``torch.tensor(...)`` does. It is dense and slow: a reference.
    ``FAMRegularizer(..., gradient="detached")`` gives the same gradient at the cost of the
    exact paths (docs/measures.md).

    Returns:
        Gradients by parameter name, zero everywhere except ``{layer}.weight``.
    """
    split = LayerSplit(model, layer)
    w = split.weight.detach()
    names = [f"{layer}.weight", *[t for t in split.tied if not t.startswith("<")]]

    def mean_loss(weight: torch.Tensor) -> torch.Tensor:
        out = call_model(model, x, dict.fromkeys(names, weight))
        return per_sample_loss(out, y, check_loss(loss)).mean()

    d, m = w.shape[0], w[0].numel()
    with torch.no_grad():  # the published code's torch.tensor(...) detaches the Hessian
        h = torch.func.hessian(mean_loss)(w).reshape(d, m, d, m)
    t = torch.einsum("atbt->ab", h)
    grad_w = (2 * t @ w.reshape(d, m)).reshape(w.shape)
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    grads[f"{layer}.weight"] = grad_w
    return grads


def _piecewise_linear_downstream(split: LayerSplit) -> bool:
    """True when every operation after the layer is piecewise linear (module docstring).

    Decided from the structure the split exposes: the children after the layer of an
    ``nn.Sequential``, or the nodes of a ``torch.fx`` downstream graph. A model split with
    hooks (no structure to read) is not claimed to be piecewise linear.
    """
    down = getattr(split, "_down", None)
    if split.mechanism == "sequence" and isinstance(down, nn.Sequential):
        allowed = (*PIECEWISE_LINEAR_MODULES, nn.Sequential)
        return all(isinstance(m, allowed) for m in down.modules())
    if split.mechanism != "fx" or down is None:
        return False
    graphs = [
        cell.cell_contents
        for cell in getattr(down, "__closure__", None) or ()
        if isinstance(cell.cell_contents, torch.fx.GraphModule)
    ]
    if len(graphs) != 1:
        return False
    gm = graphs[0]
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            allowed = (*PIECEWISE_LINEAR_MODULES, nn.Sequential)
            if not all(isinstance(m, allowed) for m in module.modules()):
                return False
        elif node.op == "call_function":
            if node.target not in _PIECEWISE_LINEAR_FUNCTIONS:
                return False
        elif node.op != "call_method" or node.target not in _PIECEWISE_LINEAR_METHODS:
            return False
    return True


_CHAIN_MODULES = (nn.Linear, nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.Identity, nn.Dropout)
"""Modules :func:`_chain_jacobian` differentiates by hand (``nn.ReLU6`` is an
``nn.Hardtanh``), besides a 2-D ``nn.Flatten`` and an ``nn.BatchNorm1d`` with running
statistics."""


def _module_chain(split: LayerSplit) -> tuple[nn.Module, ...] | None:
    """The downstream modules in order, when an ``nn.Sequential`` split leaves only modules
    :func:`_chain_jacobian` knows; else None."""
    down = getattr(split, "_down", None)
    if split.mechanism != "sequence" or not isinstance(down, nn.Sequential):
        return None
    chain = tuple(m for m in down.modules() if not isinstance(m, nn.Sequential))
    for m in chain:
        if isinstance(m, nn.Flatten):
            if m.start_dim not in (1, -1):
                return None
        elif isinstance(m, nn.BatchNorm1d):
            if m.running_var is None:  # batch statistics even in eval mode
                return None
        elif not isinstance(m, _CHAIN_MODULES):
            return None
    return chain


def _chain_jacobian(
    chain: tuple[nn.Module, ...], z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode output of ``chain`` at ``z`` and its Jacobian in ``z``, chained by hand.

    Each module is a linear map (``nn.Linear``: its weight; eval ``BatchNorm1d``: a
    per-feature scale) or a piecewise-linear activation, whose derivative is a per-sample
    diagonal taken the way autograd takes it at a kink (ReLU: ``x > 0``; LeakyReLU:
    ``x > 0`` else the slope; Hardtanh and ReLU6: ``lo < x < hi``). Dropout, Identity and a
    2-D Flatten are the identity. The product is differentiable in the weights (and, where
    it enters, the BatchNorm scale); the masks are piecewise constant. Returns the output
    ``(n, C)`` and ``J``: ``(n, C, d)``, or ``(C, d)`` when no factor depends on the sample.
    """
    h = z
    factors: list[tuple[bool, torch.Tensor]] = []  # (is a matrix, factor)
    for m in chain:
        if isinstance(m, nn.Linear):
            factors.append((True, m.weight))
            h = F.linear(h, m.weight, m.bias)
        elif isinstance(m, nn.ReLU):
            factors.append((False, (h > 0).to(h.dtype)))
            h = F.relu(h)
        elif isinstance(m, nn.LeakyReLU):
            slope = h.new_tensor(m.negative_slope)
            factors.append((False, torch.where(h > 0, torch.ones_like(slope), slope).detach()))
            h = F.leaky_relu(h, m.negative_slope)
        elif isinstance(m, nn.Hardtanh):
            factors.append((False, ((h > m.min_val) & (h < m.max_val)).to(h.dtype)))
            h = F.hardtanh(h, m.min_val, m.max_val)
        elif isinstance(m, nn.BatchNorm1d):
            assert m.running_mean is not None and m.running_var is not None
            scale = torch.rsqrt(m.running_var + m.eps)
            factors.append((False, scale if m.weight is None else m.weight * scale))
            h = F.batch_norm(h, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    jac: torch.Tensor | None = None
    for matrix, f in reversed(factors):
        if matrix:
            jac = f if jac is None else jac @ f
        elif jac is None:
            jac = torch.diag_embed(f)
        else:
            jac = jac * f.unsqueeze(-2)
    if jac is None:  # nothing after the layer but identities
        jac = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    return h, jac


@contextmanager
def _downstream_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode while the penalty evaluates the downstream part; each module's flag restored."""
    modes = [(m, m.training) for m in model.modules()]
    if not any(flag for _, flag in modes):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module, flag in modes:
            module.training = flag
