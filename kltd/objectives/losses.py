"""The trainer's loss: total = kl_trajectory_weight * L_traj + kl_prefix_weight * L_prefix.

Layout shared with the trainer (already shifted): `student_logits[:, t]` and `teacher_logits[:, t]` are the
two models' next-token logits at state s_t, `targets[:, t]` is the token that was actually written there
(y_t), `mask[:, t]` marks the supervised response positions. Shapes: logits [B, T, V], targets and mask
[B, T]. p = teacher, q = student. See docs/theory.md for which gradient each piece gives.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kltd.objectives.chunked import chunked_rows, chunked_token_divergence
from kltd.objectives.divergences import DivergenceSpec, log_probs, top_p_log_mass
from kltd.objectives.estimators import sampled_kl
from kltd.objectives.topk_teacher import TopKTeacher
from kltd.schema.choices import BASELINES, ESTIMATORS, NORMALIZATIONS, SAMPLED_ESTIMATORS, TRAJECTORIES
from kltd.schema.matrix import own_divergence

PREFIX_STATES = ("student", "fixed", "teacher")


def default_spec(trajectory: str) -> DivergenceSpec:
    """The divergence a trajectory stands for (kltd.schema.matrix): expert -> KL(p||q), student -> KL(q||p)."""
    name = own_divergence(trajectory)
    if name is None:
        raise ValueError(f"trajectory {trajectory!r} has no divergence (dataset is cross-entropy)")
    return DivergenceSpec(name)


def normalize(per_token: Tensor, mask: Tensor, how: str = "token", denominator: Optional[float] = None) -> Tensor:
    """Reduce per-position losses to a scalar.

    Args:
        per_token: [B, T]; mask: [B, T] bool.
        how: "token": sum over masked positions / number of masked positions;
             "sequence": sum over each sequence's positions, mean over sequences.
        denominator: replaces the count above (tokens for "token", sequences for "sequence"). With gradient
            accumulation pass the count of the whole optimiser step, so the sum of the micro-batch losses
            (and gradients) equals the loss of the one large batch.
    Returns:
        scalar.
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalization {how!r}; choose one of {NORMALIZATIONS}")
    # where, not multiply: unmasked positions may hold inf/NaN (padding) and must not leak.
    total = torch.where(mask, per_token, 0.0).sum()
    if denominator is None:
        denominator = mask.sum().clamp_min(1) if how == "token" else max(mask.shape[0], 1)
    return total / denominator


def token_logprobs(
    student_logits: Tensor, targets: Tensor, mask: Tensor, temperature: float = 1.0, chunk_size: Optional[int] = None,
    top_p: float = 1.0,
) -> Tensor:
    """log q(targets) at every masked position, computed over chunks; [B, T, V], [B, T] -> [B, T] (0 off mask).

    q is the distribution a sampler draws from: softmax(logits / temperature), and with top_p < 1 that
    softmax restricted to its nucleus and renormalised (the same nucleus rule as kltd.rollout.sampling).
    """

    def fn(s, _, y):
        log_q = log_probs(s, temperature)
        picked = log_q.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        return picked if top_p >= 1.0 else picked - top_p_log_mass(log_q, top_p)

    return chunked_rows(fn, student_logits, None, mask, extra=targets, chunk_size=chunk_size)


