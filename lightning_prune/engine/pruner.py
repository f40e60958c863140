"""A pruner: the plan (criterion, targets, schedule, scope) and its state (masks, history), without Lightning.

The callbacks (:mod:`lightning_prune.callbacks`) *are* pruners with Lightning hooks added, and
:func:`lightning_prune.prune` takes the same objects, so a pruner can prune one-shot, then
fine-tune as a callback with its masks frozen. This class owns what both paths share, each part
written in its own module:

* which parameters (:meth:`bind`, :mod:`~lightning_prune.engine.binding`: resolves them on a model,
  checks the target is reachable, restores masks from a checkpoint or an earlier ``prune()``);
* when rounds fire (:attr:`schedule`, keyed by epoch or step, :meth:`due`);
* masks that only shrink (:mod:`~lightning_prune.engine.maskstate`), installed by :meth:`commit_`,
  the only place new masks land, and held as bits (one per target weight);
* checkpoint state (:meth:`state_dict`, :mod:`~lightning_prune.engine.checkpoint`: bit-packed masks
  with checksums, history, the last round's point), validated on load with errors that name the
  parameter.

Masks belong to the model they were computed on: see :mod:`~lightning_prune.engine.binding`.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.criteria.base import Criterion, RoundResult
from lightning_prune.engine.binding import ParamRef, Prior, bind_model, check_materialised, parameter_ref, resolve_scope
from lightning_prune.engine.calibration import LossFn
from lightning_prune.engine.checkpoint import STATE_VERSION, decode_state, encode_state, is_pruning_state
from lightning_prune.engine.maskstate import MaskState
from lightning_prune.engine.rounds import OnePass, strategy_for
from lightning_prune.engine.schedule import Schedule, check_fraction, check_options, forwarded, schedule_parameters
from lightning_prune.engine.selection import SCOPES
from lightning_prune.engine.summary import pruner_table
from lightning_prune.engine.targets import PruneTarget, selection_key
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.runtime.distributed import Collectives

__all__ = ["STATE_VERSION", "Pruner", "as_pruner", "is_pruning_state", "pruner_parameters"]


class Pruner:
    """The Lightning-free part of every pruning callback.

    Args:
        criterion: how a round scores (and, for OBS, moves) weights.
        target: final fraction of the selected weights that are exactly zero, in ``[0, 1)``.
        scope: ``"global"`` ranks all selected weights together; ``"layer"`` gives each layer the same sparsity;
            ``"row"`` each output row (Wanda's and SparseGPT's allocation). ``None`` (default): ``"global"``, except
            ``pattern="channels"`` on a model holding a Hugging Face ``PreTrainedModel``, where it is ``"layer"``:
            every block then loses the same number of heads and neurons (the criterion picks which), the only shrunk
            model a standard config describes (:meth:`lightning_prune.surgery.shrink.Shrunk.save_pretrained`). Decided
            when the pruner meets its model (:attr:`scope` is the resolved value from then on).
        pattern: ``"unstructured"`` (default) or ``"N:M"``: N of every M consecutive input weights of each row are zero
            (``"2:4"`` is what GPUs accelerate); every layer ends exactly N/M sparse, so ``target`` must be N/M, and
            gradual rounds never break the pattern (see :mod:`lightning_prune.patterns`). Every criterion supports it;
            layer-wise OBS chooses each group's zeros inside its column sweep, from the compensated weights.
            ``"channels"``: whole neurons, Conv channels and attention heads with the layers they couple
            (:mod:`lightning_prune.models.graph`); ``target`` is then the fraction of structures removed and
            ``min_density`` keeps at least one of every family; ``lightning_prune.shrink`` turns the result
            into a smaller dense model.
        include: glob patterns of parameter names to consider (default: all Linear/Conv weights).
        exclude: glob patterns of parameter names to leave dense.
        parameters: explicit parameters to prune (replaces the Linear/Conv default).
        min_density: floor per layer; each keeps ``max(1, ceil(min_density * numel))`` weights.
        num_batches: batches before each round (or given to ``prune()``) whose curvature it uses (magnitude uses none,
            and keeps only ``min(num_batches, eval_batches)`` for the loss).
        eval_batches: how many of the round's last batches measure the actual loss increase (at most ``num_batches``; 0
            disables the measurement).
        blocks: ``None`` (default: a round's statistics for every layer at once, from the training steps before it or
            one pass over its batches), ``"auto"`` or a glob over module names (``"model.layers.*"``): sequential
            calibration (:mod:`lightning_prune.engine.rounds`), SparseGPT's loop: one block at a time calibrated on the
            *pruned* outputs of the blocks before it, then pruned. ``"auto"`` takes the ``nn.ModuleList`` of identical
            blocks holding the most targets (none, as in an MLP or a CNN: one pass over the whole model, which the
            round's ``info["plan"]`` says). Needs a label-free criterion (reconstruction OBS, OBD
            ``curvature="activations"``) and ``scope="layer"`` or ``"row"``.
        loss_fn: ``loss_fn(model, batch) -> mean loss``; default: ``training_step`` of a LightningModule, or the
            output's ``.loss`` in ``prune()`` (see :mod:`lightning_prune.engine.calibration`).
        verbose: 0 silent, 1 a line per round and a per-layer table at the end, 2 a table per round.
        **schedule: when rounds fire and how sparse each leaves the model: ``schedule`` (``"cubic"``, ``"linear"``,
            ``"one_shot"`` or a callable ``point -> sparsity``), epoch triggers ``start_epoch``, ``end_epoch``,
            ``every_n_epochs`` or step triggers ``start_step``, ``end_step``, ``every_n_steps`` (optimizer steps). They
            are :class:`~lightning_prune.engine.schedule.Schedule`'s arguments, defined there only.
    """

    def __init__(
        self,
        criterion: Criterion,
        target: float,
        *,
        scope: str | None = None,
        pattern: str | Pattern = "unstructured",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        parameters: Sequence[nn.Parameter] | None = None,
        min_density: float = 0.001,
        num_batches: int = 32,
        eval_batches: int = 8,
        blocks: str | None = None,
        loss_fn: LossFn | None = None,
        verbose: int = 1,
        **schedule: Any,
    ) -> None:
        self.label = type(self).__name__  # what messages call it (a callback wrapping it gives its own name)
        self.criterion = criterion
        check_options(self.label, schedule, schedule_parameters())
        self._schedule = Schedule(target, **schedule)
        _check_arguments(scope, num_batches, eval_batches, loss_fn, verbose)
        self._scope_arg = scope
        self.include, self.exclude = include, exclude
        self._parameters = list(parameters) if parameters is not None else None
        self.min_density = check_fraction("min_density", min_density, upper_inclusive=True)
        self.pattern = parse_pattern(pattern)
        self.scope = "global" if scope is None else scope  # until bind() resolves scope=None for its model
        self._scope_checked: str | None = None  # the scope the criterion accepted
        self.pattern.check_target(self._schedule.target)
        self.pattern.check_min_density(self.min_density)
        self.round_strategy = strategy_for(blocks)
        self.pattern.check_scope(self.scope)
        if not (scope is None and self.pattern.removes_structures):  # else the model decides the scope
            self._check_scope(self.scope)
        self.num_batches, self.eval_batches = num_batches, eval_batches
        self.loss_fn, self.verbose = loss_fn, verbose

        self._state: MaskState | None = None  # the targets on the model bound last, and their masks
        self._history: list[Mapping[str, Any]] = []  # RoundRecords (plain dicts where a checkpoint restored them)
        self._last_point: int | None = None  # the schedule point of the last round (epoch or step)
        self._loaded: dict[str, Any] | None = None  # checkpoint state waiting for bind()
        self._parameter_names: list[str] | None = None  # names of explicit `parameters` once a model is known
        self._bound: list[ParamRef] = []  # the parameters the masks were computed on
        self._model: weakref.ref | None = None  # the model bound last (load_state_dict binds to it again)
        self._skipped: list[tuple[str, str]] = []  # defaults left out (frozen, tied), with the reason

    # ================================================================ public read-only state
    @property
    def target(self) -> float:
        return self._schedule.target

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def scope_argument(self) -> str | None:
        """The ``scope`` this pruner was built with (``None``: chosen when it meets a model, see :attr:`scope`)."""
        return self._scope_arg

    @property
    def explicit_parameters(self) -> list[nn.Parameter] | None:
        """The ``parameters`` this pruner was built with (``None``: its selection is include/exclude)."""
        return self._parameters

    @property
    def is_bound(self) -> bool:
        """Whether :meth:`bind` has resolved this pruner's targets on a model."""
        return self._state is not None

    @property
    def targets(self) -> list[PruneTarget]:
        return list(self._bound_state().targets)

    @property
    def bound_parameters(self) -> Mapping[str, Tensor]:
        """Parameter name -> the parameter the masks are bound to (read-only; empty before binding)."""
        return MappingProxyType(self._state.params if self._state is not None else {})

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool mask (True = kept), as copies on CPU. Empty before binding. Under FSDP2 each
        rank holds the masks of its shard (the rows of ``param.to_local()``); :meth:`full_masks` gathers them."""
        if self._state is None:
            return MappingProxyType({})
        return MappingProxyType({n: m.detach().to("cpu", copy=True) for n, m in self._state.current().items()})

    def full_masks(self) -> dict[str, Tensor]:
        """Whole-layer masks on CPU, gathered one layer at a time when sharded (a collective: every rank calls it)."""
        return self._state.full() if self._state is not None else {}

    @property
    def sharded(self) -> bool:
        """Whether some targets are FSDP2-sharded (masks are then per-rank blocks)."""
        return self._state is not None and self._state.sharded

    @property
    def history(self) -> tuple[Mapping[str, Any], ...]:
        """One record per round, read-only (:class:`~lightning_prune.engine.record.RoundRecord`; those a
        checkpoint restored are mappings with the same keys)."""
        return tuple(MappingProxyType(r) if isinstance(r, dict) else r for r in self._history)

    @property
    def last_point(self) -> int | None:
        """The schedule point (epoch or step) of the last round, ``None`` before any."""
        return self._last_point

    @property
    def sparsity(self) -> float:
        """Current fraction of the selected weights that are pruned."""
        return self._state.sparsity() if self._state is not None else 0.0

    @property
    def window_length(self) -> int:
        """Batches a round keeps: the curvature window (magnitude: only the evaluation batches)."""
        return self.criterion.window_length(self.num_batches, self.eval_batches)

    @property
    def selection(self) -> dict[str, Any]:
        """What this pruner selects, for its checkpoint key (explicit parameters by name once bound)."""
        return selection_key(self.include, self.exclude, self._parameters, self._parameter_names)

    # the names other modules used before the public ones above (kept working meanwhile)
    _targets = property(lambda self: self._state.targets if self._state is not None else None)
    _params = property(lambda self: self._state.params if self._state is not None else {})
    _masks = property(lambda self: self._state.masks if self._state is not None else None)

    # ================================================================ the plan
    def _check_scope(self, scope: str) -> None:
        if scope != self._scope_checked:
            _check_plan(self.criterion, self.round_strategy, self.pattern, scope)
            self._scope_checked = scope

    def replan(self, *, criterion: Criterion, round_strategy: OnePass, scope: str) -> None:
        """Run the next rounds with another criterion, round strategy and scope (``prune()``'s one-shot plan,
        :mod:`lightning_prune.engine.oneshot`), checked as the constructor checks its arguments."""
        self.pattern.check_scope(scope)
        _check_plan(criterion, round_strategy, self.pattern, scope)
        self.criterion, self.round_strategy = criterion, round_strategy
        self._scope_arg = self.scope = self._scope_checked = scope

    def name_parameters(self, model: nn.Module) -> None:
        """Name explicit ``parameters`` as ``model`` does (:attr:`selection`, the checkpoint key, needs them
        before :meth:`bind`)."""
        if self._parameters is not None:
            by_id = {id(p): n for n, p in model.named_parameters()}
            self._parameter_names = [by_id.get(id(p), str(tuple(p.shape))) for p in self._parameters]

    _name_parameters = name_parameters  # the name callbacks used before (kept working meanwhile)

    def layer_table(self) -> str:
        """Per-layer kept/total/sparsity table of the current masks, with what was left alone and why."""
        return pruner_table(self.targets, self.kept_counts(), self.pattern, self._skipped)

    # ================================================================ binding to a model
    def bind(self, model: nn.Module) -> None:
        """Resolve the targets on ``model``; restore masks (checkpoint, earlier round) and freeze them.

        Masks are bound to parameters, not names. Masks computed on these very parameters (``prune()`` then
        ``fit``, a second ``fit``) follow them into any wrapper: a LightningModule around the model,
        ``torch.compile``'s ``_orig_mod``, PEFT's ``base_layer`` (frozen there, and still masked). Checkpointed
        masks find their parameters by name, or by a unique name suffix (:mod:`lightning_prune.engine.binding`).
        Raises before any work if the model has weights on the meta device, nothing matches, a checkpoint names
        other parameters than this pruner selects, the criterion cannot handle a target, or the target sparsity
        is unreachable under the per-layer floor.
        """
        check_materialised(model, self.label)
        scope = resolve_scope(self._scope_arg, self.pattern, model)
        self._check_scope(scope)
        prior = Prior(self._loaded, self._bound, self._masks, len(self._history), self._skipped)
        bound = bind_model(model, self, prior, scope)
        if bound.dropped:
            self._history, self._last_point = [], None
        self._loaded, self._model, self._skipped = None, weakref.ref(model), bound.skipped
        self.name_parameters(model)
        self.scope, self.pattern = scope, bound.pattern
        self._bound = [parameter_ref(t) for t in bound.targets]
        self._state = MaskState(bound.targets, bound.masks)

    def _bound_state(self) -> MaskState:
        if self._state is None:
            raise RuntimeError(f"{self.label} is not bound to a model yet (fit or prune() binds it)")
        return self._state

    # ================================================================ masks and rounds
    def current_masks(self) -> Mapping[str, Tensor]:
        """The masks (this rank's blocks, on the parameters' devices), all-True before the first round; held as
        bits, each unpacked as it is read (:class:`~lightning_prune.engine.masks.PackedMasks`)."""
        return self._bound_state().current()

    def units(self) -> dict[str, tuple[int, int]]:
        """``(pruned, total)`` per layer of what ``target`` is a fraction of: weights, or structures
        under ``pattern="channels"``; whole layers when sharded."""
        return self._bound_state().units(self.pattern)

    def kept_counts(self) -> dict[str, int]:
        """Kept entries per layer, whole layers (counted when the masks change: every rank agrees)."""
        return self._bound_state().kept_counts()

    def removes_something(self, sparsity: float) -> bool:
        """Whether a round to ``sparsity`` would prune any weight the masks still keep."""
        return self._bound_state().removes_something(sparsity, self.pattern, self.scope)

    def due(self, now: int) -> int | None:
        """The schedule point whose round should run now (``now``: epoch or global step), or ``None``. Rounds
        that would remove nothing (the masks already reach their sparsity, e.g. after a one-shot ``prune()``)
        are marked done and skipped."""
        point = self._schedule.due(now, self._last_point)
        if point is not None and not self.removes_something(self._schedule.sparsity_at(point)):
            self._last_point, point = point, None
        return point

    def next_round(self) -> int | None:
        """The next schedule point that will remove something (where a capture window is needed)."""
        return self._schedule.next_point(self._last_point, removes=self.removes_something)

    def commit_(
        self,
        result: RoundResult,
        before: Mapping[str, Tensor],
        comm: Collectives,
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> None:
        """Install new masks (which may only shrink), zero what they prune, and sync all ranks."""
        self._bound_state().commit_(result, before, comm, optimizers, reset_moved=self.criterion.reset_moved_state)

    def freeze_grads_(self) -> None:
        """Zero the gradients of pruned weights (before an optimizer step)."""
        if self._state is not None:
            self._state.freeze_grads_()

    def freeze_weights_(self) -> None:
        """Re-zero pruned weights (after an optimizer step)."""
        if self._state is not None:
            self._state.freeze_weights_()

    def record_round(self, record: Mapping[str, Any], point: int | None) -> None:
        """Append a round's record to :attr:`history`; ``point``: the schedule point it fulfilled (done now)."""
        self._history.append(record)
        if point is not None:
            self._last_point = point

    # ================================================================ checkpointing (engine/checkpoint.py)
    def state_dict(self) -> dict[str, Any]:
        targets = self._state.targets if self._state is not None else []
        return encode_state(self.label, self._masks, targets, self._history, self._schedule.unit, self._last_point)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = decode_state(state_dict, self.label, self._schedule.unit)
        self._history, self._last_point, self._loaded = list(saved.history), saved.last_point, saved.masks
        model = self._model() if self._model is not None else None
        if model is not None:  # already bound: bind again, to the same model, with these masks
            self.bind(model)


