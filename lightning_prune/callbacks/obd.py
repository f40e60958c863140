"""``OBDPruning``: Optimal Brain Damage as a Lightning callback (criterion: :class:`~lightning_prune.criteria.OBD`)."""

from __future__ import annotations

from typing import Any, Literal

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import OBD
from lightning_prune.engine.pruner import pruner_parameters
from lightning_prune.engine.schedule import forwarded


class OBDPruning(PruningCallback):
    """Prune the weights with the smallest ``1/2 h_ii w_i^2``.

    Args:
        curvature: ``"fisher"`` (per-sample empirical Fisher diagonal), ``"kfac"``, ``"ekfac"``
            (captured from the last ``num_batches`` training batches), ``"hutchinson"``
            (true-Hessian diagonal from ``num_probes`` Rademacher probes per batch, a
            calibration pass over the same batches at round time), or ``"activations"``: the
            layer-wise Hessian's diagonal ``E[x_j^2]``, so the score ``1/2 w_ij^2 E[x_j^2]`` ranks
            like Wanda's ``|w_ij| ||x_j||``; no labels, no backward pass; with ``scope="row"``
            (Wanda's comparison groups) or ``"layer"``.
        num_probes: Hutchinson probes per batch.
        fisher_type: for ``"fisher"``, ``"kfac"``, ``"ekfac"``: ``"auto"`` (default), ``"empirical"``
            (gradients at the observed labels, free from the training steps), ``"mc"`` (labels sampled
            from the model, ``mc_samples`` per input) or ``"exact"`` (the GGN in closed form). MC and
            exact stay informative at convergence and need one pass over the window's batches at
            round time; ``"auto"`` uses exact for classifiers (cross-entropy or MSE, one output row
            per sample, up to 64 outputs), mc for sequence or wide outputs, empirical when the loss
            makes no such call; chosen by measurement (see :mod:`lightning_prune.stats.fisher`).
        mc_samples: sampled labels per input for ``fisher_type="mc"``.
        loss_reduction: ``"mean"`` (default) if the training loss averages over the batch's
            leading dimension, ``"sum"`` if it sums; used when the loss makes no single
            ``F.cross_entropy``/``F.nll_loss`` call, whose own reduction and non-ignored targets
            (a language model's tokens) are read instead (:func:`~lightning_prune.stats.capture.per_sample_factor`).

    The saliencies are in loss units, so ``scope="global"`` compares them across layers, and their
    sum over the removed weights is logged as ``prune/predicted_loss_increase`` next to the
    measured ``prune/actual_loss_increase``. ``"activations"`` scores in each layer's output units
    instead: their sum is a reconstruction error, logged as ``prune/reconstruction_error``, not a
    loss. Other arguments: see :class:`~lightning_prune.engine.pruner.Pruner`.
    """

    def __init__(
        self,
        target: float,
        curvature: Literal["fisher", "kfac", "ekfac", "hutchinson", "activations"] = "fisher",
        num_probes: int = 8,
        fisher_type: Literal["auto", "empirical", "mc", "exact"] = "auto",
        mc_samples: int = 1,
        loss_reduction: Literal["mean", "sum"] = "mean",
        **options: Any,
    ) -> None:
        criterion = OBD(
            curvature=curvature,
            num_probes=num_probes,
            loss_reduction=loss_reduction,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
        )
        super().__init__(criterion, target, **options)
        if curvature == "ekfac" and self.num_batches < 2:
            raise ValueError(f"curvature='ekfac' needs `num_batches` >= 2 (two phases), got {self.num_batches}")


forwarded(OBDPruning.__init__, pruner_parameters())
