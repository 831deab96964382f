"""A teacher known only by its top-k tokens and a tail bucket (a teacher served by another process).

Per position the teacher gives k token ids, their log-probabilities and the log of the mass left over (the
tail). The divergences are then computed on k + 1 buckets: the teacher's k tokens and one bucket holding every
other token, for both models (the student's tail is the logsumexp of its log-probabilities off the k ids).
Lumping tokens never increases an f-divergence (the data-processing inequality), so each bucketed divergence is a
lower bound of the full-vocabulary one, equal to it when k covers the vocabulary (the tail is then empty).

The three parts travel through the chunked autograd (kltd.objectives.chunked) as one tensor, `packed`, of shape
[B, T, 2k + 1]: ids (exact in float32 below 2^24), log-probabilities, tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kltd.objectives.divergences import DivergenceSpec, divergence_from_logprobs, log_probs


@dataclass
class TopKTeacher:
    """The teacher at [B, T] positions: ids [B, T, k] long, logprobs [B, T, k] float, tail [B, T] float (log of the
    teacher's mass outside the k ids; -inf when they hold all of it). Log-probabilities are at the loss's
    temperature already (the server applies it to the teacher's logits)."""

    ids: Tensor
    logprobs: Tensor
    tail: Tensor

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def packed(self) -> Tensor:
        dtype = torch.promote_types(self.logprobs.dtype, torch.float32)  # float64 stays float64
        return torch.cat([self.ids.to(dtype), self.logprobs.to(dtype), self.tail.to(dtype).unsqueeze(-1)], -1)

    def to(self, device) -> TopKTeacher:
        return TopKTeacher(self.ids.to(device), self.logprobs.to(device), self.tail.to(device))

    def __getitem__(self, which) -> TopKTeacher:
        """These rows ([B] bool, an index) or positions ([B, T] bool) only, as a tensor's indexing would give."""
        return TopKTeacher(self.ids[which], self.logprobs[which], self.tail[which])

    def token_logprob(self, tokens: Tensor) -> Tensor:
        """log p(tokens) where the token is among the k ids, else -inf; [B, T] -> [B, T]."""
        hit = self.ids == tokens.unsqueeze(-1)
        return torch.where(hit, self.logprobs, -math.inf).logsumexp(-1)


def unpack(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """[..., 2k + 1] -> ids [..., k] long, logprobs [..., k], tail [...]."""
    k = (packed.shape[-1] - 1) // 2
    return packed[..., :k].long(), packed[..., k : 2 * k], packed[..., 2 * k]


def _logsumexp_off(log_q: Tensor, ids: Tensor) -> Tensor:
    """log of q's mass outside `ids`; -inf (zero gradient, not NaN) when the ids cover every token."""
    rest = log_q.scatter(-1, ids, -math.inf)
    empty = (rest == -math.inf).all(-1, keepdim=True)
    return torch.where(empty.squeeze(-1), -math.inf, torch.where(empty, 0.0, rest).logsumexp(-1))


def bucketed_logprobs(student_logits: Tensor, packed: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Both models on the teacher's k + 1 buckets; [..., V], [..., 2k + 1] -> ([..., k + 1], [..., k + 1])."""
    ids, log_p, tail_p = unpack(packed)
    log_q = log_probs(student_logits, temperature)
    q = torch.cat([log_q.gather(-1, ids), _logsumexp_off(log_q, ids).unsqueeze(-1)], -1)
    p = torch.cat([log_p.to(q.dtype), tail_p.to(q.dtype).unsqueeze(-1)], -1)
    return q, p


def topk_teacher_divergence(student_logits: Tensor, packed: Tensor, spec: DivergenceSpec) -> Tensor:
    """D(p, q) on the k + 1 buckets per position; [..., V], [..., 2k + 1] -> [...]. A lower bound of the full
    divergence, exact when the k ids cover the vocabulary. The student's logits are divided by the temperature
    here; the teacher's log-probabilities come at it."""
    return divergence_from_logprobs(*bucketed_logprobs(student_logits, packed, spec.temperature), spec)
