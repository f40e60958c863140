"""What a round says, as data and text: flat metrics, a one-line summary, the per-layer table.

Pure functions of round records, shared by ``prune()`` (which prints) and the Lightning adapter
(which sends the metrics to every logger, see :mod:`lightning_prune.callbacks.reporting`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def round_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """Flat scalar metrics of one round record (NaNs dropped: not every logger accepts them)."""
    metrics = {
        "prune/round": record["round"],
        "prune/sparsity": record["sparsity"],
        "prune/target_sparsity": record["target_sparsity"],
        "prune/target_reached": float(record["pruned"] >= round(record["target"] * record["total"])),
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


def pruner_table(
    targets: Sequence[Any], kept: Mapping[str, int], pattern: Any, skipped: Sequence[tuple[str, str]]
) -> str:
    """:func:`layer_table` of a pruner's ``targets`` with ``kept`` entries, then what its ``pattern`` left
    alone and the parameters its selection ``skipped`` by default, with the reason."""
    rows = [(t.name, tuple(t.param.shape), kept[t.name], t.param.numel()) for t in targets]
    table = layer_table(rows)
    if notes := pattern.notes:
        table += f"\npattern='{pattern}' left alone: " + "; ".join(notes)
    if skipped:
        table += "\nnot pruned: " + "; ".join(f"{n} ({why})" for n, why in skipped)
    return table


def when(record: Mapping[str, Any]) -> str:
    """``epoch 3``, ``step 500`` or ``one-shot``: where a round ran."""
    trigger = record.get("trigger", "epoch")
    if trigger == "step":
        return f"step {record['global_step']}"
    if trigger == "epoch":
        return f"epoch {record['epoch']}"
    return "one-shot"


def round_summary(record: Mapping[str, Any]) -> str:
    parts = [
        f"[lightning-prune] round {record['round']} ({when(record)}): "
        f"sparsity {record['sparsity']:.2%} (this round {record['target_sparsity']:.2%}, "
        f"final target {record['target']:.2%}"
        + (f", pattern {record['pattern']})" if record.get("pattern", "unstructured") != "unstructured" else ")")
    ]
    if "structures_total" in record:
        parts[0] += f", {record['structures_pruned']}/{record['structures_total']} structures removed"
    pred, act = record["predicted_loss_increase"], record["actual_loss_increase"]
    measured = record.get("loss_measured", not math.isnan(act))
    parts.append(f"loss {record['loss_before']:.4f} -> {record['loss_after']:.4f}" if measured else NOT_MEASURED)
    if not math.isnan(pred):
        parts.append(f"predicted +{pred:.4g} / actual {f'{act:+.4g}' if measured else 'not measured'}")
    reconstruction = record.get("info", {}).get("reconstruction_error")
    if isinstance(reconstruction, (int, float)) and not math.isnan(reconstruction):
        parts.append(f"reconstruction error +{reconstruction:.4g} ({RECONSTRUCTION_UNIT})")
    parts.append(f"in {record['seconds']:.2f}s")
    return " | ".join(parts)


NOT_MEASURED = "loss not measured"
# what layer-wise criteria predict instead of a loss: summed over the layers, each in its own output units
RECONSTRUCTION_UNIT = "1/2 E||dW x||^2 of the layer outputs, not a loss"
