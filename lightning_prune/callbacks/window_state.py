"""The capture window a round collects inside ``Trainer.fit``, and its checkpoint.

Before each round the callback keeps the last ``window_length`` training batches (the round's
passes re-run them) and, for criteria whose statistics come from the training steps, folds each
backward pass into the estimator (:class:`~lightning_prune.stats.window.CaptureWindow`). A
checkpoint taken inside the window carries both, with the statistics summed over the ranks and
every rank's batches, so the resumed round equals the uninterrupted one; a window this run cannot
continue exactly (another round, length, criterion or world size) is dropped with the reason.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_prune.runtime.distributed import Collectives
from lightning_prune.stats.window import CaptureWindow

WINDOW_STATE_VERSION = 1  # the format of a checkpointed open window (PruningCallback.state_dict()["window"])


@dataclass(frozen=True)
class WindowPlan:
    """What this run's window before its next round is: what a checkpointed one must match."""

    who: str  # the callback, for messages
    unit: str  # "epoch" or "step"
    length: int  # window_length
    criterion: str  # the criterion's name
    # where this run stands (compared with a checkpoint's window only):
    upcoming: int | None = None  # this run's next round
    world_size: int = 1
    late: Callable[[int], bool] = lambda point: False  # whether that round is due already (it runs at train start)


class OpenWindow:
    """The window of the round at ``point``: its kept batches (oldest first), its statistics when the
    criterion captures them in the window (``capture``), and the batches left out for a non-finite loss
    (``skipped``, counted here for criteria without hooks; the capture counts its own)."""

    def __init__(
        self,
        point: int,
        length: int,
        comm: Collectives,
        capture: CaptureWindow | None,
        batches: Iterable[Any] = (),
        skipped: int = 0,
    ) -> None:
        self.point, self.comm, self.capture, self.skipped = point, comm, capture, skipped
        self.batches: deque[Any] = deque(batches, maxlen=length)
        self.nonfinite = False  # this batch's step was left out of the statistics
        if capture is not None:
            capture.open()

    # ---------------------------------------------------------------- one training batch
    def begin_batch(self) -> None:
        if self.capture is not None:
            self.capture.begin_batch()  # its loss calls say how many terms (tokens) the loss averages

    def before_backward(self, loss: Tensor) -> None:
        if self.capture is not None:
            self.capture.before_backward(loss)

    def after_backward(self, accumulate: int, loss_scale: float | None) -> None:
        if self.capture is not None:
            self.nonfinite |= not self.capture.after_backward(accumulate=accumulate, loss_scale=loss_scale)

    def end_batch(self, outputs: Any, batch: Any) -> None:
        """Keep the batch unless its loss or step was not finite (then neither it nor its statistics count)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and not bool(torch.isfinite(loss).all()):
            self.nonfinite = True
            if self.capture is None:
                self.skipped += 1
        if not self.nonfinite:
            self.batches.append(batch)
        if self.capture is not None:
            self.capture.end_batch()
        self.nonfinite = False

    def suspend(self) -> None:
        """Hooks off, statistics and batches kept (a failed fit: a checkpoint saved on it carries them)."""
        if self.capture is not None:
            self.capture.suspend()

    def discard(self) -> None:
        if self.capture is not None:
            self.capture.discard()
        self.batches.clear()

    # ---------------------------------------------------------------- checkpoint
    def state_dict(self, plan: WindowPlan, device: torch.device, warn_once: Callable[[str, str], None]) -> dict:
        """Its round, statistics (summed over ranks), skipped count and every rank's kept batches (on the CPU,
        oldest first). Lightning calls this on every rank and saves rank 0's: the sums and the gather are
        collectives every rank joins, as Lightning's checkpointing does."""
        stats = self.capture.estimator.state_dict(summed=True) if self.capture is not None else None
        skipped = torch.tensor([float(self.skipped)], dtype=torch.float64, device=device)
        self.comm.all_reduce_sum_([skipped])
        mine = [move_data_to_device(b, torch.device("cpu")) for b in self.batches]
        if mine and (kind := _not_weights_only(mine)):
            warn_once(
                "weights_only",
                f"{plan.who} checkpoints the open capture window with its kept batches, which hold a "
                f"{kind}: torch.load(weights_only=True), what fit(ckpt_path=...) uses by default, refuses it. Resume "
                f"with trainer.fit(..., weights_only=False) (trusted checkpoints only) or register the type with "
                "torch.serialization.add_safe_globals",
            )
        return {
            "version": WINDOW_STATE_VERSION,
            "unit": plan.unit,
            "point": self.point,
            "window_length": plan.length,
            "criterion": plan.criterion,
            "world_size": self.comm.world_size,
            "statistics": stats,
            "skipped": int(skipped.item()),
            "batches": self.comm.all_gather_object(mine),  # one list per rank
        }

    @classmethod
    def restore(
        cls,
        state: dict[str, Any],
        plan: WindowPlan,
        *,
        rank: int,
        comm: Collectives,
        device: torch.device,
        new_capture: Callable[[], CaptureWindow | None],
    ) -> OpenWindow | None:
        """A checkpoint's open window, continued where it stopped on this rank; ``None`` (with a warning
        naming why) where this run cannot continue it exactly: it is never mixed into another round."""
        capture, batches, why = None, [], None
        try:
            why = _mismatch(state, plan)
            if why is None:
                capture = new_capture()
                if (capture is None) != (state["statistics"] is None):
                    when = "at round time" if capture is None else "in the window"
                    why = f"this run's criterion computes its statistics {when}"
                elif capture is not None:
                    capture.estimator.load_state_dict(state["statistics"], sums=rank == 0)  # rank 0 holds the sums
                batches = list(state["batches"][rank])
        except ValueError as err:  # the estimator's refusal: another layout
            why = str(err)
        except (KeyError, TypeError, IndexError, AttributeError) as err:
            why = f"it cannot be read ({type(err).__name__}: {err}; corrupted or hand-edited)"
        if why is not None:
            where = f"{state.get('unit')} {state.get('point')}" if isinstance(state, dict) else "?"
            rank_zero_warn(
                f"{plan.who}: the checkpoint was taken inside the capture window of the round at {where}, and {why}; "
                "that window's statistics and kept batches are dropped, so its round uses only the batches trained "
                "after the resume"
            )
            return None
        skipped = int(state["skipped"]) if rank == 0 else 0  # summed over ranks, like the statistics
        kept = (move_data_to_device(b, device) for b in batches)
        return cls(int(state["point"]), plan.length, comm, capture, kept, skipped)


def _mismatch(state: dict[str, Any], plan: WindowPlan) -> str | None:
    """Why this run cannot continue the checkpointed window, or ``None``."""
    if state["version"] != WINDOW_STATE_VERSION:
        return f"its format (version {state['version']!r}) is not this version's ({WINDOW_STATE_VERSION})"
    if state["unit"] != plan.unit or (state["point"] != plan.upcoming and not plan.late(state["point"])):
        return f"this run's next round is at {plan.unit} {plan.upcoming} (its schedule differs)"
    if state["window_length"] != plan.length:
        return f"it spans {state['window_length']} batches and this run's windows {plan.length} (num_batches)"
    if state["criterion"] != plan.criterion:
        return f"it was collected for criterion {state['criterion']!r}, this run prunes by {plan.criterion!r}"
    if state["world_size"] != plan.world_size:
        return (
            f"it was taken on {state['world_size']} ranks and this run has {plan.world_size} (the kept batches "
            "and the statistics' shares belong to the ranks of that run)"
        )
    return None


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
