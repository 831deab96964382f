"""The trainer's loss pieces: normalisation, accumulation, masks, dataset / prefix losses, sampled estimators."""

import math

import pytest
import torch
import torch.nn.functional as F

from kltd.objectives.divergences import DivergenceSpec, token_divergence
from kltd.objectives.estimators import sampled_kl
from kltd.objectives.losses import baseline_values, dataset_loss, future_returns, normalize, prefix_loss, trajectory_loss, trajectory_per_token

B, T, V = 4, 6, 9
ESTIMATORS = ["exact", "topk", "sampled_k1", "sampled_k2", "sampled_k3", "sampled_reward"]


def _inputs(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, T, V, generator=g, dtype=torch.float64)
    t = 2 * torch.randn(b, T, V, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (b, T), generator=g)
    lengths = torch.randint(1, T + 1, (b,), generator=g)
    mask = torch.arange(T) < lengths[:, None]
    return s, t, y, mask


def _grad(fn, s):
    s = s.clone().requires_grad_()
    value = fn(s)
    (g,) = torch.autograd.grad(value, s)
    return value.detach(), g


# ---------------------------------------------------------------------------------------------------------
# normalisation and gradient accumulation


def test_normalize_token_and_sequence():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    assert normalize(per_token, mask, "token") == pytest.approx(15 / 5)
    assert normalize(per_token, mask, "sequence") == pytest.approx((6 + 9) / 2)
    assert normalize(per_token, mask, "token", denominator=10.0) == pytest.approx(1.5)
    assert normalize(per_token, torch.zeros_like(mask), "token") == 0  # no NaN on an empty batch
    with pytest.raises(ValueError):
        normalize(per_token, mask, "batch")


@pytest.mark.parametrize("how", ["token", "sequence"])
@pytest.mark.parametrize("trajectory", ["expert", "student", "dataset"])
def test_micro_batches_with_global_denominator_equal_one_batch(how, trajectory):
    s, t, y, mask = _inputs(1, b=6)

    def loss(s_, rows, denominator=None):
        return trajectory_loss(
            s_[rows], t[rows], y[rows], mask[rows], trajectory=trajectory, normalization=how, denominator=denominator
        )

    everything = slice(None)
    full_value, full_grad = _grad(lambda s_: loss(s_, everything), s)
    denominator = float(mask.sum()) if how == "token" else 6.0
    parts = [slice(0, 2), slice(2, 6)]  # unequal micro-batches: a per-micro-batch mean would be wrong
    acc_value, acc_grad = _grad(lambda s_: sum(loss(s_, r, denominator) for r in parts), s)
    torch.testing.assert_close(acc_value, full_value)
    torch.testing.assert_close(acc_grad, full_grad)
    # without the global denominator the accumulated loss differs (the reason the argument exists)
    naive = sum(loss(s, r) for r in parts) / len(parts)
    if how == "token":
        assert not torch.isclose(naive, full_value)


def test_prefix_loss_accumulates_with_global_denominator():
    """With baseline "none" the prefix term is a sum over rows too, so it splits the same way."""
    s, t, y, mask = _inputs(2, b=6)
    kw = dict(states="student", baseline="none", normalization="sequence")
    full_value, full_grad = _grad(lambda s_: prefix_loss(s_, t, y, mask, **kw), s)
    parts = [slice(0, 1), slice(1, 6)]
    acc_value, acc_grad = _grad(
        lambda s_: sum(prefix_loss(s_[r], t[r], y[r], mask[r], denominator=6.0, **kw) for r in parts), s
    )
    torch.testing.assert_close(acc_value, full_value)
    torch.testing.assert_close(acc_grad, full_grad)


# ---------------------------------------------------------------------------------------------------------
# masks


# k2 and the reward form are not defined for the forward KL (refused; see test_invalid_combinations_are_refused)
@pytest.mark.parametrize(
    "trajectory, estimator",
    [("student", e) for e in ESTIMATORS] + [("expert", e) for e in ("exact", "topk", "sampled_k1", "sampled_k3")],
)
def test_masked_out_positions_change_nothing(trajectory, estimator):
    s, t, y, mask = _inputs(3)
    def fn(s_, t_):
        return trajectory_loss(s_, t_, y, mask, trajectory=trajectory, estimator=estimator, top_k=3)

    v1, g1 = _grad(lambda s_: fn(s_, t), s)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 1e4 * torch.randn_like(s2[~mask])
    t2[~mask] = float("nan")
    v2, g2 = _grad(lambda s_: fn(s_, t2), s2)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)
    assert (g2[~mask] == 0).all()


