"""OBS over a curvature of the whole loss: WoodFisher's Fisher blocks and K-FAC.

A round is split into ``recompute_steps`` steps; after each, the curvature is re-estimated at the
updated weights from the round's stored batches (as M-FAC and oBERT do), and each step removes its
set of weights with the exact joint OBS update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from lightning_prune.criteria.base import RoundContext, RoundResult
from lightning_prune.criteria.obs.base import OBSCriterion
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.distributed import Collectives, warn
from lightning_prune.solvers.blockfisher import block_set_update
from lightning_prune.solvers.kronecker import CG_TOL, kfac_saliency, kfac_set_update
from lightning_prune.solvers.linalg import damped_cholesky, damped_inverse
from lightning_prune.stats import KFAC, BlockFisher, Composite, Estimator
from lightning_prune.stats.blockfisher import from_blocks, to_blocks


class RecomputedOBS(OBSCriterion):
    """Steps towards the round's sparsity, the curvature re-estimated between them."""

    def solve(self, ctx: RoundContext, est: Estimator) -> RoundResult:
        masks, predicted = dict(ctx.masks), 0.0
        info: dict[str, Any] = {"damping_increases": 0, "recomputes": 0}
        self.start_info(info)
        if ctx.sharded:  # weights of whole layers (pattern="channels" is refused when sharded)
            start = ctx.global_sum({n: float((~m).sum()) for n, m in masks.items()}) / sum(
                t.param.numel() for t in ctx.targets
            )
        else:
            units = ctx.pattern.units(masks).values()  # weights, or structures under pattern="channels"
            start = sum(p for p, _ in units) / sum(n for _, n in units)
        for step in range(self.recompute_steps):
            if step > 0:
                est = self.recapture(ctx, f"recomputing curvature ({step}/{self.recompute_steps - 1})")
                info["recomputes"] += 1
            goal = start + (max(ctx.sparsity, start) - start) * (step + 1) / self.recompute_steps
            masks, loss = self.step(replace(ctx, masks=masks, sparsity=goal, stats=est), est, info)
            predicted += loss
        return RoundResult(masks, predicted, updated={t.name for t in ctx.targets}, info=info)

    def start_info(self, info: dict[str, Any]) -> None:
        """Counters of this curvature's work, beside the damping increases and recomputes."""

    def step(self, ctx: RoundContext, est: Any, info: dict[str, Any]) -> tuple[dict[str, Tensor], float]:
        """Remove the weights that take the masks to ``ctx.sparsity``: ``(new masks, predicted loss)``."""
        raise NotImplementedError


class WoodFisherOBS(RecomputedOBS):
    """``hessian="fisher"``: block-diagonal empirical Fisher (WoodFisher, Singh & Alistarh 2020)."""

    hessian = "fisher"

    def make_estimator(
        self, targets: Sequence[PruneTarget], comm: Collectives, num_batches: int, *, reference: bool = False
    ) -> Estimator:
        return BlockFisher(targets, self.block_size, comm)

    def step(self, ctx: RoundContext, est: BlockFisher, info: dict[str, Any]) -> tuple[dict[str, Tensor], float]:
        dtype, B = self.dtype, self.block_size
        inverses, scores = {}, {}
        for t in ctx.targets:  # sharded: one layer gathered at a time, and gathered again for its update
            ctx.check_interrupt(f"inverting the Fisher blocks of {t.name}")
            Finv, damped = damped_inverse(est.blocks(t.name).to(dtype), self.damp, f"{t.name} Fisher blocks")
            info["damping_increases"] += damped.increases
            wb = to_blocks(t.matrix().to(dtype), B)
            inverses[t.name] = Finv
            scores[t.name] = t.local(
                t.unmatrix(from_blocks(wb**2 / (2 * torch.diagonal(Finv, dim1=1, dim2=2)), t.shape2d))
            )
        new = ctx.select(scores)
        loss = 0.0
        for t in ctx.targets:
            ctx.check_interrupt(f"before updating {t.name}")
            Finv, wb = inverses[t.name], to_blocks(t.matrix().to(dtype), B)
            Z = to_blocks(t.matrix(~t.gather(new[t.name])).to(dtype), B).bool()
            wb_new, block_loss = block_set_update(wb, Finv, Z)
            self.write(t, from_blocks(wb_new, t.shape2d))
            loss += float(block_loss.sum())
        return new, loss


class KFACOBS(RecomputedOBS):
    """``hessian="kfac"``: ``H ~ G (x) A``, removals solved jointly per layer (Kronecker systems)."""

    hessian = "kfac"

    def make_estimator(
        self, targets: Sequence[PruneTarget], comm: Collectives, num_batches: int, *, reference: bool = False
    ) -> Estimator:
        return Composite({"kfac": KFAC(targets, comm=comm)})

    def start_info(self, info: dict[str, Any]) -> None:
        info.update(cg_iterations=0, cg_unconverged=0)  # CG iterations: 0 for the systems solved directly

    def step(self, ctx: RoundContext, est: Composite, info: dict[str, Any]) -> tuple[dict[str, Tensor], float]:
        dtype = self.dtype
        inverses, scores = {}, {}
        for t in ctx.targets:
            ctx.check_interrupt(f"inverting the K-FAC factors of {t.name}")
            A, G = est["kfac"].factors(t.name)
            dA = damped_cholesky(A.to(dtype), self.damp, f"{t.name} K-FAC A")
            dG = damped_cholesky(G.to(dtype), self.damp, f"{t.name} K-FAC G")
            info["damping_increases"] += dA.increases + dG.increases
            Ainv, Ginv = torch.cholesky_inverse(dA.L), torch.cholesky_inverse(dG.L)
            # sharded: the layer is gathered for its score and again for its update
            inverses[t.name] = (dG.L @ dG.L.mT, dA.L @ dA.L.mT, Ginv, Ainv)  # the damped factors and inverses
            scores[t.name] = t.local(t.unmatrix(kfac_saliency(self.matrix(t), Ginv, Ainv)))
        new = ctx.select(scores)
        loss = 0.0
        for t in ctx.targets:
            ctx.check_interrupt(f"before updating {t.name}")
            W_new, layer_loss, iterations, residual = kfac_set_update(
                self.matrix(t), *inverses[t.name], t.matrix(~t.gather(new[t.name]))
            )
            info["cg_iterations"] += iterations
            if residual > CG_TOL:  # CG stopped at its iteration limit
                info["cg_unconverged"] += 1
                warn(
                    f"K-FAC OBS: conjugate gradients for {t.name} stopped at {iterations} iterations with relative "
                    f"residual {residual:.1e} (tolerance {CG_TOL:g}); its compensation is approximate (logged as "
                    "prune/cg_unconverged)"
                )
            self.write(t, W_new)
            loss += layer_loss
        return new, loss
