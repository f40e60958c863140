"""A pruner's public face: what a preset returns, what ``prune()`` takes, and what a wrapper shows of it.

A :class:`~lightning_prune.engine.pruner.Pruner` holds the plan and the state. A framework adapter (the
Lightning callbacks, :class:`~lightning_prune.callbacks.base.PruningCallback`) wraps one
(``callback.pruner``) and shows its public state through :class:`PrunerFacade`: explicit properties, the
settings that may change between runs writable, nothing private. :class:`PrunerLike` is the contract both
satisfy, and :func:`~lightning_prune.engine.pruner.as_pruner` turns either into the pruner itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from lightning_prune.criteria.base import Criterion
from lightning_prune.engine.calibration import LossFn
from lightning_prune.engine.schedule import Schedule
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.patterns import Pattern

if TYPE_CHECKING:
    from lightning_prune.engine.pruner import Pruner


class PrunerLike(Protocol):
    """A :class:`~lightning_prune.engine.pruner.Pruner`, or a wrapper showing one (a pruning callback).

    What the presets return (the callback where Lightning is installed, else the core ``Pruner``) and
    what ``prune()``, ``masked_merge`` and a Trainer (the callback) accept. The attributes mean what the
    ``Pruner``'s do; ``num_batches``, ``eval_batches``, ``loss_fn`` and ``verbose`` may be set.
    """

    num_batches: int
    eval_batches: int
    loss_fn: LossFn | None
    verbose: int

    @property
    def criterion(self) -> Criterion: ...
    @property
    def target(self) -> float: ...
    @property
    def schedule(self) -> Schedule: ...
    @property
    def scope(self) -> str: ...
    @property
    def pattern(self) -> Pattern: ...
    @property
    def include(self) -> list[str] | None: ...
    @property
    def exclude(self) -> list[str] | None: ...
    @property
    def min_density(self) -> float: ...
    @property
    def window_length(self) -> int: ...
    @property
    def targets(self) -> list[PruneTarget]: ...
    @property
    def masks(self) -> Mapping[str, Tensor]: ...
    @property
    def sharded(self) -> bool: ...
    @property
    def history(self) -> tuple[Mapping[str, Any], ...]: ...
    @property
    def sparsity(self) -> float: ...
    def bind(self, model: nn.Module) -> None: ...
    def current_masks(self) -> Mapping[str, Tensor]: ...
    def full_masks(self) -> dict[str, Tensor]: ...
    def layer_table(self) -> str: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class PrunerFacade:
    """:class:`PrunerLike` for a wrapper whose :attr:`pruner` does the work: each name reads the pruner's.

    Only these names reach the pruner: its private state stays its own, and setting one of its other
    attributes through the wrapper is refused (it would otherwise shadow the pruner's with a copy).
    """

    pruner: Pruner

    def __setattr__(self, name: str, value: Any) -> None:
        pruner, shown = self.__dict__.get("pruner"), getattr(type(self), name, None)
        theirs = pruner is not None and name not in self.__dict__ and shown is None
        theirs = theirs and (name in vars(pruner) or hasattr(type(pruner), name))
        if theirs or (isinstance(shown, property) and shown.fset is None):
            raise AttributeError(
                f"{type(self).__name__}.{name} is read-only: it is its pruner's state, which changes only by the "
                f"pruner's own methods (the settings a run may change: {', '.join(SETTABLE)})"
            )
        super().__setattr__(name, value)

    # ---------------------------------------------------------------- settings a run may change
    @property
    def num_batches(self) -> int:
        """Batches before each round (or given to ``prune()``) whose curvature it uses."""
        return self.pruner.num_batches

    @num_batches.setter
    def num_batches(self, value: int) -> None:
        self.pruner.num_batches = value

    @property
    def eval_batches(self) -> int:
        """How many of the round's last batches measure the actual loss increase."""
        return self.pruner.eval_batches

    @eval_batches.setter
    def eval_batches(self, value: int) -> None:
        self.pruner.eval_batches = value

    @property
    def loss_fn(self) -> LossFn | None:
        """``loss_fn(model, batch) -> mean loss``, or ``None`` (``training_step``, the output's ``.loss``)."""
        return self.pruner.loss_fn

    @loss_fn.setter
    def loss_fn(self, value: LossFn | None) -> None:
        self.pruner.loss_fn = value

    @property
    def verbose(self) -> int:
        """0 silent, 1 a line per round and a table at the end, 2 a table per round."""
        return self.pruner.verbose

    @verbose.setter
    def verbose(self, value: int) -> None:
        self.pruner.verbose = value

    # ---------------------------------------------------------------- the plan (read-only)
    @property
    def criterion(self) -> Criterion:
        """How a round scores (and, for OBS, moves) weights."""
        return self.pruner.criterion

    @property
    def target(self) -> float:
        """The final fraction of the selected weights (or structures) that are zero."""
        return self.pruner.target

    @property
    def schedule(self) -> Schedule:
        """When rounds fire and the sparsity each reaches."""
        return self.pruner.schedule

    @property
    def scope(self) -> str:
        """``"global"``, ``"layer"`` or ``"row"``: what a round's scores are compared within (resolved on binding)."""
        return self.pruner.scope

    @property
    def pattern(self) -> Pattern:
        """What may be zero together (unstructured, N:M, channels), bound to the model once it is known."""
        return self.pruner.pattern

    @property
    def include(self) -> list[str] | None:
        """Glob patterns of the parameter names considered (``None``: every Linear/Conv weight)."""
        return self.pruner.include

    @property
    def exclude(self) -> list[str] | None:
        """Glob patterns of the parameter names left dense."""
        return self.pruner.exclude

    @property
    def min_density(self) -> float:
        """The floor per layer: each keeps ``max(1, ceil(min_density * numel))`` weights."""
        return self.pruner.min_density

    @property
    def window_length(self) -> int:
        """Batches a round keeps: the curvature window (magnitude: only the evaluation batches)."""
        return self.pruner.window_length

    # ---------------------------------------------------------------- the state (read-only)
    @property
    def targets(self) -> list[PruneTarget]:
        """The pruned parameters, once bound to a model."""
        return self.pruner.targets

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool mask (True = kept), copies on the CPU; this rank's rows under FSDP2."""
        return self.pruner.masks

    @property
    def sharded(self) -> bool:
        """Whether some targets are FSDP2-sharded (masks are then per-rank blocks)."""
        return self.pruner.sharded

    @property
    def history(self) -> tuple[Mapping[str, Any], ...]:
        """One read-only record per round (see :func:`lightning_prune.engine.round.run_round`)."""
        return self.pruner.history

    @property
    def sparsity(self) -> float:
        """The current fraction of the selected weights that are pruned."""
        return self.pruner.sparsity

    def bind(self, model: nn.Module) -> None:
        """Resolve the targets on ``model`` and restore masks (:meth:`Pruner.bind <lightning_prune.Pruner.bind>`)."""
        self.pruner.bind(model)

    def current_masks(self) -> Mapping[str, Tensor]:
        """The masks, on the parameters' devices (all kept before the first round), unpacked as they are read."""
        return self.pruner.current_masks()

    def full_masks(self) -> dict[str, Tensor]:
        """Whole-layer masks on the CPU, gathered when sharded (a collective: call it on every rank)."""
        return self.pruner.full_masks()

    def layer_table(self) -> str:
        """Per-layer kept/total/sparsity table of the current masks."""
        return self.pruner.layer_table()

    def state_dict(self) -> dict[str, Any]:
        """The pruner's checkpoint state (a wrapper adds its own beside it)."""
        return self.pruner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pruner.load_state_dict(state_dict)


SETTABLE = ("num_batches", "eval_batches", "loss_fn", "verbose")
