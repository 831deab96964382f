"""Sequence-level divergences between two causal LMs computed exactly, by scoring every response prefix.

The response distribution is the one kltd's sampler draws from: tokens one at a time after the prompt, until
`eos_id` or `horizon` tokens (a response cut at the horizon is an outcome too). By the chain rule (design.md
section 2) the sequence-level KL is the per-token KL summed over every prefix, weighted by the prefix's
probability:

    KL(q||p) = sum_t sum_{s: t tokens, no eos} Q(s) KL(q(.|s) || p(.|s)),  and KL(p||q) with P(s) and p, q swapped.

The student gives every token positive probability, so its prefixes are all sequences of non-EOS tokens of
length 0..horizon-1: (V-1)^(horizon-1) longest ones ("leaves"). Each leaf is scored once by each model's own
forward (no grad); its logits at position t are the next-token distribution of its t-token prefix, and each
prefix is read from the first leaf that extends it. Nothing is sampled or truncated: the figures are exact to
float rounding (log-probabilities in float32 from the models, sums in float64). The cost is the number of
leaves, refused above `max_leaves`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from kltd.rollout.grad_free import without_grad


@dataclass(frozen=True)
class SequenceFigures:
    """Exact figures for one prompt. p = teacher, q = student; lengths count response tokens, EOS included."""

    forward_kl: float  # KL(p || q) over whole responses, nats
    reverse_kl: float  # KL(q || p)
    forward_kl_by_position: list[float]  # entry t: E_{s_t ~ p} KL(p||q)(.|s_t) (teacher states); they sum to forward_kl
    reverse_kl_by_position: list[float]  # entry t: E_{s_t ~ q} KL(q||p)(.|s_t) (student states)
    teacher_entropy: float  # H(p) over whole responses, nats
    student_entropy: float
    teacher_length: float  # expected response length
    student_length: float
    teacher_ends: float  # probability of EOS within the horizon
    student_ends: float
    student_accepted: float | None  # probability the student's response is in the support and ends (None: no support given)
    leaves: int  # sequences scored per model

    def as_dict(self) -> dict:
        return asdict(self)


def leaf_count(vocab: int, horizon: int) -> int:
    return (vocab - 1) ** (horizon - 1)


def exact_sequence_figures(student, teacher, prompt: list[int], *, horizon: int, eos_id: int,
                           vocab: int | None = None, support: Tensor | None = None, batch_size: int = 4096,
                           max_leaves: int = 1 << 20) -> SequenceFigures:
    """The figures of `SequenceFigures` for one prompt (token ids, unpadded).

    `vocab`: the ids a model may emit (default the teacher's config.vocab_size; logits past it are dropped, as
    the sampler's `vocab` does). `support` [V, V] bool (optional): support[a, b] is True where b may follow a;
    with it, the student's acceptance probability is computed (every transition allowed, EOS within the horizon).
    """
    vocab = vocab or teacher.config.vocab_size
    leaves = leaf_count(vocab, horizon)
    if leaves > max_leaves:
        raise ValueError(f"{leaves} sequences to score (vocabulary {vocab}, horizon {horizon}): above max_leaves="
                         f"{max_leaves}; lower the horizon or the number of tokens")
    go_on = torch.tensor([i for i in range(vocab) if i != eos_id])  # the tokens after which a response continues
    student_lp, teacher_lp = _prefix_log_probs(student, teacher, prompt, horizon, go_on, vocab, batch_size)
    return _accumulate(student_lp, teacher_lp, prompt[-1], go_on, eos_id, support, leaves)


def _leaf_tokens(indices: Tensor, go_on: Tensor, depth: int) -> Tensor:
    """[N] leaf indices -> [N, depth] tokens: the index's base-C digits (first token most significant)."""
    c = len(go_on)
    powers = c ** torch.arange(depth - 1, -1, -1)
    return go_on[(indices[:, None] // powers) % c]


def _prefix_log_probs(student, teacher, prompt, horizon, go_on, vocab, batch_size):
    """Per level t < horizon: [C^t, V] float64 next-token log-probabilities of every t-token prefix, both models."""
    c, depth = len(go_on), horizon - 1
    levels = {"q": [None] * horizon, "p": [None] * horizon}
    for t in range(horizon):
        for key in levels:
            levels[key][t] = torch.empty((c**t, vocab), dtype=torch.float64)
    strides = [c ** (depth - t) for t in range(horizon)]  # the leaves between consecutive t-token prefixes
    total = c**depth
    head = torch.tensor(prompt, dtype=torch.long)
    for start in range(0, total, batch_size):
        indices = torch.arange(start, min(start + batch_size, total))
        ids = torch.cat([head.expand(len(indices), -1), _leaf_tokens(indices, go_on, depth)], 1)
        for key, model in (("q", student), ("p", teacher)):
            model_device = next(model.parameters()).device
            with without_grad(model):
                logits = model(input_ids=ids.to(model_device)).logits[:, len(prompt) - 1:, :vocab]
            log_probs = logits.double().log_softmax(-1).cpu()
            for t, stride in enumerate(strides):
                first = indices % stride == 0  # the leaves that are the first extension of a t-token prefix
                levels[key][t][indices[first] // stride] = log_probs[first, t]
    return levels["q"], levels["p"]


def _accumulate(student_lp, teacher_lp, last_prompt_token, go_on, eos_id, support, leaves) -> SequenceFigures:
    """The chain-rule sums, level by level, carrying each prefix's log-probability under both models."""
    log_q = torch.zeros(1, dtype=torch.float64)  # the empty prefix
    log_p = torch.zeros(1, dtype=torch.float64)
    allowed = torch.ones(1, dtype=torch.bool)  # the prefix's transitions all in the support
    last = torch.tensor([last_prompt_token])
    fwd, rev = [], []
    sums = dict.fromkeys(("h_p", "h_q", "len_p", "len_q", "end_p", "end_q", "accepted"), 0.0)
    for lq, lp in zip(student_lp, teacher_lp):
        q_prefix, p_prefix = log_q.exp(), log_p.exp()
        q_next, p_next = lq.exp(), lp.exp()
        rev.append(float((q_prefix * (q_next * (lq - lp)).sum(-1)).sum()))
        fwd.append(float((p_prefix * (p_next * (lp - lq)).sum(-1)).sum()))
        sums["h_p"] += float((p_prefix * -(p_next * lp).sum(-1)).sum())
        sums["h_q"] += float((q_prefix * -(q_next * lq).sum(-1)).sum())
        sums["len_p"] += float(p_prefix.sum())  # a prefix that is still going writes one more token
        sums["len_q"] += float(q_prefix.sum())
        sums["end_p"] += float((p_prefix * p_next[:, eos_id]).sum())
        sums["end_q"] += float((q_prefix * q_next[:, eos_id]).sum())
        if support is not None:
            ends_allowed = allowed & support[last, eos_id]
            sums["accepted"] += float((q_prefix * q_next[:, eos_id] * ends_allowed).sum())
            allowed = (allowed[:, None] & support[last][:, go_on]).reshape(-1)
        log_q = (log_q[:, None] + lq[:, go_on]).reshape(-1)
        log_p = (log_p[:, None] + lp[:, go_on]).reshape(-1)
        last = go_on.repeat(len(last))
    return SequenceFigures(
        forward_kl=sum(fwd), reverse_kl=sum(rev), forward_kl_by_position=fwd, reverse_kl_by_position=rev,
        teacher_entropy=sums["h_p"], student_entropy=sums["h_q"], teacher_length=sums["len_p"],
        student_length=sums["len_q"], teacher_ends=sums["end_p"], student_ends=sums["end_q"],
        student_accepted=sums["accepted"] if support is not None else None, leaves=leaves)
