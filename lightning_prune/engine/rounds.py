"""Round strategies: where a round's statistics come from, and how the criterion is run on them.

* :class:`OnePass` (default): every target's statistics at once, from the training steps before the
  round (the capture window) or, without one, from one calibration pass over the round's batches at
  the current weights; the criterion then prunes every target in one call.
* :class:`BlockByBlock` (``blocks="auto"`` or a glob): SparseGPT's and OBC's loop for deep models. One
  block at a time is calibrated on the *pruned* outputs of the blocks before it
  (:func:`lightning_prune.engine.sequential.run_sequential`), pruned by the criterion on its own, and its pruned
  outputs feed the next; memory holds one block's inputs and statistics. Any label-free criterion can
  run this way (layer-wise reconstruction OBS, OBD with ``curvature="activations"``, i.e. Wanda):
  statistics from block inputs have no loss to differentiate. A criterion that fits its layers to the
  round's original outputs (``reconstruct="original"``) gets them: the original outputs travel beside
  the pruned ones. ``blocks="auto"`` on a model without repeated blocks (no ``nn.ModuleList`` of
  identical modules holding targets: an MLP, a CNN) runs :class:`WholeModel`: the whole model is the
  one block, calibrated once on the model's inputs and pruned, which is the one-pass round; the round's
  ``info["plan"]`` says so, and binding warns once.

A strategy is chosen when the pruner is built (:func:`strategy_for`); ``run_round`` asks it for the one
that runs on the model (:meth:`OnePass.for_model`), then for the statistics (step 1) and to run the
criterion (step 3).
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.criteria.base import Criterion, RoundContext, RoundResult, require_stats
from lightning_prune.engine.calibration import Calibration
from lightning_prune.engine.masks import PackedMasks, apply_masks_
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.patterns import Pattern
from lightning_prune.runtime.distributed import LOCAL, Collectives, warn
from lightning_prune.runtime.offload import storage_device
from lightning_prune.stats import CaptureWindow, Estimator


class OnePass:
    """Every target's statistics at once (the window, or one calibration pass), then one criterion call."""

    blocks: str | None = None
    plan: str | None = None  # what runs instead of what was asked for, and why (the round's info["plan"])

    def for_model(self, model: nn.Module, targets: Sequence[PruneTarget]) -> OnePass:
        """The strategy that runs a round on ``model``: this one, except where the model decides (see
        :class:`WholeModel`)."""
        return self

    def check(self, criterion: Criterion, pattern: Pattern, scope: str) -> None:
        """Refuse a criterion, pattern or scope this strategy cannot run (when the pruner is built)."""

    def check_model(self, model: nn.Module, targets: Sequence[PruneTarget], sharded: bool) -> None:
        """Refuse a model this strategy cannot run on (when the pruner binds)."""

    def captures_in_window(self, criterion: Criterion) -> bool:
        """Whether the training steps before a round feed its statistics (else a pass at round time)."""
        return criterion.captures_in_window

    def originals(self, criterion: Criterion, targets: Sequence[PruneTarget]) -> dict[str, Tensor]:
        """Copies of the weights the criterion may move, kept by ``run_round`` for the whole round: restored
        if it fails, and the reference weights of ``reconstruct="original"``. Every target's: the round
        solves them all from statistics gathered before any of them moved."""
        return {t.name: t.local_param.clone() for t in targets} if criterion.moves_weights else {}

    def statistics(
        self,
        criterion: Criterion,
        calib: Calibration,
        batches: list[Any],
        targets: Sequence[PruneTarget],
        window: CaptureWindow | None,
        comm: Collectives,
        round_index: int,
    ) -> Estimator | None:
        """The round's statistics, all-reduced; ``None`` where the criterion needs none or no batch came."""
        if window is not None:
            return window.close()
        stats = criterion.make_estimator(targets, comm, len(batches))
        if stats is None or not batches:
            return None  # nothing was accumulated: the criterion says so
        return criterion.collect(calib, batches, stats, targets, round_index)

    def prune(self, criterion: Criterion, ctx: RoundContext) -> RoundResult:
        return criterion.prune(ctx)


