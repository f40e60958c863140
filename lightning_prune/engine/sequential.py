"""Layer-by-layer (sequential) calibration: a deep model's blocks one at a time, as SparseGPT and OBC do.

Pruning a block changes what every later block sees. Sequential calibration captures the inputs of
the first block over the round's batches, then for each block in turn: folds the block's layer
inputs into fresh statistics, lets the criterion prune the block, and runs the *pruned* block to get
the next block's inputs. So each layer compensates for the pruning upstream of it, and the memory
held at any time is one block's inputs over the batches plus that block's statistics, not every
layer's statistics at once.

Blocks are found by :func:`find_blocks`: ``"auto"`` takes the block list the layout registry names
(:mod:`lightning_prune.models.layouts`), else the ``nn.ModuleList`` of identical modules that holds
the most target weights (a decoder's ``layers``/``h``/``layer``; :func:`repeated_blocks`; a model
without one, an MLP or a CNN, is pruned in one pass over the whole model instead, see
:class:`~lightning_prune.engine.rounds.BlockByBlock`), or a glob names them
(``"model.layers.*"``; the outermost matches, in ``named_modules`` order). Blocks must run one after
the other, each on the previous one's output (its first positional argument) with the same keyword
arguments: true of Hugging Face decoders and encoders, whose layers all receive the same attention
mask and position embeddings. The keyword arguments of the first block's call are reused for all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.engine.calibration import Calibration, eval_mode, move_to_device, no_kv_cache
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.models import layouts
from lightning_prune.models.layouts import block_output
from lightning_prune.runtime.distributed import Collectives
from lightning_prune.runtime.offload import check_blocks, onloaded
from lightning_prune.stats.capture import LayerCapture
from lightning_prune.stats.estimators import Estimator
from lightning_prune.stats.passes import fold


@dataclass
class Block:
    name: str
    module: nn.Module
    targets: list[PruneTarget]


def find_blocks(model: nn.Module, blocks: str, targets: Sequence[PruneTarget]) -> list[Block]:
    """The blocks of ``model`` in execution order, each with the targets inside it.

    Raises a ``ValueError`` naming ``blocks`` if nothing matches, and naming the targets outside
    every block (sequential calibration never runs them, so it cannot prune them).
    """
    owner = _owners(targets)
    found = layouts.find_blocks(
        model, blocks, weigh=lambda m: len(_inside(m, owner)), holding=" holding target weights"
    )  # the list of blocks holding the most targets
    result = [Block(name, module, _inside(module, owner)) for name, module in found]
    covered = {t.name for b in result for t in b.targets}
    outside = [t.name for t in targets if t.name not in covered]
    if outside:
        raise ValueError(
            f"`blocks={blocks!r}` ({len(result)} blocks, {result[0].name} ... {result[-1].name}) leaves targets "
            f"outside every block: {outside[:5]}{' ...' if len(outside) > 5 else ''}. Sequential calibration only "
            "runs the blocks: exclude them (exclude=[...]) or name blocks that contain them"
        )
    return result


def repeated_blocks(model: nn.Module, targets: Sequence[PruneTarget]) -> list[tuple[str, nn.Module]]:
    """What ``blocks="auto"`` takes, as ``(name, block)`` pairs (:func:`find_blocks`'s choice); ``[]`` where no
    block list holds a target (an MLP, a CNN)."""
    owner = _owners(targets)
    try:
        found = layouts.find_blocks(model, "auto", weigh=lambda m: len(_inside(m, owner)))
    except ValueError:
        return []
    return found if any(_inside(m, owner) for _, m in found) else []


def _owners(targets: Sequence[PruneTarget]) -> dict[int, PruneTarget]:
    return {id(t.module): t for t in targets}


def _inside(module: nn.Module, owner: dict[int, PruneTarget]) -> list[PruneTarget]:
    """The targets (``owner``: by their layer's id) whose layer is ``module`` or inside it, in ``modules()`` order."""
    return [owner[id(m)] for m in module.modules() if id(m) in owner]


class _Caught(BaseException):  # not an error: passes through BatchError wrapping
    """Raised by the first block's pre-hook: everything after it is not needed."""


BlockInput = tuple[tuple[Any, ...], dict[str, Any]]


def first_block_inputs(calib: Calibration, batches: Sequence[Any], block: Block) -> list[BlockInput]:
    """The ``(args, kwargs)`` of ``block``'s call for every batch; the rest of each forward is skipped."""
    caught: list[BlockInput] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if "past_key_values" in kwargs:
            kwargs["past_key_values"] = None
        caught.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs))
        raise _Caught

    handle = block.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with eval_mode(calib.model), torch.no_grad(), no_kv_cache(calib.model), calib.forward_context():
            for i, batch in enumerate(batches):
                try:
                    calib.forward(batch, i)
                except _Caught:
                    continue
                raise RuntimeError(
                    f"block {block.name!r} was not called by the forward pass on batch {i} ({calib.describe()})"
                )
    finally:
        handle.remove()
    return caught


