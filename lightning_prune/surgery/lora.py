"""LoRA on a pruned model without losing its zeros: the masked merge.

Fine-tuning a pruned model through PEFT (``get_peft_model`` with LoRA on the pruned Linears) keeps
the base weights' zeros by itself: PEFT freezes the base weights, and a pruner given to the same
``Trainer.fit`` keeps its masks on them (masks are bound to parameters, so PEFT's ``base_layer``
renaming does not lose them). The zeros are lost at the **merge**: ``merge_and_unload`` adds the
adapters' dense product ``scale · B · A`` to every weight. :func:`masked_merge` merges and then sets
the pruned entries back to exactly 0.0, so the merged weight is ``W + mask ⊙ (scale · B · A)``: kept
entries bit for bit those of PEFT's own merge, pruned ones zero (N:M patterns included, since the
mask is the pattern). What dropping the adapters' pruned entries costs is measured in
``benchmarks/RESULTS.md``; keeping the adapters separate costs nothing and keeps the zeros too.

No peft import here: LoRA layers are recognised by PEFT's ``get_base_layer`` and
``merge_and_unload`` API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.masks import apply_masks_
from lightning_prune.engine.pruner import Pruner, as_pruner
from lightning_prune.engine.targets import match_names
from lightning_prune.runtime.distributed import warn


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """PEFT's tuner layers in ``model`` (modules holding a ``base_layer`` and adapters), by name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if callable(getattr(m, "get_base_layer", None)) and isinstance(getattr(m, "base_layer", None), nn.Module)
    ]


def _masks_by_param(model: nn.Module, masks: Mapping[str, Tensor] | Pruner | None) -> dict[int, tuple[str, Tensor]]:
    """``id(base weight) -> (name, mask)`` for every weight that has a mask (the name as ``masks`` gives it)."""
    named = dict(model.named_parameters())
    out: dict[int, tuple[str, Tensor]] = {}
    if masks is None:  # the zeros each base weight holds now
        for name, layer in adapted_layers(model):
            weight = getattr(layer.get_base_layer(), "weight", None)
            if isinstance(weight, Tensor):
                out[id(weight)] = (f"{name}.base_layer.weight", weight.detach() != 0)
        return out
    if (pruner := as_pruner(masks)) is not None:  # bound to its parameters by identity, whatever they are named now
        targets, held = pruner.targets, {id(p) for p in named.values()}
        if missing := [t.name for t in targets if id(t.param) not in held]:
            raise ValueError(
                f"`masks`: the {type(masks).__name__} is bound to the parameters of the model it pruned, and "
                f"{len(missing)} of its {len(targets)} ({missing[:3]}{' ...' if len(missing) > 3 else ''}) are not "
                f"in this {type(model).__name__}: it wraps another copy of that model (get_peft_model(copy.deepcopy("
                "model)) holds new parameters). Pass masks=pruner.masks (the dict, matched by name), or call "
                "get_peft_model on the model the pruner was bound to. Nothing was merged"
            )
        current = pruner.current_masks()
        return {id(t.param): (t.name, current[t.name].detach()) for t in targets}
    if not isinstance(masks, Mapping):
        raise ValueError(f"`masks` must be None, a pruner or a mapping of parameter names to masks, got {masks!r}")
    matched = match_names(list(masks), model, "masked_merge's")
    for wanted, name in matched.items():
        out[id(named[name])] = (wanted, masks[wanted])
    return out


