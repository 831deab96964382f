"""Products with a weight matrix, x @ W^T, in the form this CPU computes fastest for the rows at hand.

Without autograd on a CPU, x @ W^T for a few rows against a large weight runs as (W @ x^T)^T: the same
products, but MKL's kernel for a few rows against a transposed weight ran up to 4x slower than its kernel for
a wide matrix against a few columns. Measured per shape (1 and 2 threads, 7 alternating rounds;
docs/performance.md): at 4 rows the transposed form took 0.26-0.86x F.linear's time for every weight above
LARGE_WEIGHT entries; up to 64 rows 0.51-1.06x; at 128 rows it still won for output layers above
OUTPUT_LAYER entries (0.81-0.95x at 49,152 x 576 and 32,000 x 256) but lost up to 17% at 32,000 x 128, and at
256 rows it lost up to 51%. Below LARGE_WEIGHT (the toy shapes' 64- to 256-wide layers) it lost 10-130% at
any row count. Everything else, autograd and GPUs included, is F.linear itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LARGE_WEIGHT = 2**18  # 512 x 512; the smallest real-shape matrix, SmolLM2-135M's 576 x 576, is above it
FEW_ROWS = 64
OUTPUT_LAYER = 2**22  # above it (32,000 x 256 and larger) the transposed form still wins at 128 rows
FEW_ROWS_OUTPUT_LAYER = 128


def transposed_is_faster(x: Tensor, weight: Tensor) -> bool:
    if x.device.type != "cpu" or torch.is_grad_enabled() or weight.numel() <= LARGE_WEIGHT:
        return False
    few = FEW_ROWS_OUTPUT_LAYER if weight.numel() > OUTPUT_LAYER else FEW_ROWS
    return x.numel() <= few * x.shape[-1]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), row-major, in the faster form for a few rows (see the module's docstring)."""
    if not transposed_is_faster(x, weight):
        return F.linear(x, weight, bias)
    out = (weight @ x.reshape(-1, x.shape[-1]).t()).t().contiguous()  # row-major like F.linear's (complex views need it)
    out = out if bias is None else out.add_(bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def plus_linear(residual: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """residual + x @ W^T: one addmm, or for a few rows the faster product then the sum."""
    if transposed_is_faster(x, weight):
        return residual + (weight @ x.flatten(0, -2).t()).t().view_as(residual)
    return torch.addmm(residual.flatten(0, -2), x.flatten(0, -2), weight.t()).view_as(residual)
