"""Statistics of a round: estimators (float32 sums with float64 counts, all-reducible across ranks),
the capture of layer inputs and output gradients, the calibration passes and the training window."""

from collections.abc import Sequence
from typing import Literal, get_args

from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.distributed import LOCAL, Collectives
from lightning_prune.stats.blockfisher import BlockFisher
from lightning_prune.stats.estimators import (
    EKFAC,
    KFAC,
    Composite,
    CrossCovariance,
    DiagFisher,
    Estimator,
    InputCovariance,
)
from lightning_prune.stats.hutchinson import Hutchinson
from lightning_prune.stats.window import CaptureWindow

Curvature = Literal["fisher", "kfac", "ekfac", "hutchinson", "activations"]
CURVATURES: tuple[str, ...] = get_args(Curvature)


def make_estimator(
    kind: str,
    targets: Sequence[PruneTarget],
    *,
    num_batches: int,
    num_probes: int = 8,
    seed: int = 0,
    comm: Collectives = LOCAL,
) -> Estimator:
    """OBD's diagonal estimators by name."""
    if kind == "fisher":
        return DiagFisher(targets, comm)
    if kind == "kfac":
        return KFAC(targets, diagonal_only=True, comm=comm)  # OBD uses diag(A) (x) diag(G) only
    if kind == "ekfac":
        return EKFAC(targets, num_batches, comm)
    if kind == "hutchinson":
        return Hutchinson(targets, num_probes=num_probes, seed=seed, comm=comm)
    if kind == "activations":  # Wanda: the layer-wise Hessian's diagonal, no labels, no backward pass
        return InputCovariance(targets, comm, diagonal_only=True)
    raise ValueError(f"`curvature` must be one of {CURVATURES}, got {kind!r}")


__all__ = [
    "CURVATURES",
    "EKFAC",
    "KFAC",
    "BlockFisher",
    "CaptureWindow",
    "Composite",
    "CrossCovariance",
    "DiagFisher",
    "Estimator",
    "Hutchinson",
    "InputCovariance",
    "make_estimator",
]
