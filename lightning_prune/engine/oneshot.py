"""``prune()``'s plan where the defaults leave it free: OBS's defaults on a model of blocks run block by block.

A criterion whose gradient-needing options were left at their defaults (``OBSPruning(target)``),
``scope`` and ``blocks`` left at ``None`` and a pattern that is not structural, given to ``prune()``
with a model of repeated blocks holding every target, runs block by block, label-free
(:meth:`~lightning_prune.criteria.base.Criterion.make_label_free`, ``scope="layer"``,
``blocks="auto"``): memory for one block and no backward pass, where the whole-model round holds
every layer's statistics and backpropagates through the model.

The plan is a new criterion (a copy of the pruner's, made label-free), a round strategy and a scope;
``prune()`` hands them to :meth:`~lightning_prune.engine.pruner.Pruner.replan`. The criterion the
user built is never changed: it may be shared with another pruner, and it still says what was asked
for, while ``pruner.criterion`` says what pruned the model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from lightning_prune.criteria.base import Criterion
from lightning_prune.engine.pruner import Pruner
from lightning_prune.engine.rounds import BlockByBlock, OnePass
from lightning_prune.engine.sequential import find_blocks


@dataclass(frozen=True)
class OneShotPlan:
    """What ``prune()`` chose for the defaults, and why (``text``: printed and recorded as ``info["plan"]``)."""

    criterion: Criterion  # a new object: the pruner's criterion in its label-free form
    round_strategy: OnePass
    scope: str
    text: str


def plan_one_shot(pruner: Pruner, model: nn.Module) -> OneShotPlan | None:
    """The block-by-block label-free plan for ``pruner`` (bound to ``model``) where its defaults leave the
    choice free and ``model`` has repeated blocks holding every target; ``None`` where nothing changes."""
    free = (
        pruner.scope_argument is None and pruner.round_strategy.blocks is None and not pruner.pattern.removes_structures
    )
    if not free or pruner.history or not pruner.criterion.label_free_by_default():
        return None
    if pruner.sharded:
        return None
    try:
        blocks = find_blocks(model, "auto", pruner.targets)
    except ValueError:
        return None
    criterion = copy.copy(pruner.criterion)  # the user's object stays as they built it
    chosen = criterion.make_label_free()
    text = (
        f"block by block over the {len(blocks)} blocks {blocks[0].name} ... {blocks[-1].name}, label-free "
        f"({chosen}, scope='layer'); prune() chose this for the defaults (no backward pass, "
        "memory for one block). For the whole-model round with gradients pass blocks=None and allocation='auto'"
    )
    return OneShotPlan(criterion, BlockByBlock("auto"), "layer", text)
