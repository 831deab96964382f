"""Tolerances that follow from float32 arithmetic, not from one quiet run.

u = 2**-24 is float32's unit roundoff. A float32 sum of n terms x_1..x_n, in any order and with any blocking
(a matmul's, a process's partial sum then an all-reduce), satisfies

    |fl(x_1 + ... + x_n) - (x_1 + ... + x_n)| <= gamma_(n-1) * (|x_1| + ... + |x_n|),  gamma_n = n*u / (1 - n*u)

(Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 4.4). A term that is itself the result
of m roundings (a dot product of m terms, a chain of operations) carries a relative error of at most
gamma_m, and gamma_a + gamma_b <= gamma_(a+b): the roundings along a chain add to the count. Two evaluations of
the same sum (one process against two, another batch composition that makes a matmul block differently) are
each within the bound of the exact value, so they differ by at most twice it (`two_orders`).

The bound is a worst case: it does not depend on the machine's speed or load, its vector width or its thread
count, only on how many terms are summed and how large they are. What it needs is a magnitude, the sum of
the absolute values of the terms, which the caller takes from what the computation actually sums.
"""

from __future__ import annotations

import math

U = 2.0**-24  # float32 unit roundoff


def gamma(n: int) -> float:
    """gamma_n = n*u / (1 - n*u): the relative error bound of n float32 roundings (needs n*u < 1)."""
    if n * U >= 1:
        raise ValueError(f"{n} float32 roundings have no useful bound")
    return n * U / (1 - n * U)


def float32_sum_bound(n_terms: int, magnitude: float) -> float:
    """The most a float32 sum of n_terms terms, whose absolute values add up to `magnitude`, can be off."""
    return gamma(max(n_terms - 1, 0)) * magnitude


def two_orders(n_terms: int, magnitude: float) -> float:
    """The most two float32 evaluations of the same sum (other order, blocking or process split) can differ."""
    return 2 * float32_sum_bound(n_terms, magnitude)


def llama_chain(config: dict) -> int:
    """Roundings along the longest chain of float32 sums from a token to one logit of a Llama-family model
    (a config.json as a dict; GPT-2's names for the same sizes are read too, its LayerNorms counted like RMS
    norms). Per layer: two RMS norms (hidden_size terms each), the q/k/v projection
    (hidden_size), a query-key product (head_dim), the softmax's sum and the weighted sum of the values (up to
    max_position_embeddings terms each), the output projection (heads x head_dim), the gate/up projection
    (hidden_size) and the down projection (intermediate_size); then the final norm and the output layer
    (hidden_size each). First order: the nonlinear steps (softmax, SiLU, the norms' division) pass a relative
    error on without magnifying it by more than their condition number, taken as 1."""
    hidden = config.get("hidden_size") or config["n_embd"]
    layers = config.get("num_hidden_layers") or config["n_layer"]
    heads = config.get("num_attention_heads") or config["n_head"]
    head_dim = config.get("head_dim") or hidden // heads
    positions = config.get("max_position_embeddings") or config["n_positions"]
    intermediate = config.get("intermediate_size") or config.get("n_inner") or 4 * hidden
    per_layer = 2 * hidden + hidden + head_dim + 2 * positions + heads * head_dim + hidden + intermediate
    return layers * per_layer + 2 * hidden


def divergence_magnitude(parts: float, tokens_per_denominator: float, vocab: int) -> float:
    """Sum of |terms| of a normalised per-token divergence loss, over the denominator. Per token the divergence
    sum_v p_v (log p_v - log q_v) has sum_v |p_v log p_v| + |p_v log q_v| = H(p) + CE(p, q) = KL + 2 H(p) <=
    KL + 2 ln V, so over the step's tokens: `parts` (the sum of the |terms| each token contributes, i.e. the
    loss parts, or more where a part has terms of both signs) + 2 ln V per token (tokens / denominator)."""
    return parts + 2 * math.log(vocab) * tokens_per_denominator