def sampled_token_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    estimator: str,
    spec: DivergenceSpec,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Single-sample KL estimator at the realised tokens (see kltd.objectives.estimators); [B, T, V] x2 -> [B, T]."""
    if estimator not in SAMPLED_ESTIMATORS.get(spec.name, ()):
        raise ValueError(f"estimator {estimator!r} is not defined for divergence {spec.name!r}")
    t = spec.temperature

    def fn(s, p, y):
        y = y.unsqueeze(-1)
        log_q = log_probs(s, t).gather(-1, y).squeeze(-1)
        log_p = log_probs(p, t).gather(-1, y).squeeze(-1)
        return sampled_kl(log_q, log_p, estimator, spec.name)

    return chunked_rows(fn, student_logits, teacher_logits, mask, extra=targets, chunk_size=chunk_size)


def trajectory_per_token(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    targets: Tensor,
    mask: Tensor,
    *,
    trajectory: str,
    spec: Optional[DivergenceSpec] = None,
    estimator: str = "exact",
    top_k: Optional[int] = 8,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """L_traj before normalisation: the per-token loss at each state, [B, T] (0 off mask). See trajectory_loss."""
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"trajectory {trajectory!r}; choose one of {TRAJECTORIES}")
    if trajectory == "dataset":
        return -token_logprobs(student_logits, targets, mask, chunk_size=chunk_size)
    if teacher_logits is None:
        raise ValueError(f"trajectory {trajectory!r} needs teacher logits")
    spec = spec or default_spec(trajectory)
    if isinstance(teacher_logits, TopKTeacher):  # a served teacher: its k + 1 buckets whatever the estimator asks
        if estimator not in ("exact", "topk"):
            raise ValueError(f"estimator {estimator!r} needs the teacher's full distribution; a teacher known by its "
                             "top-k tokens supports 'exact' and 'topk' (both its k + 1 buckets)")
        return chunked_token_divergence(student_logits, teacher_logits, mask, spec, chunk_size)
    if estimator == "exact":
        return chunked_token_divergence(student_logits, teacher_logits, mask, spec, chunk_size)
    if estimator == "topk":
        if not top_k or top_k < 1:
            raise ValueError("estimator 'topk' needs top_k >= 1")
        return chunked_token_divergence(student_logits, teacher_logits, mask, spec, chunk_size, top_k=top_k)
    if estimator in ESTIMATORS:
        return sampled_token_kl(student_logits, teacher_logits, targets, mask, estimator, spec, chunk_size)
    raise ValueError(f"estimator {estimator!r}; choose one of {ESTIMATORS}")


def trajectory_loss(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    targets: Tensor,
    mask: Tensor,
    *,
    trajectory: str,
    spec: Optional[DivergenceSpec] = None,
    estimator: str = "exact",
    normalization: str = "token",
    denominator: Optional[float] = None,
    top_k: Optional[int] = 8,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """L_traj: the per-token supervision at the given states, which are held fixed (no gradient through them).

    Args:
        student_logits: [B, T, V] q at s_t.
        teacher_logits: [B, T, V] p at s_t, no grad; may be None for trajectory="dataset". Or a teacher known by
            its top-k tokens and tail (kltd.objectives.topk_teacher.TopKTeacher, a served teacher): the divergence
            is then on its k + 1 buckets, a lower bound of the full one, exact when k covers the vocabulary.
        targets: [B, T] the realised tokens y_t (needed by "dataset" and the sampled estimators).
        mask: [B, T] bool supervised positions.
        trajectory: "expert" -> D = KL(p||q) by default (forward; DAgger on student states, word-level KD on
            fixed ones); "student" -> D = KL(q||p) (reverse; OPD on student states); "dataset" -> cross-entropy
            on `targets` (spec and estimator ignored).
        spec: overrides the default divergence (and sets the temperature).
        estimator: "exact" (full vocabulary) | "topk" (teacher top-k + tail bucket) | "sampled_k1" |
            "sampled_k2" | "sampled_k3" | "sampled_reward" (one-token estimators at `targets`; for reverse KL
            the targets must be the student's own samples, for forward KL the teacher's; see kltd.objectives.estimators).
        normalization, denominator: see `normalize`.
        top_k: buckets kept by "topk".  chunk_size: positions per chunk for the vocabulary-wide passes.
    Returns:
        scalar loss. Its gradient is sum over states of grad D(s_t) (or of the estimator's gradient), divided
        by the normaliser: the "per-token term" of the chain rule (docs/theory.md).
    """
    per_token = trajectory_per_token(
        student_logits, teacher_logits, targets, mask,
        trajectory=trajectory, spec=spec, estimator=estimator, top_k=top_k, chunk_size=chunk_size,
    )
    return normalize(per_token, mask, normalization, denominator)


def dataset_loss(
    student_logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    weights: Optional[Tensor] = None,
    *,
    normalization: str = "token",
    denominator: Optional[float] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """(Return-weighted) cross-entropy on dataset tokens: behaviour cloning / offline RL.

    Args:
        student_logits: [B, T, V]; targets: [B, T]; mask: [B, T] bool.
        weights: [B] per-sequence weight (a return, an advantage, a 0/1 filter), treated as a constant;
            None = plain behaviour cloning.
    Returns:
        scalar: normalize(-w_b * log q(y_t | s_t)). For sequences y ~ D and weights w(y) that depend on each
        row's own sequence only, its expected gradient is -E_D[w(y) grad log q(y)] (per-sequence
        normalisation), the gradient of the w-weighted likelihood. The weights kltd trains with (awr, filter
        in kltd.objectives.rewards) are batch statistics, which also depend on the batch's other rows: the
        expected gradient is then -E_D[omega_B(y) grad log q(y)], omega_B(y) the weight's mean over the
        other rows of a batch of B, which approaches the population-weighted gradient as B grows (O(1/B)
        for awr; the measured gaps are in kltd.objectives.rewards).
    """
    nll = -token_logprobs(student_logits, targets, mask, chunk_size=chunk_size)
    if weights is not None:
        nll = nll * weights.detach().to(nll.dtype).unsqueeze(-1)
    return normalize(nll, mask, normalization, denominator)


def future_returns(per_token: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """G_t = sum_{t' > t} gamma^(t' - t - 1) D_t' over masked positions; [B, T] -> [B, T] (strictly future)."""
    d = torch.where(mask, per_token, 0.0)
    out = torch.zeros_like(d)
    running = torch.zeros_like(d[:, 0])
    for t in range(d.shape[1] - 1, -1, -1):
        out[:, t] = running
        running = d[:, t] + gamma * running
    return out


