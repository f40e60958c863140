"""Structured layer-wise OBS (``pattern="channels"``): whole heads and neurons, their consumers refit.

The allocation fixes how many structures each family loses; the structured solver
(:func:`~lightning_prune.solvers.structured.structured_prune`) chooses which, removing their
consumer columns with the group update. Families are solved in model order, in ``recompute_steps``
groups, the inputs of later groups re-estimated after the earlier ones were pruned.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from lightning_prune.criteria.base import RoundContext, RoundResult
from lightning_prune.criteria.obs.base import OBSCriterion, row_weights, split
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.solvers.obc import prepare_hessian, refit_to_reference
from lightning_prune.solvers.structured import structured_prune
from lightning_prune.stats import CrossCovariance, Estimator


def prune_structures(
    obs: OBSCriterion, ctx: RoundContext, est: Estimator, allocated: dict[str, Tensor], info: dict[str, Any]
) -> RoundResult:
    """The round after the allocation: remove each family's share of structures and refit its consumers."""
    pattern, dtype = ctx.pattern, obs.dtype
    weighted = obs.allocation != "reconstruction"
    before, after = pattern.pruned(ctx.masks), pattern.pruned(allocated)  # type: ignore[attr-defined]
    gone: dict[str, Tensor] = {}
    predicted, reconstruction, updated = 0.0, 0.0, set()
    updated_targets: dict[str, PruneTarget] = {}
    families = split(pattern.families, min(obs.recompute_steps, len(pattern.families)))  # type: ignore[attr-defined]
    G = row_weights(est, ctx.targets, dtype) if weighted else {}
    for i, group in enumerate(families):
        stats: Estimator = est["kfac"] if weighted else est["inputs"]  # type: ignore[index]
        cross: CrossCovariance | None = None
        if i > 0:
            desc = f"re-estimating inputs ({i}/{len(families) - 1})"
            if obs.corrects:  # the consumers' current inputs and the original ones: forward passes only
                layers = list({t.name: t for f in group for _, t in pattern.slots(f, "consumers")}.values())  # type: ignore[attr-defined]
                stats = cross = obs.reference_stats(ctx, layers, list(updated_targets.values()), desc)
            else:
                est = obs.recapture(ctx, desc)
                stats = est["kfac"] if weighted else est["inputs"]  # type: ignore[index]
                if weighted:
                    G = row_weights(est, ctx.targets, dtype)
            info["recomputes"] += 1
        for f in group:
            ctx.check_interrupt(f"before {f.name}")
            count = int(after[f.name].sum()) - int(before[f.name].sum())
            if count <= 0:
                continue
            slots = pattern.slots(f, "consumers")  # type: ignore[attr-defined]
            consumers = [t for _, t in slots]
            if len({t.name for t in consumers}) < len(consumers):  # the solver owns each consumer's columns whole
                raise ValueError(f"structured OBS: {f.name!r} is read by a fused consumer (several slots in one layer)")
            Ws = [obs.matrix(t) for t in consumers]
            covariances = [stats.input_covariance(t.name).to(dtype) for t in consumers]  # type: ignore[attr-defined]
            if cross is not None:  # fit the consumers' original outputs (layer-wise preparation, then refit)
                for j, t in enumerate(consumers):
                    U, _, _, _ = prepare_hessian(covariances[j], Ws[j], obs.damp, t.name)
                    Ws[j] = refit_to_reference(Ws[j], cross.cross_covariance(t.name).to(dtype), U)
            Ws, gone[f.name], costs, counts = structured_prune(
                Ws,
                covariances,
                [s.width for s, _ in slots],
                count,
                before[f.name],
                [G[t.name] if weighted else None for t in consumers],
                obs.damp,
                [t.name for t in consumers],
            )
            for t, W in zip(consumers, Ws):
                obs.write(t, W)
                updated.add(t.name)
                updated_targets[t.name] = t
            info["damping_increases"] += counts["damping_increases"]
            info["dead_inputs"] += counts["dead_inputs"]
            if weighted:
                predicted += float(costs.sum())
            else:
                reconstruction += float(costs.sum())
    info["solver"] = "structured"
    if not weighted:
        info["reconstruction_error"], predicted = reconstruction, math.nan
    return RoundResult(pattern.expand(ctx.masks, gone), predicted, updated=updated, info=info)  # type: ignore[attr-defined]
