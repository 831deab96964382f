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

from kltd.objectives.divergences import DivergenceSpec, token_divergence

# Positions per chunk: about this many logits (float32) per model at a time.
CHUNK_LOGITS = 2**22


def plain_output_layer(model) -> torch.nn.Linear | None:
    """The model's output layer if its logits are exactly hidden @ W^T, else None."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


class _FusedDivergence(torch.autograd.Function):
    """sum_i w_i D(p_i, softmax(h_i W^T)) over rows i, with the gradient formed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_rows, row_weights, spec, chunk):
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = hidden.new_zeros((), dtype=torch.float32)
        w = weight.detach().requires_grad_(True)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                value = (token_divergence(h @ w.T, teacher_rows(rows), spec) * row_weights[rows]).sum()
                g_h, g_w = torch.autograd.grad(value, (h, w))
            grad_hidden[rows] = g_h
            grad_weight += g_w
            total += value.detach().float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None, None, None


def fused_divergence(hidden: Tensor, weight: Tensor, teacher_rows: Callable[[slice], Tensor], row_weights: Tensor,
                     spec: DivergenceSpec, chunk: int | None = None) -> Tensor:
    """Weighted sum of per-position divergences from student hidden states.

    Args:
        hidden: [M, H] student hidden states at the supervised positions (requires grad).
        weight: [V, H] the student's output matrix (a parameter).
        teacher_rows: slice -> [m, V] the teacher's logits for those rows (no grad).
        row_weights: [M] per-position weights (the mask divided by the normaliser).
        spec: the divergence.
    Returns:
        scalar sum_i row_weights[i] * D(p_i, q_i); its gradient reaches `hidden` and `weight`.
    """
    chunk = chunk or max(1, CHUNK_LOGITS // weight.shape[0])
    return _FusedDivergence.apply(hidden, weight, teacher_rows, row_weights.detach().float(), spec, chunk)
