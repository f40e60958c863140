"""Magnitude pruning: the baseline every paper reports against."""

from __future__ import annotations

from lightning_prune.criteria.base import Criterion, RoundContext, RoundResult


class Magnitude(Criterion):
    """Score ``|w|``: no statistics, no loss. A round's batches only measure the actual loss
    increase, so it keeps ``min(num_batches, eval_batches)`` of them: more would be stored and never read."""

    name = "magnitude"

    def window_length(self, num_batches: int, eval_batches: int) -> int:
        return min(num_batches, eval_batches)

    def prune(self, ctx: RoundContext) -> RoundResult:
        scores = {t.name: t.local_param.abs() for t in ctx.targets}  # this rank's block when sharded
        return RoundResult(ctx.select(scores))
