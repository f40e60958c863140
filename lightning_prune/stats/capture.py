"""Capture layer inputs and per-sample output gradients during ordinary training steps.

A forward hook on each target Linear/Conv layer keeps its input and registers a *tensor* hook on
its output, which receives dL/d(output) during the normal backward pass: no extra forward or
backward. (``register_full_backward_hook`` is not used because it breaks any model with an
in-place op after the layer, e.g. ``nn.ReLU(inplace=True)``.) Hooks exist only while a capture
window is open, so other batches pay nothing.

Everything is handed to the estimators as *rows*:

* ``x``: ``(N, T, d_in)`` layer inputs (Conv inputs unfolded, so a Conv is a Linear over patches);
* ``g``: ``(N, T, d_out)`` gradients of each sample's *own* loss w.r.t. the layer output.

The per-sample weight gradient is ``sum_t g[n, t]^T x[n, t]``. Hook gradients carry the loss
reduction, Lightning's division by ``accumulate_grad_batches`` and the AMP loss scale;
:func:`per_sample_factor` rescales them so that the estimators' mean over samples of ``G_n G_n^T``
is the Fisher of the loss itself, in the loss's own units:

* Write a batch's loss as ``L = s * sum_k l_k`` over its log-likelihood *terms*: ``s = 1/K`` for a
  mean over ``K`` terms, ``s = 1`` for a sum. A classifier has one term per sample; a language model
  one per predicted token (labels that are not ignored), ``T`` per sequence.
* The Fisher identity holds for each sample's own negative log-likelihood ``S_n = sum_{k in n} l_k``
  (a sequence's tokens are one joint likelihood, ``log p(y_1..T) = sum_t log p(y_t | y_<t)``), so
  ``H(L) = s sum_n H(S_n) ~ s sum_n grad S_n grad S_n^T = (1/s) sum_n h_n h_n^T``, with
  ``h_n = s grad S_n`` the hook gradient of sample ``n``.
* The estimators take the mean over the ``N`` samples, so the factor is ``sqrt(N / s)``: ``N`` for a
  classifier's mean loss (each sample's own gradient), ``sqrt(N K)`` for a mean over ``K`` tokens.
  Rescaling each sequence's gradient by ``N`` instead, as if a sequence were one term, made the
  Fisher of a language model ``K / N`` (the tokens per sequence) times too small.

``1/s`` comes from the loss's own call to ``F.cross_entropy`` or ``F.nll_loss`` (its non-ignored,
class-weighted target rows, and the ratio of the loss to the call), seen by :class:`LossTerms`
while the loss is computed. A loss that makes no such call, or several, counts one term per sample
(``reduction="mean"``: ``1/s = N``; ``"sum"``: ``1/s = 1``).

Two training styles re-run or bypass module forwards, and are handled here:

* **Activation checkpointing** (``torch.utils.checkpoint``, Hugging Face's
  ``gradient_checkpointing_enable()``) re-runs a region's forward during backward. A row enters
  the statistics only when its own call's output gradient arrived, so each call counts once
  either way: with ``use_reentrant=True`` the first forward runs without autograd (skipped) and
  the recomputation is the call that gets gradients; with ``use_reentrant=False`` the first
  forward gets them and the recomputation only refills saved activations, so it is ignored
  (:func:`in_checkpoint_recompute`) instead of holding a second copy of its input.
* **torch.compile**: compiled graphs do not guard on module hooks (dynamo's
  ``skip_nnmodule_hook_guards``), so hooks added after compilation would be silently skipped, and
  hooks present at compilation baked in. While any capture is attached, compiled code runs eagerly
  (``torch.compiler.set_stance("force_eager")``, reference-counted over captures): the window's
  ``num_batches`` steps per round and the round's calibration passes run uncompiled, every other
  step keeps its compiled graphs, and the hooks cause no recompilation.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_prune.engine.targets import PruneTarget


def check_hookable(targets: Sequence[PruneTarget], gradients: bool = True) -> None:
    """Curvature needs the trainable weight of one plain (groups=1) Linear/Conv layer: say which target is not.

    ``gradients``: whether the statistics differentiate the loss (a frozen weight then has none).
    """
    for t in targets:
        if len(t.holders) > 1:
            raise ValueError(
                f"{t.name!r} is tied: modules {list(t.holders)} all hold it, and each sees its own inputs, so no "
                "single layer's curvature describes it. Exclude it (exclude=[...]) or prune it with MagnitudePruning"
            )
        if gradients and not t.param.requires_grad:
            raise ValueError(
                f"{t.name!r} is frozen (requires_grad=False): its curvature needs gradients. Unfreeze it, exclude it, "
                "or prune it with MagnitudePruning"
            )
        if not t.is_layer_weight:
            raise ValueError(
                f"{t.name!r} is not the weight of an nn.Linear/nn.Conv1d/2d/3d layer, so its curvature cannot "
                "be captured; exclude it (exclude=[...]) or prune it with MagnitudePruning"
            )
        if isinstance(t.module, nn.modules.conv._ConvNd) and t.module.groups != 1:
            raise ValueError(
                f"{t.name!r} is a grouped convolution (groups={t.module.groups}); curvature estimators support "
                f"groups=1 only. Exclude it (exclude=[{t.name!r}]) or prune it with MagnitudePruning"
            )


def unfold_conv_input(conv: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``(N, C, *spatial)`` -> ``(N, L, C * prod(kernel))`` patches, in the weight's layout.

    Works for Conv1d/2d/3d, any stride/dilation/padding (incl. ``"same"`` and non-zero padding
    modes), so ``patches @ weight.view(C_out, -1).T`` equals the convolution without bias.
    """
    nd = x.dim() - 2
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    pad = conv._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    for i in range(nd):
        k, s, d = conv.kernel_size[i], conv.stride[i], conv.dilation[i]
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    # (N, C, L1..Lnd, k1..knd) -> (N, L1..Lnd, C, k1..knd)
    perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
    x = x.permute(*perm)
    n = x.shape[0]
    return x.reshape(n, -1, conv.in_channels * int(torch.tensor(conv.kernel_size).prod()))


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Layer input as ``(N, T, d_in)`` rows."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return unfold_conv_input(module, x)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def grad_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output gradient as ``(N, T, d_out)`` rows."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def all_finite(items: Sequence[tuple[PruneTarget, Tensor, Tensor | None]]) -> bool:
    """Whether every captured input and gradient of a step is finite (one device sync)."""
    checks = [torch.isfinite(t).all() for _, x, g in items for t in (x, g) if t is not None]
    return bool(torch.stack(checks).all()) if checks else True


