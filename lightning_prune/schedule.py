"""When rounds fire and how sparse the model is after each one.

Rounds fire at the end of epochs ``start_epoch, start_epoch + every_n_epochs, ...`` up to
``end_epoch`` (inclusive). Sparsity is always *cumulative*: the fraction of all selected weights
that are zero after the round, never a fraction of the remaining ones, so nothing compounds.

With ``n`` rounds, round ``k`` (0-based) reaches, for ``p = (k + 1) / n``:

* ``"cubic"`` (Zhu & Gupta 2017 with initial sparsity 0): ``target * (1 - (1 - p) ** 3)``;
* ``"linear"``: ``target * p``;
* ``"one_shot"``: one round at ``start_epoch`` to ``target``;
* a callable ``epoch -> sparsity``: its values at the round epochs, which must be
  non-decreasing, in ``[0, 1)`` and end exactly at ``target``.

Default ``end_epoch`` rule: rounds occupy the first half (rounded up) of the epochs from
``start_epoch`` to ``max_epochs``, so the second half is left for fine-tuning. For
``max_epochs=10``: rounds after epochs 0-4, fine-tuning in epochs 5-9.
"""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cubic", "linear", "one_shot")

ScheduleArg = str | Callable[[int], float]


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def check_fraction(name: str, value: object, *, upper_inclusive: bool = False) -> float:
    """Validate a fraction in [0, 1) (or [0, 1]) and name the argument if it is not."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"`{name}` must be a number in {interval}, got {value!r}")
    return float(value)


class SparsitySchedule:
    """Round epochs and the cumulative sparsity each round reaches."""

    def __init__(
        self,
        target: float,
        schedule: ScheduleArg = "cubic",
        start_epoch: int = 0,
        end_epoch: int | None = None,
        every_n_epochs: int = 1,
    ) -> None:
        self.target = check_fraction("target", target)
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES} or a callable epoch -> sparsity, got {schedule!r}")
        self.schedule = schedule
        self.start_epoch = _check_int("start_epoch", start_epoch, 0)
        self.every_n_epochs = _check_int("every_n_epochs", every_n_epochs, 1)
        if end_epoch is not None:
            _check_int("end_epoch", end_epoch, 0)
            if end_epoch < start_epoch:
                raise ValueError(f"`end_epoch` ({end_epoch}) must be >= `start_epoch` ({start_epoch})")
        self.end_epoch = end_epoch
        self._rounds: list[int] | None = None
        self._values: dict[int, float] = {}
        if end_epoch is not None or schedule == "one_shot":
            self._resolve(end_epoch if end_epoch is not None else start_epoch)

    # ------------------------------------------------------------------ resolution
    def resolve(self, max_epochs: int | None) -> None:
        """Fix the round epochs once the trainer's ``max_epochs`` is known (idempotent)."""
        if self._rounds is not None:
            return
        if max_epochs is None or max_epochs < 0:
            raise ValueError(
                "`end_epoch` is required when the Trainer has no `max_epochs` "
                f"(got max_epochs={max_epochs!r}); pass end_epoch=... to the pruning callback"
            )
        if self.start_epoch >= max_epochs:
            raise ValueError(
                f"`start_epoch` ({self.start_epoch}) must be < Trainer(max_epochs={max_epochs}), "
                "otherwise no pruning round would ever fire"
            )
        remaining = max_epochs - self.start_epoch
        self._resolve(self.start_epoch + math.ceil(remaining / 2) - 1)

    def _resolve(self, end: int) -> None:
        if self.schedule == "one_shot":
            rounds = [self.start_epoch]
        else:
            rounds = list(range(self.start_epoch, end + 1, self.every_n_epochs))
        n = len(rounds)
        values = {}
        for k, epoch in enumerate(rounds):
            p = (k + 1) / n
            if callable(self.schedule):
                values[epoch] = self._call(epoch)
            elif self.schedule == "cubic":
                values[epoch] = self.target * (1.0 - (1.0 - p) ** 3)
            elif self.schedule == "linear":
                values[epoch] = self.target * p
            else:
                values[epoch] = self.target
        self._check_values(values)
        self._rounds, self._values = rounds, values

    def _call(self, epoch: int) -> float:
        value = self.schedule(epoch)  # type: ignore[operator]
        try:
            return check_fraction(f"schedule({epoch})", value)
        except ValueError as err:
            raise ValueError(f"`schedule` callable returned an invalid sparsity: {err}") from None

    def _check_values(self, values: dict[int, float]) -> None:
        prev_epoch, prev = None, 0.0
        for epoch, value in values.items():
            if value < prev - 1e-12:
                raise ValueError(
                    f"`schedule` must be non-decreasing: schedule({epoch})={value} < schedule({prev_epoch})={prev}"
                )
            prev_epoch, prev = epoch, value
        last_epoch = next(reversed(values))
        if abs(values[last_epoch] - self.target) > 1e-9:
            raise ValueError(
                f"`schedule` must reach `target` at the last round: schedule({last_epoch})="
                f"{values[last_epoch]} but target={self.target}"
            )

    # ------------------------------------------------------------------ queries
    @property
    def resolved(self) -> bool:
        return self._rounds is not None

    @property
    def round_epochs(self) -> list[int]:
        if self._rounds is None:
            raise RuntimeError("schedule not resolved yet: call resolve(max_epochs) first")
        return list(self._rounds)

    def is_round(self, epoch: int) -> bool:
        return epoch in self._values

    def sparsity_at(self, epoch: int) -> float:
        """Cumulative sparsity reached by the round at ``epoch``."""
        if epoch not in self._values:
            raise KeyError(f"no pruning round at epoch {epoch}; rounds: {self._rounds}")
        return self._values[epoch]

    def __repr__(self) -> str:
        return (
            f"SparsitySchedule(target={self.target}, schedule={self.schedule!r}, rounds={self._rounds}, "
            f"sparsities={[round(v, 4) for v in self._values.values()]})"
        )
