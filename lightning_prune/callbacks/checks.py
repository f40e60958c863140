"""What a pruning callback refuses before any training: everything checkable at fit start or on resume.

Each check names the callback and the fix. They read the Trainer and the LightningModule; the pruner's
own checks (targets, pattern, reachable target) run when it binds, in the core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch

from lightning_prune.engine.facade import PrunerFacade
from lightning_prune.engine.pruner import Pruner, is_pruning_state
from lightning_prune.engine.targets import PruneTarget

if TYPE_CHECKING:
    from lightning_prune.callbacks.triggers import Trigger
from lightning_prune.stats.capture import compiled_parts


def check_loss_source(who: str, pruner: Pruner, pl_module: pl.LightningModule) -> None:
    """A round that re-runs the loss needs ``loss_fn`` where ``training_step`` cannot be borrowed."""
    if (
        not pl_module.automatic_optimization
        and pruner.loss_fn is None
        and pruner.criterion.recalibrates(pruner.targets)
    ):
        raise ValueError(
            f"{who} re-runs the loss on stored batches inside a round, and training_step cannot be borrowed under "
            "manual optimization: pass loss_fn=lambda module, batch: ... (the mean loss)"
        )


def check_compiled(who: str, pruner: Pruner, pl_module: pl.LightningModule) -> None:
    """Refuse what ``torch.compile`` cannot run: the capture hooks without ``set_stance`` (torch < 2.6),
    and a double backward (Hutchinson). (With ``set_stance`` the capture runs eagerly: see
    :mod:`lightning_prune.stats.capture`.)"""
    criterion = pruner.criterion
    if not (criterion.uses_hooks or criterion.differentiates_twice) or not (parts := compiled_parts(pl_module)):
        return
    who = f"{who} ({criterion.describe()})"
    if criterion.differentiates_twice:
        raise ValueError(
            f"{who} differentiates the loss twice, which torch.compile'd code does not support, and {parts[:3]} "
            "are compiled: use a first-order curvature (OBD: curvature='fisher', 'kfac' or 'ekfac'), or compile "
            "the model after pruning"
        )
    if getattr(torch.compiler, "set_stance", None) is None:
        raise RuntimeError(
            f"{who} captures layer statistics with module hooks, which torch.compile'd code skips, and "
            f"torch {torch.__version__} has no torch.compiler.set_stance to run the capture eagerly; {parts[:3]} "
            "are compiled. Use torch >= 2.6, compile the model after pruning, or use MagnitudePruning"
        )


def check_siblings(me: PrunerFacade, state_key: str, others: Sequence[Any]) -> None:
    """Refuse a second pruner on the same weights, or under the same checkpoint key. ``others``: the
    pruning callbacks before ``me`` in the Trainer (only they have bound in this fit)."""
    mine = {id(t.param): t.name for t in me.targets}
    for other in others:
        shared = [mine[id(t.param)] for t in _bound_targets(other.pruner) if id(t.param) in mine]
        if shared:
            raise ValueError(
                f"{type(other).__name__} and {type(me).__name__} both prune {shared[:5]}"
                f"{' ...' if len(shared) > 5 else ''}: a weight can have only one pruner. Give them disjoint "
                "include/exclude patterns or parameters"
            )
        if other.state_key == state_key:
            raise ValueError(
                f"two pruners share the checkpoint key {state_key!r}; give them different include/exclude "
                "patterns or parameters"
            )


def check_checkpoint_owner(state_key: str, trainer: pl.Trainer, checkpoint: Mapping[str, Any]) -> None:
    """Refuse to resume silently without masks when the checkpoint's pruning state is another pruner's."""
    states = checkpoint.get("callbacks", {})
    if state_key in states:
        return
    claimed = {cb.state_key for cb in trainer.callbacks}  # type: ignore[attr-defined]
    unclaimed = {k: v for k, v in states.items() if k not in claimed and is_pruning_state(v)}
    if unclaimed:
        writers = {k: v.get("pruner", k) for k, v in unclaimed.items()}
        raise ValueError(
            f"the checkpoint holds the pruning state of {writers}, and none for this run's {state_key!r}: "
            "resume with the pruner that wrote it (same class and include/exclude/parameters), or load only "
            "the model weights (model.load_state_dict(torch.load(path)['state_dict']))"
        )


def _bound_targets(pruner: Pruner) -> list[PruneTarget]:
    """``pruner``'s targets, none before it binds."""
    try:
        return pruner.targets
    except RuntimeError:  # not bound to a model yet
        return []


def no_round_in_run(pruner: Pruner, trigger: Trigger, trainer: pl.Trainer) -> str | None:
    """Why ``pruner`` will run no round in this fit (nothing left to prune, or the Trainer's limits end the
    run before its next round), or ``None`` if one can come. After ``on_fit_start`` (the schedule resolved):
    for callbacks that depend on a round (the default teacher of :class:`~lightning_prune.Distillation`)."""
    if not pruner.removes_something(pruner.target):
        return f"target={pruner.target} leaves nothing to prune (sparsity {pruner.sparsity:.4f} already)"
    point = pruner.next_round()
    if point is None:
        return f"its schedule has no round left ({pruner.schedule.unit}s {pruner.schedule.points})"
    limit = trigger.run_end(trainer, point)
    if limit is None:
        return None
    return f"its first round is at {pruner.schedule.unit} {point} and {limit} ends the run before it"