def baseline_values(returns: Tensor, mask: Tensor, how: str = "batch_mean", group_size: int = 1,
                    batch_sum=None) -> Tensor:
    """Per-position baseline b_t for the score-function term; [B, T] -> [B, T].

    Both non-trivial baselines leave the row itself out, so b_t never depends on the row's own sample and
    the surrogate's gradient stays unbiased (including the row would shrink the prefix term by ~1/n).
    "none": 0.  "batch_mean": mean of G_t over the other rows of the batch that reach position t.
    "leave_one_out": the same within groups of `group_size` consecutive rows (samples of one prompt).
    A row with no partner at position t gets 0. `batch_sum` ([2, T] -> [2, T]) extends "batch_mean" to rows
    held by other processes (kltd.train.ranks.Ranks.sum_positions): their returns count as other rows.
    """
    if how not in BASELINES:
        raise ValueError(f"baseline {how!r}; choose one of {BASELINES}")
    if how == "none":
        return torch.zeros_like(returns)
    B, T = returns.shape
    n = B if how == "batch_mean" else group_size
    if n < 1 or B % n:
        raise ValueError(f"leave_one_out: batch of {B} rows is not a whole number of groups of {n}")
    g = torch.where(mask, returns, 0.0).view(-1, n, T)
    m = mask.to(g.dtype).view(-1, n, T)
    total_g, total_m = g.sum(1, keepdim=True), m.sum(1, keepdim=True)
    if batch_sum is not None and how == "batch_mean":
        total_g, total_m = batch_sum(torch.cat([total_g, total_m]).view(2, T)).view(2, 1, 1, T)
    others = total_m - m
    loo = (total_g - g) / others.clamp_min(1)
    return torch.where(others > 0, loo, 0.0).view(B, T)


