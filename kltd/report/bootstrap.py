"""Bootstrap intervals over questions: a figure's 95% interval, and the paired interval of a difference.

Questions are resampled with replacement (the samples of one question stay together, so Avg@k and Pass@k keep
their within-question correlation). Seeded: the same values always give the same interval.
"""

from __future__ import annotations

import numpy as np

LEVEL = 0.95


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(resamples, len(values)))
    return values[picks].mean(1)


def interval(values: list[float], resamples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """The 95% percentile-bootstrap interval of the mean of per-question `values` (None for no values)."""
    if not values or resamples < 1:
        return None
    means = _resampled_means(np.asarray(values, dtype=np.float64), resamples, seed)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


def paired_interval(a: list[float], b: list[float], resamples: int = 1000, seed: int = 0
                    ) -> tuple[float, float] | None:
    """The 95% interval of mean(a) - mean(b) over the same questions (a[i] and b[i] are one question's)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same questions: {len(a)} against {len(b)}")
    return interval([x - y for x, y in zip(a, b)], resamples, seed)