def in_checkpoint_recompute() -> bool:
    """Whether this forward is non-reentrant activation checkpointing recomputing a region in backward.

    That recomputation runs under checkpoint's own saved-tensor hooks, recognised by name (torch has
    no public flag). Should torch rename them, this says False and the recomputed call's input is
    kept until :meth:`LayerCapture.drain`, which still drops it (no gradient arrives for it): the
    statistics stay exact, only the memory grows.
    """
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    hooks = top(True) if top is not None else None
    return bool(hooks) and "_recomputation_hook" in getattr(hooks[1], "__qualname__", "")


class _EagerWhileCapturing:
    """``torch.compiler.set_stance("force_eager")`` while at least one capture is attached.

    Reference-counted, so captures of several pruners may attach and detach in any order; the
    stance in force before the first one (the user's) is restored after the last one. A capture
    that is garbage-collected while attached (its model gone, e.g. after a failed run) releases
    its hold too, so a lost capture never leaves the process eager.
    """

    def __init__(self) -> None:
        self._holders: dict[int, weakref.finalize] = {}
        self.stance: Any = None

    @property
    def holders(self) -> set[int]:
        return set(self._holders)

    def hold(self, owner: object) -> None:
        if id(owner) in self._holders:
            return
        set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
        if not self._holders and set_stance is not None:
            self.stance = set_stance("force_eager")  # sets it now, and remembers the stance before
        self._holders[id(owner)] = weakref.finalize(owner, self._drop, id(owner))

    def release(self, owner: object) -> None:
        finalizer = self._holders.get(id(owner))
        if finalizer is not None:
            finalizer.detach()
            self._drop(id(owner))

    def _drop(self, key: int) -> None:
        if self._holders.pop(key, None) is not None and not self._holders and self.stance is not None:
            self.stance.__exit__(None, None, None)  # back to the stance before the first hold
            self.stance = None


