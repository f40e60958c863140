"""Curvature estimators: statistics as float64 sums with counts, all-reducible across ranks."""

from collections.abc import Sequence

from lightning_prune.curvature.estimators import EKFAC, KFAC, DiagFisher, Estimator
from lightning_prune.curvature.hutchinson import Hutchinson
from lightning_prune.curvature.window import CaptureWindow
from lightning_prune.targets import PruneTarget

CURVATURES = ("fisher", "kfac", "ekfac", "hutchinson")


def make_estimator(
    kind: str, targets: Sequence[PruneTarget], *, num_batches: int, num_probes: int = 8, seed: int = 0
) -> Estimator:
    if kind == "fisher":
        return DiagFisher(targets)
    if kind == "kfac":
        return KFAC(targets, diagonal_only=True)  # OBD uses diag(A) (x) diag(G) only
    if kind == "ekfac":
        return EKFAC(targets, num_batches)
    if kind == "hutchinson":
        return Hutchinson(targets, num_probes=num_probes, seed=seed)
    raise ValueError(f"`curvature` must be one of {CURVATURES}, got {kind!r}")


__all__ = ["CURVATURES", "EKFAC", "KFAC", "CaptureWindow", "DiagFisher", "Estimator", "Hutchinson", "make_estimator"]
