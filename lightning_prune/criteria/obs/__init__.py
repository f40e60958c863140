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

import inspect
from typing import Any

from lightning_prune.criteria.obs.base import OBSCriterion
from lightning_prune.criteria.obs.curvature import KFACOBS, WoodFisherOBS
from lightning_prune.criteria.obs.layerwise import LayerwiseOBS
from lightning_prune.engine.schedule import check_options, forwarded

HESSIANS = {"layerwise": LayerwiseOBS, "fisher": WoodFisherOBS, "kfac": KFACOBS}


def _keywords(cls: type) -> list[inspect.Parameter]:
    params = inspect.signature(cls, eval_str=True).parameters.values()
    return [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


COMMON = _keywords(OBSCriterion)  # every Hessian's options
LAYERWISE = [p for p in _keywords(LayerwiseOBS) if p.name not in {c.name for c in COMMON}]


def OBS(hessian: str = "layerwise", **options: Any) -> OBSCriterion:
    """The OBS criterion of ``hessian`` with these options (:class:`~lightning_prune.OBSPruning` documents
    them); an option the chosen Hessian does not use is refused, not ignored."""
    if hessian not in HESSIANS:
        raise ValueError(f"`hessian` must be one of {tuple(HESSIANS)}, got {hessian!r}")
    check_options("OBS", options, [*COMMON, *LAYERWISE])
    if hessian == "layerwise":
        return LayerwiseOBS(**options)
    if options.get("allocation") == "reconstruction":
        raise ValueError(f"`allocation='reconstruction'` is layer-wise OBS's objective; got hessian={hessian!r}")
    if options.get("reconstruct") not in (None, "original"):
        raise ValueError(
            f"`reconstruct` chooses the outputs layer-wise OBS fits; hessian={hessian!r} has no layer "
            f"outputs to reconstruct (got reconstruct={options['reconstruct']!r})"
        )
    unused = {p.name: options.pop(p.name) for p in LAYERWISE if p.name in options}
    if unused := {k: v for k, v in unused.items() if v != next(p.default for p in LAYERWISE if p.name == k)}:
        raise ValueError(
            f"{', '.join(f'`{k}={v!r}`' for k, v in unused.items())}: layer-wise OBS's options, which "
            f"hessian={hessian!r} does not use; drop them or pass hessian='layerwise'"
        )
    return HESSIANS[hessian](**options)


forwarded(OBS, LAYERWISE, COMMON)


__all__ = ["HESSIANS", "KFACOBS", "OBS", "LayerwiseOBS", "OBSCriterion", "WoodFisherOBS"]
