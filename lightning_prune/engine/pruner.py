"""A pruner: the plan (criterion, targets, schedule, scope) and its state (masks, history), without Lightning.

The callbacks (:mod:`lightning_prune.callbacks`) *are* pruners with Lightning hooks added, and
:func:`lightning_prune.prune` takes the same objects, so a pruner can prune one-shot, then
fine-tune as a callback with its masks frozen. This class owns what both paths share:

* which parameters (:meth:`bind` resolves them on a model, checks the target is reachable, and
  restores masks from a checkpoint or an earlier ``prune()``);
* when rounds fire (:attr:`schedule`, keyed by epoch or step, :meth:`due`);
* masks that only shrink, installed by :meth:`commit_`, the only place new masks land;
* checkpoint state (:meth:`state_dict`: bit-packed masks with checksums, history, the last
  round's point), validated on load with errors that name the parameter.

Masks belong to the model they were computed on. Binding to the *same* parameters again (a second
``fit`` of the same model, or ``prune()`` then ``fit``) keeps them frozen; binding to another model
(a new instance, even of the same architecture) starts fresh, with a warning. Masks restored from a
checkpoint (``load_state_dict``, ``fit(ckpt_path=...)``) apply to whatever model is bound next.
"""

from __future__ import annotations

import inspect
import weakref
import zlib
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.criteria.base import Criterion, RoundResult
from lightning_prune.engine import masks as M
from lightning_prune.engine.calibration import LossFn
from lightning_prune.engine.rounds import strategy_for
from lightning_prune.engine.schedule import Schedule, check_fraction, check_options, forwarded, schedule_parameters
from lightning_prune.engine.selection import SCOPES
from lightning_prune.engine.summary import layer_table
from lightning_prune.engine.targets import PruneTarget, match_names, resolve_targets, targets_of
from lightning_prune.models import hf_config as hf
from lightning_prune.patterns import Pattern, parse_pattern
from lightning_prune.runtime import sharding
from lightning_prune.runtime.distributed import Collectives, default_collectives, warn

STATE_VERSION = 2


