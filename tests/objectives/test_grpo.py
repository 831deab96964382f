"""kltd.objectives.grpo against independent computations on the enumerable testbed.

Testbed: tests/support/enumerable.py (V = 4 with EOS, horizon 4, 121 responses, one empty prompt, tabular
student `theta` = the policy, the tabular teacher standing in for the reference model), reward = `reward`
(number of token-0s, minus 1 if truncated). Exact targets are autograd on enumerated sums over the tables,
without kltd. Checks, as in tests/objectives/test_enumerable.py (float64):

* deterministic: the production gradient on a sampled batch against the formula the docstring states
  (tolerance rtol 1e-9, atol 1e-10: float64 sums of a few hundred terms of size ~1);
* exact expectation: every group of G = 2 responses (121^2 pairs) weighted by its probability;
* Monte Carlo: M = 100 batches of B = 32 responses = 8 groups of G = 4 (sampling seed 1234, testbed seed 0);
  ||mean - exact|| <= 4 * sqrt(sum_i SE_i^2).

Run `python -m tests.objectives.test_grpo` to print the gaps.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from kltd.objectives.grpo import RL_BASELINES, RL_SCALES, group_advantages, policy_loss, reference_kl_penalty
from kltd.objectives.losses import token_logprobs
from tests.support.enumerable import (
    all_sequences,
    grad,
    layout,
    make_testbed,
    occupancy,
    reward,
    sample,
    sequence_kls,
    sequence_logprob,
    theta_grad,
)

TESTBED_SEED, SAMPLE_SEED, M, BATCH, G = 0, 1234, 100, 32, 4
Z = 4.0  # tolerance in standard errors (norm)
EXACT = dict(rtol=1e-9, atol=1e-10)
F64 = torch.float64


def _rewards(rows):
    return torch.tensor([reward(y) for y in rows], dtype=F64)


def _lengths(rows):
    return torch.tensor([len(y) for y in rows], dtype=F64)


# ---------------------------------------------------------------------------------------------------------
# Exact targets, written on the tables without kltd


@functools.lru_cache(maxsize=None)
def exact_targets():
    tb = make_testbed(TESTBED_SEED)
    seqs = all_sequences()
    lq = sequence_logprob(tb.theta, seqs)
    r = _rewards(seqs)
    dq = occupancy(tb.theta).detach()
    p, q = torch.softmax(tb.teacher, -1), torch.softmax(tb.theta, -1)
    return tb, {
        "expected_reward": (lq.exp() * r).sum().item(),
        # the loss is minimised: the policy gradient's target is -grad E_q[r]
        "neg_reward": grad(-(lq.exp() * r).sum(), tb),
        # per-state KLs to the reference at q's state distribution, states held fixed
        "forward_kl_states": grad((dq * (p * (p.log() - q.log())).sum(-1)).sum(), tb),
        "reverse_kl_states": grad((dq * (q * (q.log() - p.log())).sum(-1)).sum(), tb),
        "sequence_reverse_kl": sequence_kls(tb)[1].item(),
    }


# ---------------------------------------------------------------------------------------------------------
# The production losses in theta_grad's form: loss_fn(student_logits, teacher_logits, targets, mask)


def _policy(rows, baseline="group_mean", scale="std", group_size=G, shift=0.0, **kw):
    """policy_loss on `rows` with old log-probs = current - shift (rho = e^shift on every token)."""
    adv = group_advantages(_rewards(rows), group_size, baseline, scale)

    def fn(s, t, y, m):
        lp = token_logprobs(s, y, m)
        return policy_loss(lp, lp.detach() - shift, adv, m, **kw)[0]

    return fn


def _kl_penalty(**kw):
    def fn(s, t, y, m):
        return reference_kl_penalty(token_logprobs(s, y, m), token_logprobs(t, y, m), m, **kw)

    return fn


def _score_formula(tb, rows, weights, denominator):
    """-sum_i w_i grad log q(y_i) / denominator, from the tables."""
    return grad(-(weights * sequence_logprob(tb.theta, rows)).sum() / denominator, tb)


def _sampled(n, seed=SAMPLE_SEED):
    tb, _ = exact_targets()
    return sample(tb.theta, n, torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1], dtype=F64)
    eps = 1e-6
    half = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    loo = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]  # 1 - 1/3, 0 - 2/3
    std = 0.5  # population std of {1, 0, 0, 1}; the constant group's is 0
    cases = {
        ("group_mean", "none"): half,
        ("leave_one_out", "none"): loo,
        ("group_mean", "std"): [a / (std + eps) if i < 4 else 0.0 for i, a in enumerate(half)],
        ("leave_one_out", "std"): [a / (std + eps) if i < 4 else 0.0 for i, a in enumerate(loo)],
    }
    assert set(cases) == set(itertools.product(RL_BASELINES, RL_SCALES))
    for (baseline, scale), want in cases.items():
        got = group_advantages(r, 4, baseline, scale, eps=eps)
        assert not got.isnan().any()
        torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-15, atol=1e-15)
        assert (got[4:] == 0).all()  # a constant group carries no signal
    # groups of 2: population std of {2, 0} is 1
    torch.testing.assert_close(group_advantages(torch.tensor([2.0, 0.0], dtype=F64), 2, eps=0.0),
                               torch.tensor([1.0, -1.0], dtype=F64))
    # one sample per prompt: group_mean leaves nothing, and the std of one row is 0, not NaN
    assert (group_advantages(torch.tensor([3.0, -1.0]), 1) == 0).all()


def test_group_advantages_refuses():
    r = torch.zeros(6)
    with pytest.raises(ValueError, match="whole number of groups of 4"):
        group_advantages(r, 4)
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(r, 0)
    with pytest.raises(ValueError, match="leave_one_out.*group_size >= 2"):
        group_advantages(r, 1, "leave_one_out")
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(r, 2, "batch_mean")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, 2, scale="max")


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_mean_is_leave_one_out_times_g_minus_1_over_g(group_size):
    r = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(group_advantages(r, group_size, "group_mean", "none"),
                               (group_size - 1) / group_size * group_advantages(r, group_size, "leave_one_out", "none"),
                               rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------------------
# policy_loss, deterministic


@pytest.mark.parametrize("normalization,denominator", [("sequence", None), ("token", None), ("sequence", 7.0)])
@pytest.mark.parametrize("baseline,scale", [("group_mean", "std"), ("leave_one_out", "none")])
def test_on_policy_gradient_is_the_score_function(normalization, denominator, baseline, scale):
    """old = current: grad = -sum_i A_i sum_t grad log q(y_it) / denominator; value = -sum_i A_i |y_i| / den."""
    tb, _ = exact_targets()
    rows = _sampled(16)
    adv = group_advantages(_rewards(rows), G, baseline, scale)
    assert (adv > 0).any() and (adv < 0).any()
    den = denominator or (len(rows) if normalization == "sequence" else _lengths(rows).sum())
    kw = dict(normalization=normalization, denominator=denominator)
    got = theta_grad(tb, rows, _policy(rows, baseline, scale, **kw))
    torch.testing.assert_close(got, _score_formula(tb, rows, adv, den), **EXACT)

    sid, targets, mask = layout(rows)
    lp = token_logprobs(tb.theta.detach()[sid], targets, mask)
    loss, stats = policy_loss(lp, lp, adv, mask, **kw)
    torch.testing.assert_close(loss, -(adv * _lengths(rows)).sum() / den, **EXACT)
    assert stats == {"clip_fraction": 0.0, "ratio_mean": 1.0}


# (shift, clip_low, clip_high, sign of the advantages whose tokens are clipped; 0 = none)
CLIP_CASES = [
    (0.5, 0.2, 0.2, +1),  # rho = 1.65 > 1.2: A > 0 clipped, A < 0 keeps rho * A
    (-0.5, 0.2, 0.2, -1),  # rho = 0.61 < 0.8: A < 0 clipped
    (0.22, 0.2, 0.2, +1),  # rho = 1.246 > 1.2
    (0.22, 0.2, 0.28, 0),  # ... < 1.28 (clip-higher): nothing clipped
    (-0.3, 0.2, 0.2, -1),  # rho = 0.741 < 0.8
    (-0.3, 0.28, 0.2, 0),  # ... > 0.72
]


@pytest.mark.parametrize("shift,clip_low,clip_high,clipped_sign", CLIP_CASES)
def test_clipped_tokens_get_no_gradient(shift, clip_low, clip_high, clipped_sign):
    tb, _ = exact_targets()
    rows = _sampled(16)
    adv = group_advantages(_rewards(rows), G, "group_mean", "none")
    clipped_rows = torch.sign(adv) == clipped_sign if clipped_sign else torch.zeros(len(rows), dtype=torch.bool)
    assert clipped_rows.any() or not clipped_sign
    rho = math.exp(shift)
    kw = dict(clip_low=clip_low, clip_high=clip_high)
    got = theta_grad(tb, rows, _policy(rows, "group_mean", "none", shift=shift, **kw))
    # unclipped tokens: -rho A_i grad log q(y_t) / B; clipped ones: nothing
    want = _score_formula(tb, rows, torch.where(clipped_rows, 0.0, rho * adv), len(rows))
    torch.testing.assert_close(got, want, **EXACT)

    sid, targets, mask = layout(rows)
    lp = token_logprobs(tb.theta.detach()[sid], targets, mask)
    _, stats = policy_loss(lp, lp - shift, adv, mask, **kw)
    lengths = _lengths(rows)
    assert stats["clip_fraction"] == pytest.approx((lengths * clipped_rows).sum().item() / lengths.sum().item(),
                                                   rel=1e-12)
    assert stats["ratio_mean"] == pytest.approx(rho, rel=1e-12)


def test_padding_does_not_leak():
    """Off-mask positions with live log-probs (the root state's, with gradient) and old log-probs of -inf
    (rho = inf there) change neither the loss nor its gradient, and put no NaN in it."""
    tb, _ = exact_targets()
    rows = _sampled(16)
    adv = group_advantages(_rewards(rows), G)
    sid, targets, mask = layout(rows)
    assert not mask.all()
    leaf = tb.theta.detach()[sid].requires_grad_()
    lp = torch.log_softmax(leaf, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # not zeroed off the mask
    loss, _ = policy_loss(lp, torch.where(mask, lp.detach(), -math.inf), adv, mask)
    (g,) = torch.autograd.grad(loss, leaf)
    got = torch.zeros_like(tb.theta).index_add_(0, sid.view(-1), g.reshape(-1, g.shape[-1])).reshape(-1)
    torch.testing.assert_close(got, _score_formula(tb, rows, adv, len(rows)), **EXACT)
    torch.testing.assert_close(loss, -(adv * _lengths(rows)).sum() / len(rows), **EXACT)


# ---------------------------------------------------------------------------------------------------------
# In expectation: exactly over all groups of two, and by Monte Carlo over groups of four


@functools.lru_cache(maxsize=None)
def pairs():
    """All 121^2 groups of two as 2 * 121^2 rows (a, b, a, b', ...): the rows, their layout, each row's weight
    (its group's probability q(y_a) q(y_b), halved: the loss runs with denominator 1, a sum over groups, and
    halving restores each group's own normalisation by its 2 rows)."""
    tb, _ = exact_targets()
    seqs = all_sequences()
    q = sequence_logprob(tb.theta, seqs).exp().detach()
    n = len(seqs)
    idx = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij"), -1).reshape(-1)
    sid, targets, mask = (x[idx] for x in layout(seqs))  # layout() row by row would take seconds
    rows = [seqs[i] for i in idx.tolist()]
    return rows, (sid, targets, mask), (q[idx[0::2]] * q[idx[1::2]]).repeat_interleave(2) / 2


def expected_pair_gradient(loss_for_rows):
    """E over groups (y_a, y_b) ~ q x q of the gradient of the loss on that one group: theta_grad on the
    precomputed layout, each row's logit gradient weighted by its group's probability."""
    tb, _ = exact_targets()
    rows, (sid, targets, mask), w = pairs()
    leaf = tb.theta.detach()[sid].requires_grad_()
    (g,) = torch.autograd.grad(loss_for_rows(rows)(leaf, tb.teacher[sid], targets, mask), leaf)
    g = g * w.view(-1, 1, 1)
    return torch.zeros_like(tb.theta).index_add_(0, sid.view(-1), g.reshape(-1, g.shape[-1])).reshape(-1)


def test_exact_expectation_groups_of_two():
    """G = 2: leave_one_out without scaling is exactly -grad E_q[r]; group_mean without scaling exactly half."""
    _, targets = exact_targets()
    target = targets["neg_reward"]
    loo = expected_pair_gradient(lambda rows: _policy(rows, "leave_one_out", "none", 2, denominator=1.0))
    gm = expected_pair_gradient(lambda rows: _policy(rows, "group_mean", "none", 2, denominator=1.0))
    torch.testing.assert_close(loo, target, **EXACT)
    torch.testing.assert_close(gm, target / 2, **EXACT)


@functools.lru_cache(maxsize=None)
def monte_carlo():
    """Per-batch gradients [M, S*V] of each loss on M batches of B student samples (groups of G)."""
    tb, _ = exact_targets()
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    batches = [sample(tb.theta, BATCH, gen) for _ in range(M)]
    losses = {
        "leave_one_out": lambda rows: _policy(rows, "leave_one_out", "none"),
        "group_mean": lambda rows: _policy(rows, "group_mean", "none"),
        "grpo (group_mean, std)": lambda rows: _policy(rows, "group_mean", "std"),
        "kl_penalty": lambda rows: _kl_penalty(),
    }
    return {name: torch.stack([theta_grad(tb, rows, make(rows)) for rows in batches]) for name, make in losses.items()}


def mc_gap(name, target):
    """(||mean - target||, sqrt(sum SE^2)) of the per-batch gradients."""
    g = monte_carlo()[name]
    return (g.mean(0) - target).norm().item(), (g.std(0) / g.shape[0] ** 0.5).norm().item()


def test_monte_carlo_leave_one_out_is_the_reward_gradient():
    _, targets = exact_targets()
    err, se = mc_gap("leave_one_out", targets["neg_reward"])
    assert err <= Z * se, f"leave_one_out: {err / se:.2f} standard errors"


def test_monte_carlo_group_mean_is_g_minus_1_over_g_of_it():
    _, targets = exact_targets()
    mc = monte_carlo()
    # sample by sample, not only in expectation
    torch.testing.assert_close(mc["group_mean"], (G - 1) / G * mc["leave_one_out"], **EXACT)
    err, se = mc_gap("group_mean", (G - 1) / G * targets["neg_reward"])
    assert err <= Z * se, f"group_mean: {err / se:.2f} standard errors"


# ---------------------------------------------------------------------------------------------------------
# reference_kl_penalty


def test_kl_penalty_exact_expectation():
    """Value: E_q = sequence KL(q||ref). Gradient: E_q = grad sum_s d_q(s) KL(ref||q)(s), the forward KL's."""
    tb, targets = exact_targets()
    seqs = all_sequences()
    q = sequence_logprob(tb.theta, seqs).exp().detach()
    got = theta_grad(tb, seqs, _kl_penalty(denominator=1.0), row_weights=q)
    torch.testing.assert_close(got, targets["forward_kl_states"], **EXACT)
    reverse = targets["reverse_kl_states"]
    assert (got - reverse).norm() > 0.1 * reverse.norm()  # not the reverse KL's gradient

    sid, y, mask = layout(seqs)
    per_row = [reference_kl_penalty(token_logprobs(tb.theta.detach()[sid[i:i + 1]], y[i:i + 1], mask[i:i + 1]),
                                    token_logprobs(tb.teacher[sid[i:i + 1]], y[i:i + 1], mask[i:i + 1]),
                                    mask[i:i + 1]) for i in range(len(seqs))]
    value = (q * torch.stack(per_row)).sum().item()
    assert value == pytest.approx(targets["sequence_reverse_kl"], rel=1e-12)


def test_kl_penalty_monte_carlo():
    _, targets = exact_targets()
    err, se = mc_gap("kl_penalty", targets["forward_kl_states"])
    assert err <= Z * se, f"kl_penalty: {err / se:.2f} standard errors"


def test_kl_penalty_padding_does_not_leak():
    """Log-probs of -inf off the mask (with a gradient path) and a NaN reference there: the same loss and
    gradient as with zeros there."""
    tb, _ = exact_targets()
    rows = _sampled(16)
    sid, targets, mask = layout(rows)
    assert not mask.all()

    def run(masked):
        leaf = tb.theta.detach()[sid].requires_grad_()
        if masked:
            lp, ref = token_logprobs(leaf, targets, mask), token_logprobs(tb.teacher[sid], targets, mask)
        else:
            live = torch.log_softmax(leaf, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            lp = live + torch.where(mask, 0.0, -math.inf)  # -inf off the mask, gradient path intact
            ref = torch.where(mask, token_logprobs(tb.teacher[sid], targets, mask), math.nan)
        loss = reference_kl_penalty(lp, ref, mask)
        return loss, torch.autograd.grad(loss, leaf)[0]

    torch.testing.assert_close(run(False), run(True), **EXACT)


def report() -> str:
    _, targets = exact_targets()
    neg = targets["neg_reward"]
    lines = [f"testbed seed {TESTBED_SEED}: E_q[r] = {targets['expected_reward']:.4f}; MC seed {SAMPLE_SEED}, "
             f"{M} batches x {BATCH} = {BATCH // G} groups of {G}", "||MC mean - target|| in standard errors:"]
    for name, target in (("leave_one_out", neg), ("group_mean", (G - 1) / G * neg), ("group_mean", neg),
                         ("grpo (group_mean, std)", neg), ("kl_penalty", targets["forward_kl_states"]),
                         ("kl_penalty", targets["reverse_kl_states"])):
        err, se = mc_gap(name, target)
        cos = torch.nn.functional.cosine_similarity(monte_carlo()[name].mean(0), target, 0).item()
        lines.append(f"  {name:<24} vs target of norm {target.norm():.4f}: {err / se:6.2f} SE "
                     f"(relative {err / target.norm():.4f}, cosine {cos:.4f})")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(report())