def _check_adapter_names(model: nn.Module, adapter_names: Sequence[str] | None) -> list[str] | None:
    """PEFT merges the names a layer has and skips the others, then unloads every layer: a name that is no
    adapter (or a string, read as its letters) would drop the adapters unmerged."""
    if adapter_names is None:
        return None
    config = getattr(model, "peft_config", None)
    have = sorted(config) if isinstance(config, Mapping) else None
    if isinstance(adapter_names, str):
        raise ValueError(
            f"`adapter_names={adapter_names!r}` must be a list of adapter names ([{adapter_names!r}]); "
            f"this model has {have}"
        )
    names = list(adapter_names)
    if not names:
        raise ValueError(
            "`adapter_names=[]` names no adapter: nothing would be merged and the adapters dropped "
            "(model.unload() drops them on purpose)"
        )
    if have is not None and (unknown := [n for n in names if n not in have]):
        raise ValueError(
            f"`adapter_names={names}` names {unknown}, not adapters of this model (it has {have}): PEFT would skip "
            "them in every layer and unload the adapters unmerged. Nothing was merged"
        )
    return names


def _check_consistent(params: Mapping[int, Tensor], by_param: Mapping[int, tuple[str, Tensor]]) -> None:
    """A pruned model's weights are zero wherever its masks say pruned: masks that call non-zero entries
    pruned are another model's (or another checkpoint's), and merging with them would zero kept weights."""
    wrong = []
    for key, (name, mask) in by_param.items():
        weight = params[key].detach()
        pruned = ~mask.to(weight.device)
        if (bad := int((weight[pruned] != 0).sum())) > 0:
            wrong.append(f"{name}: {bad} of its {int(pruned.sum())} pruned entries")
    if wrong:
        raise ValueError(
            f"`masks` call entries pruned where the base weights are non-zero, in {len(wrong)} of {len(by_param)} "
            f"parameters ({'; '.join(wrong[:4])}{' ...' if len(wrong) > 4 else ''} are non-zero). The "
            "weights of a pruned model are zero wherever its masks say pruned: these are masks of another model or "
            "another checkpoint of it (or the base weights were trained after pruning without the masks), and merging "
            "with them would zero kept weights and keep pruned ones. Pass this model's masks (the pruner that pruned "
            "it, its pruner.masks, or masks=None for the zeros its base weights hold). Nothing was merged"
        )


def _warn_uncovered(model: nn.Module, by_param: Mapping[int, tuple[str, Tensor]]) -> None:
    """Adapted base weights that hold zeros but have no mask: the merge fills those zeros."""
    uncovered = []
    for name, layer in adapted_layers(model):
        weight = getattr(layer.get_base_layer(), "weight", None)
        if isinstance(weight, Tensor) and id(weight) not in by_param and (zeros := int((weight.detach() == 0).sum())):
            uncovered.append(f"{name} ({zeros} of {weight.numel()})")
    if uncovered:
        more = " ..." if len(uncovered) > 4 else ""
        warn(
            f"masked_merge: no mask for the adapted base weights of {uncovered[:4]}{more}, which hold zeros: the "
            "merge fills them. masks=None keeps the zeros every adapted weight holds"
        )


def _check_finite(model: nn.Module, adapter_names: Sequence[str] | None) -> None:
    """``safe_merge``: PEFT checks each layer as it merges it, leaving the layers before a broken one merged;
    check every (vanilla LoRA) layer first. Other layer kinds are still checked by PEFT as it merges."""
    for name, layer in adapted_layers(model):
        delta, variants = getattr(layer, "get_delta_weight", None), getattr(layer, "lora_variant", {})
        weight = getattr(layer.get_base_layer(), "weight", None)
        for adapter in adapter_names if adapter_names is not None else getattr(layer, "active_adapters", []):
            if callable(delta) and isinstance(weight, Tensor) and adapter in getattr(layer, "lora_A", {}):
                if adapter in variants:
                    continue
                with torch.no_grad():
                    finite = bool(torch.isfinite(weight + delta(adapter).to(weight.dtype)).all())
                if not finite:
                    raise ValueError(
                        f"safe_merge: adapter {adapter!r} of {name} gives non-finite merged weights (NaN or inf in "
                        "its LoRA weights). Nothing was merged"
                    )


