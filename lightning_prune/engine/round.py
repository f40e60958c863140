"""One pruning round, top to bottom, without Lightning; and ``prune()``, a round with no Trainer.

:func:`run_round` is the only place a round happens. Inside ``Trainer.fit`` the callback adapter
calls it with the batches and the capture window of the training steps before the round; ``prune()``
calls it with batches taken from any iterable and no window, so the statistics come from one
calibration pass over them. Everything after the statistics is the same code.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.criteria.base import RoundContext, RoundResult
from lightning_prune.engine.calibration import (
    Calibration,
    LossFn,
    move_to_device,
    never,
    no_progress,
    tqdm_progress,
)
from lightning_prune.engine.facade import PrunerLike
from lightning_prune.engine.oneshot import plan_one_shot
from lightning_prune.engine.pruner import Pruner, as_pruner
from lightning_prune.engine.record import RoundRecord, RoundWhen
from lightning_prune.engine.rounds import PARTIAL, OnePass
from lightning_prune.engine.summary import round_summary
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime import offload
from lightning_prune.runtime.distributed import LOCAL, Collectives, default_collectives, global_rank, warn
from lightning_prune.stats.estimators import Estimator
from lightning_prune.stats.window import CaptureWindow


def run_round(
    pruner: Pruner,
    calib: Calibration,
    batches: list[Any],
    sparsity: float,
    *,
    when: RoundWhen | None = None,
    window: CaptureWindow | None = None,
    comm: Collectives = LOCAL,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    skipped: int = 0,
    source: str = "the round's batches",
    solver_budget: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | None = None,
    **when_fields: Any,
) -> RoundRecord:
    """Statistics -> loss before -> criterion -> commit -> loss after -> record.

    ``when``: what triggered the round, and when (default: ``prune()``'s; its fields are also taken one by
    one: ``trigger=``, ``point=``, ``epoch=``, ``global_step=``, ``monitor=``). ``window`` holds the
    statistics of the training steps that produced ``batches``; without one, a criterion that needs
    statistics gets them from a calibration pass over ``batches`` at the current weights. ``skipped``
    counts batches the caller already left out as non-finite. ``solver_budget`` bounds the work of OBS's
    ``solver="auto"`` for the whole round (``None``: the per-layer budget). ``should_stop`` (e.g. a
    SIGTERM flag) is checked between layers (and between batches of a pass, in one process): the round
    then raises :class:`~lightning_prune.engine.calibration.RoundInterrupted` with every weight restored
    and no mask changed, except that a sequential round (``blocks=``, one block's copy) commits the blocks
    it finished, and says so. ``device`` (a sequential round only) moves one block at a time there to
    prune it. Returns the record appended to ``pruner.history``.
    """
    start, when = time.perf_counter(), RoundWhen.of(when, when_fields)
    targets, criterion, round_index = pruner.targets, pruner.criterion, len(pruner.history)
    strategy = pruner.round_strategy.for_model(calib.model, targets)  # blocks="auto" without blocks: one pass
    offload.check_round(calib.model, strategy.blocks, comm.world_size > 1)
    if should_stop is not None and comm.world_size == 1:  # between the batches of the round's passes, until the commit
        calib.should_stop = should_stop
    # a round with nothing to remove (target=0, or masks already there) leaves every weight as it is:
    # no statistics, no criterion (OBS would refit the weights it keeps), no commit
    idle = not pruner.removes_something(sparsity)

    # 1. statistics, all-reduced across ranks (the strategy says where they come from: the window, one
    # pass, or block by block in step 3); non-finite ones refuse before any weight is touched
    stats = None if idle else strategy.statistics(criterion, calib, batches, targets, window, comm, round_index)
    if idle and window is not None:
        window.discard()
    skipped = _total(skipped + (stats.skipped if stats is not None else 0), comm, calib)
    _check_statistics(stats, skipped, round_index, source)

    # 2. loss before, on the last eval_batches batches
    eval_batches = batches[max(0, len(batches) - pruner.eval_batches) :] if pruner.eval_batches else []
    measured = bool(eval_batches) and calib.has_loss(eval_batches[0])  # else the losses are NaN: "not measured"
    loss_before = calib.mean_loss(eval_batches, comm)

    # 3. criterion: new masks, and for OBS moved weights (restored if the criterion fails half-way)
    before = pruner.current_masks()
    saved = {} if idle else strategy.originals(criterion, targets)
    ctx = RoundContext(
        model=calib.model, targets=targets, masks=before, sparsity=sparsity, batches=batches, stats=stats, calib=calib,
        comm=comm, round_index=round_index, scope=pruner.scope, pattern=pruner.pattern, min_density=pruner.min_density,
        source=source, solver_budget=solver_budget, reference=saved or None, should_stop=should_stop, device=device,
    )  # fmt: skip
    result = _run_criterion(pruner, strategy, ctx, saved, idle, optimizers)
    del saved
    ctx.reference = None

    # 4. commit: masks only shrink, pruned weights and their optimizer moments are zeroed, ranks agree
    if not idle:
        pruner.commit_(result, before, comm, optimizers)

    # 5. loss after, on the same batches
    loss_after = loss_before if idle else calib.mean_loss(eval_batches, comm)

    # 6. the record
    info = {**result.info, **_plan(strategy), **_statistics_info(stats, skipped)}
    losses = (result.predicted_loss_increase, loss_before, loss_after, measured)
    record = _record(pruner, when, sparsity, losses, info, time.perf_counter() - start)
    pruner.record_round(record, when.point)
    return record


def _run_criterion(
    pruner: Pruner,
    strategy: OnePass,
    ctx: RoundContext,
    saved: dict[str, Tensor],
    idle: bool,
    optimizers: Iterable[torch.optim.Optimizer],
) -> RoundResult:
    """Step 3: the strategy runs the criterion (an idle round keeps the masks). If it fails, every weight it
    may have moved is restored from ``saved`` (the round's copies) and the blocks a sequential round
    finished are committed; either way the stop flag is no longer polled (the round completes)."""
    try:
        return RoundResult(ctx.masks, 0.0, info={"idle": True}) if idle else strategy.prune(pruner.criterion, ctx)
    except BaseException as err:
        _restore(ctx.targets, saved)
        if (partial := getattr(err, PARTIAL, None)) is not None:  # blocks a sequential round finished stay pruned
            pruner.commit_(partial, ctx.masks, ctx.comm, optimizers)
        raise
    finally:
        ctx.calib.should_stop = never  # from here on the round completes: its masks are committed


def _check_statistics(stats: Estimator | None, skipped: int, round_index: int, source: str) -> None:
    """Say how many batches were left out; refuse non-finite statistics before any weight moves."""
    if skipped:
        warn(f"round {round_index}: {skipped} batches had non-finite inputs or gradients and were left out")
    if stats is not None and (bad := stats.nonfinite_layers()):
        raise RuntimeError(
            f"round {round_index}: the statistics of {bad[:5]} are not finite (NaN/inf inputs or gradients in "
            f"{source}); refusing before touching any weight"
        )


def _restore(targets: Sequence[PruneTarget], saved: dict[str, Tensor]) -> None:
    """Put back the weights a failed round may have moved (its copies of them)."""
    with torch.no_grad():
        for t in targets:
            if t.name in saved:
                t.local_param.copy_(saved[t.name])


def _plan(strategy: OnePass) -> dict[str, str]:
    """The strategy's word on what it runs instead of what was asked for (``blocks="auto"`` without blocks)."""
    return {"plan": strategy.plan} if strategy.plan is not None else {}


def _statistics_info(stats: Estimator | None, skipped: int) -> dict[str, Any]:
    """What the record says of the statistics: batches left out, and for gradients the Fisher and loss terms."""
    info: dict[str, Any] = {"skipped_batches": skipped}
    if stats is not None and stats.needs_grad:
        info["fisher_type"] = stats.fisher_type
        if stats.samples_seen:
            info["loss_terms_per_sample"] = stats.terms_per_sample
    return info


def _record(
    pruner: Pruner,
    when: RoundWhen,
    sparsity: float,
    losses: tuple[float, float, float, bool],
    info: dict[str, Any],
    seconds: float,
) -> RoundRecord:
    """The round's record from the masks just committed (whole layers when sharded). ``losses``: predicted
    increase, loss before and after, and whether they were measured."""
    predicted, loss_before, loss_after, measured = losses
    kept, numel = pruner.kept_counts(), {t.name: t.param.numel() for t in pruner.targets}
    pruned, total = sum(numel.values()) - sum(kept.values()), sum(numel.values())
    structures = pruner.pattern.structures(pruner.current_masks())
    return RoundRecord(
        round=len(pruner.history),
        trigger=when.trigger,
        epoch=when.epoch,
        global_step=when.global_step,
        target=pruner.target,
        target_sparsity=sparsity,
        pattern=str(pruner.pattern),
        sparsity=pruned / total,
        pruned=pruned,
        total=total,
        structures_pruned=structures[0] if structures else None,
        structures_total=structures[1] if structures else None,
        predicted_loss_increase=float(predicted),
        actual_loss_increase=loss_after - loss_before,
        loss_measured=measured,
        loss_before=loss_before,
        loss_after=loss_after,
        layer_sparsity={n: (numel[n] - kept[n]) / max(numel[n], 1) for n in numel},
        monitor=dict(when.monitor),
        info=info,
        seconds=seconds,
    )


def _total(count: int, comm: Collectives, calib: Calibration) -> int:
    """A per-rank count summed over ranks."""
    if comm.world_size == 1:
        return count
    device = next(iter(calib.model.parameters())).device
    t = torch.tensor([float(count)], dtype=torch.float64, device=device)
    comm.all_reduce_sum_([t])
    return int(t.item())


def prune(
    model: nn.Module,
    data: Iterable[Any],
    pruner: PrunerLike,
    *,
    loss_fn: LossFn | None = None,
    num_batches: int | None = None,
    device: str | torch.device | None = None,
) -> RoundRecord:
    """Prune ``model`` once, to ``pruner.target``, from ``num_batches`` batches of ``data``.

    ``pruner`` is the object you would pass to a Trainer (``OBSPruning(target=0.5, ...)``): every
    criterion and option works here too. No Trainer and no optimizer are needed; the model stays on
    its device and batches are moved there. The statistics come from one calibration pass in eval
    mode (BatchNorm statistics untouched, dropout off).

    Args:
        model: any ``nn.Module`` or ``LightningModule``.
        data: a DataLoader or any iterable of batches (tensors, tuples, dicts).
        pruner: a pruning callback (or any :class:`~lightning_prune.engine.pruner.Pruner`).
        loss_fn: ``loss_fn(model, batch) -> mean loss``. Default: ``pruner.loss_fn``, else a
            LightningModule's ``training_step``, else the ``.loss`` of the model's output (Hugging
            Face models with ``labels``). Magnitude and ``OBSPruning(allocation="reconstruction",
            scope="layer")`` need none; the other criteria refuse before any work without one.
        num_batches: calibration batches (default: the pruner's ``num_batches``, or for magnitude
            ``min(num_batches, eval_batches)``, the only batches it reads).
        device: for models larger than the accelerator: the model stays where it is (the CPU) and a
            block-by-block round (the defaults on a decoder, ``SparseGPT``, ``blocks=``) moves one block at
            a time to ``device`` to calibrate and prune it, then back, so ``device`` needs memory for one
            block, its statistics and the calibration activations at one block's boundary. The layers
            before the first block (embeddings) and the loss before/after (``eval_batches``; 0 skips it)
            run where the model is. ``None`` (default): everything runs where the model is. A model that
            accelerate dispatched (``device_map=``, disk offload) is pruned where accelerate placed it, its
            offloaded blocks read one at a time and written back (:mod:`lightning_prune.runtime.offload`);
            ``device`` may then only be the hooks' execution device.

    Returns:
        The round's record (``pruner.history[-1]``, a read-only
        :class:`~lightning_prune.engine.record.RoundRecord`). The model is left pruned, with plain
        state-dict keys; ``pruner.masks`` holds the masks, so passing the same ``pruner`` to a Trainer
        fine-tunes with them frozen. Where ``prune()`` chose a plan for the defaults (see
        :mod:`~lightning_prune.engine.oneshot`), ``pruner.criterion`` is a new object; the criterion you
        built is left as it was.
    """
    pruner = _checked_arguments(pruner, num_batches, loss_fn)  # a callback prunes through the Pruner it wraps
    if device is not None:  # before the pruner binds (it may drop another model's masks) and any block moves
        device = _device(device)
        runs_on = offload.round_device(model, device, f"prune(device={str(device)!r})")  # None: accelerate places
    pruner.bind(model)
    _say_if_idle(pruner)
    plan = _plan_one_shot(pruner, model)
    if device is not None:
        _offload_device(device, pruner, model)
        device = runs_on  # the round moves each block there (None on a model accelerate dispatched: its hooks do)
    calib = Calibration(
        model,
        loss_fn if loss_fn is not None else pruner.loss_fn,
        training_step=getattr(model, "automatic_optimization", True),
        output_loss=True,
        progress=tqdm_progress if pruner.verbose >= 1 else no_progress,
    )
    batches = _take_batches(data, pruner.window_length if num_batches is None else num_batches, model)
    if pruner.criterion.needs_gradients and not calib.has_loss(batches[0] if batches else None):
        raise ValueError(
            f"{pruner.label} needs gradients of a loss, and {type(model).__name__} has none "
            f"({calib.describe()}): pass loss_fn=lambda model, batch: ... (the mean loss over the batch)"
            + _label_free_hint(pruner)
        )
    source = f"the {len(batches)} batches of `data`"
    record = run_round(pruner, calib, batches, pruner.target, comm=default_collectives(), source=source, device=device)
    if plan is not None:
        record.info["plan"] = plan
    if pruner.verbose >= 1 and global_rank() == 0:
        print(round_summary(record), flush=True)
        if pruner.verbose >= 2:
            print(pruner.layer_table(), flush=True)
    return record


def _checked_arguments(pruner: PrunerLike, num_batches: int | None, loss_fn: LossFn | None) -> Pruner:
    """``prune()``'s arguments checked before any work; the core pruner (a callback's own)."""
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 0
    ):
        raise ValueError(f"`num_batches` must be an integer >= 0, got {num_batches!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable (model, batch) -> loss, got {loss_fn!r}")
    if (core := as_pruner(pruner)) is None:
        raise TypeError(
            f"`pruner` must be a Pruner or a pruning callback (OBSPruning(...), SparseGPT(...)), got {pruner!r}"
        )
    return core


def _say_if_idle(pruner: Pruner) -> None:
    """A prune() with nothing to remove (target 0, masks already there) is legitimate: said, not silent."""
    if not pruner.removes_something(pruner.target):
        why = "" if pruner.target == 0 else f": its masks already reach sparsity {pruner.sparsity:.4f}"
        warn(f"prune(): {pruner.label}(target={pruner.target}) removes nothing{why}; the model is left unchanged")


def _plan_one_shot(pruner: Pruner, model: nn.Module) -> str | None:
    """Adopt ``prune()``'s plan for the defaults, if there is one (:mod:`~lightning_prune.engine.oneshot`), and
    say it; returns what it says."""
    plan = plan_one_shot(pruner, model)
    if plan is None:
        return None
    pruner.replan(criterion=plan.criterion, round_strategy=plan.round_strategy, scope=plan.scope)
    if pruner.verbose >= 1 and global_rank() == 0:
        print(f"{pruner.label}: {plan.text}", flush=True)
    return plan.text


def _take_batches(data: Iterable[Any], n: int, model: nn.Module) -> list[Any]:
    """The first ``n`` batches of ``data``, moved to where the model is (fewer, with a warning, if it ends)."""
    home = offload.storage_device(next(iter(model.parameters())))
    batches = [move_to_device(b, home) for b in itertools.islice(iter(data), n)]
    if len(batches) < n:
        warn(f"prune(): `data` gave {len(batches)} batches, fewer than num_batches={n}; the round uses all of them")
    return batches


def _device(device: str | torch.device) -> torch.device:
    """``prune(device=...)`` checked before anything is bound or moved: a device torch knows, that this
    machine has and that holds data."""
    from lightning_prune.engine.sequential import check_device

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be a torch device (e.g. 'cuda', 'cuda:1'), got {device!r}: {err}") from err
    check_device(device, f"prune(device={str(device)!r})")
    return device


def _offload_device(device: torch.device, pruner: Pruner, model: nn.Module) -> torch.device:
    """``prune(device=...)`` checked before any work, once the pruner is bound and planned: a block-by-block round."""
    strategy = pruner.round_strategy.for_model(model, pruner.targets)
    if strategy.blocks is None:
        why = strategy.plan or f"{pruner.label} runs every layer at once ({pruner.criterion.describe()}, blocks=None)"
        raise ValueError(
            f"prune(device={str(device)!r}) moves one block at a time to the device, which needs a block-by-block "
            f"round; {why}. Use the defaults on a decoder, a preset such as SparseGPT(...), or blocks='auto' with a "
            "label-free criterion on a model of repeated blocks"
        )
    return device


def _label_free_hint(pruner: Pruner) -> str:
    options = pruner.criterion.label_free_options
    return f"; or prune without labels with {options}" if options else ""
