"""lightning-prune: second-order pruning (OBD, OBS) as Lightning callbacks while you train, and ``prune()`` after.

Named algorithms (``SparseGPT``, ``Wanda``, ``OBC``, ``WoodFisher``, ``OBD``, ``GMP``:
:mod:`lightning_prune.presets`) build the same pruners as the callbacks' flags. The pruning core
(``prune``, ``Pruner``, the presets, :mod:`lightning_prune.criteria` and everything they use)
imports nothing from Lightning; the callbacks, the Lightning adapters over it, are imported on
first use, so ``from lightning_prune import prune`` works where Lightning is not installed (torch
and numpy are all it needs). Only the adapter's guard for a borrowed ``training_step``
(:mod:`lightning_prune.callbacks.isolation`, which imports no Lightning) loads with the package, so
``prune()`` on a LightningModule neither logs nor moves its metrics. The experiment app
(:mod:`lightning_prune.app`: the commands, reference data and models; the ``cli`` extra) is never
imported by the library.
"""

from typing import Any

from lightning_prune.callbacks import isolation  # noqa: F401  (registers what a borrowed training_step must not do)
from lightning_prune.engine.pruner import Pruner
from lightning_prune.engine.round import prune
from lightning_prune.presets import GMP, OBC, OBD, SparseGPT, Wanda, WoodFisher
from lightning_prune.surgery.budget import shrink_to
from lightning_prune.surgery.depth import prune_blocks
from lightning_prune.surgery.experts import prune_experts
from lightning_prune.surgery.export import export_semi_structured
from lightning_prune.surgery.hidden import prune_hidden
from lightning_prune.surgery.shrink import load_shrunk, shrink

_CALLBACKS = ("Distillation", "MagnitudePruning", "OBDPruning", "OBSPruning", "PruningCallback")

__all__ = [
    "GMP",
    "OBC",
    "OBD",
    "Distillation",
    "MagnitudePruning",
    "OBDPruning",
    "OBSPruning",
    "Pruner",
    "PruningCallback",
    "SparseGPT",
    "Wanda",
    "WoodFisher",
    "export_semi_structured",
    "load_shrunk",
    "prune",
    "prune_blocks",
    "prune_experts",
    "prune_hidden",
    "shrink",
    "shrink_to",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        from lightning_prune import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'lightning_prune' has no attribute {name!r}")
