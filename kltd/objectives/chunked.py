"""Per-position functions of [B, T, V] logits evaluated chunk by chunk under one autograd node.

Nothing of size B x T x V beyond the logits themselves and their gradient is ever held: forward keeps only
the [B, T] result, backward recomputes one chunk of positions at a time. The divergence and token
log-probability losses (kltd.objectives.losses) all go through `chunked_rows`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from kltd.objectives.divergences import DivergenceSpec, token_divergence, topk_token_divergence
from kltd.objectives.topk_teacher import TopKTeacher, topk_teacher_divergence

# Positions per chunk default to about this many vocabulary entries: 64 MiB per float32 temporary, and a chunk
# makes roughly ten of them (upcast, log-softmax, exp, products), so a few hundred MiB at most.
CHUNK_ELEMENTS = 2**24

# ---------------------------------------------------------------------------------------------------------
# Chunked evaluation: one autograd node, recomputed per chunk in backward


class _ChunkedPositions(torch.autograd.Function):
    """out[b, t] = fn(student[b, t], teacher[b, t], extra[b, t]) at the listed positions, 0 elsewhere.

    Forward runs under no_grad chunk by chunk, so nothing of size B x T x V is saved; backward recomputes
    each chunk with autograd and writes its gradient into one preallocated [B, T, V] buffer (which the
    logits' gradient needs anyway). Positions are gathered by index, so a non-contiguous logits view (e.g.
    `logits[:, :-1]`) is never copied whole.
    """

    @staticmethod
    def forward(ctx, fn, positions, chunk, student, teacher, extra):
        out = student.new_zeros(student.shape[:2], dtype=torch.promote_types(student.dtype, torch.float32))
        with torch.no_grad():
            for b, t in _chunks(positions, chunk):
                out[b, t] = fn(student[b, t], _at(teacher, b, t), _at(extra, b, t)).to(out.dtype)
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(positions, student, teacher, extra)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        positions, student, teacher, extra = ctx.saved_tensors
        need_s, need_t = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        grad_s = torch.zeros_like(student) if need_s else None
        grad_t = torch.zeros_like(teacher) if need_t else None
        for b, t in _chunks(positions, ctx.chunk):
            s_rows = student[b, t].detach().requires_grad_(need_s)
            t_rows = None if teacher is None else teacher[b, t].detach().requires_grad_(need_t)
            with torch.enable_grad():
                value = ctx.fn(s_rows, t_rows, _at(extra, b, t))
            wrt = [x for x, need in ((s_rows, need_s), (t_rows, need_t)) if need]
            grads = iter(torch.autograd.grad(value, wrt, grad_out[b, t].to(value.dtype), allow_unused=True))
            for buffer, need in ((grad_s, need_s), (grad_t, need_t)):
                if need:
                    g = next(grads)
                    if g is not None:
                        buffer[b, t] = g.to(buffer.dtype)
        return None, None, None, grad_s, grad_t, None


def _chunks(positions: Tensor, chunk: int):
    for part in positions.split(chunk):
        yield part[:, 0], part[:, 1]


def _at(x: Optional[Tensor], b: Tensor, t: Tensor) -> Optional[Tensor]:
    return None if x is None else x[b, t]


def default_chunk_size(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def chunked_rows(
    fn: Callable[[Tensor, Optional[Tensor], Optional[Tensor]], Tensor],
    student_logits: Tensor,
    teacher_logits: Optional[Tensor],
    mask: Tensor,
    extra: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Apply a per-position function over chunks of the masked positions.

    Args:
        fn: (student [n, V], teacher [n, V] or None, extra [n] or None) -> [n], differentiable.
        student_logits: [B, T, V]; teacher_logits: [B, T, V] or None; mask: [B, T] bool;
        extra: [B, T] per-position data (e.g. target ids) or None.
    Returns:
        [B, T] float (at least float32); exactly 0 where mask is False, with no gradient there.
    """
    positions = mask.nonzero()  # [n, 2] (b, t) pairs
    chunk = chunk_size or default_chunk_size(student_logits.shape[-1])
    return _ChunkedPositions.apply(fn, positions, chunk, student_logits, teacher_logits, extra)


def chunked_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor | TopKTeacher,
    mask: Tensor,
    spec: DivergenceSpec,
    chunk_size: Optional[int] = None,
    top_k: Optional[int] = None,
) -> Tensor:
    """`token_divergence` (or `topk_token_divergence` when top_k is set) over chunks of positions.

    No extra [B, T, V] float tensor (log-softmax, probabilities, mixtures) is held: forward keeps only the
    [B, T] result, backward recomputes one chunk at a time. Values and gradients equal the unchunked form;
    the price is one extra evaluation of the divergence (measured 1.5-2x the unchunked time on CPU).

    Args:
        student_logits: [B, T, V] (q); teacher_logits: [B, T, V] (p), or a teacher known by its top-k tokens
            and tail (kltd.objectives.topk_teacher: the divergence on its k + 1 buckets; top_k is then the
            teacher's own k and this argument is unused); mask: [B, T] bool.
        chunk_size: positions per chunk (default: about 2**24 / V).
    Returns:
        [B, T]; 0 where mask is False.
    """
    if isinstance(teacher_logits, TopKTeacher):
        fn = lambda s, t, _: topk_teacher_divergence(s, t, spec)  # noqa: E731
        return chunked_rows(fn, student_logits, teacher_logits.packed(), mask, chunk_size=chunk_size)
    if top_k is None:
        fn = lambda s, t, _: token_divergence(s, t, spec)  # noqa: E731
    else:
        fn = lambda s, t, _: topk_token_divergence(s, t, spec, top_k)  # noqa: E731
    return chunked_rows(fn, student_logits, teacher_logits, mask, chunk_size=chunk_size)
