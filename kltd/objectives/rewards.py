"""Returns and weights for offline RL on dataset trajectories (trajectory=dataset).

A reward scores each (prompt, response) sequence (the data's answer checker, or the teacher's
log-likelihood: kltd.train.trainer picks it); a weighting turns a batch of rewards into
per-sequence weights for the cross-entropy: filtered behaviour cloning keeps the top fraction,
advantage-weighted regression uses exp(advantage / temperature), clipped.
"""

from __future__ import annotations

import torch

from kltd.spec.choices import WEIGHTINGS


def filter_weights(rewards: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """[B] -> [B] 0/1: keep the sequences whose reward reaches the batch's top `keep_fraction` (ties kept)."""
    keep = max(1, round(keep_fraction * rewards.numel()))
    threshold = rewards.topk(keep).values.min()
    return (rewards >= threshold).float()


def awr_weights(rewards: torch.Tensor, temperature: float, max_weight: float) -> torch.Tensor:
    """[B] -> [B] exp((r - mean r) / temperature), clipped at max_weight (advantage-weighted regression)."""
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


def teacher_loglik(teacher_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, N, V], [B, N], [B, N] -> [B]: the teacher's mean log-likelihood per token of each response."""
    logp = torch.log_softmax(teacher_logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(1) / mask.sum(1).clamp(min=1)
