"""Binding a pruner to a model: which parameters it prunes there, with which masks, checked before any work.

:meth:`~lightning_prune.engine.pruner.Pruner.bind` runs these steps in order and installs what they
return (a :class:`~lightning_prune.engine.maskstate.MaskState`).

Masks belong to the model they were computed on. Binding to the *same* parameters again (a second
``fit`` of the same model, or ``prune()`` then ``fit``) keeps them frozen; binding to another model
(a new instance, even of the same architecture) starts fresh, with a warning. Masks restored from a
checkpoint (``load_state_dict``, ``fit(ckpt_path=...)``) apply to whatever model is bound next: each
finds its parameter by name or unique name suffix (:func:`~lightning_prune.engine.targets.match_names`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor, nn

from lightning_prune.criteria.base import Criterion
from lightning_prune.engine import masks as M
from lightning_prune.engine.checkpoint import fit_masks, unpack_masks
from lightning_prune.engine.rounds import OnePass
from lightning_prune.engine.targets import PruneTarget, match_names, resolve_targets, targets_of
from lightning_prune.models import hf_config as hf
from lightning_prune.patterns import Pattern
from lightning_prune.runtime import sharding
from lightning_prune.runtime.distributed import default_collectives, warn
from lightning_prune.runtime.offload import offloaded_names


class Plan(Protocol):
    """What binding reads of a pruner's plan (:class:`~lightning_prune.engine.pruner.Pruner` has it)."""

    label: str
    criterion: Criterion
    round_strategy: OnePass
    pattern: Pattern  # as built (a string parsed), bound here to the model
    include: list[str] | None
    exclude: list[str] | None
    min_density: float

    @property
    def target(self) -> float: ...

    @property
    def explicit_parameters(self) -> list[nn.Parameter] | None: ...


ParamRef = Callable[[], "Tensor | None"]  # a weak reference to a bound parameter (see parameter_ref)


@dataclass(frozen=True)
class Prior:
    """What a pruner holds when it meets a model."""

    loaded: dict[str, Any] | None  # checkpointed (packed) masks waiting for a model; {}: saved before any round
    bound: Sequence[ParamRef]  # the parameters its masks were computed on
    masks: Mapping[str, Tensor] | None  # their masks (this rank's blocks), None before the first round
    rounds: int  # rounds in its history
    skipped: Sequence[tuple[str, str]]  # what its last bind left out by default (said once)


@dataclass(frozen=True)
class Binding:
    """What :func:`bind_model` settled on: the targets, their masks (fitted: this rank's blocks on the
    parameters' devices; ``None``: dense), the pattern bound to the model, the defaults left out."""

    targets: list[PruneTarget]
    masks: Mapping[str, Tensor] | None
    pattern: Pattern
    skipped: list[tuple[str, str]]
    dropped: bool  # masks of another model were dropped: the history goes with them


def resolve_scope(scope: str | None, pattern: Pattern, model: nn.Module) -> str:
    """``scope=None``: ``"layer"`` for structures of a Hugging Face model (the same count in every
    block, so a standard config describes the shrunk model), else ``"global"``."""
    if scope is not None:
        return scope
    return "layer" if pattern.removes_structures and hf.pretrained_models(model) else "global"


def bind_model(model: nn.Module, plan: Plan, prior: Prior, scope: str) -> Binding:
    """Bind ``plan`` at ``scope`` to ``model``: the targets (a checkpoint's, the same parameters as before, or
    the selection), their masks, the pattern for this model, and every check a round would otherwise fail
    late (the criterion on the targets, the round strategy on the model, sharding). ``model`` is materialised
    (:func:`check_materialised`, the first check of a bind)."""
    skipped: list[tuple[str, str]] = []
    previous = previous_targets(model, prior.bound)
    keeps_masks = bool(prior.loaded) or (previous is not None and prior.loaded is None)
    resolved = resolve_targets(
        model, plan.include, plan.exclude, plan.explicit_parameters, skipped, allow_empty=keeps_masks
    )
    chosen = choose_targets(model, resolved, skipped, prior, previous, plan.label)
    targets = chosen.targets
    skipped = [(n, why) for n, why in skipped if n not in {t.name for t in targets}]
    if skipped and skipped != list(prior.skipped):
        warn(f"{plan.label}: not pruned by default: {skipped_text(skipped)}")
    # the pattern for this model (channels: its families); it refuses layers it does not fit, and a
    # target its floor makes unreachable
    pattern = plan.pattern.bind(model, targets, plan.target, scope, plan.min_density)
    if notes := pattern.notes:
        warn(f"{plan.label}: pattern='{plan.pattern}' leaves alone: " + "; ".join(notes))
    world = default_collectives().world_size
    sharded = sharding.check_sharding([t.name for t in targets], [t.param for t in targets], world)
    masks = fit_chosen_masks(chosen, pattern)
    check_rounds(model, targets, masks, pattern, plan, scope=scope, sharded=sharded)
    return Binding(targets, masks, pattern, skipped, chosen.dropped)


