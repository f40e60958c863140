"""Drive a hook-based estimator through one capture window of training steps."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_prune.capture import LayerCapture, per_sample_factor
from lightning_prune.curvature.estimators import Estimator
from lightning_prune.numerics import exact_float32
from lightning_prune.targets import PruneTarget


class CaptureWindow:
    """Hooks on while open; each backward pass is folded into the estimator.

    The training loop calls :meth:`after_backward` after every backward pass with what it knows
    of the loss's scaling (gradient accumulation, AMP loss scale), and :meth:`end_batch` after every
    batch. A loss-scaled step whose captured gradients are not finite (an AMP overflow the scaler
    will skip) is dropped as a whole and counted in :attr:`skipped`.
    """

    def __init__(self, estimator: Estimator, targets: Sequence[PruneTarget], reduction: str = "mean") -> None:
        self.estimator, self.reduction = estimator, reduction
        self.capture = LayerCapture(targets)
        self.skipped = 0

    def open(self) -> None:
        self.capture.attach()

    def after_backward(self, *, accumulate: int = 1, loss_scale: float | None = None) -> None:
        """``loss_scale`` is the AMP scaler's current scale, ``None`` without a scaler."""
        items = list(self.capture.drain())
        if not items:
            return
        if loss_scale is not None and not all(bool(torch.isfinite(g).all()) for _, _, g in items):  # type: ignore[arg-type]
            self.skipped += 1  # only a loss-scaled step can overflow; the scaler will skip it
            return
        scale = 1.0 if loss_scale is None else loss_scale
        with exact_float32():
            for target, x, g in items:
                factor = per_sample_factor(
                    x.shape[0], reduction=self.reduction, accumulate=accumulate, loss_scale=scale
                )
                self.estimator.update(target.name, x, g * factor)  # type: ignore[operator]

    def end_batch(self) -> None:
        self.estimator.end_batch()

    def discard(self) -> None:
        """Remove hooks and drop the statistics (the fit ended before the round)."""
        self.capture.detach()

    def close(self) -> Estimator:
        """Remove hooks and all-reduce the statistics across ranks."""
        self.capture.detach()
        self.estimator.reduce_()
        return self.estimator
