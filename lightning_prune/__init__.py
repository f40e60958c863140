"""lightning-prune: prune while you train, with second-order information, as Lightning callbacks."""

from lightning_prune.callbacks import MagnitudePruning, OBDPruning, OBSPruning, PruningCallback

__all__ = ["MagnitudePruning", "OBDPruning", "OBSPruning", "PruningCallback"]
__version__ = "0.1.0"
