"""Per-position curves: exact means, and no tail resting on a handful of long responses."""

import pytest
import torch

from kltd.train.evaluation import PositionCurve


def test_means_by_position_and_the_tail_that_too_few_sequences_reach_is_dropped():
    curve = PositionCurve()
    lengths = [3] * 60 + [5] * 38 + [9] * 2  # 100 sequences; only 2 (2%) reach positions 5..8
    values = torch.arange(1.0, 101.0).unsqueeze(1).expand(100, 9)  # row i holds i + 1 everywhere
    mask = torch.arange(9).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    curve.add(values[:50], mask[:50])  # in two batches, as evaluation adds them
    curve.add(values[50:], mask[50:])
    means = curve.means()
    assert len(means) == 5  # positions 0..4 are reached by >= 5% of the sequences, 5..8 by 2%
    assert means[0] == pytest.approx(values[:, 0].mean().item())
    assert means[4] == pytest.approx(values[60:, 0].mean().item())  # the 40 sequences of length >= 5


def test_an_empty_curve_has_no_means():
    assert PositionCurve().means() == []
