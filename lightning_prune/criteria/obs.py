"""Optimal Brain Surgeon (Hassibi & Stork 1993): remove weights *and* compensate the survivors.

Three Hessian models, one engine:

* ``hessian="layerwise"`` (default): ``H = E[x x^T]`` of each layer's inputs, shared by its rows
  (OBC/SparseGPT). The exact (OBC), blocked or fast (SparseGPT) solver removes weights row by row
  and refits the rest. Rows and layers are made comparable by weighting row ``i``'s reconstruction
  error with ``G_ii = E[g_i^2]`` (output-gradient second moment), i.e. ``H ~ diag(G) (x) A``,
  which puts every saliency in loss units.
* ``hessian="fisher"``: block-diagonal empirical Fisher (WoodFisher).
* ``hessian="kfac"``: ``H ~ G (x) A``.

Cross-layer allocation (``scope="global"``): every weight gets a loss-unit score, the engine's
selection ranks them globally (with the per-layer floor), and the resulting per-row counts are
what the OBS solver removes. ``allocation="obs"`` scores with each row's exact greedy error curve
(:func:`~lightning_prune.obs.layerwise.removal_costs`: the compensated loss of removing entries in
greedy order, weighted by ``G_ii``), OBC's per-layer error curves, per row, under one global
budget; it runs the exact greedy over every row once more. ``"fisher"`` scores with OBD's
``1/2 F_ii w^2`` (per-sample empirical Fisher diagonal): cheap at any size. ``"auto"`` (default)
takes ``"obs"`` where those curves fit the solver budget (``solver="auto"``'s: per layer in
``prune()``, the round's inside ``Trainer.fit``) and ``"fisher"`` otherwise; the record's
``info["allocation"]`` says which. ``"kfac"`` scores with the K-FAC OBS saliency. Measured one-shot
(benchmarks/RESULTS.md, "extreme sparsity"): MLP at 90/95/98%, 3 seeds, "obs" 88.0/87.3/84.6 and
"fisher" 87.9/86.8/83.9; LeNet-5 86.2 against 85.0 at 95%, 81.2 against 62.2 at 98%.

``allocation="reconstruction"`` is the label-free objective of SparseGPT/OBC: the unweighted
layer-wise saliency, from the layer inputs alone (no loss, no backward pass). Reconstruction errors
of different layers are in different units, so it allocates within each layer only
(``scope="layer"`` is required) and predicts no loss increase (the summed reconstruction error is
reported as ``info["reconstruction_error"]``).

``blocks="auto"`` (or a glob such as ``"model.layers.*"``) makes layer-wise reconstruction OBS
sequential (:mod:`lightning_prune.blocks`): one block at a time is calibrated, pruned, and its
pruned outputs feed the next, as SparseGPT/OBC prune transformers.

Layer-wise OBS solves its layers in ``recompute_steps`` groups, re-capturing the inputs of later
groups after the earlier ones were pruned. ``reconstruct="original"`` (default) fits each later
layer to the outputs it gave when the round started (its original weights on the original inputs),
from the cross moment of original and current inputs, so the error pruning put into its inputs is
corrected rather than reproduced (asymmetric calibration, GPTAQ); ``"current"`` fits the layer's
own outputs on the already-pruned inputs (SparseGPT/OBC). With ``blocks=`` the original outputs
travel block by block beside the pruned ones.

For ``"fisher"`` and ``"kfac"`` a round is split into ``recompute_steps`` steps; after each, the
curvature is re-estimated at the updated weights from the window's stored batches (as M-FAC and
oBERT do), and each step removes its set of weights with the exact joint OBS update.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.criteria.base import Criterion, RoundContext, RoundResult, require_stats
from lightning_prune.criteria.obd import check_reduction
from lightning_prune.distributed import Collectives, warn
from lightning_prune.obs.blockfisher import BlockFisher, block_set_update, from_blocks, to_blocks
from lightning_prune.obs.kronecker import CG_TOL, kfac_saliency, kfac_set_update
from lightning_prune.obs.layerwise import (
    LAYER_BUDGET,
    Groups,
    blocked_prune,
    choose_solvers,
    inverse_diagonal,
    obc_prune,
    prepare_hessian,
    refit_to_reference,
    removal_costs,
    removal_costs_work,
    single_saliency,
    solver_work,
    sparsegpt_prune,
)
from lightning_prune.obs.linalg import damped_cholesky, damped_inverse, exact_float32
from lightning_prune.obs.structured import structured_prune
from lightning_prune.patterns import Channels, Pattern
from lightning_prune.stats import KFAC, Composite, CrossCovariance, DiagFisher, Estimator, InputCovariance
from lightning_prune.stats.capture import check_hookable
from lightning_prune.stats.fisher import check_fisher_type
from lightning_prune.stats.passes import reference_pass
from lightning_prune.targets import PruneTarget

HESSIANS = ("layerwise", "fisher", "kfac")
SOLVERS = ("auto", "exact", "blocked", "fast")
ALLOCATIONS = ("auto", "obs", "fisher", "kfac", "reconstruction")
OPTIMIZER_STATES = ("keep", "reset")
RECONSTRUCTS = ("original", "current")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _split(items: list, n: int) -> list[list]:
    """``n`` consecutive, nearly equal groups."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


