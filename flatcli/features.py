"""Split a model at one layer: ``f(x) = g(W φ(x) + b)``.

:class:`LayerSplit` is the one place that knows how to cut a network. Every caller goes
through it: measurement (no grad, the trunk runs once per batch), the Hessian-vector
products of the downstream part, and FAM fine-tuning (gradients flow through ``φ`` into
the trunk and through the downstream part).

Three mechanisms, chosen automatically:

* ``sequence``: the layer is a direct child of an :class:`torch.nn.Sequential`; the
  trunk is the children before it and the downstream part the children after it. No
  tracing, so the split costs nothing to build (it is rebuilt on every call of a measure).
* ``fx``: the model is traced with :mod:`torch.fx`; the graph is cut into a *trunk*
  ``x ↦ (φ, context)`` and a *downstream* ``(z, context) ↦ output``. ``context`` holds
  the trunk values the downstream part also reads (a skip connection, say), so the
  downstream part runs alone and the trunk is never re-run per HVP.
* ``hook`` (when tracing fails, e.g. data-dependent control flow): a forward hook
  captures ``φ`` and ``z``, and the downstream part is evaluated by re-running the whole
  model with the layer's output replaced. The trunk is then recomputed (without being
  differentiated) for each downstream evaluation; :attr:`LayerSplit.mechanism` says so.

A weight used twice (tied to another parameter, or the layer applied twice) makes the
downstream part depend on ``W`` too, which breaks Identity 2 (docs/measures.md); such splits
report :attr:`LayerSplit.tied` and callers fall back to Identity 1 on the whole model.
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .autodiff import SecondOrder, hvp
from .errors import FlatcliError, UsageError
from .losses import SoftmaxCurvature, per_sample_loss

SUPPORTED = (nn.Linear, nn.Conv2d)
HEAD_NAMES = ("classifier", "score", "head", "classification_head", "fc")
"""Names of a classifier's head module; the default layer is the last ``nn.Linear`` in it."""

ModelInput = torch.Tensor | Mapping[str, torch.Tensor]
"""One batch of model inputs: a tensor, or a dict passed as keyword arguments."""


# --------------------------------------------------------------------------- the output adapter


def logits_of(out: Any) -> torch.Tensor:
    """The logits in what a model returned.

    Accepts a tensor; a tuple or list whose first element is the logits; or a mapping with
    a ``logits`` entry (a Hugging Face ``ModelOutput`` is one).

    Raises:
        FlatcliError: Anything else, named.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        logits = out.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        keys = ", ".join(map(str, out.keys())) or "none"
        raise FlatcliError(
            f"the model returned {type(out).__name__} without 'logits' (keys: {keys})"
        )
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise FlatcliError(
        "the model must return logits (a tensor, a tuple starting with them, or an "
        f"output with 'logits'); it returned {type(out).__name__}"
    )


def call_model(
    model: nn.Module, x: ModelInput, params: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """``model(x)`` reduced to its logits by :func:`logits_of`.

    A dict batch is passed as keyword arguments (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...). With ``params``, those parameters replace the model's own
    through ``torch.func.functional_call`` (the model itself is never modified).
    """
    args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), {})
    if params is None:
        return logits_of(model(*args, **kwargs))
    return logits_of(torch.func.functional_call(model, dict(params), args, kwargs))


def batch_len(x: ModelInput) -> int:
    """Number of samples in a batch of inputs (the first dimension)."""
    if isinstance(x, Mapping):
        first = next(iter(x.values()), None)
        if not isinstance(first, torch.Tensor):
            raise FlatcliError("a dict batch must hold tensors")
        return int(first.shape[0])
    return int(x.shape[0])


@dataclass(frozen=True)
class Cut:
    """One batch cut at the layer.

    Attributes:
        x: The model input.
        phi: The layer's input ``φ`` (``(n, m)`` for Linear, ``(n, c, h, w)`` for Conv2d).
        z: The layer's output ``z = W φ + b``.
        context: Trunk values the downstream part needs besides ``z``.
    """

    x: ModelInput
    phi: torch.Tensor
    z: torch.Tensor
    context: tuple[Any, ...]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``; unknown names get close matches suggested."""
    modules = dict(model.named_modules())
    if name in modules and name != "":
        return modules[name]
    candidates = [n for n in modules if n]
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    layers = [n for n, m in modules.items() if isinstance(m, SUPPORTED)]
    raise UsageError(f"no layer named {name!r}{hint} (weight layers: {', '.join(layers)})")


