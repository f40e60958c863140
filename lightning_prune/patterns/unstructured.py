"""``pattern="unstructured"`` (the default): any weight may be pruned."""

from __future__ import annotations

from lightning_prune.patterns.base import Pattern, register

UNSTRUCTURED = Pattern()


@register("'unstructured'")
def _parse(spec: str) -> Pattern | None:
    return UNSTRUCTURED if spec == "unstructured" else None