class BlockByBlock(OnePass):
    """Block by block, each calibrated on the pruned outputs of the blocks before it (whose pruned
    weights are zeroed as soon as the block is done, so the next block's inputs are the pruned model's)."""

    def __init__(self, blocks: str) -> None:
        if not isinstance(blocks, str) or not blocks:
            raise ValueError(
                f"`blocks` must be None, 'auto' or a glob over module names (e.g. 'model.layers.*'), got {blocks!r}"
            )
        self.blocks = blocks

    def check(self, criterion: Criterion, pattern: Pattern, scope: str) -> None:
        if criterion.needs_gradients or criterion.make_estimator([], LOCAL, 1) is None:
            what = "needs gradients of a loss" if criterion.needs_gradients else "needs no statistics"
            raise ValueError(
                f"`blocks={self.blocks!r}` (sequential calibration) calibrates each block on the pruned outputs of the "
                f"blocks before it, from its layer inputs alone, which needs a label-free criterion with statistics "
                f"(OBS with hessian='layerwise', allocation='reconstruction'; OBD with curvature='activations'); "
                f"{criterion.describe()} {what}"
            )
        if pattern.removes_structures:
            raise ValueError(
                f"pattern='{pattern}' with blocks={self.blocks!r} (sequential calibration) is not supported: "
                "structured OBS re-estimates the inputs of later layers itself (recompute_steps); pass blocks=None"
            )
        if scope not in ("layer", "row"):
            raise ValueError(
                f"`blocks={self.blocks!r}` (sequential calibration) allocates within each block as it goes: pass "
                f"scope='layer' or 'row', got scope={scope!r}"
            )

    def for_model(self, model: nn.Module, targets: Sequence[PruneTarget]) -> OnePass:
        from lightning_prune.engine.sequential import repeated_blocks

        if self.blocks == "auto" and not repeated_blocks(model, targets):
            return WholeModel(model)
        return self

    def check_model(self, model: nn.Module, targets: Sequence[PruneTarget], sharded: bool) -> None:
        from lightning_prune.engine.sequential import find_blocks

        runs = self.for_model(model, targets)
        if runs is self:
            find_blocks(model, self.blocks, targets)
        if sharded:  # also where the model has no blocks: blocks=None is the round tested sharded
            raise ValueError(
                f"blocks={self.blocks!r} (sequential calibration) runs the blocks outside the model's forward, which "
                "FSDP2 has not been tested with: prune a sharded model with blocks=None (the default)"
            )
        if runs is not self:
            warn(runs.plan)  # type: ignore[arg-type]  (WholeModel always says why)

    def captures_in_window(self, criterion: Criterion) -> bool:
        return False  # gathered block by block at round time

    def originals(self, criterion: Criterion, targets: Sequence[PruneTarget]) -> dict[str, Tensor]:
        return {}  # one block's copy at a time (see prune): memory for one block, not the model

    def statistics(self, criterion, calib, batches, targets, window, comm, round_index) -> None:  # type: ignore[override]
        if window is not None:
            window.discard()
        return None

    def prune(self, criterion: Criterion, ctx: RoundContext) -> RoundResult:
        from lightning_prune.engine.sequential import find_blocks, run_sequential

        if not ctx.batches:
            raise RuntimeError(f"round {ctx.round_index}: no batch in {ctx.source} for sequential calibration")
        blocks = find_blocks(ctx.model, self.blocks, ctx.targets)
        home = {t.name: storage_device(t.param) for t in ctx.targets}  # the model's (device=: a block moves away)
        masks, updated, predicted = PackedMasks(), set(), 0.0  # the finished blocks' masks, as bits
        info: dict[str, Any] = {}

        def make_stats(targets: Sequence[PruneTarget]) -> Estimator:
            est = criterion.make_estimator(targets, ctx.comm, len(ctx.batches), reference=criterion.fits_reference)
            return est  # type: ignore[return-value]  (check() refused criteria without statistics)

        def prune_block(block: Any, stats: Estimator, status: Callable[[str], None]) -> None:
            nonlocal predicted
            masks_before = PackedMasks()  # this block's, as bits, where it is pruned (device=: moved)
            for t in block.targets:
                masks_before[t.name] = ctx.masks[t.name].to(t.param.device)
            sub = replace(
                ctx,
                targets=block.targets,
                masks=masks_before,
                stats=stats,
                block=block.name,
                reference=None,
                status=lambda what: status(f"{block.name}: {what}"),
            )
            require_stats(sub, stats, f"sequential {criterion.name}")
            if bad := stats.nonfinite_layers():
                raise RuntimeError(f"round {ctx.round_index}: the input statistics of {bad[:5]} are not finite")
            saved = {t.name: t.local_param.clone() for t in block.targets}  # this block's weights only
            try:
                result = criterion.prune(sub)
                apply_masks_({t.name: t.param for t in block.targets}, result.masks)  # the next block sees them pruned
            except BaseException:
                with torch.no_grad():
                    for t in block.targets:
                        t.local_param.copy_(saved[t.name])
                raise
            del saved
            for n, m in result.masks.items():  # packed where they were solved, held where the model is
                masks[n] = m.to(dtype=torch.bool)
                masks.move_(n, home[n])
            updated.update(result.updated)
            predicted += result.predicted_loss_increase
            _merge(info, result.info)
            finished.append(block.name)

        finished: list[str] = []
        try:
            done = run_sequential(
                ctx.calib,
                ctx.batches,
                blocks,
                ctx.comm,
                prune_block,
                make_stats,
                reference=criterion.fits_reference,
                device=ctx.device,
            )
        except BaseException as err:
            if finished:  # the blocks already pruned stay pruned: run_round commits their masks (see PARTIAL)
                setattr(err, PARTIAL, RoundResult(ChainMap(masks, ctx.masks), predicted, updated=updated, info=info))
                rest = len(blocks) - len(finished)
                err.add_note(
                    f"lightning-prune: the sequential round stopped after {len(finished)} of {len(blocks)} blocks "
                    f"({finished[0]} ... {finished[-1]}): their masks are committed and their weights keep the "
                    f"pruning; the block being pruned was restored and the {rest} others are untouched. "
                    "Running the round again prunes the rest."
                )
            raise
        info.update(
            sequential_blocks=done["blocks"],
            block_input_bytes=done["block_input_bytes"],
            skipped_block_batches=done["skipped"],
        )
        return RoundResult(masks, predicted, updated=updated, info=info)


