"""Named algorithms: one-line factories with each paper's settings, returning the ordinary pruner.

``SparseGPT(target=0.5)`` is ``OBSPruning(target=0.5, allocation="reconstruction", scope="layer",
blocks="auto", solver="fast", reconstruct="current", solver_dtype="float32")``: the same object the
flags build, usable in ``prune()`` and as a Trainer callback, with every option overridable
(``SparseGPT(target=0.5, pattern="2:4")``, ``GMP(0.9, every_n_steps=100)``). Where Lightning is not
installed a preset returns the Lightning-free :class:`~lightning_prune.engine.pruner.Pruner` with the same
criterion and options, which ``prune()`` takes alike.

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

from lightning_prune.engine.pruner import Pruner, pruner_parameters
from lightning_prune.engine.schedule import forwarded

SEQUENTIAL = {"allocation": "reconstruction", "scope": "layer", "blocks": "auto", "reconstruct": "current"}


def _callback_class(name: str) -> type | None:
    from lightning_prune import callbacks

    try:
        return getattr(callbacks, name)
    except ImportError:  # Lightning is not installed: the core pruner does the same in prune()
        return None


def _criterion(name: str) -> Any:
    from lightning_prune import criteria

    return getattr(criteria, {"OBSPruning": "OBS", "OBDPruning": "OBD", "MagnitudePruning": "Magnitude"}[name])


# each preset: the callback it builds and the settings it gives it (defined here only)
_SETTINGS: dict[str, tuple[str, dict[str, Any]]] = {
    "SparseGPT": ("OBSPruning", {**SEQUENTIAL, "solver": "fast", "solver_dtype": "float32"}),
    "OBC": ("OBSPruning", {**SEQUENTIAL, "solver": "exact"}),
    "Wanda": ("OBDPruning", {"curvature": "activations", "scope": "row"}),
    "WoodFisher": ("OBSPruning", {"hessian": "fisher", "fisher_type": "empirical"}),
    "OBD": ("OBDPruning", {"curvature": "fisher"}),
    "GMP": ("MagnitudePruning", {"schedule": "cubic", "scope": "layer"}),
}


def _preset(name: str, target: float, overrides: dict[str, Any]) -> Any:
    """The preset's callback with its settings and ``overrides``, or the same core :class:`Pruner`
    without Lightning."""
    callback, settings = _SETTINGS[name]
    if settings.get("scope") == "row" and "scope" not in overrides and _removes_structures(overrides.get("pattern")):
        # Wanda-sp / FLAP: whole structures are compared within their layer (the pattern's own default
        # scope), not within one output row, which a structure spans
        settings = {k: v for k, v in settings.items() if k != "scope"}
    options = {**settings, **overrides}
    cls = _callback_class(callback)
    if cls is not None:
        return cls(target, **options)
    criterion = _criterion(callback)
    own = set(inspect.signature(criterion).parameters)
    return Pruner(
        criterion(**{k: v for k, v in options.items() if k in own}),
        target,
        **{k: v for k, v in options.items() if k not in own},
    )


def _removes_structures(pattern: Any) -> bool:
    if pattern is None:
        return False
    from lightning_prune.patterns import parse_pattern

    try:
        return bool(parse_pattern(pattern).removes_structures)
    except (TypeError, ValueError):  # the pruner names the bad pattern
        return False


def SparseGPT(target: float = 0.5, **overrides: Any) -> Any:
    """SparseGPT: layer-wise OBS with the fast column sweep, label-free, block by block."""
    return _preset("SparseGPT", target, overrides)


def OBC(target: float = 0.5, **overrides: Any) -> Any:
    """Optimal Brain Compression (ExactOBS): layer-wise OBS with the exact greedy solver, block by block."""
    return _preset("OBC", target, overrides)


def Wanda(target: float = 0.5, **overrides: Any) -> Any:
    """Wanda: ``|w_ij| ||x_j||`` within each output row (OBD with the layer-wise Hessian's diagonal)."""
    return _preset("Wanda", target, overrides)


def WoodFisher(target: float = 0.5, **overrides: Any) -> Any:
    """WoodFisher: OBS with block-diagonal empirical Fisher blocks, global allocation."""
    return _preset("WoodFisher", target, overrides)


def OBD(target: float = 0.5, **overrides: Any) -> Any:
    """Optimal Brain Damage: ``1/2 h w^2`` with the Fisher diagonal, global allocation."""
    return _preset("OBD", target, overrides)


def GMP(target: float = 0.9, **overrides: Any) -> Any:
    """Gradual magnitude pruning (Zhu & Gupta): the cubic schedule, every layer to the same sparsity."""
    return _preset("GMP", target, overrides)


PRESETS = {"SparseGPT": SparseGPT, "OBC": OBC, "Wanda": Wanda, "WoodFisher": WoodFisher, "OBD": OBD, "GMP": GMP}
for _name, _fn in PRESETS.items():  # each preset's signature: every option, with the preset's values as defaults
    _callback, _settings = _SETTINGS[_name]
    _own = list(inspect.signature(_criterion(_callback), eval_str=True).parameters.values())
    _params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=_settings.get(p.name, p.default))
        for p in [*_own, *pruner_parameters()]
    ]
    forwarded(_fn, _params)
