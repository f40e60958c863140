"""Passes over stored batches that fill an estimator: one capture loop, run four ways.

Every pass hooks the target layers (:class:`~lightning_prune.stats.capture.LayerCapture`), runs
each batch in eval mode (BatchNorm statistics and metric states untouched, see
:mod:`lightning_prune.engine.calibration`), turns what the hooks saw into *rows* ``(target, x, g, x_ref)``,
folds a batch's rows into the estimator only if all are finite (else counts it in ``skipped``), and
all-reduces the estimator at the end. What differs is how a batch becomes rows:

* :func:`calibration_pass`: the loss's gradients at the current weights (``torch.autograd.grad``,
  the model's ``.grad`` untouched), or forward passes only for label-free statistics;
* :func:`reference_pass`: pairs of inputs, each batch run with some layers at the round's original
  weights and again at the current ones (OBS fitting the outputs layers gave before the round);
* :func:`fisher_pass`: the ``"mc"``/``"exact"`` Fisher, output-space directions backpropagated from
  the logits of the loss's own call (:mod:`lightning_prune.stats.fisher`);
* a block of a model run on its stored inputs (:mod:`lightning_prune.engine.rounds`, block by block).

:func:`fold` is the step they share with the training window (:mod:`lightning_prune.stats.window`).
:func:`collect` picks the pass an estimator needs.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_prune.engine.calibration import Calibration, batch_size, eval_mode, no_kv_cache
from lightning_prune.engine.targets import PruneTarget
from lightning_prune.runtime.numerics import exact_float32
from lightning_prune.stats.capture import LayerCapture, LossTerms, all_finite, per_sample_factor
from lightning_prune.stats.estimators import Estimator
from lightning_prune.stats.fisher import directions, loss_call, resolve

Row = tuple[PruneTarget, Tensor, Tensor | None, Tensor | None]  # target, inputs, output gradients, reference inputs
Rows = Callable[[LayerCapture, int, Any], list[Row]]  # a batch -> its rows


def fold(estimator: Estimator, rows: Sequence[Row], *, checked: bool = False) -> bool:
    """Fold one step's rows into ``estimator`` (float32 sums, TF32 off); ``False``, and the step counted
    in ``skipped``, if any input or gradient is not finite (``checked``: the caller knows they are)."""
    items = [(t, x, g) for t, x, g, _ in rows] + [(t, r, None) for t, _, _, r in rows if r is not None]
    if not checked and not all_finite(items):
        estimator.skipped += 1
        return False
    with exact_float32():
        for t, x, g, x_ref in rows:
            if x_ref is None:
                estimator.update(t.name, x, g)
            else:
                estimator.update_pair(t.name, x_ref, x)
    return True


def run_pass(
    calib: Calibration,
    batches: Sequence[Any],
    estimator: Estimator,
    layers: Sequence[PruneTarget],
    rows: Rows,
    *,
    grad: bool,
    desc: str,
) -> Estimator:
    """The capture loop: ``rows`` turns each batch into rows; a batch with none, or with a non-finite
    one, is counted in ``skipped``; the others are folded; then the estimator is all-reduced."""
    capture = LayerCapture(layers, inputs_only=not grad)
    bar = calib.progress(len(batches), desc)
    capture.attach()
    try:
        with eval_mode(calib.model), torch.set_grad_enabled(grad), no_kv_cache(calib.model), calib.forward_context():
            for i, batch in enumerate(batches):
                got = rows(capture, i, batch)
                if not got:
                    estimator.skipped += 1
                elif fold(estimator, got):
                    estimator.end_batch()
                bar()
    finally:
        capture.detach()
        bar.close()
    estimator.reduce_()
    return estimator


def calibration_pass(
    calib: Calibration,
    batches: Sequence[Any],
    estimator: Estimator,
    layers: Sequence[PruneTarget],
    reduction: str = "mean",
    desc: str = "calibration",
) -> Estimator:
    """Fold ``batches`` into ``estimator`` at the *current* weights, then all-reduce it: the loss's
    gradients for estimators that need them (rescaled to per-sample loss gradients, counting the loss
    terms each sample holds), forward passes otherwise. Used by ``prune()`` for a round's statistics
    and to recompute them inside a round (as M-FAC/oBERT do)."""
    needs_grad = estimator.needs_grad
    if needs_grad and not calib.has_loss(batches[0] if batches else None):
        raise ValueError(
            f"{desc} needs gradients, and there is no loss ({calib.describe()}): pass loss_fn=lambda model, batch: ..."
        )
    terms = LossTerms()

    def scale(samples: int, weight: float | None) -> float:
        return per_sample_factor(samples, reduction=reduction, accumulate=1, loss_scale=1.0, terms=weight)

    def rows(capture: LayerCapture, i: int, batch: Any) -> list[Row]:
        if not needs_grad:
            calib.forward(batch, i)
            return [(t, x, None, None) for t, x, _ in capture.drain()]
        terms.reset()
        with terms:
            loss = calib.loss(batch, i)
        capture.grad(loss)
        items = list(capture.drain())
        if not items or not all_finite(items):
            return []
        weight, counted = terms.weight(float(loss.detach()))
        estimator.note_terms(batch_size(batch) or items[0][1].shape[0], counted)
        return [(t, x, g * scale(x.shape[0], weight), None) for t, x, g in items]

    return run_pass(calib, batches, estimator, layers, rows, grad=needs_grad, desc=desc)


@contextlib.contextmanager
def swapped_weights(targets: Sequence[PruneTarget], weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Run with ``weights`` (this rank's blocks, by target name) in place of the targets' own,
    restored afterwards (copied in place, so hooks, optimizers and FSDP2 keep their tensors)."""
    own = {t.name: t.local_param.clone() for t in targets}
    try:
        with torch.no_grad():
            for t in targets:
                t.local_param.copy_(weights[t.name])
        yield
    finally:
        with torch.no_grad():
            for t in targets:
                t.local_param.copy_(own[t.name])


