"""An enumerable testbed: every response can be listed, so sequence-level KLs and their gradients are exact.

Vocabulary {0, 1, 2, EOS=3}; a response stops at EOS or after H = 4 tokens (truncation), so there are
1 + 3 + 9 + 27 + 81 = 121 responses. A state is the prefix of non-EOS tokens written so far (lengths 0..3,
40 states, one empty prompt). Teacher and student are tables of logits, one row of V logits per state; the
student's table `theta` [40, 4] is the parameter. Everything is float64.

`batch` lays sampled responses out exactly as the trainer does: logits [B, T, V] with logits[:, t] the
next-token logits at state y_<t, targets[:, t] = y_t, mask [B, T] marking real positions (T = H). Padding
positions get the root state's logits (from theta, so a loss that ignores the mask leaks gradient).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

V, EOS, H = 4, 3, 4
WORDS = V - 1  # non-EOS tokens
NUM_STATES = sum(WORDS**n for n in range(H))  # 40
DTYPE = torch.float64


def state_id(prefix: tuple[int, ...]) -> int:
    """States are numbered by length, then as base-3 numbers: offset(n) = (3^n - 1) / 2."""
    code = 0
    for tok in prefix:
        code = code * WORDS + tok
    return (WORDS ** len(prefix) - 1) // (WORDS - 1) + code


def all_states() -> list[tuple[int, ...]]:
    return [s for n in range(H) for s in itertools.product(range(WORDS), repeat=n)]


def all_sequences() -> list[tuple[int, ...]]:
    ended = [s + (EOS,) for n in range(H) for s in itertools.product(range(WORDS), repeat=n)]
    return ended + list(itertools.product(range(WORDS), repeat=H))


@dataclass
class Testbed:
    teacher: Tensor  # [S, V] logits, fixed
    theta: Tensor  # [S, V] student logits, requires grad

    def params(self) -> list[Tensor]:
        return [self.theta]


def make_testbed(seed: int = 0, teacher_scale: float = 2.0, student_scale: float = 1.0) -> Testbed:
    g = torch.Generator().manual_seed(seed)
    teacher = teacher_scale * torch.randn(NUM_STATES, V, generator=g, dtype=DTYPE)
    theta = student_scale * torch.randn(NUM_STATES, V, generator=g, dtype=DTYPE)
    return Testbed(teacher, theta.requires_grad_())


# ---------------------------------------------------------------------------------------------------------
# Exact quantities by enumeration (written directly on the tables, independent of kltd)


def sequence_logprob(table: Tensor, seqs: list[tuple[int, ...]], log_table: Tensor | None = None,
                     rolled_out_by: Tensor | None = None, handoff: int | None = None) -> Tensor:
    """log model(y) for each listed response; [S, V] -> [N].

    log_table: per-state log-probabilities to use instead of log_softmax(table) (e.g. a truncated sampler).
    rolled_out_by, handoff: the first `handoff` tokens come from `table`, the rest from this other table
    (roll-in by one model, roll-out by another).
    """
    logp = torch.log_softmax(table, -1) if log_table is None else log_table
    other = None if rolled_out_by is None else torch.log_softmax(rolled_out_by, -1)
    out = []
    for y in seqs:
        out.append(sum((logp if other is None or t < handoff else other)[state_id(y[:t]), y[t]]
                       for t in range(len(y))))
    return torch.stack(out)


def nucleus_log_table(table: Tensor, top_p: float) -> Tensor:
    """Per-state log-probabilities of top-p sampling from softmax(table): the most likely tokens, in order,
    while the mass before each is below top_p, renormalised; -inf elsewhere. The set is chosen on the
    detached probabilities (membership has no gradient); the renormalised values keep theirs."""
    probs = torch.softmax(table.detach(), -1)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    for s in range(probs.shape[0]):
        mass = 0.0
        for v in probs[s].argsort(descending=True).tolist():
            if mass >= top_p:
                break
            keep[s, v] = True
            mass += float(probs[s, v])
    logp = torch.log_softmax(table, -1)
    kept = torch.where(keep, logp, -torch.inf)
    return kept - kept.logsumexp(-1, keepdim=True)


def sequence_kls(tb: Testbed) -> tuple[Tensor, Tensor]:
    """(KL(p||q), KL(q||p)) over whole responses, differentiable in theta."""
    seqs = all_sequences()
    lp, lq = sequence_logprob(tb.teacher, seqs), sequence_logprob(tb.theta, seqs)
    fkl = (lp.exp() * (lp - lq)).sum()
    rkl = (lq.exp() * (lq - lp)).sum()
    return fkl, rkl


def reward(y: tuple[int, ...]) -> float:
    """An arbitrary sequence return for the offline-RL checks: number of token-0s, minus 1 if truncated."""
    return float(sum(tok == 0 for tok in y)) - (1.0 if len(y) == H and y[-1] != EOS else 0.0)


def occupancy(table: Tensor) -> Tensor:
    """Probability that a rollout of the model visits each state; [S, V] -> [S]."""
    probs = torch.softmax(table, -1)
    d = torch.zeros(NUM_STATES, dtype=table.dtype)
    for s in all_states():  # by length, so parents come first
        i = state_id(s)
        d[i] = 1.0 if not s else d[state_id(s[:-1])] * probs[state_id(s[:-1]), s[-1]]
    return d


def grad(value: Tensor, tb: Testbed) -> Tensor:
    (g,) = torch.autograd.grad(value, tb.theta, retain_graph=True)
    return g.reshape(-1)


def state_weighted_grad(tb: Testbed, weights: Tensor, per_state: Tensor) -> Tensor:
    """grad of sum_s stopgrad(weights[s]) * per_state[s]: a per-token objective at a fixed state distribution."""
    return grad((weights.detach() * per_state).sum(), tb)


# ---------------------------------------------------------------------------------------------------------
# Sampling and the trainer's layout


def sample(table: Tensor, n: int, generator: torch.Generator) -> list[tuple[int, ...]]:
    """n responses from the tabular model (vectorised over rows)."""
    probs = torch.softmax(table.detach(), -1)
    tokens = torch.full((n, H), EOS, dtype=torch.long)
    alive = torch.ones(n, dtype=torch.bool)
    code = torch.zeros(n, dtype=torch.long)
    for t in range(H):
        sid = (WORDS**t - 1) // (WORDS - 1) + code
        draw = torch.multinomial(probs[sid], 1, generator=generator).squeeze(-1)
        tokens[:, t] = torch.where(alive, draw, EOS)
        code = code * WORDS + draw.clamp(max=WORDS - 1)
        alive = alive & (draw != EOS)
    out = []
    for row in tokens.tolist():
        y = []
        for tok in row:
            y.append(tok)
            if tok == EOS:
                break
        out.append(tuple(y))
    return out


def layout(seqs: list[tuple[int, ...]]) -> tuple[Tensor, Tensor, Tensor]:
    """(state ids [B,T], targets [B,T], mask [B,T]) for responses in the trainer's shifted layout."""
    B = len(seqs)
    sid = torch.zeros(B, H, dtype=torch.long)
    targets = torch.zeros(B, H, dtype=torch.long)
    mask = torch.zeros(B, H, dtype=torch.bool)
    for b, y in enumerate(seqs):
        for t in range(len(y)):
            sid[b, t] = state_id(y[:t])
            targets[b, t] = y[t]
            mask[b, t] = True
    return sid, targets, mask


def batch(tb: Testbed, seqs: list[tuple[int, ...]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(student_logits [B,T,V] (grad to theta), teacher_logits [B,T,V], targets [B,T], mask [B,T])."""
    sid, targets, mask = layout(seqs)
    return tb.theta[sid], tb.teacher[sid], targets, mask


def theta_grad(tb: Testbed, seqs, loss_fn, row_weights: Tensor | None = None) -> Tensor:
    """Gradient w.r.t. theta of loss_fn(student_logits, teacher_logits, targets, mask) on these responses.

    The logits are a leaf [B,T,V]; their gradient is scattered back to the table rows (what autograd does
    through theta[sid]). `row_weights` [B] scales each row's logit gradient: with a loss that is a sum of
    independent per-row terms, this gives sum_b w_b grad loss_b in one call.
    """
    sid, targets, mask = layout(seqs)
    leaf = tb.theta.detach()[sid].requires_grad_()
    (g,) = torch.autograd.grad(loss_fn(leaf, tb.teacher[sid], targets, mask), leaf)
    if row_weights is not None:
        g = g * row_weights.view(-1, 1, 1)
    return torch.zeros_like(tb.theta).index_add_(0, sid.view(-1), g.reshape(-1, V)).reshape(-1)
