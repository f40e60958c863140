"""Layer-wise OBS: prune rows of ``W`` (d_row x d_col) against the input Hessian ``H = E[x x^T]``.

For the reconstruction loss ``1/2 (w - w')^T H (w - w')`` of one row, removing weight ``q`` costs
``w_q^2 / (2 [H^-1]_qq)`` and the optimal compensation is ``-(w_q / [H^-1]_qq) H^-1 e_q``. Every
row shares ``H``, but each row has its own count of weights to remove (the allocation decides).

* :func:`obc_prune` (``solver="exact"``, OBC / ExactOBS): per row, greedy sequential removal with
  rank-1 downdates of ``H^-1``. Removing a set this way ends exactly at the least-squares refit of
  the kept weights. O(d_row * (d_col^3 - kept^3) / 3): the downdates are batched GEMMs and the
  inverse shrinks as a row empties; rows are processed in batched chunks.
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
With an N:M pattern (``groups=(M, quotas)``: how many entries of each group of M columns of each
row go) the solvers choose each group's entries themselves: the exact and blocked solvers greedily,
never taking an entry of a group that has its quota; the fast solver at the first column of each
group, from the weights as compensated so far (SparseGPT's ``prunen``/``prunem``). Column blocks
are then cut at multiples of M. All return the new weights, the pruned mask and each row's
reconstruction-loss increase.
Weights already pruned (``forced``) are removed first: they are zero, so they cost nothing but
still constrain the compensation, which therefore never revives them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_prune.solvers.linalg import Damped, damped_cholesky

# memory for the batched per-row inverses of the exact solver: its downdates are batched GEMMs
# (``_LAZY``), which want many rows at once; measured on 2 CPU cores for 300 rows of 784 columns
# at 95%: 8 MB chunks 12-15 s, 128 MB 8-10 s (the rank-1 loop it replaced: 63 s)
EXACT_CHUNK_BYTES = {"cpu": 1 << 27}
EXACT_CHUNK_BYTES_DEFAULT = 1 << 28
_LAZY = 32  # exact greedy: downdates of M deferred and applied together (one batched GEMM)
_SHRINK = 4  # ... and the removed coordinates dropped once a quarter of the working width is gone
_INNER = 16  # SparseGPT: columns per inner block of rank-1 updates (the rest of the block gets a GEMM)


def prepare_hessian(
    H: Tensor | list[Tensor], W: Tensor, damp: float, what: str
) -> tuple[Tensor, Tensor, Damped, Tensor]:
    """Handle dead inputs, damp, factor: ``(U, W, damping, dead)`` with ``(H + damping)^-1 = U^T U``.

    ``U`` is upper triangular, which is what the solvers need: for any trailing set of columns
    ``S``, ``(H_SS)^-1 = U_SS^T U_SS``. It comes from one Cholesky factorisation of the flipped
    matrix, ``J H J = C C^T``, as ``U = J C^-1 J`` (a triangular inverse), without forming ``H^-1``.

    A dead input (zero diagonal: a pixel that is always 0, a dead ReLU) gets ``H_jj = 1`` and its
    weights are zeroed, as in OBC/SparseGPT: they never affect the layer's output on the
    calibration data, so removing them costs nothing and they are pruned first.

    ``H`` given as ``[H]``, a list holding the caller's only reference, is given up: it is taken out and
    freed once flipped, so at most two ``d x d`` matrices are held at a time (three if the caller keeps it).
    """
    # a copy, J H J (J reverses the order), the only one of H made here
    H = H.pop().flip(0, 1) if isinstance(H, list) else H.flip(0, 1)
    dead = torch.diagonal(H).flip(0) == 0
    if dead.any():
        flipped = dead.flip(0)
        H[flipped, flipped] = 1.0
        W = W.clone()
        W[:, dead] = 0.0
    damped = damped_cholesky(H, damp, what)
    del H
    L, damped.L = damped.L, None  # type: ignore[assignment]  (freed as soon as it is inverted)
    inverse = _lower_inverse(L)
    del L
    return inverse.flip(0, 1), W, damped, dead


def refit_to_reference(W: Tensor, C: Tensor, U: Tensor) -> Tensor:
    """``W C (A + damping)^-1``: the weights that best reproduce the reference outputs ``W x_ref`` from
    the current inputs ``x`` (``C = E[x_ref x^T]``, ``(A + damping)^-1 = U^T U`` from
    :func:`prepare_hessian`). Pruning these under ``A`` minimises ``E||W x_ref - w x||^2`` over the
    kept weights, up to the damping. Pass the weights before :func:`prepare_hessian` zeroed the dead
    inputs' columns: an input that died (always 0 now) still carried part of the reference outputs,
    which the live ones take over; its own column comes out zero (so do its columns of ``C``)."""
    return ((W @ C) @ U.T) @ U


def _lower_inverse(L: Tensor, block: int = 512) -> Tensor:
    """Inverse of a lower-triangular matrix, column block by column block: each solve only touches
    the trailing rows (d^3/3 flops, LAPACK's trtri, which torch does not expose)."""
    d = L.shape[0]
    out = torch.zeros_like(L)
    for j in range(0, d, block):
        e = min(j + block, d)
        rhs = torch.zeros(d - j, e - j, dtype=L.dtype, device=L.device)
        rhs.diagonal().fill_(1.0)
        out[j:, j:e] = torch.linalg.solve_triangular(L[j:, j:], rhs, upper=False)
    return out


def inverse_diagonal(U: Tensor) -> Tensor:
    """``diag(H^-1)`` from its upper factor (column norms of ``U``)."""
    return (U**2).sum(0)


def single_saliency(W: Tensor, U: Tensor) -> Tensor:
    """OBS saliency ``w_q^2 / (2 [H^-1]_qq)`` of removing each weight alone (reconstruction units)."""
    return W**2 / (2 * inverse_diagonal(U))


def _lowest_per_row(score: Tensor, n: Tensor) -> Tensor:
    """Mask of the ``n[r]`` lowest entries of each row (ties: lower column first)."""
    n = n.to(score.device)
    mask = torch.zeros_like(score, dtype=torch.bool)
    k = int(n.max()) if n.numel() else 0
    if k == 0:
        return mask
    if bool((n == k).all()):  # the common uniform case: an unsorted top-k is ~4x cheaper than a sort
        return mask.scatter_(1, torch.topk(score, k, dim=1, largest=False, sorted=False).indices, True)
    order = torch.sort(score, dim=1, stable=True).indices
    chosen = torch.arange(score.shape[1], device=score.device)[None, :] < n[:, None]
    return mask.scatter_(1, order, chosen)


def _row_block_quotas(W: Tensor, U: Tensor, counts: Tensor, forced: Tensor, blocksize: int) -> Tensor:
    """How many entries each row removes in each column block: as many as the row's ``counts[r]``
    lowest single-weight OBS saliencies (forced entries first) that fall in the block."""
    R, d = W.shape
    nb = (d + blocksize - 1) // blocksize
    score = torch.where(forced, torch.full_like(W, -torch.inf), single_saliency(W, U))
    chosen = _lowest_per_row(score.float(), counts).to(torch.long)
    return torch.nn.functional.pad(chosen, (0, nb * blocksize - d)).view(R, nb, blocksize).sum(2)


Groups = tuple[int, Tensor]  # (M, entries to remove in each group of M columns: (rows, d // M))


def _aligned(blocksize: int, d: int, groups: Groups | None) -> int:
    """Column block size cut at a multiple of the group size, so no group straddles two blocks."""
    if groups is None or blocksize >= d:
        return blocksize
    m = groups[0]
    return max(m, blocksize // m * m)


@dataclass
class _Working:
    """The rows of a greedy block still removing, and their columns.

    The downdates ``M -= m m^T / M_qq`` (``m = M[:, q]``) are deferred, as GPTQ defers its column
    updates: the last ``_LAZY`` vectors are kept aside in ``V``, a column of ``M`` is read through
    them and its diagonal ``dg`` kept current, and they are applied to ``M`` with one batched GEMM.
    At the same time rows that have removed their count are set aside and the removed coordinates
    dropped (``M`` shrinks as the row empties), so removing most of a row costs about ``d^3 / 3``
    instead of ``d^3``.
    """

    rows: Tensor  # original row of each working row
    col: Tensor  # original column of each working column
    W: Tensor
    frc: Tensor
    rem: Tensor
    cnt: Tensor
    M: Tensor
    V: Tensor
    dg: Tensor
    quota: Tensor | None = None
    gcount: Tensor | None = None

    def keep_rows(self, keep: Tensor) -> None:
        for name in ("rows", "col", "W", "frc", "rem", "cnt", "M", "V"):
            setattr(self, name, getattr(self, name)[keep])
        if self.quota is not None:
            self.quota, self.gcount = self.quota[keep], self.gcount[keep]

    def drop_removed(self, gone: int) -> None:
        """Drop the ``gone`` removed coordinates of every working row: ``M`` shrinks with the row."""
        Bw = self.W.shape[1]
        idx = torch.argsort(self.rem.to(torch.int8), dim=1, stable=True)[:, : Bw - gone]
        self.W, self.col, self.frc = self.W.gather(1, idx), self.col.gather(1, idx), self.frc.gather(1, idx)
        self.M = self.M.gather(1, idx[:, :, None].expand(-1, -1, Bw)).gather(
            2, idx[:, None, :].expand(-1, Bw - gone, -1)
        )
        self.rem = torch.zeros_like(self.frc)
        self.V = self.V[:, : Bw - gone]


def _greedy_choice(s: _Working, m: int | None) -> Tensor:
    """Each working row's next entry: the lowest ``w^2 / M_qq``, forced ones first, closed groups never."""
    score = s.W**2 / s.dg
    score.masked_fill_(s.rem, torch.inf)
    if m is not None:  # a group with its quota is closed
        score.masked_fill_((s.gcount >= s.quota).gather(1, torch.div(s.col, m, rounding_mode="floor")), torch.inf)
    score.masked_fill_(s.frc & ~s.rem, -torch.inf)  # forced first
    return score.argmin(1)


def _retire(s: _Working, step: int, last: bool, w_out: Tensor, removed_out: Tensor) -> bool:
    """Rows that removed their count leave the working set, written to the outputs; ``True`` at the end."""
    done = s.cnt <= step + 1
    if bool(done.any()) or last:
        d_rows = s.rows[done]
        w_out[d_rows] = 0.0
        w_out[d_rows[:, None], s.col[done]] = s.W[done]
        removed_out[d_rows] = True
        removed_out[d_rows[:, None], s.col[done]] = s.rem[done]
        if last:
            return True
        s.keep_rows(~done)
    return False


def _greedy_block(
    w: Tensor,
    M: Tensor,
    n: Tensor,
    forced: Tensor,
    group: Groups | None = None,
    record: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact greedy OBS on one column block: ``M`` (rows, B, B) is each row's inverse Hessian of the
    block (overwritten); remove ``n[r]`` entries of row ``r`` (``forced`` first), at most
    ``group[1][r, g]`` in group ``g`` of ``group[0]`` columns. Returns (w, removed, losses);
    ``record=(cost, step)`` receives, at each removed entry, its removal's loss and its step.

    Each step removes the lowest ``w_q^2 / M_qq`` of each row and downdates ``M -= m m^T / M_qq``,
    lazily (see :class:`_Working`); the choices are those of the plain rank-1 loop, up to rounding.
    """
    R, B = w.shape
    dev, dt = w.device, w.dtype
    w_out, removed_out = w.clone(), forced.clone()
    losses = torch.zeros(R, dtype=dt, device=dev)
    steps = int(n.max()) if R else 0
    if steps == 0:
        w_out[removed_out] = 0.0
        return w_out, removed_out, losses
    tiny = torch.finfo(dt).tiny
    s = _Working(
        rows=torch.arange(R, device=dev),
        col=torch.arange(B, device=dev).expand(R, B).clone(),
        W=w.clone(),
        frc=forced.clone(),
        rem=torch.zeros_like(forced),
        cnt=n.to(dev).clone(),
        M=M,
        V=torch.zeros(R, B, _LAZY, dtype=dt, device=dev),
        dg=torch.diagonal(M, dim1=1, dim2=2).clone(),
    )
    m = None
    if group is not None:
        m, s.quota = group[0], group[1].to(dev)
        s.gcount = torch.zeros_like(s.quota)
    k, start = 0, 0  # pending downdates; steps taken when the working set was last compacted
    for step in range(steps):
        ar = torch.arange(s.W.shape[0], device=dev)
        active = s.cnt > step
        q = _greedy_choice(s, m)
        mq = s.M[ar, :, q]
        if k:
            mq = mq - torch.bmm(s.V[:, :, :k], s.V[ar, q, :k].unsqueeze(2)).squeeze(2)
        mq = mq.masked_fill(s.rem, 0.0)  # removed coordinates are exactly 0
        mqq = mq[ar, q].clamp_min(tiny)
        a = active.to(dt)
        wq = s.W[ar, q]
        losses[s.rows] += a * wq**2 / (2 * mqq)
        if record is not None:
            at = (s.rows[active], s.col[ar, q][active])
            record[0][at], record[1][at] = (wq**2 / (2 * mqq))[active], step
        s.W -= (a * wq / mqq)[:, None] * mq
        v = mq * (a / mqq.sqrt())[:, None]  # M -= v v^T
        s.V[:, :, k] = v
        k += 1
        s.dg -= v**2
        sel = ar[active]
        s.W[sel, q[active]] = 0.0
        s.rem[sel, q[active]] = True
        if m is not None:
            s.gcount[sel, torch.div(s.col[sel, q[active]], m, rounding_mode="floor")] += 1
        last = step == steps - 1
        if k == _LAZY or last:
            s.M.baddbmm_(s.V[:, :, :k], s.V[:, :, :k].transpose(1, 2), alpha=-1.0)
            k = 0
            if _retire(s, step, last, w_out, removed_out):
                break
            gone = step + 1 - start  # removed per working row since the last compaction
            if gone * _SHRINK >= s.W.shape[1]:
                s.drop_removed(gone)
                start = step + 1
            s.dg = torch.diagonal(s.M, dim1=1, dim2=2).clone()
    return w_out, removed_out, losses


def removal_costs(W: Tensor, U: Tensor, forced: Tensor) -> Tensor:
    """What removing each weight costs on the way down: every row emptied by exact greedy OBS
    (forced entries first), each entry scored with the largest single-removal loss up to its own
    removal. Whatever count ``c`` a row gets, the entries its greedy removes first are its ``c``
    lowest scores, so ranking the scores across rows allocates counts by the rows' actual error
    curves (with compensation), not by single-weight saliencies at the dense weights. One exact
    pass over every row: :func:`obc_prune`'s cost with every entry removed."""
    R, d = W.shape
    cost = torch.zeros_like(W)
    step = torch.zeros(W.shape, dtype=torch.long, device=W.device)
    Minv = U.T @ U
    budget = EXACT_CHUNK_BYTES.get(W.device.type, EXACT_CHUNK_BYTES_DEFAULT)
    chunk = max(1, budget // (Minv.numel() * Minv.element_size()))
    everything = torch.full((R,), d, device=W.device)
    for r1 in range(0, R, chunk):
        rows = slice(r1, min(R, r1 + chunk))
        M = Minv.expand(rows.stop - r1, d, d).clone()
        c, s = cost[rows], step[rows]  # views: the greedy records into them
        _greedy_block(W[rows].clone(), M, everything[rows], forced[rows], record=(c, s))
        order = torch.argsort(s, dim=1)
        cost[rows] = torch.zeros_like(c).scatter_(1, order, torch.cummax(c.gather(1, order), dim=1).values)
    return cost


def obc_prune(
    W: Tensor, U: Tensor, counts: Tensor, forced: Tensor, groups: Groups | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Exact greedy OBS per row: remove ``counts[r]`` weights of row ``r`` (``forced`` ones first)."""
    return blocked_prune(W, U, counts, forced, blocksize=W.shape[1], groups=groups)


def blocked_prune(
    W: Tensor, U: Tensor, counts: Tensor, forced: Tensor, blocksize: int = 128, groups: Groups | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Blocked OBS (see the module docstring); ``blocksize >= d_col`` is exact OBC. With ``groups``
    the counts are the groups' quotas (``counts`` is ignored)."""
    R, d = W.shape
    W, pruned = W.clone(), forced.clone()
    losses = torch.zeros(R, dtype=W.dtype, device=W.device)
    blocksize = _aligned(blocksize, d, groups)
    if groups is not None:
        m, gq = groups[0], groups[1].to(W.device)
        quotas = torch.stack([gq[:, i // m : min(i + blocksize, d) // m].sum(1) for i in range(0, d, blocksize)], 1)
    else:
        counts = torch.maximum(counts.to(W.device), row_counts(forced))
        quotas = _row_block_quotas(W, U, counts, forced, blocksize) if blocksize < d else counts[:, None]
    for b, i1 in enumerate(range(0, d, blocksize)):
        i2 = min(i1 + blocksize, d)
        Ub = U[i1:i2, i1:i2]
        Mb = Ub.T @ Ub  # inverse Hessian of the block, given the earlier columns are final
        budget = EXACT_CHUNK_BYTES.get(W.device.type, EXACT_CHUNK_BYTES_DEFAULT)
        chunk = max(1, budget // (Mb.numel() * Mb.element_size()))
        old = W[:, i1:i2].clone()
        for r1 in range(0, R, chunk):
            rows = slice(r1, min(R, r1 + chunk))
            M = Mb.expand(rows.stop - r1, *Mb.shape).clone()
            group = None if groups is None else (m, gq[rows, i1 // m : i2 // m])
            w, removed, loss = _greedy_block(old[rows].clone(), M, quotas[rows, b], forced[rows, i1:i2], group)
            W[rows, i1:i2], pruned[rows, i1:i2], losses[rows] = w, removed | forced[rows, i1:i2], losses[rows] + loss
        if i2 < d:
            # every update of the block lies in span(H_S^-1[:, block]); its effect on the later
            # columns is (dW_block Ub^-1) U[block, later]: one triangular solve and one GEMM
            delta = torch.linalg.solve_triangular(Ub, W[:, i1:i2] - old, upper=True, left=False)
            W[:, i2:] += delta @ U[i1:i2, i2:]
    return W, pruned, losses


def row_counts(mask: Tensor, chunk: int = 256) -> Tensor:
    """``mask.sum(1)`` of a bool matrix, ``chunk`` rows at a time: torch sums a bool tensor through an int64 copy
    of all of it (twice a float32 layer), which set the peak of a wide layer's solve."""
    return torch.cat([mask[r : r + chunk].sum(1) for r in range(0, mask.shape[0], chunk)]) if len(mask) else mask.sum(1)


def _block_totals(counts: Tensor, forced: Tensor, blocksize: int) -> list[int]:
    """Removals per column block for adaptive selection: each block's forced entries plus the new
    removals spread over the blocks in proportion to their free entries (cumulative rounding, so
    the layer's total is exactly ``counts.sum()``)."""
    R, d = forced.shape
    # counted block by block: a whole-layer int64 copy of the mask (twice the float32 layer) is what set the
    # fast sweep's peak on a wide layer
    f = torch.stack([forced[:, i : i + blocksize].sum() for i in range(0, d, blocksize)])
    width = torch.tensor([min(blocksize, d - i) for i in range(0, d, blocksize)], device=forced.device)
    free = (width * R - f).double()
    new = int(counts.sum()) - int(torch.count_nonzero(forced))
    cum = torch.round(new * torch.cumsum(free, 0) / free.sum().clamp_min(1)).long()
    return (f + torch.diff(cum, prepend=cum.new_zeros(1))).tolist()


def sparsegpt_prune(
    W: Tensor,
    U: Tensor,
    counts: Tensor,
    forced: Tensor,
    blocksize: int = 128,
    adaptive: bool = False,
    groups: Groups | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SparseGPT's column sweep (see the module docstring): the cheapest solver, O(GEMM).

    ``adaptive=False``: row ``r`` removes ``counts[r]`` weights, shared among the column blocks by
    the dense weights' saliencies. ``adaptive=True`` is SparseGPT's own mask selection: only the
    layer's total ``counts.sum()`` is kept, and each block's removals are the lowest saliencies of
    the whole block (all rows), taken from the weights as compensated so far. Measured on a
    5M-parameter LLaMA at 70% (benchmarks/RESULTS.md) it is what closes the gap to SparseGPT.
    ``groups`` (N:M): each group's entries are chosen at its first column, the ``quota`` lowest
    ``w^2 / U_jj^2`` of the group in the current weights (``counts`` and ``adaptive`` are ignored).

    Left-looking: a block receives all earlier blocks' errors in one GEMM when it starts
    (``Err[:, :i1] @ U[:i1, block]``), which keeps the GEMMs deep and avoids rewriting the trailing
    columns after every block; the arithmetic is SparseGPT's.
    """
    R, d = W.shape
    W = W.clone()
    pruned = torch.zeros_like(forced)
    Err = torch.zeros_like(W)
    blocksize, inner = _aligned(blocksize, d, groups), _INNER
    if groups is not None:
        m, gq = groups[0], groups[1].to(W.device)
        inner = max(1, _INNER // m) * m  # a group never straddles two inner blocks: its weights are current
    elif adaptive:
        totals = _block_totals(torch.maximum(counts.to(W.device), row_counts(forced)), forced, blocksize)
    else:
        quotas = _row_block_quotas(W, U, torch.maximum(counts.to(W.device), row_counts(forced)), forced, blocksize)
    for b, i1 in enumerate(range(0, d, blocksize)):
        i2 = min(i1 + blocksize, d)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        if i1:
            W1 -= Err[:, :i1] @ U[:i1, i1:i2]
        diag2 = torch.diagonal(U1) ** 2
        if groups is not None:
            m1 = torch.zeros_like(W1, dtype=torch.bool)  # chosen group by group, inside the sweep
        else:
            score = torch.where(forced[:, i1:i2], torch.full_like(W1, -torch.inf), W1**2 / diag2)
            if adaptive:
                # contiguous (view(-1) below): a Conv1D weight's matrix is a transposed view
                m1 = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
                if totals[b]:
                    m1.view(-1)[torch.topk(score.reshape(-1), totals[b], largest=False, sorted=False).indices] = True
            else:
                m1 = _lowest_per_row(score, quotas[:, b])
        drop = m1.to(W.dtype)
        Err1 = Err[:, i1:i2]
        B = i2 - i1
        for j1 in range(0, B, inner):  # two-level blocking: rank-1 updates stay inside `inner` columns
            j2 = min(j1 + inner, B)
            for i in range(j1, j2):
                if groups is not None and i % m == 0:  # SparseGPT's prunen/prunem, from the current weights
                    g = slice(i, i + m)
                    score = torch.where(forced[:, i1 + i : i1 + i + m], -torch.inf, W1[:, g] ** 2 / diag2[g])
                    m1[:, g] = _lowest_per_row(score, gq[:, (i1 + i) // m])
                    drop[:, g] = m1[:, g].to(W.dtype)
                torch.mul(W1[:, i], drop[:, i] / U1[i, i], out=Err1[:, i])
                W1[:, i:j2].addr_(Err1[:, i], U1[i, i:j2], alpha=-1)  # spread the column's error
            if j2 < B:
                W1[:, j2:] -= Err1[:, j1:j2] @ U1[j1:j2, j2:]
        W1[m1] = 0.0
        pruned[:, i1:i2] = m1
    # row by row chunks: the squares of the whole error would be one more copy of the layer at the peak
    return W, pruned, torch.cat([(Err[r : r + 256] ** 2).sum(1) for r in range(0, R, 256)]) / 2


LAYER_BUDGET = 5e10  # element updates: about 10 s on two CPU cores (the exact solver on 300 x 784 rows)
# prune()'s block-by-block plan for the defaults: about 0.2 s of one core per layer, so layers narrower than
# about 300 inputs get the exact solver and wider ones the fast sweep (at 1024 inputs and up, a model's time
# is the SparseGPT preset's: benchmarks/RESULTS.md, "defaults" and "scale-lm")
PLAN_LAYER_BUDGET = 1e9


def _greedy_work(rows_counts: Tensor, width: int) -> float:
    """Element updates of exact greedy removal of ``c`` entries from a row of ``width``: the working
    inverse shrinks as the row empties, ``sum_{s<c} (width - s)^2 ~ (width^3 - (width - c)^3) / 3``."""
    c = rows_counts.double().clamp(0, width)
    return float(((width**3 - (width - c) ** 3) / 3).sum())


def removal_costs_work(rows: int, d: int) -> float:
    """Element updates of :func:`removal_costs` on a ``rows x d`` layer (every row emptied)."""
    return _greedy_work(torch.full((rows,), d), d)


def solver_work(W: Tensor, counts: Tensor, blocksize: int) -> dict[str, float]:
    """Element updates of each solver's greedy removals for one layer.

    Exact: every row's greedy removal over all ``d`` columns; blocked: over each column block, a
    row's removals shared evenly among the blocks. The factorisation and the column sweep
    (``d^3 + rows d^2``), which every solver pays, count as zero: the fast solver is the floor the
    others are compared against.
    """
    d = W.shape[1]
    b = min(blocksize, d)
    blocked = _greedy_work(counts.double() * b / d, b) * (d / b)
    return {"exact": _greedy_work(counts, d), "blocked": blocked, "fast": 0.0}


def auto_solvers(
    shapes: Sequence[tuple[int, int]], counts: Sequence[Tensor], blocksize: int, budget: float, per_layer: bool
) -> list[str]:
    """:func:`choose_solvers` for layers of these ``(rows, d)`` shapes removing ``counts`` entries per row."""
    works = [solver_work(torch.empty(shape, device="meta"), c, blocksize) for shape, c in zip(shapes, counts)]
    return choose_solvers(works, budget, per_layer=per_layer)


def auto_sweeps(shape: tuple[int, int], sparsity: float, blocksize: int, budget: float) -> bool:
    """Whether a per-layer ``budget`` gives a ``(rows, d)`` layer the fast sweep at ``sparsity`` spread evenly over
    its rows, before its rows' counts are known (the greedy work hardly depends on how they are spread)."""
    rows, d = shape
    return auto_solvers([shape], [torch.full((rows,), round(sparsity * d))], blocksize, budget, True)[0] == "fast"


def choose_solvers(works: list[dict[str, float]], budget: float, per_layer: bool = False) -> list[str]:
    """``solver="auto"`` for a round's layers: the most exact solvers whose work fits ``budget``.

    ``per_layer``: each layer gets the whole budget. Otherwise it is the round's: every layer starts
    with the fast solver, and upgrades (to blocked, then exact) go to the cheapest first while the
    total fits, so a round's cost does not grow with the number of layers.
    """
    if per_layer:
        return [next((s for s in ("exact", "blocked") if w[s] <= budget), "fast") for w in works]
    # upgrades in order of total work; the fast sweep is every solver's floor and counts as zero
    chosen, total = ["fast"] * len(works), 0.0
    # cheapest first; at equal work (block >= width: the same algorithm) exact first
    for work, _, i, solver in sorted(
        (w[s], s != "exact", i, s) for i, w in enumerate(works) for s in ("blocked", "exact")
    ):
        current = works[i][chosen[i]]
        if work > current and total + work - current <= budget:
            total += work - current
            chosen[i] = solver
    return chosen
