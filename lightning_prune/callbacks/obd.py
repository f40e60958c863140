"""Optimal Brain Damage (LeCun et al. 1990): saliency ``1/2 h_ii w_i^2`` from a diagonal curvature."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_prune.calibration import LossFn
from lightning_prune.callbacks.base import RoundContext, RoundResult
from lightning_prune.callbacks.curvature_base import CurvaturePruningCallback, sanitize_curvature
from lightning_prune.curvature import CURVATURES, Estimator, Hutchinson, make_estimator
from lightning_prune.reporting import Progress
from lightning_prune.targets import PruneTarget


class OBDPruning(CurvaturePruningCallback):
    """Prune the weights with the smallest ``1/2 h_ii w_i^2``.

    Args:
        curvature: ``"fisher"`` (per-sample empirical Fisher diagonal), ``"kfac"``, ``"ekfac"``
            (captured from the last ``num_batches`` training batches), or ``"hutchinson"``
            (true-Hessian diagonal from ``num_probes`` Rademacher probes per batch, a
            calibration pass over the same batches at round time).
        num_probes: Hutchinson probes per batch.
        loss_reduction: ``"mean"`` (default) if the training loss averages over the batch's
            leading dimension, ``"sum"`` if it sums.

    The saliencies are in loss units, so ``scope="global"`` compares them across layers, and their
    sum over the removed weights is logged as ``prune/predicted_loss_increase`` next to the
    measured ``prune/actual_loss_increase``. Other arguments: see
    :class:`~lightning_prune.callbacks.base.PruningCallback`.
    """

    def __init__(
        self,
        target: float,
        curvature: Literal["fisher", "kfac", "ekfac", "hutchinson"] = "fisher",
        schedule: str | Callable[[int], float] = "cubic",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
        scope: Literal["global", "layer"] = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        parameters: Sequence[nn.Parameter] | None = None,
        min_density: float = 0.001,
        num_batches: int = 32,
        eval_batches: int = 8,
        num_probes: int = 8,
        loss_reduction: Literal["mean", "sum"] = "mean",
        loss_fn: LossFn | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__(
            target,
            schedule,
            start_epoch,
            end_epoch,
            every_n_epochs,
            scope,
            include,
            exclude,
            parameters,
            min_density,
            num_batches,
            eval_batches,
            loss_fn,
            verbose,
            loss_reduction=loss_reduction,
        )
        if curvature not in CURVATURES:
            raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"`num_probes` must be an integer >= 1, got {num_probes!r}")
        if curvature == "ekfac" and num_batches < 2:
            raise ValueError(f"curvature='ekfac' needs `num_batches` >= 2 (two phases), got {num_batches}")
        self.curvature, self.num_probes = curvature, num_probes
        self.hooked = curvature != "hutchinson"

    def _make_estimator(self, targets: list[PruneTarget]) -> Estimator:
        return make_estimator(self.curvature, targets, num_batches=self.num_batches, num_probes=self.num_probes)

    def _estimate(self, ctx: RoundContext) -> Estimator:
        if self.hooked:
            return self._require_stats(ctx, ctx.stats)
        if not ctx.batches:
            return self._require_stats(ctx, None)
        est = Hutchinson(ctx.targets, num_probes=self.num_probes)
        bar = Progress(ctx.trainer, len(ctx.batches), "Hutchinson calibration", self.verbose >= 1)
        try:
            est.calibrate(ctx.trainer, ctx.pl_module, ctx.batches, self.loss_fn, len(self._history), progress=bar)
        finally:
            bar.close()
        return est

    def _prune(self, ctx: RoundContext) -> RoundResult:
        est = self._estimate(ctx)
        scores, negative, nonfinite = {}, 0, 0
        for t in ctx.targets:
            h, neg, bad = sanitize_curvature(est.diagonal(t.name))
            negative, nonfinite = negative + neg, nonfinite + bad
            scores[t.name] = 0.5 * h * t.param.detach().double() ** 2
        if negative or nonfinite:
            rank_zero_warn(
                f"OBD ({self.curvature}): {negative} negative curvature entries used as |h|, "
                f"{nonfinite} non-finite entries kept unpruned"
            )
        masks = self._select(ctx, scores)
        removed = sum(float(scores[n][ctx.masks[n] & ~masks[n]].nansum()) for n in masks)
        info = {"negative_curvature": negative, "nonfinite_curvature": nonfinite}
        return RoundResult(masks, predicted_loss_increase=removed, info=info)