EAGER_WHILE_CAPTURING = _EagerWhileCapturing()


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the parts of ``model`` that run under ``torch.compile``, where they can be seen:
    ``torch.compile(module)`` children, ``module.compile()``, and Lightning's ``torch.compile`` of a
    LightningModule. (A compiled free function or bound method cannot be found.)"""
    return [
        name or type(m).__name__
        for name, m in model.named_modules()
        if type(m).__name__ == "OptimizedModule"
        or getattr(m, "_compiled_call_impl", None) is not None
        or getattr(m, "_compiler_ctx", None)
    ]


def per_sample_factor(
    batch_size: int, *, reduction: str, accumulate: int, loss_scale: float, terms: float | None = None
) -> float:
    """Multiplier of hook gradients: ``sqrt(N / s) * accumulate / loss_scale`` (the module docstring).

    ``terms`` is ``1/s``, the batch's loss terms as :meth:`LossTerms.weight` counts them; ``None``:
    one term per sample (``batch_size`` for ``reduction="mean"``, 1 for ``"sum"``).
    """
    if terms is None:
        terms = float(batch_size) if reduction == "mean" else 1.0
    return math.sqrt(batch_size * terms) * accumulate / loss_scale


Call = tuple[str, float, float]  # a loss call: (reduction, terms, value)


def loss_weight(calls: Sequence[Call], loss: float) -> tuple[float | None, float | None]:
    """``(1/s, terms)`` of a batch whose loss is ``loss`` and whose loss calls were ``calls``: ``1/s``
    for :func:`per_sample_factor` and the terms the call counted; ``(None, None)`` when the calls do not
    say (none, or several), where :func:`per_sample_factor` counts one term per sample."""
    if len(calls) != 1:
        return None, None
    reduction, terms, value = calls[0]
    ratio = value / loss if loss != 0 and value != 0 and math.isfinite(value / loss) else 1.0
    return (terms if reduction == "mean" else 1.0) * ratio, terms


class LossTerms(TorchFunctionMode):
    """While active, records the loss's calls to ``F.cross_entropy`` / ``F.nll_loss``: how many terms
    they average over, so that :func:`per_sample_factor` counts tokens, not sequences.

    Only scalars are kept (no tensor, no graph). A call made inside another torch function is not
    seen (the mode is off inside its own handler), so ``F.cross_entropy`` counts once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.inert = False  # left on the stack under another mode (see _LossWatch.release): records nothing

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func is F.cross_entropy or func is F.nll_loss) and not self.inert:
            bound = dict(zip(("input", "target", "weight"), args)) | kwargs
            reduction = bound.get("reduction", "mean")
            if reduction in ("mean", "sum") and isinstance(out, Tensor) and out.numel() == 1:
                target = bound["target"]
                if target.is_floating_point():  # class probabilities: every row is a term
                    terms = torch.tensor(1.0 if target.dim() == 1 else float(target.numel() // target.shape[1]))
                else:  # what torch divides a mean by: the non-ignored rows, weighted by their class
                    valid = target != bound.get("ignore_index", -100)
                    weight = bound.get("weight")
                    terms = valid.sum() if weight is None else weight[target.masked_fill(~valid, 0)][valid].sum()
                self.calls.append((reduction, float(terms), float(out.detach())))
        return out

    def weight(self, loss: float) -> tuple[float | None, float | None]:
        """:func:`loss_weight` of the calls seen since :meth:`reset`."""
        return loss_weight(self.calls, loss)

    def reset(self) -> None:
        self.calls.clear()


class _LossWatch:
    """One :class:`LossTerms` on the function-mode stack while any capture window watches training steps.

    Shared and reference-counted: several pruners' windows may begin and end their batches in the
    same order (callbacks run in list order), which separate modes, popped last-in first-out, could
    not do. Each window reads the calls appended since its own cursor.
    """

    def __init__(self) -> None:
        self.mode: LossTerms | None = None
        self._holders: set[int] = set()

    def hold(self, owner: object) -> LossTerms:
        if self.mode is None:
            self.mode = LossTerms()
            self.mode.__enter__()
        self._holders.add(id(owner))
        return self.mode

    def release(self, owner: object) -> None:
        self._holders.discard(id(owner))
        if self._holders or self.mode is None:
            return
        mode, self.mode = self.mode, None
        stack = torch.overrides._get_current_function_mode_stack()
        if stack and stack[-1] is mode:
            mode.__exit__(None, None, None)
        else:  # a mode pushed during the step is still above ours: never pop another's; ours stays, inert
            mode.inert = True
            warnings.warn(
                "lightning-prune: a torch function mode entered during a training step was not exited by the step's "
                "end, so the pruner's loss-term watch stays under it (inert) instead of being removed",
                stacklevel=2,
            )


LOSS_WATCH = _LossWatch()


class LayerCapture:
    """Keeps (input, output-gradient) pairs of the target layers for the current batch.

    ``inputs_only=True`` keeps just the inputs, also of forward passes without autograd: what
    label-free statistics (layer-wise OBS's ``E[x x^T]``) need from a calibration pass.
    """

    def __init__(self, targets: Sequence[PruneTarget], inputs_only: bool = False) -> None:
        check_hookable(targets, gradients=not inputs_only)
        self.targets = list(targets)
        self.inputs_only = inputs_only
        self._inputs: dict[str, list[Tensor]] = {}
        self._grads: dict[str, dict[int, Tensor]] = {}
        self._outputs: list[Tensor] = []  # the hooked outputs of this pass (what a sharded model differentiates)
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self._handles:
            return
        EAGER_WHILE_CAPTURING.hold(self)  # compiled graphs would skip the hooks (module docstring)
        for t in self.targets:
            self._handles.append(t.module.register_forward_hook(self._forward_hook(t.name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
        EAGER_WHILE_CAPTURING.release(self)

    def samples(self) -> int | None:
        """The current batch's number of samples: the leading dimension of the captured inputs."""
        return next((int(xs[0].shape[0]) for xs in self._inputs.values() if xs), None)

    def clear(self) -> None:
        self._inputs.clear()
        self._grads.clear()
        self._outputs.clear()

    def grad(self, output: Tensor, grad_outputs: Tensor | None = None, retain_graph: bool = False) -> None:
        """Backpropagate ``output`` far enough for the gradient hooks, with ``torch.autograd.grad`` (no
        ``.grad`` of the model is touched): with respect to the target weights, or, when FSDP2 shards
        them (their DTensors are not leaves of the graph, the unsharded copies are), to the hooked
        layer outputs, which reaches the same hooks."""
        sharded = any(t.sharded for t in self.targets)
        inputs = list(self._outputs) if sharded else [t.param for t in self.targets]
        if inputs:
            torch.autograd.grad(output, inputs, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True)

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs = self._inputs.setdefault(name, [])
            if self.inputs_only:
                inputs.append(args[0].detach())
                return
            # validation/eval forwards inside the window carry no gradient: ignore them; so do
            # use_reentrant=True checkpointed forwards, whose recomputation in backward is captured
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
                return
            # use_reentrant=False: the recomputation gets no gradient (the first forward does); without
            # this it would only hold a second copy of the input until drain() dropped it
            if in_checkpoint_recompute():
                return
            grads = self._grads.setdefault(name, {})
            idx = len(inputs)
            inputs.append(args[0].detach())

            def grad_hook(g: Tensor) -> None:
                grads[idx] = g.detach()

            output.register_hook(grad_hook)
            self._outputs.append(output)

        return hook

    def drain(self, keep_inputs: bool = False) -> Iterator[tuple[PruneTarget, Tensor, Tensor | None]]:
        """Yield ``(target, x_rows, g_rows)`` (float32, unscaled) per layer and clear the buffers.

        ``g_rows`` is ``None`` with ``inputs_only``. A layer called several times in one step
        contributes all its calls as extra rows ``T`` of the same samples (its per-sample gradient
        is the sum over calls). ``keep_inputs`` clears only the gradients: the next backward pass
        through the same forward (another output direction) fills them again.
        """
        for t in self.targets:
            xs, gs = self._inputs.get(t.name, []), self._grads.get(t.name, {})
            idx = range(len(xs)) if self.inputs_only else [i for i in range(len(xs)) if i in gs]
            if not idx:
                continue
            x = [input_rows(t.module, xs[i].float()) for i in idx]
            if len({a.shape[0] for a in x}) != 1:
                raise ValueError(f"layer {t.module_name!r} was called with different batch sizes in one step")
            g = None if self.inputs_only else [grad_rows(t.module, gs[i].float()) for i in idx]
            yield t, _rows(x), (None if g is None else _rows(g))
        if keep_inputs:
            for grads in self._grads.values():
                grads.clear()  # emptied in place: the gradient hooks hold these dicts
        else:
            self.clear()


def _rows(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
