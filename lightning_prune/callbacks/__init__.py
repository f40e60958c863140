from lightning_prune.callbacks.base import PruningCallback, RoundContext, RoundResult
from lightning_prune.callbacks.magnitude import MagnitudePruning
from lightning_prune.callbacks.obd import OBDPruning

__all__ = ["MagnitudePruning", "OBDPruning", "PruningCallback", "RoundContext", "RoundResult"]
