"""Sampling noise keyed by what is drawn, not by the batch it is drawn in.

Every random draw behind a training state (its sampled tokens, its mixture coin, its hand-off point) comes
from a stream keyed by (seed, optimiser step, the row's place in the step's global batch, what is drawn).
A row therefore gets the same draws whether the global batch is sampled by one process or split across
several, in one sampling call or in a few: the result of a run does not depend on the number of processes
(kltd.train.ranks), and resuming needs no random state for it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

import torch
from torch import Tensor


def _stream(*key) -> torch.Generator:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass(frozen=True)
class RowNoise:
    """The draws of some rows of one optimiser step's global batch, for one purpose."""

    seed: int
    step: int
    rows: tuple[int, ...]  # each local row's index in the step's global batch
    purpose: str = "student"

    @classmethod
    def from_generator(cls, generator: torch.Generator, rows: int) -> RowNoise:
        """Rows 0..rows-1 under a seed drawn from `generator` (callers outside the trainer)."""
        return cls(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)), 0, tuple(range(rows)))

    def uniforms(self, n: int, device=None) -> Tensor:
        """[rows, n] float64 uniforms in [0, 1); column c of a row is the same for every n > c."""
        if not self.rows:
            return torch.empty((0, n), dtype=torch.float64, device=device)
        table = torch.stack([torch.rand(n, generator=_stream(self.seed, self.step, row, self.purpose),
                                        dtype=torch.float64) for row in self.rows])
        return table if device is None else table.to(device)

    def subset(self, index: list[int]) -> RowNoise:
        return replace(self, rows=tuple(self.rows[i] for i in index))

    def named(self, purpose: str) -> RowNoise:
        return replace(self, purpose=purpose)
