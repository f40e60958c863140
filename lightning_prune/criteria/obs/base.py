"""What every OBS criterion shares: the options of the curvature it estimates, and the round's plumbing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_prune.criteria.base import Criterion, RoundContext, RoundResult, require_stats
from lightning_prune.criteria.obd import Reduction, check_reduction
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.numerics import exact_float32
from lightning_prune.stats import Estimator
from lightning_prune.stats.capture import check_hookable
from lightning_prune.stats.fisher import FisherType, check_fisher_type

OptimizerState = Literal["keep", "reset"]
OPTIMIZER_STATES: tuple[str, ...] = get_args(OptimizerState)
SolverDtype = Literal["float64", "float32"]
DTYPES = dict(zip(get_args(SolverDtype), (torch.float64, torch.float32)))


def split(items: list, n: int) -> list[list]:
    """``n`` consecutive, nearly equal groups (the recompute steps of a round)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def row_weights(est: Estimator, targets: Sequence[PruneTarget], dtype: torch.dtype) -> dict[str, Tensor]:
    """``G_ii`` of each layer: the weights that put its rows' reconstruction errors in loss units."""
    return {t.name: torch.diagonal(est["kfac"].factors(t.name)[1]).to(dtype) for t in targets}  # type: ignore[index]


class OBSCriterion(Criterion):
    """Prune by OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` and move the surviving weights to compensate.

    Subclasses differ in the Hessian model (:class:`~lightning_prune.criteria.obs.LayerwiseOBS`,
    :class:`~lightning_prune.criteria.obs.WoodFisherOBS`, :class:`~lightning_prune.criteria.obs.KFACOBS`);
    the options here are :func:`~lightning_prune.criteria.obs.OBS`'s of the same names (documented there).
    """

    name = "obs"
    moves_weights = True
    hessian = ""

    def __init__(
        self,
        *,
        damp: float = 0.01,
        block_size: int = 128,
        recompute_steps: int = 4,
        optimizer_state: OptimizerState = "reset",
        solver_dtype: SolverDtype | None = None,
        fisher_type: FisherType = "empirical",
        mc_samples: int = 1,
        loss_reduction: Reduction = "mean",
    ) -> None:
        for name, value, allowed in (
            ("optimizer_state", optimizer_state, OPTIMIZER_STATES),
            ("solver_dtype", solver_dtype, (None, *DTYPES)),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= 10:
            raise ValueError(f"`damp` must be a number in [0, 10], got {damp!r}")
        for name, value in (("block_size", block_size), ("recompute_steps", recompute_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        check_fisher_type(fisher_type, mc_samples)
        self.fisher_type, self.mc_samples = fisher_type, mc_samples
        self.damp, self.block_size, self.recompute_steps = float(damp), block_size, recompute_steps
        # None: float64, except in prune()'s block-by-block plan for the defaults (LayerwiseOBS.make_label_free)
        self.optimizer_state, self.solver_dtype = optimizer_state, solver_dtype or "float64"
        self.dtype_chosen_by_round = solver_dtype is None
        self.loss_reduction = check_reduction(loss_reduction)
        self.reset_moved_state = optimizer_state == "reset"

    @property
    def needs_gradients(self) -> bool:
        return True

    def check_targets(self, targets: Sequence[PruneTarget]) -> None:
        check_hookable(targets, gradients=self.needs_gradients)

    def recalibrates(self, targets: Sequence[PruneTarget]) -> bool:
        return self.recompute_steps > 1

    @property
    def captures_in_window(self) -> bool:
        return self.fisher_type == "empirical" or not self.needs_gradients

    def prune(self, ctx: RoundContext) -> RoundResult:
        est = require_stats(ctx, ctx.stats, f"OBS ({self.hessian})")
        with exact_float32():
            return self.solve(ctx, est)

    def solve(self, ctx: RoundContext, est: Estimator) -> RoundResult:
        """The round, from its statistics (under exact float32 matmuls)."""
        raise NotImplementedError

    def recapture(self, ctx: RoundContext, desc: str) -> Estimator:
        """Fresh statistics at the current weights from the round's batches (a calibration pass)."""
        est = self.make_estimator(ctx.targets, ctx.comm, len(ctx.batches))
        return self.collect(ctx.calib, ctx.batches, est, ctx.targets, ctx.round_index)  # type: ignore[arg-type]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.solver_dtype]

    def matrix(self, t: PruneTarget) -> Tensor:
        """The whole layer's weight matrix in the solver's dtype (gathered when sharded)."""
        return t.matrix().to(self.dtype)

    @staticmethod
    def write(t: PruneTarget, W: Tensor) -> None:
        t.write_(t.unmatrix(W))  # into this rank's shard when sharded
