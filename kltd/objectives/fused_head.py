"""Divergence losses computed from hidden states, chunk by chunk, so no [B, T, V] logits tensor exists.

The student's and the teacher's logits are formed for a chunk of positions at a time (hidden @ W^T),
the divergence and its gradient with respect to the student's hidden states and output matrix are taken
there and then, and the chunk's logits are dropped. Peak memory is one chunk of logits per model plus the
gradient of the output matrix, instead of two [B, T, V] logits tensors, a [B, T, V] gradient buffer and
whatever the divergence keeps for backward.

Used by the trainer for the exact trajectory loss when the model's output layer is a plain linear map
(no bias, no logit soft-capping); the unfused path (kltd.objectives.losses) is the reference it is tested against.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kltd.matmul import linear
from kltd.objectives.divergences import DivergenceSpec, kl_weights, log_probs, token_divergence
from kltd.objectives.tied_gradient import GradientHandoff

# Positions per chunk: about this many logits (float32) per model at a time,
CHUNK_LOGITS = 2**22
# but at least 1/CHUNK_WIDTH_DIVISOR of the model's width: every chunk reads the [V, H] output matrix three times
# (logits, both gradients) and adds to its gradient once, so at a large vocabulary few rows a chunk leave the
# products waiting on memory (a Qwen3-0.6B-shaped head, 151,936 x 1,024, over 256 rows: 27-row chunks took 1.5x
# the time of 128-row ones). At H/8 rows a chunk's few [rows, V] tensors are about half the output matrix's
# size, which its gradient costs anyway; at SmolLM2's and the smaller shapes CHUNK_LOGITS gives more rows.
CHUNK_WIDTH_DIVISOR = 8


def plain_output_layer(model) -> torch.nn.Linear | None:
    """The model's output layer if its logits are exactly hidden @ W^T, else None."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


def kl_and_gradient(logits: Tensor, teacher_logits: Tensor, spec: DivergenceSpec, weights: tuple[float, float],
                    row_weights: Tensor) -> tuple[Tensor, Tensor] | None:
    """Per-row D [m], and the gradient of sum_i row_weights[i] D_i in the student's logits [m, V], without autograd.

    With q = softmax(z / T), p = softmax(y / T): d KL(p||q)/dz = (q - p) / T and
    d KL(q||p)/dz = q (log q - log p - KL(q||p)) / T. The values are computed as token_divergence computes
    them. `logits` (the caller's own chunk) is overwritten; the teacher's are not (they may be a cache's).
    Each [m, V] tensor is written over once it is no longer needed, so besides the teacher's at most three
    exist at once (at a large vocabulary they were the forward pass's memory peak). None where a value is
    not finite (a teacher probability of exactly 0 under reverse KL, a -inf logit): the caller then takes
    autograd's path.
    """
    forward, reverse = weights
    log_q = _log_softmax_over(logits, spec.temperature)
    log_p = log_probs(teacher_logits, spec.temperature)  # a new tensor: ours to overwrite
    p = log_p.exp() if forward else None
    diff = log_p.neg_().add_(log_q)  # log q - log p
    q = log_q.exp_()
    value = -forward * _row_dot(p, diff) if forward else 0.0  # KL(p||q) = sum p (log p - log q)
    grad = None
    if reverse:
        kl = _row_dot(q, diff)
        value = value + reverse * kl
        grad = diff.sub_(kl[:, None]).mul_(q)
        if reverse != 1.0:
            grad.mul_(reverse)
    if forward:
        q_minus_p = q.sub_(p)
        grad = q_minus_p.mul_(forward) if grad is None else grad.add_(q_minus_p, alpha=forward)
    if not bool(torch.isfinite(value).all()):
        return None
    return value, grad.mul_((row_weights / spec.temperature)[:, None].to(grad.dtype))