class Pruner:
    """The Lightning-free part of every pruning callback.

    Args:
        criterion: how a round scores (and, for OBS, moves) weights.
        target: final fraction of the selected weights that are exactly zero, in ``[0, 1)``.
        scope: ``"global"`` ranks all selected weights together; ``"layer"`` gives each layer
            the same sparsity; ``"row"`` each output row (Wanda's and SparseGPT's allocation).
            ``None`` (default): ``"global"``, except ``pattern="channels"`` on a model holding a
            Hugging Face ``PreTrainedModel``, where it is ``"layer"``: every block then loses the same
            number of heads and neurons (the criterion picks which), the only shrunk model a standard
            config describes (:meth:`lightning_prune.surgery.shrink.Shrunk.save_pretrained`). Decided when the
            pruner meets its model (:attr:`scope` is the resolved value from then on).
        pattern: ``"unstructured"`` (default) or ``"N:M"``: N of every M consecutive input weights of
            each row are zero (``"2:4"`` is what GPUs accelerate); every layer ends exactly N/M
            sparse, so ``target`` must be N/M, and gradual rounds never break the pattern (see
            :mod:`lightning_prune.patterns`). Every criterion supports it; layer-wise OBS chooses
            each group's zeros inside its column sweep, from the compensated weights.
            ``"channels"``: whole neurons, Conv channels and attention heads with the layers they
            couple (:mod:`lightning_prune.models.graph`); ``target`` is then the fraction of structures
            removed and ``min_density`` keeps at least one of every family;
            ``lightning_prune.surgery.shrink`` turns the result into a smaller dense model.
        include: glob patterns of parameter names to consider (default: all Linear/Conv weights).
        exclude: glob patterns of parameter names to leave dense.
        parameters: explicit parameters to prune (replaces the Linear/Conv default).
        min_density: floor per layer; each keeps ``max(1, ceil(min_density * numel))`` weights.
        num_batches: batches before each round (or given to ``prune()``) whose curvature it uses
            (magnitude uses none, and keeps only ``min(num_batches, eval_batches)`` for the loss).
        eval_batches: how many of the round's last batches measure the actual loss increase
            (at most ``num_batches``; 0 disables the measurement).
        blocks: ``None`` (default: a round's statistics for every layer at once, from the training
            steps before it or one pass over its batches), ``"auto"`` or a glob over module names
            (``"model.layers.*"``): sequential calibration (:class:`~lightning_prune.engine.rounds.BlockByBlock`),
            SparseGPT's loop for transformers: one block at a time is calibrated on the *pruned*
            outputs of the blocks before it, then pruned. ``"auto"`` takes the ``nn.ModuleList`` of
            identical blocks that holds the most targets. Needs a label-free criterion (layer-wise
            reconstruction OBS, OBD ``curvature="activations"``) and ``scope="layer"`` or ``"row"``.
        loss_fn: ``loss_fn(model, batch) -> mean loss``; default: ``training_step`` of a
            LightningModule, or the output's ``.loss`` in ``prune()`` (see
            :mod:`lightning_prune.engine.calibration`).
        verbose: 0 silent, 1 a line per round and a per-layer table at the end, 2 a table per round.
        **schedule: when rounds fire and how sparse each leaves the model: ``schedule``
            (``"cubic"``, ``"linear"``, ``"one_shot"`` or a callable ``point -> sparsity``), epoch
            triggers ``start_epoch``, ``end_epoch``, ``every_n_epochs`` or step triggers
            ``start_step``, ``end_step``, ``every_n_steps`` (optimizer steps). They are
            :class:`~lightning_prune.engine.schedule.Schedule`'s arguments, defined there only.
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
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES} or None (chosen per model), got {scope!r}")
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
        if not self._scope_per_model:
            self._check_scope(self.scope)
        for name, value, minimum in (("num_batches", num_batches, 1), ("eval_batches", eval_batches, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable (model, batch) -> loss, got {loss_fn!r}")
        self.num_batches, self.eval_batches = num_batches, eval_batches
        self.loss_fn, self.verbose = loss_fn, verbose

        self._targets: list[PruneTarget] | None = None
        self._params: dict[str, Tensor] = {}
        self._masks: dict[str, Tensor] | None = None  # None until the first round
        # multipliers of layers with at least one pruned weight, built at the first training step that needs
        # them (None: not built): on the CPU a bit mask as large as the weights, which prune() never needs
        self._frozen: dict[str, Tensor] | None = {}
        self._history: list[dict[str, Any]] = []
        self._last_point: int | None = None  # the schedule point of the last round (epoch or step)
        self._loaded: dict[str, Any] | None = None  # checkpoint state waiting for bind()
        self._parameter_names: list[str] | None = None  # names of explicit `parameters` once a model is known
        self._bound: list[weakref.ref] = []  # the parameters the masks were computed on
        self._model: weakref.ref | None = None  # the model bound last (load_state_dict binds to it again)
        self._skipped: list[tuple[str, str]] = []  # defaults left out (frozen, tied), with the reason
        self._kept: dict[str, int] | None = None  # kept entries per whole layer

    # ================================================================ public read-only state
    @property
    def target(self) -> float:
        return self._schedule.target

    @property
    def schedule(self) -> Schedule:
        return self._schedule

    @property
    def last_point(self) -> int | None:
        """The schedule point (epoch or step) of the last round run or passed over, ``None`` before any."""
        return self._last_point

    @property
    def targets(self) -> list[PruneTarget]:
        if self._targets is None:
            raise RuntimeError(f"{self.label} is not bound to a model yet (fit or prune() binds it)")
        return list(self._targets)

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool mask (True = kept), as copies on CPU. Empty before binding.

        Under FSDP2 each rank holds the masks of its shard (the rows of ``param.to_local()``);
        :meth:`full_masks` gathers whole ones."""
        if self._targets is None:
            return MappingProxyType({})
        current = self.current_masks()
        return MappingProxyType({n: m.detach().to("cpu", copy=True) for n, m in current.items()})

    def full_masks(self) -> dict[str, Tensor]:
        """Whole-layer masks on CPU, gathered one layer at a time when sharded (a collective: call it
        on every rank)."""
        current = self.current_masks() if self._targets is not None else {}
        return {t.name: t.gather(current[t.name]).to("cpu", copy=True) for t in self.targets} if current else {}

    @property
    def sharded(self) -> bool:
        """Whether some targets are FSDP2-sharded (masks are then per-rank blocks)."""
        return self._targets is not None and any(t.sharded for t in self._targets)

    @property
    def history(self) -> tuple[Mapping[str, Any], ...]:
        """One record per round (see :func:`lightning_prune.engine.round.run_round` for the fields)."""
        return tuple(MappingProxyType(r) for r in self._history)

    @property
    def sparsity(self) -> float:
        """Current fraction of the selected weights that are pruned."""
        if self._masks is None:
            return 0.0
        kept = self.kept_counts()
        total = sum(t.param.numel() for t in self.targets)
        return 1.0 - sum(kept.values()) / max(total, 1)

    @property
    def window_length(self) -> int:
        """Batches a round keeps: the curvature window (magnitude: only the evaluation batches)."""
        return self.criterion.window_length(self.num_batches, self.eval_batches)

    @property
    def selection(self) -> dict[str, Any]:
        """What this pruner selects, for its checkpoint key (explicit parameters by name once bound)."""
        out: dict[str, Any] = {}
        if self.include is not None:
            out["include"] = list(self.include)
        if self.exclude is not None:
            out["exclude"] = list(self.exclude)
        if self._parameters is not None:
            out["parameters"] = self._parameter_names or [tuple(p.shape) for p in self._parameters]
        return out

    @property
    def _scope_per_model(self) -> bool:
        """Whether the scope is decided by the model (scope=None under a structured pattern)."""
        return self._scope_arg is None and self.pattern.removes_structures

    def _check_scope(self, scope: str) -> None:
        if scope != self._scope_checked:
            self.criterion.check_scope(scope)
            self.criterion.check_pattern(self.pattern, scope)
            self.round_strategy.check(self.criterion, self.pattern, scope)
            self._scope_checked = scope

    def _resolve_scope(self, model: nn.Module) -> str:
        """``scope=None``: ``"layer"`` for structures of a Hugging Face model (the same count in every
        block, so a standard config describes the shrunk model), else ``"global"``."""
        if self._scope_arg is not None:
            return self._scope_arg
        return "layer" if self.pattern.removes_structures and hf.pretrained_models(model) else "global"

    def plan_one_shot(self, model: nn.Module) -> str | None:
        """``prune()``'s plan where the defaults leave it free: a criterion whose gradient-needing options were
        left at their defaults (``OBSPruning(target)``), ``scope`` and ``blocks`` left at ``None``, a pattern
        that is not structural, on a model of repeated blocks holding every target, runs block by block,
        label-free (:meth:`~lightning_prune.criteria.base.Criterion.make_label_free`, ``scope="layer"``,
        ``blocks="auto"``): memory for one block and no backward pass, where the whole-model round holds
        every layer's statistics and backpropagates through the model. Returns what was chosen (printed and
        recorded in the round's ``info["plan"]``), or ``None`` where nothing changed. Called after :meth:`bind`."""
        from lightning_prune.engine.rounds import BlockByBlock
        from lightning_prune.engine.sequential import find_blocks

        free = self._scope_arg is None and self.round_strategy.blocks is None and not self.pattern.removes_structures
        if not free or self._history or not self.criterion.label_free_by_default():
            return None
        if any(t.sharded for t in self.targets):
            return None
        try:
            blocks = find_blocks(model, "auto", self.targets)
        except ValueError:
            return None
        chosen = self.criterion.make_label_free()
        self.round_strategy = BlockByBlock("auto")
        self._scope_arg = self.scope = "layer"
        self.pattern.check_scope("layer")
        self._check_scope("layer")
        return (
            f"block by block over the {len(blocks)} blocks {blocks[0].name} ... {blocks[-1].name}, label-free "
            f"({chosen}, scope='layer'); prune() chose this for the defaults (no backward pass, "
            "memory for one block). For the whole-model round with gradients pass blocks=None and allocation='auto'"
        )

    def _name_parameters(self, model: nn.Module) -> None:
        if self._parameters is not None:
            by_id = {id(p): n for n, p in model.named_parameters()}
            self._parameter_names = [by_id.get(id(p), str(tuple(p.shape))) for p in self._parameters]

    def layer_table(self) -> str:
        """Per-layer kept/total/sparsity table of the current masks."""
        kept = self.kept_counts()
        rows = [(t.name, tuple(t.param.shape), kept[t.name], t.param.numel()) for t in self.targets]
        table = layer_table(rows)
        if notes := self.pattern.notes:
            table += f"\npattern='{self.pattern}' left alone: " + "; ".join(notes)
        if self._skipped:
            table += "\nnot pruned: " + "; ".join(f"{n} ({why})" for n, why in self._skipped)
        return table

    # ================================================================ binding to a model
    def bind(self, model: nn.Module) -> None:
        """Resolve the targets on ``model``; restore masks (checkpoint, earlier round) and freeze them.

        Masks are bound to parameters, not names. Masks computed on these very parameters (``prune()``
        then ``fit``, a second ``fit``) follow them into any wrapper: a LightningModule around the
        model, ``torch.compile``'s ``_orig_mod``, PEFT's ``base_layer`` (frozen there, and still
        masked). Checkpointed masks find their parameters by name, or by a unique name suffix
        (:func:`~lightning_prune.engine.targets.match_names`). Raises before any work if the model has
        weights on the meta device, nothing matches, a checkpoint names other parameters than this
        pruner selects, the criterion cannot handle a target, or the target sparsity is unreachable
        under the per-layer floor.
        """
        _check_materialised(model, self.label)
        scope = self._resolve_scope(model)
        self._check_scope(scope)
        skipped: list[tuple[str, str]] = []
        previous = self._previous_targets(model)
        keeps_masks = bool(self._loaded) or (previous is not None and self._loaded is None)
        resolved = resolve_targets(
            model, self.include, self.exclude, self._parameters, skipped, allow_empty=keeps_masks
        )
        masks: dict[str, Tensor] | None = None
        if self._loaded is not None:
            targets, masks = self._checkpoint_targets(model, resolved, skipped)
        elif previous is not None:  # the same parameters: keep their masks under today's names
            targets = previous
            old = dict(zip([id(t.param) for t in previous], self._masks.values())) if self._masks else {}
            masks = {t.name: old[id(t.param)] for t in previous} if old else None
            mine = {id(t.param) for t in previous}
            if new := [t.name for t in resolved if id(t.param) not in mine and t.param.requires_grad]:
                warn(
                    f"{self.label} keeps the {len(previous)} parameters it pruned before; {new[:5]}"
                    f"{' ...' if len(new) > 5 else ''} of this model are not among them and stay dense "
                    "(a new pruner would select them)"
                )
        else:
            if self._masks is not None:
                warn(
                    f"{self.label} pruned another model before ({len(self._history)} rounds); its masks do "
                    "not belong to this one and are dropped: this model starts dense. (Masks carry over only to the "
                    "same parameters, or through a checkpoint: pruner.load_state_dict(...) / fit(ckpt_path=...))"
                )
                self._history, self._last_point = [], None
            targets = resolved
        skipped = [(n, why) for n, why in skipped if n not in {t.name for t in targets}]
        if skipped and skipped != self._skipped:
            warn(f"{self.label}: not pruned by default: {_skipped_text(skipped)}")
        self._skipped = skipped
        # the pattern for this model (channels: its families); it refuses layers it does not fit, and a
        # target its floor makes unreachable
        pattern = self.pattern.bind(model, targets, self.target, scope, self.min_density)
        if notes := pattern.notes:
            warn(f"{self.label}: pattern='{self.pattern}' leaves alone: " + "; ".join(notes))
        world = default_collectives().world_size
        sharded = sharding.check_sharding([t.name for t in targets], [t.param for t in targets], world)
        if masks is not None:
            restored = self._loaded is not None  # whole layers from a checkpoint, else this rank's blocks
            masks = _fit_masks(masks, targets, "checkpointed" if restored else "this pruner's", whole=restored)
            self._check_pattern(masks, targets, pattern)
        if sharded or masks is None or _sparsity(pattern, masks) < self.target:  # rounds may follow: check them now
            self.criterion.check_targets(targets)
            self.criterion.check_model(model, targets)
            self.round_strategy.check_model(model, targets, sharded)
            if sharded:  # what sharded layers cannot do yet, refused before any work
                pattern.check_sharded(targets, scope)
                self.criterion.check_sharded(targets)
        elif (reached := _sparsity(pattern, masks)) > self.target + 1e-9:
            warn(
                f"{self.label}(target={self.target}) is bound to masks that are already {reached:.4f} sparse: "
                "masks only shrink, so the model stays sparser than the target asks"
            )
        self._loaded = None
        self._model = weakref.ref(model)
        self._name_parameters(model)
        self.scope = scope
        self.pattern = pattern
        self._masks = masks
        self._bound = [weakref.ref(t.param) for t in targets]
        self._targets = targets
        self._params = {t.name: t.param for t in targets}
        self._refresh_frozen()
        M.apply_masks_(self._params, self._masks or {})

    def _previous_targets(self, model: nn.Module) -> list[PruneTarget] | None:
        """The targets this pruner was bound to, found by identity in ``model`` (renamed as ``model``
        names them now), or ``None`` if it was never bound or they are not all parameters of ``model``."""
        params = [r() for r in self._bound]
        if not params or any(p is None for p in params):
            return None
        return targets_of(model, params)  # type: ignore[arg-type]

    def _checkpoint_targets(
        self, model: nn.Module, resolved: list[PruneTarget], skipped: list[tuple[str, str]]
    ) -> tuple[list[PruneTarget], dict[str, Tensor] | None]:
        """Targets and masks from checkpointed state: each mask finds its parameter by name or unique
        name suffix; the parameters must be the ones this pruner selects (frozen ones included: PEFT
        freezes the base weights it wraps)."""
        packed = self._loaded
        if not packed:  # a checkpoint taken before the first round: the selection decides
            return resolved, None
        names = match_names(list(packed), model, "checkpointed pruning")
        named = dict(model.named_parameters())
        targets = targets_of(model, [named[names[n]] for n in packed])
        assert targets is not None  # match_names found every one
        frozen = {n for n, why in skipped if why.startswith("frozen")}
        chosen = {id(t.param) for t in targets}
        missing = [t.name for t in resolved if id(t.param) not in chosen]
        selected = {id(t.param) for t in resolved}
        unexpected = [t.name for t in targets if id(t.param) not in selected and t.name not in frozen]
        if missing or unexpected:
            raise ValueError(
                f"checkpointed pruning masks do not match this model's targets: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]} (check include/exclude/parameters)"
            )
        return targets, {t.name: m for t, m in zip(targets, _unpack_masks(packed).values())}

    def current_masks(self) -> dict[str, Tensor]:
        targets = self.targets
        if self._masks is not None:
            return self._masks
        return {t.name: torch.ones_like(t.local_param, dtype=torch.bool) for t in targets}

    def units(self) -> dict[str, tuple[int, int]]:
        """``(pruned, total)`` per layer of what ``target`` is a fraction of: weights, or structures
        under ``pattern="channels"``; whole layers when sharded."""
        if self.sharded:
            kept = self.kept_counts()
            return {t.name: (t.param.numel() - kept[t.name], t.param.numel()) for t in self.targets}
        return self.pattern.units(self.current_masks())

    def kept_counts(self) -> dict[str, int]:
        """Kept entries per layer, whole layers (counted when the masks change: every rank agrees)."""
        if self._kept is None:  # only before binding: _refresh_frozen counts on every rank
            self._kept = self._count_kept()
        return dict(self._kept)

    def _count_kept(self) -> dict[str, int]:
        current, targets = self.current_masks(), self.targets
        counts = [float(current[t.name].sum()) for t in targets]
        if self.sharded and (comm := default_collectives()).world_size > 1:
            sharded = [t.sharded for t in targets]
            device = targets[0].param.device  # where the backend reduces (NCCL: the GPU)
            part = torch.tensor([c if s else 0.0 for c, s in zip(counts, sharded)], dtype=torch.float64, device=device)
            comm.all_reduce_sum_([part])
            counts = [p if s else c for p, c, s in zip(part.tolist(), counts, sharded)]
        return {t.name: int(c) for t, c in zip(targets, counts)}

    def removes_something(self, sparsity: float) -> bool:
        """Whether a round to ``sparsity`` would prune any weight the masks still keep."""
        units = self.units()
        if self.scope == "layer":
            return any(round(sparsity * n) > p for p, n in units.values())
        return round(sparsity * sum(n for _, n in units.values())) > sum(p for p, _ in units.values())

    def due(self, now: int) -> int | None:
        """The schedule point whose round should run now (``now``: epoch or global step), or ``None``.

        Rounds that would remove nothing (the masks already reach their sparsity, e.g. after a
        one-shot ``prune()``) are marked done and skipped.
        """
        point = self._schedule.due(now, self._last_point)
        if point is not None and not self.removes_something(self._schedule.sparsity_at(point)):
            self._last_point, point = point, None
        return point

    def next_round(self) -> int | None:
        """The next schedule point that will remove something (where a capture window is needed)."""
        last = self._last_point
        while (point := self._schedule.next_point(last)) is not None:
            if self.removes_something(self._schedule.sparsity_at(point)):
                return point
            last = point
        return None

    # ================================================================ masks
    def commit_(
        self,
        result: RoundResult,
        before: Mapping[str, Tensor],
        comm: Collectives,
        optimizers: Iterable[torch.optim.Optimizer] = (),
    ) -> None:
        """Install new masks (which may only shrink), zero what they prune, and sync all ranks."""
        # in place on the round's own masks (consumed here): the old and the new masks, not a third set
        new = {n: result.masks[n].to(device=m.device, dtype=torch.bool).logical_and_(m) for n, m in before.items()}
        whole = [t.name for t in self.targets if not t.sharded]  # a sharded layer's blocks differ by rank
        comm.broadcast_([*(new[n] for n in whole), *(self._params[n].data for n in whole)])
        self._masks = new
        self._refresh_frozen()
        M.apply_masks_(self._params, new)
        reset = {n: True for n in result.updated} if self.criterion.reset_moved_state else None
        M.zero_optimizer_state_(optimizers, self._params, new, reset_kept=reset)

    def freeze_grads_(self) -> None:
        """Zero the gradients of pruned weights (before an optimizer step)."""
        if frozen := self._multipliers():
            M.mask_grads_(self._params, frozen)

    def freeze_weights_(self) -> None:
        """Re-zero pruned weights (after an optimizer step)."""
        if frozen := self._multipliers():
            M.apply_masks_(self._params, frozen)

    def _refresh_frozen(self) -> None:
        masks = self._masks or {}
        for name, m in masks.items():
            if m.device != self._params[name].device:
                masks[name] = m.to(self._params[name].device)
        self._frozen = None
        self._kept = self._count_kept() if self._targets is not None else None  # a collective when sharded

    def _multipliers(self) -> dict[str, Tensor]:
        if self._frozen is None:
            masks = self._masks or {}
            self._frozen = {n: M.multiplier(m, self._params[n]) for n, m in masks.items() if not bool(m.all())}
        return self._frozen

    def _record(self, record: dict[str, Any], point: int | None) -> None:
        self._history.append(record)
        if point is not None:
            self._last_point = point

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        masks = None
        if self._masks is not None:  # whole layers (gathered one at a time when sharded): any world size resumes
            by_name = {t.name: t for t in self.targets}
            masks = {}
            for n, m in self._masks.items():
                packed = M.pack_mask(by_name[n].gather(m))
                masks[n] = {**packed, "crc32": _crc(packed)}
        return {
            "version": STATE_VERSION,
            "pruner": self.label,
            "masks": masks,
            "history": [dict(r) for r in self._history],
            "unit": self._schedule.unit,
            "last_point": self._last_point,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"pruning state must be a dict, got {type(state_dict).__name__}")
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"unsupported pruning state version {version!r} (this version reads {STATE_VERSION})")
        needed = ("masks", "history", "unit", "last_point")
        if missing := [k for k in needed if k not in state_dict]:
            raise ValueError(f"pruning state is missing {missing}: it is corrupted or hand-edited")
        writer = state_dict.get("pruner")
        if writer is not None and writer != self.label:
            raise ValueError(
                f"this pruning state was written by {writer}, and this pruner is {self.label}: load it "
                f"into a {writer} (masks carry the criterion's assumptions, e.g. OBS's compensated weights)"
            )
        history = [dict(r) for r in state_dict["history"]]
        unit, last = state_dict["unit"], state_dict["last_point"]
        if last is not None and unit != self._schedule.unit:
            raise ValueError(
                f"the checkpointed pruner ran {unit} rounds, this one has {self._schedule.unit} triggers: "
                f"resume with the same kind of triggers ({unit} arguments)"
            )
        packed = state_dict["masks"]
        if packed is not None:
            _unpack_masks(packed)  # corrupted or hand-edited state is refused now, naming the parameter
        self._history, self._last_point = history, last
        self._loaded = dict(packed) if packed is not None else {}
        model = self._model() if self._model is not None else None
        if model is not None:  # already bound: bind again, to the same model, with these masks
            self.bind(model)

    def _check_pattern(self, masks: Mapping[str, Tensor], targets: Sequence[PruneTarget], pattern: Pattern) -> None:
        """Masks from a checkpoint or an earlier round must fit the pattern: they only shrink."""
        pattern.check_masks(masks, targets, "the restored")


