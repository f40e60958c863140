"""Which parameters get pruned.

By default: the ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` (subclasses included) and
Hugging Face ``Conv1D`` (GPT-2's layers, weight stored in x out: :meth:`PruneTarget.matrix` gives
the core its ``(out, in)`` view, masks stay in the weight's own layout).
Never biases, norm layers or embeddings unless the user names them explicitly through
``parameters=[...]``. These weights are left out of the defaults, with the reason recorded
(the pruner warns, and its per-layer table lists them):

* frozen ones (``requires_grad=False``): nobody trains them, so nothing would fine-tune around
  their pruning;
* tied ones, a ``Parameter`` held by several modules (a language model's ``lm_head`` tied to its
  embedding): each holder sees a different input, so no single layer's statistics describe it;
* a language model's output head: the module a Hugging Face model returns from
  ``get_output_embeddings()``, or any module named ``lm_head``. SparseGPT, Wanda and llm-compressor
  leave it dense; it maps to the vocabulary, and every logit depends on all of it. A classifier's
  last Linear stays a default target: it is small, and the global allocations keep it mostly dense;
* adapters (PEFT's LoRA ``lora_A``/``lora_B``): they train beside the base weights they adapt.

Named explicitly (``parameters=[...]``), they are pruned; one tensor has one mask, so a tie stays
consistent. ``include``/``exclude`` patterns match every name a tied parameter has; its target
name is the first one ``named_parameters()`` gives. Targets are resolved at ``on_fit_start``,
i.e. after ``configure_model`` has built the layers and the strategy moved them to their device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.runtime import sharding

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's layers): a Linear whose weight is
    stored in x out. Recognised by name and shape, so the core needs no transformers import."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def is_prunable_layer(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_TYPES) or is_hf_conv1d(module)


@dataclass(frozen=True)
class PruneTarget:
    """One prunable parameter and the module that owns it."""

    name: str  # parameter name in ``LightningModule.named_parameters()``
    module_name: str
    module: nn.Module
    param_name: str  # attribute name on ``module`` (``"weight"`` by default)
    holders: tuple[str, ...] = ()  # every module that holds this parameter (more than one: tied)

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    @property
    def is_layer_weight(self) -> bool:
        """True for the weight of a Linear/Conv/HF Conv1D layer: the only kind curvature hooks understand."""
        return self.param_name == "weight" and is_prunable_layer(self.module)

    # The core works on (outputs, inputs) matrices, a Conv's input taken unfolded (``C_in * kernel``);
    # these convert between that layout and the parameter's own, which masks and checkpoints keep.
    @property
    def transposed(self) -> bool:
        """The weight is stored inputs x outputs (HF ``Conv1D``)."""
        return self.param_name == "weight" and is_hf_conv1d(self.module)

    @property
    def shape2d(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight as a matrix."""
        shape = self.param.shape
        if self.transposed:
            return int(shape[1]), int(shape[0])
        return int(shape[0]), math.prod(int(s) for s in shape[1:]) if len(shape) > 0 else 1

    def matrix(self, tensor: Tensor | None = None) -> Tensor:
        """``tensor`` (default: the whole weight, detached; gathered when sharded), laid out like the
        weight, as ``(d_out, d_in)``."""
        t = sharding.gather(self.param) if tensor is None else tensor  # or this rank's block of rows
        return t.T if self.transposed else t.reshape(t.shape[0], -1)

    # Under FSDP2 the parameter is a DTensor and this rank holds a block of its rows (lightning_prune.runtime.sharding):
    # masks and scores are kept for that block, whole layers are gathered one at a time.
    @property
    def sharded(self) -> bool:
        return sharding.is_sharded(self.param)

    @property
    def local_param(self) -> Tensor:
        """The weight's local shard (the weight itself when not sharded), detached, sharing storage."""
        return sharding.local(self.param.detach())

    def local(self, full: Tensor) -> Tensor:
        """This rank's block of ``full``, a tensor laid out like the whole weight."""
        return sharding.shard_of(self.param, full)

    def gather(self, part: Tensor) -> Tensor:
        """The whole-layer tensor from this rank's block ``part`` (a collective when sharded)."""
        return sharding.gather(self.param, part)

    def write_(self, full: Tensor) -> None:
        """Write a whole-layer weight (the weight's layout) into the parameter (its shard when sharded)."""
        if self.sharded:
            sharding.write_(self.param, full)
        else:
            with torch.no_grad():
                self.param.copy_(full.to(self.param.dtype))

    def unmatrix(self, matrix: Tensor) -> Tensor:
        """The inverse of :meth:`matrix`: a ``(d_out, d_in)`` tensor in the weight's own layout."""
        if self.transposed:
            return (matrix if matrix.dim() == 2 else matrix.reshape(self.shape2d)).T
        if self.param.dim() == 0:
            return matrix.reshape(())
        return matrix.reshape(-1, *self.param.shape[1:])  # the whole weight, or this rank's block of rows


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _check_patterns(arg: str, patterns: Sequence[str] | None) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"`{arg}` must be a list of glob patterns (e.g. ['encoder.*']), got {patterns!r}")


