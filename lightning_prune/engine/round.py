"""One pruning round, top to bottom, without Lightning; and ``prune()``, a round with no Trainer.

:func:`run_round` is the only place a round happens. Inside ``Trainer.fit`` the callback adapter
calls it with the batches and the capture window of the training steps before the round; ``prune()``
calls it with batches taken from any iterable and no window, so the statistics come from one
calibration pass over them. Everything after the statistics is the same code.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

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
from lightning_prune.engine.pruner import Pruner, as_pruner
from lightning_prune.engine.rounds import PARTIAL
from lightning_prune.engine.summary import round_summary
from lightning_prune.runtime.distributed import LOCAL, Collectives, default_collectives, global_rank, warn
from lightning_prune.stats.window import CaptureWindow


def run_round(
    pruner: Pruner,
    calib: Calibration,
    batches: list[Any],
    sparsity: float,
    *,
    window: CaptureWindow | None = None,
    comm: Collectives = LOCAL,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    trigger: str = "prune",
    skipped: int = 0,
    point: int | None = None,
    epoch: int | None = None,
    global_step: int | None = None,
    monitor: Mapping[str, float] | None = None,
    source: str = "the round's batches",
    solver_budget: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Statistics -> loss before -> criterion -> commit -> loss after -> record.

    ``window`` holds the statistics of the training steps that produced ``batches``; without one,
    a criterion that needs statistics gets them from a calibration pass over ``batches`` at the
    current weights. ``skipped`` counts batches the caller already left out as non-finite.
    ``solver_budget`` bounds the work of OBS's ``solver="auto"`` for the whole round (``None``: the
    per-layer budget). ``should_stop`` (e.g. a SIGTERM flag) is checked between layers (and between
    batches of a pass, in one process): the round then raises
    :class:`~lightning_prune.engine.calibration.RoundInterrupted` with every weight restored and no mask
    changed; ``device`` (a sequential round only) moves one block at a time there to prune it. A
    sequential round (``blocks=``) keeps one block's copy, so the blocks it finished stay
    pruned, with their masks committed, and the error says so. Returns the record appended to
    ``pruner.history``.
    """
    start = time.perf_counter()
    targets, criterion = pruner.targets, pruner.criterion

    round_index = len(pruner.history)
    if should_stop is not None and comm.world_size == 1:  # between the batches of the round's passes, until the commit
        calib.should_stop = should_stop
    # a round with nothing to remove (target=0, or masks already there) leaves every weight as it is:
    # no statistics, no criterion (OBS would refit the weights it keeps), no commit
    idle = not pruner.removes_something(sparsity)

    # 1. statistics, all-reduced across ranks (the strategy says where they come from: the window, one
    # pass, or block by block in step 3); non-finite ones refuse before any weight is touched
    if idle:
        stats = None
        if window is not None:
            window.discard()
    else:
        stats = pruner.round_strategy.statistics(criterion, calib, batches, targets, window, comm, round_index)
    skipped = _total(skipped + (stats.skipped if stats is not None else 0), comm, calib)
    if skipped:
        warn(f"round {round_index}: {skipped} batches had non-finite inputs or gradients and were left out")
    if stats is not None and (bad := stats.nonfinite_layers()):
        raise RuntimeError(
            f"round {round_index}: the statistics of {bad[:5]} are not finite (NaN/inf inputs or gradients in "
            f"{source}); refusing before touching any weight"
        )

    # 2. loss before, on the last eval_batches batches
    eval_batches = batches[max(0, len(batches) - pruner.eval_batches) :] if pruner.eval_batches else []
    loss_measured = bool(eval_batches) and calib.has_loss(eval_batches[0])
    loss_before = calib.mean_loss(eval_batches, comm)

    # 3. criterion: new masks, and for OBS moved weights (restored if the criterion fails half-way)
    before = pruner.current_masks()
    saved = {} if idle else pruner.round_strategy.originals(criterion, targets)
    ctx = RoundContext(
        model=calib.model,
        targets=targets,
        masks=before,
        sparsity=sparsity,
        batches=batches,
        stats=stats,
        calib=calib,
        comm=comm,
        round_index=round_index,
        scope=pruner.scope,
        pattern=pruner.pattern,
        min_density=pruner.min_density,
        source=source,
        solver_budget=solver_budget,
        reference=saved or None,
        should_stop=should_stop,
        device=device,
    )
    try:
        result = RoundResult(before, 0.0, info={"idle": True}) if idle else pruner.round_strategy.prune(criterion, ctx)
    except BaseException as err:
        with torch.no_grad():
            for t in targets:
                if t.name in saved:
                    t.local_param.copy_(saved[t.name])
        if (partial := getattr(err, PARTIAL, None)) is not None:  # blocks a sequential round finished stay pruned
            pruner.commit_(partial, before, comm, optimizers)
        raise
    finally:
        calib.should_stop = never  # from here on the round completes: its masks are committed
    del saved
    ctx.reference = None

    # 4. commit: masks only shrink, pruned weights and their optimizer moments are zeroed, ranks agree
    if not idle:
        pruner.commit_(result, before, comm, optimizers)

    # 5. loss after, on the same batches
    loss_after = loss_before if idle else calib.mean_loss(eval_batches, comm)

    # 6. the record
    masks = pruner.current_masks()
    kept, numel = pruner.kept_counts(), {t.name: t.param.numel() for t in targets}  # whole layers when sharded
    pruned, total = sum(numel.values()) - sum(kept.values()), sum(numel.values())
    structures = pruner.pattern.structures(masks)
    record = {
        "round": len(pruner.history),
        "trigger": trigger,
        "epoch": epoch,
        "global_step": global_step,
        "target": pruner.target,
        "target_sparsity": sparsity,
        "pattern": str(pruner.pattern),
        "sparsity": pruned / total,
        "pruned": pruned,
        "total": total,
        **({"structures_pruned": structures[0], "structures_total": structures[1]} if structures else {}),
        "predicted_loss_increase": float(result.predicted_loss_increase),
        "actual_loss_increase": loss_after - loss_before,
        "loss_measured": loss_measured,  # False: no loss or no eval batch (the losses are NaN, "not measured")
        "loss_before": loss_before,
        "loss_after": loss_after,
        "layer_sparsity": {n: (numel[n] - kept[n]) / max(numel[n], 1) for n in numel},
        "monitor": dict(monitor or {}),
        "info": {
            **result.info,
            "skipped_batches": skipped,
            **({"fisher_type": stats.fisher_type} if stats is not None and stats.needs_grad else {}),
            **(
                {"loss_terms_per_sample": stats.terms_per_sample}
                if stats is not None and stats.needs_grad and stats.samples_seen
                else {}
            ),
        },
        "seconds": time.perf_counter() - start,
    }
    pruner._record(record, point)
    return record


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
) -> Mapping[str, Any]:
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
            run where the model is. ``None`` (default): everything runs where the model is.

    Returns:
        The round's record (the fields of ``pruner.history[-1]``). The model is left pruned, with
        plain state-dict keys; ``pruner.masks`` holds the masks, so passing the same ``pruner`` to a
        Trainer fine-tunes with them frozen.
    """
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
    pruner = core  # a callback prunes through the Pruner it wraps
    pruner.bind(model)
    plan = pruner.plan_one_shot(model)
    if plan is not None and pruner.verbose >= 1 and global_rank() == 0:
        print(f"{pruner.label}: {plan}", flush=True)
    if device is not None:
        device = _offload_device(device, pruner, model)  # the round moves each block there
    calib = Calibration(
        model,
        loss_fn if loss_fn is not None else pruner.loss_fn,
        training_step=getattr(model, "automatic_optimization", True),
        output_loss=True,
        progress=tqdm_progress if pruner.verbose >= 1 else no_progress,
    )
    n = pruner.window_length if num_batches is None else num_batches
    home = next(iter(model.parameters())).device
    batches = [move_to_device(b, home) for b in itertools.islice(iter(data), n)]
    if len(batches) < n:
        warn(f"prune(): `data` gave {len(batches)} batches, fewer than num_batches={n}; the round uses all of them")
    if pruner.criterion.needs_gradients and not calib.has_loss(batches[0] if batches else None):
        raise ValueError(
            f"{pruner.label} needs gradients of a loss, and {type(model).__name__} has none "
            f"({calib.describe()}): pass loss_fn=lambda model, batch: ... (the mean loss over the batch)"
            + _label_free_hint(pruner)
        )
    record = run_round(
        pruner,
        calib,
        batches,
        pruner.target,
        comm=default_collectives(),
        source=f"the {len(batches)} batches of `data`",
        device=device,
    )
    if plan is not None:
        record["info"]["plan"] = plan
    if pruner.verbose >= 1 and global_rank() == 0:
        print(round_summary(record), flush=True)
        if pruner.verbose >= 2:
            print(pruner.layer_table(), flush=True)
    return record


def _offload_device(device: str | torch.device, pruner: Pruner, model: nn.Module) -> torch.device:
    """``prune(device=...)`` checked before any work: a device torch knows, a block-by-block round."""
    from lightning_prune.engine.sequential import check_offload

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be a torch device (e.g. 'cuda', 'cuda:1'), got {device!r}: {err}") from err
    if pruner.round_strategy.blocks is None:
        raise ValueError(
            f"prune(device={str(device)!r}) moves one block at a time to the device, which needs a block-by-block "
            f"round; {pruner.label} runs every layer at once ({pruner.criterion.describe()}, blocks=None). Use the "
            "defaults on a decoder, a preset such as SparseGPT(...), or blocks='auto' with a label-free criterion"
        )
    check_offload(model, device)  # the blocks were found when the pruner was bound
    return device


def _label_free_hint(pruner: Pruner) -> str:
    options = pruner.criterion.label_free_options
    return f"; or prune without labels with {options}" if options else ""
