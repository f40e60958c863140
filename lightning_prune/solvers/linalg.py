"""Damped inverses for OBS, and the rule for when Cholesky fails.

Damping is relative: ``H + damp * mean(diag H) * I`` (SparseGPT's default ``damp=0.01``), so it
means the same thing whatever the scale of the layer's inputs. An all-zero matrix in a batch of
blocks (e.g. Fisher blocks of weights fed by dead inputs) is damped with the other blocks' scale.
If the Cholesky factorisation still fails (too few calibration samples, duplicated inputs),
damping is multiplied by 10 and retried, with a warning, up to ``damp = 10``; beyond that the
round raises. It never falls back to an identity inverse (which would silently turn OBS into
magnitude pruning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune.runtime.distributed import warn
from lightning_prune.runtime.numerics import exact_float32  # noqa: F401  (re-exported)

MAX_DAMP = 10.0


@dataclass
class Damped:
    """Cholesky factor ``L`` of the damped matrix, and what it took to get it."""

    L: Tensor
    damp: float  # largest relative damping actually used (blocks escalate independently)
    increases: int  # how many times damping had to grow


def damped_cholesky(H: Tensor, damp: float, what: str) -> Damped:
    """Lower Cholesky factor of ``H + damp * mean(diag H) * I`` (batched over leading dims).

    ``what`` names the layer in the warning and the error. ``H``'s diagonal is damped in place for each
    attempt and restored after it (no second whole-matrix copy); ``H`` is unchanged on return.
    """
    diag_mean = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    # an all-zero block (weights whose loss never depends on them) borrows the scale of the others,
    # or 1: a relative damping of zero would make its inverse infinite
    positive = diag_mean[diag_mean > 0]
    fallback = positive.mean() if positive.numel() else torch.ones((), dtype=H.dtype, device=H.device)
    diag_mean = torch.where(diag_mean > 0, diag_mean, fallback)
    # per-matrix damping: in a batch of blocks only the ones that fail get more, so one
    # ill-conditioned Fisher block cannot over-damp (and flatten the saliencies of) all the others
    current = torch.full(diag_mean.shape, damp, dtype=H.dtype, device=H.device)
    increases = 0
    diagonal = torch.diagonal(H, dim1=-2, dim2=-1)
    original = diagonal.clone()
    while True:
        # damped on H's own diagonal and restored after the factorisation: no second whole-matrix copy
        diagonal.add_(current[..., None] * diag_mean[..., None])
        try:
            L, info = torch.linalg.cholesky_ex(H)
        finally:
            diagonal.copy_(original)
        failed = info != 0
        if not bool(failed.any()):
            used = float(current.max()) if current.numel() else damp
            if increases:
                warn(
                    f"OBS: Cholesky of {what} failed with damp={damp}; succeeded with damp={used:g} "
                    f"(logged as prune/damping_increases). More calibration batches usually avoid this."
                )
            return Damped(L, used, increases)
        if bool((current[failed] >= MAX_DAMP).any()):
            raise RuntimeError(
                f"OBS: {what} is not positive definite even with relative damping {MAX_DAMP:g}; "
                "it likely has NaN/inf entries. Refusing to continue (no silent fallback to magnitude)."
            )
        grown = torch.where(current > 0, current * 10, torch.full_like(current, 1e-8)).clamp_max(MAX_DAMP)
        current, increases = torch.where(failed, grown, current), increases + 1


def damped_inverse(H: Tensor, damp: float, what: str) -> tuple[Tensor, Damped]:
    """``(H + damp * mean(diag H) * I)^-1`` via its Cholesky factor."""
    d = damped_cholesky(H, damp, what)
    return torch.cholesky_inverse(d.L), d
