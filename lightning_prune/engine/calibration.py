"""Side-effect-free losses and forward passes on stored batches, and the calibration pass.

A round evaluates the loss on stored batches (the actual loss increase), and some criteria need
extra passes over them: Hutchinson's Hessian-vector products, curvature recomputed inside an OBS
round, and in ``prune()`` every statistic. Those passes must not disturb training, so they run:

* in eval mode (BatchNorm running statistics untouched, dropout off), restoring each module's
  own ``training`` flag afterwards;
* with the side effects of a borrowed ``training_step`` suppressed, when the loss comes from it: the
  guards registered with :func:`guard_borrowed_steps` (the Lightning adapter's,
  :mod:`lightning_prune.callbacks.isolation`, mutes ``self.log`` and restores torchmetrics' states).

Where the loss comes from (:class:`Calibration`), first match wins:

1. ``loss_fn(model, batch) -> mean loss over the batch``;
2. ``model.training_step(batch, batch_idx)`` (its tensor or its ``"loss"`` entry), for a
   LightningModule under automatic optimization;
3. with ``output_loss=True`` (``prune()``), the ``.loss`` of the model's output: Hugging Face
   models called with ``labels`` in the batch.

Without a loss a batch can still be *run* (:func:`default_forward`: ``model(**batch)`` for a
mapping, ``model(batch[0])`` for a tuple or list, ``model(batch)`` otherwise), which is all that
label-free statistics need; criteria that need gradients refuse before any work.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lightning_prune.runtime.distributed import LOCAL, Collectives, global_rank

LossFn = Callable[[nn.Module, Any], Tensor]


class Progress(Protocol):
    def __call__(self, n: int = 1) -> None: ...

    def describe(self, text: str) -> None:
        """What the current step is doing (shown beside the bar): a long step is never silent."""

    def close(self) -> None: ...


ProgressFactory = Callable[[int, str], Progress]


class _NoProgress:
    def __call__(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def no_progress(total: int, desc: str) -> Progress:
    return _NoProgress()


class _Tqdm:
    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)

    def __call__(self, n: int = 1) -> None:
        self.bar.update(n)

    def describe(self, text: str) -> None:
        self.bar.set_postfix_str(text)  # redraws now, with the elapsed time

    def close(self) -> None:
        self.bar.close()


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def tqdm_progress(total: int, desc: str) -> Progress:
    """A tqdm bar on rank 0 (nothing elsewhere, or for an empty pass). tqdm comes with Lightning, not
    with torch: the core, installed with torch and numpy alone, runs its rounds without a bar (the
    round's lines still print)."""
    if global_rank() != 0 or total <= 0 or not _has_tqdm():
        return _NoProgress()
    return _Tqdm(total, desc)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


StepGuard = Callable[[nn.Module], AbstractContextManager[Any]]
"""``guard(model)``: a context that suppresses what re-running ``model.training_step`` on a stored batch
would change outside the loss (a framework's logging, accumulated metrics)."""

_STEP_GUARDS: list[StepGuard] = []


def guard_borrowed_steps(guard: StepGuard) -> StepGuard:
    """Apply ``guard`` around every borrowed ``training_step`` call of every :class:`Calibration` built
    after this (once, however often it is registered). The core knows no training framework: the adapter
    that knows the step's side effects registers their guard (usable as a decorator)."""
    if guard not in _STEP_GUARDS:
        _STEP_GUARDS.append(guard)
    return guard


class RoundInterrupted(BaseException):
    """The run was asked to stop (SIGTERM) inside a round: raised between layers (and between batches
    of a pass), so the round stops within one layer's solve and restores the weights it moved. A
    ``BaseException``, like ``KeyboardInterrupt``: code that catches ``Exception`` does not swallow it."""


class BatchError(RuntimeError):
    """The model, its ``training_step`` or ``loss_fn`` failed on a stored batch; says which call, on
    which batch, and the batch's structure (the original exception is chained)."""


def never() -> bool:
    return False


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by lightning_prune's own code (its innermost frame is ours)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("lightning_prune.")


def describe_batch(batch: Any, depth: int = 0) -> str:
    """A batch's structure and shapes, e.g. ``{'input_ids': int64[4, 16], 'labels': int64[4, 16]}``."""
    if isinstance(batch, Tensor):
        return f"{str(batch.dtype).removeprefix('torch.')}{list(batch.shape)}"
    if depth > 2:
        return "..."
    if isinstance(batch, Mapping):
        items = [f"{k!r}: {describe_batch(v, depth + 1)}" for k, v in list(batch.items())[:8]]
        return "{" + ", ".join(items) + (", ..." if len(batch) > 8 else "") + "}"
    if isinstance(batch, (tuple, list)):
        items = [describe_batch(v, depth + 1) for v in batch[:8]]
        inner = ", ".join(items) + (", ..." if len(batch) > 8 else "")
        return f"({inner})" if isinstance(batch, tuple) else f"[{inner}]"
    return type(batch).__name__


@contextlib.contextmanager
def no_kv_cache(model: nn.Module) -> Iterator[None]:
    """Hugging Face models build a key/value cache in eval mode; calibration must not grow one."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "use_cache")}
    saved = {k: c.use_cache for k, c in configs.items()}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for k, c in configs.items():
            c.use_cache = saved[k]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on a batch by the usual conventions (see the module docstring)."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def implements_forward(module: nn.Module) -> bool:
    """Whether ``module`` has a ``forward`` of its own. A LightningModule may implement only ``training_step``
    (around a Hugging Face model in ``self.model``): its inherited ``forward`` fails on the batch
    (``_forward_unimplemented() got an unexpected keyword argument``), so it must be run another way."""
    fn = getattr(type(module), "forward", None)
    if fn is None or fn is nn.Module.forward:
        return False
    inherited = getattr(fn, "__qualname__", "") == "LightningModule.forward"
    return not (inherited and str(getattr(fn, "__module__", "")).startswith(("lightning", "pytorch_lightning")))


def output_module(model: nn.Module, holds: Sequence[nn.Module]) -> tuple[str, nn.Module] | None:
    """The module whose output is ``model``'s: ``("", model)`` if it implements ``forward``, else the outermost
    submodule that does and holds every module of ``holds`` (the Hugging Face model a LightningModule keeps in
    ``self.model``); ``None`` if there is none."""
    if implements_forward(model):
        return "", model
    wanted = {id(m) for m in holds}
    for name, module in model.named_modules():
        if name and implements_forward(module) and wanted <= {id(m) for m in module.modules()}:
            return name, module
    return None


def batch_runner(model: nn.Module, loss_fn: LossFn | None, what: str) -> Callable[[Any, int], Any]:
    """How a pass that only needs ``model`` to run on each batch (its hooks read what they need) calls it:
    its own ``forward`` (:func:`default_forward`), else as ``prune()`` would, ``loss_fn(model, batch)`` or a
    LightningModule's ``training_step`` (logging muted, metrics restored). A module with none of them is
    refused now, before any pass, naming ``what`` needs it and how to fix it."""
    if implements_forward(model):
        return lambda batch, batch_idx: default_forward(model, batch)
    calib = Calibration(model, loss_fn, training_step=getattr(model, "automatic_optimization", True))
    if calib.source is None:
        children = [n for n, _ in model.named_children()]
        raise ValueError(
            f"{what} runs {type(model).__name__} on every batch, and {type(model).__name__} implements neither "
            "forward nor training_step (nn.Module's forward is unimplemented): pass loss_fn=lambda model, batch: ... "
            f"(it is what runs each batch), implement forward, or pass the model inside (children: {children})"
        )
    return calib.run


def _output_loss(out: Any) -> Tensor | None:
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def batch_size(batch: Any) -> int | None:
    """The leading dimension of the first tensor in a batch (mappings, lists and tuples searched in order)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else []
    return next((s for v in values if (s := batch_size(v)) is not None), None)


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (in mappings, lists, tuples and named tuples, or anything with ``.to``) on ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping) and not hasattr(batch, "to"):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if hasattr(batch, "to"):  # e.g. transformers' BatchEncoding
        return batch.to(device)
    return batch


