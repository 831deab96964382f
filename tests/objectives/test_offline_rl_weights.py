"""Offline RL's batch-statistic weights (kltd.objectives.rewards: awr, filter) against the population-weighted
gradient that dataset_loss would give with weights computed from the data distribution itself.

Testbed: tests/support/enumerable.py (121 responses). The data D are the student's responses (what
`kltd make-data` writes by default); the return is `reward` (number of token-0s, minus 1 if truncated), which
takes the values -1..3 under D. A row's weight depends on its own reward and on the other B - 1 rows of its
batch; the expected gradient at batch size B is

    -sum_y D(y) omega_B(y) grad log q(y),    omega_B(y) = E[w_1 | y_1 = y]   (the other rows averaged out),

against the population-weighted -sum_y D(y) w(y) grad log q(y). At B = 2 omega is computed by enumerating
all 121^2 batches; for larger B from the distribution of the other rows' sufficient statistic (their summed
reward for awr, how many of them beat the row for filter), both through the production weighting.
"""

from __future__ import annotations

import functools
import math

import torch

from kltd.objectives import rewards
from kltd.objectives.losses import dataset_loss
from kltd.objectives.rewards import sequence_weights
from tests.support.enumerable import all_sequences, make_testbed, reward, sequence_logprob, theta_grad

SETTINGS = dict(keep_fraction=0.5, temperature=1.0, max_weight=20.0)  # the config's defaults


@functools.lru_cache(maxsize=None)
def data():
    tb = make_testbed(0)
    seqs = all_sequences()
    d = sequence_logprob(tb.theta, seqs).exp().detach()
    r = torch.tensor([reward(y) for y in seqs], dtype=torch.float64)
    law = {v: float(d[r == v].sum()) for v in sorted(set(r.tolist()))}  # the reward's distribution under D
    return tb, seqs, d, r, law


def weight(rewards: list[float], weighting: str) -> float:
    """The production weight of the first row of a batch with these rewards."""
    return float(sequence_weights(torch.tensor(rewards, dtype=torch.float64), weighting, **SETTINGS)[0])


def population_weights(weighting: str) -> dict[float, float]:
    """w(r) from D itself: awr against the population's mean reward; filter keeps the rewards whose upper
    tail (strictly better rewards) holds less than keep_fraction of D, ties kept as in filter_weights."""
    *_, law = data()
    mean = sum(v * a for v, a in law.items())
    if weighting == "awr":
        return {v: min(math.exp((v - mean) / SETTINGS["temperature"]), SETTINGS["max_weight"]) for v in law}
    return {v: float(sum(a for u, a in law.items() if u > v) < SETTINGS["keep_fraction"]) for v in law}


def batch_weights(weighting: str, B: int) -> dict[float, float]:
    """omega_B(r) = E[w_1 | r_1 = r] over the other B - 1 rows, exactly."""
    *_, law = data()
    out = {}
    if weighting == "awr":  # w_1 depends on the others only through their summed reward (integer valued)
        total = {0.0: 1.0}
        for _ in range(B - 1):
            nxt = {}
            for s, a in total.items():
                for v, b in law.items():
                    nxt[s + v] = nxt.get(s + v, 0.0) + a * b
            total = nxt
        for v in law:
            out[v] = sum(a * weight([v] + [s / (B - 1)] * (B - 1), "awr") for s, a in total.items())
        return out
    for v in law:  # filter: w_1 depends only on how many other rows have a strictly higher reward
        above = sum(a for u, a in law.items() if u > v)
        out[v] = sum(math.comb(B - 1, c) * above**c * (1 - above) ** (B - 1 - c)
                     * weight([v] + [v + 1] * c + [v - 1] * (B - 1 - c), "filter") for c in range(B))
    return out


def expected_gradient(weights_of_reward: dict[float, float]) -> torch.Tensor:
    """-sum_y D(y) w(r(y)) grad log q(y), through dataset_loss."""
    tb, seqs, d, r, _ = data()
    w = torch.tensor([weights_of_reward[v] for v in r.tolist()], dtype=torch.float64)
    return theta_grad(tb, seqs, lambda s, t, y, m: dataset_loss(s, y, m, w, normalization="sequence", denominator=1.0),
                      row_weights=d)


def gap(weighting: str, B: int) -> float:
    target = expected_gradient(population_weights(weighting))
    return float((expected_gradient(batch_weights(weighting, B)) - target).norm() / target.norm())


def enumerated_gradient_at_two(weighting: str) -> torch.Tensor:
    """The expected gradient of dataset_loss over every batch of 2 responses, each weighted by D(y1) D(y2)."""
    tb, seqs, d, r, _ = data()
    table = {}  # the production weights of every pair of reward values that occurs
    rows, w, prob = [], [], []
    for i, a in enumerate(seqs):
        for j, b in enumerate(seqs):
            key = (float(r[i]), float(r[j]))
            if key not in table:
                table[key] = sequence_weights(torch.tensor(key, dtype=torch.float64), weighting, **SETTINGS).tolist()
            rows += [a, b]
            w += table[key]
            prob += [float(d[i] * d[j])] * 2
    w = torch.tensor(w, dtype=torch.float64)
    return theta_grad(tb, rows, lambda s, t, y, m: dataset_loss(s, y, m, w, normalization="sequence", denominator=2.0),
                      row_weights=torch.tensor(prob, dtype=torch.float64))


def test_batch_weights_at_two_are_the_enumeration_of_every_batch():
    for weighting in ("awr", "filter"):
        enumerated = enumerated_gradient_at_two(weighting)
        from_law = expected_gradient(batch_weights(weighting, 2))
        assert float((enumerated - from_law).norm() / from_law.norm()) < 1e-12, weighting


def test_batch_statistic_weights_are_biased_at_small_batches_and_the_bias_shrinks_as_documented():
    gaps = {w: {B: gap(w, B) for B in (2, 4, 8, 16, 32, 64)} for w in ("awr", "filter")}
    print("\nrelative gap to the population-weighted gradient:", {w: {B: round(g, 4) for B, g in v.items()}
                                                                  for w, v in gaps.items()})
    for weighting in ("awr", "filter"):
        quoted = f"{weighting}: " + ", ".join(f"{gaps[weighting][B]:.2f}" for B in (2, 4, 8))
        assert quoted in " ".join(rewards.__doc__.split()), f"kltd.objectives.rewards should say '{quoted}'"
        assert gaps[weighting][2] > 0.1  # far from 0 at B = 2
        series = list(gaps[weighting].values())
        assert all(a > b for a, b in zip(series, series[1:])), weighting  # shrinking with B
    # awr: the batch mean's bias is O(1/B): B x gap settles to a constant (about 1.3 here)
    scaled = [B * g for B, g in gaps["awr"].items()]
    assert max(scaled) / min(scaled) < 1.2 and abs(scaled[-1] - scaled[-2]) < 0.01
    assert gaps["filter"][64] < 0.01  # the batch's top half approaches the population's