def prefix_loss(
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    targets: Tensor,
    mask: Tensor,
    *,
    states: str,
    gamma: float = 1.0,
    baseline: str = "batch_mean",
    group_size: int = 1,
    spec: Optional[DivergenceSpec] = None,
    normalization: str = "token",
    denominator: Optional[float] = None,
    score_mask: Optional[Tensor] = None,
    sampling_temperature: float = 1.0,
    sampling_top_p: float = 1.0,
    chunk_size: Optional[int] = None,
    batch_sum=None,
) -> Tensor:
    """L_prefix: the gradient through the distribution of the states (the chain rule's "prefix term").

    states == "student" (the student sampled some of the tokens): the score-function surrogate

        sum_{t in score_mask} log q(y_t | s_t) * stopgrad(G_t - b_t),
        G_t = sum_{t' > t, t' in mask} gamma^(t'-t-1) D(s_t'),

    with D the exact per-token divergence of `spec` (default reverse KL), detached, summed over the
    supervised positions only: the objective is the divergence where it is supervised, so a position that
    is not supervised adds nothing to any return. Its expected gradient is E[sum_t grad log q(y_t|s_t) *
    future supervised divergence]; with reverse KL, gamma = 1 and no (or a leave-one-out) baseline, adding
    it to trajectory_loss(trajectory="student") gives the exact gradient of the sequence-level KL(q||p)
    (per-sequence normalisation). The value is a surrogate, not a divergence.

    states == "fixed" or "teacher": the states do not depend on theta, so the chain rule's prefix term is
    zero; what is returned instead is the forward KL of the prefix, i.e. cross-entropy on the prefix tokens
    `targets` (teacher_logits, spec, gamma and baseline unused). Its expected gradient under teacher samples
    is the gradient of the sequence-level KL(p||q), the same as L_traj with trajectory="expert".

    Args:
        student_logits: [B, T, V]; teacher_logits: [B, T, V] (student states only); targets, mask: [B, T].
        group_size: rows per prompt group for "leave_one_out" (consecutive rows).
        score_mask: [B, T] bool, the positions whose token the student sampled (default: mask). They may
            lie outside `mask` (a hand-off's roll-in, unsupervised, still decides the states after it); a
            teacher continuation's tokens add their D to the return but get no score term.
        sampling_temperature, sampling_top_p: how the student sampled the states; the score function is
            that of the distribution it sampled from (softmax at the temperature, truncated to the nucleus).
        batch_sum: see `baseline_values` (the batch's other rows held by other processes).
    Returns:
        scalar, normalised like trajectory_loss (the default denominator counts the `mask` positions).
    """
    if states not in PREFIX_STATES:
        raise ValueError(f"states {states!r}; choose one of {PREFIX_STATES}")
    if states != "student":
        log_q = token_logprobs(student_logits, targets, mask, chunk_size=chunk_size)
        return -normalize(log_q, mask, normalization, denominator)
    if teacher_logits is None:
        raise ValueError("prefix_loss(states='student') needs teacher logits for the future divergence")
    if sampling_temperature <= 0:
        raise ValueError("prefix_loss(states='student') needs sampled states: greedy decoding has no score function")
    spec = spec or DivergenceSpec("reverse_kl")
    score = mask if score_mask is None else score_mask
    with torch.no_grad():
        teacher = teacher_logits if isinstance(teacher_logits, TopKTeacher) else teacher_logits.detach()
        d = chunked_token_divergence(student_logits.detach(), teacher, mask, spec, chunk_size)
        g = future_returns(d, mask, gamma)
        advantage = g - baseline_values(g, score, baseline, group_size, batch_sum)
    log_q = token_logprobs(student_logits, targets, score, sampling_temperature, chunk_size, sampling_top_p)
    if denominator is None:
        denominator = mask.sum().clamp_min(1) if normalization == "token" else max(mask.shape[0], 1)
    return normalize(log_q * advantage, score, normalization, denominator)
