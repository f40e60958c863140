"""Named algorithms: one-line factories with each paper's settings, returning the ordinary pruner.

``SparseGPT(target=0.5)`` is ``OBSPruning(target=0.5, allocation="reconstruction", scope="layer",
blocks="auto", solver="fast", reconstruct="current", solver_dtype="float32")``: the same object the
flags build, with every option overridable (``SparseGPT(target=0.5, pattern="2:4")``,
``GMP(0.9, every_n_steps=100)``).

What a preset returns, one contract (:class:`~lightning_prune.engine.facade.PrunerLike`): the typed
callback of its criterion (``OBSPruning``, ``OBDPruning``, ``MagnitudePruning``) where Lightning is
installed, else the core :class:`~lightning_prune.engine.pruner.Pruner` with the same criterion and
options. Both show the same state (``history``, ``masks``, ``sparsity``, ``target``, ``schedule``,
``layer_table()``, ...), ``prune()`` and ``masked_merge`` take either, and the callback also goes into
``Trainer(callbacks=[...])`` (the ``Pruner`` is always ``callback.pruner``). The core imports no
Lightning, so ``prune(model, data, SparseGPT(...))`` works in a torch + numpy environment.

* ``SparseGPT`` (Frantar & Alistarh 2023): layer-wise OBS, label-free reconstruction, the fast
  column sweep in float32 (the paper's precision: on a trained LLaMA the same perplexity as float64
  at 50/70%/2:4, and 0.7x the peak memory on a 60M one, benchmarks/RESULTS.md), one decoder block
  at a time on the pruned outputs of the blocks before it, the same sparsity in every layer:
  ``OBSPruning(allocation="reconstruction", scope="layer", blocks="auto", solver="fast",
  reconstruct="current", solver_dtype="float32")``;
* ``OBC`` (Frantar & Alistarh 2022, ExactOBS): the same with the exact greedy solver per row
  (``solver="exact"``);
* ``Wanda`` (Sun et al. 2023): ``|w_ij| ||x_j||`` compared within each output row, no labels, no
  weight update: ``OBDPruning(curvature="activations", scope="row")``; with ``pattern="channels"``
  (Wanda-sp) whole heads and neurons are compared with the pattern's own scope, as a row cannot hold one;
* ``WoodFisher`` (Singh & Alistarh 2020): OBS with the block-diagonal empirical Fisher (Woodbury
  inverse), global allocation, recomputed inside the round: ``OBSPruning(hessian="fisher",
  fisher_type="empirical")``;
* ``OBD`` (LeCun et al. 1990): ``1/2 h w^2`` with the Fisher diagonal, global allocation:
  ``OBDPruning(curvature="fisher")``;
* ``GMP`` (Zhu & Gupta 2017): gradual magnitude pruning, the cubic schedule, every layer to the
  same sparsity: ``MagnitudePruning(schedule="cubic", scope="layer")``.

``SparseGPT``, ``OBC`` and ``Wanda`` need no labels; ``blocks="auto"`` finds a decoder's repeated
blocks (pass ``blocks=None`` for a model without them).
"""

from __future__ import annotations

import inspect
from typing import Any

from lightning_prune.criteria import OBD as OBDCriterion
from lightning_prune.criteria import OBS, Magnitude
from lightning_prune.criteria.base import CriterionFactory, options_of, split_options
from lightning_prune.engine.facade import PrunerLike
from lightning_prune.engine.pruner import Pruner, pruner_parameters
from lightning_prune.engine.schedule import forwarded

SEQUENTIAL = {"allocation": "reconstruction", "scope": "layer", "blocks": "auto", "reconstruct": "current"}

# each preset: the criterion it prunes by and the settings it gives it (defined here only)
_SETTINGS: dict[str, tuple[CriterionFactory, dict[str, Any]]] = {
    "SparseGPT": (OBS, {**SEQUENTIAL, "solver": "fast", "solver_dtype": "float32"}),
    "OBC": (OBS, {**SEQUENTIAL, "solver": "exact"}),
    "Wanda": (OBDCriterion, {"curvature": "activations", "scope": "row"}),
    "WoodFisher": (OBS, {"hessian": "fisher", "fisher_type": "empirical"}),
    "OBD": (OBDCriterion, {"curvature": "fisher"}),
    "GMP": (Magnitude, {"schedule": "cubic", "scope": "layer"}),
}


def _preset(name: str, target: float, overrides: dict[str, Any]) -> PrunerLike:
    """The criterion's typed callback with the preset's settings and ``overrides``, or the same core
    :class:`Pruner` without Lightning."""
    factory, settings = _SETTINGS[name]
    if settings.get("scope") == "row" and "scope" not in overrides and _removes_structures(overrides.get("pattern")):
        # Wanda-sp / FLAP: whole structures are compared within their layer (the pattern's own default
        # scope), not within one output row, which a structure spans
        settings = {k: v for k, v in settings.items() if k != "scope"}
    options = {**settings, **overrides}
    cls = _callback_for(factory)
    if cls is not None:
        return cls(target, **options)
    own, rest = split_options(factory, options)
    return Pruner(factory(**own), target, **rest)


def _callback_for(factory: CriterionFactory) -> type | None:
    """The criterion's typed callback, or ``None`` where Lightning is not installed."""
    from lightning_prune import callbacks

    try:
        return callbacks.callback_for(factory)
    except ImportError:  # Lightning is not installed: the core pruner does the same in prune()
        return None


def _removes_structures(pattern: Any) -> bool:
    if pattern is None:
        return False
    from lightning_prune.patterns import parse_pattern

    try:
        return bool(parse_pattern(pattern).removes_structures)
    except (TypeError, ValueError):  # the pruner names the bad pattern
        return False


def SparseGPT(target: float = 0.5, **overrides: Any) -> PrunerLike:
    """SparseGPT: layer-wise OBS with the fast column sweep, label-free, block by block."""
    return _preset("SparseGPT", target, overrides)


def OBC(target: float = 0.5, **overrides: Any) -> PrunerLike:
    """Optimal Brain Compression (ExactOBS): layer-wise OBS with the exact greedy solver, block by block."""
    return _preset("OBC", target, overrides)


def Wanda(target: float = 0.5, **overrides: Any) -> PrunerLike:
    """Wanda: ``|w_ij| ||x_j||`` within each output row (OBD with the layer-wise Hessian's diagonal)."""
    return _preset("Wanda", target, overrides)


def WoodFisher(target: float = 0.5, **overrides: Any) -> PrunerLike:
    """WoodFisher: OBS with block-diagonal empirical Fisher blocks, global allocation."""
    return _preset("WoodFisher", target, overrides)


def OBD(target: float = 0.5, **overrides: Any) -> PrunerLike:
    """Optimal Brain Damage: ``1/2 h w^2`` with the Fisher diagonal, global allocation."""
    return _preset("OBD", target, overrides)


def GMP(target: float = 0.9, **overrides: Any) -> PrunerLike:
    """Gradual magnitude pruning (Zhu & Gupta): the cubic schedule, every layer to the same sparsity."""
    return _preset("GMP", target, overrides)


PRESETS = {"SparseGPT": SparseGPT, "OBC": OBC, "Wanda": Wanda, "WoodFisher": WoodFisher, "OBD": OBD, "GMP": GMP}
for _name, _fn in PRESETS.items():  # each preset's signature: every option, with the preset's values as defaults
    _factory, _settings = _SETTINGS[_name]
    _params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=_settings.get(p.name, p.default))
        for p in [*options_of(_factory), *pruner_parameters()]
    ]
    forwarded(_fn, _params)