def _sparsity(pattern: Pattern, masks: Mapping[str, Tensor]) -> float:
    """Fraction of the units ``target`` counts (weights, or structures) that ``masks`` prune."""
    units = pattern.units(masks).values()
    return sum(p for p, _ in units) / max(sum(n for _, n in units), 1)


forwarded(Pruner.__init__, schedule_parameters())


def _skipped_text(skipped: Sequence[tuple[str, str]], shown: int = 3) -> str:
    """The parameters left out, one entry per reason (a PEFT model has dozens of adapters: a count and
    the first few names, not a line each)."""
    by_reason: dict[str, list[str]] = {}
    for name, why in skipped:
        by_reason.setdefault(why, []).append(name)
    parts = []
    for why, names in by_reason.items():
        if len(names) == 1:
            parts.append(f"{names[0]}: {why}")
        else:
            more = f", +{len(names) - shown} more" if len(names) > shown else ""
            parts.append(f"{len(names)} parameters ({', '.join(names[:shown])}{more}): {why}")
    return "; ".join(parts)


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


def is_pruning_state(state: Any) -> bool:
    """Whether a checkpoint entry looks like a pruner's :meth:`Pruner.state_dict`."""
    return isinstance(state, Mapping) and {"version", "masks", "history"} <= set(state)


