"""Drive a hook-based estimator through one capture window of training steps."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from lightning_prune.engine.targets import PruneTarget
from lightning_prune.stats.capture import (
    LOSS_WATCH,
    LayerCapture,
    LossTerms,
    all_finite,
    loss_weight,
    per_sample_factor,
)
from lightning_prune.stats.estimators import Estimator
from lightning_prune.stats.passes import fold


class CaptureWindow:
    """Hooks on while open; each backward pass is folded into the estimator.

    The training loop calls :meth:`begin_batch` before every batch's training step (the loss's
    calls are watched from there, :class:`~lightning_prune.stats.capture.LossTerms`, so a language model's
    curvature counts its tokens), :meth:`before_backward` with the loss that backward receives,
    :meth:`after_backward` after every backward pass with what it knows of the loss's scaling
    (gradient accumulation, AMP loss scale), and :meth:`end_batch` after every batch. A step whose
    captured inputs or gradients are not finite (a NaN loss, an AMP overflow the scaler will skip)
    is dropped as a whole and counted in :attr:`skipped`, with or without AMP.
    """

    def __init__(self, estimator: Estimator, targets: Sequence[PruneTarget], reduction: str = "mean") -> None:
        self.estimator, self.reduction = estimator, reduction
        self.capture = LayerCapture(targets)
        self._terms: LossTerms | None = None  # the shared watch, while this window watches a batch
        self._cursor = 0  # the watch's calls before this one belong to earlier steps (or other windows' rounds)
        self._loss: float | None = None  # the loss backward received (divided by accumulation, AMP-scaled)

    @property
    def skipped(self) -> int:
        return self.estimator.skipped

    def open(self) -> None:
        self.capture.attach()

    def begin_batch(self) -> None:
        """Watch this batch's loss calls until :meth:`end_batch`."""
        if self._terms is None:
            self._terms = LOSS_WATCH.hold(self)
        self._cursor, self._loss = len(self._terms.calls), None

    def before_backward(self, loss: Tensor) -> None:
        self._loss = float(loss.detach())

    def after_backward(self, *, accumulate: int = 1, loss_scale: float | None = None) -> bool:
        """Fold the step in; ``False`` if it was skipped as non-finite. ``loss_scale``: the AMP
        scaler's current scale, ``None`` without a scaler."""
        items = list(self.capture.drain())
        scale = 1.0 if loss_scale is None else loss_scale
        calls = [] if self._terms is None else self._terms.calls[self._cursor :]
        weight, counted = (None, None) if self._loss is None else loss_weight(calls, self._loss * accumulate / scale)
        if self._terms is not None:  # a manual step may run several forward/backward pairs
            self._cursor = len(self._terms.calls)
        self._loss = None
        if not items:
            return True
        if not all_finite(items):
            self.estimator.skipped += 1
            return False
        self.estimator.note_terms(items[0][1].shape[0], counted)
        kw = dict(reduction=self.reduction, accumulate=accumulate, loss_scale=scale, terms=weight)
        rows = [(t, x, g * per_sample_factor(x.shape[0], **kw), None) for t, x, g in items]  # type: ignore[operator]
        return fold(self.estimator, rows, checked=True)

    def end_batch(self) -> None:
        self._unwatch()
        self.estimator.end_batch()

    def _unwatch(self) -> None:
        if self._terms is not None:
            self._terms = None
            LOSS_WATCH.release(self)

    def suspend(self) -> None:
        """Remove hooks and the loss-term watch (a failed fit), keeping the statistics for a checkpoint."""
        self._unwatch()
        self.capture.detach()

    def discard(self) -> None:
        """Remove hooks and drop the statistics (the fit ended before the round)."""
        self._unwatch()
        self.capture.detach()

    def close(self) -> Estimator:
        """Remove hooks and all-reduce the statistics across ranks."""
        self._unwatch()
        self.capture.detach()
        self.estimator.reduce_()
        return self.estimator