def reference_pass(
    calib: Calibration,
    batches: Sequence[Any],
    estimator: Estimator,
    layers: Sequence[PruneTarget],
    reference: Mapping[str, Tensor],
    swap: Sequence[PruneTarget],
    desc: str = "reference inputs",
) -> Estimator:
    """Fold pairs ``(x_ref, x)`` of the ``layers``' inputs into ``estimator.update_pair``, then all-reduce it.

    Each batch runs twice, forward only: with the ``swap`` layers at their ``reference`` weights
    (``x_ref``, what the layers saw before they were pruned), and at the current weights (``x``).
    Only a batch's captured inputs are held at a time."""

    def rows(capture: LayerCapture, i: int, batch: Any) -> list[Row]:
        with swapped_weights(swap, reference):
            calib.forward(batch, i)
        refs = {t.name: x for t, x, _ in capture.drain()}
        calib.forward(batch, i)
        return [(t, x, None, refs[t.name]) for t, x, _ in capture.drain()]

    return run_pass(calib, batches, estimator, layers, rows, grad=False, desc=desc)


def fisher_pass(
    calib: Calibration,
    batches: Sequence[Any],
    estimator: Estimator,
    layers: Sequence[PruneTarget],
    *,
    fisher_type: str,
    mc_samples: int = 1,
    round_index: int = 0,
    desc: str = "Fisher",
) -> Estimator:
    """Fold the ``"mc"`` or ``"exact"`` Fisher of ``batches`` into ``estimator``, then all-reduce it.

    Labels are sampled from a generator seeded by ``torch.initial_seed()`` (``seed_everything``),
    the round and the batch: reruns are reproducible and every rank samples alike for the same data.
    """
    if not batches:
        return estimator
    if not calib.has_loss(batches[0]):
        raise ValueError(f"fisher_type={fisher_type!r} needs the model's loss, and there is {calib.describe()}")

    def rows(capture: LayerCapture, i: int, batch: Any) -> list[Row]:
        capture.clear()
        loss, call = loss_call(calib, batch, i)
        seed = zlib.crc32(f"{torch.initial_seed()}/{round_index}/{i}".encode())
        generator = torch.Generator(device=call.logits.device).manual_seed(seed)
        samples = capture.samples() or call.logits.shape[0]
        # c_r = samples * s, whatever the reduction (the call's own says what s is): the estimators'
        # mean over samples is then the GGN of the loss itself (capture.per_sample_factor's rule)
        terms = (call.target != call.ignore_index).sum() if call.kind == "cross_entropy" else None
        estimator.note_terms(samples, None if terms is None else float(terms))
        vs, weight = directions(call, loss, samples, samples, fisher_type, mc_samples, generator)
        stacked: dict[str, tuple[PruneTarget, list[Tensor], list[Tensor]]] = {}
        for d, v in enumerate(vs):
            capture.grad(call.logits, grad_outputs=v, retain_graph=d + 1 < len(vs))
            for t, x, g in capture.drain(keep_inputs=True):
                entry = stacked.setdefault(t.name, (t, [], []))
                entry[1].append(x)
                entry[2].append(g)  # type: ignore[arg-type]
        scale = math.sqrt(weight * len(vs))
        return [(t, torch.cat(xs), torch.cat(gs) * scale, None) for t, xs, gs in stacked.values()]

    return run_pass(calib, batches, estimator, layers, rows, grad=True, desc=f"{desc} ({fisher_type})")


def collect(
    calib: Calibration,
    batches: Sequence[Any],
    estimator: Estimator,
    layers: Sequence[PruneTarget],
    *,
    fisher_type: str = "empirical",
    mc_samples: int = 1,
    reduction: str = "mean",
    round_index: int = 0,
    desc: str = "calibration",
) -> Estimator:
    """A round's statistics from stored batches: the pass ``estimator`` needs (its own, for Hutchinson's
    Hessian-vector products; else by Fisher type, the empirical one being a calibration pass)."""
    if (own := getattr(estimator, "calibrate", None)) is not None:
        own(calib, batches, round_index)
        return estimator
    fisher_type = resolve(calib, batches, fisher_type)
    estimator.fisher_type = fisher_type
    if fisher_type == "empirical" or not estimator.needs_grad:
        return calibration_pass(calib, batches, estimator, layers, reduction, desc=desc)
    return fisher_pass(
        calib, batches, estimator, layers, fisher_type=fisher_type, mc_samples=mc_samples, round_index=round_index,
        desc=desc,
    )  # fmt: skip
