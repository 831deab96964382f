"""The context for passes that need no gradient."""

from __future__ import annotations

import torch

from kltd.fast.arranged import is_sharded  # also the train layer's test (it may not import kltd.fast)


def without_grad(*models):
    """inference_mode (the cheapest), or no_grad when a model is sharded: FSDP2 reuses the buffers it gathers
    weights into for training, and a tensor made in inference mode cannot be written outside it."""
    return torch.no_grad() if any(is_sharded(m) for m in models) else torch.inference_mode()
