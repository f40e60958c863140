"""What a round tells the user: logger metrics, W&B charts, and the rank-0 console summary.

Scalars go to *every* attached Lightning logger (CSV, TensorBoard, W&B, MLflow, ...) through
``logger.log_metrics`` at the current global step. Rounds can fire inside ``on_validation_end``
where ``LightningModule.log`` is not allowed, hence the direct logger call. W&B additionally gets
a per-layer table and bar chart, and the pruning curve (validation metric against sparsity).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of one round record (NaNs dropped: not every logger accepts them)."""
    metrics = {
        "prune/round": record["round"],
        "prune/sparsity": record["sparsity"],
        "prune/target_sparsity": record["target_sparsity"],
        "prune/predicted_loss_increase": record["predicted_loss_increase"],
        "prune/actual_loss_increase": record["actual_loss_increase"],
        "prune/loss_before": record["loss_before"],
        "prune/loss_after": record["loss_after"],
    }
    for name, value in record["layer_sparsity"].items():
        metrics[f"prune/layer/{name}"] = value
    for key, value in record.get("info", {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"prune/{key}"] = value
    return {k: float(v) for k, v in metrics.items() if v is not None and not math.isnan(float(v))}


@rank_zero_only
def log_round(trainer: pl.Trainer, record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    metrics = round_metrics(record)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()
    from lightning_prune.wandb_charts import log_wandb_round

    log_wandb_round(trainer, record, history)


def layer_table(rows: Sequence[tuple[str, tuple[int, ...], int, int]]) -> str:
    """Fixed-width per-layer table: name, shape, kept/total weights, sparsity."""
    header = ("layer", "shape", "kept / total", "sparsity")
    body = [
        (name, "x".join(map(str, shape)), f"{kept:,} / {total:,}", f"{1 - kept / max(total, 1):.2%}")
        for name, shape, kept, total in rows
    ]
    kept = sum(r[2] for r in rows)
    total = sum(r[3] for r in rows)
    body.append(("all pruned weights", "", f"{kept:,} / {total:,}", f"{1 - kept / max(total, 1):.2%}"))
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(4)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in body]
    return "\n".join(lines)


def round_summary(record: Mapping[str, Any]) -> str:
    parts = [
        f"[lightning-prune] round {record['round']} (epoch {record['epoch']}): "
        f"sparsity {record['sparsity']:.2%} (target {record['target_sparsity']:.2%})"
    ]
    pred, act = record["predicted_loss_increase"], record["actual_loss_increase"]
    if not math.isnan(act):
        parts.append(f"loss {record['loss_before']:.4f} -> {record['loss_after']:.4f}")
    if not math.isnan(pred):
        parts.append(f"predicted +{pred:.4g} / actual {act:+.4g}")
    parts.append(f"in {record['seconds']:.2f}s")
    return " | ".join(parts)


class Progress:
    """A tqdm bar for calibration passes, on rank 0 and only when the trainer shows a progress bar."""

    def __init__(self, trainer: pl.Trainer, total: int, desc: str, enabled: bool = True) -> None:
        bar = trainer.progress_bar_callback
        self._bar = None
        if enabled and trainer.is_global_zero and bar is not None and bar.is_enabled and total > 0:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)

    def __call__(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@rank_zero_only
def console(trainer: pl.Trainer, text: str) -> None:
    """Print on rank 0 without tearing the progress bar."""
    bar = trainer.progress_bar_callback
    if bar is not None and bar.is_enabled and hasattr(bar, "print"):
        bar.print(text)
    else:
        print(text, flush=True)
