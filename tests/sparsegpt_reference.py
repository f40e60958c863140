"""SparseGPT's ``fasterprune`` column sweep, written out as in the reference implementation (no
damping here: the tests pass the factor ``U`` of the damped inverse), with the mask rule left to
the caller: the tests differ only in how they choose a block's or a group's zeros."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

# choose(W1, U1, i, m1, block_index): mark the zeros of the current block in m1 at column i
MaskRule = Callable[[Tensor, Tensor, int, Tensor, int], None]


def sparsegpt_reference(W: Tensor, U: Tensor, blocksize: int, choose: MaskRule) -> tuple[Tensor, Tensor]:
    """``(compensated weights, pruned mask)`` of one sweep over the columns of ``W``."""
    ref, mask = W.clone(), torch.zeros_like(W, dtype=torch.bool)
    d = W.shape[1]
    for b, i1 in enumerate(range(0, d, blocksize)):
        i2 = min(i1 + blocksize, d)
        W1, U1 = ref[:, i1:i2].clone(), U[i1:i2, i1:i2]
        m1 = torch.zeros_like(W1, dtype=torch.bool)
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            choose(W1, U1, i, m1, b)
            q = torch.where(m1[:, i], torch.zeros_like(W1[:, i]), W1[:, i])
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        ref[:, i1:i2] = W1
        ref[:, i2:] -= Err1 @ U[i1:i2, i2:]
        mask[:, i1:i2] = m1
    return ref, mask
