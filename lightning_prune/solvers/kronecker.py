"""K-FAC OBS: ``H ~ G (x) A``, so ``[H^-1]_(i,j),(i,j) = [G^-1]_ii [A^-1]_jj``.

Single-weight saliency ``w_ij^2 / (2 [G^-1]_ii [A^-1]_jj)`` is in loss units (``G`` holds
per-sample loss gradients), so layers compare directly. Removing a *set* ``Z`` of weights at once
is solved exactly for this quadratic model, not by summing single-weight updates:

    minimise 1/2 dw^T H dw  subject to (w + dw)_Z = 0
    =>  u = ([H^-1]_ZZ)^-1 w_Z,   dW = -G^-1 U A^-1,   loss = 1/2 w_Z . u

``Z`` holds every pruned weight of the layer, the ones pruned before (``w = 0``, which must stay 0)
and the new ones, so it covers most of the layer as sparsity grows. The same solution is
``dw_K = H_KK^-1 H_KZ w_Z`` over the kept set ``K``. Whichever of ``Z`` and ``K`` is smaller, if it has
at most ``dense_max`` entries, that system is formed and factorised (exact, and cheap: at high
sparsity ``K`` is small). Otherwise ``([H^-1]_ZZ) u = w_Z`` is solved by Jacobi-preconditioned
conjugate gradients whose mat-vec is two matrix products (``G^-1 V A^-1`` restricted to ``Z``), so
nothing of size ``|Z|^2`` is formed. CG needs more iterations as ``Z`` covers more of the layer:
``[H^-1]_ZZ`` tends to ``H^-1``, whose (scaled) condition number is ``cond(G) cond(A)``; on the
50k-weight MLP of issue #31 it went from ~30 to past 1,000 iterations per solve between 10% and 90%
sparsity, which is why the dense systems are used where they fit.
"""

from __future__ import annotations

import torch
from torch import Tensor

DENSE_MAX = 4096  # the largest system formed explicitly: 4096^2 float64 entries, 128 MiB (256 MiB while formed)
CG_TOL = 1e-9  # relative residual norm at which conjugate gradients stop


def kfac_saliency(W: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    return W**2 / (2 * torch.outer(torch.diagonal(Ginv), torch.diagonal(Ainv)))


def kfac_set_update(
    W: Tensor,
    G: Tensor,
    A: Tensor,
    Ginv: Tensor,
    Ainv: Tensor,
    Z: Tensor,
    tol: float = CG_TOL,
    max_iter: int = 1000,
    dense_max: int = DENSE_MAX,
) -> tuple[Tensor, float, int, float]:
    """``(W + dW, predicted loss increase, CG iterations, relative residual)`` for removing the weights
    where ``Z`` under ``H = G (x) A`` (damped factors, ``Ginv``/``Ainv`` their inverses).

    A dense solve reports 0 iterations and residual 0; a CG solve that stopped at ``max_iter`` above
    ``tol`` reports its residual, so the caller can say so."""
    if not bool(Z.any()):
        return W.clone(), 0.0, 0, 0.0
    z = Z.to(W.dtype)
    b = W * z
    removed, kept = int(Z.sum()), int((~Z).sum())
    if min(removed, kept) <= dense_max:
        return (*_dense_set_update(W, G, A, Ginv, Ainv, Z, dual=removed <= kept), 0, 0.0)

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
    residual = (float((r * r).sum()) / bnorm) ** 0.5 if bnorm > 0 else 0.0
    dW = -(Ginv @ u @ Ainv)
    out = W + dW
    out[Z] = 0.0
    return out, 0.5 * float((b * u).sum()), it, residual


def _dense_set_update(
    W: Tensor, G: Tensor, A: Tensor, Ginv: Tensor, Ainv: Tensor, Z: Tensor, dual: bool
) -> tuple[Tensor, float]:
    """The set update with its system formed: over ``Z`` (``dual``, ``[H^-1]_ZZ u = w_Z``) or over the
    kept entries ``K`` (``H_KK dw_K = H_KZ w_Z``). Entries of a Kronecker product are products of
    factor entries, so a ``k``-entry system costs ``k^2`` memory and ``k^3 / 3`` for its Cholesky factor."""
    cols = W.shape[1]
    idx = (Z if dual else ~Z).flatten().nonzero().squeeze(1)
    r, c = idx // cols, idx % cols
    left, right = (Ginv, Ainv) if dual else (G, A)
    M = left[r[:, None], r[None, :]]
    M.mul_(right[c[:, None], c[None, :]])
    wZ = W * Z.to(W.dtype)
    rhs = wZ.flatten()[idx] if dual else (G @ wZ @ A).flatten()[idx]
    L, info = torch.linalg.cholesky_ex(M)
    # a principal block of a positive definite matrix is positive definite; LU solves the same system
    # should rounding say otherwise
    x = torch.cholesky_solve(rhs[:, None], L)[:, 0] if int(info) == 0 else torch.linalg.solve(M, rhs)
    del M, L
    if dual:
        u = W.new_zeros(W.numel())
        u[idx] = x
        out = W - Ginv @ u.view(W.shape) @ Ainv
        loss = 0.5 * float((rhs * x).sum())
    else:
        v = -wZ.reshape(-1)  # a new tensor, whatever W's strides (HF Conv1D weights are transposed views)
        v[idx] = x
        V = v.view(W.shape)
        out = W + V
        loss = 0.5 * float((V * (G @ V @ A)).sum())
    out[Z] = 0.0
    return out, loss
