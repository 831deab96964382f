"""Single-sampled-token estimators of a per-token KL (Schulman's k1 / k2 / k3 naming) and their gradients.

Each estimator sees only log q(y) and log p(y) of one token y drawn at the state, never the full
vocabulary. What matters for training is the gradient each gives *in expectation over y*; it is not
always the gradient of the KL whose value it estimates. Every claim below is checked on the enumerable
testbed (tests/test_enumerable.py).

Reverse KL(q || p), token y ~ q (the student's own sample), lr = log q(y) - log p(y):

    k1      = lr                        E[k1] = KL(q||p).  Gradient (y held fixed) = grad log q(y), whose
                                        expectation is 0: as a loss it trains nothing, only adds noise.
    k2      = 0.5 * lr^2                E[k2] != KL (second-order approximation).  Gradient
                                        = lr * grad log q(y), expectation = grad KL(q||p): the reverse-KL
                                        gradient, per sample identical to `reward`.
    k3      = (r - 1) - log r, r = p/q  E[k3] = KL(q||p), always >= 0.  Gradient = (1 - r) grad log q(y),
                                        expectation = -sum_v p(v) grad log q(v) = grad KL(p||q): the
                                        FORWARD-KL gradient, although its value estimates the reverse KL.
    reward  surrogate with value k1     REINFORCE with reward log p(y) - log q(y), no gradient through the
                                        reward: gradient = lr * grad log q(y), expectation = grad KL(q||p).

Forward KL(p || q), token y ~ p (the teacher's sample), lr = log p(y) - log q(y):

    k1      = lr                        E[k1] = KL(p||q).  Gradient = -grad log q(y) (cross-entropy on the
                                        teacher's token), expectation = grad KL(p||q).
    k3      = (r - 1) - log r, r = q/p  E[k3] = KL(p||q).  Gradient = (r - 1) grad log q(y), expectation =
                                        grad KL(p||q) as well.
    k2 and reward are refused: with y ~ p, k2's expected gradient is -sum_v p (log p - log q) grad log q,
    not a KL gradient, and the reward form needs the student's own sample.

All of these hold only if y was drawn from the model named above (and at the temperature used for the
log-probabilities); e.g. a reverse-KL estimator at teacher-written tokens is biased.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kltd.schema.choices import SAMPLED_ESTIMATORS


def sampled_kl(log_q: Tensor, log_p: Tensor, estimator: str, divergence: str = "reverse_kl") -> Tensor:
    """Per-token single-sample KL estimate (or surrogate, for `sampled_reward`).

    Args:
        log_q: student log-prob of the sampled token [...], differentiable.
        log_p: teacher log-prob of the same token [...], treated as a constant.
        estimator: sampled_k1 | sampled_k2 | sampled_k3 | sampled_reward.
        divergence: reverse_kl (token drawn from q) or forward_kl (token drawn from p).
    Returns:
        [...] per-token loss; see the module docstring for the gradient each gives.
    """
    if estimator not in SAMPLED_ESTIMATORS.get(divergence, ()):
        raise ValueError(
            f"estimator {estimator!r} is not defined for divergence {divergence!r}; "
            f"sampled estimators: {', '.join(f'{d}: {list(e)}' for d, e in SAMPLED_ESTIMATORS.items())}"
        )
    log_p = log_p.detach()
    # Signed so that E_y[log_ratio] is the KL being estimated.
    log_ratio = log_q - log_p if divergence == "reverse_kl" else log_p - log_q
    if estimator == "sampled_k1":
        return log_ratio
    if estimator == "sampled_k2":
        return 0.5 * log_ratio.square()
    if estimator == "sampled_k3":
        # (r - 1) - log r with log r = -log_ratio; expm1 keeps precision when r is close to 1.
        return torch.expm1(-log_ratio) + log_ratio
    # sampled_reward: value k1 (for logging), gradient stopgrad(k1) * grad log q.
    k1 = log_ratio.detach()
    return k1 + k1 * (log_q - log_q.detach())
