"""K-FAC OBS: ``H ~ G (x) A``, so ``[H^-1]_(i,j),(i,j) = [G^-1]_ii [A^-1]_jj``.

Single-weight saliency ``w_ij^2 / (2 [G^-1]_ii [A^-1]_jj)`` is in loss units (``G`` holds
per-sample loss gradients), so layers compare directly. Removing a *set* ``Z`` of weights at once
is solved exactly for this quadratic model, not by summing single-weight updates:

    minimise 1/2 dw^T H dw  subject to (w + dw)_Z = 0
    =>  u = ([H^-1]_ZZ)^-1 w_Z,   dW = -G^-1 U A^-1,   loss = 1/2 w_Z . u

``([H^-1]_ZZ) u = w_Z`` is solved by preconditioned conjugate gradients whose mat-vec is two
matrix products (``G^-1 V A^-1`` restricted to ``Z``), so nothing of size ``|Z|^2`` is formed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def kfac_saliency(W: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    return W**2 / (2 * torch.outer(torch.diagonal(Ginv), torch.diagonal(Ainv)))


def kfac_set_update(
    W: Tensor, Ginv: Tensor, Ainv: Tensor, Z: Tensor, tol: float = 1e-9, max_iter: int = 1000
) -> tuple[Tensor, float, int]:
    """``(W + dW, predicted loss increase, CG iterations)`` for removing the weights where ``Z``."""
    z = Z.to(W.dtype)
    b = W * z
    if not bool(Z.any()):
        return W.clone(), 0.0, 0

    def matvec(V: Tensor) -> Tensor:
        return (Ginv @ V @ Ainv) * z

    precond = torch.outer(torch.diagonal(Ginv), torch.diagonal(Ainv)) * z + (1 - z)
    u = b / precond
    r = b - matvec(u)
    y = r / precond
    p = y.clone()
    ry = float((r * y).sum())
    bnorm = float((b * b).sum())
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        if float((r * r).sum()) <= tol**2 * bnorm:  # relative residual norm <= tol
            break
        Ap = matvec(p)
        alpha = ry / float((p * Ap).sum())
        u += alpha * p
        r -= alpha * Ap
        y = r / precond
        ry_new = float((r * y).sum())
        p = y + (ry_new / ry) * p
        ry = ry_new
    dW = -(Ginv @ u @ Ainv)
    out = W + dW
    out[Z] = 0.0
    return out, 0.5 * float((b * u).sum()), it
