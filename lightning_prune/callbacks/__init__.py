from lightning_prune.callbacks.base import PruningCallback, RoundContext, RoundResult
from lightning_prune.callbacks.magnitude import MagnitudePruning

__all__ = ["MagnitudePruning", "PruningCallback", "RoundContext", "RoundResult"]
