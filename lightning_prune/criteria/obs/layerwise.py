"""Layer-wise OBS (OBC/SparseGPT): ``H = E[x x^T]`` of each layer's inputs, shared by its rows.

The exact (OBC), blocked or fast (SparseGPT) solver removes weights row by row and refits the rest.
Rows and layers are made comparable by weighting row ``i``'s reconstruction error with
``G_ii = E[g_i^2]`` (output-gradient second moment), i.e. ``H ~ diag(G) (x) A``, which puts every
saliency in loss units.

Cross-layer allocation (``scope="global"``): every weight gets a loss-unit score, the selection
ranks them globally (with the per-layer floor), and the resulting per-row counts are what the
solver removes. ``allocation="obs"`` scores with each row's exact greedy error curve
(:func:`~lightning_prune.solvers.obc.removal_costs`, weighted by ``G_ii``): OBC's per-layer
error curves under one global budget. ``"fisher"`` scores with OBD's ``1/2 F_ii w^2``: cheap at any
size. ``"auto"`` takes ``"obs"`` where those curves fit the solver budget and ``"fisher"`` otherwise
(``info["allocation"]`` says which). ``"kfac"`` scores with the K-FAC OBS saliency. Measured one-shot
(benchmarks/RESULTS.md): MLP at 90/95/98%, 3 seeds, "obs" 88.0/87.3/84.6 and "fisher" 87.9/86.8/83.9.

``allocation="reconstruction"`` is the label-free objective of SparseGPT/OBC: the unweighted
saliency from the layer inputs alone (no loss, no backward pass). Reconstruction errors of different
layers are in different units, so it allocates within each layer only (``scope="layer"``) and
predicts no loss increase (the summed error is ``info["reconstruction_error"]``).

The layers are solved in ``recompute_steps`` groups, the inputs of later groups re-captured after
the earlier ones were pruned. ``reconstruct="original"`` (default) fits each later layer to the
outputs it gave when the round started, from the cross moment of original and current inputs, so
the error pruning put into its inputs is corrected rather than reproduced (GPTAQ); ``"current"``
fits the layer's own outputs on the already-pruned inputs (SparseGPT/OBC). ``blocks=`` runs the
round block by block (:class:`lightning_prune.engine.rounds.BlockByBlock`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_prune.criteria.base import RoundContext, RoundResult
from lightning_prune.criteria.obs.base import OBSCriterion, row_weights, split
from lightning_prune.criteria.obs.spread import solve_spread
from lightning_prune.criteria.obs.structured import prune_structures
from lightning_prune.engine.masks import PackedMasks
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.distributed import Collectives
from lightning_prune.solvers.linalg import damped_cholesky
from lightning_prune.solvers.obc import (
    LAYER_BUDGET,
    PLAN_LAYER_BUDGET,
    Groups,
    auto_solvers,
    auto_sweeps,
    blocked_prune,
    inverse_diagonal,
    obc_prune,
    prepare_hessian,
    refit_to_reference,
    removal_costs,
    removal_costs_work,
    single_saliency,
    sparsegpt_prune,
)
from lightning_prune.stats import KFAC, Composite, CrossCovariance, DiagFisher, Estimator, InputCovariance
from lightning_prune.stats.fisher import FisherType
from lightning_prune.stats.passes import reference_pass

Solver = Literal["auto", "exact", "blocked", "fast"]
SOLVERS: tuple[str, ...] = get_args(Solver)
Allocation = Literal["auto", "obs", "fisher", "kfac", "reconstruction"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
Reconstruct = Literal["original", "current"]
RECONSTRUCTS: tuple[str, ...] = get_args(Reconstruct)


class LayerwiseOBS(OBSCriterion):
    """``hessian="layerwise"``: OBC/SparseGPT solvers, loss-unit rows and cross-layer allocation."""

    hessian = "layerwise"
    label_free_options = "allocation='reconstruction', scope='layer' (SparseGPT's objective)"

    def __init__(
        self,
        *,
        solver: Solver = "auto",
        allocation: Allocation | None = None,
        reconstruct: Reconstruct | None = None,
        fisher_type: FisherType = "empirical",
        **options: Any,
    ) -> None:
        # None: "auto" / "original", which prune() may replace by its block-by-block plan (label_free_by_default)
        self.chosen_by_round = allocation is None and reconstruct is None
        allocation = "auto" if allocation is None else allocation
        reconstruct = "original" if reconstruct is None else reconstruct
        for name, value, allowed in (
            ("reconstruct", reconstruct, RECONSTRUCTS),
            ("solver", solver, SOLVERS),
            ("allocation", allocation, ALLOCATIONS),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        super().__init__(fisher_type=fisher_type, **options)
        if allocation == "reconstruction" and fisher_type in ("mc", "exact"):
            raise ValueError(
                f"`fisher_type` has no effect with allocation='reconstruction', which uses no Fisher "
                f"(got {fisher_type!r})"
            )
        self.solver, self.allocation, self.reconstruct = solver, allocation, reconstruct
        self.layer_budget = LAYER_BUDGET  # solver="auto"'s work per layer where the round sets no budget

    def label_free_by_default(self) -> bool:
        return self.chosen_by_round and self.fisher_type == "empirical"

    def make_label_free(self) -> str:
        """``prune()``'s plan for the defaults on a model of repeated blocks: SparseGPT's objective (no loss, no
        backward pass) on the pruned inputs, float32 solves unless asked otherwise, and ``"auto"``'s exact solver
        only on narrow layers (``PLAN_LAYER_BUDGET``): on wide ones the round is the SparseGPT preset's.
        Measured in benchmarks/RESULTS.md, "defaults" (quality) and "scale-lm" (time, memory)."""
        self.allocation, self.reconstruct, self.chosen_by_round = "reconstruction", "current", False
        self.solver_dtype = "float32" if self.dtype_chosen_by_round else self.solver_dtype
        self.layer_budget = PLAN_LAYER_BUDGET
        dtype = f"solver_dtype={self.solver_dtype!r}"
        return f"OBS allocation='reconstruction', reconstruct='current', solver={self.solver!r}, {dtype}"

    # ------------------------------------------------------------------ what a round needs
    def check_scope(self, scope: str) -> None:
        if self.allocation == "reconstruction" and scope not in ("layer", "row"):
            raise ValueError(
                "allocation='reconstruction' compares weights within a layer only (reconstruction errors of "
                f"different layers are in different units): pass scope='layer' or 'row', got scope={scope!r}"
            )

    @property
    def needs_gradients(self) -> bool:
        return self.allocation != "reconstruction"

    def recalibrates(self, targets: Sequence[PruneTarget]) -> bool:  # "original" re-captures with forwards only
        return self.needs_gradients and self.recompute_steps > 1 and len(targets) > 1 and not self.corrects

    def make_estimator(
        self, targets: Sequence[PruneTarget], comm: Collectives, num_batches: int, *, reference: bool = False
    ) -> Estimator | None:
        if self.allocation == "reconstruction":
            inputs = CrossCovariance(targets, comm) if reference else InputCovariance(targets, comm)
            return Composite({"inputs": inputs})
        parts: dict[str, Estimator] = {"kfac": KFAC(targets, comm=comm)}
        if self.allocation in ("fisher", "auto"):
            parts["fisher"] = DiagFisher(targets, comm)
        return Composite(parts)

    @property
    def corrects(self) -> bool:
        """Whether later layers fit the round's original outputs (``reconstruct="original"``)."""
        return self.reconstruct == "original"

    @property
    def fits_reference(self) -> bool:
        return self.corrects

    def reference_stats(
        self, ctx: RoundContext, layers: Sequence[PruneTarget], changed: Sequence[PruneTarget], desc: str
    ) -> CrossCovariance:
        """``A`` and ``C = E[x_ref x^T]`` of ``layers``, with the ``changed`` layers at the round's original weights."""
        if ctx.reference is None:
            raise RuntimeError(
                f"OBS round {ctx.round_index}: reconstruct='original' needs the weights the round started from "
                "(RoundContext.reference); run the round through lightning_prune.engine.round.run_round"
            )
        est = CrossCovariance(layers, ctx.comm)
        return reference_pass(ctx.calib, ctx.batches, est, layers, ctx.reference, changed, desc)

    # ------------------------------------------------------------------ the round
    def solve(self, ctx: RoundContext, est: Estimator) -> RoundResult:
        """Allocate counts from the scores, then solve layer by layer, in ``recompute_steps`` groups (one
        in a sequential round's block, whose statistics may pair original and current inputs)."""
        dtype = self.dtype
        weighted = self.allocation != "reconstruction"  # rows weighted by G_ii: loss units
        info: dict[str, Any] = {"damping_increases": 0, "dead_inputs": 0, "recomputes": 0}
        allocation = info["allocation"] = self.resolved_allocation(ctx)
        # a sequential block allocates within each layer (scope "layer"/"row"): each layer is scored, selected
        # and solved in turn, so one layer's scores are held, not the block's (unless "auto" shares a round budget)
        streaming = ctx.block is not None and (self.solver != "auto" or ctx.solver_budget is None)
        allocated: dict[str, Tensor] = {}
        counts: dict[str, Tensor] = {}
        solvers: dict[str, str] = {}

        def allocate(layers: Sequence[PruneTarget]) -> None:
            scores = {}  # sharded (FSDP2): each layer is gathered for its score, and this rank keeps its block of it
            for t in layers:
                ctx.check_interrupt(f"scoring {t.name}")
                if self.picks_in_sweep(ctx, t) or self.counts_fixed(ctx):  # only counts matter: no Hessian needed
                    scores[t.name] = t.param.detach().abs()
                    continue
                scores[t.name] = t.local(self.allocation_score(t, est, ~t.gather(ctx.masks[t.name]), allocation))
            new = ctx.select(scores, layers)
            del scores
            allocated.update(new)
            counts.update({t.name: t.matrix(~t.gather(new[t.name])).sum(1) for t in layers})
            solvers.update(self.solvers(ctx, layers, {t.name: counts[t.name] for t in layers}))

        def solve_each(group: Sequence[PruneTarget], stats: Estimator, cross: CrossCovariance | None):
            for t in group:
                if streaming:
                    allocate([t])
                ctx.report(f"solving {t.name} ({solvers[t.name]}, {t.shape2d[0]}x{t.shape2d[1]})")
                yield t, *self.solve_layer(t, stats, counts, solvers, ctx.masks[t.name], allocated, ctx, info, cross)
                if streaming:  # one layer's allocation held at a time
                    del allocated[t.name]

        if not streaming:
            allocate(ctx.targets)
            if ctx.pattern.removes_structures:
                return prune_structures(self, ctx, est, allocated, info)

        masks, predicted, reconstruction = PackedMasks(), 0.0, 0.0  # held as bits as each layer is solved
        groups = split(ctx.targets, 1 if ctx.block else min(self.recompute_steps, len(ctx.targets)))
        G = row_weights(est, ctx.targets, dtype) if weighted else {}
        adaptive = self.adaptive(ctx)
        for i, group in enumerate(groups):
            stats: Estimator = est["kfac"] if weighted else est["inputs"]  # type: ignore[index]
            cross = stats if isinstance(stats, CrossCovariance) else None  # a block's original and current inputs
            if ctx.block:  # the largest layer-input covariance held (float64)
                info["peak_hessian_bytes"] = max(t.shape2d[1] ** 2 * 8 for t in group)
            if i > 0:
                desc = f"re-estimating inputs ({i}/{len(groups) - 1})"
                if self.corrects:  # current inputs and the original ones: forward passes only
                    stats = cross = self.reference_stats(ctx, group, [t for g in groups[:i] for t in g], desc)
                else:
                    est = self.recapture(ctx, desc)
                    stats = est["kfac"] if weighted else est["inputs"]  # type: ignore[index]
                    if weighted:
                        G.update(row_weights(est, group, dtype))
                info["recomputes"] += 1
            if ctx.comm.world_size > 1:  # FSDP2 shards, or prune() under torchrun: rank j solves every j-th layer
                if streaming:
                    allocate(group)
                solved = solve_spread(self, ctx, group, stats, counts, solvers, allocated, info, adaptive, cross)
                info["spread_solves"] = info.get("spread_solves", 0) + len(group)
            else:
                solved = solve_each(group, stats, cross)
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

    def solve_layer(
        self,
        t: PruneTarget,
        stats: Estimator,
        counts: dict[str, Tensor],
        solvers: dict[str, str],
        mask: Tensor,
        allocated: dict[str, Tensor],
        ctx: RoundContext,
        info: dict[str, Any],
        cross: CrossCovariance | None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`fit` one whole layer and write it: ``(whole-layer mask, row losses)``."""
        # a sequential block's statistics serve one solve per layer: its estimate is handed over, not copied
        W_new, new_mask, losses = self.fit(
            t,
            stats.input_covariance(t.name, self.dtype, release=ctx.block is not None),  # type: ignore[attr-defined]
            t.matrix(),
            counts[t.name],
            solvers[t.name],
            mask,
            info,
            adaptive=self.adaptive(ctx),
            groups=ctx.pattern.quotas(t, ~allocated[t.name]),
            C=None if cross is None else cross.cross_covariance(t.name, self.dtype, release=ctx.block is not None),
        )
        self.write(t, W_new)
        return new_mask, losses

    def fit(
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
        """Remove ``counts[i]`` weights of each row of the whole-layer matrix ``W`` under ``H = A`` and
        refit the rest: ``(W_new, mask, row losses)``, nothing written.

        ``adaptive``: the fast solver keeps only the layer's total and picks each column block's mask
        across rows inside the sweep, as SparseGPT does. ``groups`` (N:M): the allocation fixes how many
        entries of each group go, the solver chooses which. ``C`` (``E[x_ref x^T]``): fit the outputs of
        the reference inputs instead of the layer's own (:func:`refit_to_reference`)."""
        given = [A.to(self.dtype)]  # A is the solve's own (a fresh estimate): freed once factored
        del A
        U, W_live, damped, dead = prepare_hessian(given, W.to(self.dtype), self.damp, t.name)
        # the original weights of inputs that died still carry the original outputs: refit from all of them
        W = W_live if C is None else refit_to_reference(W.to(self.dtype), C.to(self.dtype), U)
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

    def adaptive(self, ctx: RoundContext) -> bool:
        """Whether the fast solver keeps only each layer's total and picks its masks inside the sweep
        (SparseGPT's own selection: label-free, ``scope="layer"``)."""
        return self.allocation == "reconstruction" and ctx.scope == "layer"

    def picks_in_sweep(self, ctx: RoundContext, t: PruneTarget) -> bool:
        """Whether ``t``'s whole mask comes from that sweep (the fast solver, unstructured, one process), so the
        allocation only fixes the layer's total count. ``"auto"`` with a budget per layer sweeps a layer too wide
        for the others whatever its rows' counts: its Hessian is then factored once, not twice."""
        if not self.adaptive(ctx) or ctx.sharded or ctx.pattern.quotas(t, ~ctx.masks[t.name]) is not None:
            return False
        auto = self.solver == "auto" and ctx.solver_budget is None
        return self.solver == "fast" or (
            auto and auto_sweeps(t.shape2d, ctx.sparsity, self.block_size, self.layer_budget)
        )

    def counts_fixed(self, ctx: RoundContext) -> bool:
        """Whether the selection fixes only counts the scores cannot change: whole structures with the same
        share in every family (``scope="layer"``), which the structured solver then chooses itself."""
        return ctx.pattern.removes_structures and ctx.scope == "layer"

    def solvers(self, ctx: RoundContext, targets: Sequence[PruneTarget], counts: dict[str, Tensor]) -> dict[str, str]:
        """The solver of each layer: the one asked for, or ``"auto"``'s choice within the round's budget (the fast
        sweep where it picks the layer's mask itself: :meth:`picks_in_sweep`)."""
        if self.solver != "auto":
            return dict.fromkeys(counts, self.solver)
        rest = [t for t in targets if not self.picks_in_sweep(ctx, t)]  # swept layers' scores were never computed
        budget = self.layer_budget if ctx.solver_budget is None else ctx.solver_budget
        shapes, per_row = [t.shape2d for t in rest], [counts[t.name] for t in rest]
        chosen = auto_solvers(shapes, per_row, self.block_size, budget, per_layer=ctx.solver_budget is None)
        return {**dict.fromkeys(counts, "fast"), **dict(zip([t.name for t in rest], chosen))}

    def resolved_allocation(self, ctx: RoundContext) -> str:
        """``allocation="auto"``: the error curves (``"obs"``) where they fit the solver budget, else ``"fisher"``."""
        if self.allocation != "auto":
            return self.allocation
        works = [removal_costs_work(*t.shape2d) for t in ctx.targets]
        fits = all(w <= LAYER_BUDGET for w in works) if ctx.solver_budget is None else sum(works) <= ctx.solver_budget
        return "obs" if fits else "fisher"

    def allocation_score(self, t: PruneTarget, est: Estimator, pruned: Tensor, allocation: str) -> Tensor:
        """Score of removing each weight (loss or reconstruction units), used to share the removals;
        ``pruned``: the layer's entries pruned before the round (whole layer)."""
        dtype, W = self.dtype, self.matrix(t)
        if allocation == "fisher":
            return t.unmatrix(0.5 * t.matrix(est["fisher"].diagonal(t.name)).to(dtype) * W**2)  # type: ignore[index]
        if allocation == "reconstruction":
            inputs = est["inputs"]  # type: ignore[index]
            U, W_live, _, _ = prepare_hessian(inputs.input_covariance(t.name).to(dtype), W, self.damp, t.name)
            if isinstance(inputs, CrossCovariance):  # the weights that fit the original outputs are the ones to score
                W_live = refit_to_reference(W, inputs.cross_covariance(t.name).to(dtype), U)
            return t.unmatrix(single_saliency(W_live, U))
        A, G = est["kfac"].factors(t.name)  # type: ignore[index]
        U, W, _, _ = prepare_hessian(A.to(dtype), W, self.damp, t.name)
        if allocation == "obs":
            return t.unmatrix(torch.diagonal(G).to(dtype)[:, None] * removal_costs(W, U, t.matrix(pruned)))
        Ginv = torch.cholesky_inverse(damped_cholesky(G.to(dtype), self.damp, f"{t.name} K-FAC G").L)
        return t.unmatrix(W**2 / (2 * torch.outer(torch.diagonal(Ginv), inverse_diagonal(U))))
