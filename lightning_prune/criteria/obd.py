"""Optimal Brain Damage (LeCun et al. 1990): saliency ``1/2 h_ii w_i^2`` from a diagonal curvature."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_prune.criteria.base import Criterion, RoundContext, RoundResult, require_stats
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.distributed import Collectives, warn
from lightning_prune.stats import CURVATURES, Curvature, Estimator, Hutchinson, make_estimator
from lightning_prune.stats.capture import check_hookable
from lightning_prune.stats.fisher import FisherType, check_fisher_type

Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


def check_reduction(loss_reduction: str) -> str:
    if loss_reduction not in REDUCTIONS:
        raise ValueError(f"`loss_reduction` must be one of {REDUCTIONS}, got {loss_reduction!r}")
    return loss_reduction


def sanitize_curvature(h: Tensor) -> tuple[Tensor, int, int]:
    """OBD's rule for bad diagonal entries: ``(h', negatives, non-finite)``.

    Negative entries (Hutchinson estimates the true, indefinite Hessian; noise does the rest) are
    replaced by their absolute value: the loss is as sensitive to moving the weight either way.
    NaN/inf entries become NaN, which the selection never prunes (the round already refuses
    non-finite statistics; this keeps the rule local too).
    """
    finite = torch.isfinite(h)
    negative = finite & (h < 0)
    out = torch.where(finite, h.abs(), torch.full_like(h, float("nan")))
    return out, int(negative.sum()), int((~finite).sum())


class OBD(Criterion):
    """Prune the weights with the smallest ``1/2 h_ii w_i^2``.

    Args:
        curvature: ``"fisher"`` (per-sample empirical Fisher diagonal), ``"kfac"``, ``"ekfac"``
            (captured from the last ``num_batches`` training batches), ``"hutchinson"``
            (true-Hessian diagonal from ``num_probes`` Rademacher probes per batch, a
            calibration pass over the same batches at round time), or ``"activations"``: the
            layer-wise Hessian's diagonal ``E[x_j^2]``, so the score ``1/2 w_ij^2 E[x_j^2]`` ranks
            like Wanda's ``|w_ij| ||x_j||``; no labels, no backward pass; with ``scope="row"``
            (Wanda's comparison groups) or ``"layer"``.
        num_probes: Hutchinson probes per batch.
        fisher_type: for ``"fisher"``, ``"kfac"``, ``"ekfac"``: ``"auto"`` (default), ``"empirical"``
            (gradients at the observed labels, free from the training steps), ``"mc"`` (labels sampled
            from the model, ``mc_samples`` per input) or ``"exact"`` (the GGN in closed form). MC and
            exact stay informative at convergence and need one pass over the window's batches at
            round time; ``"auto"`` uses exact for classifiers (cross-entropy or MSE, one output row
            per sample, up to 64 outputs), mc for sequence or wide outputs, empirical when the loss
            makes no such call; chosen by measurement (see :mod:`lightning_prune.stats.fisher`).
        mc_samples: sampled labels per input for ``fisher_type="mc"``.
        loss_reduction: ``"mean"`` (default) if the training loss averages over the batch's
            leading dimension, ``"sum"`` if it sums; used when the loss makes no single
            ``F.cross_entropy``/``F.nll_loss`` call, whose own reduction and non-ignored targets
            (a language model's tokens) are read instead (:func:`~lightning_prune.stats.capture.per_sample_factor`).
    """

    name = "obd"

    def __init__(
        self,
        curvature: Curvature = "fisher",
        num_probes: int = 8,
        fisher_type: FisherType = "auto",
        mc_samples: int = 1,
        loss_reduction: Reduction = "mean",
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}")
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"`num_probes` must be an integer >= 1, got {num_probes!r}")
        check_fisher_type(fisher_type, mc_samples)
        if curvature in ("hutchinson", "activations") and fisher_type in ("mc", "exact"):
            raise ValueError(
                f"`fisher_type` applies to curvature='fisher', 'kfac' and 'ekfac'; {curvature!r} uses no Fisher "
                f"(got fisher_type={fisher_type!r})"
            )
        self.curvature, self.num_probes = curvature, num_probes
        self.loss_reduction = check_reduction(loss_reduction)
        self.fisher_type, self.mc_samples = fisher_type, mc_samples

    @property
    def uses_hooks(self) -> bool:  # type: ignore[override]
        """Hook statistics (from the window, or a pass); Hutchinson computes its own at round time."""
        return self.curvature != "hutchinson"

    @property
    def differentiates_twice(self) -> bool:  # type: ignore[override]
        return self.curvature == "hutchinson"

    @property
    def captures_in_window(self) -> bool:
        return self.uses_hooks and (self.fisher_type == "empirical" or self.curvature == "activations")

    @property
    def needs_gradients(self) -> bool:
        return self.curvature != "activations"

    def check_window(self, num_batches: int) -> None:
        if self.curvature == "ekfac" and num_batches < 2:
            raise ValueError(f"curvature='ekfac' needs `num_batches` >= 2 (two phases), got {num_batches}")

    def check_scope(self, scope: str) -> None:
        if self.curvature == "activations" and scope == "global":
            raise ValueError(
                "curvature='activations' (Wanda) scores in each layer's output units, which differ between layers: "
                "pass scope='row' (Wanda's comparison groups) or scope='layer', got scope='global'"
            )

    def recalibrates(self, targets: Sequence[PruneTarget]) -> bool:
        return not self.uses_hooks

    def check_targets(self, targets: Sequence[PruneTarget]) -> None:
        if self.uses_hooks:
            check_hookable(targets, gradients=self.needs_gradients)
        elif frozen := [t.name for t in targets if not t.param.requires_grad]:
            raise ValueError(
                f"curvature='hutchinson' differentiates the loss twice with respect to each target, and {frozen[:5]} "
                "are frozen (requires_grad=False): unfreeze or exclude them, or prune them with MagnitudePruning"
            )

    def check_sharded(self, targets: Sequence[PruneTarget]) -> None:
        if not self.uses_hooks:
            raise ValueError(
                "curvature='hutchinson' differentiates the loss twice with respect to the weights, which FSDP2 "
                "shards (torch.autograd.grad cannot see DTensor shards): use curvature='fisher', 'kfac' or 'ekfac'"
            )

    def make_estimator(
        self, targets: Sequence[PruneTarget], comm: Collectives, num_batches: int, *, reference: bool = False
    ) -> Estimator | None:
        if not self.uses_hooks:
            return None
        return make_estimator(self.curvature, targets, num_batches=num_batches, num_probes=self.num_probes, comm=comm)

    def _estimate(self, ctx: RoundContext) -> Estimator:
        if self.uses_hooks:
            return require_stats(ctx, ctx.stats, f"OBD ({self.curvature})")
        if not ctx.batches:
            return require_stats(ctx, None, f"OBD ({self.curvature})")
        est = Hutchinson(ctx.targets, num_probes=self.num_probes, comm=ctx.comm)
        est.calibrate(ctx.calib, ctx.batches, ctx.round_index)
        if bad := [t.name for t in ctx.targets if not bool(torch.isfinite(est.diagonal(t.name)).all())]:
            raise RuntimeError(
                f"OBD (hutchinson) round {ctx.round_index}: the Hessian-vector products of {bad[:5]} are not finite "
                f"in {ctx.source}; refusing before touching any weight"
            )
        return est

    def prune(self, ctx: RoundContext) -> RoundResult:
        est = self._estimate(ctx)
        scores, negative, nonfinite = {}, 0, 0
        for t in ctx.targets:
            h, neg, bad = sanitize_curvature(t.local(est.diagonal(t.name)))  # this rank's rows when sharded
            negative, nonfinite = negative + neg, nonfinite + bad
            scores[t.name] = 0.5 * h * t.local_param.double() ** 2
        if negative or nonfinite:
            warn(
                f"OBD ({self.curvature}): {negative} negative curvature entries used as |h|, "
                f"{nonfinite} non-finite entries kept unpruned"
            )
        masks = ctx.select(scores)
        removed = ctx.global_sum({n: float(scores[n][ctx.masks[n] & ~masks[n]].nansum()) for n in masks})
        info = {"negative_curvature": negative, "nonfinite_curvature": nonfinite}
        if self.curvature == "activations":
            # Wanda's scores are the layer-wise reconstruction error (1/2 ||dW x||^2 with the inputs' diagonal
            # second moment, nothing compensated), in each layer's output units: not a loss
            info["reconstruction_error"] = removed
            return RoundResult(masks, info=info)
        return RoundResult(masks, predicted_loss_increase=removed, info=info)