def masked_merge(
    model: nn.Module,
    masks: Mapping[str, Tensor] | Pruner | None = None,
    *,
    adapter_names: Sequence[str] | None = None,
    safe_merge: bool = False,
) -> nn.Module:
    """Merge a PEFT model's LoRA adapters into its base weights keeping the base weights' zeros; unload.

    Args:
        model: a PEFT model (``get_peft_model(...)``) whose base weights were pruned.
        masks: which entries stay zero (True = kept). ``None``: the zeros each adapted base weight
            holds now; a pruner (bound to the model's parameters by identity: the model it pruned, not a
            copy); or a mapping of parameter names to bool masks (``pruner.masks``, a checkpoint's),
            matched to the PEFT model's names by a unique suffix (``base_layer`` ignored). The base
            weights must be zero wherever a mask says pruned (masks of another model are refused).
        adapter_names, safe_merge: passed to PEFT's ``merge_and_unload``; the names must be the
            model's adapters, and ``safe_merge`` checks every layer before any merges.

    Returns the base model with merged weights (PEFT's ``merge_and_unload`` result), each masked weight
    ``W + mask ⊙ Δ`` and checked to hold zeros at every pruned entry. Every check runs before anything
    merges: a refused model is left as it was.
    """
    merge = getattr(model, "merge_and_unload", None)
    if not callable(merge):
        raise ValueError(f"`model` must be a PEFT model with merge_and_unload(), got {type(model).__name__}")
    if not adapted_layers(model):
        raise ValueError(f"`model` ({type(model).__name__}) has no LoRA layers to merge")
    names = _check_adapter_names(model, adapter_names)
    # layers whose adapters were merged already (merge_adapter()): their base weights hold W + Δ, no zeros
    merged_in: dict[int, str] = {}
    for layer_name, layer in adapted_layers(model):
        weight = getattr(layer.get_base_layer(), "weight", None)
        if getattr(layer, "merged", False) and isinstance(weight, Tensor):
            merged_in[id(weight)] = layer_name
    if masks is None and merged_in:
        raise ValueError(
            f"`masks=None` keeps the zeros the base weights hold, and {len(merged_in)} adapted layers "
            f"({list(merged_in.values())[:3]}) have their adapters merged already (merge_adapter()): their weights "
            "hold W + Δ, no zeros to keep. Pass the masks (the pruner that pruned the model, or pruner.masks), or "
            "call model.unmerge_adapter() first. Nothing was merged"
        )
    by_param = _masks_by_param(model, masks)
    params = {id(p): p for p in model.parameters()}
    for key, (name, mask) in by_param.items():
        param = params.get(key)
        if param is None or mask.shape != param.shape:
            shape = None if param is None else tuple(param.shape)
            raise ValueError(f"`masks[{name!r}]` has shape {tuple(mask.shape)}, its weight {shape}")
        if mask.dtype != torch.bool:
            raise ValueError(
                f"`masks[{name!r}]` is {mask.dtype}; masks are bool (True = kept): pass mask.bool() (or mask != 0)"
            )
    if masks is not None:  # the merged ones cannot be checked: their pruned entries hold Δ
        _check_consistent(params, {k: v for k, v in by_param.items() if k not in merged_in})
        _warn_uncovered(model, by_param)
    if safe_merge:
        _check_finite(model, names)
    kwargs: dict[str, Any] = {"progressbar": False, "safe_merge": safe_merge}
    if names is not None:
        kwargs["adapter_names"] = names
    merged = merge(**kwargs)
    # PEFT merges into the base weights in place (the same Parameter objects): set their pruned entries back
    held = {id(p): p for p in merged.parameters()}
    named = {name: held[k] for k, (name, _) in by_param.items() if k in held}
    apply_masks_(named, {name: mask.to(named[name].device) for k, (name, mask) in by_param.items() if name in named})
    for name, p in named.items():
        mask = by_param[id(p)][1].to(p.device)
        if bool((p.detach()[~mask] != 0).any()):  # never expected: apply_masks_ sets exact zeros
            raise RuntimeError(f"masked_merge: {name} holds non-zeros at pruned entries after the merge")
    return merged
