"""Batched sampling with a KV cache: draw responses from a model, row by row until each ends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from kltd.objectives.divergences import nucleus
from kltd.rollout.batch import Responses, position_ids_from_mask
from kltd.rollout.decoders import Lockstep, decoder_for
from kltd.rollout.grad_free import without_grad
from kltd.rollout.noise import RowNoise


def _choose(logits: Tensor, temperature: float, top_p: float, generator, u: Tensor | None = None) -> Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 is greedy. u: [B, 1] uniforms (else drawn from generator)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature if temperature != 1 else logits.float(), dim=-1)
    if top_p < 1.0:  # the nucleus rule the prefix term's score function uses too
        probs = probs.masked_fill(~nucleus(probs, top_p), 0.0)
    return draw_categorical(probs, generator, u=u)


def draw_categorical(probs: Tensor, generator=None, block: int = 256, u: Tensor | None = None) -> Tensor:
    """[B, V] probabilities (rows need not be normalised) -> [B] one draw per row, by inverting the CDF.

    One uniform number per row (`u`, [B, 1] float64, else drawn from `generator`), where torch.multinomial
    draws V exponentials per row (at a 32k vocabulary those draws were most of the sampling time). Above
    `block` tokens two levels keep it cheap: the CDF over blocks of `block` tokens picks a block, the CDF
    inside that block picks the token. CDFs in float64. A token of zero probability is never drawn.
    """
    rows, vocab = probs.shape
    if u is None:
        u = torch.rand((rows, 1), generator=generator, device=probs.device, dtype=torch.float64)
    if vocab <= block:
        cdf = probs.double().cumsum(-1)
        _check_mass(cdf[:, -1])
        return _invert(cdf, u * cdf[:, -1:]).squeeze(-1)
    blocks = torch.nn.functional.pad(probs, (0, -vocab % block)).view(rows, -1, block)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # [B, nb]; float32 block sums are 10x cheaper
    _check_mass(block_cdf[:, -1])
    target = u * block_cdf[:, -1:]
    b = _invert(block_cdf, target)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = blocks.gather(1, b.unsqueeze(-1).expand(rows, 1, block)).squeeze(1)  # [B, block]
    return (b * block + _invert(inside.double().cumsum(-1), target - before)).squeeze(-1)


def _check_mass(total: Tensor) -> None:
    """A distribution with NaN or infinite mass (a model whose weights diverged) cannot be sampled."""
    if not bool(torch.isfinite(total).all()):
        raise FloatingPointError("the next-token distribution holds NaN or infinite values")


def _invert(cdf: Tensor, target: Tensor) -> Tensor:
    """[B, n] cumulative masses, [B, 1] targets -> [B, 1]: the first index whose mass exceeds the target.

    Rounding can put a target at or past the row's total; the index is then capped at the first one that
    reaches the total, which always carries positive mass.
    """
    total = cdf[:, -1:]
    reaches_total = torch.nextafter(total, torch.zeros_like(total))  # "> this" is ">= total"
    return torch.searchsorted(cdf, torch.cat([target, reaches_total], 1), right=True).amin(1, keepdim=True)


def sample(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | RowNoise | None = None,
    prefix: Responses | None = None,
    lean: bool = True,
    vocab: int | None = None,
    lockstep: Callable[[bool], bool] | None = None,
    keep_logits: bool = False,
) -> Responses:
    """Sample continuations of left-padded prompts, stopping when every row has produced EOS.

    `generator`: a torch.Generator, or RowNoise (each row's draw at response position t is column t of
    its own stream, whatever else is in the batch). `prefix` (optional) holds response tokens already written (for example by another model); they
    are fed as given and sampling continues after them, up to `max_new_tokens` response tokens in all.
    Returns the whole response (prefix included). One decoding step per new token, with a KV cache;
    rows that have ended are fed padding, masked out. `lean=False` forces the model's own forward.
    `lockstep(needs_pass) -> any process needs one` keeps a model sharded across processes decoding in step
    (kltd.rollout.decoders.Lockstep). `keep_logits`: also return the logits each token was drawn from
    (Responses.logits, the first `vocab` ids; not with a `prefix`, whose logits are never computed).
    """
    if keep_logits and prefix is not None:
        raise ValueError("keep_logits needs a response written from scratch: a prefix's logits are not computed")
    decoder = decoder_for(model, lean)
    if lockstep is not None:
        decoder = Lockstep(decoder, model, lockstep)
    with without_grad(model):
        out = _sample(decoder, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_p, generator,
                      prefix, vocab, keep_logits)
        if lockstep is not None:
            decoder.drain()
    # plain tensors again: the states feed the autograd-tracked loss
    return Responses(out.tokens.clone(), out.mask.clone(), None if out.logits is None else out.logits.clone())


# Drop ended rows from the decoder once this share or fewer of its rows are still writing: every later step
# then computes only the live rows (responses differ in length, so late steps are mostly ended rows).
COMPACT_BELOW = 0.75


def _sample(decoder, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_p, generator, prefix,
            vocab, keep_logits=False):
    batch = prompt_ids.shape[0]
    device = prompt_ids.device
    mask = prompt_mask.long()
    out_tokens = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
    written = 0
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    context, context_mask = prompt_ids, mask
    if prefix is not None and prefix.tokens.shape[1] > 0:
        # a prefix ends early for a row that already emitted EOS inside it
        context = torch.cat([prompt_ids, prefix.tokens], 1)
        context_mask = torch.cat([mask, prefix.mask.long()], 1)
        written = min(prefix.tokens.shape[1], max_new_tokens)
        out_tokens[:, :written], out_mask[:, :written] = prefix.tokens[:, :written], prefix.mask[:, :written]
        finished = ((prefix.tokens == eos_id) & prefix.mask).any(1)
        if bool((~prefix.mask.all(1) & ~finished).any()):  # new tokens go after the last column, for every row
            raise ValueError("a sampling prefix must fill every column of a row that has not ended (equal lengths)")
    if written >= max_new_tokens or bool(finished.all()):
        return Responses(out_tokens[:, :written], out_mask[:, :written])
    table = generator.uniforms(max_new_tokens, device) if isinstance(generator, RowNoise) and temperature > 0 else None
    positions = position_ids_from_mask(context_mask)
    logits = decoder.start(context, context_mask, positions, context.shape[1] + max_new_tokens - written)
    # rows whose prompt is empty of real context still start at position 0
    next_pos = torch.where(context_mask.sum(-1) > 0, positions.max(-1).values + 1, 0)
    kept = None
    if keep_logits:  # zeros past a row's end
        kept = logits.new_zeros((batch, max_new_tokens, logits[:, :vocab].shape[-1]))
    rows = None  # the original row of each row the decoder still runs; None: all of them, in order
    while True:
        u = None if table is None else (table if rows is None else table[rows])[:, written : written + 1]
        token = _choose(logits[:, :vocab], temperature, top_p, generator, u)
        alive = ~finished
        token = torch.where(alive, token, pad_id)
        if rows is None:
            out_tokens[:, written], out_mask[:, written] = token, alive
        else:
            out_tokens[rows, written], out_mask[rows, written] = token, alive
        if kept is not None:
            kept[slice(None) if rows is None else rows, written] = logits[:, :vocab]
        written += 1
        finished = finished | (token == eos_id)
        live = int((~finished).sum())
        if written == max_new_tokens or live == 0:
            return Responses(out_tokens[:, :written], out_mask[:, :written], None if kept is None else kept[:, :written])
        if live <= COMPACT_BELOW * finished.shape[0]:
            keep = (~finished).nonzero().squeeze(1)
            decoder.keep(keep)
            rows = keep if rows is None else rows[keep]
            token, alive, finished, next_pos = token[keep], alive[keep], finished[keep], next_pos[keep]
        logits = decoder.next(token, alive, next_pos)
        next_pos = next_pos + alive.long()


class StateSampler(Protocol):
    """What the trainer asks of whatever draws its states: kltd's `Sampler`, or a vLLM engine
    (kltd.rollout.vllm_sampler.VllmSampler). The execution plan (kltd.rollout.plan) says which one a job uses."""

    max_new_tokens: int

    def __call__(self, prompt_ids: Tensor, prompt_mask: Tensor, generator, prefix: Responses | None = None
                 ) -> Responses: ...

    def push_weights(self, model: torch.nn.Module, step: int) -> None:
        """The model's weights as of optimiser step `step` are the ones to sample from from now on."""

    def staleness(self, step: int) -> int | None:
        """Optimiser steps between the weights it samples from and the model's at `step`; None: always current."""

    def close(self) -> None:
        """Stop what it started outside PyTorch."""


