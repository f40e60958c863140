"""Block-diagonal Fisher OBS (WoodFisher, Singh & Alistarh 2020): the exact removal of a set per block.

The blocks come from :class:`lightning_prune.stats.blockfisher.BlockFisher`; they are inverted as
``F_b + damp * mean(diag F_b) * I`` by Cholesky at round time. Saliencies ``w_q^2 / (2 [F_b^-1]_qq)``
are in loss units. Removing a set ``Z_b`` per block is solved exactly
(``dw = -F^-1_{:,Z} (F^-1_ZZ)^-1 w_Z``), not as a sum of single-weight updates.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_set_update(wb: Tensor, Finv: Tensor, Z: Tensor) -> tuple[Tensor, Tensor]:
    """Exact OBS removal of the set ``Z`` in every block: ``(new block weights, loss per block)``."""
    z = Z.to(wb.dtype)
    S = Finv * z[:, :, None] * z[:, None, :] + torch.diag_embed(1 - z)
    u = torch.linalg.solve(S, (wb * z).unsqueeze(-1)).squeeze(-1)
    new = wb - (Finv @ u.unsqueeze(-1)).squeeze(-1)
    new = torch.where(Z, torch.zeros_like(new), new)
    return new, 0.5 * (wb * z * u).sum(1)
