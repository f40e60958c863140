"""Which Fisher: empirical (observed labels), Monte-Carlo (sampled labels) or exact (the GGN).

The empirical Fisher averages ``g g^T`` of per-sample gradients at the *observed* labels. It comes
free from the training steps, but at a minimum that fits its data those gradients vanish and it
says little about curvature (Kunstner et al. 2019). For softmax cross-entropy and MSE the *true*
Fisher equals the generalised Gauss-Newton matrix ``J^T Lambda J``, with ``Lambda`` the Hessian of
the loss in the model output, which stays informative at convergence:

* ``"mc"``: labels sampled from the model's predictive distribution (``mc_samples`` per input);
  an unbiased estimate of the GGN, for any output shape (sequences included). It is heavy-tailed on
  a confident model: the rare sampled label that is not the prediction carries nearly all the
  curvature. Measured (converged Fashion-MNIST MLP, OBD one-shot 90%, seed 0): 1 / 4 / 16 / 64
  samples 25.3 / 36.4 / 50.9 / 64.6% test accuracy, exact 63.6%; with few classes ``"exact"``
  is the cheaper way to the GGN (10 backward passes, against 64 samples' 64);
* ``"exact"``: ``Lambda`` factored in closed form (cross-entropy: ``diag(p) - p p^T = B B^T`` with
  ``B = diag(sqrt p) - p sqrt(p)^T``; MSE: a multiple of ``I``), one backward pass per output
  class; it needs one output row per sample.

``"auto"`` picks per round, from the loss call of the round's first batch: ``"exact"`` for
cross-entropy or MSE with one output row per sample and at most ``EXACT_MAX_OUTPUTS`` outputs (a
classifier), ``"mc"`` for other shapes (sequences, wide outputs), ``"empirical"`` when the loss
makes no such call. The choice is recorded in the round's ``info["fisher_type"]``. Measured
(benchmarks/fisher.py, RESULTS.md): on converged models the GGN types beat the empirical Fisher
for OBD by up to 14 points and tie elsewhere; one MC sample is far worse than exact on confident
classifiers (hence exact where it is affordable).

MC and exact need backward passes of their own, so they run over a round's stored batches at round
time (:func:`~lightning_prune.stats.passes.fisher_pass`), like every calibration pass: eval mode,
``torch.autograd.grad`` only (no ``.grad`` touched), BatchNorm and metrics untouched, sums and
counts all-reduced. The loss and the logits come from the user's own loss: the first
``F.cross_entropy`` or ``F.mse_loss`` call while the loss is computed (``loss_fn``,
``training_step`` or a Hugging Face model's ``.loss``) is intercepted with a
``TorchFunctionMode``, whatever way the function was imported, and its inputs give the logits,
targets, reduction and ``ignore_index``.

Each direction ``v`` backpropagated from the logits gives per-sample output gradients at every
layer; the directions of a batch are stacked as extra samples (scaled so that the estimators'
means over samples are the GGN of the training loss), so every estimator (diagonal, K-FAC, EKFAC,
Fisher blocks) takes them unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from lightning_prune.engine.calibration import Calibration, batch_size, eval_mode, no_kv_cache

FisherType = Literal["auto", "empirical", "mc", "exact"]
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
EXACT_MAX_OUTPUTS = 64  # "auto": the exact GGN costs one backward pass per output
LOSSES = ("F.cross_entropy (nn.CrossEntropyLoss)", "F.mse_loss (nn.MSELoss)")


def check_fisher_type(fisher_type: str, mc_samples: int) -> None:
    if fisher_type not in FISHER_TYPES:
        raise ValueError(f"`fisher_type` must be one of {FISHER_TYPES}, got {fisher_type!r}")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"`mc_samples` must be an integer >= 1, got {mc_samples!r}")


@dataclass
class LossCall:
    """The loss call the training loss made: its logits (with their graph) and how it reduced."""

    kind: str  # "cross_entropy" | "mse"
    logits: Tensor  # the call's input: (rows, classes) or (rows, outputs)
    target: Tensor
    reduction: str
    ignore_index: int
    value: Tensor


class _LossSpy(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[LossCall] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        out = func(*args, **kwargs)
        if func is F.cross_entropy or func is F.mse_loss:
            bound = dict(zip(("input", "target"), args)) | kwargs  # torch passes the options as keywords
            if func is F.cross_entropy and (bound.get("weight") is not None or bound.get("label_smoothing", 0.0)):
                raise ValueError(
                    "fisher_type='mc'/'exact' support F.cross_entropy without class weights or label smoothing"
                )
            kind = "cross_entropy" if func is F.cross_entropy else "mse"
            logits, target = bound["input"], bound["target"]
            if kind == "cross_entropy" and logits.dim() > 2:  # (N, C, d1, ...) -> rows of C classes
                logits = logits.movedim(1, -1).reshape(-1, logits.shape[1])
                target = target.reshape(-1)
            self.calls.append(
                LossCall(kind, logits, target, bound.get("reduction", "mean"), bound.get("ignore_index", -100), out)
            )
        return out


def loss_call(calib: Calibration, batch: Any, batch_idx: int) -> tuple[Tensor, LossCall]:
    """The batch's loss, computed by the user's own code, and the loss call inside it."""
    with _LossSpy() as spy:
        loss = calib.loss(batch, batch_idx)
    if len(spy.calls) != 1:
        what = "none" if not spy.calls else f"{len(spy.calls)} ({', '.join(c.kind for c in spy.calls)})"
        raise ValueError(
            f"fisher_type='mc'/'exact' take the logits and the loss type from the loss's own call to one of {LOSSES}; "
            f"{calib.describe()} made {what}. Compute the loss with exactly one of them (loss_fn=lambda model, "
            "batch: F.cross_entropy(model(batch[0]), batch[1])), or use fisher_type='empirical'"
        )
    call = spy.calls[0]
    if call.reduction not in ("mean", "sum"):
        raise ValueError(
            f"fisher_type='mc'/'exact' need the loss call's reduction 'mean' or 'sum', got {call.reduction!r}"
        )
    return loss, call


def directions(
    call: LossCall,
    loss: Tensor,
    factor: float,
    samples: int,
    fisher_type: str,
    mc_samples: int,
    generator: torch.Generator,
) -> tuple[list[Tensor], float]:
    """Output directions ``V_d`` (the logits' shape) and the weight of each.

    ``sum_d w V_d V_d^T`` is, per output row ``r``, ``c_r Lambda_r`` (in expectation for ``"mc"``):
    the Hessian in the logits of that row's share of the loss, ``c_r = factor s w_r`` for a loss
    that is ``s`` times the call, which weighs row ``r`` by ``w_r`` (``1/n_valid`` for a mean, 1 for
    a sum). ``factor`` is the batch's samples: the estimators average over them, so their mean is
    the GGN of the loss itself, in its units (as :func:`~lightning_prune.stats.capture.per_sample_factor`).
    """
    logits = call.logits.detach().float()
    rows = logits.shape[0]
    valid = (call.target != call.ignore_index) if call.kind == "cross_entropy" else torch.ones(rows, dtype=torch.bool)
    valid = valid.reshape(rows).to(logits.device)
    n_valid = int(valid.sum())
    scale = float(loss.detach()) / float(call.value.detach()) if float(call.value.detach()) != 0 else 1.0
    per_row = factor * scale / (n_valid if call.reduction == "mean" else 1)  # c_r of every valid row
    if call.kind == "mse":
        per_row *= 2.0 / (logits[0].numel() if call.reduction == "mean" else 1)  # d^2/dy^2 of a mean over outputs
    c = torch.where(valid, torch.full_like(valid, per_row, dtype=logits.dtype), torch.zeros_like(logits[:, 0]))
    root = c.clamp_min(0).sqrt()[:, None]
    shape = call.logits.shape
    if fisher_type == "exact":
        if rows != samples:
            raise ValueError(
                f"fisher_type='exact' needs one output row per sample; the loss has {rows} rows for {samples} "
                "samples (a sequence model?): use fisher_type='mc'"
            )
        if call.kind == "mse":
            eye = torch.eye(logits.shape[1], dtype=logits.dtype, device=logits.device)
            return [(root * eye[d]).expand(shape).to(call.logits.dtype) for d in range(logits.shape[1])], 1.0
        p = logits.softmax(-1)
        sqrt_p = p.sqrt()
        # B = diag(sqrt p) - p sqrt(p)^T, column d: sqrt(p_d) e_d - p sqrt(p_d)
        cols = [root * (sqrt_p[:, d : d + 1] * (F.one_hot(torch.full_like(valid, d, dtype=torch.long), p.shape[1]) - p))
                for d in range(p.shape[1])]  # fmt: skip
        return [v.to(call.logits.dtype) for v in cols], 1.0
    out = []
    for _ in range(mc_samples):
        if call.kind == "mse":
            eps = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
            out.append((root * eps).to(call.logits.dtype))
        else:
            p = logits.softmax(-1)
            y = torch.multinomial(p, 1, generator=generator).squeeze(1)
            out.append((root * (p - F.one_hot(y, p.shape[1]).to(p.dtype))).to(call.logits.dtype))
    return out, 1.0 / mc_samples


def resolve(calib: Calibration, batches: Sequence[Any], fisher_type: str) -> str:
    """``"auto"`` made concrete for this round's batches (the module docstring's rule); others as given."""
    if fisher_type != "auto" or not batches:
        return "empirical" if fisher_type == "auto" else fisher_type
    if not calib.has_loss(batches[0]):
        return "empirical"
    with torch.no_grad(), eval_mode(calib.model), no_kv_cache(calib.model), calib.forward_context(), _LossSpy() as spy:
        calib.loss(batches[0], 0)
    if len(spy.calls) != 1 or spy.calls[0].reduction not in ("mean", "sum"):
        return "empirical"
    call = spy.calls[0]
    if call.logits.shape[0] == batch_size(batches[0]) and call.logits.shape[-1] <= EXACT_MAX_OUTPUTS:
        return "exact"
    return "mc"
