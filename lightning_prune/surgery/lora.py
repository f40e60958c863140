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

from torch import Tensor, nn

from lightning_prune.engine.masks import apply_masks_
from lightning_prune.engine.pruner import Pruner, as_pruner
from lightning_prune.engine.targets import match_names


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """PEFT's tuner layers in ``model`` (modules holding a ``base_layer`` and adapters), by name."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if callable(getattr(m, "get_base_layer", None)) and isinstance(getattr(m, "base_layer", None), nn.Module)
    ]


def _masks_by_param(model: nn.Module, masks: Mapping[str, Tensor] | Pruner | None) -> dict[int, tuple[str, Tensor]]:
    """``id(base weight) -> (name, bool mask)`` for every adapted layer's base weight that has a mask."""
    named = dict(model.named_parameters())
    out: dict[int, tuple[str, Tensor]] = {}
    if masks is None:  # the zeros each base weight holds now
        for name, layer in adapted_layers(model):
            weight = getattr(layer.get_base_layer(), "weight", None)
            if isinstance(weight, Tensor):
                out[id(weight)] = (f"{name}.base_layer.weight", weight.detach() != 0)
        return out
    if (pruner := as_pruner(masks)) is not None:  # bound to its parameters by identity, whatever they are named now
        current = pruner.current_masks()
        return {id(t.param): (t.name, current[t.name].detach()) for t in pruner.targets}
    if not isinstance(masks, Mapping):
        raise ValueError(f"`masks` must be None, a pruner or a mapping of parameter names to masks, got {masks!r}")
    matched = match_names(list(masks), model, "masked_merge's")
    for wanted, name in matched.items():
        out[id(named[name])] = (name, masks[wanted])
    return out


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
            holds now; a pruner (bound to the model's parameters by identity); or a mapping of
            parameter names to bool masks (``pruner.masks``, a checkpoint's), matched to the PEFT
            model's names by a unique suffix (``base_layer`` ignored).
        adapter_names, safe_merge: passed to PEFT's ``merge_and_unload``.

    Returns the base model with merged weights (PEFT's ``merge_and_unload`` result), each masked weight
    ``W + mask ⊙ Δ`` and checked to hold zeros at every pruned entry.
    """
    merge = getattr(model, "merge_and_unload", None)
    if not callable(merge):
        raise ValueError(f"`model` must be a PEFT model with merge_and_unload(), got {type(model).__name__}")
    if not adapted_layers(model):
        raise ValueError(f"`model` ({type(model).__name__}) has no LoRA layers to merge")
    by_param = _masks_by_param(model, masks)
    params = {id(p): p for p in model.parameters()}
    for key, (name, mask) in by_param.items():
        param = params.get(key)
        if param is None or mask.shape != param.shape:
            shape = None if param is None else tuple(param.shape)
            raise ValueError(f"`masks[{name!r}]` has shape {tuple(mask.shape)}, its weight {shape}")
    kwargs: dict[str, Any] = {"progressbar": False, "safe_merge": safe_merge}
    if adapter_names is not None:
        kwargs["adapter_names"] = list(adapter_names)
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
