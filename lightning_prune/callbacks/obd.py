"""``OBDPruning``: Optimal Brain Damage as a Lightning callback.

The criterion and its options (this callback's arguments after ``target``): :class:`~lightning_prune.criteria.OBD`.
"""

from __future__ import annotations

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import OBD


class OBDPruning(PruningCallback, criterion=OBD):
    """Prune the weights with the smallest ``1/2 h_ii w_i^2``.

    The saliencies are in loss units, so ``scope="global"`` compares them across layers, and their
    sum over the removed weights is logged as ``prune/predicted_loss_increase`` next to the
    measured ``prune/actual_loss_increase``. ``"activations"`` scores in each layer's output units
    instead: their sum is a reconstruction error, logged as ``prune/reconstruction_error``, not a
    loss. Other arguments: see :class:`~lightning_prune.engine.pruner.Pruner`.
    """