@dataclass(frozen=True)
class Chosen:
    """The targets a bind settled on, and the masks that come with them (whole layers if ``restored``)."""

    targets: list[PruneTarget]
    masks: Mapping[str, Tensor] | None
    restored: bool  # from a checkpoint (whole layers), else this pruner's own (this rank's blocks)
    dropped: bool  # masks of another model were dropped: the history goes with them


def check_materialised(model: nn.Module, who: str) -> None:
    """Meta tensors have shapes but no values: nothing can be scored, calibrated or masked on them,
    and torch's own error (``Tensor.item() cannot be called on meta tensors``) names no tensor."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    names = [n for n, t in tensors if t.is_meta]
    if names:  # accelerate's offloaded weights are on meta by design: a block-by-block round reads them
        offloaded = offloaded_names(model)
        names = [n for n in names if n not in offloaded]
    if names:
        listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"{who}: {type(model).__name__} has {len(names)} parameters/buffers on the meta device (shapes, no "
            f"values): {listed}. Materialise the weights before pruning, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(state_dict) (or initialise them)"
        )


def parameter_ref(target: PruneTarget) -> ParamRef:
    """A weak reference to ``target``'s parameter. accelerate replaces an offloaded (meta) parameter at every
    read, so that one is found through its module (weakly held), by attribute."""
    if not target.param.is_meta:
        return weakref.ref(target.param)
    module, name = weakref.ref(target.module), target.param_name
    return lambda: getattr(m, name, None) if (m := module()) is not None else None


def previous_targets(model: nn.Module, bound: Sequence[ParamRef]) -> list[PruneTarget] | None:
    """The targets a pruner was bound to (``bound``: weak references to their parameters), found by identity
    in ``model`` (renamed as ``model`` names them now), or ``None`` if it was never bound or they are not all
    parameters of ``model``."""
    params = [r() for r in bound]
    if not params or any(p is None for p in params):
        return None
    return targets_of(model, params)  # type: ignore[arg-type]


def choose_targets(
    model: nn.Module,
    resolved: list[PruneTarget],
    skipped: list[tuple[str, str]],
    prior: Prior,
    previous: list[PruneTarget] | None,
    label: str,
) -> Chosen:
    """A checkpoint's targets and masks, else the ``previous`` targets (the same parameters, under today's
    names) with their masks, else the selection ``resolved`` on ``model``, dense."""
    if prior.loaded is not None:
        targets, masks = _checkpoint_targets(model, prior.loaded, resolved, skipped)
        return Chosen(targets, masks, restored=True, dropped=False)
    if previous is not None:  # the same parameters: keep their masks under today's names
        mine = {id(t.param) for t in previous}
        if new := [t.name for t in resolved if id(t.param) not in mine and t.param.requires_grad]:
            warn(
                f"{label} keeps the {len(previous)} parameters it pruned before; {new[:5]}"
                f"{' ...' if len(new) > 5 else ''} of this model are not among them and stay dense "
                "(a new pruner would select them)"
            )
        masks = M.packed(prior.masks).renamed([t.name for t in previous]) if prior.masks else None
        return Chosen(previous, masks, restored=False, dropped=False)
    if prior.masks is not None:
        warn(
            f"{label} pruned another model before ({prior.rounds} rounds); its masks do "
            "not belong to this one and are dropped: this model starts dense. (Masks carry over only to the "
            "same parameters, or through a checkpoint: pruner.load_state_dict(...) / fit(ckpt_path=...))"
        )
    return Chosen(resolved, None, restored=False, dropped=prior.masks is not None)


def _checkpoint_targets(
    model: nn.Module, packed: dict[str, Any], resolved: list[PruneTarget], skipped: list[tuple[str, str]]
) -> tuple[list[PruneTarget], dict[str, Tensor] | None]:
    """Targets and masks from checkpointed state: each mask finds its parameter by name or unique
    name suffix; the parameters must be the ones this pruner selects (frozen ones included: PEFT
    freezes the base weights it wraps)."""
    if not packed:  # a checkpoint taken before the first round: the selection decides
        return resolved, None
    names = match_names(list(packed), model, "checkpointed pruning")
    named = dict(model.named_parameters())
    targets = targets_of(model, [named[names[n]] for n in packed])
    assert targets is not None  # match_names found every one
    frozen = {n for n, why in skipped if why.startswith("frozen")}
    chosen = {id(t.param) for t in targets}
    missing = [t.name for t in resolved if id(t.param) not in chosen]
    selected = {id(t.param) for t in resolved}
    unexpected = [t.name for t in targets if id(t.param) not in selected and t.name not in frozen]
    if missing or unexpected:
        raise ValueError(
            f"checkpointed pruning masks do not match this model's targets: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (check include/exclude/parameters)"
        )
    return targets, {t.name: m for t, m in zip(targets, unpack_masks(packed).values())}


def fit_chosen_masks(chosen: Chosen, pattern: Pattern) -> Mapping[str, Tensor] | None:
    """The chosen masks checked against their parameters (names, shapes; a checkpoint's whole layers cut to
    this rank's block) and the bound pattern: masks from a checkpoint or an earlier round only shrink."""
    if chosen.masks is None:
        return None
    what = "checkpointed" if chosen.restored else "this pruner's"
    masks = fit_masks(chosen.masks, chosen.targets, what, whole=chosen.restored)
    pattern.check_masks(masks, chosen.targets, "the restored")
    return masks


def check_rounds(
    model: nn.Module,
    targets: list[PruneTarget],
    masks: Mapping[str, Tensor] | None,
    pattern: Pattern,
    plan: Plan,
    *,
    scope: str,
    sharded: bool,
) -> None:
    """Where rounds may follow, what they need checked now, before any work: the criterion on the targets
    and the model, the round strategy on the model, what sharded layers cannot do yet. Masks already past
    the target are kept, with a warning."""
    criterion, strategy, target, label = plan.criterion, plan.round_strategy, plan.target, plan.label
    if sharded or masks is None or sparsity(pattern, masks) < target:  # rounds may follow: check them now
        criterion.check_targets(targets)
        criterion.check_model(model, targets)
        strategy.check_model(model, targets, sharded)
        if sharded:  # what sharded layers cannot do yet, refused before any work
            pattern.check_sharded(targets, scope)
            criterion.check_sharded(targets)
    elif (reached := sparsity(pattern, masks)) > target + 1e-9:
        warn(
            f"{label}(target={target}) is bound to masks that are already {reached:.4f} sparse: "
            "masks only shrink, so the model stays sparser than the target asks"
        )


def sparsity(pattern: Pattern, masks: Mapping[str, Tensor]) -> float:
    """Fraction of the units ``target`` counts (weights, or structures) that ``masks`` prune."""
    units = pattern.units(masks).values()
    return sum(p for p, _ in units) / max(sum(n for _, n in units), 1)


def skipped_text(skipped: Sequence[tuple[str, str]], shown: int = 3) -> str:
    """The parameters left out, one entry per reason (a PEFT model has dozens of adapters: a count and
    the first few names, not a line each)."""
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped:
        by_reason.setdefault(why, []).append(name)
    parts = []
    for why, names in by_reason.items():
        if len(names) == 1:
            parts.append(f"{names[0]}: {why}")
        else:
            more = f", +{len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} parameters ({', '.join(names[:shown])}{more}): {why}")
    return "; ".join(parts)
