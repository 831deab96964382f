"""Sequence-level divergences between two causal LMs computed exactly, by scoring every response prefix.

The response distribution is the one kltd's sampler draws from: tokens one at a time after the prompt, until
`eos_id` or `horizon` tokens (a response cut at the horizon is an outcome too). By the chain rule (design.md
section 2) the sequence-level KL is the per-token KL summed over every prefix, weighted by the prefix's
probability:

    KL(q||p) = sum_t sum_{s: t tokens, no eos} Q(s) KL(q(.|s) || p(.|s)),  and KL(p||q) with P(s) and p, q swapped.

The student gives every token positive probability, so its prefixes are all sequences of non-EOS tokens of
length 0..horizon-1: (V-1)^(horizon-1) longest ones ("leaves"). Each leaf is scored once by each model's own
forward; its logits at position t are the next-token distribution of its t-token prefix, and each prefix is read
from the first leaf that extends it. Nothing is sampled or truncated: the figures are exact to float rounding
(logits in the models' precision, log-softmax and sums in float64). The cost is the number of
leaves, refused above `max_leaves`. `exact_sequence_figures` reports the figures; `exact_sequence_kl` returns the
two KLs with the student's autograd graph, for exact gradients.
"""

from __future__ import annotations

from contextlib import nullcontext
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

    @property
    def teacher_entropy_rate(self) -> float:
        """Nats per response token: the sequence entropy over the expected length."""
        return self.teacher_entropy / self.teacher_length

    @property
    def student_entropy_rate(self) -> float:
        return self.student_entropy / self.student_length

    def as_dict(self) -> dict:
        return {**asdict(self), "teacher_entropy_rate": self.teacher_entropy_rate,
                "student_entropy_rate": self.student_entropy_rate}


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
    vocab, go_on, leaves = _tree(teacher, vocab, horizon, eos_id, max_leaves)
    levels = [prefix_log_probs(m, prompt, horizon, go_on, vocab, batch_size) for m in (student, teacher)]
    sums = _chain_rule_sums(*levels, prompt[-1], go_on, eos_id, support)
    fwd, rev = [float(x) for x in sums.pop("fwd")], [float(x) for x in sums.pop("rev")]
    sums = {key: float(value) for key, value in sums.items()}
    return SequenceFigures(
        forward_kl=sum(fwd), reverse_kl=sum(rev), forward_kl_by_position=fwd, reverse_kl_by_position=rev,
        teacher_entropy=sums["h_p"], student_entropy=sums["h_q"], teacher_length=sums["len_p"],
        student_length=sums["len_q"], teacher_ends=sums["end_p"], student_ends=sums["end_q"],
        student_accepted=sums["accepted"] if support is not None else None, leaves=leaves)


def exact_sequence_kl(student, teacher, prompt: list[int], *, horizon: int, eos_id: int, vocab: int | None = None,
                      batch_size: int = 4096, max_leaves: int = 1 << 16) -> tuple[Tensor, Tensor]:
    """(KL(p||q), KL(q||p)) over whole responses as 0-dim float64 tensors that carry the student's autograd graph:
    their gradients are the exact gradients of the sequence-level KLs (design.md section 6), the reference an
    estimator's expected gradient is checked against. The graph holds every leaf's activations: keep it small."""
    vocab, go_on, _ = _tree(teacher, vocab, horizon, eos_id, max_leaves)
    student_lp = prefix_log_probs(student, prompt, horizon, go_on, vocab, batch_size, grad=True)
    teacher_lp = prefix_log_probs(teacher, prompt, horizon, go_on, vocab, batch_size)
    sums = _chain_rule_sums(student_lp, teacher_lp, prompt[-1], go_on, eos_id, None)
    return sum(sums["fwd"]), sum(sums["rev"])


def _tree(teacher, vocab, horizon, eos_id, max_leaves):
    vocab = vocab or teacher.config.vocab_size
    leaves = leaf_count(vocab, horizon)
    if leaves > max_leaves:
        raise ValueError(f"{leaves} sequences to score (vocabulary {vocab}, horizon {horizon}): above max_leaves="
                         f"{max_leaves}; lower the horizon or the number of tokens")
    go_on = torch.tensor([i for i in range(vocab) if i != eos_id])  # the tokens after which a response continues
    return vocab, go_on, leaves