def parts_with_weight(layer: str, parameters: Sequence[str]) -> str:
    """``"; its parts with one: A, B"``: the modules inside ``layer`` that own a ``weight``,
    from parameter names (``bert.pooler`` → ``bert.pooler.dense``); ``""`` when none."""
    inside = [
        p.removesuffix(".weight")
        for p in parameters
        if p.startswith(f"{layer}.") and p.endswith(".weight")
    ]
    if not inside:
        return ""
    shown = ", ".join(inside[:5]) + (f", ... ({len(inside)} in all)" if len(inside) > 5 else "")
    return f"; its parts with one: {shown}"


def default_layer(model: nn.Module) -> str:
    """The papers' feature layer: the last ``nn.Linear`` of the model.

    For a classifier with a head module (a child named ``classifier``, ``score``, ``head``,
    ``classification_head`` or ``fc``, as Hugging Face and torchvision name them), the last
    ``nn.Linear`` inside that head (``classifier``, ``classifier.out_proj``, ...), whatever
    order the other modules were registered in.
    """
    children = dict(model.named_children())
    for head in HEAD_NAMES:
        if head in children:
            inside = [
                f"{head}.{n}" if n else head
                for n, m in children[head].named_modules()
                if isinstance(m, nn.Linear)
            ]
            if inside:
                return inside[-1]
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise UsageError("the model has no nn.Linear layer; choose a layer with --layer")
    return names[-1]


