"""Token-by-token decoders: the one interface every decoder implements, and the choice between them.

A decoder holds one batch's running state (its KV cache). `start` prefills the prompts and returns the
logits at their last position; `next` feeds one token per row; `keep` drops rows that have ended. The
model's own forward (`ForwardDecoder`) works for any causal LM; kltd.fast.lean_decoder.LeanDecoder is a
faster one for Llama-family models. `decoder_for` is the only place that chooses.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from kltd.fast.lean_decoder import LeanDecoder


@runtime_checkable
class Decoder(Protocol):
    def start(self, ids: Tensor, mask: Tensor, positions: Tensor, capacity: int) -> Tensor:
        """Prefill left-padded prompts [B, P] (mask: real tokens) into a cache with room for `capacity`
        columns in all; returns the [B, V] logits at the last column."""

    def next(self, token: Tensor, alive: Tensor, position: Tensor) -> Tensor:
        """Feed one token per row ([B]) at `position`; rows not `alive` have ended (their outputs are not
        read). Returns [B, V] logits."""

    def keep(self, rows: Tensor) -> None:
        """Go on with these rows only (indices into the current batch)."""


@lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _returned_cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


class ForwardDecoder:
    """Decoding through the model's own forward and cache: works for any causal LM."""

    def __init__(self, model):
        self.model, self.cache_arg = model, _cache_argument(type(model))

    def start(self, ids: Tensor, mask: Tensor, positions: Tensor, capacity: int) -> Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        self.cache, self.mask = _returned_cache(out), mask.long()
        return out.logits[:, -1]

    def next(self, token: Tensor, alive: Tensor, position: Tensor) -> Tensor:
        self.mask = torch.cat([self.mask, alive.long().unsqueeze(1)], 1)
        out = self.model(input_ids=token.unsqueeze(1), attention_mask=self.mask, position_ids=position.unsqueeze(1),
                         use_cache=True, **{self.cache_arg: self.cache})
        self.cache = _returned_cache(out)
        return out.logits[:, -1]

    def keep(self, rows: Tensor) -> None:
        """Go on with these rows only (indices into the current batch)."""
        self.mask = self.mask[rows]
        self.cache.batch_select_indices(rows)


def decoder_for(model, lean: bool = True):
    """The lean decoder where the architecture allows it (much less overhead per token), else the forward."""
    return LeanDecoder(model) if lean and LeanDecoder.supports(model) else ForwardDecoder(model)


class Lockstep:
    """Decoding with a model sharded across processes (FSDP): each forward pass is a collective, so every
    process makes as many as the process that writes longest. `anyone(needs)` tells the others whether this
    process needs another pass and answers whether any process does; one that has finished feeds a
    one-token dummy until none needs one (`drain`)."""

    def __init__(self, decoder, model, anyone):
        self.decoder, self.model, self.anyone = decoder, model, anyone

    def start(self, ids: Tensor, mask: Tensor, positions: Tensor, capacity: int) -> Tensor:
        self.anyone(True)
        return self.decoder.start(ids, mask, positions, capacity)

    def next(self, token: Tensor, alive: Tensor, position: Tensor) -> Tensor:
        self.anyone(True)
        return self.decoder.next(token, alive, position)

    def keep(self, rows: Tensor) -> None:
        self.decoder.keep(rows)

    def drain(self) -> None:
        device = next(self.model.parameters()).device
        while self.anyone(False):
            self.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)
