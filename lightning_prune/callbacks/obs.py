"""``OBSPruning``: Optimal Brain Surgeon as a Lightning callback.

The criterion, its Hessian models, solvers and allocation live in :mod:`lightning_prune.criteria.obs`.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning_prune.callbacks.base import PruningCallback
from lightning_prune.criteria import OBS
from lightning_prune.engine.pruner import pruner_parameters
from lightning_prune.engine.schedule import forwarded


class OBSPruning(PruningCallback):
    """Prune by OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` and move the surviving weights to compensate.

    Args:
        hessian: ``"layerwise"``, ``"fisher"`` or ``"kfac"`` (see the module docstring).
        solver: layer-wise only: ``"exact"`` (OBC), ``"blocked"`` (exact inside column blocks,
            SparseGPT-style lazy updates between them), ``"fast"`` (SparseGPT column sweep) or
            ``"auto"``: the most exact ones whose work fits a budget. Inside ``Trainer.fit`` the
            budget is the round's: a quarter of the training work between two rounds (3 x the
            target weights x the samples in between), shared by all layers, so rounds stay a
            small part of training; in ``prune()`` and one-round schedules each layer may spend
            about 10 s of CPU.
        allocation: layer-wise only: the loss-unit score that shares the removals among layers and
            rows: ``"obs"`` (each row's exact greedy error curve in loss units: measured best one-shot
            at 90-98%; one more exact pass over every row), ``"fisher"`` (OBD's ``1/2 F_ii w^2``:
            cheap at any size), ``"auto"`` (default: ``"obs"`` where its curves fit the solver
            budget below, else ``"fisher"``; the round record's ``info["allocation"]`` says which)
            or ``"kfac"``; or
            ``"reconstruction"``, SparseGPT's label-free objective (needs no loss, ``scope="layer"``).
            ``None`` (default, with ``reconstruct=None``): ``"auto"``, except in ``prune()`` on a model of
            repeated blocks (a decoder's layers) with ``scope`` and ``blocks`` left at ``None``: there the
            round runs block by block, label-free (``allocation="reconstruction"``, ``reconstruct="current"``,
            ``scope="layer"``, ``blocks="auto"``): memory for one block and no backward pass, where the
            loss-allocated round holds every layer's statistics and backpropagates through the whole model
            (17x SparseGPT's memory on a 197M LLaMA). Measured on a trained 8-block LLaMA
            (benchmarks/RESULTS.md, "defaults"): +0.24 perplexity at 70% (104.42 vs 104.18), equal at 50% and
            2:4, at 0.4x the time. The round prints the plan and records it in ``info["plan"]``.
        damp: relative damping, ``H + damp * mean(diag H) * I``; raised x10 (with a warning) if
            Cholesky fails.
        block_size: ``"fisher"``: Fisher block size; ``"blocked"``/``"fast"`` solvers: column block size.
        recompute_steps: curvature re-estimations within a round (layer-wise: groups of layers whose
            inputs are re-captured after the earlier groups were pruned).
        reconstruct: layer-wise only: the outputs each later layer group is fitted to.
            ``"original"`` (``None``, the default, outside ``prune()``'s block-by-block plan): the outputs
            it gave when the round started, from its original
            weights on the original inputs (``min E||W x_orig - w x||^2``, asymmetric calibration as
            in GPTAQ), so the error pruning earlier layers put into its inputs is corrected;
            ``"current"``: its own outputs on the already-pruned inputs (SparseGPT/OBC). Costs two
            forward passes over the round's batches per group instead of one pass with gradients;
            with ``blocks=`` it holds the original block inputs beside the pruned ones (2x).
            Measured one-shot (benchmarks/RESULTS.md): better on the Fashion-MNIST MLP and LeNet-5
            (98%: 84.6 vs 83.0%, 81.2 vs 75.1%), worse on lm.py's LLaMA (global 70%: 38.25 vs
            38.13 ppl; with ``blocks=``, 70% fast: 42.46 vs 40.78): prefer ``"current"`` there.
        optimizer_state: ``"reset"`` zeroes the first moments (momentum) of weights the update
            moved, whose direction predates the move, and keeps their second moments (zeroing
            Adam's ``exp_avg_sq`` while its step count runs on makes the next steps several times
            the learning rate); ``"keep"`` leaves both. Pruned entries are zeroed either way.
        solver_dtype: ``"float64"`` (default) or ``"float32"`` (TF32 disabled) for the solves.
        fisher_type: every Fisher OBS estimates (``"fisher"`` blocks, K-FAC's G, the layer-wise
            allocation and row weights): ``"empirical"`` (default: measured as good as the others for
            OBS, and the cheapest), ``"mc"`` (``mc_samples`` sampled labels per input), ``"exact"``
            (the GGN) or ``"auto"``; see :class:`OBDPruning`.
        mc_samples: sampled labels per input for ``fisher_type="mc"``.
        loss_reduction: ``"mean"`` (default) if the training loss averages over the batch's
            leading dimension, ``"sum"`` if it sums; used when the loss makes no single
            ``F.cross_entropy``/``F.nll_loss`` call, whose own reduction and non-ignored targets
            (a language model's tokens) are read instead (:func:`~lightning_prune.stats.capture.per_sample_factor`).

    Other arguments (``blocks=`` for SparseGPT's block-by-block round among them): see
    :class:`~lightning_prune.engine.pruner.Pruner`.
    """

    def __init__(
        self,
        target: float,
        hessian: Literal["layerwise", "fisher", "kfac"] = "layerwise",
        solver: Literal["auto", "exact", "blocked", "fast"] = "auto",
        allocation: Literal["auto", "obs", "fisher", "kfac", "reconstruction"] | None = None,
        damp: float = 0.01,
        block_size: int = 128,
        recompute_steps: int = 4,
        reconstruct: Literal["original", "current"] | None = None,
        optimizer_state: Literal["keep", "reset"] = "reset",
        solver_dtype: Literal["float64", "float32"] = "float64",
        fisher_type: Literal["auto", "empirical", "mc", "exact"] = "empirical",
        mc_samples: int = 1,
        loss_reduction: Literal["mean", "sum"] = "mean",
        **options: Any,
    ) -> None:
        criterion = OBS(
            hessian=hessian,
            solver=solver,
            allocation=allocation,
            damp=damp,
            block_size=block_size,
            recompute_steps=recompute_steps,
            optimizer_state=optimizer_state,
            solver_dtype=solver_dtype,
            loss_reduction=loss_reduction,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            reconstruct=reconstruct,
        )
        super().__init__(criterion, target, **options)


forwarded(OBSPruning.__init__, pruner_parameters())
