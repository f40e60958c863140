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
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_prune.numerics import exact_float32  # noqa: F401  (re-exported)

MAX_DAMP = 10.0


@dataclass
class Damped:
    """Cholesky factor ``L`` of the damped matrix, and what it took to get it."""

    L: Tensor
    damp: float  # relative damping actually used
    increases: int  # how many times damping had to grow


def damped_cholesky(H: Tensor, damp: float, what: str) -> Damped:
    """Lower Cholesky factor of ``H + damp * mean(diag H) * I`` (batched over leading dims).

    ``what`` names the layer in the warning and the error.
    """
    diag_mean = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    # an all-zero block (weights whose loss never depends on them) borrows the scale of the others,
    # or 1: a relative damping of zero would make its inverse infinite
    positive = diag_mean[diag_mean > 0]
    fallback = positive.mean() if positive.numel() else torch.ones((), dtype=H.dtype, device=H.device)
    diag_mean = torch.where(diag_mean > 0, diag_mean, fallback)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    current, increases = damp, 0
    while True:
        L, info = torch.linalg.cholesky_ex(H + (current * diag_mean)[..., None, None] * eye)
        if not bool((info != 0).any()):
            if increases:
                rank_zero_warn(
                    f"OBS: Cholesky of {what} failed with damp={damp}; succeeded with damp={current:g} "
                    f"(logged as prune/damping_increases). More calibration batches usually avoid this."
                )
            return Damped(L, current, increases)
        if current >= MAX_DAMP:
            raise RuntimeError(
                f"OBS: {what} is not positive definite even with relative damping {current:g}; "
                "it likely has NaN/inf entries. Refusing to continue (no silent fallback to magnitude)."
            )
        current, increases = min(current * 10 if current > 0 else 1e-8, MAX_DAMP), increases + 1


def damped_inverse(H: Tensor, damp: float, what: str) -> tuple[Tensor, Damped]:
    """``(H + damp * mean(diag H) * I)^-1`` via its Cholesky factor."""
    d = damped_cholesky(H, damp, what)
    return torch.cholesky_inverse(d.L), d
