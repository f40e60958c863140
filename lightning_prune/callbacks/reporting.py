"""What a round tells the user inside ``Trainer.fit``: logger metrics, W&B charts, console, progress bars.

Scalars go to *every* attached Lightning logger (CSV, TensorBoard, W&B, MLflow, ...) through
``logger.log_metrics`` at the current global step. Rounds can fire inside ``on_validation_end``
where ``LightningModule.log`` is not allowed, hence the direct logger call. W&B additionally gets
a per-layer table and bar chart, and the pruning curve (validation metric against sparsity).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_prune.engine.calibration import ProgressFactory, no_progress, tqdm_progress
from lightning_prune.engine.summary import round_metrics


@rank_zero_only
def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=trainer.global_step)
        logger.save()


@rank_zero_only
def log_round(trainer: pl.Trainer, record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    log_metrics(trainer, round_metrics(record))
    from lightning_prune.callbacks.wandb_charts import log_wandb_round

    log_wandb_round(trainer, record, history)


def trainer_progress(trainer: pl.Trainer, enabled: bool = True) -> ProgressFactory:
    """tqdm bars for calibration passes, on rank 0 and only when the trainer shows a progress bar."""
    bar = trainer.progress_bar_callback
    return tqdm_progress if enabled and bar is not None and bar.is_enabled else no_progress


@rank_zero_only
def console(trainer: pl.Trainer, text: str, *, training: bool = True) -> None:
    """Print on rank 0 without tearing the progress bar.

    ``training=False`` after the training loop: Lightning's TQDM bar prints only through a bar that
    is still open, and it closes them at ``on_train_end``, so ``bar.print`` would print nothing.
    """
    bar = trainer.progress_bar_callback
    if training and bar is not None and bar.is_enabled and hasattr(bar, "print"):
        bar.print(text)
    else:
        print(text, flush=True)