def resolve_targets(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    parameters: Sequence[Tensor] | None = None,
    skipped: list[tuple[str, str]] | None = None,
    allow_empty: bool = False,
) -> list[PruneTarget]:
    """Pick the parameters to prune, in ``named_parameters()`` order.

    ``include``/``exclude`` are glob patterns (``fnmatch``, case-sensitive) over parameter names
    such as ``"encoder.layers.*.weight"``. ``parameters`` is an explicit list of parameter objects
    of ``model``: it replaces the default Linear/Conv filter, and the patterns still apply.
    ``skipped``, if given, receives ``(name, reason)`` for the defaults left out (module docstring).
    ``allow_empty``: return ``[]`` instead of raising when nothing is selected (a pruner whose masks
    already name its parameters).
    """
    _check_patterns("include", include)
    _check_patterns("exclude", exclude)
    skipped = [] if skipped is None else skipped
    holders, aliases = _holders(model)

    named = dict(model.named_parameters())
    heads = output_heads(model)
    adapters = adapter_parameters(model)
    if parameters is not None:
        by_id = {id(p): n for n, p in named.items()}
        candidates = []
        for i, p in enumerate(parameters):
            if id(p) not in by_id:
                raise ValueError(
                    f"`parameters[{i}]` (shape {tuple(p.shape)}) is not a parameter of {type(model).__name__}"
                )
            candidates.append(by_id[id(p)])
    else:
        candidates = []
        for n, p in named.items():
            own = holders[id(p)]
            if not any(attr == "weight" and is_prunable_layer(m) for _, m, attr in own):
                continue
            if id(p) in adapters:
                _skip(skipped, n, "adapter (PEFT LoRA and the like): trained beside the base weights, never pruned")
            elif len(own) > 1:
                others = [h for h, _, _ in own]
                _skip(skipped, n, f"tied: held by {others}; name it in parameters=[...] to prune it")
            elif any(id(m) in heads for _, m, _ in own):
                _skip(
                    skipped, n, "output head (lm_head): left dense, as SparseGPT/Wanda do; name it in parameters=[...]"
                )
            elif not p.requires_grad:
                _skip(skipped, n, "frozen (requires_grad=False); name it in parameters=[...] to prune it")
            else:
                candidates.append(n)

    def matches(n: str, patterns: Sequence[str]) -> bool:
        return any(_matches(alias, patterns) for alias in aliases[id(named[n])])

    chosen = [
        n for n in candidates if (include is None or matches(n, include)) and not (exclude and matches(n, exclude))
    ]
    if not chosen and not allow_empty:
        shown = ", ".join(candidates[:8]) + (" ..." if len(candidates) > 8 else "")
        # the weights the patterns did match, among those left out of the defaults, and why
        left = {n: why for n, why in skipped if include is not None and matches(n, include)} or dict(skipped)
        raise ValueError(
            f"No parameters to prune in {type(model).__name__}: include={include!r}, exclude={exclude!r} "
            f"matched none of the candidates [{shown or 'no Linear/Conv weights found'}]"
            + (f"; left out of the defaults: {left}" if left else "")
        )
    return [_target(n, holders[id(named[n])]) for n in chosen]


Holders = dict[int, list[tuple[str, nn.Module, str]]]


def _holders(model: nn.Module) -> tuple[Holders, dict[int, list[str]]]:
    """``id(param) -> [(module name, module, attribute)]`` of every module holding it, and every name
    (alias) each parameter has."""
    holders: Holders = {}
    aliases: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            aliases.setdefault(id(p), []).append(full)
            if all(m is not module for _, m, _ in holders.get(id(p), [])):
                holders.setdefault(id(p), []).append((module_name, module, param_name))
    return holders, aliases


def _target(name: str, own: list[tuple[str, nn.Module, str]]) -> PruneTarget:
    # the holder that makes it a layer weight, if any: its hooks capture the layer's data
    module_name, module, attr = next((h for h in own if h[2] == "weight" and is_prunable_layer(h[1])), own[0])
    return PruneTarget(name, module_name, module, attr, tuple(h for h, _, _ in own))


