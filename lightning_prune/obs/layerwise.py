"""Layer-wise OBS: prune rows of ``W`` (d_row x d_col) against the input Hessian ``H = E[x x^T]``.

For the reconstruction loss ``1/2 (w - w')^T H (w - w')`` of one row, removing weight ``q`` costs
``w_q^2 / (2 [H^-1]_qq)`` and the optimal compensation is ``-(w_q / [H^-1]_qq) H^-1 e_q``. Every
row shares ``H``, but each row has its own count of weights to remove (the allocation decides).

* :func:`obc_prune` (``solver="exact"``, OBC / ExactOBS): per row, greedy sequential removal with
  rank-1 downdates of ``H^-1``. Removing a set this way ends exactly at the least-squares refit of
  the kept weights. O(d_row * removed * d_col^2); rows are processed in batched chunks.
* :func:`sparsegpt_prune` (``solver="fast"``, SparseGPT): sweep the columns left to right in blocks
  with the upper Cholesky factor ``U`` of ``H^-1``; inside a block, the entries ``w^2 / U_jj^2``
  ranks lowest are removed column by column, each column's error spread over the rest of the
  block, and the block's error pushed onward with one GEMM. O(d_col^3 + d_row * d_col^2).
  Compensation only flows to later columns, which costs a few percent of reconstruction error.
* :func:`blocked_prune` (``solver="blocked"``): SparseGPT's blocked lazy updates through the upper
  Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), with *exact* greedy OBS inside each column
  block instead of SparseGPT's column-by-column sweep. For a block ``b`` of the trailing columns
  ``S``, the inverse Hessian given the earlier columns is ``U_bb^T U_bb``; the block is pruned
  exactly against it, and its total change ``dW_b`` reaches the later columns as
  ``(dW_b U_bb^-1) U_b,later`` (one triangular solve, one GEMM). O(d_col^3 + d_row * d_col^2 +
  d_row * removed * block^2) time, O(d_col^2 + rows * block^2) memory; ``block >= d_col`` is OBC.

A row's removals are shared among the column blocks as its lowest single-weight saliencies fall.
All return the new weights, the pruned mask and each row's reconstruction-loss increase.
Weights already pruned (``forced``) are removed first: they are zero, so they cost nothing but
still constrain the compensation, which therefore never revives them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_prune.obs.linalg import Damped, damped_cholesky

EXACT_CHUNK_BYTES = 1 << 28  # memory budget for the batched per-row inverses of the exact solver


def prepare_hessian(H: Tensor, W: Tensor, damp: float, what: str) -> tuple[Tensor, Tensor, Damped, Tensor]:
    """Handle dead inputs and damp: ``(H^-1, W, damping, dead)``.

    A dead input (zero diagonal: a pixel that is always 0, a dead ReLU) gets ``H_jj = 1`` and its
    weights are zeroed, as in OBC/SparseGPT: they never affect the layer's output on the
    calibration data, so removing them costs nothing and they are pruned first.
    """
    H = H.clone()
    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
        W = W.clone()
        W[:, dead] = 0.0
    damped = damped_cholesky(H, damp, what)
    return torch.cholesky_inverse(damped.L), W, damped, dead


def single_saliency(W: Tensor, Hinv: Tensor) -> Tensor:
    """OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` of removing each weight alone (reconstruction units)."""
    return W**2 / (2 * torch.diagonal(Hinv))


def _row_block_quotas(W: Tensor, Hinv: Tensor, counts: Tensor, forced: Tensor, blocksize: int) -> Tensor:
    """How many entries each row removes in each column block: as many as the row's ``counts[r]``
    lowest single-weight OBS saliencies (forced entries first) that fall in the block."""
    R, d = W.shape
    nb = (d + blocksize - 1) // blocksize
    score = torch.where(forced, torch.full_like(W, -torch.inf), single_saliency(W, Hinv))
    rank = torch.argsort(torch.argsort(score, dim=1, stable=True), dim=1)
    chosen = (rank < counts.to(W.device)[:, None]).to(torch.long)
    return torch.nn.functional.pad(chosen, (0, nb * blocksize - d)).view(R, nb, blocksize).sum(2)


def _greedy_block(w: Tensor, M: Tensor, n: Tensor, forced: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact greedy OBS on one column block: ``M`` (rows, B, B) is each row's inverse Hessian of the
    block; remove ``n[r]`` entries of row ``r`` (``forced`` first). Returns (w, removed, losses)."""
    R, B = w.shape
    ar = torch.arange(R, device=w.device)
    removed = torch.zeros_like(forced)
    losses = torch.zeros(R, dtype=w.dtype, device=w.device)
    tiny = torch.finfo(w.dtype).tiny
    for step in range(int(n.max()) if R else 0):
        active = n > step
        score = w**2 / torch.diagonal(M, dim1=1, dim2=2)
        score = torch.where(removed, torch.full_like(score, torch.inf), score)
        score = torch.where(forced & ~removed, torch.full_like(score, -torch.inf), score)  # forced first
        q = score.argmin(1)
        mqq = M[ar, q, q].clamp_min(tiny)
        mq = M[ar, :, q].masked_fill(removed, 0.0)  # removed coordinates are exactly 0
        wq = w[ar, q]
        zero = torch.zeros_like(wq)
        losses += torch.where(active, wq**2 / (2 * mqq), zero)
        w -= torch.where(active, wq / mqq, zero)[:, None] * mq
        M -= (mq * torch.where(active, 1 / mqq, zero)[:, None])[:, :, None] * mq[:, None, :]
        sel = ar[active]
        w[sel, q[active]] = 0.0
        removed[sel, q[active]] = True
    w[removed] = 0.0
    return w, removed, losses


def obc_prune(W: Tensor, Hinv: Tensor, counts: Tensor, forced: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact greedy OBS per row: remove ``counts[r]`` weights of row ``r`` (``forced`` ones first)."""
    return blocked_prune(W, Hinv, counts, forced, blocksize=W.shape[1])


def blocked_prune(
    W: Tensor, Hinv: Tensor, counts: Tensor, forced: Tensor, blocksize: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """Blocked OBS (see the module docstring); ``blocksize >= d_col`` is exact OBC."""
    R, d = W.shape
    W, pruned = W.clone(), forced.clone()
    losses = torch.zeros(R, dtype=W.dtype, device=W.device)
    counts = torch.maximum(counts.to(W.device), forced.sum(1))
    U = torch.linalg.cholesky(Hinv, upper=True)  # H^-1 = U^T U; (H_SS)^-1 = U_SS^T U_SS for trailing S
    quotas = _row_block_quotas(W, Hinv, counts, forced, blocksize) if blocksize < d else counts[:, None]
    for b, i1 in enumerate(range(0, d, blocksize)):
        i2 = min(i1 + blocksize, d)
        Ub = U[i1:i2, i1:i2]
        Mb = Ub.T @ Ub  # inverse Hessian of the block, given the earlier columns are final
        chunk = max(1, EXACT_CHUNK_BYTES // (Mb.numel() * Mb.element_size()))
        old = W[:, i1:i2].clone()
        for r1 in range(0, R, chunk):
            rows = slice(r1, min(R, r1 + chunk))
            M = Mb.expand(rows.stop - r1, *Mb.shape).clone()
            w, removed, loss = _greedy_block(old[rows].clone(), M, quotas[rows, b], forced[rows, i1:i2])
            W[rows, i1:i2], pruned[rows, i1:i2], losses[rows] = w, removed | forced[rows, i1:i2], losses[rows] + loss
        if i2 < d:
            # every update of the block lies in span(H_S^-1[:, block]); its effect on the later
            # columns is (dW_block Ub^-1) U[block, later]: one triangular solve and one GEMM
            delta = torch.linalg.solve_triangular(Ub, W[:, i1:i2] - old, upper=True, left=False)
            W[:, i2:] += delta @ U[i1:i2, i2:]
    return W, pruned, losses


def sparsegpt_prune(
    W: Tensor, Hinv: Tensor, counts: Tensor, forced: Tensor, blocksize: int = 128
) -> tuple[Tensor, Tensor, Tensor]:
    """SparseGPT's column sweep (see the module docstring): the cheapest solver, O(GEMM)."""
    R, d = W.shape
    W = W.clone()
    counts = torch.maximum(counts.to(W.device), forced.sum(1))
    U = torch.linalg.cholesky(Hinv, upper=True)
    pruned = torch.zeros_like(forced)
    losses = torch.zeros(R, dtype=W.dtype, device=W.device)
    quotas = _row_block_quotas(W, Hinv, counts, forced, blocksize)
    for b, i1 in enumerate(range(0, d, blocksize)):
        i2 = min(i1 + blocksize, d)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        score = W1**2 / torch.diagonal(U1) ** 2
        score = torch.where(forced[:, i1:i2], torch.full_like(score, -torch.inf), score)
        rank = torch.argsort(torch.argsort(score, dim=1, stable=True), dim=1)
        m1 = rank < quotas[:, b : b + 1]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            err = torch.where(m1[:, i], W1[:, i] / U1[i, i], torch.zeros_like(W1[:, i]))
            losses += err**2 / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W1[m1] = 0.0
        W[:, i1:i2], pruned[:, i1:i2] = W1, m1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return W, pruned, losses


def choose_solver(W: Tensor, counts: Tensor, blocksize: int, budget: float = 5e9) -> str:
    """``solver="auto"``: the most exact solver whose greedy work (rows x removals x width^2
    element updates) fits ``budget`` (about 10 s on two CPU cores): exact, blocked, else fast."""
    work = float(counts.sum())
    if work * W.shape[1] ** 2 <= budget:
        return "exact"
    if work * min(blocksize, W.shape[1]) ** 2 <= budget:
        return "blocked"
    return "fast"
