"""Deterministic batches: the rows, noise and label drops of step ``s`` depend only on (seed, s).

That makes a resumed run identical to an uninterrupted one (no data-loader state to restore), and a
run on W processes identical to one process with the same global batch: every rank builds the same
global batch and takes its own contiguous shard (``Runtime.shard``).
"""

from __future__ import annotations

import torch


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, step, stream) with a fixed mixing (no Python ``hash``)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1))
    return g


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the global batch at ``step``: consecutive slices of per-epoch permutations of ``range(n)``."""
    start = step * batch
    out, pos = [], start
    while pos < start + batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
        take = min(n - offset, start + batch - pos)
        out.append(perm[offset : offset + take])
        pos += take
    return torch.cat(out)
