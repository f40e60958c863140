"""Lightning adapters: pruners driven by ``Trainer.fit``'s hooks."""

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.callbacks.distill import Distillation
from lightning_prune.callbacks.magnitude import MagnitudePruning
from lightning_prune.callbacks.obd import OBDPruning
from lightning_prune.callbacks.obs import OBSPruning

__all__ = ["Distillation", "MagnitudePruning", "OBDPruning", "OBSPruning", "PruningCallback"]