class LayerSplit:
    """A model cut at one layer.

    Args:
        model: The network. Measurement callers put it in eval mode first, so that samples
            do not interact downstream of the layer (BatchNorm uses running statistics).
        layer: Name of the layer in ``model.named_modules()``.

    Attributes:
        name: The layer's name.
        layer: The layer module.
        mechanism: ``"sequence"``, ``"fx"`` or ``"hook"`` (see the module docstring).
        produces_output: True when the layer's output is the model's output (logits), so
            the closed forms of Identity 3 apply.
        tied: Other names under which the layer's weight is used (empty when untied);
            ``["<applied twice>"]`` when the layer itself runs more than once.
        ad: How second derivatives through the model are taken (falls back when an op
            has no forward-mode AD; see :mod:`flatcli.autodiff`).
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.model = model
        self.name = layer
        self.layer = find_layer(model, layer)
        weight = getattr(self.layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise UsageError(
                f"layer {layer!r} ({type(self.layer).__name__}) has no weight"
                + parts_with_weight(layer, [n for n, _ in model.named_parameters()])
            )
        self.tied = [
            n
            for n, p in model.named_parameters(remove_duplicate=False)
            if p is weight and n != f"{layer}.weight"
        ]
        self._trunk: Callable[..., Any] | None = None
        self._down: Callable[..., Any] | None = None
        self.produces_output = False
        self.mechanism = "hook"
        self.ad = SecondOrder()
        if not self._build_sequence():
            self._build_fx()

    # ------------------------------------------------------------------ properties

    @property
    def weight(self) -> torch.Tensor:
        """The layer's weight parameter (bias excluded, as in docs/measures.md)."""
        return self.layer.weight  # type: ignore[return-value]

    @property
    def kind(self) -> str:
        """``linear``, ``conv2d`` or ``other``."""
        if isinstance(self.layer, nn.Linear):
            return "linear"
        if isinstance(self.layer, nn.Conv2d):
            return "conv2d"
        return "other"

    def weight_matrix(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The weight as a ``d × m`` matrix (conv kernels reshaped to ``(d, -1)``)."""
        w = self.weight if weight is None else weight
        return w.reshape(w.shape[0], -1)

    # ------------------------------------------------------------------ fx construction

    def _build_sequence(self) -> bool:
        """Split an ``nn.Sequential`` at a direct child; False when that does not apply."""
        if type(self.model) is not nn.Sequential or "." in self.name:
            return False
        children = list(self.model.children())
        if sum(c is self.layer for c in children) != 1:
            return False  # applied twice: fx (or the hook) detects and reports it
        i = next(k for k, c in enumerate(children) if c is self.layer)
        trunk, down = nn.Sequential(*children[:i]), nn.Sequential(*children[i + 1 :])
        self._trunk = lambda x: (trunk(x),)
        self._down = down
        self.produces_output = i == len(children) - 1
        self.mechanism = "sequence"
        return True

    def _build_fx(self) -> None:
        """Trace and cut, or reuse the cut of an identical earlier call (see :data:`_FX_CACHE`)."""
        key = (self.name, _structure(self.model))
        per_model = _FX_CACHE.setdefault(self.model, {})
        built = per_model.pop(key, None)
        if built is None:
            before = (self._trunk, self._down, self.produces_output, self.mechanism, self.tied)
            self._trace_and_cut()
            built = (self._trunk, self._down, self.produces_output, self.mechanism, self.tied)
            self._trunk, self._down, self.produces_output, self.mechanism, self.tied = before
        per_model[key] = built  # most recently used last
        while len(per_model) > _FX_CACHE_PER_MODEL:
            del per_model[next(iter(per_model))]
        self._trunk, self._down, self.produces_output, self.mechanism, tied = built
        self.tied = list(tied)

    def _trace_and_cut(self) -> None:
        try:
            gm = torch.fx.symbolic_trace(self.model)
        except Exception:  # noqa: BLE001 - any tracing failure means: use hooks
            return
        calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == self.name]
        if len(calls) > 1:
            self.tied = [*self.tied, "<applied twice>"]
        if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs:
            return
        node = calls[0]
        order = list(gm.graph.nodes)
        downstream: list[torch.fx.Node] = []
        down_set: set[torch.fx.Node] = set()
        for n in order:
            if n is not node and any(a is node or a in down_set for a in n.all_input_nodes):
                downstream.append(n)
                down_set.add(n)
        output = next(n for n in order if n.op == "output")
        if output not in down_set:
            raise FlatcliError(f"layer {self.name!r} does not affect the model's output")
        if any(n.op == "placeholder" for n in downstream):
            return
        boundary: list[torch.fx.Node] = []
        for n in downstream:
            for a in n.all_input_nodes:
                if a is not node and a not in down_set and a.op != "get_attr" and a not in boundary:
                    boundary.append(a)
        phi = node.args[0]
        if not isinstance(phi, torch.fx.Node):
            return
        trunk = _subgraph(gm, outputs=[phi, *boundary])
        down = _downstream_graph(gm, node, downstream, boundary)
        self._trunk = lambda x: trunk(**x) if isinstance(x, Mapping) else trunk(x)
        self._down = lambda z, *context: logits_of(down(z, *context))
        out_arg = output.args[0]
        self.produces_output = out_arg is node
        self.mechanism = "fx"

    # ------------------------------------------------------------------ running

    def layer_forward(self, phi: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``z = layer(φ)``, optionally with another weight (functionally)."""
        if weight is None:
            return self.layer(phi)
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return F.linear(phi, weight, layer.bias)
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(phi, weight, layer.bias)
        return torch.func.functional_call(layer, {"weight": weight}, (phi,))

    def cut(self, x: ModelInput) -> Cut:
        """Run the trunk on ``x``: capture ``φ``, ``z`` and the downstream context.

        Runs with whatever grad mode the caller set: under ``torch.no_grad()`` for
        measurement, with grad for FAM so that gradients flow through ``φ``.
        """
        if self._trunk is not None:
            phi, *context = self._trunk(x)
            return Cut(x=x, phi=phi, z=self.layer(phi), context=tuple(context))
        _, cut = self.run(x)
        return cut

    def run(self, x: ModelInput) -> tuple[torch.Tensor, Cut]:
        """One full forward pass that also returns the cut (no second forward needed).

        The output is the model's logits (:func:`logits_of`). Under the hook mechanism, a
        model that returns the layer's output itself as its logits (a Hugging Face
        classifier's ``classifier``) is recognised here: :attr:`produces_output` becomes
        True and the downstream part is the identity, so nothing is re-run per HVP.
        """
        if self._trunk is not None and self._down is not None:
            cut = self.cut(x)
            return self._down(cut.z, *cut.context), cut
        captured: dict[str, torch.Tensor] = {}

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            if "z" in captured:
                raise FlatcliError(f"layer {self.name!r} runs twice in one forward pass")
            captured["phi"], captured["z"] = inputs[0], output

        handle = self.layer.register_forward_hook(hook)
        try:
            out = call_model(self.model, x)
        finally:
            handle.remove()
        if "z" not in captured:
            raise FlatcliError(f"layer {self.name!r} is not used in the model's forward pass")
        if out is captured["z"] and not self.tied:
            self.produces_output = True
        return out, Cut(x=x, phi=captured["phi"], z=captured["z"], context=(x,))

    def downstream(self, z: torch.Tensor, context: Sequence[Any]) -> torch.Tensor:
        """The model output as a function of the layer output ``z``."""
        if self._down is not None:
            return self._down(z, *context)
        if self.produces_output:
            return z
        (x,) = context
        with self._replace_output(z):
            return call_model(self.model, x)

    @contextmanager
    def _replace_output(self, z: torch.Tensor):  # noqa: ANN202 - generator context manager
        handle = self.layer.register_forward_hook(lambda m, i, o: z)
        try:
            yield
        finally:
            handle.remove()

    def quadratic_forms(
        self,
        cut: Cut,
        y: torch.Tensor,
        loss: str,
        mats: Sequence[torch.Tensor],
        *,
        trace: bool = False,
        chunk_size: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""Per-sample ``Tr(Uᵀ B_i U)`` for each ``U`` in ``mats``, and optionally ``Tr(B_i)``.

        ``B_i = ∇²_z ℓ_i`` is sample ``i``'s loss Hessian with respect to the layer output,
        through the downstream part only (docs/measures.md, Identity 2). Closed forms (Identity 3)
        when the layer produces the logits: softmax cross-entropy
        ``B_i = diag(p_i) − p_i p_iᵀ`` and MSE ``B_i = (2/d) I``. Otherwise batched
        downstream HVPs: ``min(d, Σ r)`` of them, each over all samples at once.

        Differentiable when ``cut.z`` and ``mats`` carry gradients (FAM), and exact.

        Args:
            cut: The batch, cut at this layer.
            y: Labels or targets.
            loss: ``cross_entropy`` or ``mse``.
            mats: Matrices ``U`` of shape ``(d, r)``.
            trace: Also return ``Tr(B_i)``.
            chunk_size: HVP directions per vectorized call.

        Returns:
            ``(q, tr)``: ``q[i, j] = Tr(U_jᵀ B_i U_j)`` of shape ``(n, len(mats))``;
            ``tr[i] = Tr(B_i)`` or None.
        """
        z = cut.z
        n, d = z.shape[0], z.shape[-1]
        if z.ndim != 2:
            raise UsageError(
                f"layer {self.name!r} output has shape {tuple(z.shape)}; the exact "
                "method needs (batch, features): use --method hutchinson"
            )
        if self.produces_output and loss == "cross_entropy":
            curvature = SoftmaxCurvature.of(z)  # exact on a saturated softmax too
            q = torch.stack([curvature.forms(u, summed=True) for u in mats], dim=1)
            return q, curvature.trace() if trace else None
        if self.produces_output and loss == "mse":
            q = torch.stack([(2 / d) * (u * u).sum() * z.new_ones(n) for u in mats], dim=1)
            return q, z.new_full((n,), 2.0) if trace else None

        def total(zz: torch.Tensor) -> torch.Tensor:
            return per_sample_loss(self.downstream(zz, cut.context), y, loss).sum()  # type: ignore[arg-type]

        rank = sum(u.shape[1] for u in mats)
        if trace or rank >= d:
            # Unit directions give the whole B_i; Tr(UᵀBU) = Σ_s ⟨(UUᵀ)[:, s], B e_s⟩.
            eye = torch.eye(d, dtype=z.dtype, device=z.device)
            hb = per_sample_hvp(total, z, eye, chunk_size=chunk_size, ad=self.ad)  # B_i e_s
            q = torch.stack([torch.einsum("snd,ds->n", hb, u @ u.T) for u in mats], dim=1)
            tr = torch.einsum("sns->n", hb) if trace else None
            return q, tr
        cols = []
        for u in mats:
            hu = per_sample_hvp(total, z, u.T, chunk_size=chunk_size, ad=self.ad)  # B_i u_r
            cols.append(torch.einsum("rnd,dr->n", hu, u))
        return torch.stack(cols, dim=1), None

    def weight_output(self, cut: Cut, weight: torch.Tensor) -> torch.Tensor:
        """Model output with the layer's weight replaced by ``weight`` (Identity 1).

        For a tied weight the whole model runs with every alias replaced.
        """
        if self.tied:
            names = [f"{self.name}.weight", *[t for t in self.tied if not t.startswith("<")]]
            return call_model(self.model, cut.x, dict.fromkeys(names, weight))
        return self.downstream(self.layer_forward(cut.phi, weight), cut.context)


_FX_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, Any], Any]] = (
    weakref.WeakKeyDictionary()
)
"""The fx split of each (model, layer), so that a measure does not re-trace the model on
every call (the trace costs about as much as the measure). Keyed weakly by the model, then
by the layer and :func:`_structure` of the model, so a structural change misses the cache.
Weights changed in place need no invalidation: the cut graphs call the model's own
submodules and tensors. At most :data:`_FX_CACHE_PER_MODEL` entries per model (least
recently used dropped), e.g. one per layer and per train/eval mode."""
_FX_CACHE_PER_MODEL = 8


def _structure(model: nn.Module) -> tuple[Any, ...]:
    """What a traced graph depends on: every submodule, parameter and buffer object (by
    identity, so replacing one invalidates), module classes, instance-level ``forward``
    overrides and training flags (``if self.training`` is traced as a constant)."""
    modules = tuple(
        (name, id(m), type(m), id(m.__dict__.get("forward")), m.training)
        for name, m in model.named_modules(remove_duplicate=False)
    )
    tensors = tuple(
        (name, id(t))
        for name, t in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        )
    )
    return modules, tensors


def _subgraph(gm: torch.fx.GraphModule, outputs: list[torch.fx.Node]) -> torch.fx.GraphModule:
    """The part of ``gm`` needed to compute ``outputs``, returning them as a tuple."""
    needed: set[torch.fx.Node] = set()
    stack = list(outputs)
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n in needed or n.op == "placeholder":
            env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return torch.fx.GraphModule(gm, graph)


def _downstream_graph(
    gm: torch.fx.GraphModule,
    node: torch.fx.Node,
    downstream: list[torch.fx.Node],
    boundary: list[torch.fx.Node],
) -> torch.fx.GraphModule:
    """``(z, *boundary) ↦ output``: the nodes after ``node``, with get_attr constants copied."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {node: graph.placeholder("z")}
    for i, b in enumerate(boundary):
        env[b] = graph.placeholder(f"context_{i}")

    def arg(a: torch.fx.Node) -> torch.fx.Node:
        if a not in env:  # a get_attr constant read by the downstream part
            env[a] = graph.node_copy(a, arg)
        return env[a]

    for n in downstream:
        env[n] = graph.node_copy(n, arg)
    return torch.fx.GraphModule(gm, graph)


def per_sample_hvp(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    directions: torch.Tensor,
    *,
    chunk_size: int | None = None,
    ad: SecondOrder | None = None,
) -> torch.Tensor:
    """``B_i v`` for every sample ``i`` and every direction ``v``, batched.

    ``fn`` maps ``z`` of shape ``(n, d)`` to the **sum** of per-sample losses, each of
    which depends on its own row only; its Hessian is then block diagonal with blocks
    ``B_i`` and one Hessian-vector product with the direction repeated on every row gives
    all ``B_i v`` at once (docs/measures.md, Identity 2).

    Args:
        fn: Sum of separable per-sample losses as a function of ``z``.
        z: The point, ``(n, d)``.
        directions: ``(k, d)``; each is applied to every sample.
        chunk_size: Directions per vectorized call (bounds memory to ``chunk·n·d``).
        ad: Fallback state for ops without forward-mode AD (:mod:`flatcli.autodiff`).

    Returns:
        ``(k, n, d)`` with ``out[j, i] = B_i directions[j]``.
    """
    k = directions.shape[0]
    return hvp(fn, z, directions[:, None, :].expand(k, *z.shape), chunk_size=chunk_size, ad=ad)
