"""The pruning engine shared by every criterion.

A subclass only says how to *score* (and, for OBS, how to *update* weights); this class owns
everything else: which parameters, when rounds fire, the capture window, masks that only shrink,
frozen weights, checkpoints, cross-rank consistency and reporting. A round reads top to bottom
in :meth:`PruningCallback._run_round`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_prune import distributed, reporting
from lightning_prune import masks as M
from lightning_prune.calibration import LossFn, can_compute_loss, mean_loss
from lightning_prune.schedule import SparsitySchedule, check_fraction
from lightning_prune.selection import SCOPES, check_feasible, select_masks
from lightning_prune.targets import PruneTarget, resolve_targets

STATE_VERSION = 1


@dataclass
class RoundContext:
    """Everything a criterion may look at during one round."""

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    targets: list[PruneTarget]
    masks: dict[str, Tensor]  # current masks (True = kept)
    sparsity: float  # cumulative sparsity this round must reach
    batches: list[Any]  # the window's training batches (on device), oldest first
    stats: Any = None  # the criterion's accumulated statistics, reduced across ranks


@dataclass
class RoundResult:
    masks: dict[str, Tensor]
    predicted_loss_increase: float = math.nan
    updated: set[str] = field(default_factory=set)  # layers whose kept weights the criterion changed
    info: dict[str, Any] = field(default_factory=dict)


class PruningCallback(Callback):
    """Base class of :class:`MagnitudePruning`, :class:`OBDPruning` and :class:`OBSPruning`.

    Args:
        target: final fraction of the selected weights that are exactly zero, in ``[0, 1)``.
        schedule: ``"cubic"``, ``"linear"``, ``"one_shot"`` or a callable ``epoch -> sparsity``.
        start_epoch: first epoch whose end runs a round.
        end_epoch: last round epoch (inclusive). Default: the first half of the remaining
            epochs, leaving the rest for fine-tuning (see :mod:`lightning_prune.schedule`).
        every_n_epochs: epochs between rounds.
        scope: ``"global"`` ranks all selected weights together; ``"layer"`` gives each layer
            the same sparsity.
        include: glob patterns of parameter names to consider (default: all Linear/Conv weights).
        exclude: glob patterns of parameter names to leave dense.
        parameters: explicit parameters to prune (replaces the Linear/Conv default).
        min_density: floor per layer; each keeps ``max(1, ceil(min_density * numel))`` weights.
        num_batches: training batches before each round whose curvature the round uses.
        eval_batches: how many of the window's last batches measure the actual loss increase
            (at most ``num_batches``; 0 disables the measurement).
        loss_fn: ``loss_fn(pl_module, batch) -> mean loss``; default: ``training_step``, called
            in eval mode with logging muted (see :mod:`lightning_prune.calibration`).
        verbose: 0 silent, 1 a line per round and a per-layer table at the end, 2 a table per round.
    """

    def __init__(
        self,
        target: float,
        schedule: str | Callable[[int], float] = "cubic",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
        scope: Literal["global", "layer"] = "global",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        parameters: Sequence[nn.Parameter] | None = None,
        min_density: float = 0.001,
        num_batches: int = 32,
        eval_batches: int = 8,
        loss_fn: LossFn | None = None,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        self._schedule = SparsitySchedule(target, schedule, start_epoch, end_epoch, every_n_epochs)
        if scope not in SCOPES:
            raise ValueError(f"`scope` must be one of {SCOPES}, got {scope!r}")
        self.scope = scope
        self.include, self.exclude = include, exclude
        self._parameters = list(parameters) if parameters is not None else None
        self.min_density = check_fraction("min_density", min_density, upper_inclusive=True)
        for name, value, minimum in (("num_batches", num_batches, 1), ("eval_batches", eval_batches, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
        if verbose not in (0, 1, 2):
            raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable (pl_module, batch) -> loss, got {loss_fn!r}")
        self.num_batches, self.eval_batches = num_batches, eval_batches
        self.loss_fn, self.verbose = loss_fn, verbose

        self._targets: list[PruneTarget] | None = None
        self._masks: dict[str, Tensor] | None = None  # None until the first round
        self._frozen: dict[str, Tensor] = {}  # multipliers of layers with at least one pruned weight
        self._params: dict[str, Tensor] = {}
        self._history: list[dict[str, Any]] = []
        self._loaded_masks: dict[str, Any] | None = None
        self._step_hooks: list[Any] = []
        self._window_open = False
        self._window_batches = 0
        self._batches: deque[Any] = deque()
        self._warned: set[str] = set()

    # ================================================================ subclass API
    @property
    def _window_length(self) -> int:
        """Training batches captured and kept before a round (magnitude: only the evaluation batches)."""
        return self.num_batches

    def _on_targets(self, targets: list[PruneTarget]) -> None:
        """Validate targets for the criterion (e.g. curvature needs Linear/Conv weights)."""

    def _open_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start capturing statistics for the coming round."""

    def _after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fold this backward pass into the statistics (only called inside a window)."""

    def _after_window_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called after each training batch of the window (multi-phase estimators switch here)."""

    def _close_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """Stop capturing; return the statistics reduced across ranks (``None`` if none)."""
        return None

    def _prune(self, ctx: RoundContext) -> RoundResult:
        """Choose the new masks (and optionally update kept weights)."""
        raise NotImplementedError

    # ================================================================ public read-only state
    @property
    def target(self) -> float:
        return self._schedule.target

    @property
    def schedule(self) -> SparsitySchedule:
        return self._schedule

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool mask (True = kept), as copies on CPU. Empty before fit starts."""
        if self._targets is None:
            return MappingProxyType({})
        current = self._current_masks()
        return MappingProxyType({n: m.detach().to("cpu", copy=True) for n, m in current.items()})

    @property
    def history(self) -> tuple[Mapping[str, Any], ...]:
        """One record per round (see :meth:`_run_round` for the fields)."""
        return tuple(MappingProxyType(r) for r in self._history)

    @property
    def sparsity(self) -> float:
        """Current fraction of the selected weights that are pruned."""
        if self._masks is None:
            return 0.0
        pruned, total = M.count_pruned(self._masks)
        return pruned / max(total, 1)

    # ================================================================ Lightning hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        distributed.check_strategy(trainer)
        self._schedule.resolve(trainer.max_epochs)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        targets = resolve_targets(pl_module, self.include, self.exclude, self._parameters)
        self._on_targets(targets)
        numels = {t.name: t.param.numel() for t in targets}
        check_feasible(numels, self.target, self.scope, self.min_density)
        self._targets = targets
        self._params = {t.name: t.param for t in targets}
        if self._loaded_masks is not None:
            self._masks = self._restore_masks(self._loaded_masks)
            self._loaded_masks = None
        self._refresh_frozen()
        M.apply_masks_(self._params, self._frozen)
        self._step_hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_open or not self._round_due(trainer.current_epoch):
            return
        if batch_idx >= self._window_start(trainer):
            self._window_open, self._window_batches = True, 0
            self._batches = deque(maxlen=self._window_length)
            self._open_window(trainer, pl_module)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window_open:
            self._after_backward(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._window_open:
            self._batches.append(batch)
            self._window_batches += 1
            self._after_window_batch(trainer, pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # before Lightning clips gradients, so the clip norm only sees live weights
        if self._frozen:
            M.mask_grads_(self._params, self._frozen)

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._frozen:
            M.apply_masks_(self._params, self._frozen)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint callback saving at the end-of-epoch validation runs right after this hook
        # (Lightning orders checkpoint callbacks last): prune first so that checkpoint has the round.
        if (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            and self._round_due(trainer.current_epoch)
        ):
            self._run_round(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._round_due(trainer.current_epoch):
            self._run_round(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.verbose >= 1 and self._history:
            reporting.console(trainer, self.layer_table())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        if self._window_open:
            self._close_window(trainer, pl_module)
            self._window_open = False
        self._batches.clear()

    # ================================================================ the round
    def _run_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One pruning round: statistics -> loss before -> criterion -> commit -> loss after -> report."""
        start = time.perf_counter()
        epoch = trainer.current_epoch
        sparsity = self._schedule.sparsity_at(epoch)
        assert self._targets is not None
        stats = self._close_window(trainer, pl_module) if self._window_open else None
        self._window_open = False
        batches = list(self._batches)
        eval_batches = batches[max(0, len(batches) - self.eval_batches) :] if self.eval_batches else []

        loss_before = self._held_loss(trainer, pl_module, eval_batches)
        before = self._current_masks()
        ctx = RoundContext(trainer, pl_module, self._targets, before, sparsity, batches, stats)
        result = self._prune(ctx)
        self._commit(trainer, result, before)
        loss_after = self._held_loss(trainer, pl_module, eval_batches)

        pruned, total = M.count_pruned(self._masks)
        record = {
            "round": len(self._history),
            "epoch": epoch,
            "global_step": trainer.global_step,
            "target_sparsity": sparsity,
            "sparsity": pruned / total,
            "pruned": pruned,
            "total": total,
            "predicted_loss_increase": float(result.predicted_loss_increase),
            "actual_loss_increase": loss_after - loss_before,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "layer_sparsity": M.layer_sparsity(self._masks),
            "monitor": {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if isinstance(v, (Tensor, float)) and torch.as_tensor(v).numel() == 1
            },
            "info": dict(result.info),
            "seconds": time.perf_counter() - start,
        }
        self._history.append(record)
        self._batches.clear()
        reporting.log_round(trainer, record, self._history)
        if self.verbose >= 1:
            reporting.console(trainer, reporting.round_summary(record))
        if self.verbose >= 2:
            reporting.console(trainer, self.layer_table())

    def _commit(self, trainer: pl.Trainer, result: RoundResult, before: dict[str, Tensor]) -> None:
        """Install new masks (which may only shrink), zero what they prune, and sync all ranks."""
        new = {n: result.masks[n].to(device=m.device, dtype=torch.bool) & m for n, m in before.items()}
        distributed.broadcast_([*new.values(), *(self._params[n].data for n in new)])
        self._masks = new
        self._refresh_frozen()
        M.apply_masks_(self._params, new)
        reset = {n: True for n in result.updated} if self._reset_updated_state else None
        M.zero_optimizer_state_(trainer.optimizers, self._params, new, reset_kept=reset)

    _reset_updated_state = False  # OBS overrides: whether moved weights lose their optimizer moments

    # ================================================================ helpers
    def _round_due(self, epoch: int) -> bool:
        return (
            self._schedule.resolved
            and self._schedule.is_round(epoch)
            and all(r["epoch"] != epoch for r in self._history)
        )

    def _window_start(self, trainer: pl.Trainer) -> int:
        n = trainer.num_training_batches
        if not math.isfinite(n):
            self._warn_once(
                "inf",
                "the training dataloader has no length, so the curvature window covers the whole "
                "round epoch instead of its last `num_batches` batches",
            )
            return 0
        if n < self._window_length:
            self._warn_once(
                "short",
                f"the epoch has {n} training batches, fewer than the window of {self._window_length}; "
                "the round uses all of them",
            )
        return max(0, int(n) - self._window_length)

    def _held_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batches: list[Any]) -> float:
        if not batches:
            return math.nan
        if not can_compute_loss(pl_module, self.loss_fn):
            self._warn_once("loss", "manual optimization without `loss_fn`: actual loss increase is not measured")
            return math.nan
        return distributed.reduce_mean(mean_loss(trainer, pl_module, batches, self.loss_fn), pl_module.device)

    def _current_masks(self) -> dict[str, Tensor]:
        assert self._targets is not None
        if self._masks is not None:
            return self._masks
        return {t.name: torch.ones_like(t.param, dtype=torch.bool) for t in self._targets}

    def _refresh_frozen(self) -> None:
        masks = self._masks or {}
        for name, m in masks.items():
            if m.device != self._params[name].device:
                masks[name] = m.to(self._params[name].device)
        self._frozen = {n: M.multiplier(m, self._params[n]) for n, m in masks.items() if not bool(m.all())}

    def _select(self, ctx: RoundContext, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Masks from scores under this callback's scope and floor (NaN scores are kept, with a warning)."""
        nan = sum(int(torch.isnan(s).sum()) for s in scores.values())
        if nan:
            rank_zero_warn(f"{nan} NaN pruning scores in round {len(self._history)}: those weights are kept")
        return select_masks(scores, ctx.masks, ctx.sparsity, scope=self.scope, min_density=self.min_density)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def layer_table(self) -> str:
        """Per-layer kept/total/sparsity table of the current masks."""
        assert self._targets is not None
        current = self._current_masks()
        rows = [(t.name, tuple(t.param.shape), int(current[t.name].sum()), t.param.numel()) for t in self._targets]
        return reporting.layer_table(rows)

    # ================================================================ checkpointing
    def state_dict(self) -> dict[str, Any]:
        masks = self._masks if self._masks is not None else None
        return {
            "version": STATE_VERSION,
            "masks": None if masks is None else {n: M.pack_mask(m) for n, m in masks.items()},
            "history": [dict(r) for r in self._history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported pruning state version {state_dict.get('version')!r}")
        self._history = [dict(r) for r in state_dict["history"]]
        self._loaded_masks = state_dict["masks"]
        if self._targets is not None and self._loaded_masks is not None:  # loaded after fit start
            self._masks = self._restore_masks(self._loaded_masks)
            self._loaded_masks = None
            self._refresh_frozen()

    def _restore_masks(self, packed: Mapping[str, Any]) -> dict[str, Tensor]:
        assert self._targets is not None
        names = {t.name for t in self._targets}
        if set(packed) != names:
            missing, extra = sorted(names - set(packed)), sorted(set(packed) - names)
            raise ValueError(
                "checkpointed pruning masks do not match this model's targets: "
                f"missing {missing[:5]}, unexpected {extra[:5]} (check include/exclude/parameters)"
            )
        out = {}
        for t in self._targets:
            mask = M.unpack_mask(packed[t.name])
            if mask.shape != t.param.shape:
                raise ValueError(
                    f"checkpointed mask for {t.name!r} has shape {tuple(mask.shape)}, "
                    f"the parameter has {tuple(t.param.shape)}"
                )
            out[t.name] = mask.to(t.param.device)
        return out
