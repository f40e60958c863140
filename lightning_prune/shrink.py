"""``shrink``: turn structures pruned with ``pattern="channels"`` into a smaller dense model.

Masks make a model sparse, not smaller. After structured pruning every removed structure has zero
consumer columns, so it contributes nothing; :func:`shrink` deletes it physically: the producer
rows (and biases, and per-channel BatchNorm entries), the consumer columns, and for attention the
whole heads (Hugging Face LLaMA-style attention infers the number of heads from the projections'
shapes, so fewer heads need no config change; ``num_heads``/``num_key_value_heads`` attributes,
where a model class keeps them, are updated). The families are the ones
:func:`lightning_prune.graph.discover` finds, so what pruning could remove, shrinking can.

The result computes what the masked model computes (checked on ``example_inputs`` when given).
Its :attr:`Shrunk.plan` (kept structures per family, JSON-friendly) rebuilds the same shapes on a
freshly built model, ``shrink(fresh, plan=plan)``, so a saved ``state_dict`` of the small model
loads into it.
"""

from __future__ import annotations

import copy
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.graph import Family, Slot, discover
from lightning_prune.targets import is_hf_conv1d


@dataclass
class Shrunk:
    model: nn.Module
    plan: dict[str, list[int]]  # family -> kept structure indices
    removed: dict[str, int]  # family -> structures removed
    notes: list[str] = field(default_factory=list)  # what discovery left alone
    max_abs_diff: float | None = None  # outputs against the masked model, on example_inputs
    params_before: int = 0
    params_after: int = 0


def _matrix(module: nn.Module) -> Tensor:
    """The ``(d_out, d_in)`` view of a layer's weight (Conv unfolded, HF Conv1D transposed)."""
    w = module.weight.detach()
    return w.T if is_hf_conv1d(module) else w.reshape(w.shape[0], -1)


def _removable(model: nn.Module, family: Family) -> Tensor:
    """Structures whose consumer columns are exactly zero in every consumer: they contribute nothing."""
    gone = torch.ones(family.size, dtype=torch.bool)
    for s in family.consumers:
        m = _matrix(model.get_submodule(s.module))
        gone &= (m.reshape(m.shape[0], family.size, s.width) == 0).all(2).all(0).cpu()
    return gone


def _index(kept: Tensor, width: int) -> Tensor:
    return (kept[:, None] * width + torch.arange(width)).flatten()


def _param(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))


def _shrink_out(module: nn.Module, slot: Slot, kept: Tensor) -> None:
    rows = _index(kept, slot.width).to(module.weight.device)
    with torch.no_grad():
        if is_hf_conv1d(module):
            _param(module, "weight", module.weight[:, rows])
            module.nf = rows.numel()
        else:
            _param(module, "weight", module.weight[rows])
        if getattr(module, "bias", None) is not None:
            _param(module, "bias", module.bias[rows])
    if isinstance(module, nn.Linear):
        module.out_features = rows.numel()
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = rows.numel()


def _shrink_in(module: nn.Module, slot: Slot, kept: Tensor) -> None:
    with torch.no_grad():
        if isinstance(module, nn.modules.conv._ConvNd):  # a channel's kh*kw columns are one input channel
            _param(module, "weight", module.weight[:, kept.to(module.weight.device)])
            module.in_channels = kept.numel()
            return
        cols = _index(kept, slot.width).to(module.weight.device)
        if is_hf_conv1d(module):
            _param(module, "weight", module.weight[cols])
        else:
            _param(module, "weight", module.weight[:, cols])
            module.in_features = cols.numel()


def _shrink_norm(norm: nn.Module, kept: Tensor) -> None:
    idx = kept.to(norm.running_mean.device if norm.running_mean is not None else "cpu")
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(norm, name, None) is not None:
                _param(norm, name, getattr(norm, name)[idx])
        for name in ("running_mean", "running_var"):
            if getattr(norm, name, None) is not None:
                setattr(norm, name, getattr(norm, name)[idx].clone())
    norm.num_features = kept.numel()


def _apply(model: nn.Module, family: Family, kept: Tensor) -> None:
    for s in family.producers:
        _shrink_out(model.get_submodule(s.module), s, kept)
    for name in family.norms:
        _shrink_norm(model.get_submodule(name), kept)
    for s in family.consumers:
        _shrink_in(model.get_submodule(s.module), s, kept)
    if family.kind == "heads":
        attention = model.get_submodule(family.name)
        rep = getattr(attention, "num_key_value_groups", 1)
        for attr, n in (("num_heads", kept.numel() * rep), ("num_key_value_heads", kept.numel())):
            if isinstance(getattr(attention, attr, None), int):
                setattr(attention, attr, n)