def _log_softmax_over(logits: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / T), written over `logits` where it is at least float32 (else a float32 copy)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        return log_probs(logits, temperature)
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """[m] row-wise dot products of two [m, V] tensors, without an [m, V] product in between."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


class _FusedDivergence(torch.autograd.Function):
    """sum_i w_i D(p_i, softmax(h_i W^T)) over rows i, with the gradient formed chunk by chunk in forward.

    For the KLs and their mix the gradient in a chunk's logits is written down (kl_and_gradient); any other
    divergence gets it from autograd, whose graph passes over [chunk, V] several times more: at a 32k
    vocabulary the written-down form took 0.86x autograd's time for this loss and its backward (one thread).
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_rows, row_weights, spec, chunk, handoff):
        grad_hidden = torch.zeros_like(hidden)
        whole = handoff.gradient_buffer(weight) if handoff is not None else None  # a tied embedding's [V, H]
        grad_weight = torch.zeros_like(weight) if whole is None else whole[: weight.shape[0]]
        total = hidden.new_zeros((), dtype=torch.float32)
        w = weight.detach()
        kl = kl_weights(spec)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h, teacher, chunk_weights = hidden[rows].detach(), teacher_rows(rows), row_weights[rows]
            found = kl_and_gradient(linear(h, w), teacher, spec, kl, chunk_weights) if kl else None
            if found is not None:
                per_row, g_logits = found
                value = (per_row * chunk_weights).sum()
                g_logits = g_logits.to(h.dtype)
                torch.mm(g_logits, w, out=grad_hidden[rows])
                # in place: a [V, H] product per chunk beside the running sum was the loss's memory peak
                grad_weight.addmm_(g_logits.T, h)
            else:
                value, g_h, g_w = _by_autograd(h, w, teacher, chunk_weights, spec)
                grad_hidden[rows] = g_h
                grad_weight += g_w
            total += value.detach().float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.handoff, ctx.whole = (handoff, whole) if whole is not None else (None, None)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        unscaled = grad_out.numel() == 1 and float(grad_out) == 1.0  # the usual case: no second [V, H] tensor
        if ctx.handoff is not None:  # the tied embedding's lookup adds its rows into the whole [V, H] and returns it
            ctx.handoff.grad = ctx.whole if unscaled else ctx.whole * grad_out
            ctx.whole = grad_weight = None
        elif not unscaled:
            grad_weight = grad_weight * grad_out
        return grad_hidden if unscaled else grad_hidden * grad_out, grad_weight, None, None, None, None, None


def _by_autograd(hidden: Tensor, weight: Tensor, teacher: Tensor, row_weights: Tensor, spec: DivergenceSpec
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """A chunk's weighted divergence and its gradients in the hidden states and the output matrix, by autograd."""
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    with torch.enable_grad():
        value = (token_divergence(h @ w.T, teacher, spec) * row_weights).sum()
        g_h, g_w = torch.autograd.grad(value, (h, w))
    return value, g_h, g_w


def fused_divergence(hidden: Tensor, weight: Tensor, teacher_rows: Callable[[slice], Tensor], row_weights: Tensor,
                     spec: DivergenceSpec, chunk: int | None = None, handoff: GradientHandoff | None = None) -> Tensor:
    """Weighted sum of per-position divergences from student hidden states.

    Args:
        hidden: [M, H] student hidden states at the supervised positions (requires grad).
        weight: [V, H] the student's output matrix (a parameter).
        teacher_rows: slice -> [m, V] the teacher's logits for those rows (no grad).
        row_weights: [M] per-position weights (the mask divided by the normaliser).
        spec: the divergence.
        handoff: where the student's tied embedding was looked up through one (kltd.objectives.tied_gradient),
            the output matrix's gradient goes to that lookup instead of beside its own.
    Returns:
        scalar sum_i row_weights[i] * D(p_i, q_i); its gradient reaches `hidden` and `weight`.
    """
    chunk = chunk or max(1, CHUNK_LOGITS // weight.shape[0], weight.shape[1] // CHUNK_WIDTH_DIVISOR)
    return _FusedDivergence.apply(hidden, weight, teacher_rows, row_weights.detach().float(), spec, chunk, handoff)
