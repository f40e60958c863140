"""The Lightning adapter: a :class:`~lightning_prune.engine.pruner.Pruner` driven by ``Trainer.fit``'s hooks.

Everything a round computes lives in the Lightning-free core (:func:`lightning_prune.engine.round.run_round`).
This class only translates the training loop into it:

* when a round is due and which training batches form its capture window (its trigger,
  :mod:`lightning_prune.callbacks.triggers`: the end of a round epoch, or right after ``global_step``
  reaches a round step; the window is the last ``num_batches`` batches before it);
* feeding each backward pass of the window to the criterion's estimator, with what the trainer
  knows of the loss's scaling (gradient accumulation, AMP loss scale), and checkpointing an open
  window (:mod:`lightning_prune.callbacks.window_state`);
* freezing pruned weights around every optimizer step;
* the strategy's collectives, logger metrics, console output, ``state_key`` and checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.checks import (
    check_checkpoint_owner,
    check_compiled,
    check_loss_source,
    check_siblings,
    no_round_in_run,
)
from lightning_prune.callbacks.parallel import StrategyCollectives, check_strategy
from lightning_prune.callbacks.reporting import console, log_metrics, log_round, trainer_progress
from lightning_prune.callbacks.triggers import trigger_for
from lightning_prune.callbacks.typed import make_typed
from lightning_prune.callbacks.window_state import OpenWindow, WindowPlan
from lightning_prune.criteria.base import Criterion, CriterionFactory
from lightning_prune.engine.calibration import Calibration, RoundInterrupted
from lightning_prune.engine.facade import PrunerFacade
from lightning_prune.engine.pruner import Pruner, pruner_parameters
from lightning_prune.engine.round import run_round
from lightning_prune.engine.schedule import check_options
from lightning_prune.engine.summary import round_summary
from lightning_prune.stats.window import CaptureWindow


class PruningCallback(PrunerFacade, Callback):
    """Base class of :class:`MagnitudePruning`, :class:`OBDPruning` and :class:`OBSPruning`: a Lightning
    callback that drives the :class:`~lightning_prune.engine.pruner.Pruner` it wraps (:attr:`pruner`).

    See :class:`~lightning_prune.engine.pruner.Pruner` for the arguments. The pruner's public state reads
    through the callback (``callback.history``, ``callback.masks``, ``callback.sparsity``: the properties of
    :class:`~lightning_prune.engine.facade.PrunerFacade`), and ``prune()`` takes the callback for its pruner.
    Each instance checkpoints under its own :attr:`state_key` (its class and its target selection), so
    several pruners on disjoint parameter groups checkpoint and resume independently; overlapping ones are
    refused at fit start.
    """

    def __init_subclass__(cls, criterion: CriterionFactory | None = None, **kwargs: Any) -> None:
        """``class FooPruning(PruningCallback, criterion=Foo)``: the typed callback of criterion ``Foo``, taking
        ``Foo``'s options (:mod:`lightning_prune.callbacks.typed`)."""
        super().__init_subclass__(**kwargs)
        if criterion is not None:
            make_typed(cls, criterion)

    def __init__(self, criterion: Criterion, target: float, **options: Any) -> None:
        check_options(type(self).__name__, options, pruner_parameters())
        self.pruner = Pruner(criterion, target, **options)
        self.pruner.label = type(self).__name__
        criterion.check_window(self.pruner.num_batches)
        self._trigger = trigger_for(self.pruner)
        self._window: OpenWindow | None = None  # the capture window before the next round, while it is open
        self._restored_window: dict[str, Any] | None = None  # a checkpoint's open window, continued at train start
        self._step_hooks: list[Any] = []
        self._warned: set[str] = set()
        self._gradients_checked = True

    @property
    @override
    def state_key(self) -> str:
        """The class name, plus the target selection when it is not the default (as ``ModelCheckpoint``)."""
        selection = self.pruner.selection
        return self._generate_state_key(**selection) if selection else type(self).__qualname__

    # ================================================================ fit start: everything checkable
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != TrainerFn.FITTING:
            return
        check_strategy(trainer)
        self.pruner._name_parameters(pl_module)  # the state key is needed before on_fit_start, to restore
        self.teardown(trainer, pl_module, stage)  # what a failed fit left (on_exception keeps it for its checkpoint)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pruner = self.pruner
        pruner.bind(pl_module)
        before = itertools.takewhile(lambda cb: cb is not self, trainer.callbacks)  # type: ignore[attr-defined]
        check_siblings(self, self.state_key, [cb for cb in before if isinstance(cb, PruningCallback)])
        # a pruner already at its target (prune() then fit, a finished schedule) has no rounds left: it
        # only keeps its masks frozen, and needs no trigger that fits this Trainer
        if not pruner.schedule.resolved and pruner.removes_something(pruner.target):
            self._trigger.resolve(trainer)
        who = type(self).__name__
        check_loss_source(who, pruner, pl_module)
        check_compiled(who, pruner, pl_module)
        self._step_hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]
        end = pruner.schedule.end
        if (
            end is not None
            and pruner.removes_something(pruner.target)
            and (limit := self._trigger.run_end(trainer, end))
        ):
            self._warn_once(
                "end",
                f"{type(self).__name__}'s last round is at {pruner.schedule.unit} {end}, but {limit} ends the run "
                f"before it: the model will not reach target={self.target}. Lower "
                f"`{pruner.schedule.when.arg('end')}` or lengthen the run",
            )
        self._gradients_checked = not self.criterion.needs_gradients

    def no_round_in_run(self, trainer: pl.Trainer) -> str | None:
        """Why this pruner will run no round in this fit, or ``None`` if one can come (see
        :func:`~lightning_prune.callbacks.checks.no_round_in_run`)."""
        return no_round_in_run(self.pruner, self._trigger, trainer)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_checkpoint_owner(self.state_key, trainer, checkpoint)

    # ================================================================ the capture window
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        point = None if self._window is not None else self._trigger.upcoming(trainer)
        if point is not None and self._trigger.window_opens(trainer, point, batch_idx):
            comm = StrategyCollectives(trainer.strategy)
            self._window = OpenWindow(point, self.window_length, comm, self._new_capture(trainer))
        if self._window is not None:
            self._window.begin_batch()

    def _new_capture(self, trainer: pl.Trainer) -> CaptureWindow | None:
        """Fresh statistics for a window that captures them; ``None`` when the round computes them."""
        pruner, comm = self.pruner, StrategyCollectives(trainer.strategy)
        estimator = pruner.criterion.make_estimator(self.targets, comm, self.window_length)
        if estimator is None or not pruner.round_strategy.captures_in_window(pruner.criterion):
            return None  # computed at round time
        return CaptureWindow(estimator, self.targets, pruner.criterion.loss_reduction)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._window is not None:
            self._window.before_backward(loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window is not None:
            self._window.after_backward(*loss_scaling(trainer, pl_module))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._window is not None:
            self._window.end_batch(outputs, batch)
        if (point := self._trigger.due_after_batch(trainer)) is not None:
            self._round(trainer, pl_module, point)

    # ================================================================ checkpoints inside a capture window
    @override
    def state_dict(self) -> dict[str, Any]:
        """:meth:`Pruner.state_dict`, plus the open capture window when the checkpoint is taken inside one
        (:meth:`OpenWindow.state_dict <lightning_prune.callbacks.window_state.OpenWindow.state_dict>`)."""
        state = self.pruner.state_dict()
        if self._window is not None:
            device = self.targets[0].param.device
            state["window"] = self._window.state_dict(self._window_plan(), device, self._warn_once)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        window = state.pop("window", None) if isinstance(state, dict) else None
        self.pruner.load_state_dict(state)
        self._restored_window = window  # continued at train start (dropped at teardown if no training follows)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._restored_window = self._restored_window, None
        if state is None:
            return
        comm, device = StrategyCollectives(trainer.strategy), trainer.strategy.root_device
        plan = self._window_plan(trainer)
        restored = OpenWindow.restore(
            state,
            plan,
            rank=trainer.global_rank,
            comm=comm,
            device=device,
            new_capture=lambda: self._new_capture(trainer),
        )
        self._window = restored
        if restored is not None and self._trigger.late(trainer, restored.point):
            epoch = self._trigger.record_epoch(trainer, restored.point, late=True)
            self._round(trainer, pl_module, restored.point, epoch=epoch)

    def _window_plan(self, trainer: pl.Trainer | None = None) -> WindowPlan:
        """This run's window before its next round (``trainer``: where the run stands, to compare a
        checkpoint's window with)."""
        plan = WindowPlan(type(self).__name__, self.schedule.unit, self.window_length, self.criterion.name)
        if trainer is None:
            return plan
        trigger = self._trigger
        late = functools.partial(trigger.late, trainer)
        return dataclasses.replace(plan, upcoming=trigger.upcoming(trainer), world_size=trainer.world_size, late=late)

    # ================================================================ frozen weights
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._gradients_checked:  # the first step: fail now, not at the round an epoch later
            self._gradients_checked = True
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if missing := [t.name for t in self.targets if id(t.param) in stepped and t.param.grad is None]:
                raise ValueError(
                    f"{type(self).__name__} needs the gradient of every target, and {missing[:5]} got none at the "
                    "first optimizer step: they are not used by the training loss. Exclude them (exclude=[...])"
                )
        self.pruner.freeze_grads_()  # before Lightning clips gradients, so the clip norm only sees live weights

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.pruner.freeze_weights_()

    # ================================================================ epoch rounds
    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A checkpoint callback saving at the end-of-epoch validation runs right after this hook
        # (Lightning orders checkpoint callbacks last): prune first so that checkpoint has the round.
        if (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            and (point := self._trigger.due_after_epoch(trainer)) is not None
        ):
            self._round(trainer, pl_module, point)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (point := self._trigger.due_after_epoch(trainer)) is not None:
            self._round(trainer, pl_module, point)

    # ================================================================ the round
    def _round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, point: int, epoch: int | None = None) -> None:
        calib = Calibration(
            pl_module,
            self.loss_fn,
            training_step=pl_module.automatic_optimization,
            forward_context=trainer.precision_plugin.forward_context,
            progress=trainer_progress(trainer, self.verbose >= 1),
        )
        if calib.source is None:
            self._warn_once("loss", "manual optimization without `loss_fn`: actual loss increase is not measured")
        window, self._window = self._window, None
        batches = list(window.batches) if window is not None else []
        try:
            record = run_round(
                self.pruner,
                calib,
                batches,
                self.schedule.sparsity_at(point),
                window=window.capture if window is not None else None,
                comm=StrategyCollectives(trainer.strategy),
                optimizers=trainer.optimizers,
                trigger=self.schedule.unit,
                skipped=window.skipped if window is not None else 0,
                point=point,
                epoch=self._trigger.record_epoch(trainer, point, late=False) if epoch is None else epoch,
                global_step=trainer.global_step,
                monitor=_scalars(trainer.callback_metrics),
                source=f"the capture window (the last num_batches={self.window_length} training batches before the "
                "round)",
                solver_budget=self._trigger.solver_budget(trainer, batches),
                should_stop=lambda: trainer.received_sigterm,
            )
        except RoundInterrupted as stop:
            # weights restored, masks unchanged: the round's window (its statistics, already summed over
            # ranks, and batches) stays, so a checkpoint saved on this exception resumes the round exactly
            self._window = window
            raise SIGTERMException(str(stop)) from stop
        log_round(trainer, record, self.history)
        if self.verbose >= 1:
            console(trainer, round_summary(record))
        if self.verbose >= 2:
            console(trainer, self.layer_table())

    # ================================================================ fit end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reached = not self.pruner.removes_something(self.target)
        log_metrics(trainer, {"prune/target_reached": float(reached)})
        if not reached:
            self._warn_once(
                "missed",
                f"{type(self).__name__} ended the fit at sparsity {self.sparsity:.4f}, short of target={self.target}: "
                f"{len(self.history)} of its {len(self.schedule.points)} scheduled rounds ran (EarlyStopping, "
                "max_steps/max_time or an interrupted fit end training before the schedule does)",
            )
        if self.verbose >= 1 and self.history:
            console(trainer, self.layer_table(), training=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_step_hooks()
        if self._window is not None:
            self._window.discard()
        self._window, self._restored_window = None, None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit fails: an open window's hooks (and eager mode for compiled
        # code) must not outlive the failed fit. Its statistics and batches stay until the next fit, so
        # a checkpoint saved on the exception (checkpoint callbacks run after this one) carries them.
        self._remove_step_hooks()
        if self._window is not None:
            self._window.suspend()

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def loss_scaling(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, float | None]:
    """How this step's loss was scaled before backward: Lightning's division by
    ``accumulate_grad_batches`` (automatic optimization only) and the AMP scaler's scale (or ``None``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
    return (trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1), scale


def _scalars(metrics: Any) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (Tensor, float)) and torch.as_tensor(v).numel() == 1
    }
