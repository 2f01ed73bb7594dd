"""Rounding shares to whole counts.

Frank–Wolfe rounds its poisoning measure to m points (appendix B) and Sever spreads its removals
over the classes in proportion to their sizes; both need whole counts with a given total that are as
close as possible to the exact shares.
"""

from __future__ import annotations

import torch
from torch import Tensor


def largest_remainder(shares, total: int) -> Tensor:
    """Counts c_i ≥ 0 with Σ c_i = ``total`` that round total·s_i / Σ s (Hamilton's largest-remainder
    method): ⌊total·s_i/Σ s⌋ each, plus one for the largest remainders (ties: the earlier share)
    until the total is reached. ``shares``: non-negative weights, a tensor or a list; int64 counts
    (all zero when every share is)."""
    shares = torch.as_tensor(shares).double()
    if not shares.any():
        return torch.zeros(len(shares), dtype=torch.long)
    exact = shares / shares.sum() * total
    counts = exact.floor().long()
    rest = total - int(counts.sum())
    order = torch.argsort(exact - counts, descending=True, stable=True)
    counts[order[:rest]] += 1
    return counts
