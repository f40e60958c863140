"""``OBSPruning``: Optimal Brain Surgeon as a Lightning callback.

The criterion, its Hessian models, solvers and allocation live in :mod:`lightning_prune.criteria.obs`;
its options (this callback's arguments after ``target``) are :func:`~lightning_prune.criteria.obs.OBS`'s.
"""

from __future__ import annotations

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import OBS


class OBSPruning(PruningCallback, criterion=OBS):
    """Prune by OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` and move the surviving weights to compensate.

    Other arguments (``blocks=`` for SparseGPT's block-by-block round among them): see
    :class:`~lightning_prune.engine.pruner.Pruner`.
    """
