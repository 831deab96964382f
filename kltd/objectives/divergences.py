"""Per-token divergences between the teacher p and the student q, all behind one spec.

Which divergences exist, what each computes and how it is parameterised is the divergence table
(kltd.schema.divergences: forward_kl KL(p || q), reverse_kl KL(q || p), TRL's generalised jsd, jsd_scaled, DistiLLM's
skew_kl and skew_reverse_kl, tv, kl_mix). Its formulas are written against the operations this module supplies
(`OPS`): KL between two log-distributions, the log of a mixture, total variation.

Both models' logits are divided by `temperature` before the softmax (no T^2 factor). Everything runs in
log-space and at least float32; a probability that is exactly 0 (a -inf logit) contributes 0, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from kltd.schema.divergences import DEFAULTS, PARAMETERS
from kltd.schema.divergences import entry as divergence_entry


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence D(p, q) to use per token; p = teacher, q = student. beta, alpha and mix are the
    parameters the table's entries read (jsd and jsd_scaled: beta; the skew KLs: alpha; kl_mix: mix)."""

    name: str = "forward_kl"
    beta: float = DEFAULTS["beta"]
    alpha: float = DEFAULTS["alpha"]
    mix: float = DEFAULTS["mix"]
    temperature: float = 1.0  # divides both models' logits

    def __post_init__(self):
        divergence_entry(self.name)  # an unknown name is a ValueError naming the valid ones
        for key in PARAMETERS:
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key}={getattr(self, key)} must lie in [0, 1]")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0")

    @property
    def parameter(self) -> float | None:
        """The value of the one parameter this divergence reads (None for the KLs and tv)."""
        key = divergence_entry(self.name).parameter
        return None if key is None else getattr(self, key)


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


def _tv(log_q: Tensor, log_p: Tensor) -> Tensor:
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


# what the divergence table's formulas are written against
OPS = SimpleNamespace(kl=_kl, mix=_log_mix, tv=_tv, zeros=lambda log_a: log_a.new_zeros(log_a.shape[:-1]))


def divergence_from_logprobs(log_q: Tensor, log_p: Tensor, spec: DivergenceSpec) -> Tensor:
    """D(p, q) per position from normalised log-probabilities (temperature already applied).

    Args:
        log_q: student log-probabilities [..., V] (or any set of buckets that sums to 1).
        log_p: teacher log-probabilities [..., V].
    Returns:
        [...] divergence summed over the last dimension.
    """
    return divergence_entry(spec.name).compute(OPS, log_q, log_p, spec.parameter)


def kl_weights(spec: DivergenceSpec) -> tuple[float, float] | None:
    """(forward, reverse) where divergence_from_logprobs computes forward * KL(p||q) + reverse * KL(q||p) for
    this spec (the KLs, their mix, jsd and jsd_scaled at beta 0 and 1); None for every other divergence."""
    return divergence_entry(spec.name).kl_weights(spec.parameter)


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