def adam_step_bound(step: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The largest |m_hat / (sqrt(v_hat) + eps)| Adam can take at `step` (1-based), whatever the gradients: by
    Cauchy-Schwarz, |sum_i a_i g_i| <= sqrt(sum_i a_i^2 / b_i) * sqrt(sum_i b_i g_i^2), with a_i, b_i the
    bias-corrected weights of gradient i in m_hat and v_hat. 1 at step 1."""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (step - i) / (1 - b1**step) for i in range(1, step + 1)]
    b = [(1 - b2) * b2 ** (step - i) / (1 - b2**step) for i in range(1, step + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


def adam_drift_bound(lrs: list[float], betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The most one weight of two AdamW runs (no weight decay) that start from the same weights can differ after
    steps at learning rates `lrs` (lrs[k-1] at step k), whatever their gradients: each run moves the weight by at
    most lr_k * adam_step_bound(k) at step k. This is what Adam's amplification of float noise can reach: a
    gradient component within float noise of zero (|g| ~ eps) gets an update anywhere in that range."""
    return 2 * sum(lr * adam_step_bound(k, betas) for k, lr in enumerate(lrs, 1))


def forward_bound(config: dict, magnitude: float = 1.0, extra_terms: int = 0) -> float:
    """The most two float32 evaluations of one Llama-family forward pass (another arrangement of the weights,
    another batch composition or blocking, a cache of keys and values) can differ in an output whose terms add
    up to `magnitude` in absolute value: two_orders over llama_chain, plus `extra_terms` roundings after it (a
    log-softmax's V, a backward pass's own chain, a sum over tokens). As an assert_close tolerance (rtol = atol)
    it takes an output's magnitude as its own size, or 1 below 1: a hidden state or logit of these models is
    a sum of O(1) terms (RMS-normalised activations times weights of O(1) or less)."""
    return two_orders(llama_chain(config) + extra_terms, magnitude)


def loss_bounds(student: dict, teacher: dict, tokens: int, denominator: float, loss: float) -> tuple[float, float]:
    """(loss, gradient) bounds for two float32 evaluations of one distillation loss on one batch (another code
    path, grouping or micro-batching of the same sums), from the two models' configs, the batch's supervised
    tokens, the loss's denominator and its value. Per token the divergence sums both models' vocabularies after
    both forward chains; the magnitude is divergence_magnitude's. A weight's gradient adds the student's backward
    chain (as long as its forward's) and the sum over the tokens; it is relative to the gradient tensor's own
    scale (max |g|): its terms are taken to cancel no more than that."""
    vocab = student["vocab_size"]
    terms = tokens * 2 * vocab + llama_chain(student) + llama_chain(teacher)
    return (two_orders(terms, divergence_magnitude(abs(loss), tokens / denominator, vocab)),
            two_orders(terms + llama_chain(student) + tokens, 1.0))


def assert_same_gradients(a: dict, b: dict, relative: float) -> None:
    """Each named gradient of `a` within `relative` x (the largest |entry| of that gradient in `b`)."""
    assert a.keys() == b.keys()
    for name in a:
        assert float((a[name] - b[name]).abs().max()) <= relative * float(b[name].abs().max()), name


def _gamma(n: int, u: float) -> float:
    """gamma_n for a unit roundoff u (U for float32, 2**-53 for float64)."""
    if n * u >= 1:
        raise ValueError(f"{n} roundings have no useful bound")
    return n * u / (1 - n * u)


def log_softmax_bound(vocab: int, max_abs_logit: float, u: float = U) -> float:
    """The most one entry of log_softmax(z / T) over `vocab` entries, computed with unit roundoff u (U: float32;
    2**-53: float64), can be off its exact value, for logits with max |z| / T <= max_abs_logit (an input given in
    the same dtype is exact; the division by T is counted). log_softmax(z)_v = (z_v - m) - log S, S = sum_i
    exp(z_i - m), whatever m (the exact value does not depend on it, so the rounding of torch's m = max z cancels):
    - z_i / T - m: 2 roundings of values of size <= 2 max_abs_logit, an absolute error that exp turns into a
      relative one of S; exp's own (libm's are within 2 ulps: 2); S: V - 1 additions of positive terms;
    - log S: S's relative error as an absolute one, and a rounding of log S <= ln V;
    - the entry: z_v / T - m as above, then 2 roundings (z_v - m - log S, or z_v - (m + log S)) of values of
      size <= 2 max_abs_logit + ln V.
    First order, as llama_chain."""
    z, log_v = max_abs_logit, math.log(vocab)
    return (_gamma(2, u) * 2 * z + _gamma(2, u) + _gamma(max(vocab - 1, 0), u) + u * log_v  # log S
            + _gamma(2, u) * 2 * z + _gamma(2, u) * (2 * z + log_v))  # the entry


def divergence_bound(vocab: int, max_abs_logit: float, magnitude: float, *, weight: float = 1.0,
                     mix: float | None = None, tokens: int = 1, terms: int | None = None, u: float = U) -> float:
    """The most a divergence of kltd.objectives.divergences, computed with unit roundoff u from logits (see
    log_softmax_bound), summed over `tokens` positions (1: one position's value), can be off its exact value.
    Each is a sum over the vocabulary of terms a_v (la_v - lb_v) (a KL: la, lb log-probabilities or the log of a
    mixture) or |p_v - q_v| / 2 (tv), its KLs combined with weights whose absolute values add up to `weight` (1;
    1 / (beta (1 - beta)) for jsd_scaled, whose parts add up to 1 before the division).
    - A log-probability is within E = log_softmax_bound of exact; the log of a mixture log(w a + (1 - w) b)
      (logaddexp(la + log w, lb + log(1 - w)), `mix` = min(w, 1 - w)) within E plus 5 roundings (the two shifts,
      logaddexp's exp, log1p and addition) of values of size <= 2 max_abs_logit + ln V + ln(1 / mix).
    - In a term, a_v = exp(la_v) is off by a relative E + 2u, la_v - lb_v by an absolute 2E and a rounding, the
      product by a rounding: per position the terms' errors add up to at most 2E + (E + gamma(6)) * sum_v
      a_v |la_v - lb_v| (gamma(6) also covers the weighted sum of the KLs), and the sum of `terms` (default
      vocab * tokens) terms adds gamma(terms - 1) of that sum.
    `magnitude` is sum_v a_v |la_v - lb_v| summed over the positions, for the largest of the formula's KLs: a test
    takes it from float64 probabilities; per position it is at most KL(a || b) + 2, since sum_v a_v |la_v - lb_v|
    = KL(a || b) + 2 sum_{a_v < b_v} a_v ln(b_v / a_v) <= KL(a || b) + 2 TV(a, b). For tv it is 1 per position
    (sum_v (p_v + q_v) / 2), which covers tv's own terms."""
    terms = vocab * tokens if terms is None else terms
    e = log_softmax_bound(vocab, max_abs_logit, u)
    if mix is not None:
        e += _gamma(5, u) * (2 * max_abs_logit + math.log(vocab) + math.log(1 / mix))
    return weight * (2 * e * tokens + (e + _gamma(6, u) + _gamma(max(terms - 1, 0), u)) * magnitude)


def divergence_gradient_bound(vocab: int, max_abs_logit: float, magnitude: float, *, weight: float = 1.0,
                              mix: float | None = None, temperature: float = 1.0, u: float = U) -> float:
    """The most one entry of the gradient of one position's divergence (divergence_bound's) with respect to the
    student's logits can be off its exact value. The gradient with respect to the student's log-probabilities
    is a sum of terms of the forward's kind (a_v, a_v (la_v - lb_v), the mixtures' weights, each within the
    forward's errors), whose absolute values add up to at most magnitude + 1 (reverse KL: q_v (lq_v - lp_v + 1));
    log_softmax's backward g - softmax * sum(g) adds its V - 1 additions and carries the error twice (g itself,
    and softmax * the error of sum(g)); the chain rule through z / T divides by T. First order, as llama_chain."""
    return 2 * divergence_bound(vocab, max_abs_logit, magnitude + 1, weight=weight, mix=mix, terms=2 * vocab,
                                u=u) / temperature