def _output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"shrink: cannot compare the model's output of type {type(out).__name__}; pass example_inputs=None")


def _check_kept(name: str, kept: Any, size: int) -> None:
    """``plan[name]`` must list distinct structure indices in ``0..size-1``, at least one: a repeated
    index would duplicate a structure (a different model), and an empty family would leave layers
    with no outputs or inputs."""
    where = f"`plan[{name!r}]`"
    if isinstance(kept, (str, bytes, Mapping)) or not isinstance(kept, Iterable):
        raise ValueError(f"{where} must be a list of kept structure indices, got {kept!r}")
    values = kept.tolist() if isinstance(kept, Tensor) else list(kept)
    if bad := [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral)]:
        raise ValueError(f"{where} must hold integer structure indices, got {bad[:5]}")
    values = [int(v) for v in values]
    if not values:
        raise ValueError(
            f"{where} keeps no structure of the {size}; every family keeps at least one (pruning's floor does)"
        )
    if outside := sorted({v for v in values if not 0 <= v < size}):
        raise ValueError(f"{where} has indices {outside[:5]} outside 0..{size - 1}")
    if repeated := sorted(v for v, n in Counter(values).items() if n > 1):
        raise ValueError(f"{where} repeats indices {repeated[:5]}; each kept structure is listed once")


@torch.no_grad()
def _run(model: nn.Module, inputs: Any) -> Tensor:
    training = model.training
    model.eval()
    try:
        if isinstance(inputs, Mapping):
            return _output(model(**inputs)).detach().clone()
        return _output(model(inputs)).detach().clone()
    finally:
        model.train(training)


def shrink(
    model: nn.Module,
    *,
    example_inputs: Any = None,
    plan: Mapping[str, list[int]] | None = None,
    inplace: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Shrunk:
    """Rebuild the pruned structures of ``model`` as smaller dense layers.

    Args:
        model: a model pruned with ``pattern="channels"`` (any ``nn.Module`` or LightningModule).
        example_inputs: a batch (tensor, or a dict of keyword arguments) on which the shrunk
            model's outputs must equal the original's within ``atol + rtol * max|output|`` (float32
            rounding grows with the logits); otherwise it raises and the
            original is untouched.
        plan: kept structures per family (``Shrunk.plan`` of an earlier call): rebuild a freshly
            built model to those shapes, whatever its weights, to load a small ``state_dict``.
            Each listed family keeps at least one structure, each index once; a bad plan is refused
            before anything changes.
        inplace: modify ``model`` itself (a pruning callback's masks then no longer fit it)
            instead of a deep copy.
    """
    families, notes = discover(model)
    by_name = {f.name: f for f in families}
    if plan is not None:
        if not isinstance(plan, Mapping):
            raise ValueError(f"`plan` must map family names to kept structure indices (Shrunk.plan), got {plan!r}")
        if unknown := sorted(set(plan) - set(by_name)):
            raise ValueError(f"`plan` names families {unknown[:5]} that {type(model).__name__} does not have")
        for name, kept in plan.items():  # all checked before any layer changes (inplace=True loses nothing)
            _check_kept(name, kept, by_name[name].size)
    reference = _run(model, example_inputs) if example_inputs is not None else None
    before = sum(p.numel() for p in model.parameters())
    out = model if inplace else copy.deepcopy(model)
    kept_plan, removed = {}, {}
    for f in families:
        if plan is not None:
            if f.name not in plan:
                continue
            kept = torch.as_tensor(list(plan[f.name]), dtype=torch.long)
        else:
            kept = (~_removable(model, f)).nonzero().flatten()
        if kept.numel() == f.size:
            continue
        _apply(out, f, kept)
        kept_plan[f.name], removed[f.name] = kept.tolist(), f.size - kept.numel()
    result = Shrunk(out, kept_plan, removed, notes, params_before=before)
    result.params_after = sum(p.numel() for p in out.parameters())
    if reference is not None:
        got = _run(out, example_inputs)
        diff = float((got - reference).abs().max()) if got.shape == reference.shape else float("inf")
        result.max_abs_diff = diff
        if not diff <= atol + rtol * float(reference.abs().max()):
            raise RuntimeError(
                f"shrink: the shrunk model's outputs differ from the original's by {diff:.3g} (> atol={atol} + "
                f"rtol={rtol} x max|output|) on "
                "example_inputs; a structure was wired in a way the grouping did not see"
                + (" (the original model was modified: inplace=True)" if inplace else "; the original is untouched")
            )
    return result