def _leaf_tokens(indices: Tensor, go_on: Tensor, depth: int) -> Tensor:
    """[N] leaf indices -> [N, depth] tokens: the index's base-C digits (first token most significant)."""
    c = len(go_on)
    powers = c ** torch.arange(depth - 1, -1, -1)
    return go_on[(indices[:, None] // powers) % c]


def prefix_log_probs(model, prompt: list[int], horizon: int, go_on: Tensor, vocab: int, batch_size: int = 4096,
                     grad: bool = False) -> list[Tensor]:
    """Per level t < horizon: [C^t, V] float64 (on the CPU) next-token log-probabilities of every t-token prefix
    of non-EOS tokens `go_on` (C of them), prefixes in lexicographic order of their tokens' places in `go_on`.
    `grad`: keep the model's autograd graph (else the forward runs without one)."""
    c, depth = len(go_on), horizon - 1
    pieces = [[] for _ in range(horizon)]  # batches run through the leaves in order: so do their prefixes
    strides = [c ** (depth - t) for t in range(horizon)]  # the leaves between consecutive t-token prefixes
    total = c**depth
    head = torch.tensor(prompt, dtype=torch.long)
    device = next(model.parameters()).device
    for start in range(0, total, batch_size):
        indices = torch.arange(start, min(start + batch_size, total))
        ids = torch.cat([head.expand(len(indices), -1), _leaf_tokens(indices, go_on, depth)], 1)
        with nullcontext() if grad else without_grad(model):
            logits = model(input_ids=ids.to(device)).logits[:, len(prompt) - 1:, :vocab]
            log_probs = logits.double().log_softmax(-1).cpu()
            for t, stride in enumerate(strides):
                first = indices % stride == 0  # the leaves that are the first extension of a t-token prefix
                pieces[t].append(log_probs[first, t])
    return [torch.cat(level) for level in pieces]


def _chain_rule_sums(student_lp, teacher_lp, last_prompt_token, go_on, eos_id, support) -> dict:
    """The chain-rule sums, level by level, carrying each prefix's log-probability under both models. 0-dim
    tensors (the KLs: one per position), differentiable through the log-probabilities."""
    log_q = torch.zeros(1, dtype=torch.float64)  # the empty prefix
    log_p = torch.zeros(1, dtype=torch.float64)
    allowed = torch.ones(1, dtype=torch.bool)  # the prefix's transitions all in the support
    last = torch.tensor([last_prompt_token])
    sums = {"fwd": [], "rev": [], **dict.fromkeys(("h_p", "h_q", "len_p", "len_q", "end_p", "end_q", "accepted"), 0.0)}
    for lq, lp in zip(student_lp, teacher_lp):
        q_prefix, p_prefix = log_q.exp(), log_p.exp()
        q_next, p_next = lq.exp(), lp.exp()
        sums["rev"].append((q_prefix * (q_next * (lq - lp)).sum(-1)).sum())
        sums["fwd"].append((p_prefix * (p_next * (lp - lq)).sum(-1)).sum())
        sums["h_p"] += (p_prefix * -(p_next * lp).sum(-1)).sum()
        sums["h_q"] += (q_prefix * -(q_next * lq).sum(-1)).sum()
        sums["len_p"] += p_prefix.sum()  # a prefix that is still going writes one more token
        sums["len_q"] += q_prefix.sum()
        sums["end_p"] += (p_prefix * p_next[:, eos_id]).sum()
        sums["end_q"] += (q_prefix * q_next[:, eos_id]).sum()
        if support is not None:
            ends_allowed = allowed & support[last, eos_id]
            sums["accepted"] += (q_prefix * q_next[:, eos_id] * ends_allowed).sum()
            allowed = (allowed[:, None] & support[last][:, go_on]).reshape(-1)
        log_q = (log_q[:, None] + lq[:, go_on]).reshape(-1)
        log_p = (log_p[:, None] + lp[:, go_on]).reshape(-1)
        last = go_on.repeat(len(last))
    return sums
