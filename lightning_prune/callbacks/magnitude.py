"""``MagnitudePruning``: the magnitude criterion as a Lightning callback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import nn

from lightning_prune.calibration import LossFn
from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import Magnitude
from lightning_prune.patterns import Pattern


class MagnitudePruning(PruningCallback):
    """Prune the weights with the smallest ``|w|``.

    ``Trainer(callbacks=[MagnitudePruning(target=0.8)])`` prunes 80% of all Linear/Conv weights
    over a cubic schedule in the first half of training and fine-tunes in the second half. See
    :class:`~lightning_prune.pruner.Pruner` for the arguments. Magnitude needs no curvature: a
    round's batches only measure the actual loss increase, on the last ``min(num_batches,
    eval_batches)`` training batches before it (in ``prune()``: on that many batches of ``data``).
    So ``num_batches`` means what it means for the other criteria, the batches a round keeps,
    capped by ``eval_batches`` since no others are read; ``eval_batches=0`` keeps none.
    """

    def __init__(
        self,
        target: float,
        schedule: str | Callable[[int], float] = "cubic",
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        every_n_epochs: int | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        every_n_steps: int | None = None,
        scope: Literal["global", "layer", "row"] = "global",
        pattern: str | Pattern = "unstructured",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        parameters: Sequence[nn.Parameter] | None = None,
        min_density: float = 0.001,
        num_batches: int = 32,
        eval_batches: int = 8,
        loss_fn: LossFn | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__(
            Magnitude(),
            target,
            schedule,
            start_epoch,
            end_epoch,
            every_n_epochs,
            start_step,
            end_step,
            every_n_steps,
            scope,
            include,
            exclude,
            parameters,
            min_density,
            num_batches=num_batches,
            eval_batches=eval_batches,
            loss_fn=loss_fn,
            verbose=verbose,
            pattern=pattern,
        )