class WholeModel(OnePass):
    """``blocks="auto"`` on a model without repeated blocks: every target is in the one block, the whole
    model, calibrated once on the model's inputs and pruned: exactly the one-pass round, on the criterion and
    scope that ``blocks=`` checked (label-free, ``"layer"``/``"row"``)."""

    def __init__(self, model: nn.Module) -> None:
        self.plan = (
            f"blocks='auto' found no nn.ModuleList of identical blocks holding targets in {type(model).__name__}: "
            "one pass over the whole model (every target calibrated at once on the model's inputs, then pruned). "
            "Name the blocks with a glob (blocks='...') to run block by block"
        )


PARTIAL = "lightning_prune_partial_round"  # an error's attribute: the part of a round done before it, to commit


def strategy_for(blocks: str | None) -> OnePass:
    """The strategy a pruner's arguments ask for: ``blocks`` names a sequential round's blocks."""
    return OnePass() if blocks is None else BlockByBlock(blocks)


def _merge(info: dict[str, Any], block: dict[str, Any]) -> None:
    """A block's record into the round's: counts and errors add up, labels (solvers) are joined."""
    for key, value in block.items():
        if key not in info:
            info[key] = value
        elif isinstance(value, str):
            info[key] = "+".join(sorted(set(info[key].split("+")) | set(value.split("+"))))
        elif isinstance(value, bool):
            info[key] = info[key] or value
        elif isinstance(value, (int, float)):
            info[key] = max(info[key], value) if key.startswith("peak_") else info[key] + value
