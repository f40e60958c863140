"""W&B-only extras for a round: per-layer table and bar chart, pruning curve, a per-round table, predicted vs
actual loss increase (loss units only; other predictions are in the table, under their own unit).

Scalars reach W&B like every other logger (``prune/*``); this adds W&B's own tables and charts.
The pruning curve plots the validation metric Lightning had at each round (measured at the end of
that epoch, i.e. at the sparsity the previous round left) against sparsity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from lightning_prune.engine.summary import RECONSTRUCTION_UNIT


def curve_metric(monitor: Mapping[str, float]) -> str | None:
    """The validation metric for the pruning curve: a ``val*acc*`` key if any, else the first ``val*``."""
    keys = sorted(k for k in monitor if k.startswith("val"))
    for k in keys:
        if "acc" in k:
            return k
    return keys[0] if keys else None


def curve_points(history: Sequence[Mapping[str, Any]]) -> tuple[str | None, list[list[float]]]:
    metric = curve_metric(history[-1].get("monitor", {})) if history else None
    points, previous = [], 0.0
    for record in history:
        value = record.get("monitor", {}).get(metric) if metric else None
        if value is not None and not math.isnan(value):
            points.append([previous, float(value), record["round"]])
        previous = record["sparsity"]
    return metric, points


def log_wandb_round(trainer: pl.Trainer, record: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """Log W&B tables/charts for this round if a ``WandbLogger`` is attached (no-op otherwise)."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers:
        return
    import wandb

    layers = wandb.Table(
        columns=["layer", "sparsity"], data=[[n, float(s)] for n, s in record["layer_sparsity"].items()]
    )
    payload: dict[str, Any] = {
        "prune/layer_table": layers,
        "prune/layer_sparsity": wandb.plot.bar(layers, "layer", "sparsity", title="Sparsity per layer"),
    }
    metric, points = curve_points(history)
    if metric and points:
        curve = wandb.Table(columns=["sparsity", metric, "round"], data=points)
        payload["prune/pruning_curve"] = wandb.plot.line(curve, "sparsity", metric, title=f"{metric} vs sparsity")
    columns, rows = round_rows(history)
    payload["prune/rounds"] = wandb.Table(columns=columns, data=rows)
    series = loss_series(history)
    if series:
        payload["prune/loss_increase"] = wandb.plot.line_series(
            xs=[r["round"] for r in history],
            ys=[ys for _, ys in series],
            keys=[key for key, _ in series],
            title="Loss increase per round (in the training loss's units)",
            xname="round",
        )
    for logger in loggers:
        logger.experiment.log(payload)


def loss_series(history: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[float]]]:
    """The chart's lines, all in loss units: the quadratic model's prediction and the measured increase.

    Nothing when no round predicted a loss (magnitude, Wanda, label-free reconstruction: their
    numbers are in other units, see :func:`round_rows`); the measured line only where a loss was measured.
    """
    predicted = [r["predicted_loss_increase"] for r in history]
    if all(math.isnan(p) for p in predicted):
        return []
    series = [("predicted (quadratic model)", predicted)]
    if any(r.get("loss_measured", True) for r in history):
        series.append(("actual (measured)", [r["actual_loss_increase"] for r in history]))
    return series


def round_rows(history: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The per-round table: each number in a column that names its unit; ``None`` (an empty cell):
    not predicted by the criterion, or not measured (no loss, or ``eval_batches=0``)."""
    columns = [
        "round",
        "sparsity",
        "loss before",
        "loss after",
        "actual loss increase (loss)",
        "predicted loss increase (loss)",
        f"reconstruction error ({RECONSTRUCTION_UNIT})",
    ]

    def cell(value: Any, known: bool = True) -> float | None:
        return float(value) if known and isinstance(value, (int, float)) and not math.isnan(value) else None

    rows = []
    for r in history:
        measured = r.get("loss_measured", True)
        rows.append(
            [
                r["round"],
                float(r["sparsity"]),
                cell(r["loss_before"], measured),
                cell(r["loss_after"], measured),
                cell(r["actual_loss_increase"], measured),
                cell(r["predicted_loss_increase"]),
                cell(r.get("info", {}).get("reconstruction_error")),
            ]
        )
    return columns, rows
