"""Lightning adapters: pruners driven by ``Trainer.fit``'s hooks.

The classes load on first use, so the package itself imports no Lightning: ``lightning_prune`` imports
:mod:`~lightning_prune.callbacks.isolation` (what a borrowed ``training_step`` must not do) where Lightning
is not installed too.
"""

import importlib
from typing import Any

_MODULES = {
    "Distillation": "distill",
    "MagnitudePruning": "magnitude",
    "OBDPruning": "obd",
    "OBSPruning": "obs",
    "PruningCallback": "base",
}

__all__ = ["Distillation", "MagnitudePruning", "OBDPruning", "OBSPruning", "PruningCallback"]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULES})


def callback_for(factory: Any) -> type:
    """The typed callback of a criterion factory (``OBS`` -> ``OBSPruning``): the class statement that says
    ``criterion=factory`` (:mod:`lightning_prune.callbacks.typed`) registered it."""
    for module in dict.fromkeys(_MODULES.values()):  # importing them runs their class statements
        importlib.import_module(f"{__name__}.{module}")
    from lightning_prune.callbacks.typed import TYPED

    if factory not in TYPED:
        raise ValueError(f"no pruning callback declares criterion={getattr(factory, '__name__', factory)!r}")
    return TYPED[factory]
