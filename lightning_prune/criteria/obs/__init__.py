"""Optimal Brain Surgeon (Hassibi & Stork 1993): remove weights *and* compensate the survivors.

One class per Hessian model, over the pure solver kernels in :mod:`lightning_prune.solvers`:

* :class:`LayerwiseOBS` (``hessian="layerwise"``, default): ``H = E[x x^T]`` of each layer's inputs
  (OBC/SparseGPT), rows weighted by ``G_ii`` into loss units; structured (``pattern="channels"``),
  sharded and block-by-block rounds are its own modules here.
* :class:`WoodFisherOBS` (``hessian="fisher"``): block-diagonal empirical Fisher.
* :class:`KFACOBS` (``hessian="kfac"``): ``H ~ G (x) A``.

:func:`OBS` builds the one its ``hessian`` names from flat options (documented there once:
:class:`~lightning_prune.OBSPruning` and the presets take them from its signature), refusing an option
the chosen Hessian does not use.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from lightning_prune.criteria.obs.base import OBSCriterion
from lightning_prune.criteria.obs.curvature import KFACOBS, WoodFisherOBS
from lightning_prune.criteria.obs.layerwise import LayerwiseOBS
from lightning_prune.engine.schedule import check_options, forwarded

Hessian = Literal["layerwise", "fisher", "kfac"]
HESSIANS = {cls.hessian: cls for cls in (LayerwiseOBS, WoodFisherOBS, KFACOBS)}  # in Hessian's order


def _keywords(cls: type) -> list[inspect.Parameter]:
    params = inspect.signature(cls, eval_str=True).parameters.values()
    return [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


COMMON = _keywords(OBSCriterion)  # every Hessian's options
LAYERWISE = [p for p in _keywords(LayerwiseOBS) if p.name not in {c.name for c in COMMON}]


def OBS(hessian: Hessian = "layerwise", **options: Any) -> OBSCriterion:
    """Prune by OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` and move the surviving weights to compensate: the OBS
    criterion of ``hessian`` with these options; an option the chosen Hessian does not use is refused, not ignored.

    Args:
        hessian: ``"layerwise"``, ``"fisher"`` or ``"kfac"`` (see :mod:`lightning_prune.criteria.obs`).
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
            (17x SparseGPT's memory on a 197M LLaMA); float32 solves, and ``solver="auto"`` within about 0.2 s
            per layer: exact on narrow layers, the SparseGPT preset's own round on wide ones (benchmarks/
            RESULTS.md, "defaults", "scale-lm": on a trained hidden-96 LLaMA 107.94/108.44/108.22 perplexity
            at 50/70%/2:4, SparseGPT 108.14/111.60/108.46; at 222M the preset's time); ``info["plan"]`` says so.
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
        damp: relative damping, ``H + damp * mean(diag H) * I``; raised x10 (with a warning) if
            Cholesky fails.
        block_size: ``"fisher"``: Fisher block size; ``"blocked"``/``"fast"`` solvers: column block size.
        recompute_steps: curvature re-estimations within a round (layer-wise: groups of layers whose
            inputs are re-captured after the earlier groups were pruned).
        optimizer_state: ``"reset"`` zeroes the first moments (momentum) of weights the update
            moved, whose direction predates the move, and keeps their second moments (zeroing
            Adam's ``exp_avg_sq`` while its step count runs on makes the next steps several times
            the learning rate); ``"keep"`` leaves both. Pruned entries are zeroed either way.
        solver_dtype: ``"float64"`` or ``"float32"`` (TF32 disabled) for the solves; ``None`` (default):
            float64, float32 in ``prune()``'s plan above (measured equal perplexity, "defaults").
        fisher_type: every Fisher OBS estimates (``"fisher"`` blocks, K-FAC's G, the layer-wise
            allocation and row weights): ``"empirical"`` (default: measured as good as the others for
            OBS, and the cheapest), ``"mc"`` (``mc_samples`` sampled labels per input), ``"exact"``
            (the GGN) or ``"auto"``; see :class:`~lightning_prune.criteria.OBD`.
        mc_samples: sampled labels per input for ``fisher_type="mc"``.
        loss_reduction: ``"mean"`` (default) if the training loss averages over the batch's
            leading dimension, ``"sum"`` if it sums; used when the loss makes no single
            ``F.cross_entropy``/``F.nll_loss`` call, whose own reduction and non-ignored targets
            (a language model's tokens) are read instead (:func:`~lightning_prune.stats.capture.per_sample_factor`).
    """
    if hessian not in HESSIANS:
        raise ValueError(f"`hessian` must be one of {tuple(HESSIANS)}, got {hessian!r}")
    check_options("OBS", options, [*COMMON, *LAYERWISE])
    if hessian == "layerwise":
        return LayerwiseOBS(**options)
    if options.get("allocation") == "reconstruction":
        raise ValueError(f"`allocation='reconstruction'` is layer-wise OBS's objective; got hessian={hessian!r}")
    if options.get("reconstruct") not in (None, "original"):
        raise ValueError(
            f"`reconstruct` chooses the outputs layer-wise OBS fits; hessian={hessian!r} has no layer "
            f"outputs to reconstruct (got reconstruct={options['reconstruct']!r})"
        )
    unused = {p.name: options.pop(p.name) for p in LAYERWISE if p.name in options}
    if unused := {k: v for k, v in unused.items() if v != next(p.default for p in LAYERWISE if p.name == k)}:
        raise ValueError(
            f"{', '.join(f'`{k}={v!r}`' for k, v in unused.items())}: layer-wise OBS's options, which "
            f"hessian={hessian!r} does not use; drop them or pass hessian='layerwise'"
        )
    return HESSIANS[hessian](**options)


forwarded(OBS, LAYERWISE, COMMON)


__all__ = ["HESSIANS", "KFACOBS", "OBS", "LayerwiseOBS", "OBSCriterion", "WoodFisherOBS"]
