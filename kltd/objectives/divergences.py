"""Per-token divergences between the teacher p and the student q, all behind one spec.

Conventions (p = teacher, q = student, everything summed over the vocabulary, one value per position):

    forward_kl       KL(p || q)
    reverse_kl       KL(q || p)
    jsd              TRL's generalised JSD: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q;
                     beta = 0 is *defined* as KL(p || q) and beta = 1 as KL(q || p) (the mixture form vanishes there)
    jsd_scaled       jsd / (beta (1 - beta)), continuous on [0, 1]: exactly KL(p || q) at 0 and KL(q || p) at 1
    skew_kl          KL(p || alpha p + (1 - alpha) q)            (DistiLLM's skew KL)
    skew_reverse_kl  KL(q || alpha q + (1 - alpha) p)            (DistiLLM's skew reverse KL)
    tv               0.5 * sum |p - q|
    kl_mix           (1 - mix) KL(p || q) + mix KL(q || p)

Both models' logits are divided by `temperature` before the softmax (no T^2 factor). Everything runs in
log-space and at least float32; a probability that is exactly 0 (a -inf logit) contributes 0, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kltd.spec.choices import DIVERGENCES


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence D(p, q) to use per token; p = teacher, q = student."""

    name: str = "forward_kl"
    beta: float = 0.5  # jsd / jsd_scaled: 0 -> KL(p||q), 1 -> KL(q||p) (TRL's generalized_jsd_loss convention)
    alpha: float = 0.1  # skew_kl: KL(p || a p + (1-a) q); skew_reverse_kl: KL(q || a q + (1-a) p)
    mix: float = 0.5  # kl_mix: (1 - mix) * forward + mix * reverse
    temperature: float = 1.0  # divides both models' logits

    def __post_init__(self):
        if self.name not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.name!r}; choose one of {', '.join(DIVERGENCES)}")
        for key in ("beta", "alpha", "mix"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}={getattr(self, key)} must lie in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")


# ---------------------------------------------------------------------------------------------------------
# Building blocks on log-probabilities ([..., V] -> [...])


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a (log a - log b); [..., V] x2 -> [...]. Terms with a = 0 are exactly 0."""
    support = log_a > -math.inf
    # Replace both logs off the support before the arithmetic, so neither the value nor the gradient sees
    # (-inf) - (-inf); torch.where routes no gradient to the replaced entries.
    la = torch.where(support, log_a, 0.0)
    lb = torch.where(support, log_b, 0.0)
    return (la.exp() * (la - lb)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w a + (1 - w) b) for 0 < w < 1; [..., V] x2 -> [..., V]."""
    dead = (log_a == -math.inf) & (log_b == -math.inf)
    # logaddexp(-inf, -inf) has a NaN gradient; those entries are -inf by definition anyway.
    la = torch.where(dead, 0.0, log_a)
    lb = torch.where(dead, 0.0, log_b)
    mixed = torch.logaddexp(la + math.log(w), lb + math.log1p(-w))
    return torch.where(dead, -math.inf, mixed)


def _jsd(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    if beta == 0.0:
        return _kl(log_p, log_q)
    if beta == 1.0:
        return _kl(log_q, log_p)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _skew(log_a: Tensor, log_b: Tensor, alpha: float) -> Tensor:
    """KL(a || alpha a + (1 - alpha) b): alpha = 0 is KL(a || b), alpha = 1 is 0."""
    if alpha == 0.0:
        return _kl(log_a, log_b)
    if alpha == 1.0:
        return log_a.new_zeros(log_a.shape[:-1])
    return _kl(log_a, _log_mix(log_a, log_b, alpha))


def divergence_from_logprobs(log_q: Tensor, log_p: Tensor, spec: DivergenceSpec) -> Tensor:
    """D(p, q) per position from normalised log-probabilities (temperature already applied).

    Args:
        log_q: student log-probabilities [..., V] (or any set of buckets that sums to 1).
        log_p: teacher log-probabilities [..., V].
    Returns:
        [...] divergence summed over the last dimension.
    """
    name = spec.name
    if name == "forward_kl":
        return _kl(log_p, log_q)
    if name == "reverse_kl":
        return _kl(log_q, log_p)
    if name == "jsd":
        return _jsd(log_q, log_p, spec.beta)
    if name == "jsd_scaled":
        # beta * (1 - beta) is the leading order of jsd near both endpoints, so the ratio tends to the KLs.
        b = spec.beta
        return _jsd(log_q, log_p, b) if b in (0.0, 1.0) else _jsd(log_q, log_p, b) / (b * (1.0 - b))
    if name == "skew_kl":
        return _skew(log_p, log_q, spec.alpha)
    if name == "skew_reverse_kl":
        return _skew(log_q, log_p, spec.alpha)
    if name == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if name == "kl_mix":
        return (1.0 - spec.mix) * _kl(log_p, log_q) + spec.mix * _kl(log_q, log_p)
    raise ValueError(f"unknown divergence {name!r}")


def kl_weights(spec: DivergenceSpec) -> tuple[float, float] | None:
    """(forward, reverse) where divergence_from_logprobs computes forward * KL(p||q) + reverse * KL(q||p) for
    this spec (the KLs, their mix, jsd and jsd_scaled at beta 0 and 1); None for every other divergence."""
    name, beta = spec.name, spec.beta
    if name == "forward_kl" or (name in ("jsd", "jsd_scaled") and beta == 0.0):
        return 1.0, 0.0
    if name == "reverse_kl" or (name in ("jsd", "jsd_scaled") and beta == 1.0):
        return 0.0, 1.0
    if name == "kl_mix":
        return 1.0 - spec.mix, spec.mix
    return None


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / T) in at least float32; [..., V] -> [..., V]."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """[..., V] probabilities -> [..., V] bool: the nucleus of top-p sampling.

    The smallest set of most likely tokens whose mass reaches top_p (the most likely token is always in
    it). The sampler draws from q restricted to this set; a score function must use the same set.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep = sorted_probs.cumsum(-1) - sorted_probs <= top_p
    return torch.zeros_like(keep).scatter(-1, order, keep)


