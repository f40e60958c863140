"""When a pruner's rounds fire inside ``Trainer.fit``: one trigger per schedule unit, read from the Trainer.

A schedule (:class:`~lightning_prune.engine.schedule.Schedule`) counts rounds in epochs or in optimizer
steps. Everything that depends on which, the callback asks its trigger, so the unit is decided once:

* how the schedule resolves against this Trainer (``max_epochs``, or the run's optimizer steps);
* whether the run ends before the last round;
* which round the next capture window belongs to, and whether this batch opens it;
* when a round is due (after a training batch for steps, at the end of the epoch for epochs);
* whether a checkpoint's round is due already at train start (a late round), and the epoch its record names;
* a round's share of the training between two rounds (OBS's ``solver="auto"`` budget).

The Lightning-free arithmetic (the points, Lightning's stepping rule) lives in
:mod:`lightning_prune.engine.schedule`; this module only reads the Trainer's counters into it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_prune.engine.calibration import batch_size
from lightning_prune.engine.pruner import Pruner
from lightning_prune.engine.schedule import batches_until_step

ROUND_SHARE = 0.25  # of the training work between two rounds that OBS's solver="auto" may spend


class Trigger:
    """The rounds of ``pruner``'s schedule placed in a Trainer's loop (see the module docstring)."""

    unit: ClassVar[str]

    def __init__(self, pruner: Pruner) -> None:
        self.pruner = pruner
        self._said: set[str] = set()  # notes given once per pruner

    def horizon(self, trainer: pl.Trainer) -> float | None:
        """The run's length in this unit, which fixes the schedule's default end."""
        raise NotImplementedError

    def resolve(self, trainer: pl.Trainer) -> None:
        self.pruner.schedule.resolve(self.horizon(trainer))

    def run_end(self, trainer: pl.Trainer, end: int) -> str | None:
        """The Trainer limit that ends the run before the round at ``end``, or ``None``."""
        raise NotImplementedError

    def upcoming(self, trainer: pl.Trainer, epoch: int | None = None) -> int | None:
        """The round the next capture window belongs to (one that prunes), or ``None``."""
        raise NotImplementedError

    def window_opens(self, trainer: pl.Trainer, point: int, batch_idx: int) -> bool:
        """Whether this batch is one of the last ``window_length`` before the round at ``point``."""
        raise NotImplementedError

    def due_after_batch(self, trainer: pl.Trainer) -> int | None:
        """The round to run after this training batch, or ``None``."""
        return None

    def due_after_epoch(self, trainer: pl.Trainer) -> int | None:
        """The round to run at the end of this epoch, or ``None``."""
        return None

    def late(self, trainer: pl.Trainer, point: int) -> bool:
        """Whether the round at ``point`` is due already at train start and has not run (a resumed checkpoint's)."""
        raise NotImplementedError

    def record_epoch(self, trainer: pl.Trainer, point: int, late: bool) -> int:
        """The epoch a round's record names."""
        return trainer.current_epoch

    def batches_between_rounds(self, trainer: pl.Trainer) -> float:
        """Training batches between two rounds (``inf`` when unknown)."""
        raise NotImplementedError

    def solver_budget(self, trainer: pl.Trainer, batches: list[Any]) -> float | None:
        """A round's share of training: a quarter of the multiply-adds between two rounds.

        Training a layer costs about 3 multiply-adds per weight per sample (forward and backward),
        so ``ROUND_SHARE * 3 * weights * samples`` element updates keep OBS's automatic solver
        choice deterministic and a round a small part of the training around it. A schedule of one
        round has no training between rounds: it keeps the per-layer budget, as ``prune()`` does.
        """
        if len(self.pruner.schedule.points) < 2:
            return None
        per_interval = self.batches_between_rounds(trainer)
        size = batch_size(batches[-1]) if batches else None
        if size is None or not math.isfinite(per_interval):
            return None
        samples = size * trainer.world_size  # the global batch: N ranks choose as one process with N times the batch
        return ROUND_SHARE * 3 * sum(t.param.numel() for t in self.pruner.targets) * samples * per_interval


class EpochTrigger(Trigger):
    """Rounds at the end of round epochs; the window is the epoch's last ``window_length`` batches."""

    unit = "epoch"

    def horizon(self, trainer: pl.Trainer) -> float | None:
        return trainer.max_epochs

    def run_end(self, trainer: pl.Trainer, end: int) -> str | None:
        limit = f"Trainer(max_epochs={trainer.max_epochs})"
        misses = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= end
        batches, accumulate = trainer.num_training_batches, trainer.accumulate_grad_batches
        if not misses and trainer.max_steps > 0 and math.isfinite(batches):
            limit = f"Trainer(max_steps={trainer.max_steps})"
            misses = trainer.max_steps < (end + 1) * math.ceil(batches / accumulate)
        return limit if misses else None

    def upcoming(self, trainer: pl.Trainer, epoch: int | None = None) -> int | None:
        schedule = self.pruner.schedule
        point = schedule.due(trainer.current_epoch if epoch is None else epoch, self.pruner.last_point)
        return point if point is not None and self.pruner.removes_something(schedule.sparsity_at(point)) else None

    def window_opens(self, trainer: pl.Trainer, point: int, batch_idx: int) -> bool:
        n, length = trainer.num_training_batches, self.pruner.window_length
        if not math.isfinite(n):
            if "inf" not in self._said:
                self._said.add("inf")
                rank_zero_warn(
                    "the training dataloader has no length, so the curvature window covers the whole round epoch "
                    "instead of its last `num_batches` batches; use step triggers (every_n_steps=...) for exact windows"
                )
            return batch_idx >= 0
        if n < length and "short" not in self._said:  # harmless: said once, as information
            self._said.add("short")
            rank_zero_info(f"[lightning-prune] the epoch has {n} training batches: the round uses all of them")
        return batch_idx >= max(0, int(n) - length)

    def due_after_epoch(self, trainer: pl.Trainer) -> int | None:
        return self.pruner.due(trainer.current_epoch)

    def late(self, trainer: pl.Trainer, point: int) -> bool:
        # Lightning resumes a checkpoint taken after an epoch's last batch at the next epoch, without that
        # epoch's end hooks: its round runs at train start
        last = trainer.current_epoch - 1
        return point == last and self.upcoming(trainer, epoch=last) == point

    def record_epoch(self, trainer: pl.Trainer, point: int, late: bool) -> int:
        return point if late else trainer.current_epoch

    def batches_between_rounds(self, trainer: pl.Trainer) -> float:
        return self.pruner.schedule.when.every * trainer.num_training_batches


class StepTrigger(Trigger):
    """Rounds right after ``global_step`` reaches a round step; the window is the batches before that step."""

    unit = "step"

    def horizon(self, trainer: pl.Trainer) -> float | None:
        return trainer.estimated_stepping_batches

    def run_end(self, trainer: pl.Trainer, end: int) -> str | None:
        total = trainer.estimated_stepping_batches
        return f"the run's {total} optimizer steps" if math.isfinite(total) and total < end else None

    def upcoming(self, trainer: pl.Trainer, epoch: int | None = None) -> int | None:
        return self.pruner.next_round()

    def window_opens(self, trainer: pl.Trainer, point: int, batch_idx: int) -> bool:
        length = self.pruner.window_length
        accumulate = trainer.accumulate_grad_batches if trainer.lightning_module.automatic_optimization else 1
        n = trainer.num_training_batches
        return batches_until_step(trainer.global_step, point, batch_idx, n, accumulate, length) <= length

    def due_after_batch(self, trainer: pl.Trainer) -> int | None:
        return self.pruner.due(trainer.global_step)

    def late(self, trainer: pl.Trainer, point: int) -> bool:
        # a round whose step the checkpoint had reached (interrupted by SIGTERM, saved on the exception)
        return point <= trainer.global_step and self.pruner.next_round() == point

    def batches_between_rounds(self, trainer: pl.Trainer) -> float:
        return self.pruner.schedule.when.every * trainer.accumulate_grad_batches


TRIGGERS: dict[str, type[Trigger]] = {t.unit: t for t in (EpochTrigger, StepTrigger)}


def trigger_for(pruner: Pruner) -> Trigger:
    """The trigger of ``pruner``'s schedule unit."""
    return TRIGGERS[pruner.schedule.unit](pruner)
