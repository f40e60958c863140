"""Layer-wise OBS on several ranks: the ranks solve different layers at the same time.

Used whenever a round has more than one rank: FSDP2-sharded layers, and replicated ones (DDP, or
``prune()`` under ``torchrun``, where the calibration batches are already split across ranks and the
statistics all-reduced). Rank ``j`` solves layer ``j`` of every ``world_size`` consecutive layers;
each result is broadcast from its solver and every rank keeps its rows (all of them when
replicated), so the masks and weights are bitwise identical on every rank. Every rank takes part in
every layer's gathers (collectives, in the same order; no-ops when replicated) but keeps only the
layer it solves, so a rank holds at most one whole layer and its solve, plus one received result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prune.criteria.base import RoundContext
from lightning_prune.criteria.obs.base import OBSCriterion
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.stats import CrossCovariance, Estimator


def solve_spread(
    obs: OBSCriterion,
    ctx: RoundContext,
    group: Sequence[PruneTarget],
    stats: Estimator,
    counts: dict[str, Tensor],
    solvers: dict[str, str],
    allocated: dict[str, Tensor],
    info: dict[str, Any],
    adaptive: bool,
    cross: CrossCovariance | None = None,
) -> Iterator[tuple[PruneTarget, Tensor, Tensor]]:
    """Yields ``(target, whole-layer mask, row losses)`` in layer order, each layer written on every rank."""
    world, rank = ctx.comm.world_size, ctx.comm.rank
    counters = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(group), world):
        chunk, mine = list(group[start : start + world]), None
        for j, t in enumerate(chunk):
            W, alloc, before = t.matrix(), t.gather(allocated[t.name]), t.gather(ctx.masks[t.name])
            if j == rank:
                mine = (t, W, alloc, before)
            del W, alloc, before
        result = None
        if mine is not None:
            t, W, alloc, before = mine
            ctx.report(f"solving {t.name} and {len(chunk) - 1} more on the other ranks")
            local_info = {"damping_increases": 0, "dead_inputs": 0}
            W_new, mask, losses = obs.fit(
                t,
                stats.input_covariance(t.name, obs.dtype),  # type: ignore[attr-defined]
                W,
                counts[t.name],
                solvers[t.name],
                before,
                local_info,
                adaptive,
                ctx.pattern.quotas(t, ~alloc),
                None if cross is None else cross.cross_covariance(t.name, obs.dtype),
            )
            counters += torch.tensor([local_info["damping_increases"], local_info["dead_inputs"]], dtype=torch.float64)
            result = (t.unmatrix(W_new).to(t.param.dtype), mask, losses.to(torch.float64))
            del mine, W, alloc, before
        for j, t in enumerate(chunk):
            device = t.local_param.device
            if j == rank:
                w, mask, losses = (x.to(device).contiguous() for x in result)  # type: ignore[union-attr]
            else:
                w = torch.empty(t.param.shape, dtype=t.param.dtype, device=device)
                mask = torch.empty(t.param.shape, dtype=torch.bool, device=device)
                losses = torch.empty(t.shape2d[0], dtype=torch.float64, device=device)
            ctx.comm.broadcast_([w, mask, losses], src=j)
            t.write_(w)
            del w
            yield t, mask, losses
        result = None
    counters = counters.to(ctx.targets[0].local_param.device)
    ctx.comm.all_reduce_sum_([counters])
    info["damping_increases"] += int(counters[0])
    info["dead_inputs"] += int(counters[1])
