"""Returns and weights for offline RL on dataset trajectories (trajectory=dataset).

A reward scores each (prompt, response) sequence (the data's answer checker, or the teacher's
log-likelihood: kltd.train.trainer picks it); a weighting turns a batch of rewards into
per-sequence weights for the cross-entropy: filtered behaviour cloning keeps the top fraction,
advantage-weighted regression uses exp(advantage / temperature), clipped.

Both weightings are batch statistics (self-normalised, batch-relative): a row's weight depends on the other
rows of its micro-batch, through their mean reward (awr) or the batch's top fraction (filter). For B rows
y_i ~ D, dataset_loss's expected gradient is therefore -E_D[omega_B(y) grad log q(y)], omega_B(y) = E[w_1 |
y_1 = y] (the other B - 1 rows averaged out), not the population-weighted -E_D[w(y) grad log q(y)] with w
taken from D itself (awr: exp((r - E_D r) / temperature), clipped; filter: 1 where the rewards strictly above
r hold less than keep_fraction of D). omega_B approaches w as B grows: for awr the gap is O(1/B) (the batch
mean holds the row's own reward with weight 1/B, and its noise passes through the convex exp); for filter
the batch's top fraction approaches the population's quantile. Measured exactly on the enumerable testbed
(tests/objectives/test_offline_rl_weights.py: student-written data, keep_fraction 0.5, temperature 1), the
relative gap to the population-weighted gradient at B = 2, 4, 8 is
awr: 0.57, 0.30, 0.16 (B x gap settles at 1.3);
filter: 0.62, 0.51, 0.33 (0.003 at B = 64).
kltd.schema.config.approximations labels both in a run's summary.
"""

from __future__ import annotations

import torch

from kltd.schema.choices import WEIGHTINGS


def filter_weights(rewards: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """[B] -> [B] 0/1: keep the sequences whose reward reaches the batch's top `keep_fraction` (ties kept).

    The threshold is the batch's own, not the population's quantile (see the module docstring)."""
    keep = max(1, round(keep_fraction * rewards.numel()))
    threshold = rewards.topk(keep).values.min()
    return (rewards >= threshold).float()


def awr_weights(rewards: torch.Tensor, temperature: float, max_weight: float) -> torch.Tensor:
    """[B] -> [B] exp((r - mean r) / temperature), clipped at max_weight (advantage-weighted regression).

    The baseline is the batch's mean reward, the row's own included: the expected gradient is O(1/B) off the
    one weighted by the population's mean (see the module docstring)."""
    advantage = rewards - rewards.mean()
    return torch.exp(advantage / temperature).clamp(max=max_weight)


def sequence_weights(rewards: torch.Tensor, weighting: str, *, keep_fraction=0.5, temperature=1.0, max_weight=20.0):
    if weighting == "none":
        return torch.ones_like(rewards)
    if weighting == "filter":
        return filter_weights(rewards, keep_fraction)
    if weighting == "awr":
        return awr_weights(rewards, temperature, max_weight)
    raise ValueError(f"unknown weighting '{weighting}'; choose one of {', '.join(WEIGHTINGS)}")


def checker_rewards(checker, texts: list[str], examples: list) -> list[float]:
    """The answer checker as a reward: 1.0 for each response it accepts, 0.0 otherwise."""
    return [float(checker(text, example)) for text, example in zip(texts, examples)]


def teacher_loglik(teacher_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N, V], [B, N], [B, N] -> [B]: the teacher's mean log-likelihood per token of each response."""
    logp = torch.log_softmax(teacher_logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
