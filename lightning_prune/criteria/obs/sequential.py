"""Layer-wise reconstruction OBS block by block (``blocks=``): SparseGPT's loop.

Each block is calibrated on the pruned outputs of the blocks before it
(:func:`lightning_prune.blocks.run_sequential`), pruned, and its pruned outputs feed the next; with
``reconstruct="original"`` the original outputs travel beside the pruned ones and each layer fits
its original outputs.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from torch import Tensor

from lightning_prune.blocks import Block, find_blocks, run_sequential
from lightning_prune.criteria.base import RoundContext, RoundResult, require_stats
from lightning_prune.criteria.obs.base import OBSCriterion
from lightning_prune.solvers.layerwise import prepare_hessian, refit_to_reference, single_saliency
from lightning_prune.stats import CrossCovariance, InputCovariance


def prune_sequentially(obs: OBSCriterion, ctx: RoundContext) -> RoundResult:
    """The round, one block at a time: each block's layers scored, allocated and solved from its own inputs."""
    if not ctx.batches:
        raise RuntimeError(f"OBS round {ctx.round_index}: no batch in {ctx.source} for sequential calibration")
    blocks = find_blocks(ctx.model, obs.blocks, ctx.targets)  # type: ignore[arg-type]
    dtype = obs.dtype
    info: dict[str, Any] = {"damping_increases": 0, "dead_inputs": 0, "solver": set(), "peak_hessian_bytes": 0}
    masks: dict[str, Tensor] = {}
    reconstruction = 0.0

    def prune_block(block: Block, stats: InputCovariance) -> None:
        nonlocal reconstruction
        sub = replace(ctx, targets=block.targets, masks={t.name: ctx.masks[t.name] for t in block.targets})
        require_stats(sub, stats, "sequential OBS")
        if bad := stats.nonfinite_layers():
            raise RuntimeError(f"OBS round {ctx.round_index}: the input statistics of {bad[:5]} are not finite")
        scores = {}
        cross = stats if isinstance(stats, CrossCovariance) else None
        for t in block.targets:
            ctx.check_interrupt(f"scoring {t.name}")
            U, W, _, _ = prepare_hessian(stats.input_covariance(t.name).to(dtype), obs.matrix(t), obs.damp, t.name)
            if cross is not None:  # the weights that fit the original outputs are the ones to score
                W = refit_to_reference(obs.matrix(t), cross.cross_covariance(t.name).to(dtype), U)
            scores[t.name] = t.local(t.unmatrix(single_saliency(W, U)))
        allocated = sub.select(scores)
        counts = {t.name: t.matrix(~t.gather(allocated[t.name])).sum(1) for t in block.targets}
        solvers = obs.solvers(sub, block.targets, counts)
        info["solver"] |= set(solvers.values())
        for t in block.targets:
            ctx.check_interrupt(f"before solving {t.name}")
            A = stats.input_covariance(t.name)
            info["peak_hessian_bytes"] = max(info["peak_hessian_bytes"], A.numel() * A.element_size())
            mask, losses = obs.solve_layer(
                t, stats, counts, solvers, t.gather(ctx.masks[t.name]), allocated, sub, info, cross
            )
            masks[t.name] = t.local(mask)
            reconstruction += float(losses.sum())

    done = run_sequential(ctx.calib, ctx.batches, blocks, ctx.comm, prune_block, reference=obs.corrects)
    info["solver"] = "+".join(sorted(info["solver"]))
    info.update(
        sequential_blocks=done["blocks"],
        block_input_bytes=done["block_input_bytes"],
        reconstruction_error=reconstruction,
        skipped_block_batches=done["skipped"],
    )
    return RoundResult(masks, math.nan, updated={t.name for t in ctx.targets}, info=info)
