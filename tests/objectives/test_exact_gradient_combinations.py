"""Combinations whose gradients an independent check found biased, each against the exact gradient
of the objective it optimises, on the enumerable testbed (tests/support/enumerable.py).

(a) hand-off with supervise=after_handoff and a prefix term: the returns sum the divergence only where it
    is supervised (after the hand-off), while the score function covers the student's roll-in;
(b) top-p sampling with a prefix term: the score function is that of the truncated (nucleus) sampler;
(c) the MiniLLM-like preset: per-sequence normalisation, so OPD + prefix is the exact sequence gradient;
(d) the same with per-token normalisation, which is not (refused by Config.check());
(e) hand-off rows whose hand-off point is 0: student rows with an empty score function, not fixed rows.

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


def test_d_the_prefix_term_with_per_token_normalisation_is_not_the_exact_gradient():
    """OPD + prefix with loss.normalization=token (each batch divided by its token count): even 1-row batches,
    whose count is the row's own length, are far from the sequence reverse-KL gradient, so Config.check()
    refuses the prefix term on student states without loss.normalization=sequence."""
    from kltd.schema.config import Config, ConfigError

    tb = make_testbed(0)
    _, rkl = sequence_kls(tb)
    exact = grad(rkl, tb)
    log_q = sequence_logprob(tb.theta, all_sequences())

    def loss(s, t, y, m, how):
        total = 0
        for b in range(m.shape[0]):  # one batch per row
            row = (s[b:b + 1], t[b:b + 1], y[b:b + 1], m[b:b + 1])
            total = total + trajectory_loss(*row, trajectory="student", normalization=how)
            total = total + prefix_loss(*row, states="student", baseline="none", normalization=how)
        return total

    per_sequence = expected_gradient(tb, log_q.exp(), lambda *a: loss(*a, "sequence"))
    per_token = expected_gradient(tb, log_q.exp(), lambda *a: loss(*a, "token"))
    print(f"1-row batches, token normalisation: relative gradient error {relative(per_token, exact):.3f}")
    assert relative(per_sequence, exact) < 1e-10 and relative(per_token, exact) > 0.3
    cfg = Config()
    cfg.prefix.source, cfg.trajectory.supervisor, cfg.loss.kl_prefix_weight = "student", "student", 1.0
    try:
        cfg.check()
        refused = ""
    except ConfigError as error:
        refused = str(error)
    assert "loss.normalization=sequence" in refused


def test_e_a_handoff_row_at_k_0_adds_nothing_to_the_prefix_term():
    """Hand-off rows (the student rolls in k tokens, the teacher rolls out; forward KL after the hand-off,
    prefix term on), k uniform on {0, 1, 2}; method=handoff draws k = 0 too (about 4% of the built-in task's
    rows). A k = 0 row is a student row whose score function is empty: no state depends on the student, so
    its exact gradient is the per-token term alone. The trainer's own prefix_term on these rows gives the
    exact gradient of the hand-off objective; treating the k = 0 rows as fixed rows (the old
    StateBatch.from_student, which looked for a student-written token) adds cross-entropy on their tokens,
    doubling their gradient."""
    from types import SimpleNamespace

    from kltd.rollout.batch import Responses, StateBatch
    from kltd.schema.config import Config
    from kltd.train.ranks import SINGLE
    from kltd.train.trainer import Trainer

    tb, ks = make_testbed(0), (0, 1, 2)
    spec = DivergenceSpec("forward_kl")
    seqs = all_sequences()
    weights, handoff, exact, exact_at_0 = [], [], 0, None
    for k in ks:
        log_p = sequence_logprob(tb.theta, seqs, rolled_out_by=tb.teacher, handoff=k)
        g = grad(objective(tb, log_p, "forward_kl", first_supervised=k), tb)
        exact, exact_at_0 = exact + g / len(ks), g if k == 0 else exact_at_0
        weights.append(log_p.exp().detach() / len(ks))
        handoff += [k] * len(seqs)
    cfg = Config()
    cfg.loss.kl_prefix_weight, cfg.loss.baseline, cfg.loss.normalization = 1.0, "none", "sequence"
    trainer = SimpleNamespace(cfg=cfg, spec=spec, ranks=SINGLE)  # what Trainer.prefix_term reads

    def loss(s, t, y, m, k_of_row, coin_rows=True):
        written = m & (torch.arange(m.shape[1]).unsqueeze(0) < k_of_row.unsqueeze(1))
        supervised = m & ~written  # prefix.supervise=after_handoff, as in method=handoff
        n = m.shape[0]
        batch = StateBatch(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long), Responses(y, m),
                           written, supervised, student_rows=torch.ones(n, dtype=torch.bool) if coin_rows else None)
        common = dict(normalization="sequence", denominator=1.0)
        traj = trajectory_loss(s, t, y, supervised, trajectory="expert", spec=spec, **common)
        return traj + Trainer.prefix_term(trainer, batch, s, t, common)

    rows, k_of_row = seqs * len(ks), torch.tensor(handoff)
    mine = theta_grad(tb, rows, lambda *a: loss(*a, k_of_row), row_weights=torch.cat(weights))
    assert relative(mine, exact) < 1e-10
    old = theta_grad(tb, rows, lambda *a: loss(*a, k_of_row, coin_rows=False), row_weights=torch.cat(weights))
    at_0 = slice(0, len(seqs))  # the k = 0 rows alone
    old_at_0 = theta_grad(tb, seqs, lambda *a: loss(*a, k_of_row[at_0], coin_rows=False), row_weights=weights[0] * 3)
    print(f"k = 0 rows as fixed rows: relative gradient error {relative(old, exact):.3f} over k in {ks}, "
          f"{relative(old_at_0, exact_at_0):.3f} on the k = 0 rows")
    assert relative(old, exact) > 0.05 and abs(relative(old_at_0, exact_at_0) - 1.0) < 1e-9
