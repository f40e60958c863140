"""``MagnitudePruning``: the magnitude criterion as a Lightning callback."""

from __future__ import annotations

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import Magnitude


class MagnitudePruning(PruningCallback, criterion=Magnitude):
    """Prune the weights with the smallest ``|w|``.

    ``Trainer(callbacks=[MagnitudePruning(target=0.8)])`` prunes 80% of all Linear/Conv weights
    over a cubic schedule in the first half of training and fine-tunes in the second half. See
    :class:`~lightning_prune.engine.pruner.Pruner` for the arguments. Magnitude needs no curvature: a
    round's batches only measure the actual loss increase, on the last ``min(num_batches,
    eval_batches)`` training batches before it (in ``prune()``: on that many batches of ``data``).
    So ``num_batches`` means what it means for the other criteria, the batches a round keeps,
    capped by ``eval_batches`` since no others are read; ``eval_batches=0`` keeps none.
    """