class Calibration:
    """How a round gets a loss (or just a forward pass) from a stored batch, without side effects.

    Args:
        model: the module whose weights are pruned.
        loss_fn: ``loss_fn(model, batch) -> mean loss``; takes precedence over everything else.
        training_step: borrow ``model.training_step`` when there is no ``loss_fn``.
        output_loss: use the ``.loss`` of :func:`default_forward`'s output as a last resort.
        forward_context: context for every forward pass (the Lightning adapter passes the
            precision plugin's autocast).
        progress: factory of progress bars for passes over the batches.
        step_guards: contexts around each borrowed ``training_step`` call (default: the registered ones,
            :func:`guard_borrowed_steps`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        *,
        training_step: bool = False,
        output_loss: bool = False,
        forward_context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        progress: ProgressFactory = no_progress,
        step_guards: Sequence[StepGuard] | None = None,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.step_guards = tuple(_STEP_GUARDS if step_guards is None else step_guards)
        self.forward_context, self.progress = forward_context, progress
        # checked before every batch of a pass (one process only: ranks may hold different batch counts,
        # so distributed rounds check between layers, together: RoundContext.check_interrupt)
        self.should_stop: Callable[[], bool] = never
        if loss_fn is not None:
            self.source: str | None = "loss_fn"
        elif training_step and callable(getattr(model, "training_step", None)):
            self.source = "training_step"
        elif output_loss:
            self.source = "output"
        else:
            self.source = None
        self._output_has_loss: bool | None = None  # known after the first forward of an "output" source

    def has_loss(self, probe: Any = None) -> bool:
        """Whether a loss is available; an ``"output"`` source is probed on the batch ``probe``."""
        if self.source == "output" and self._output_has_loss is None and probe is not None:
            with torch.no_grad(), eval_mode(self.model), no_kv_cache(self.model), self.forward_context():
                self._output_has_loss = _output_loss(self._forward(probe, 0)) is not None
        return self.source in ("loss_fn", "training_step") or bool(self._output_has_loss)

    def describe(self) -> str:
        return {
            "loss_fn": "loss_fn",
            "training_step": "the LightningModule's training_step",
            "output": "the model output's `.loss`",
        }.get(self.source or "", "no loss")

    def _call(self, call: str, fn: Callable[[], Any], batch: Any, batch_idx: int) -> Any:
        """``fn()``, with a failure turned into a :class:`BatchError` that names the call and the batch."""
        if self.should_stop():
            raise RoundInterrupted(f"the round stopped before batch {batch_idx} of a pass: the run was asked to stop")
        try:
            return fn()
        except BatchError:
            raise
        except Exception as err:
            if _raised_here(err):  # this library's own hooks (capture, the Fisher's loss spy) say what is wrong
                raise
            raise BatchError(
                f"{call} failed on batch {batch_idx} of the round, {describe_batch(batch)}: "
                f"{type(err).__name__}: {err}. Batches are passed as the data gives them (pass loss_fn=lambda model, "
                "batch: ... to say how this model takes them)"
            ) from err

    def run(self, batch: Any, batch_idx: int) -> Any:
        """What ``loss_fn``, ``training_step`` (logging muted, metrics restored) or the model's forward, whichever
        this calibration uses, returns on one batch: a pass that only needs the model run (hooks)."""
        if self.source == "loss_fn":
            return self._call("loss_fn(model, batch)", lambda: self.loss_fn(self.model, batch), batch, batch_idx)  # type: ignore[misc]
        if self.source == "training_step":
            with contextlib.ExitStack() as guarded:
                for guard in self.step_guards:
                    guarded.enter_context(guard(self.model))
                return self._call(
                    f"{type(self.model).__name__}.training_step(batch, batch_idx)",
                    lambda: self.model.training_step(batch, batch_idx),  # type: ignore[operator]
                    batch,
                    batch_idx,
                )
        return self._forward(batch, batch_idx)

    def loss(self, batch: Any, batch_idx: int) -> Tensor:
        """Mean loss of one batch, with autograd enabled or not as the caller decides."""
        if self.source == "loss_fn":
            loss = self.run(batch, batch_idx)
        elif self.source == "training_step":
            out = self.run(batch, batch_idx)
            loss = out.get("loss") if isinstance(out, dict) else out
        elif self.source == "output":
            loss = _output_loss(self._forward(batch, batch_idx))
            self._output_has_loss = loss is not None
            if loss is None:
                raise ValueError(
                    f"{type(self.model).__name__}'s output has no `.loss`: pass loss_fn=lambda model, batch: ... "
                    "(or batches with labels for a Hugging Face model)"
                )
        else:
            raise ValueError(
                f"no loss for {type(self.model).__name__}: pass loss_fn=lambda model, batch: ... (mean over the batch)"
            )
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(
                f"the pruning loss must be a scalar tensor; {self.describe()} returned "
                f"{type(loss).__name__} - pass loss_fn=lambda model, batch: ... to the pruner"
            )
        return loss.reshape(())

    def forward(self, batch: Any, batch_idx: int) -> None:
        """Run the model on a batch (through the loss when there is one)."""
        if self.source in ("loss_fn", "training_step"):
            self.loss(batch, batch_idx)
        else:
            self._forward(batch, batch_idx)

    def _forward(self, batch: Any, batch_idx: int) -> Any:
        call = (
            "model(**batch)"
            if isinstance(batch, Mapping)
            else "model(batch[0])"
            if isinstance(batch, (tuple, list))
            else "model(batch)"
        )
        return self._call(
            f"{type(self.model).__name__}: {call}", lambda: default_forward(self.model, batch), batch, batch_idx
        )

    @torch.no_grad()
    def mean_loss(self, batches: Sequence[Any], comm: Collectives = LOCAL) -> float:
        """Mean loss over ``batches`` in eval mode, averaged over ranks (NaN without a loss or batches)."""
        if not batches or not self.has_loss(batches[0]):
            return math.nan
        total = 0.0
        with eval_mode(self.model), no_kv_cache(self.model), self.forward_context():
            for i, batch in enumerate(batches):
                total += float(self.loss(batch, i).float())
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        return comm.mean(total / len(batches), device)
