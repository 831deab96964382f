"""The order in which training examples are drawn: epoch after epoch, each a fresh seeded shuffle.

One stream, read by the trainer (`take`) and previewed by whatever must prepare for it (`peek`: the
teacher cache fills exactly the examples a run will draw). Its position is a single integer, so it can be
saved and restored.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice


def shuffled_indices(n: int, seed: int, shuffle: bool = True) -> Iterator[int]:
    """0..n-1 in a fresh seeded shuffle per epoch, epoch after epoch (in file order without `shuffle`)."""
    order = random.Random(seed)
    while True:
        permutation = list(range(n))
        if shuffle:
            order.shuffle(permutation)
        yield from permutation


class ExampleOrder:
    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("there are no training examples to draw from")
        self.n, self.seed, self.shuffle, self.position = n, seed, shuffle, 0
        self._stream = self._indices()

    def _indices(self) -> Iterator[int]:
        return shuffled_indices(self.n, self.seed, self.shuffle)

    def take(self, count: int) -> list[int]:
        """The next `count` indices; the stream moves on."""
        self.position += count
        return list(islice(self._stream, count))

    def seek(self, position: int) -> None:
        """Continue from `position` (a saved run's), exactly as if the first `position` indices had been taken."""
        self.position = position
        self._stream = islice(self._indices(), position, None)

    def peek(self, count: int) -> list[int]:
        """The next `count` indices without moving on."""
        return list(islice(self._indices(), self.position, self.position + count))
