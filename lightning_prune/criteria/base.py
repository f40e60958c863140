"""What a criterion is: how a round scores weights (and, for OBS, moves the survivors).

A criterion knows nothing of Lightning, schedules or masks on disk. The round
(:func:`lightning_prune.engine.round.run_round`) hands it a :class:`RoundContext` (the targets, their
current masks, the sparsity to reach, the round's batches and statistics) and installs the
:class:`RoundResult` it returns. Statistics come from :meth:`Criterion.make_estimator`: fed by
training steps inside ``Trainer.fit`` (the capture window), or by one calibration pass in
``prune()``; the same criterion code runs on them either way.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.calibration import Calibration, RoundInterrupted
from lightning_prune.engine.selection import Shards
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.patterns import UNSTRUCTURED, Pattern
from lightning_prune.runtime import sharding
from lightning_prune.runtime.distributed import Collectives, warn
from lightning_prune.stats.estimators import Estimator


@dataclass
class RoundContext:
    """Everything a criterion may look at during one round."""

    model: nn.Module
    targets: list[PruneTarget]
    masks: Mapping[str, Tensor]  # current masks (True = kept), each unpacked as it is read
    sparsity: float  # cumulative sparsity this round must reach
    batches: list[Any]  # the round's batches (on the model's device), oldest first
    stats: Estimator | None  # the criterion's statistics, reduced across ranks
    calib: Calibration  # losses and forward passes on the batches
    comm: Collectives
    round_index: int
    scope: str = "global"
    min_density: float = 0.0
    source: str = "the round's batches"  # where the statistics came from, for error messages
    solver_budget: float | None = None  # OBS solver="auto": element updates for the round; None: per layer
    pattern: Pattern = UNSTRUCTURED
    # the targets' weights (this rank's blocks) when the round started, for criteria that move weights:
    # OBS reconstructs the outputs they gave (reconstruct='original')
    reference: Mapping[str, Tensor] | None = None
    should_stop: Callable[[], bool] | None = None  # the run was asked to stop (SIGTERM): see check_interrupt
    block: str | None = None  # a sequential round's block being pruned (its targets only, its inputs' statistics)
    device: torch.device | None = None  # prune(device=): where each block is moved to be pruned (the model stays)
    status: Callable[[str], None] | None = None  # what the round is doing now, for a progress bar (report)

    def report(self, what: str) -> None:
        """Say what the round does next (a layer's solve can take minutes on a large model)."""
        if self.status is not None:
            self.status(what)

    def check_interrupt(self, where: str = "") -> None:
        """Stop the round here (between layers) if the run was asked to stop; every rank agrees first,
        so no rank is left waiting in a collective. Raises :class:`RoundInterrupted`; ``run_round``
        restores the weights the round moved."""
        if self.should_stop is None:
            return
        flag = float(bool(self.should_stop()))
        if self.comm.world_size > 1:
            t = torch.tensor([flag], dtype=torch.float64, device=self.targets[0].param.device)
            self.comm.all_reduce_sum_([t])
            flag = float(t)
        if flag:
            raise RoundInterrupted(
                f"round {self.round_index} stopped{' ' + where if where else ''}: the run was asked to stop"
            )

    @property
    def sharded(self) -> bool:
        """Whether some targets are sharded across ranks (FSDP2): masks and scores are then this rank's blocks."""
        return self.comm.world_size > 1 and any(t.sharded for t in self.targets)

    def shards(self) -> Shards | None:
        if not self.sharded:
            return None
        return Shards(
            self.comm,
            {t.name: sharding.chunk(t.param) for t in self.targets},
            {t.name: t.sharded or self.comm.rank == 0 for t in self.targets},
        )

    def global_sum(self, per_layer: Mapping[str, float]) -> float:
        """Sum of per-layer values computed on this rank's blocks (e.g. removed scores), over all ranks
        when sharded (a layer every rank holds whole counts once)."""
        shards = self.shards()
        if shards is None:
            return float(sum(per_layer.values()))
        value = sum(v for n, v in per_layer.items() if shards.owned[n])
        t = torch.tensor([value], dtype=torch.float64, device=self.targets[0].param.device)
        self.comm.all_reduce_sum_([t])
        return float(t)

    def select(self, scores: Mapping[str, Tensor], layers: Sequence[PruneTarget] | None = None) -> dict[str, Tensor]:
        """Masks from scores under the pruner's scope, floor and pattern (NaN scores are kept, with a warning).

        ``scores`` are laid out like the masks: this rank's blocks when sharded. ``layers``: the targets
        scored (default: all), a subset only where the scope allocates within each layer."""
        layers = self.targets if layers is None else layers
        nan = sum(int(s.isnan().sum()) for s in scores.values())
        if nan:
            warn(f"{nan} NaN pruning scores in round {self.round_index}: those weights are kept")
        if len(layers) < len(self.targets) and self.scope not in ("layer", "row"):
            raise ValueError(f"selecting {len(layers)} of {len(self.targets)} layers needs scope 'layer' or 'row'")
        return self.pattern.select(
            scores,
            {t.name: self.masks[t.name] for t in layers},
            self.sparsity,
            scope=self.scope,
            min_density=self.min_density,
            shards=self.shards(),
            layers=layers,
        )


@dataclass
class RoundResult:
    masks: Mapping[str, Tensor]
    predicted_loss_increase: float = math.nan
    updated: set[str] = field(default_factory=set)  # layers whose kept weights the criterion changed
    info: dict[str, Any] = field(default_factory=dict)


class Criterion:
    """Base of :class:`~lightning_prune.criteria.Magnitude`, :class:`~lightning_prune.criteria.OBD`
    and :class:`~lightning_prune.criteria.OBS`."""

    name = "criterion"
    moves_weights = False  # whether the criterion updates kept weights (OBS compensation)
    fisher_type = "empirical"  # empirical statistics are captured during training steps; others at round time
    mc_samples = 1
    reset_moved_state = False  # whether weights the criterion moved lose their optimizer moments
    loss_reduction = "mean"  # how the loss reduces over a batch (hook gradients are rescaled by it)
    # capabilities the adapters ask for, instead of asking a criterion who it is:
    uses_hooks = True  # captures layer statistics with module hooks (which torch.compile'd code skips)
    differentiates_twice = False  # Hessian-vector products: a double backward (which torch.compile'd code refuses)
    label_free_options: str | None = None  # the options that make it need no loss, named where a loss is missing

    def check_scope(self, scope: str) -> None:
        """Refuse a scope the criterion cannot rank under (called at construction)."""

    def window_length(self, num_batches: int, eval_batches: int) -> int:
        """How many batches a round keeps (curvature and evaluation)."""
        return num_batches

    def check_window(self, num_batches: int) -> None:
        """Refuse a capture window too short for the statistics (called when a pruning callback is built)."""

    def check_pattern(self, pattern: Pattern, scope: str) -> None:
        """Refuse a pattern the criterion cannot prune under (called when the pruner is built)."""

    def check_targets(self, targets: Sequence[PruneTarget]) -> None:
        """Refuse targets the criterion cannot handle (called when the pruner binds to a model)."""

    def check_model(self, model: nn.Module, targets: Sequence[PruneTarget]) -> None:
        """Refuse a model the criterion cannot run on (called when the pruner binds, after ``check_targets``)."""

    def check_sharded(self, targets: Sequence[PruneTarget]) -> None:
        """Refuse what the criterion cannot do on FSDP2-sharded targets (called when the pruner binds)."""

    def make_estimator(
        self, targets: Sequence[PruneTarget], comm: Collectives, num_batches: int, *, reference: bool = False
    ) -> Estimator | None:
        """Hook-fed statistics for a round over ``num_batches`` batches, or ``None`` if it needs none.
        ``reference``: fed pairs of original and current inputs (a sequential round, where
        :attr:`fits_reference`)."""
        return None

    @property
    def fits_reference(self) -> bool:
        """Whether the criterion fits layers to the outputs they gave when the round started (then a
        sequential round carries the original block outputs beside the pruned ones)."""
        return False

    def label_free_by_default(self) -> bool:
        """Whether every option that makes this criterion need gradients was left to be chosen (``None``), so
        that ``prune()`` may run it label-free, block by block (then :meth:`make_label_free` is called)."""
        return False

    def make_label_free(self) -> str:
        """Switch to the label-free form; returns its options, for the record."""
        raise NotImplementedError(f"{self.describe()} has no label-free form")

    def describe(self) -> str:
        """The criterion and its defining options, for error messages."""
        options = ("hessian", "allocation", "curvature")
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in options if getattr(self, k, "") != "")
        return f"{type(self).__name__}({shown})"

    @property
    def captures_in_window(self) -> bool:
        """Whether the statistics come from hooks on the training steps before the round (else from a
        pass over the stored batches at round time)."""
        return self.fisher_type == "empirical"

    def collect(
        self,
        calib: Calibration,
        batches: list[Any],
        estimator: Estimator,
        targets: Sequence[PruneTarget],
        round_index: int,
    ) -> Estimator:
        """Statistics from a pass over stored batches (``prune()``, recomputation, non-empirical Fisher)."""
        from lightning_prune.stats.passes import collect

        return collect(
            calib,
            batches,
            estimator,
            targets,
            fisher_type=self.fisher_type,
            mc_samples=self.mc_samples,
            reduction=self.loss_reduction,
            round_index=round_index,
            desc=f"{self.name} statistics",
        )

    @property
    def needs_gradients(self) -> bool:
        """Whether the statistics need a loss to differentiate (``prune()`` refuses without one)."""
        return False

    def recalibrates(self, targets: Sequence[PruneTarget]) -> bool:
        """Whether a round runs extra passes over its batches that need a loss (checked at fit start
        under manual optimization, where ``training_step`` cannot be borrowed)."""
        return False

    def prune(self, ctx: RoundContext) -> RoundResult:
        """Choose the new masks (and optionally update kept weights)."""
        raise NotImplementedError


