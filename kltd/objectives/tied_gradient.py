"""One [V, H] gradient for a tied input embedding and output matrix, where autograd forms three.

With tied weights the fused head's gradient in the output matrix and the embedding lookup's (a dense [V, H]
tensor from its backward) meet in autograd's buffer for the weight, which sums them into a third tensor (the
head's is still held for backward): three [V, H] tensors at the end of backward, 113 MB each at SmolLM2's
shape, and the training step's memory peak. Here the head forms its gradient in a buffer for the whole
matrix and hands it to the lookup, whose backward adds its rows in place and returns it as the weight's one
gradient. The weight's hooks (data parallelism's among them) see one dense gradient, as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class GradientHandoff:
    """Links one forward's embedding lookup to the fused head that reads the same (tied) weight."""

    def __init__(self):
        self.weight: Tensor | None = None
        self.grad: Tensor | None = None

    def lookup(self, ids: Tensor, weight: Tensor, padding_idx: int | None = None) -> Tensor:
        """F.embedding(ids, weight, padding_idx), whose backward adds into the head's handed-over gradient."""
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.embedding(ids, weight, padding_idx)
        self.weight = weight
        return _Lookup.apply(ids, weight, padding_idx, self)

    def gradient_buffer(self, weight: Tensor) -> Tensor | None:
        """A zeroed gradient for the looked-up matrix where the head's `weight` is it or its first rows (an output
        layer padded beyond the tokenizer's ids is compared on those); else None, and autograd's path."""
        whole = self.weight
        if whole is None or weight.shape[1:] != whole.shape[1:]:
            return None
        if weight is whole or (weight._base is whole and weight.data_ptr() == whole.data_ptr()
                               and weight.is_contiguous()):
            return torch.zeros_like(whole)
        return None


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, handoff):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.handoff, ctx.shape = padding_idx, handoff, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        grad, ctx.handoff.grad = ctx.handoff.grad, None
        if grad is None:  # the head took its own path (or none ran): the lookup's gradient alone
            grad = grad_out.new_zeros(ctx.shape)
        rows = grad_out.reshape(-1, ctx.shape[1])
        ids = ids.reshape(-1)
        if ctx.padding_idx is not None:  # that row gets no gradient from the lookup, as in F.embedding
            keep = ids != ctx.padding_idx
            ids, rows = ids[keep], rows[keep]
        grad.index_add_(0, ids, rows.to(grad.dtype))
        return None, grad, None, None