def _check_arguments(scope: str | None, num_batches: int, eval_batches: int, loss_fn: Any, verbose: int) -> None:
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES} or None (chosen per model), got {scope!r}")
    for name, value, minimum in (("num_batches", num_batches, 1), ("eval_batches", eval_batches, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    if verbose not in (0, 1, 2):
        raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable (model, batch) -> loss, got {loss_fn!r}")


def _check_plan(criterion: Criterion, strategy: OnePass, pattern: Pattern, scope: str) -> None:
    """Refuse a scope the criterion, the pattern or the round strategy cannot run."""
    criterion.check_scope(scope)
    criterion.check_pattern(pattern, scope)
    strategy.check(criterion, pattern, scope)


forwarded(Pruner.__init__, schedule_parameters())


def as_pruner(obj: Any) -> Pruner | None:
    """The :class:`Pruner` that ``obj`` is, or that a pruning callback wraps (its ``pruner``); else ``None``."""
    inner = getattr(obj, "pruner", None) if not isinstance(obj, Pruner) else obj
    return inner if isinstance(inner, Pruner) else None


def pruner_parameters() -> list[inspect.Parameter]:
    """:class:`Pruner`'s arguments after ``criterion`` and ``target`` (its schedule's included),
    keyword-only: what callbacks and presets accept and forward to it."""
    params = list(inspect.signature(Pruner.__init__, eval_str=True).parameters.values())
    params = params[3:]  # not self, criterion, target
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
