"""Side-effect-free loss evaluation on stored training batches.

Rounds evaluate the loss on the window's batches (actual loss increase), and some estimators
need extra passes (Hutchinson's Hessian-vector products, recomputed Fisher/K-FAC inside an OBS
round). Those passes must not disturb training, so they run:

* in eval mode (BatchNorm running statistics untouched, dropout off), restoring each module's
  own ``training`` flag afterwards;
* with ``self.log``/``self.log_dict`` muted and every torchmetrics ``Metric`` state restored, when
  the loss comes from the user's ``training_step``.

The loss is ``loss_fn(pl_module, batch)`` when given, else ``training_step(batch, batch_idx)``
(its tensor, or its ``"loss"`` entry). It must be the *mean* loss over the batch.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

LossFn = Callable[[pl.LightningModule, Any], Tensor]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


@contextlib.contextmanager
def _isolated(pl_module: pl.LightningModule) -> Iterator[None]:
    """Mute logging and snapshot torchmetrics state around a borrowed ``training_step`` call."""
    from torchmetrics import Metric

    metrics = [m for m in pl_module.modules() if isinstance(m, Metric)]
    saved = [(m, {k: copy.deepcopy(getattr(m, k)) for k in m._defaults}, m._update_count, m._computed) for m in metrics]
    pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del pl_module.log, pl_module.log_dict
        for m, state, count, computed in saved:
            for k, v in state.items():
                setattr(m, k, v)
            m._update_count, m._computed = count, computed


def can_compute_loss(pl_module: pl.LightningModule, loss_fn: LossFn | None) -> bool:
    """Borrowing ``training_step`` is only safe under automatic optimization (manual steps the optimizer)."""
    return loss_fn is not None or pl_module.automatic_optimization


def batch_loss(pl_module: pl.LightningModule, batch: Any, batch_idx: int, loss_fn: LossFn | None) -> Tensor:
    """Mean loss of one batch, with autograd enabled or not as the caller decides."""
    if loss_fn is not None:
        loss = loss_fn(pl_module, batch)
    else:
        with _isolated(pl_module):
            out = pl_module.training_step(batch, batch_idx)
        loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            "the pruning loss must be a scalar tensor; `training_step` returned "
            f"{type(loss).__name__} - pass loss_fn=lambda module, batch: ... to the pruning callback"
        )
    return loss.reshape(())


@torch.no_grad()
def mean_loss(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batches: Sequence[Any], loss_fn: LossFn | None
) -> float:
    """Mean loss over ``batches`` in eval mode under the trainer's precision (NaN without batches)."""
    if not batches or not can_compute_loss(pl_module, loss_fn):
        return math.nan
    total = 0.0
    with eval_mode(pl_module), trainer.precision_plugin.forward_context():
        for i, batch in enumerate(batches):
            total += float(batch_loss(pl_module, batch, i, loss_fn).float())
    return total / len(batches)
