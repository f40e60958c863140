"""Pruning criteria: how a round scores weights, and for OBS how it moves the survivors (no Lightning)."""

from lightning_prune.criteria.base import Criterion, RoundContext, RoundResult
from lightning_prune.criteria.magnitude import Magnitude
from lightning_prune.criteria.obd import OBD
from lightning_prune.criteria.obs import OBS

__all__ = ["OBD", "OBS", "Criterion", "Magnitude", "RoundContext", "RoundResult"]
