"""GRPO's policy objective as pure tensor functions: group advantages, the PPO-clipped surrogate, the k3 KL penalty.

Layout as in kltd.objectives.losses: `logprobs[:, t]` = log q(y_t | s_t) of the sampled token at each position
(kltd.objectives.losses.token_logprobs), `mask[:, t]` the response positions, [B, T]. The B rows are consecutive
groups of `group_size` samples of one prompt. q = the policy being trained, sampled on-policy.

Gradients in expectation (per-sequence normalisation, one update per batch so old_logprobs = logprobs):

* policy_loss with advantages A_i gives -(1/B) sum_i A_i grad log q(y_i) exactly (the clip is inactive at
  rho = 1). With baseline "leave_one_out" and scale "none" (RLOO) A_i = r_i - mean of the other G - 1 rows,
  which do not depend on y_i, so the expected gradient is -grad E_q[r]: unbiased. "group_mean" without scaling
  (Dr. GRPO) gives A_i = (G-1)/G times the leave-one-out advantage, sample by sample, hence (G-1)/G times
  -grad E_q[r]: the right direction, shrunk. Scale "std" (GRPO) divides by a statistic of the row's own group
  (its own reward included): the expected gradient is then no longer proportional to grad E_q[r].
* reference_kl_penalty's value estimates KL(q||ref) (per token, hence of the sequences), but its expected
  gradient is grad KL(ref||q) at the states q visits, states held fixed: the FORWARD KL's, not the reverse
  KL's (kltd.objectives.estimators, sampled_k3). It is not the sequence-level KL gradient either (no term for
  the states' dependence on q).

All of it is checked on the enumerable testbed in tests/objectives/test_grpo.py.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kltd.objectives.estimators import sampled_kl
from kltd.objectives.losses import normalize
from kltd.schema.choices import RL_BASELINES, RL_SCALES


def group_advantages(rewards: Tensor, group_size: int, baseline: str = "group_mean", scale: str = "std",
                     eps: float = 1e-6) -> Tensor:
    """[B] rewards -> [B] advantages, rows in consecutive groups of `group_size` samples of one prompt.

    baseline "group_mean": r_i - mean of its group (GRPO); "leave_one_out": r_i - mean of the group's other rows
    (RLOO, unbiased). scale "std": divide by (the group's population std, dividing by G, + eps) (GRPO; TRL's
    sample std divides by G - 1, i.e. advantages sqrt((G-1)/G) times these); "none": no division (Dr. GRPO).
    A group of equal rewards gets 0. Returned detached (a constant of the loss).
    """
    if baseline not in RL_BASELINES:
        raise ValueError(f"baseline {baseline!r}; choose one of {RL_BASELINES}")
    if scale not in RL_SCALES:
        raise ValueError(f"scale {scale!r}; choose one of {RL_SCALES}")
    B = rewards.numel()
    if group_size < 1 or B % group_size:
        raise ValueError(f"a batch of {B} rewards is not a whole number of groups of {group_size}")
    if baseline == "leave_one_out" and group_size < 2:
        raise ValueError("baseline 'leave_one_out' needs group_size >= 2 (a row has no others to average)")
    r = rewards.detach().reshape(-1, group_size)
    mean = r.mean(1, keepdim=True)
    adv = r - mean
    if baseline == "leave_one_out":  # r_i - (G mean - r_i) / (G - 1)
        adv = adv * (group_size / (group_size - 1))
    if scale == "std":
        adv = adv / (r.std(1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    normalization: str = "sequence",
    denominator: Optional[float] = None,
) -> tuple[Tensor, dict]:
    """PPO's clipped surrogate, per token: -min(rho A_i, clip(rho, 1 - clip_low, 1 + clip_high) A_i).

    Args:
        logprobs: [B, T] log q(y_t | s_t) under the current policy (with grad).
        old_logprobs: [B, T] the same under the policy that sampled (treated as a constant).
        advantages: [B] one per row (group_advantages), a constant.
        mask: [B, T] bool; normalization, denominator: see kltd.objectives.losses.normalize.
    Returns:
        (scalar loss, stats): stats["clip_fraction"] = fraction of the masked tokens whose term is clipped (rho
        above 1 + clip_high with A > 0, or below 1 - clip_low with A < 0: zero gradient), stats["ratio_mean"] =
        mean rho over them. Gradient: -sum_t A_i rho_t grad log q(y_t) / denominator over the unclipped tokens;
        on-policy (old_logprobs == logprobs.detach()) every rho is 1 and it is -sum_{i,t} A_i grad log q(y_t) /
        denominator.
    """
    # where before exp: padding may hold inf/NaN, which must not reach the value or (as 0 * NaN) the gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), 0.0)
    rho = log_ratio.exp()
    adv = advantages.detach().to(rho.dtype).unsqueeze(-1)
    per_token = -torch.minimum(rho * adv, rho.clamp(1 - clip_low, 1 + clip_high) * adv)
    with torch.no_grad():
        clipped = ((rho > 1 + clip_high) & (adv > 0)) | ((rho < 1 - clip_low) & (adv < 0))
        n = max(int(mask.sum()), 1)
        stats = {"clip_fraction": int((clipped & mask).sum()) / n, "ratio_mean": rho[mask].sum().item() / n}
    return normalize(per_token, mask, normalization, denominator), stats


def reference_kl_penalty(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    *,
    normalization: str = "sequence",
    denominator: Optional[float] = None,
) -> Tensor:
    """GRPO's KL penalty: k3 = exp(ref - lp) - (ref - lp) - 1 per token, normalised like policy_loss.

    Args:
        logprobs: [B, T] log q of the policy's own sampled tokens (with grad); ref_logprobs: [B, T] the reference
            model's, a constant; mask: [B, T] bool.
    Returns:
        scalar. Value: E_q[k3] = KL(q||ref) per state, so its expectation is the sequence KL(q||ref) (sequence
        normalisation, denominator 1 per row). Gradient per token: (1 - ref/q) grad log q(y_t), whose expectation
        over y_t ~ q is -sum_v ref(v) grad log q(v) = grad KL(ref||q)(s_t): the forward KL's gradient at the
        states q visits, held fixed.
    """
    # where: off-mask -inf/NaN must not reach the gradient as 0 * inf (a NaN reference there only meets the
    # value, which normalize drops)
    lp = torch.where(mask, logprobs, 0.0)
    k3 = sampled_kl(lp, ref_logprobs.detach(), "sampled_k3", "reverse_kl")
    return normalize(k3, mask, normalization, denominator)