def top_p_log_mass(log_q: Tensor, top_p: float) -> Tensor:
    """log q(nucleus), [..., V] -> [...]: differentiable in log_q, with the nucleus itself held fixed
    (membership is piecewise constant in the logits, so this is the gradient almost everywhere)."""
    keep = nucleus(log_q.detach().exp(), top_p)
    return torch.where(keep, log_q, -math.inf).logsumexp(-1)


# ---------------------------------------------------------------------------------------------------------
# Per-position divergences from logits


def token_divergence(student_logits: Tensor, teacher_logits: Tensor, spec: DivergenceSpec) -> Tensor:
    """Exact divergence over the full vocabulary at every position.

    Args:
        student_logits: [..., V] (q).
        teacher_logits: [..., V] (p), same shape.
    Returns:
        [...] D(p, q) per position, float32 (float64 for float64 inputs).
    """
    t = spec.temperature
    return divergence_from_logprobs(log_probs(student_logits, t), log_probs(teacher_logits, t), spec)


def _safe_logsumexp(x: Tensor) -> Tensor:
    """logsumexp over the last dim that returns -inf (with zero gradient, not NaN) for an all -inf row."""
    empty = (x == -math.inf).all(-1, keepdim=True)
    return torch.where(empty.squeeze(-1), -math.inf, torch.where(empty, 0.0, x).logsumexp(-1))


def topk_logprobs(log_q: Tensor, log_p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Teacher top-k buckets plus one tail bucket; [..., V] x2 -> [..., k+1] x2 (each still sums to 1)."""
    idx = log_p.topk(k, dim=-1).indices  # [..., k]
    drop = torch.full_like(idx, -math.inf, dtype=log_p.dtype)
    # The tail is the logsumexp of the remaining entries: exact, no 1 - sum(top-k) cancellation.
    tail_p = _safe_logsumexp(log_p.scatter(-1, idx, drop))
    tail_q = _safe_logsumexp(log_q.scatter(-1, idx, drop))
    return (
        torch.cat([log_q.gather(-1, idx), tail_q.unsqueeze(-1)], -1),
        torch.cat([log_p.gather(-1, idx), tail_p.unsqueeze(-1)], -1),
    )


def topk_token_divergence(student_logits: Tensor, teacher_logits: Tensor, spec: DivergenceSpec, k: int) -> Tensor:
    """The divergence on k + 1 buckets: the teacher's top-k tokens and one tail holding everything else.

    Lumping tokens never increases an f-divergence (KLs, JSD, skew KLs, TV), so this is a lower bound of
    `token_divergence`, equal to it when k >= V - 1. Its gradient pushes the student's mass on the
    teacher's top-k tokens and its total tail mass, not the shape of the tail.

    Args:
        student_logits: [..., V]; teacher_logits: [..., V]; k: number of teacher tokens kept.
    Returns:
        [...] the bucketed divergence.
    """
    t = spec.temperature
    log_q, log_p = log_probs(student_logits, t), log_probs(teacher_logits, t)
    if k >= log_p.shape[-1]:
        return divergence_from_logprobs(log_q, log_p, spec)
    return divergence_from_logprobs(*topk_logprobs(log_q, log_p, k), spec)