@dataclass
class Sampler:
    """Everything needed to draw responses from one model. A model on another device than the prompts (a
    teacher on its own GPU) samples there; the responses come back on the prompts' device. It samples from
    the model's live weights, so pushing weights does nothing and it is never stale."""

    model: torch.nn.Module
    tokenizer: object
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    lean: bool = True
    vocab: int | None = None
    lockstep: Callable[[bool], bool] | None = None  # a sharded model's processes decode in step (see sample)
    keep_logits: bool = False  # return the logits each token was drawn from (see sample)

    def __call__(self, prompt_ids, prompt_mask, generator: torch.Generator | RowNoise | None,
                 prefix: Responses | None = None) -> Responses:
        home, device = prompt_ids.device, next(self.model.parameters()).device
        if device != home:
            prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
            prefix = None if prefix is None else Responses(prefix.tokens.to(device), prefix.mask.to(device))
            if isinstance(generator, torch.Generator):  # a stream on the model's device, drawn from the caller's: still reproducible
                seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
                generator = torch.Generator(device=device).manual_seed(seed)
        out = sample(self.model, prompt_ids, prompt_mask, max_new_tokens=self.max_new_tokens,
                     eos_id=self.tokenizer.eos_token_id, pad_id=self.tokenizer.pad_token_id,
                     temperature=self.temperature, top_p=self.top_p, generator=generator, prefix=prefix,
                     lean=self.lean, vocab=self.vocab, lockstep=self.lockstep, keep_logits=self.keep_logits)
        if device == home:
            return out
        return Responses(out.tokens.to(home), out.mask.to(home), None if out.logits is None else out.logits.to(home))

    def push_weights(self, model: torch.nn.Module, step: int) -> None:
        pass

    def staleness(self, step: int) -> int | None:
        return None

    def close(self) -> None:
        pass
