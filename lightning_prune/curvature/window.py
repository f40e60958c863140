"""Drive a hook-based estimator through one capture window of training batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning.pytorch as pl
import torch

from lightning_prune.calibration import LossFn, batch_loss, can_compute_loss, eval_mode
from lightning_prune.capture import LayerCapture, per_sample_factor
from lightning_prune.curvature.estimators import Estimator
from lightning_prune.numerics import exact_float32
from lightning_prune.targets import PruneTarget


def hook_grad_multiplier(trainer: pl.Trainer, pl_module: pl.LightningModule, batch_size: int, reduction: str) -> float:
    """Factor turning this step's hook gradients into per-sample loss gradients."""
    accumulate = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
    return per_sample_factor(batch_size, reduction=reduction, accumulate=accumulate, loss_scale=scale)


class CaptureWindow:
    """Hooks on while open; each backward pass is folded into the estimator.

    A step whose captured gradients are not finite (an AMP overflow the scaler will skip) is
    dropped as a whole and counted in :attr:`skipped`.
    """

    def __init__(self, estimator: Estimator, targets: Sequence[PruneTarget], reduction: str = "mean") -> None:
        self.estimator, self.reduction = estimator, reduction
        self.capture = LayerCapture(targets)
        self.skipped = 0

    def open(self) -> None:
        self.capture.attach()

    def after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        items = list(self.capture.drain())
        if not items:
            return
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and not all(bool(torch.isfinite(g).all()) for _, _, g in items):
            self.skipped += 1  # only a loss-scaled step can overflow; the scaler will skip it
            return
        with exact_float32():
            for target, x, g in items:
                factor = hook_grad_multiplier(trainer, pl_module, x.shape[0], self.reduction)
                self.estimator.update(target.name, x, g * factor)

    def end_batch(self) -> None:
        self.estimator.end_batch()

    def close(self) -> Estimator:
        """Remove hooks and all-reduce the statistics across ranks."""
        self.capture.detach()
        self.estimator.reduce_()
        return self.estimator


def calibration_pass(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batches: Sequence,
    estimator: Estimator,
    targets: Sequence[PruneTarget],
    loss_fn: LossFn | None,
    reduction: str = "mean",
    progress: Callable[[], None] | None = None,
) -> Estimator:
    """Re-estimate hook statistics at the *current* weights from stored batches.

    Used to recompute curvature inside an OBS round (as M-FAC/oBERT do). Runs in eval mode with
    ``torch.autograd.grad`` on the target weights only, so no ``.grad`` of the model is touched.
    """
    if not can_compute_loss(pl_module, loss_fn):
        raise ValueError("recomputing curvature needs a loss: pass loss_fn=... (manual optimization)")
    capture = LayerCapture(targets)
    params = [t.param for t in targets]
    capture.attach()
    try:
        with eval_mode(pl_module), torch.enable_grad(), trainer.precision_plugin.forward_context():
            for i, batch in enumerate(batches):
                loss = batch_loss(pl_module, batch, i, loss_fn)
                torch.autograd.grad(loss, params, allow_unused=True)
                with exact_float32():
                    for target, x, g in capture.drain():
                        factor = per_sample_factor(x.shape[0], reduction=reduction, accumulate=1, loss_scale=1.0)
                        estimator.update(target.name, x, g * factor)
                estimator.end_batch()
                if progress is not None:
                    progress()
    finally:
        capture.detach()
    estimator.reduce_()
    return estimator
