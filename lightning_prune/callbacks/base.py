"""The Lightning adapter: a :class:`~lightning_prune.engine.pruner.Pruner` driven by ``Trainer.fit``'s hooks.

Everything a round computes lives in the Lightning-free core (:func:`lightning_prune.engine.round.run_round`).
This class only translates the training loop into it:

* when a round is due (end of a round epoch, or right after ``global_step`` reaches a round
  step) and which training batches form its capture window (the last ``num_batches`` before it);
* feeding each backward pass of the window to the criterion's estimator, with what the trainer
  knows of the loss's scaling (gradient accumulation, AMP loss scale);
* freezing pruned weights around every optimizer step;
* the strategy's collectives, logger metrics, console output, ``state_key`` and checkpoints.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from typing_extensions import override

from lightning_prune.callbacks.parallel import StrategyCollectives, check_strategy
from lightning_prune.callbacks.reporting import console, log_metrics, log_round, trainer_progress
from lightning_prune.criteria.base import Criterion
from lightning_prune.engine.calibration import Calibration, RoundInterrupted, batch_size
from lightning_prune.engine.pruner import Pruner, is_pruning_state, pruner_parameters
from lightning_prune.engine.round import run_round
from lightning_prune.engine.schedule import check_options
from lightning_prune.engine.summary import round_summary
from lightning_prune.stats.capture import compiled_parts
from lightning_prune.stats.estimators import Estimator
from lightning_prune.stats.window import CaptureWindow


class PruningCallback(Callback):
    """Base class of :class:`MagnitudePruning`, :class:`OBDPruning` and :class:`OBSPruning`: a Lightning
    callback that drives the :class:`~lightning_prune.engine.pruner.Pruner` it wraps (:attr:`pruner`).

    See :class:`~lightning_prune.engine.pruner.Pruner` for the arguments. The pruner's state and methods read
    through the callback (``callback.history``, ``callback.masks``, ``callback.sparsity``), and the
    callback can be passed to ``prune()`` as the pruner itself. Each instance checkpoints under its own
    :attr:`state_key` (its class and its target selection), so several pruners on disjoint parameter
    groups checkpoint and resume independently; overlapping ones are refused at fit start.
    """

    def __init__(self, criterion: Criterion, target: float, **options: Any) -> None:
        check_options(type(self).__name__, options, pruner_parameters())
        self.pruner = Pruner(criterion, target, **options)
        self.pruner.label = type(self).__name__
        self._window: CaptureWindow | None = None
        self._collecting = False  # inside a capture window (batches kept, hooks on if the criterion has any)
        self._nonfinite_step = False  # this batch's step was left out of the statistics
        self._skipped_batches = 0  # window batches left out for a non-finite loss (criteria without hooks)
        self._batches: deque[Any] = deque()
        self._window_point: int | None = None  # the round the open window belongs to
        self._window_comm: StrategyCollectives | None = None  # the open window's ranks (for its checkpoint)
        self._restored_window: dict[str, Any] | None = None  # a checkpoint's open window, continued at train start
        self._step_hooks: list[Any] = []
        self._warned: set[str] = set()
        self._gradients_checked = True

    def __getattr__(self, name: str) -> Any:
        """The wrapped pruner's attributes (read-only through the callback: its state changes only by its
        own methods, which the callback's hooks call)."""
        if name.startswith("__") or "pruner" not in self.__dict__:  # copy/pickle protocol, or mid-construction
            raise AttributeError(name)
        return getattr(self.__dict__["pruner"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        """An attribute of the wrapped pruner is set there (``callback.verbose = 0``; read-only state such as
        ``masks`` refuses), so the callback never shadows it with a copy of its own."""
        pruner = self.__dict__.get("pruner")
        if pruner is not None and name not in self.__dict__ and hasattr(pruner, name):
            setattr(pruner, name, value)
        else:
            object.__setattr__(self, name, value)

    @property
    @override
    def state_key(self) -> str:
        """The class name, plus the target selection when it is not the default (as ``ModelCheckpoint``)."""
        selection = self.selection
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
        self.pruner.bind(pl_module)
        self._check_siblings(trainer)
        # a pruner already at its target (prune() then fit, a finished schedule) has no rounds left: it
        # only keeps its masks frozen, and needs no trigger that fits this Trainer
        if not self.schedule.resolved and self.removes_something(self.target):
            epochs = self.schedule.unit == "epoch"
            self.schedule.resolve(trainer.max_epochs if epochs else trainer.estimated_stepping_batches)
        if not pl_module.automatic_optimization and self.loss_fn is None and self.criterion.recalibrates(self.targets):
            raise ValueError(
                f"{type(self).__name__} re-runs the loss on stored batches inside a round, and training_step cannot "
                "be borrowed under manual optimization: pass loss_fn=lambda module, batch: ... (the mean loss)"
            )
        self._check_compiled(pl_module)
        self._step_hooks = [opt.register_step_post_hook(self._after_optimizer_step) for opt in trainer.optimizers]
        self._check_schedule_fits(trainer)
        self._gradients_checked = not self.criterion.needs_gradients

    def _check_compiled(self, pl_module: pl.LightningModule) -> None:
        """Refuse what ``torch.compile`` cannot run: the capture hooks without ``set_stance`` (torch < 2.6),
        and a double backward (Hutchinson). (With ``set_stance`` the capture runs eagerly: see
        :mod:`lightning_prune.stats.capture`.)"""
        criterion = self.pruner.criterion
        if not (criterion.uses_hooks or criterion.differentiates_twice) or not (parts := compiled_parts(pl_module)):
            return
        who = f"{type(self).__name__} ({criterion.describe()})"
        if criterion.differentiates_twice:
            raise ValueError(
                f"{who} differentiates the loss twice, which torch.compile'd code does not support, and {parts[:3]} "
                "are compiled: use a first-order curvature (OBD: curvature='fisher', 'kfac' or 'ekfac'), or compile "
                "the model after pruning"
            )
        if getattr(torch.compiler, "set_stance", None) is None:
            raise RuntimeError(
                f"{who} captures layer statistics with module hooks, which torch.compile'd code skips, and "
                f"torch {torch.__version__} has no torch.compiler.set_stance to run the capture eagerly; {parts[:3]} "
                "are compiled. Use torch >= 2.6, compile the model after pruning, or use MagnitudePruning"
            )

    def _check_schedule_fits(self, trainer: pl.Trainer) -> None:
        """Warn when the run ends before the schedule's last round (the target would be missed)."""
        end, unit = self.schedule.end, self.schedule.unit
        if end is None or self.removes_something(self.target) is False:
            return
        if unit == "epoch":
            limit = f"Trainer(max_epochs={trainer.max_epochs})"
            misses = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= end
            batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
            if not misses and trainer.max_steps > 0 and math.isfinite(batches):
                limit = f"Trainer(max_steps={trainer.max_steps})"
                misses = trainer.max_steps < (end + 1) * math.ceil(batches / accumulate)
        else:
            total = trainer.estimated_stepping_batches
            limit, misses = f"the run's {total} optimizer steps", math.isfinite(total) and total < end
        if misses:
            self._warn_once(
                "end",
                f"{type(self).__name__}'s last round is at {unit} {end}, but {limit} ends the run before it: the model "
                f"will not reach target={self.target}. Lower `{self.schedule.when.arg('end')}` or lengthen the run",
            )

    def _check_siblings(self, trainer: pl.Trainer) -> None:
        """Refuse a second pruner on the same weights, or under the same checkpoint key."""
        mine = {id(p): n for n, p in self._params.items()}
        for other in trainer.callbacks:  # type: ignore[attr-defined]
            if other is self:
                return  # only the pruners before this one have bound in this fit
            if not isinstance(other, PruningCallback) or other._targets is None:
                continue
            shared = [mine[id(t.param)] for t in other._targets if id(t.param) in mine]
            if shared:
                raise ValueError(
                    f"{type(other).__name__} and {type(self).__name__} both prune {shared[:5]}"
                    f"{' ...' if len(shared) > 5 else ''}: a weight can have only one pruner. Give them disjoint "
                    "include/exclude patterns or parameters"
                )
            if other.state_key == self.state_key:
                raise ValueError(
                    f"two pruners share the checkpoint key {self.state_key!r}; give them different include/exclude "
                    "patterns or parameters"
                )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to resume silently without masks when the checkpoint's pruning state is another pruner's."""
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            return
        claimed = {cb.state_key for cb in trainer.callbacks}  # type: ignore[attr-defined]
        unclaimed = {k: v for k, v in states.items() if k not in claimed and is_pruning_state(v)}
        if unclaimed:
            writers = {k: v.get("pruner", k) for k, v in unclaimed.items()}
            raise ValueError(
                f"the checkpoint holds the pruning state of {writers}, and none for this run's {self.state_key!r}: "
                "resume with the pruner that wrote it (same class and include/exclude/parameters), or load only "
                "the model weights (model.load_state_dict(torch.load(path)['state_dict']))"
            )

    # ================================================================ the capture window
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        point = None if self._collecting else self._upcoming_round(trainer)
        if point is not None and self._window_opens(trainer, point, batch_idx):
            self._collecting, self._skipped_batches, self._window_point = True, 0, point
            self._window_comm = StrategyCollectives(trainer.strategy)
            self._batches = deque(maxlen=self.window_length)
            estimator = self._window_estimator(trainer)
            if estimator is not None:
                self._window = CaptureWindow(estimator, self.targets, self.criterion.loss_reduction)
                self._window.open()
        if self._window is not None:
            self._window.begin_batch()  # its loss calls say how many terms (tokens) the loss averages

    def _window_estimator(self, trainer: pl.Trainer) -> Estimator | None:
        """A fresh estimator for a window that captures statistics; ``None`` when the round computes them."""
        comm = StrategyCollectives(trainer.strategy)
        estimator = self.criterion.make_estimator(self.targets, comm, self.window_length)
        return estimator if self.round_strategy.captures_in_window(self.criterion) else None  # else: at round time

    def _upcoming_round(self, trainer: pl.Trainer, epoch: int | None = None) -> int | None:
        """The round the next capture window belongs to: this epoch's (or ``epoch``'s), or the next step round
        (one that prunes)."""
        if self.schedule.unit == "epoch":
            point = self.schedule.due(trainer.current_epoch if epoch is None else epoch, self._last_point)
            return point if point is not None and self.removes_something(self.schedule.sparsity_at(point)) else None
        return self.next_round()

    def _window_opens(self, trainer: pl.Trainer, point: int, batch_idx: int) -> bool:
        """Whether this batch is one of the last ``window_length`` before the round at ``point``."""
        if self.schedule.unit == "epoch":
            return batch_idx >= self._epoch_window_start(trainer)
        return self._batches_until(trainer, point, batch_idx) <= self.window_length

    def _epoch_window_start(self, trainer: pl.Trainer) -> int:
        n, length = trainer.num_training_batches, self.window_length
        if not math.isfinite(n):
            self._warn_once(
                "inf",
                "the training dataloader has no length, so the curvature window covers the whole round epoch "
                "instead of its last `num_batches` batches; use step triggers (every_n_steps=...) for exact windows",
            )
            return 0
        if n < length and "short" not in self._warned:  # harmless: said once, as information
            self._warned.add("short")
            rank_zero_info(f"[lightning-prune] the epoch has {n} training batches: the round uses all of them")
        return max(0, int(n) - length)

    def _batches_until(self, trainer: pl.Trainer, point: int, batch_idx: int) -> int:
        """Training batches from this one (included) until ``global_step`` reaches ``point``.

        Follows Lightning's stepping rule: an optimizer step after every ``accumulate_grad_batches``
        batches of an epoch and after its last batch. Counting stops past the window length.
        """
        steps, count, i = trainer.global_step, 0, batch_idx
        accumulate = trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
        n = trainer.num_training_batches
        while steps < point and count <= self.window_length:
            count += 1
            if (i + 1) % accumulate == 0 or i + 1 == n:
                steps += 1
            i = 0 if i + 1 == n else i + 1
        return count

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self._window is not None:
            self._window.before_backward(loss)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._window is not None:
            accumulate, scale = loss_scaling(trainer, pl_module)
            self._nonfinite_step |= not self._window.after_backward(accumulate=accumulate, loss_scale=scale)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._collecting:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, Tensor) and not bool(torch.isfinite(loss).all()):
                self._nonfinite_step = True  # a NaN/inf loss: neither its statistics nor the batch are kept
                if self._window is None:
                    self._skipped_batches += 1
            if not self._nonfinite_step:
                self._batches.append(batch)
            if self._window is not None:
                self._window.end_batch()
            self._nonfinite_step = False
        if self.schedule.unit == "step" and (point := self.due(trainer.global_step)) is not None:
            self._round(trainer, pl_module, point)

    # ================================================================ checkpoints inside a capture window
    @override
    def state_dict(self) -> dict[str, Any]:
        """:meth:`Pruner.state_dict`, plus the open capture window when the checkpoint is taken inside one.

        Lightning calls this on every rank and saves rank 0's, so the window's partial sums are summed
        over the ranks into it and every rank's kept batches are gathered into it (collectives that
        every rank joins, as Lightning's checkpointing does).
        """
        state = self.pruner.state_dict()
        if self._collecting:
            state["window"] = self._window_state()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        window = state.pop("window", None) if isinstance(state, dict) else None
        self.pruner.load_state_dict(state)
        self._restored_window = window  # continued at train start (dropped at teardown if no training follows)

    def _window_state(self) -> dict[str, Any]:
        """The open window: its round, statistics (summed over ranks), skipped counts and every rank's kept
        batches (on the CPU, oldest first)."""
        comm = self._window_comm
        assert comm is not None  # set whenever a window opens
        stats = self._window.estimator.state_dict(summed=True) if self._window is not None else None
        skipped = torch.tensor([float(self._skipped_batches)], dtype=torch.float64, device=self.targets[0].param.device)
        comm.all_reduce_sum_([skipped])
        mine = [move_data_to_device(b, torch.device("cpu")) for b in self._batches]
        if mine and (kind := _not_weights_only(mine)):
            self._warn_once(
                "weights_only",
                f"{type(self).__name__} checkpoints the open capture window with its kept batches, which hold a "
                f"{kind}: torch.load(weights_only=True), what fit(ckpt_path=...) uses by default, refuses it. Resume "
                f"with trainer.fit(..., weights_only=False) (trusted checkpoints only) or register the type with "
                "torch.serialization.add_safe_globals",
            )
        return {
            "version": WINDOW_STATE_VERSION,
            "unit": self.schedule.unit,
            "point": self._window_point,
            "window_length": self.window_length,
            "criterion": self.criterion.name,
            "world_size": comm.world_size,
            "statistics": stats,
            "skipped": int(skipped.item()),
            "batches": comm.all_gather_object(mine),  # one list per rank
        }

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._restored_window = self._restored_window, None
        if state is not None:
            self._resume_window(trainer, pl_module, state)

    def _resume_window(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]) -> None:
        """Continue a checkpoint's open window where it stopped; a window this run cannot continue exactly
        (another round, layout or world size) is dropped with the reason, never mixed into a round."""
        rank, estimator, batches, why = trainer.global_rank, None, [], None
        try:
            why = self._window_mismatch(trainer, state)
            if why is None:
                estimator = self._window_estimator(trainer)
                if (estimator is None) != (state["statistics"] is None):
                    when = "at round time" if estimator is None else "in the window"
                    why = f"this run's criterion computes its statistics {when}"
                elif estimator is not None:
                    estimator.load_state_dict(state["statistics"], sums=rank == 0)  # rank 0 holds the ranks' sums
                batches = list(state["batches"][rank])
        except ValueError as err:  # the estimator's refusal: another layout
            why = str(err)
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            why = f"it cannot be read ({type(err).__name__}: {err}; corrupted or hand-edited)"
        if why is not None:
            where = f"{state.get('unit')} {state.get('point')}" if isinstance(state, dict) else "?"
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint was taken inside the capture window of the round at {where}, "
                f"and {why}; that window's statistics and kept batches are dropped, so its round uses only the "
                "batches trained after the resume"
            )
            return
        self._collecting, self._window_point = True, int(state["point"])
        self._window_comm = StrategyCollectives(trainer.strategy)
        self._skipped_batches = int(state["skipped"]) if rank == 0 else 0  # summed over ranks, like the statistics
        device = trainer.strategy.root_device
        self._batches = deque((move_data_to_device(b, device) for b in batches), maxlen=self.window_length)
        if estimator is not None:
            self._window = CaptureWindow(estimator, self.targets, self.criterion.loss_reduction)
            self._window.open()
        if self._late_round(trainer, self._window_point):
            epoch = self._window_point if self.schedule.unit == "epoch" else None  # the record: its epoch
            self._round(trainer, pl_module, self._window_point, epoch=epoch)

    def _late_round(self, trainer: pl.Trainer, point: int) -> bool:
        """Whether the round at ``point`` is due already and has not run: a step round whose step the
        checkpoint had reached (a round interrupted by SIGTERM, saved on the exception), or the round of
        the epoch before this one (Lightning resumes a checkpoint taken after an epoch's last batch at the
        next epoch, without that epoch's end hooks). It runs at train start, before any training."""
        if self.schedule.unit == "step":
            return point <= trainer.global_step and self.next_round() == point
        last = trainer.current_epoch - 1
        return point == last and self._upcoming_round(trainer, epoch=last) == point

    def _window_mismatch(self, trainer: pl.Trainer, state: dict[str, Any]) -> str | None:
        """Why this run cannot continue the checkpointed window, or ``None``."""
        if state["version"] != WINDOW_STATE_VERSION:
            return f"its format (version {state['version']!r}) is not this version's ({WINDOW_STATE_VERSION})"
        upcoming = self._upcoming_round(trainer)
        if state["unit"] != self.schedule.unit or (
            state["point"] != upcoming and not self._late_round(trainer, state["point"])
        ):
            return f"this run's next round is at {self.schedule.unit} {upcoming} (its schedule differs)"
        if state["window_length"] != self.window_length:
            spans = f"{state['window_length']} batches and this run's windows {self.window_length}"
            return f"it spans {spans} (num_batches)"
        if state["criterion"] != self.criterion.name:
            return f"it was collected for criterion {state['criterion']!r}, this run prunes by {self.criterion.name!r}"
        if state["world_size"] != trainer.world_size:
            return (
                f"it was taken on {state['world_size']} ranks and this run has {trainer.world_size} (the kept batches "
                "and the statistics' shares belong to the ranks of that run)"
            )
        return None

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
            self.schedule.unit == "epoch"
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            and (point := self.due(trainer.current_epoch)) is not None
        ):
            self._round(trainer, pl_module, point)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "epoch" and (point := self.due(trainer.current_epoch)) is not None:
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
        window, batches = self._window, list(self._batches)
        self._window, self._collecting, self._window_point = None, False, None
        self._batches.clear()
        try:
            record = self._run_round(trainer, pl_module, calib, window, batches, point, epoch)
        except RoundInterrupted as stop:
            # weights restored, masks unchanged: the round's window (its statistics, already summed over
            # ranks, and batches) stays, so a checkpoint saved on this exception resumes the round exactly
            self._window, self._collecting, self._window_point = window, True, point
            self._batches = deque(batches, maxlen=self.window_length)
            raise SIGTERMException(str(stop)) from stop
        log_round(trainer, record, self.history)
        if self.verbose >= 1:
            console(trainer, round_summary(record))
        if self.verbose >= 2:
            console(trainer, self.layer_table())

    def _run_round(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        calib: Calibration,
        window: CaptureWindow | None,
        batches: list[Any],
        point: int,
        epoch: int | None,
    ) -> dict[str, Any]:
        return run_round(
            self.pruner,
            calib,
            batches,
            self.schedule.sparsity_at(point),
            window=window,
            comm=StrategyCollectives(trainer.strategy),
            optimizers=trainer.optimizers,
            trigger=self.schedule.unit,
            skipped=self._skipped_batches,
            point=point,
            epoch=trainer.current_epoch if epoch is None else epoch,
            global_step=trainer.global_step,
            monitor=_scalars(trainer.callback_metrics),
            source=f"the capture window (the last num_batches={self.window_length} training batches before the round)",
            solver_budget=self._solver_budget(trainer, batches),
            should_stop=lambda: trainer.received_sigterm,
        )

    def _solver_budget(self, trainer: pl.Trainer, batches: list[Any]) -> float | None:
        """A round's share of training: a quarter of the multiply-adds between two rounds.

        Training a layer costs about 3 multiply-adds per weight per sample (forward and backward),
        so ``ROUND_SHARE * 3 * weights * samples`` element updates keep OBS's automatic solver
        choice deterministic and a round a small part of the training around it. A schedule of one
        round has no training between rounds: it keeps the per-layer budget, as ``prune()`` does.
        """
        w = self.schedule.when
        if len(self.schedule.points) < 2:
            return None
        per_interval = w.every * (
            trainer.num_training_batches if w.unit == "epoch" else trainer.accumulate_grad_batches
        )
        size = batch_size(batches[-1]) if batches else None
        if size is None or not math.isfinite(per_interval):
            return None
        samples = size * trainer.world_size  # the global batch: N ranks choose as one process with N times the batch
        return ROUND_SHARE * 3 * sum(t.param.numel() for t in self.targets) * samples * per_interval

    # ================================================================ fit end
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reached = not self.removes_something(self.target)
        log_metrics(trainer, {"prune/target_reached": float(reached)})
        if not reached:
            self._warn_once(
                "missed",
                f"{type(self).__name__} ended the fit at sparsity {self.sparsity:.4f}, short of target={self.target}: "
                f"{len(self._history)} of its {len(self.schedule.points)} scheduled rounds ran (EarlyStopping, "
                "max_steps/max_time or an interrupted fit end training before the schedule does)",
            )
        if self.verbose >= 1 and self._history:
            console(trainer, self.layer_table(), training=False)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        if self._window is not None:
            self._window.discard()
            self._window = None
        self._collecting, self._window_point, self._restored_window = False, None, None
        self._batches.clear()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips teardown when fit fails: an open window's hooks (and eager mode for compiled
        # code) must not outlive the failed fit. Its statistics and batches stay until the next fit, so
        # a checkpoint saved on the exception (checkpoint callbacks run after this one) carries them.
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks.clear()
        if self._window is not None:
            self._window.suspend()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


ROUND_SHARE = 0.25  # of the training work between two rounds that OBS's solver="auto" may spend
WINDOW_STATE_VERSION = 1  # the format of a checkpointed open window (PruningCallback.state_dict()["window"])


def loss_scaling(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, float | None]:
    """How this step's loss was scaled before backward: Lightning's division by
    ``accumulate_grad_batches`` (automatic optimization only) and the AMP scaler's scale (or ``None``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else None
    return (trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1), scale


_PLAIN = (Tensor, int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device, torch.Size)


def _not_weights_only(obj: Any) -> str | None:
    """The first type in ``obj`` that ``torch.load(weights_only=True)`` does not load (a named tuple, a dict
    subclass such as transformers' ``BatchEncoding``), or ``None``."""
    if isinstance(obj, _PLAIN):
        return None
    if type(obj) in (dict, OrderedDict):
        items = [*obj.keys(), *obj.values()]
    elif type(obj) in (list, tuple, set):
        items = list(obj)
    else:
        return f"{type(obj).__module__}.{type(obj).__qualname__}"
    return next((kind for item in items if (kind := _not_weights_only(item))), None)


def _scalars(metrics: Any) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items() if isinstance(v, (Tensor, float)) and torch.as_tensor(v).numel() == 1
    }