def onload(module: nn.Module, device: torch.device) -> torch.device:
    """Move ``module`` to ``device`` (its parameters keep their identity, so masks stay bound); returns
    where it was. The one place a block is moved (tests count the moves)."""
    home = next(module.parameters()).device
    module.to(device)
    return home


def offload(module: nn.Module, home: torch.device) -> None:
    """Move ``module`` back where :func:`onload` found it."""
    module.to(home)


@contextlib.contextmanager
def _on(module: nn.Module, device: torch.device | None) -> Iterator[None]:
    if device is None or next(module.parameters(), None) is None:
        yield
        return
    home = onload(module, device)
    try:
        yield
    finally:
        offload(module, home)


_ACCELERATORS = {"cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}


def _visible_devices() -> list[str]:
    """The devices this process can compute on, as ``torch.device`` strings (for error messages)."""
    found = ["cpu"]
    for kind in ("cuda", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            found += [f"{kind}:{i}" for i in range(backend.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return [repr(d) for d in found]


def check_device(device: torch.device, where: str) -> None:
    """Refuse, before any block is moved, a ``device`` a block cannot go to and come back from.

    ``meta`` tensors hold no data: a block moved there loses its weights and cannot be moved back (torch
    says so only on the way back, after the weights are gone). An accelerator this torch was not built
    with, or an index past the devices visible, fails inside the round with torch's own error. Anything
    else torch cannot allocate on and copy back is found by a one-element probe. ``where`` names the call.
    """
    fix = f"pass one this machine has ({', '.join(_visible_devices())}), or device=None to prune where the model is"
    if device.type == "meta":
        raise ValueError(
            f"{where}: meta tensors hold no data (shapes only), so a block moved there would lose its weights and "
            f"could not come back; {fix}"
        )
    name = _ACCELERATORS.get(device.type)
    backend = getattr(torch, device.type, None) if name is not None else None
    if name is not None:
        available = torch.backends.mps.is_available() if device.type == "mps" else backend.is_available()
        if not available:
            built = {"cuda": torch.backends.cuda.is_built, "mps": torch.backends.mps.is_built}.get(device.type)
            why = "was built without it" if built is not None and not built() else "sees no such device"
            raise ValueError(f"{where}: {name} is not available: this torch ({torch.__version__}) {why}; {fix}")
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"{where}: only {count} {name} device{'s are' if count != 1 else ' is'} visible (indices "
                f"0..{count - 1}); {fix}"
            )
    try:
        torch.zeros(1, device=device).cpu()
    except Exception as err:  # a device type torch knows by name but cannot use here
        raise ValueError(f"{where}: torch cannot hold a tensor there ({type(err).__name__}: {err}); {fix}") from None


def run_sequential(
    calib: Calibration,
    batches: Sequence[Any],
    blocks: Sequence[Block],
    comm: Collectives,
    prune_block: Callable[[Block, Estimator, Callable[[str], None]], None],
    make_stats: Callable[[Sequence[PruneTarget]], Estimator],
    *,
    reference: bool = False,
    progress_desc: str = "sequential calibration",
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Block by block: statistics of its layers' inputs, ``prune_block(block, stats, status)``, pruned outputs.

    ``make_stats(targets)`` gives a block's empty estimator (fed inputs only); ``prune_block`` changes
    the block's weights in place, and may say what it is doing with ``status(text)`` (shown beside the
    blocks' progress bar: a block of a large model takes minutes). Batches whose captured inputs are
    not finite are left out of that block's statistics (counted in the returned ``skipped``).
    ``reference``: the original outputs travel beside the pruned ones (each block run on them before
    it is pruned), and the estimator is fed pairs of original and pruned inputs (``update_pair``), so
    the block can fit its original outputs; this holds two streams of block inputs instead of one.
    ``device``: the model stays where it is (the CPU) and each block is moved to ``device`` for its
    statistics, its pruning and its outputs, then moved back, so the device holds one block, its
    statistics and the block inputs (the first block's inputs are computed where the model is). A block
    offloaded by accelerate is read from its weights map once and written back pruned (:func:`onloaded`).
    Returns ``{"blocks", "skipped", "block_input_bytes"}``, the last being the block inputs held.
    """
    check_blocks(calib.model, [b.module for b in blocks])
    inputs = first_block_inputs(calib, batches, blocks[0])
    if device is not None:
        inputs = [(move_to_device(args, device), move_to_device(kwargs, device)) for args, kwargs in inputs]
    originals = inputs  # the same objects until the first block is pruned
    held = sum(a.numel() * a.element_size() for args, _ in inputs for a in args if isinstance(a, Tensor))
    skipped = 0
    bar = calib.progress(len(blocks), progress_desc)
    try:
        with eval_mode(calib.model), torch.no_grad(), no_kv_cache(calib.model), calib.forward_context():
            for block in blocks:
                bar.describe(f"{block.name}: calibrating")
                changed = [(t.module, t.param_name) for t in block.targets]  # what the round writes
                with onloaded(block.module, changed), _on(block.module, device):
                    inputs, originals, left_out = _run_block(
                        block, inputs, originals, reference, partial(prune_block, status=bar.describe), make_stats
                    )
                skipped += left_out
                if reference:
                    held = max(held, 2 * sum(a[0].numel() * a[0].element_size() for a, _ in inputs))
                bar()
    finally:
        bar.close()
    return {"blocks": len(blocks), "skipped": skipped, "block_input_bytes": held}


def _run_block(
    block: Block,
    inputs: list[BlockInput],
    originals: list[BlockInput],
    reference: bool,
    prune_block: Callable[[Block, Estimator], None],
    make_stats: Callable[[Sequence[PruneTarget]], Estimator],
) -> tuple[list[BlockInput], list[BlockInput], int]:
    """One block of :func:`run_sequential`: its statistics, ``prune_block``, and the next block's inputs
    (and originals), as the pruned (and the unpruned) block gives them, and the batches its statistics left out."""
    next_originals, skipped = [], 0
    if block.targets:
        stats = make_stats(block.targets)
        by_name = {t.name: t for t in block.targets}
        capture = LayerCapture(block.targets, inputs_only=True)
        capture.attach()
        try:
            for (args, kwargs), (ref_args, ref_kwargs) in zip(inputs, originals):
                same = ref_args is args
                if reference:  # the unpruned block on the original inputs: x_ref and the next originals
                    next_originals.append(block_output(block.module(*ref_args, **ref_kwargs)))
                    ref = {t.name: x for t, x, _ in capture.drain()}
                if not (reference and same):
                    block.module(*args, **kwargs)
                items = ref if reference and same else {t.name: x for t, x, _ in capture.drain()}
                rows = [(by_name[n], x, None, ref[n] if reference else None) for n, x in items.items()]
                if fold(stats, rows):
                    stats.end_batch()
        finally:
            capture.detach()
        stats.reduce_()
        skipped = stats.skipped
        prune_block(block, stats)
    elif reference:
        next_originals = [block_output(block.module(*a, **k)) for a, k in originals]
    inputs = [((block_output(block.module(*args, **kwargs)), *args[1:]), kwargs) for args, kwargs in inputs]
    if reference:
        originals = [((out, *a[1:]), k) for out, (a, k) in zip(next_originals, originals)]
    else:
        originals = inputs
    return inputs, originals, skipped
