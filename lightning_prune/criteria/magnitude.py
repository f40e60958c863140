"""Magnitude pruning: the baseline every paper reports against."""

from __future__ import annotations

from lightning_prune.criteria.base import Criterion, RoundContext, RoundResult
from lightning_prune.patterns import Pattern
from lightning_prune.runtime.distributed import warn


class Magnitude(Criterion):
    """Score ``|w|``: no statistics, no loss. A round's batches only measure the actual loss
    increase, so it keeps ``min(num_batches, eval_batches)`` of them: more would be stored and never read."""

    name = "magnitude"
    uses_hooks = False

    def check_pattern(self, pattern: Pattern, scope: str) -> None:
        if pattern.removes_structures and scope == "global":
            warn(
                f"MagnitudePruning(pattern='{pattern}', scope='global') ranks the L1 norms of neurons with different "
                "fan-in and scale against each other and tends to empty whole layers down to the floor "
                "(benchmarks/RESULTS.md, MLP at 50%: 9% one-shot and 34% gradual, against 82% and 87% with "
                "scope='layer', the per-layer criterion of 'Pruning Filters'): consider scope='layer'"
            )

    def window_length(self, num_batches: int, eval_batches: int) -> int:
        return min(num_batches, eval_batches)

    def prune(self, ctx: RoundContext) -> RoundResult:
        scores = {t.name: t.local_param.abs() for t in ctx.targets}  # this rank's block when sharded
        return RoundResult(ctx.select(scores))