def targets_of(model: nn.Module, params: Sequence[Tensor]) -> list[PruneTarget] | None:
    """The targets for these parameter objects in ``model`` (found by identity, named as ``model``
    names them now), or ``None`` if one of them is not a parameter of ``model``.

    Masks are bound to parameters, not names: wrapping a model (a LightningModule around a Hugging
    Face model, ``torch.compile``'s ``_orig_mod``, PEFT's ``base_layer``) renames the same tensors."""
    holders, _ = _holders(model)
    names = {id(p): n for n, p in model.named_parameters()}
    if any(id(p) not in names for p in params):
        return None
    return [_target(names[id(p)], holders[id(p)]) for p in params]


# module names that wrappers insert between a model's own names (compile, PEFT, FSDP1, checkpointing)
_WRAPPER_PARTS = frozenset({"_orig_mod", "base_layer", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def match_names(wanted: Sequence[str], model: nn.Module, what: str) -> dict[str, str]:
    """``wanted`` parameter names (from a checkpoint) -> this ``model``'s parameter names.

    A name matches itself; otherwise the parameter whose dotted name, wrapper parts removed, ends
    with the wanted one or is its end (``model.layers.0.mlp.up_proj.weight`` in a checkpoint of the
    bare Hugging Face model and ``model.model.layers.0.mlp.up_proj.base_layer.weight`` once a
    LightningModule and PEFT wrap it). The match must be one to one: an ambiguous or missing name
    raises a ``ValueError`` naming it, never a guess."""
    _, aliases = _holders(model)
    named = dict(model.named_parameters())
    canonical = {a: n for n in named for a in aliases[id(named[n])]}  # every alias -> the name used
    out: dict[str, str] = {}
    missing, ambiguous = [], {}
    for w in wanted:
        if w in canonical:
            out[w] = canonical[w]
            continue
        pw = _parts(w)
        found = {
            canonical[a]
            for a in canonical
            if (pa := _parts(a)) and (pa[-len(pw) :] == pw if len(pa) >= len(pw) else pw[-len(pa) :] == pa)
        }
        if len(found) == 1:
            out[w] = found.pop()
        elif found:
            ambiguous[w] = sorted(found)[:3]
        else:
            missing.append(w)
    if missing or ambiguous:
        raise ValueError(
            f"{what} masks name parameters that {type(model).__name__} does not have"
            + (f": no match for {missing[:5]}" if missing else "")
            + (f"; ambiguous {ambiguous}" if ambiguous else "")
            + " (masks follow a parameter through wrapping by a unique name suffix; check include/exclude/parameters "
            "and that this is the model the masks were computed on)"
        )
    taken: dict[str, str] = {}
    for w, n in out.items():
        if n in taken:
            raise ValueError(
                f"{what} masks {taken[n]!r} and {w!r} both match {type(model).__name__}'s parameter {n!r}: "
                "they cannot be bound one to one"
            )
        taken[n] = w
    return out


def adapter_parameters(model: nn.Module) -> set[int]:
    """``id``s of adapter parameters: what PEFT tuner layers hold under their ``adapter_layer_names``
    (LoRA's ``lora_A``/``lora_B``, ...). Recognised by that attribute, so the core needs no peft import."""
    out: set[int] = set()
    for module in model.modules():
        names = getattr(module, "adapter_layer_names", None)
        if not isinstance(names, (tuple, list)):
            continue
        for attr in names:
            part = getattr(module, attr, None)
            if isinstance(part, nn.Module):  # a ModuleDict or ParameterDict of adapters
                out.update(id(p) for p in part.parameters())
    return out


def output_heads(model: nn.Module) -> set[int]:
    """``id``s of a language model's output heads: ``get_output_embeddings()`` of any (Hugging Face)
    submodule, and modules named ``lm_head``."""
    heads = set()
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "lm_head":
            heads.add(id(module))
        getter = getattr(module, "get_output_embeddings", None)
        if callable(getter):
            try:
                head = getter()
            except (AttributeError, NotImplementedError, TypeError):
                continue
            if isinstance(head, nn.Module):
                heads.add(id(head))
    return heads


def _skip(skipped: list[tuple[str, str]], name: str, reason: str) -> None:
    skipped.append((name, reason))


def selection_key(
    include: Sequence[str] | None,
    exclude: Sequence[str] | None,
    parameters: Sequence[nn.Parameter] | None,
    names: Sequence[str] | None,
) -> dict[str, Any]:
    """What a pruner selects, for its checkpoint key: the patterns given, and explicit ``parameters`` by their
    ``names`` once a model has named them (else by shape)."""
    out: dict[str, Any] = {}
    if include is not None:
        out["include"] = list(include)
    if exclude is not None:
        out["exclude"] = list(exclude)
    if parameters is not None:
        out["parameters"] = list(names) if names else [tuple(p.shape) for p in parameters]
    return out