def _crc(packed: Mapping[str, Any]) -> int:
    """Checksum of a packed mask: its shape and its bits."""
    shape = ",".join(str(int(d)) for d in packed["shape"])  # type: ignore[union-attr]
    return zlib.crc32(packed["bits"].numpy().tobytes(), zlib.crc32(shape.encode()))  # type: ignore[union-attr]


def _check_materialised(model: nn.Module, who: str) -> None:
    """Meta tensors have shapes but no values: nothing can be scored, calibrated or masked on them,
    and torch's own error (``Tensor.item() cannot be called on meta tensors``) names no tensor."""
    names = [n for n, p in model.named_parameters() if p.is_meta]
    names += [n for n, b in model.named_buffers() if b.is_meta]
    if names:
        listed = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ValueError(
            f"{who}: {type(model).__name__} has {len(names)} parameters/buffers on the meta device (shapes, no "
            f"values): {listed}. Materialise the weights before pruning, e.g. model.to_empty(device='cpu') then "
            "model.load_state_dict(state_dict) (or initialise them)"
        )


def _unpack_masks(packed: Mapping[str, Any]) -> dict[str, Tensor]:
    """Checkpointed masks, each verified (size, checksum) and unpacked; whole layers."""
    masks = {}
    for name, p in packed.items():
        try:
            numel = 1
            for d in p["shape"]:
                numel *= int(d)
            if p["bits"].dtype != torch.uint8 or p["bits"].numel() != (numel + 7) // 8:
                raise ValueError(f"{p['bits'].numel()} bytes for shape {list(p['shape'])}")
            if "crc32" in p and _crc(p) != p["crc32"]:
                raise ValueError("checksum mismatch")
            masks[name] = M.unpack_mask(p)
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"checkpointed mask for {name!r} is corrupted or hand-edited ({type(err).__name__}: {err})"
            ) from err
    return masks


def _fit_masks(
    masks: Mapping[str, Tensor], targets: Sequence[PruneTarget], what: str, whole: bool = True
) -> dict[str, Tensor]:
    """Masks checked against the targets' names and shapes, on their parameters' devices.

    ``whole``: the masks are of whole layers (a checkpoint), cut to this rank's block when sharded;
    else they are already this rank's blocks."""
    names = {t.name for t in targets}
    if set(masks) != names:
        missing, extra = sorted(names - set(masks)), sorted(set(masks) - names)
        raise ValueError(
            f"{what} pruning masks do not match this model's targets: "
            f"missing {missing[:5]}, unexpected {extra[:5]} (check include/exclude/parameters)"
        )
    out = {}
    for t in targets:
        mask = masks[t.name]
        shape = t.param.shape if whole else t.local_param.shape
        if mask.shape != shape:
            raise ValueError(
                f"{what} mask for {t.name!r} has shape {tuple(mask.shape)}, the parameter has {tuple(shape)}"
            )
        out[t.name] = (t.local(mask) if whole else mask).to(t.local_param.device)
    return out
