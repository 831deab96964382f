"""Three combinations whose gradients an independent check found biased, each against the exact gradient
of the objective it optimises, on the enumerable testbed (tests/support/enumerable.py).

(a) hand-off with supervise=after_handoff and a prefix term: the returns sum the divergence only where it
    is supervised (after the hand-off), while the score function covers the student's roll-in;
(b) top-p sampling with a prefix term: the score function is that of the truncated (nucleus) sampler;
(c) the MiniLLM-like preset: per-sequence normalisation, so OPD + prefix is the exact sequence gradient.

Expected gradients are exact (every response weighted by its probability, float64); objectives are written
directly on the tables, independent of kltd.
"""

from __future__ import annotations

import torch
from hydra import compose, initialize_config_dir

from kltd.app.train_command import config_dir, to_typed
from kltd.objectives.divergences import DivergenceSpec
from kltd.objectives.losses import prefix_loss, trajectory_loss
from tests.support.enumerable import (
    all_sequences,
    grad,
    make_testbed,
    nucleus_log_table,
    sequence_kls,
    sequence_logprob,
    state_id,
    theta_grad,
)

SEQ = dict(normalization="sequence", denominator=1.0)  # one row's loss; rows are independent


def per_state(tb, name: str) -> torch.Tensor:
    p, q = torch.softmax(tb.teacher, -1), torch.softmax(tb.theta, -1)
    return (q * (q.log() - p.log())).sum(-1) if name == "reverse_kl" else (p * (p.log() - q.log())).sum(-1)


def objective(tb, log_probs_of_sequences, divergence: str, first_supervised: int = 0) -> torch.Tensor:
    """sum_y P_theta(y) * sum_{t >= first_supervised} D(s_t): states and divergences both depend on theta."""
    d = per_state(tb, divergence)
    seqs = all_sequences()
    totals = torch.stack([sum((d[state_id(y[:t])] for t in range(first_supervised, len(y))),
                              torch.zeros((), dtype=d.dtype)) for y in seqs])
    return (log_probs_of_sequences.exp() * totals).sum()


def expected_gradient(tb, weights, loss_fn):
    seqs = all_sequences()
    return theta_grad(tb, seqs, loss_fn, row_weights=weights.detach())


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_a_handoff_after_handoff_prefix_term_is_the_exact_gradient():
    """The student writes the first k = 2 tokens, the teacher the rest; only positions after the hand-off
    are supervised (forward KL, trajectory=expert), and the prefix term carries the roll-in's effect."""
    tb, k = make_testbed(0), 2
    spec = DivergenceSpec("forward_kl")
    log_p = sequence_logprob(tb.theta, all_sequences(), rolled_out_by=tb.teacher, handoff=k)
    exact = grad(objective(tb, log_p, "forward_kl", first_supervised=k), tb)

    def loss(s, t, y, m, returns_everywhere=False):
        column = torch.arange(m.shape[1]).unsqueeze(0)
        supervised, written = m & (column >= k), m & (column < k)
        traj = trajectory_loss(s, t, y, supervised, trajectory="expert", spec=spec, **SEQ)
        pre = prefix_loss(s, t, y, m if returns_everywhere else supervised, states="student", baseline="none",
                          spec=spec, score_mask=written, **SEQ)
        return traj + pre

    mine = expected_gradient(tb, log_p.exp(), loss)
    assert relative(mine, exact) < 1e-10
    # the old returns (the divergence at every response position, the unsupervised roll-in included) miss it
    old = expected_gradient(tb, log_p.exp(), lambda *a: loss(*a, returns_everywhere=True))
    print(f"hand-off k={k}: old returns' relative gradient error {relative(old, exact):.3f}")
    assert relative(old, exact) > 0.05


def test_b_top_p_prefix_term_uses_the_truncated_samplers_score_function():
    tb, top_p = make_testbed(0), 0.8
    truncated = nucleus_log_table(tb.theta, top_p)
    log_q = sequence_logprob(tb.theta, all_sequences(), log_table=truncated)
    exact = grad(objective(tb, log_q, "reverse_kl"), tb)

    def loss(s, t, y, m, sampler_top_p=top_p):
        traj = trajectory_loss(s, t, y, m, trajectory="student", **SEQ)
        return traj + prefix_loss(s, t, y, m, states="student", baseline="none", sampling_top_p=sampler_top_p, **SEQ)

    weights = log_q.exp().detach()
    assert abs(float(weights.sum()) - 1) < 1e-12
    assert (weights == 0).any()  # the nucleus really cuts tokens at some states
    mine = expected_gradient(tb, weights, loss)
    assert relative(mine, exact) < 1e-10
    # the untruncated softmax's score function (what the prefix term used before) is biased
    untruncated = expected_gradient(tb, weights, lambda *a: loss(*a, sampler_top_p=1.0))
    print(f"top_p={top_p}: untruncated score function's relative gradient error {relative(untruncated, exact):.3f}")
    assert relative(untruncated, exact) > 0.05


def test_c_the_minillm_preset_gives_the_exact_sequence_reverse_kl_gradient():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=["method=minillm"]))
    loss_cfg = cfg.loss
    assert (cfg.prefix.source, cfg.trajectory.supervisor) == ("student", "student")
    assert loss_cfg.normalization == "sequence" and loss_cfg.gamma == 1.0
    tb = make_testbed(0)
    _, rkl = sequence_kls(tb)
    exact = grad(rkl, tb)
    seqs = all_sequences()
    log_q = sequence_logprob(tb.theta, seqs)

    def loss(s, t, y, m):  # the preset's settings; its batch_mean baseline is unbiased, so none here (exact)
        common = dict(normalization=loss_cfg.normalization, denominator=1.0)
        traj = trajectory_loss(s, t, y, m, trajectory="student", **common)
        pre = prefix_loss(s, t, y, m, states="student", gamma=loss_cfg.gamma, baseline="none", **common)
        return loss_cfg.kl_trajectory_weight * traj + loss_cfg.kl_prefix_weight * pre

    assert relative(expected_gradient(tb, log_q.exp(), loss), exact) < 1e-10
