"""The pruning methods every benchmark compares, as factories ``(target, **schedule) -> Callback``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import common
from lightning.pytorch.callbacks import Callback, ModelPruning

from lightning_prune import MagnitudePruning, OBDPruning, OBSPruning
from lightning_prune.engine.schedule import Schedule
from lightning_prune.engine.targets import PRUNABLE_TYPES
from lightning_prune.patterns import NM, parse_pattern


class LightningModelPruning(ModelPruning):
    """Lightning's ``ModelPruning`` on the same weights (Linear/Conv only, global L1, no lottery-ticket
    rewinding) and the same
    cumulative schedule as ours. Its ``amount`` is a fraction of the *remaining* weights, so the
    per-round amount is ``(s_k - s_{k-1}) / (1 - s_{k-1})``; feeding it the cumulative sparsity
    directly compounds (0.9 becomes 0.986, see ``naive=True``)."""

    def __init__(self, target: float, naive: bool = False, **schedule: Any) -> None:
        self.plan = Schedule(target, **{k: v for k, v in schedule.items() if k in _SCHEDULE_KEYS})
        self.naive = naive
        super().__init__(
            "l1_unstructured",
            amount=self._amount,
            use_global_unstructured=True,
            make_pruning_permanent=True,
            use_lottery_ticket_hypothesis=False,
            verbose=0,
        )

    def setup(self, trainer, pl_module, stage):
        self.plan.resolve(trainer.max_epochs)
        super().setup(trainer, pl_module, stage)

    def filter_parameters_to_prune(self, parameters_to_prune):
        # by default ModelPruning also prunes biases and norms; compare on the same weights as ours
        return [(m, n) for m, n in parameters_to_prune if n == "weight" and isinstance(m, PRUNABLE_TYPES)]

    def _amount(self, epoch: int) -> float:
        if not self.plan.is_round(epoch):
            return 0.0
        current = self.plan.sparsity_at(epoch)
        if self.naive:
            return current
        rounds = self.plan.points
        i = rounds.index(epoch)
        previous = self.plan.sparsity_at(rounds[i - 1]) if i else 0.0
        return (current - previous) / (1.0 - previous)


_SCHEDULE_KEYS = ("schedule", "start_epoch", "end_epoch", "every_n_epochs")

Factory = Callable[..., Callback]

METHODS: dict[str, Factory] = {
    "magnitude": lambda t, **kw: MagnitudePruning(t, verbose=0, **kw),
    "modelpruning": lambda t, **kw: LightningModelPruning(t, **kw),
    # the published OBD rows use the empirical Fisher (OBD's default is now fisher_type="auto")
    "obd-fisher": lambda t, **kw: OBDPruning(
        t, **{"curvature": "fisher", "fisher_type": "empirical", "verbose": 0, **kw}
    ),
    "obd-kfac": lambda t, **kw: OBDPruning(t, **{"curvature": "kfac", "fisher_type": "empirical", "verbose": 0, **kw}),
    "obd-ekfac": lambda t, **kw: OBDPruning(
        t, **{"curvature": "ekfac", "fisher_type": "empirical", "verbose": 0, **kw}
    ),
    "obd-hutchinson": lambda t, **kw: OBDPruning(t, curvature="hutchinson", verbose=0, **kw),
    "obs-layerwise": lambda t, **kw: OBSPruning(t, **{"hessian": "layerwise", "verbose": 0, **kw}),
    "obs-fisher": lambda t, **kw: OBSPruning(t, **{"hessian": "fisher", "verbose": 0, **kw}),
    "obs-kfac": lambda t, **kw: OBSPruning(t, **{"hessian": "kfac", "verbose": 0, **kw}),
}


def make(method: str, target: float, **kwargs: Any) -> Callback:
    if method == "modelpruning":
        kwargs = {k: v for k, v in kwargs.items() if k in _SCHEDULE_KEYS}
    return METHODS[method](target, **kwargs)


def split_pattern(method: str, model: str) -> tuple[str, dict[str, Any]]:
    """``"obs-layerwise/2:4"`` -> ``("obs-layerwise", {"pattern": ..., "exclude": [...]})``; a
    ``-groups`` suffix (``"magnitude/2:4-groups"``) selects the groups ramp. Layers whose input
    dimension is not a multiple of M stay dense (LeNet-5's convolutions; the MLP's 300- and
    100-input layers under 4:8), as a user would exclude them."""
    if "/" not in method:
        return method, {}
    base, spec = method.split("/", 1)
    ramp = "capped"
    if spec.endswith("-groups"):
        spec, ramp = spec[: -len("-groups")], "groups"
    nm = parse_pattern(spec)
    assert isinstance(nm, NM)
    exclude = [t.name for t in common.targets(common.build(model, 0)) if t.shape2d[1] % nm.m]
    return base, {"pattern": NM(nm.n, nm.m, ramp), "exclude": exclude or None}
