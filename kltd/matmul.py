"""Products with a weight matrix, x @ W^T, in the form this CPU computes fastest for the rows at hand.

Without autograd on a CPU, x @ W^T for at most FEW_ROWS rows runs as (W @ x^T)^T: the same products, but
MKL's kernel for a few rows against a transposed weight ran 1.2-5x slower than its kernel for a wide matrix
against a few columns (decoding and the fused head at the SmolLM2-135M shape, 4 to 256 rows, 2 cores;
docs/performance.md). With autograd, on a GPU, or for more rows, it is F.linear itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

FEW_ROWS = 256


def few_rows(x: Tensor) -> bool:
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() <= FEW_ROWS * x.shape[-1]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), row-major, in the faster form for a few rows (see the module's docstring)."""
    if not few_rows(x):
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(-1, x.shape[-1]).t()).t().contiguous()  # row-major like F.linear's (complex views need it)
    out = out if bias is None else out.add_(bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def plus_linear(residual: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """residual + x @ W^T: one addmm, or for a few rows the faster product then the sum."""
    if few_rows(x):
        return residual + (weight @ x.flatten(0, -2).t()).t().view_as(residual)
    return torch.addmm(residual.flatten(0, -2), x.flatten(0, -2), weight.t()).view_as(residual)