class OBS(Criterion):
    """Prune by OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` and move the surviving weights to compensate.

    The arguments are :class:`~lightning_prune.OBSPruning`'s of the same names (documented there,
    where users set them); this class validates them and runs the round.
    """

    name = "obs"
    moves_weights = True

    def __init__(
        self,
        hessian: str = "layerwise",
        solver: str = "auto",
        allocation: str = "auto",
        damp: float = 0.01,
        block_size: int = 128,
        recompute_steps: int = 4,
        optimizer_state: str = "reset",
        solver_dtype: str = "float64",
        loss_reduction: str = "mean",
        fisher_type: str = "empirical",
        mc_samples: int = 1,
        blocks: str | None = None,
        reconstruct: str = "original",
    ) -> None:
        for name, value, allowed in (
            ("reconstruct", reconstruct, RECONSTRUCTS),
            ("hessian", hessian, HESSIANS),
            ("solver", solver, SOLVERS),
            ("allocation", allocation, ALLOCATIONS),
            ("optimizer_state", optimizer_state, OPTIMIZER_STATES),
            ("solver_dtype", solver_dtype, tuple(DTYPES)),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= 10:
            raise ValueError(f"`damp` must be a number in [0, 10], got {damp!r}")
        for name, value in (("block_size", block_size), ("recompute_steps", recompute_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if allocation == "reconstruction" and hessian != "layerwise":
            raise ValueError(f"`allocation='reconstruction'` is layer-wise OBS's objective; got hessian={hessian!r}")
        check_fisher_type(fisher_type, mc_samples)
        if allocation == "reconstruction" and hessian == "layerwise" and fisher_type in ("mc", "exact"):
            raise ValueError(
                f"`fisher_type` has no effect with allocation='reconstruction', which uses no Fisher "
                f"(got {fisher_type!r})"
            )
        if blocks is not None:
            if not isinstance(blocks, str) or not blocks:
                raise ValueError(
                    f"`blocks` must be None, 'auto' or a glob over module names (e.g. 'model.layers.*'), got {blocks!r}"
                )
            if hessian != "layerwise" or allocation != "reconstruction":
                raise ValueError(
                    f"`blocks={blocks!r}` (sequential calibration) prunes each block from its own layer inputs, which "
                    "needs the label-free layer-wise objective: hessian='layerwise', allocation='reconstruction' "
                    f"(and scope='layer' or 'row'); got hessian={hessian!r}, allocation={allocation!r}"
                )
        if reconstruct != "original" and hessian != "layerwise":
            raise ValueError(
                f"`reconstruct` chooses the outputs layer-wise OBS fits; hessian={hessian!r} has no layer "
                f"outputs to reconstruct (got reconstruct={reconstruct!r})"
            )
        self.blocks, self.reconstruct = blocks, reconstruct
        self.fisher_type, self.mc_samples = fisher_type, mc_samples
        self.hessian, self.solver, self.allocation = hessian, solver, allocation
        self.damp, self.block_size, self.recompute_steps = float(damp), block_size, recompute_steps
        self.optimizer_state, self.solver_dtype = optimizer_state, solver_dtype
        self.loss_reduction = check_reduction(loss_reduction)
        self.reset_moved_state = optimizer_state == "reset"

    # ------------------------------------------------------------------ what a round needs
    def check_scope(self, scope: str) -> None:
        if self.allocation == "reconstruction" and scope not in ("layer", "row"):
            raise ValueError(
                "allocation='reconstruction' compares weights within a layer only (reconstruction errors of "
                f"different layers are in different units): pass scope='layer' or 'row', got scope={scope!r}"
            )

    def check_pattern(self, pattern: Pattern, scope: str) -> None:
        if pattern.removes_structures and self.blocks is not None:
            raise ValueError(
                f"pattern='channels' with blocks={self.blocks!r} (sequential calibration) is not supported: structured "
                "OBS re-estimates the inputs of later layers itself (recompute_steps); pass blocks=None"
            )

    def check_targets(self, targets: Sequence[PruneTarget]) -> None:
        check_hookable(targets, gradients=self.needs_gradients)

    def check_model(self, model: nn.Module, targets: Sequence[PruneTarget]) -> None:
        if self.blocks is not None:
            from lightning_prune.blocks import find_blocks

            find_blocks(model, self.blocks, targets)

    @property
    def needs_gradients(self) -> bool:
        return self.allocation != "reconstruction"

    def recalibrates(self, targets: Sequence[PruneTarget]) -> bool:
        if self.hessian == "layerwise":  # reconstruct="original" re-captures inputs with forward passes only
            return self.needs_gradients and self.recompute_steps > 1 and len(targets) > 1 and not self._corrects
        return self.recompute_steps > 1

    @property
    def captures_in_window(self) -> bool:  # sequential: statistics block by block, at round time
        return self.blocks is None and (self.fisher_type == "empirical" or not self.needs_gradients)

    def check_sharded(self, targets: Sequence[PruneTarget]) -> None:
        if self.blocks is not None:
            raise ValueError(
                f"blocks={self.blocks!r} (sequential calibration) runs the blocks outside the model's forward, which "
                "FSDP2 has not been tested with: prune a sharded model with blocks=None (the default)"
            )

    def make_estimator(self, targets: Sequence[PruneTarget], comm: Collectives, num_batches: int) -> Estimator | None:
        if self.blocks is not None:
            return None  # sequential: each block's statistics are gathered in the round, block by block
        if self.hessian == "fisher":
            return BlockFisher(targets, self.block_size, comm)
        if self.allocation == "reconstruction":
            return Composite({"inputs": InputCovariance(targets, comm)})
        parts: dict[str, Estimator] = {"kfac": KFAC(targets, comm=comm)}
        if self.hessian == "layerwise" and self.allocation in ("fisher", "auto"):
            parts["fisher"] = DiagFisher(targets, comm)
        return Composite(parts)

    @property
    def _corrects(self) -> bool:
        """Whether later layers fit the round's original outputs (layer-wise, ``reconstruct="original"``)."""
        return self.hessian == "layerwise" and self.reconstruct == "original"

    def _reference_stats(
        self, ctx: RoundContext, layers: Sequence[PruneTarget], changed: Sequence[PruneTarget], desc: str
    ) -> CrossCovariance:
        """``A`` and ``C = E[x_ref x^T]`` of ``layers``, with the ``changed`` layers at the round's original weights."""
        if ctx.reference is None:
            raise RuntimeError(
                f"OBS round {ctx.round_index}: reconstruct='original' needs the weights the round started from "
                "(RoundContext.reference); run the round through lightning_prune.round.run_round"
            )
        est = CrossCovariance(layers, ctx.comm)
        return reference_pass(ctx.calib, ctx.batches, est, layers, ctx.reference, changed, desc)

    def _recapture(self, ctx: RoundContext, desc: str) -> Estimator:
        """Fresh statistics at the current weights from the round's batches (a calibration pass)."""
        est = self.make_estimator(ctx.targets, ctx.comm, len(ctx.batches))
        return self.collect(ctx.calib, ctx.batches, est, ctx.targets, ctx.round_index)

    def prune(self, ctx: RoundContext) -> RoundResult:
        if self.blocks is not None:
            with exact_float32():
                return self._sequential(ctx)
        est = require_stats(ctx, ctx.stats, f"OBS ({self.hessian})")
        with exact_float32():
            if self.hessian == "layerwise":
                return self._layerwise(ctx, est)  # type: ignore[arg-type]
            return self._recomputed(ctx, est)

    def _dtype(self) -> torch.dtype:
        return DTYPES[self.solver_dtype]

    @staticmethod
    def _matrix(t: PruneTarget, dtype: torch.dtype) -> Tensor:
        return t.matrix().to(dtype)

    @staticmethod
    def _write(t: PruneTarget, W: Tensor) -> None:
        t.write_(t.unmatrix(W))  # into this rank's shard when sharded

    # ------------------------------------------------------------------ layer-wise OBS
    def _layerwise(self, ctx: RoundContext, est: Composite) -> RoundResult:
        """Allocate counts from loss-unit scores, then solve layer by layer.

        With ``recompute_steps > 1`` the layers are solved in that many consecutive groups and the
        input statistics of later groups are re-estimated after the earlier ones were pruned (as
        SparseGPT/OBC do sequentially), so each layer compensates for what upstream pruning changed.
        """
        dtype = self._dtype()
        weighted = self.allocation != "reconstruction"  # rows weighted by G_ii: loss units
        info: dict[str, Any] = {"damping_increases": 0, "dead_inputs": 0, "recomputes": 0}
        allocation = info["allocation"] = self._allocation(ctx)
        # sharded (FSDP2): each layer is gathered for its score, and this rank keeps its block of it
        scores = {}
        for t in ctx.targets:
            ctx.check_interrupt(f"scoring {t.name}")
            scores[t.name] = t.local(self._allocation_score(t, est, dtype, ~t.gather(ctx.masks[t.name]), allocation))
        allocated = ctx.select(scores)
        del scores
        if ctx.pattern.removes_structures:
            return self._structured(ctx, est, ctx.pattern, allocated, info)

        masks, predicted, reconstruction = {}, 0.0, 0.0
        counts = {t.name: t.matrix(~t.gather(allocated[t.name])).sum(1) for t in ctx.targets}
        solvers = self._solvers(ctx, ctx.targets, counts)
        groups = _split(ctx.targets, min(self.recompute_steps, len(ctx.targets)))
        G = {t.name: torch.diagonal(est["kfac"].factors(t.name)[1]).to(dtype) for t in ctx.targets} if weighted else {}
        for i, group in enumerate(groups):
            adaptive = not weighted and ctx.scope == "layer"
            stats: Estimator = est["kfac"] if weighted else est["inputs"]
            cross: CrossCovariance | None = None
            if i > 0:
                desc = f"re-estimating inputs ({i}/{len(groups) - 1})"
                if self._corrects:  # current inputs and the original ones: forward passes only
                    stats = cross = self._reference_stats(ctx, group, [t for g in groups[:i] for t in g], desc)
                else:
                    est = self._recapture(ctx, desc)  # type: ignore[assignment]
                    stats = est["kfac"] if weighted else est["inputs"]
                    if weighted:
                        G.update({t.name: torch.diagonal(est["kfac"].factors(t.name)[1]).to(dtype) for t in group})
                info["recomputes"] += 1
            solved = (
                self._solve_spread(ctx, group, stats, counts, solvers, allocated, info, adaptive, cross)
                if ctx.sharded
                else (
                    (
                        t,
                        *self._solve(
                            t,
                            stats.input_covariance(t.name),
                            counts[t.name],
                            solvers[t.name],
                            ctx.masks[t.name],
                            info,
                            adaptive,
                            ctx.pattern.quotas(t, ~allocated[t.name]),
                            None if cross is None else cross.cross_covariance(t.name),
                        ),
                    )
                    for t in group
                )
            )
            for t, mask, losses in solved:
                ctx.check_interrupt(f"after solving {t.name}")
                masks[t.name] = t.local(mask)
                if weighted:
                    predicted += float((G[t.name] * losses).sum())
                else:
                    reconstruction += float(losses.sum())
        info["solver"] = "+".join(sorted(set(solvers.values())))
        if not weighted:
            info["reconstruction_error"], predicted = reconstruction, math.nan
        return RoundResult(masks, predicted, updated={t.name for t in ctx.targets}, info=info)

    def _structured(
        self, ctx: RoundContext, est: Composite, pattern: Channels, allocated: dict[str, Tensor], info: dict[str, Any]
    ) -> RoundResult:
        """``pattern="channels"``: the allocation fixes how many structures each family loses; the
        structured solver chooses which, removing their consumer columns with the group update.
        Families are solved in model order, in ``recompute_steps`` groups with the inputs of later
        groups re-estimated after the earlier ones were pruned."""
        dtype = self._dtype()
        weighted = self.allocation != "reconstruction"
        before, after = pattern.pruned(ctx.masks), pattern.pruned(allocated)
        gone: dict[str, Tensor] = {}
        predicted, reconstruction, updated = 0.0, 0.0, set()
        updated_targets: dict[str, PruneTarget] = {}
        families = _split(pattern.families, min(self.recompute_steps, len(pattern.families)))
        G = {t.name: torch.diagonal(est["kfac"].factors(t.name)[1]).to(dtype) for t in ctx.targets} if weighted else {}
        for i, group in enumerate(families):
            stats: Estimator = est["kfac"] if weighted else est["inputs"]
            cross: CrossCovariance | None = None
            if i > 0:
                desc = f"re-estimating inputs ({i}/{len(families) - 1})"
                if self._corrects:  # the consumers' current inputs and the original ones: forward passes only
                    layers = list({t.name: t for f in group for _, t in pattern.slots(f, "consumers")}.values())
                    stats = cross = self._reference_stats(ctx, layers, list(updated_targets.values()), desc)
                else:
                    est = self._recapture(ctx, desc)  # type: ignore[assignment]
                    stats = est["kfac"] if weighted else est["inputs"]
                    if weighted:
                        G = {t.name: torch.diagonal(est["kfac"].factors(t.name)[1]).to(dtype) for t in ctx.targets}
                info["recomputes"] += 1
            for f in group:
                ctx.check_interrupt(f"before {f.name}")
                count = int(after[f.name].sum()) - int(before[f.name].sum())
                if count <= 0:
                    continue
                consumers = [t for _, t in pattern.slots(f, "consumers")]
                rows = [G[t.name] if weighted else None for t in consumers]
                Ws = [self._matrix(t, dtype) for t in consumers]
                if cross is not None:  # fit the consumers' original outputs (layer-wise preparation, then refit)
                    for j, t in enumerate(consumers):
                        U, _, _, _ = prepare_hessian(stats.input_covariance(t.name).to(dtype), Ws[j], self.damp, t.name)
                        Ws[j] = refit_to_reference(Ws[j], cross.cross_covariance(t.name).to(dtype), U)
                Ws, gone[f.name], costs, counts = structured_prune(
                    Ws,
                    [stats.input_covariance(t.name).to(dtype) for t in consumers],
                    [s.width for s, _ in pattern.slots(f, "consumers")],
                    count,
                    before[f.name],
                    rows,
                    self.damp,
                    [t.name for t in consumers],
                )
                for t, W in zip(consumers, Ws):
                    self._write(t, W)
                    updated.add(t.name)
                    updated_targets[t.name] = t
                info["damping_increases"] += counts["damping_increases"]
                info["dead_inputs"] += counts["dead_inputs"]
                if weighted:
                    predicted += float(costs.sum())
                else:
                    reconstruction += float(costs.sum())
        info["solver"] = "structured"
        if not weighted:
            info["reconstruction_error"], predicted = reconstruction, math.nan
        return RoundResult(pattern.expand(ctx.masks, gone), predicted, updated=updated, info=info)

    def _solve_spread(
        self,
        ctx: RoundContext,
        group: Sequence[PruneTarget],
        stats: Estimator,
        counts: dict[str, Tensor],
        solvers: dict[str, str],
        allocated: dict[str, Tensor],
        info: dict[str, Any],
        adaptive: bool,
        cross: CrossCovariance | None = None,
    ):
        """Sharded layers: rank ``j`` solves layer ``j`` of every ``world_size`` consecutive layers, the ranks
        solving at the same time; each result is broadcast from its solver and every rank keeps its rows.

        Every rank takes part in every layer's gathers (collectives, in the same order) but keeps only
        the layer it solves, so a rank holds at most one whole layer and its solve, plus one received
        result. Yields ``(target, whole-layer mask, row losses)`` in layer order, as :meth:`_solve`."""
        world, rank = ctx.comm.world_size, ctx.comm.rank
        counters = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(group), world):
            chunk, mine = list(group[start : start + world]), None
            for j, t in enumerate(chunk):
                W, alloc, before = t.matrix(), t.gather(allocated[t.name]), t.gather(ctx.masks[t.name])
                if j == rank:
                    mine = (t, W, alloc, before)
                del W, alloc, before
            result = None
            if mine is not None:
                t, W, alloc, before = mine
                local_info = {"damping_increases": 0, "dead_inputs": 0}
                W_new, mask, losses = self._fit(
                    t,
                    stats.input_covariance(t.name),
                    W,
                    counts[t.name],
                    solvers[t.name],
                    before,
                    local_info,
                    adaptive,
                    ctx.pattern.quotas(t, ~alloc),
                    None if cross is None else cross.cross_covariance(t.name),
                )
                counters += torch.tensor(
                    [local_info["damping_increases"], local_info["dead_inputs"]], dtype=torch.float64
                )
                result = (t.unmatrix(W_new).to(t.param.dtype), mask, losses.to(torch.float64))
                del mine, W, alloc, before
            for j, t in enumerate(chunk):
                device = t.local_param.device
                if j == rank:
                    w, mask, losses = (x.to(device).contiguous() for x in result)  # type: ignore[union-attr]
                else:
                    w = torch.empty(t.param.shape, dtype=t.param.dtype, device=device)
                    mask = torch.empty(t.param.shape, dtype=torch.bool, device=device)
                    losses = torch.empty(t.shape2d[0], dtype=torch.float64, device=device)
                ctx.comm.broadcast_([w, mask, losses], src=j)
                t.write_(w)
                del w
                yield t, mask, losses
            result = None
        counters = counters.to(ctx.targets[0].local_param.device)
        ctx.comm.all_reduce_sum_([counters])
        info["damping_increases"] += int(counters[0])
        info["dead_inputs"] += int(counters[1])

    def _solve(
        self,
        t: PruneTarget,
        A: Tensor,
        counts: Tensor,
        solver: str,
        mask: Tensor,
        info: dict[str, Any],
        adaptive: bool = False,
        groups: Groups | None = None,
        C: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Remove ``counts[i]`` weights of each row of ``t`` under ``H = A`` and refit the rest in place
        (the whole layer: ``mask`` and the returned mask are whole-layer masks, also when sharded).

        ``adaptive``: the fast solver keeps only the layer's total and picks each column block's
        mask across rows inside the sweep, as SparseGPT does (used for the unweighted
        reconstruction objective with ``scope="layer"``, where only per-layer counts are promised).
        ``groups`` (an N:M pattern): the allocation fixes how many entries of each group go, and
        every solver chooses which inside its sweep. ``C`` (``E[x_ref x^T]``): fit the outputs of the
        reference inputs instead of the layer's own (:func:`refit_to_reference`). Returns the new
        mask (weight layout) and each row's reconstruction loss."""
        W_new, new_mask, losses = self._fit(t, A, t.matrix(), counts, solver, mask, info, adaptive, groups, C)
        self._write(t, W_new)
        return new_mask, losses

    def _fit(
        self,
        t: PruneTarget,
        A: Tensor,
        W: Tensor,
        counts: Tensor,
        solver: str,
        mask: Tensor,
        info: dict[str, Any],
        adaptive: bool = False,
        groups: Groups | None = None,
        C: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_solve` on the whole-layer matrix ``W``, without writing: ``(W_new matrix, mask, row losses)``."""
        dtype = self._dtype()
        U, W_live, damped, dead = prepare_hessian(A.to(dtype), W.to(dtype), self.damp, t.name)
        # the original weights of inputs that died still carry the original outputs: refit from all of them
        W = W_live if C is None else refit_to_reference(W.to(dtype), C.to(dtype), U)
        info["damping_increases"] += damped.increases
        info["dead_inputs"] += int(dead.sum())
        forced = ~t.matrix(mask)
        if solver == "exact":
            W_new, pruned, losses = obc_prune(W, U, counts, forced, groups)
        elif solver == "blocked":
            W_new, pruned, losses = blocked_prune(W, U, counts, forced, self.block_size, groups)
        else:
            W_new, pruned, losses = sparsegpt_prune(W, U, counts, forced, self.block_size, adaptive, groups)
        return W_new, t.unmatrix(~pruned), losses

    def _solvers(self, ctx: RoundContext, targets: Sequence[PruneTarget], counts: dict[str, Tensor]) -> dict[str, str]:
        if self.solver != "auto":
            return dict.fromkeys(counts, self.solver)
        works = [solver_work(torch.empty(t.shape2d, device="meta"), counts[t.name], self.block_size) for t in targets]
        budget = LAYER_BUDGET if ctx.solver_budget is None else ctx.solver_budget
        return dict(zip(counts, choose_solvers(works, budget, per_layer=ctx.solver_budget is None)))

    # ------------------------------------------------------------------ sequential (block by block)
    def _sequential(self, ctx: RoundContext) -> RoundResult:
        """SparseGPT's loop: each block calibrated on the pruned outputs of the blocks before it."""
        from lightning_prune.blocks import find_blocks, run_sequential

        if not ctx.batches:
            raise RuntimeError(f"OBS round {ctx.round_index}: no batch in {ctx.source} for sequential calibration")
        blocks = find_blocks(ctx.model, self.blocks, ctx.targets)  # type: ignore[arg-type]
        dtype = self._dtype()
        info: dict[str, Any] = {"damping_increases": 0, "dead_inputs": 0, "solver": set(), "peak_hessian_bytes": 0}
        masks: dict[str, Tensor] = {}
        reconstruction = 0.0

        def prune_block(block, stats: InputCovariance) -> None:
            nonlocal reconstruction
            sub = replace(ctx, targets=block.targets, masks={t.name: ctx.masks[t.name] for t in block.targets})
            require_stats(sub, stats, "sequential OBS")
            if bad := stats.nonfinite_layers():
                raise RuntimeError(f"OBS round {ctx.round_index}: the input statistics of {bad[:5]} are not finite")
            scores = {}
            cross = stats if isinstance(stats, CrossCovariance) else None
            for t in block.targets:
                ctx.check_interrupt(f"scoring {t.name}")
                A = stats.input_covariance(t.name).to(dtype)
                W = self._matrix(t, dtype)
                U, W_live, _, _ = prepare_hessian(A, W, self.damp, t.name)
                # the weights that fit the original outputs are the ones to score
                W = W_live if cross is None else refit_to_reference(W, cross.cross_covariance(t.name).to(dtype), U)
                scores[t.name] = t.local(t.unmatrix(single_saliency(W, U)))
            allocated = sub.select(scores)
            counts = {t.name: t.matrix(~t.gather(allocated[t.name])).sum(1) for t in block.targets}
            solvers = self._solvers(sub, block.targets, counts)
            info["solver"] |= set(solvers.values())
            for t in block.targets:
                ctx.check_interrupt(f"before solving {t.name}")
                A = stats.input_covariance(t.name)
                info["peak_hessian_bytes"] = max(info["peak_hessian_bytes"], A.numel() * A.element_size())
                quotas = sub.pattern.quotas(t, ~t.gather(allocated[t.name]))
                mask, losses = self._solve(
                    t,
                    A,
                    counts[t.name],
                    solvers[t.name],
                    t.gather(ctx.masks[t.name]),
                    info,
                    ctx.scope == "layer",
                    quotas,
                    None if cross is None else cross.cross_covariance(t.name),
                )
                masks[t.name] = t.local(mask)
                reconstruction += float(losses.sum())

        done = run_sequential(ctx.calib, ctx.batches, blocks, ctx.comm, prune_block, reference=self._corrects)
        info["solver"] = "+".join(sorted(info["solver"]))
        info.update(
            sequential_blocks=done["blocks"],
            block_input_bytes=done["block_input_bytes"],
            reconstruction_error=reconstruction,
            skipped_block_batches=done["skipped"],
        )
        return RoundResult(masks, math.nan, updated={t.name for t in ctx.targets}, info=info)

    def _allocation(self, ctx: RoundContext) -> str:
        """``allocation="auto"``: the error curves (``"obs"``) where they fit the solver budget, else ``"fisher"``."""
        if self.allocation != "auto":
            return self.allocation
        works = [removal_costs_work(*t.shape2d) for t in ctx.targets]
        if ctx.solver_budget is None:
            fits = all(w <= LAYER_BUDGET for w in works)
        else:
            fits = sum(works) <= ctx.solver_budget
        return "obs" if fits else "fisher"

    def _allocation_score(
        self, t: PruneTarget, est: Composite, dtype: torch.dtype, pruned: Tensor, allocation: str
    ) -> Tensor:
        """Score of removing each weight (loss units, or reconstruction units), used to share the removals;
        ``pruned``: the layer's entries pruned before the round (whole layer)."""
        W = self._matrix(t, dtype)
        if allocation == "fisher":
            return t.unmatrix(0.5 * t.matrix(est["fisher"].diagonal(t.name)).to(dtype) * W**2)
        if allocation == "reconstruction":
            U, W, _, _ = prepare_hessian(est["inputs"].input_covariance(t.name).to(dtype), W, self.damp, t.name)
            return t.unmatrix(single_saliency(W, U))
        A, G = est["kfac"].factors(t.name)
        U, W, _, _ = prepare_hessian(A.to(dtype), W, self.damp, t.name)
        if allocation == "obs":
            g = torch.diagonal(G).to(dtype)
            return t.unmatrix(g[:, None] * removal_costs(W, U, t.matrix(pruned)))
        Ginv = torch.cholesky_inverse(damped_cholesky(G.to(dtype), self.damp, f"{t.name} K-FAC G").L)
        return t.unmatrix(W**2 / (2 * torch.outer(torch.diagonal(Ginv), inverse_diagonal(U))))

    # ------------------------------------------------------------------ Fisher / K-FAC OBS
    def _recomputed(self, ctx: RoundContext, est: Estimator) -> RoundResult:
        masks, predicted = dict(ctx.masks), 0.0
        info: dict[str, Any] = {"damping_increases": 0, "recomputes": 0}
        if self.hessian == "kfac":  # the work of the set updates: CG iterations (0 for the systems solved directly)
            info.update(cg_iterations=0, cg_unconverged=0)
        if ctx.sharded:  # weights of whole layers (pattern="channels" is refused when sharded)
            start = ctx.global_sum({n: float((~m).sum()) for n, m in masks.items()}) / sum(
                t.param.numel() for t in ctx.targets
            )
        else:
            units = ctx.pattern.units(masks).values()  # weights, or structures under pattern="channels"
            start = sum(p for p, _ in units) / sum(n for _, n in units)
        for step in range(self.recompute_steps):
            if step > 0:
                est = self._recapture(ctx, f"recomputing curvature ({step}/{self.recompute_steps - 1})")
                info["recomputes"] += 1
            goal = start + (max(ctx.sparsity, start) - start) * (step + 1) / self.recompute_steps
            step_ctx = replace(ctx, masks=masks, sparsity=goal, stats=est)
            if self.hessian == "fisher":
                masks, loss = self._fisher_step(step_ctx, est, info)  # type: ignore[arg-type]
            else:
                masks, loss = self._kfac_step(step_ctx, est, info)  # type: ignore[arg-type]
            predicted += loss
        return RoundResult(masks, predicted, updated={t.name for t in ctx.targets}, info=info)

    def _fisher_step(self, ctx: RoundContext, est: BlockFisher, info: dict) -> tuple[dict[str, Tensor], float]:
        dtype, B = self._dtype(), self.block_size
        inverses, scores = {}, {}
        for t in ctx.targets:  # sharded: one layer gathered at a time, and gathered again for its update
            ctx.check_interrupt(f"inverting the Fisher blocks of {t.name}")
            Finv, damped = damped_inverse(est.blocks(t.name).to(dtype), self.damp, f"{t.name} Fisher blocks")
            info["damping_increases"] += damped.increases
            wb = to_blocks(t.matrix().to(dtype), B)
            inverses[t.name] = Finv
            scores[t.name] = t.local(
                t.unmatrix(from_blocks(wb**2 / (2 * torch.diagonal(Finv, dim1=1, dim2=2)), t.shape2d))
            )
        new = ctx.select(scores)
        loss = 0.0
        for t in ctx.targets:
            ctx.check_interrupt(f"before updating {t.name}")
            Finv, wb = inverses[t.name], to_blocks(t.matrix().to(dtype), B)
            Z = to_blocks(t.matrix(~t.gather(new[t.name])).to(dtype), B).bool()
            wb_new, block_loss = block_set_update(wb, Finv, Z)
            self._write(t, from_blocks(wb_new, t.shape2d))
            loss += float(block_loss.sum())
        return new, loss

    def _kfac_step(self, ctx: RoundContext, est: Composite, info: dict) -> tuple[dict[str, Tensor], float]:
        dtype = self._dtype()
        inverses, scores = {}, {}
        for t in ctx.targets:
            ctx.check_interrupt(f"inverting the K-FAC factors of {t.name}")
            A, G = est["kfac"].factors(t.name)
            dA = damped_cholesky(A.to(dtype), self.damp, f"{t.name} K-FAC A")
            dG = damped_cholesky(G.to(dtype), self.damp, f"{t.name} K-FAC G")
            info["damping_increases"] += dA.increases + dG.increases
            Ainv, Ginv = torch.cholesky_inverse(dA.L), torch.cholesky_inverse(dG.L)
            # sharded: the layer is gathered for its score and again for its update
            inverses[t.name] = (dG.L @ dG.L.mT, dA.L @ dA.L.mT, Ginv, Ainv)  # the damped factors and inverses
            scores[t.name] = t.local(t.unmatrix(kfac_saliency(self._matrix(t, dtype), Ginv, Ainv)))
        new = ctx.select(scores)
        loss = 0.0
        for t in ctx.targets:
            ctx.check_interrupt(f"before updating {t.name}")
            W = self._matrix(t, dtype)
            W_new, layer_loss, iterations, residual = kfac_set_update(
                W, *inverses[t.name], t.matrix(~t.gather(new[t.name]))
            )
            info["cg_iterations"] += iterations
            if residual > CG_TOL:  # CG stopped at its iteration limit
                info["cg_unconverged"] += 1
                warn(
                    f"K-FAC OBS: conjugate gradients for {t.name} stopped at {iterations} iterations with relative "
                    f"residual {residual:.1e} (tolerance {CG_TOL:g}); its compensation is approximate (logged as "
                    "prune/cg_unconverged)"
                )
            self._write(t, W_new)
            loss += layer_loss
        return new, loss
