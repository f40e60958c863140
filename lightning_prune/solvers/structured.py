"""Structured OBS: remove whole column blocks of a layer and refit the rest (ZipLM, OBC's groups).

For a layer ``Y = W X`` with ``H = E[x x^T]``, removing the input columns ``Q`` (one structure:
a neuron's column, a channel's ``kh * kw`` columns, a head's ``head_dim`` columns) and refitting
the others optimally costs, per output row ``i``,

    dL_i = 1/2 W[i, Q] ([H^-1]_QQ)^-1 W[i, Q]^T,   dW = -W[:, Q] ([H^-1]_QQ)^-1 (H^-1)[Q, :],

which zeroes ``W[:, Q]`` exactly and equals the least-squares refit of the kept columns. After a
removal ``H^-1`` is downdated to the kept columns, ``H^-1 - H^-1[:, Q] ([H^-1]_QQ)^-1 H^-1[Q, :]``,
so the next choice sees the compensated weights. The structures are removed greedily, cheapest
first, ``count`` times. A structure read by several layers costs the sum over them (each has its
own ``H``); row weights ``g_i = E[g_i^2]`` put the costs in loss units, as in layer-wise OBS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_prune.solvers.obc import prepare_hessian


def group_update(W: Tensor, Hinv: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Remove ``cols`` (indices) of ``W`` at once: ``(W', H^-1 of the kept columns, per-row loss)``."""
    B = Hinv[cols][:, cols]
    Wq = W[:, cols]
    if cols.numel() == 1:  # one column (a neuron): the solves are divisions
        X = Wq.T / B
        losses = 0.5 * (Wq * X.T).sum(1)
        W_new = W - X.T @ Hinv[cols]
        W_new[:, cols] = 0.0
        Hinv_new = Hinv - Hinv[:, cols] @ (Hinv[cols] / B)
        Hinv_new[cols] = 0.0
        Hinv_new[:, cols] = 0.0
        return W_new, Hinv_new, losses
    X = torch.linalg.solve(B, Wq.T)  # ([H^-1]_QQ)^-1 W[:, Q]^T
    losses = 0.5 * (Wq * X.T).sum(1)
    W_new = W - X.T @ Hinv[cols]
    W_new[:, cols] = 0.0
    Hinv_new = Hinv - Hinv[:, cols] @ torch.linalg.solve(B, Hinv[cols])
    Hinv_new[cols] = 0.0
    Hinv_new[:, cols] = 0.0
    return W_new, Hinv_new, losses


def _inverse(A: Tensor, W: Tensor, damp: float, what: str) -> tuple[Tensor, Tensor, int, int]:
    """Layer-wise OBS's preparation (dead inputs, damping; :func:`prepare_hessian`), as the full
    damped inverse the group update needs: ``(H^-1, W, damping increases, dead)``."""
    U, W, damped, dead = prepare_hessian(A, W, damp, what)
    return U.T @ U, W, damped.increases, int(dead.sum())


def structured_prune(
    Ws: Sequence[Tensor],
    As: Sequence[Tensor],
    widths: Sequence[int],
    count: int,
    forced: Tensor,
    row_weights: Sequence[Tensor | None],
    damp: float,
    names: Sequence[str],
) -> tuple[list[Tensor], Tensor, Tensor, dict[str, int]]:
    """Greedily remove ``count`` more of the ``size = len(forced)`` structures of one family.

    ``Ws[c]`` is consumer ``c``'s ``(d_out, size * widths[c])`` matrix (structure ``j`` owns
    columns ``j*w .. (j+1)*w``), ``As[c]`` its input covariance; ``forced`` marks structures already
    pruned (their columns are eliminated first, without cost). Returns the refitted matrices, the
    pruned structures (``forced`` included), each removal's cost in removal order, and counts
    ``{"damping_increases", "dead_inputs"}``.
    """
    size = forced.numel()
    stats = {"damping_increases": 0, "dead_inputs": 0}
    Ws, Hinvs = list(Ws), []
    for c, (A, W) in enumerate(zip(As, Ws)):
        Hinv, Ws[c], increases, dead = _inverse(A, W, damp, names[c])
        stats["damping_increases"] += increases
        stats["dead_inputs"] += dead
        Hinvs.append(Hinv)
    cols = [
        torch.arange(size * w, device=W.device).view(size, w) for w, W in zip(widths, Ws)
    ]  # structure j's columns in consumer c: cols[c][j]
    gone = forced.clone().to(Ws[0].device)
    if gone.any():
        for c in range(len(Ws)):
            Ws[c], Hinvs[c], _ = group_update(Ws[c], Hinvs[c], cols[c][gone].flatten())
    costs = []
    for _ in range(count):
        alive = (~gone).nonzero().flatten()
        if alive.numel() == 0:
            raise ValueError(
                f"structured OBS: {count} structures requested of {size}, {int(forced.sum())} already pruned"
            )
        total = torch.zeros(alive.numel(), dtype=Ws[0].dtype, device=Ws[0].device)
        for c, (W, Hinv, w) in enumerate(zip(Ws, Hinvs, widths)):
            if w == 1:  # single columns: 1/2 W[i, j]^2 / [H^-1]_jj
                per_row = 0.5 * W[:, alive].T ** 2 / Hinv.diagonal()[alive, None]  # (a, rows)
            else:
                blocks = Hinv.view(size, w, size, w).diagonal(dim1=0, dim2=2).permute(2, 0, 1)[alive]  # (a, w, w)
                Wb = W.view(W.shape[0], size, w)[:, alive].permute(1, 2, 0)  # (a, w, rows)
                X = torch.linalg.solve(blocks, Wb)
                per_row = 0.5 * (Wb * X).sum(1)  # (a, rows)
            g = row_weights[c]
            total += per_row @ g.to(per_row.dtype) if g is not None else per_row.sum(1)
        best = int(torch.argmin(total))  # ties: the lowest index
        j = int(alive[best])
        costs.append(total[best])
        for c in range(len(Ws)):
            Ws[c], Hinvs[c], _ = group_update(Ws[c], Hinvs[c], cols[c][j])
        gone[j] = True
    cost = torch.stack(costs) if costs else torch.zeros(0, dtype=Ws[0].dtype)
    return Ws, gone, cost, stats
