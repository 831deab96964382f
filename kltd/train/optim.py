"""The optimiser of both stages: AdamW over the parameters that train, in torch's fused form where it runs.

torch's default AdamW on the CPU updates one tensor at a time and forms temporaries the size of the tensor
(for a tied [vocab, hidden] matrix, 113 MB at SmolLM2-135M's shape); the fused kernel updates each tensor in
place in one pass. On the 10-layer SmolLM2-shaped student (64M parameters) a step's peak above its state went
from 216 MB to 0 and its time to 0.18x (scripts/bench_optimizer.py, docs/performance.md). The two forms compute
the same update and differ in its rounding (about one float32 ulp of a weight a step). A sharded (FSDP) student
keeps the default form: the fused kernel is not checked on its distributed tensors here.

The fused kernel writes the weights without bumping their version counters, which is how kltd's fast path
(kltd.fast.arranged) sees that the student changed; each step therefore bumps them itself.
"""

from __future__ import annotations

import torch

from kltd.train.sharding import is_shard

FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW runs and is tested here (CUDA: untested until a GPU)


def fused_runs(parameters: list[torch.Tensor]) -> bool:
    return bool(parameters) and all(p.device.type in FUSED_DEVICES and p.dtype.is_floating_point and not is_shard(p)
                                    for p in parameters)


def adamw(parameters, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over those of `parameters` that require gradients (a LoRA student's: its adapter only)."""
    trained = [p for p in parameters if p.requires_grad]
    fused = fused_runs(trained)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=weight_decay, fused=True if fused else None)
    if fused:
        optimizer.register_step_post_hook(_changed)
    return optimizer


def _changed(optimizer, args, kwargs) -> None:
    """Mark every updated weight as written (its version counter), as the per-tensor form's writes do."""
    from torch.autograd.graph import increment_version

    increment_version([p for group in optimizer.param_groups for p in group["params"]])
