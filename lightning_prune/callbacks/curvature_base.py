"""Shared plumbing of the callbacks that learn curvature from training batches (OBD, OBS)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_prune.callbacks.base import PruningCallback, RoundContext
from lightning_prune.capture import check_hookable
from lightning_prune.curvature import CaptureWindow, Estimator
from lightning_prune.targets import PruneTarget

REDUCTIONS = ("mean", "sum")


class CurvaturePruningCallback(PruningCallback):
    """Opens a :class:`CaptureWindow` over the last ``num_batches`` training batches of a round epoch."""

    hooked = True  # False for estimators that run their own calibration pass at round time

    def __init__(self, *args: Any, loss_reduction: str = "mean", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"`loss_reduction` must be one of {REDUCTIONS}, got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self._window: CaptureWindow | None = None

    def _make_estimator(self, targets: list[PruneTarget]) -> Estimator:
        raise NotImplementedError

    def _on_targets(self, targets: list[PruneTarget]) -> None:
        if self.hooked:
            check_hookable(targets)

    def _open_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hooked:
            assert self._targets is not None
            self._window = CaptureWindow(self._make_estimator(self._targets), self._targets, self.loss_reduction)
            self._window.open()

    def _after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window is not None:
            self._window.after_backward(trainer, pl_module)

    def _after_window_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window is not None:
            self._window.end_batch()

    def _close_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Estimator | None:
        window, self._window = self._window, None
        if window is None:
            return None
        if window.skipped:
            rank_zero_warn(f"{window.skipped} window batches had non-finite gradients (AMP overflow) and were skipped")
        return window.close()

    def _require_stats(self, ctx: RoundContext, estimator: Estimator | None) -> Estimator:
        """The round's estimator, or a clear error if no batch reached it."""
        unseen = (
            [t.name for t in ctx.targets]
            if estimator is None
            else [t.name for t in ctx.targets if not estimator.seen(t.name)]
        )
        if unseen:
            what = (
                "no training batch was accumulated"
                if estimator is None or len(unseen) == len(ctx.targets)
                else f"layers {unseen[:5]} received no data"
            )
            raise RuntimeError(
                f"{type(self).__name__} round at epoch {ctx.trainer.current_epoch}: {what} in the capture window "
                f"(the last num_batches={self.num_batches} training batches of the epoch). Check that the layers "
                "are used in training_step and that the epoch has training batches."
            )
        return estimator  # type: ignore[return-value]


def sanitize_curvature(h: Tensor) -> tuple[Tensor, int, int]:
    """OBD's rule for bad diagonal entries: ``(h', negatives, non-finite)``.

    Negative entries (Hutchinson estimates the true, indefinite Hessian; noise does the rest) are
    replaced by their absolute value: the loss is as sensitive to moving the weight either way.
    NaN/inf entries become NaN, so the selection keeps those weights (NaN ranks as +inf).
    """
    finite = torch.isfinite(h)
    negative = finite & (h < 0)
    out = torch.where(finite, h.abs(), torch.full_like(h, float("nan")))
    return out, int(negative.sum()), int((~finite).sum())
