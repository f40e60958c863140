"""What a round records (:class:`RoundRecord`), and where it sits in training (:class:`RoundWhen`).

A record is typed (``record.sparsity``) and reads as the mapping the history always was
(``record["sparsity"]``, ``record.get("info")``, ``"structures_total" in record``, ``dict(record)``
for JSON), so loggers, reports and checkpoints take it as they took a dict. It is read-only, as
``pruner.history`` is; a checkpoint stores ``dict(record)`` and restores plain dicts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class RoundWhen:
    """What triggered a round and when, for its record: ``trigger`` (``"epoch"``, ``"step"``, or ``"prune"``
    for ``prune()``), the schedule ``point`` it fulfils (the pruner then counts it as done; ``None``: no
    schedule point), the trainer's ``epoch`` and ``global_step``, and the ``monitor``\\ ed metrics then."""

    trigger: str = "prune"
    point: int | None = None
    epoch: int | None = None
    global_step: int | None = None
    monitor: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, when: RoundWhen | None, fields_: Mapping[str, Any]) -> RoundWhen:
        """``when``, or one built from its fields passed one by one (``trigger=``, ``point=``, ...: the
        keyword arguments ``run_round`` took before this class); not both."""
        if not fields_:
            return cls() if when is None else when
        if when is not None:
            raise TypeError(f"run_round() got when= and its fields {sorted(fields_)}: pass one of them")
        if unknown := sorted(set(fields_) - {f.name for f in fields(cls)}):
            raise TypeError(f"run_round() got unexpected keyword arguments {unknown}")
        monitor = fields_.get("monitor")
        return cls(**{**fields_, "monitor": dict(monitor or {})})


@dataclass(frozen=True, kw_only=True, eq=False)
class RoundRecord(Mapping[str, Any]):
    """One round: the fields of ``pruner.history[i]`` and of what ``prune()`` returns.

    ``structures_pruned``/``structures_total`` are ``None`` under a pattern without structures, and then
    absent from the mapping (as they were from the dict). Equality is the mapping's: a record equals a
    dict with the same keys and values."""

    round: int
    trigger: str  # "epoch", "step" or "prune"
    epoch: int | None
    global_step: int | None
    target: float  # the pruner's final target
    target_sparsity: float  # this round's
    pattern: str
    sparsity: float  # reached, over the targets' weights
    pruned: int
    total: int
    structures_pruned: int | None = None
    structures_total: int | None = None
    predicted_loss_increase: float  # loss units; NaN for label-free criteria (see info["reconstruction_error"])
    actual_loss_increase: float
    loss_measured: bool  # False: no loss or no eval batch (the losses are NaN, "not measured")
    loss_before: float
    loss_after: float
    layer_sparsity: dict[str, float]
    monitor: dict[str, float]
    info: dict[str, Any]  # the criterion's and the strategy's details (solver, skipped batches, plan, ...)
    seconds: float

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> tuple[str, ...]:
        return _KEYS if self.structures_total is not None else _KEYS_UNSTRUCTURED


_KEYS = tuple(f.name for f in fields(RoundRecord))
_KEYS_UNSTRUCTURED = tuple(k for k in _KEYS if not k.startswith("structures_"))