def require_stats(ctx: RoundContext, estimator: Estimator | None, who: str) -> Estimator:
    """The round's estimator, or a clear error if no batch reached it."""
    unseen = (
        [t.name for t in ctx.targets]
        if estimator is None
        else [t.name for t in ctx.targets if not estimator.seen(t.name)]
    )
    if unseen:
        what = (
            "no batch was accumulated"
            if estimator is None or len(unseen) == len(ctx.targets)
            else f"layers {unseen[:5]} received no data"
        )
        raise RuntimeError(
            f"{who} round {ctx.round_index}: {what} in {ctx.source}. Check that the layers are used in the "
            "forward pass (training_step or loss_fn) and that there are batches."
        )
    return estimator  # type: ignore[return-value]


CriterionFactory = Callable[..., Criterion]  # a criterion class, or a function building one (OBS)


def options_of(factory: CriterionFactory) -> list[inspect.Parameter]:
    """A criterion's options as its factory declares them (types, defaults, order), positional-or-keyword:
    what its typed callback and the presets put in their signatures, so they are written once."""
    params = inspect.signature(factory, eval_str=True).parameters.values()
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in params if p.kind in named]


def split_options(factory: CriterionFactory, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into the criterion's (:func:`options_of`) and the rest (the pruner's)."""
    own = {p.name for p in options_of(factory)}
    return {k: v for k, v in options.items() if k in own}, {k: v for k, v in options.items() if k not in own}


def options_doc(factory: CriterionFactory) -> str:
    """The ``Args:`` section of the factory's docstring, where its options are documented once (``""``
    without one)."""
    lines = inspect.cleandoc(factory.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return ""
    end = next((i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace()), len(lines))
    return "\n".join(lines[start:end]).rstrip()
