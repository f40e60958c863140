"""When rounds fire and how sparse the model is after each one.

Rounds are keyed by a *point*: an epoch (the round runs at the end of that epoch) or an optimizer
step (the round runs right after ``trainer.global_step`` reaches it). The user's trigger arguments
are normalised once, by :func:`triggers`, into a unit and ``start, end, every``:

* epochs: ``start_epoch`` (default 0), ``end_epoch``, ``every_n_epochs`` (default 1);
* steps: ``start_step`` (default ``every_n_steps``), ``end_step``, ``every_n_steps`` (required
  unless ``schedule="one_shot"``).

Mixing epoch and step arguments is an error. Rounds fire at ``start, start + every, ...`` up to
``end`` (inclusive). Sparsity is always *cumulative*: the fraction of all selected weights that are
zero after the round, never a fraction of the remaining ones, so nothing compounds.

With ``n`` rounds, round ``k`` (0-based) reaches, for ``p = (k + 1) / n``:

* ``"cubic"`` (Zhu & Gupta 2017 with initial sparsity 0): ``target * (1 - (1 - p) ** 3)``;
* ``"linear"``: ``target * p``;
* ``"one_shot"``: one round at ``start`` to ``target``;
* a callable ``point -> sparsity``: its values at the round points, which must be
  non-decreasing, in ``[0, 1)`` and end exactly at ``target``.

Default ``end`` rule, once the run length is known: rounds occupy the first half of the run from
``start``, so the second half is left for fine-tuning. Epochs: the first half (rounded up) of the
epochs from ``start_epoch`` to ``max_epochs`` (``max_epochs=10``: rounds after epochs 0-4,
fine-tuning in epochs 5-9). Steps: ``end_step = start_step + (total_steps - start_step) // 2``
(``max_steps=1000, every_n_steps=100``: rounds at steps 100-500, fine-tuning for 500 steps).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SCHEDULES = ("cubic", "linear", "one_shot")
UNITS = ("epoch", "step")

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


@dataclass(frozen=True)
class Triggers:
    """Normalised trigger arguments: ``unit`` is ``"epoch"`` or ``"step"``; ``end`` may be unknown."""

    unit: str
    start: int
    end: int | None
    every: int

    def arg(self, what: str) -> str:
        """The user-facing argument name, e.g. ``arg("start") == "start_step"``."""
        return f"every_n_{self.unit}s" if what == "every" else f"{what}_{self.unit}"


def _triggers(one_shot: bool, epoch_args: dict[str, int | None], step_args: dict[str, int | None]) -> Triggers:
    """Validate and normalise the epoch or step trigger arguments (see the module docstring)."""
    given_epoch = [k for k, v in epoch_args.items() if v is not None]
    given_step = [k for k, v in step_args.items() if v is not None]
    if given_epoch and given_step:
        raise ValueError(
            f"pass epoch triggers or step triggers, not both: got {given_epoch[0]}={epoch_args[given_epoch[0]]!r} "
            f"and {given_step[0]}={step_args[given_step[0]]!r}"
        )
    if not given_step:
        start_epoch, every_n = epoch_args["start_epoch"], epoch_args["every_n_epochs"]
        start = _check_int("start_epoch", 0 if start_epoch is None else start_epoch, 0)
        every = _check_int("every_n_epochs", 1 if every_n is None else every_n, 1)
        unit, end = "epoch", epoch_args["end_epoch"]
    else:
        every_n, start_step = step_args["every_n_steps"], step_args["start_step"]
        if every_n is not None:
            _check_int("every_n_steps", every_n, 1)
        elif not one_shot or start_step is None:
            raise ValueError(
                "step triggers need `every_n_steps` (rounds at start_step, start_step + every_n_steps, ... "
                f"end_step), or `start_step` with schedule='one_shot'; got {', '.join(given_step)}"
            )
        start = _check_int("start_step", every_n if start_step is None else start_step, 1)
        unit, end, every = "step", step_args["end_step"], every_n or 1
    t = Triggers(unit, start, end, every)
    if end is not None:
        _check_int(t.arg("end"), end, 0)
        if end < start:
            raise ValueError(f"`{t.arg('end')}` ({end}) must be >= `{t.arg('start')}` ({start})")
    return t


def schedule_parameters() -> list[inspect.Parameter]:
    """:class:`Schedule`'s arguments but ``target``, keyword-only: the trigger arguments that pruners,
    callbacks and presets accept and forward here (their signatures are built from this list)."""
    params = list(inspect.signature(Schedule.__init__, eval_str=True).parameters.values())[2:]  # not self, target
    return [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]


def forwarded(fn: Callable[..., Any], *sources: Sequence[inspect.Parameter]) -> Callable[..., Any]:
    """``fn`` (whose ``**kwargs`` forwards arguments) with a signature that lists them: its own
    parameters, then each of ``sources`` (keyword-only). LightningCLI (jsonargparse), ``inspect`` and
    IDEs see every argument typed, while each one is written in a single place."""
    signature = inspect.signature(fn, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in own}
    extra = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for src in sources for p in src if p.name not in names]
    fn.__signature__ = signature.replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
    return fn


def check_options(who: str, options: Mapping[str, Any], allowed: Sequence[inspect.Parameter]) -> None:
    """Refuse a keyword that no forwarded parameter takes, as Python would, naming ``who``."""
    names = {p.name for p in allowed}
    if unknown := [k for k in options if k not in names]:
        raise TypeError(f"{who}() got an unexpected keyword argument {unknown[0]!r}")


def batches_until_step(step: int, point: int, batch_idx: int, per_epoch: float, accumulate: int, limit: int) -> int:
    """Training batches from ``batch_idx`` (included) until the optimizer step count, ``step`` now, reaches
    ``point``: a step follows every ``accumulate`` batches of an epoch and its last batch (``per_epoch``
    batches, ``inf`` when unknown), as Lightning steps. Counting stops past ``limit`` (a capture window's
    length): what a step trigger needs to know whether this batch belongs to the window before its round."""
    count, i = 0, batch_idx
    while step < point and count <= limit:
        count += 1
        if (i + 1) % accumulate == 0 or i + 1 == per_epoch:
            step += 1
        i = 0 if i + 1 == per_epoch else i + 1
    return count


class Schedule:
    """Round points (epochs or steps) and the cumulative sparsity each round reaches.

    Its arguments are the trigger arguments of every pruner, callback and preset, written here only:
    :func:`schedule_parameters` gives them to the signatures that forward them (see the module
    docstring for their meaning and defaults).
    """

    def __init__(
        self,
        target: float,
        schedule: ScheduleArg = "cubic",
        start_epoch: int | None = None,
        end_epoch: int | None = None,
        every_n_epochs: int | None = None,
        start_step: int | None = None,
        end_step: int | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        self.target = check_fraction("target", target)
        if not callable(schedule) and schedule not in SCHEDULES:
            raise ValueError(f"`schedule` must be one of {SCHEDULES} or a callable point -> sparsity, got {schedule!r}")
        self.schedule = schedule
        self.when = _triggers(
            schedule == "one_shot",
            {"start_epoch": start_epoch, "end_epoch": end_epoch, "every_n_epochs": every_n_epochs},
            {"start_step": start_step, "end_step": end_step, "every_n_steps": every_n_steps},
        )
        self._points: list[int] | None = None
        self._values: dict[int, float] = {}
        if self.when.end is not None or schedule == "one_shot":
            self._resolve(self.when.end if self.when.end is not None else self.when.start)

    @property
    def unit(self) -> str:
        return self.when.unit

    # ------------------------------------------------------------------ resolution
    def resolve(self, horizon: float | None, setting: str | None = None) -> None:
        """Fix the round points once the run length is known (idempotent).

        ``horizon`` is ``max_epochs`` for epoch triggers and the run's total number of optimizer
        steps for step triggers; ``None``, a negative value or ``inf`` means unknown. ``setting``
        names where the horizon came from in error messages (default ``max_epochs``/``max_steps``).
        """
        if self._points is not None:
            return
        w = self.when
        setting = setting or ("max_epochs" if w.unit == "epoch" else "max_steps")
        if horizon is None or horizon < 0 or not math.isfinite(horizon):
            known = (
                "the Trainer has no `max_epochs`"
                if w.unit == "epoch"
                else "the run's length in optimizer steps is unknown (no `max_steps`, and no `max_epochs` with a "
                "dataloader of known length)"
            )
            hint = ", or step triggers (every_n_steps=...) for a run bounded by max_steps" if w.unit == "epoch" else ""
            raise ValueError(
                f"`{w.arg('end')}` is required when {known} (got {setting}={horizon!r}); "
                f"pass {w.arg('end')}=... to the pruner{hint}"
            )
        horizon = int(horizon)
        if w.start >= horizon:
            raise ValueError(
                f"`{w.arg('start')}` ({w.start}) must be < Trainer({setting}={horizon}), "
                "otherwise no pruning round would ever fire"
            )
        if w.unit == "epoch":
            self._resolve(w.start + math.ceil((horizon - w.start) / 2) - 1)
        else:
            self._resolve(w.start + (horizon - w.start) // 2)

    def _resolve(self, end: int) -> None:
        w = self.when
        points = [w.start] if self.schedule == "one_shot" else list(range(w.start, end + 1, w.every))
        n = len(points)
        values = {}
        for k, point in enumerate(points):
            p = (k + 1) / n
            if callable(self.schedule):
                values[point] = self._call(point)
            elif self.schedule == "cubic":
                values[point] = self.target * (1.0 - (1.0 - p) ** 3)
            elif self.schedule == "linear":
                values[point] = self.target * p
            else:
                values[point] = self.target
        self._check_values(values)
        self._points, self._values = points, values

    def _call(self, point: int) -> float:
        try:
            value = self.schedule(point)  # type: ignore[operator]
        except Exception as err:
            raise ValueError(f"`schedule` callable raised at {self.unit} {point}: {type(err).__name__}: {err}") from err
        try:
            return check_fraction(f"schedule({point})", value)
        except ValueError as err:
            raise ValueError(f"`schedule` callable returned an invalid sparsity: {err}") from None

    def _check_values(self, values: dict[int, float]) -> None:
        prev_point, prev = None, 0.0
        for point, value in values.items():
            if value < prev - 1e-12:
                raise ValueError(
                    f"`schedule` must be non-decreasing: schedule({point})={value} < schedule({prev_point})={prev}"
                )
            prev_point, prev = point, value
        last = next(reversed(values))
        if abs(values[last] - self.target) > 1e-9:
            raise ValueError(
                f"`schedule` must reach `target` at the last round: schedule({last})={values[last]} "
                f"but target={self.target}"
            )

    # ------------------------------------------------------------------ queries
    @property
    def resolved(self) -> bool:
        return self._points is not None

    @property
    def points(self) -> list[int]:
        """Round points (epochs or steps), in order."""
        if self._points is None:
            raise RuntimeError("schedule not resolved yet: call resolve(horizon) first")
        return list(self._points)

    def is_round(self, point: int) -> bool:
        return point in self._values

    def sparsity_at(self, point: int) -> float:
        """Cumulative sparsity reached by the round at ``point``."""
        if point not in self._values:
            raise KeyError(f"no pruning round at {self.unit} {point}; rounds: {self._points}")
        return self._values[point]

    @property
    def end(self) -> int | None:
        """The last round point, once resolved."""
        return self._points[-1] if self._points else None

    def due(self, now: int, last: int | None) -> int | None:
        """The latest round point in ``(last, now]``, or ``None``.

        Keyed by point, not by history: a round never repeats after a resume, and a point that was
        jumped over (two optimizer steps in one batch) still fires once, at its own sparsity.
        """
        if self._points is None:
            return None
        due = [p for p in self._points if p <= now and (last is None or p > last)]
        return due[-1] if due else None

    def next_point(self, last: int | None, removes: Callable[[float], bool] | None = None) -> int | None:
        """The first round point after ``last`` (``removes``: whose round would remove something, given
        its sparsity)."""
        if self._points is None:
            return None
        for p in self._points:
            if (last is None or p > last) and (removes is None or removes(self.sparsity_at(p))):
                return p
        return None

    def __repr__(self) -> str:
        return (
            f"Schedule(target={self.target}, schedule={self.schedule!r}, {self.unit}s={self._points}, "
            f"sparsities={[round(v, 4) for v in self._values.values()]})"
        )