@pytest.mark.parametrize("states", ["student", "fixed", "teacher"])
def test_prefix_loss_respects_mask(states):
    s, t, y, mask = _inputs(4)
    fn = lambda s_, t_: prefix_loss(s_, t_, y, mask, states=states, baseline="batch_mean")  # noqa: E731
    v1, g1 = _grad(lambda s_: fn(s_, t), s)
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 50.0
    t2[~mask] = float("nan")
    v2, g2 = _grad(lambda s_: fn(s_, t2), s2)
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(g1, g2)
    assert (g2[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# the pieces against direct formulas


def _ce(s, y, mask):
    labels = y.masked_fill(~mask, -100).reshape(-1)
    return F.cross_entropy(s.reshape(-1, V), labels, ignore_index=-100, reduction="none").view(y.shape)


def test_trajectory_exact_is_the_divergence():
    s, t, y, mask = _inputs(5)
    for trajectory, name in (("expert", "forward_kl"), ("student", "reverse_kl")):
        per = trajectory_per_token(s, t, y, mask, trajectory=trajectory)
        torch.testing.assert_close(per, token_divergence(s, t, DivergenceSpec(name)) * mask)
    spec = DivergenceSpec("jsd", beta=0.3, temperature=2.0)
    per = trajectory_per_token(s, t, y, mask, trajectory="expert", spec=spec)
    torch.testing.assert_close(per, token_divergence(s, t, spec) * mask)


def test_dataset_trajectory_and_dataset_loss_are_cross_entropy():
    s, t, y, mask = _inputs(6)
    ce = _ce(s, y, mask)
    want = ce.sum() / mask.sum()
    torch.testing.assert_close(trajectory_loss(s, None, y, mask, trajectory="dataset"), want)
    torch.testing.assert_close(dataset_loss(s, y, mask), want)
    w = torch.tensor([1.0, 0.0, -0.5, 2.0], dtype=torch.float64)
    torch.testing.assert_close(dataset_loss(s, y, mask, w), (ce * w[:, None]).sum() / mask.sum())
    torch.testing.assert_close(dataset_loss(s, y, mask, w, normalization="sequence"), (ce * w[:, None]).sum() / B)
    # weights are constants
    w_ = w.clone().requires_grad_()
    dataset_loss(s.clone().requires_grad_(), y, mask, w_).backward()
    assert w_.grad is None


@pytest.mark.parametrize("states", ["fixed", "teacher"])
def test_prefix_loss_for_fixed_states_is_cross_entropy(states):
    s, t, y, mask = _inputs(7)
    for how in ("token", "sequence"):
        want = _ce(s, y, mask).sum() / (mask.sum() if how == "token" else B)
        torch.testing.assert_close(prefix_loss(s, None, y, mask, states=states, normalization=how), want)


def test_future_returns_and_baselines():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    g = future_returns(d, mask, gamma=0.5)
    want = torch.tensor([[2 + 0.5 * 3 + 0.25 * 4, 3 + 0.5 * 4, 4.0, 0.0], [6 + 0.5 * 7, 7.0, 0.0, 0.0]])
    torch.testing.assert_close(g, want)
    torch.testing.assert_close(future_returns(d, mask, 1.0)[:, 0], torch.tensor([9.0, 13.0]))

    r = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    m = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    assert (baseline_values(r, m, "none") == 0).all()
    # batch_mean leaves the row out: mean of the other rows that reach t
    bm = baseline_values(r, m, "batch_mean")
    torch.testing.assert_close(bm[:, 0], torch.tensor([15.0, 13.0, 11.0, 9.0]) / 3)
    torch.testing.assert_close(bm[0, 1], torch.tensor(12.0 / 2))
    loo = baseline_values(r, m, "leave_one_out", group_size=2)
    torch.testing.assert_close(loo, torch.tensor([[3.0, 4.0], [1.0, 2.0], [7.0, 8.0], [5.0, 0.0]]))
    assert (baseline_values(r, m, "leave_one_out", group_size=1) == 0).all()
    with pytest.raises(ValueError):
        baseline_values(r, m, "leave_one_out", group_size=3)


def test_prefix_loss_student_value_and_gradient():
    s, t, y, mask = _inputs(8)
    d = token_divergence(s, t, DivergenceSpec("reverse_kl")) * mask
    g = future_returns(d, mask, 0.9)
    adv = g - baseline_values(g, mask, "batch_mean")
    log_q = -_ce(s, y, mask)
    want = (log_q * adv * mask).sum() / B
    got = prefix_loss(s, t, y, mask, states="student", gamma=0.9, normalization="sequence")
    torch.testing.assert_close(got, want)
    _, g_got = _grad(lambda s_: prefix_loss(s_, t, y, mask, states="student", gamma=0.9, normalization="sequence"), s)
    _, g_want = _grad(lambda s_: (-_ce(s_, y, mask) * adv * mask).sum() / B, s)
    torch.testing.assert_close(g_got, g_want)
    # teacher logits never receive gradient from the prefix term
    t_ = t.clone().requires_grad_()
    prefix_loss(s.clone().requires_grad_(), t_, y, mask, states="student").backward()
    assert t_.grad is None or (t_.grad == 0).all()


def test_prefix_loss_score_mask_limits_the_score_terms():
    s, t, y, mask = _inputs(9)
    student_wrote = mask.clone()
    student_wrote[:, 2:] = False  # a hand-off: the teacher continued from position 2
    _, g = _grad(lambda s_: prefix_loss(s_, t, y, mask, states="student", score_mask=student_wrote), s)
    assert (g[:, 2:] == 0).all() and g[:, :2].abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# sampled estimators


def test_sampled_estimator_values():
    log_q = torch.tensor([-0.1, -2.0, -0.7], dtype=torch.float64)
    log_p = torch.tensor([-0.3, -0.5, -0.7], dtype=torch.float64)
    lr = log_q - log_p
    torch.testing.assert_close(sampled_kl(log_q, log_p, "sampled_k1"), lr)
    torch.testing.assert_close(sampled_kl(log_q, log_p, "sampled_k2"), 0.5 * lr**2)
    r = torch.exp(log_p - log_q)
    torch.testing.assert_close(sampled_kl(log_q, log_p, "sampled_k3"), (r - 1) - torch.log(r))
    torch.testing.assert_close(sampled_kl(log_q, log_p, "sampled_reward"), lr)  # value = k1, for logging
    rf = torch.exp(log_q - log_p)
    torch.testing.assert_close(sampled_kl(log_q, log_p, "sampled_k3", "forward_kl"), (rf - 1) - torch.log(rf))
    torch.testing.assert_close(sampled_kl(log_q, log_p, "sampled_k1", "forward_kl"), -lr)
    # per-sample gradients w.r.t. log q: reward and k2 give lr, k3 gives 1 - r, k1 gives 1
    one = torch.ones(3, dtype=torch.float64)
    for est, want in (("sampled_reward", lr), ("sampled_k2", lr), ("sampled_k3", 1 - r), ("sampled_k1", one)):
        lq = log_q.clone().requires_grad_()
        sampled_kl(lq, log_p, est).sum().backward()
        torch.testing.assert_close(lq.grad, want)


def test_sampled_trajectory_uses_target_log_probs():
    s, t, y, mask = _inputs(10)
    spec = DivergenceSpec("reverse_kl", temperature=1.5)
    log_q = torch.log_softmax(s / 1.5, -1).gather(-1, y[..., None]).squeeze(-1)
    log_p = torch.log_softmax(t / 1.5, -1).gather(-1, y[..., None]).squeeze(-1)
    got = trajectory_per_token(s, t, y, mask, trajectory="student", spec=spec, estimator="sampled_k3")
    torch.testing.assert_close(got, sampled_kl(log_q, log_p, "sampled_k3") * mask)


def test_invalid_combinations_are_refused():
    s, t, y, mask = _inputs(11)
    with pytest.raises(ValueError, match="not defined"):
        trajectory_loss(s, t, y, mask, trajectory="expert", estimator="sampled_reward")
    with pytest.raises(ValueError, match="not defined"):
        trajectory_loss(s, t, y, mask, trajectory="student", spec=DivergenceSpec("jsd"), estimator="sampled_k1")
    with pytest.raises(ValueError, match="teacher logits"):
        trajectory_loss(s, None, y, mask, trajectory="student")
    with pytest.raises(ValueError):
        trajectory_loss(s, t, y, mask, trajectory="dagger")
    with pytest.raises(ValueError):
        trajectory_loss(s, t, y, mask, trajectory="student", estimator="k9")
    with pytest.raises(ValueError):
        prefix_loss(s, t, y, mask, states="mixed")
    with pytest.raises(ValueError):
        prefix_loss(s, None, y, mask, states="student")
    with pytest.raises(ValueError, match="greedy"):
        prefix_loss(s, t, y, mask, states="student", sampling_temperature=0.0)


def test_float32_bf16_inputs_run():
    s, t, y, mask = _inputs(12)
    for dtype in (torch.float32, torch.bfloat16):
        s_ = s.to(dtype).requires_grad_()
        t_ = t.to(dtype)
        loss = trajectory_loss(s_, t_, y, mask, trajectory="student") + prefix_loss(s_, t_, y, mask, states="student")
        loss.backward()
        assert math.isfinite(loss.item()) and s_.grad.dtype == dtype and torch.isfinite(s_.grad).all()
