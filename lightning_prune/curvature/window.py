"""Drive a hook-based estimator through one capture window of training steps."""

from __future__ import annotations

from collections.abc import Sequence

from lightning_prune.capture import LayerCapture, all_finite, per_sample_factor
from lightning_prune.curvature.estimators import Estimator
from lightning_prune.numerics import exact_float32
from lightning_prune.targets import PruneTarget


class CaptureWindow:
    """Hooks on while open; each backward pass is folded into the estimator.

    The training loop calls :meth:`after_backward` after every backward pass with what it knows
    of the loss's scaling (gradient accumulation, AMP loss scale), and :meth:`end_batch` after every
    batch. A step whose captured inputs or gradients are not finite (a NaN loss, an AMP overflow the
    scaler will skip) is dropped as a whole and counted in :attr:`skipped`, with or without AMP.
    """

    def __init__(self, estimator: Estimator, targets: Sequence[PruneTarget], reduction: str = "mean") -> None:
        self.estimator, self.reduction = estimator, reduction
        self.capture = LayerCapture(targets)

    @property
    def skipped(self) -> int:
        return self.estimator.skipped

    def open(self) -> None:
        self.capture.attach()

    def after_backward(self, *, accumulate: int = 1, loss_scale: float | None = None) -> bool:
        """Fold the step in; ``False`` if it was skipped as non-finite. ``loss_scale``: the AMP
        scaler's current scale, ``None`` without a scaler."""
        items = list(self.capture.drain())
        if not items:
            return True
        if not all_finite(items):
            self.estimator.skipped += 1
            return False
        scale = 1.0 if loss_scale is None else loss_scale
        with exact_float32():
            for target, x, g in items:
                factor = per_sample_factor(
                    x.shape[0], reduction=self.reduction, accumulate=accumulate, loss_scale=scale
                )
                self.estimator.update(target.name, x, g * factor)  # type: ignore[operator]
        return True

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
