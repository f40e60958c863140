"""Optimal Brain Surgeon (Hassibi & Stork 1993): remove weights *and* compensate the survivors.

One class per Hessian model, over the pure solver kernels in :mod:`lightning_prune.solvers`:

* :class:`LayerwiseOBS` (``hessian="layerwise"``, default): ``H = E[x x^T]`` of each layer's inputs
  (OBC/SparseGPT), rows weighted by ``G_ii`` into loss units; structured (``pattern="channels"``),
  sharded and block-by-block rounds are its own modules here.
* :class:`WoodFisherOBS` (``hessian="fisher"``): block-diagonal empirical Fisher.
* :class:`KFACOBS` (``hessian="kfac"``): ``H ~ G (x) A``.

:func:`OBS` builds the one its ``hessian`` names from :class:`~lightning_prune.OBSPruning`'s flat
options, refusing an option the chosen Hessian does not use.
"""

from __future__ import annotations

from lightning_prune.criteria.obs.base import OBSCriterion
from lightning_prune.criteria.obs.curvature import KFACOBS, WoodFisherOBS
from lightning_prune.criteria.obs.layerwise import LayerwiseOBS

HESSIANS = {"layerwise": LayerwiseOBS, "fisher": WoodFisherOBS, "kfac": KFACOBS}
LAYERWISE_DEFAULTS = {"solver": "auto", "allocation": "auto", "reconstruct": "original", "blocks": None}


def OBS(
    hessian: str = "layerwise",
    solver: str = "auto",
    allocation: str = "auto",
    damp: float = 0.01,
    block_size: int = 128,
    recompute_steps: int = 4,
    optimizer_state: str = "reset",
    solver_dtype: str = "float64",
    loss_reduction: str = "mean",
    fisher_type: str = "empirical",
    mc_samples: int = 1,
    blocks: str | None = None,
    reconstruct: str = "original",
) -> OBSCriterion:
    """The OBS criterion of ``hessian`` with these options (:class:`~lightning_prune.OBSPruning` documents them)."""
    if hessian not in HESSIANS:
        raise ValueError(f"`hessian` must be one of {tuple(HESSIANS)}, got {hessian!r}")
    common = dict(
        damp=damp,
        block_size=block_size,
        recompute_steps=recompute_steps,
        optimizer_state=optimizer_state,
        solver_dtype=solver_dtype,
        loss_reduction=loss_reduction,
        fisher_type=fisher_type,
        mc_samples=mc_samples,
    )
    layerwise = dict(solver=solver, allocation=allocation, reconstruct=reconstruct, blocks=blocks)
    if hessian == "layerwise":
        return LayerwiseOBS(**layerwise, **common)  # type: ignore[arg-type]
    if allocation == "reconstruction":
        raise ValueError(f"`allocation='reconstruction'` is layer-wise OBS's objective; got hessian={hessian!r}")
    if reconstruct != "original":
        raise ValueError(
            f"`reconstruct` chooses the outputs layer-wise OBS fits; hessian={hessian!r} has no layer "
            f"outputs to reconstruct (got reconstruct={reconstruct!r})"
        )
    if blocks is not None:
        raise ValueError(
            f"`blocks={blocks!r}` (sequential calibration) prunes each block from its own layer inputs, which "
            "needs the label-free layer-wise objective: hessian='layerwise', allocation='reconstruction' "
            f"(and scope='layer' or 'row'); got hessian={hessian!r}, allocation={allocation!r}"
        )
    unused = {k: v for k, v in layerwise.items() if v != LAYERWISE_DEFAULTS[k]}
    if unused:
        raise ValueError(
            f"{', '.join(f'`{k}={v!r}`' for k, v in unused.items())}: layer-wise OBS's options, which "
            f"hessian={hessian!r} does not use; drop them or pass hessian='layerwise'"
        )
    return HESSIANS[hessian](**common)  # type: ignore[arg-type]


__all__ = ["HESSIANS", "KFACOBS", "OBS", "LayerwiseOBS", "OBSCriterion", "WoodFisherOBS"]
