"""Batched sampling with a KV cache, and the token layout every state batch shares.

Layout: prompts are left-padded to a common width P; responses start at column P and are
right-padded. `attention_mask` marks real tokens, `response_mask` the response tokens (EOS included).
Position ids come from the attention mask, so left padding does not shift positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from kltd.fast.lean_decoder import LeanDecoder


@dataclass
class Responses:
    tokens: Tensor  # [B, N] long, pad after the end
    mask: Tensor  # [B, N] bool, True for real response tokens (EOS included)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, L] 0/1 mask -> [B, L] positions counting real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token lists -> left-padded ids [B, P] and mask [B, P]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids [B, P] and mask [B, P]."""
    return left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts], tokenizer.pad_token_id, device)


def encode_responses(tokenizer, texts: list[str], device) -> Responses:
    """Right-padded response ids with EOS appended, as a dataset supplies them."""
    rows = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    return pad_responses(rows, tokenizer.pad_token_id, device)


def pad_responses(rows: list[list[int]], pad_id: int, device) -> Responses:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return Responses(tokens.to(device), mask.to(device))


def responses_to_lists(responses: Responses) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(responses.tokens, responses.mask)]


def decode_responses(tokenizer, responses: Responses) -> list[str]:
    """Text of each response without EOS or padding."""
    eos = tokenizer.eos_token_id
    return [tokenizer.decode([t for t in row if t != eos]) for row in responses_to_lists(responses)]


@lru_cache(maxsize=None)
def _cache_argument(model_class) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _returned_cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _choose(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    """[B, V] logits -> [B] token ids. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature if temperature != 1 else logits.float(), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest set whose mass reaches top_p (the first token always survives)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return draw_categorical(probs, generator)


def draw_categorical(probs: Tensor, generator=None, block: int = 256) -> Tensor:
    """[B, V] probabilities (rows need not be normalised) -> [B] one draw per row, by inverting the CDF.

    One uniform number per row, where torch.multinomial draws V exponentials per row (at a 32k
    vocabulary those draws were most of the sampling time). Above `block` tokens two levels keep it
    cheap: the CDF over blocks of `block` tokens picks a block, the CDF inside that block picks the
    token. CDFs in float64. A token of zero probability is never drawn.
    """
    rows, vocab = probs.shape
    u = torch.rand((rows, 1), generator=generator, device=probs.device, dtype=torch.float64)
    if vocab <= block:
        cdf = probs.double().cumsum(-1)
        return _invert(cdf, u * cdf[:, -1:]).squeeze(-1)
    blocks = torch.nn.functional.pad(probs, (0, -vocab % block)).view(rows, -1, block)
    block_cdf = blocks.sum(-1).double().cumsum(-1)  # [B, nb]; float32 block sums are 10x cheaper
    target = u * block_cdf[:, -1:]
    b = _invert(block_cdf, target)
    before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
    inside = blocks.gather(1, b.unsqueeze(-1).expand(rows, 1, block)).squeeze(1)  # [B, block]
    return (b * block + _invert(inside.double().cumsum(-1), target - before)).squeeze(-1)


def _invert(cdf: Tensor, target: Tensor) -> Tensor:
    """[B, n] cumulative masses, [B, 1] targets -> [B, 1]: the first index whose mass exceeds the target.

    Rounding can put a target at or past the row's total; the index is then capped at the first one that
    reaches the total, which always carries positive mass.
    """
    total = cdf[:, -1:]
    reaches_total = torch.nextafter(total, torch.zeros_like(total))  # "> this" is ">= total"
    return torch.searchsorted(cdf, torch.cat([target, reaches_total], 1), right=True).amin(1, keepdim=True)


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
    generator: torch.Generator | None = None,
    prefix: Responses | None = None,
    lean: bool = True,
) -> Responses:
    """Sample continuations of left-padded prompts, stopping when every row has produced EOS.

    `prefix` (optional) holds response tokens already written (for example by another model); they
    are fed as given and sampling continues after them, up to `max_new_tokens` response tokens in all.
    Returns the whole response (prefix included). One decoding step per new token, with a KV cache;
    rows that have ended are fed padding, masked out. `lean=False` forces the model's own forward.
    """
    with torch.inference_mode():
        out = _sample(decoder_for(model, lean), prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature,
                      top_p, generator, prefix)
    # plain tensors again: the states feed the autograd-tracked loss
    return Responses(out.tokens.clone(), out.mask.clone())


# Drop ended rows from the decoder once this share or fewer of its rows are still writing: every later step
# then computes only the live rows (responses differ in length, so late steps are mostly ended rows).
COMPACT_BELOW = 0.75


def _sample(decoder, prompt_ids, prompt_mask, max_new_tokens, eos_id, pad_id, temperature, top_p, generator, prefix):
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
    if written >= max_new_tokens or bool(finished.all()):
        return Responses(out_tokens[:, :written], out_mask[:, :written])
    positions = position_ids_from_mask(context_mask)
    logits = decoder.start(context, context_mask, positions, context.shape[1] + max_new_tokens - written)
    # rows whose prompt is empty of real context still start at position 0
    next_pos = torch.where(context_mask.sum(-1) > 0, positions.max(-1).values + 1, 0)
    rows = None  # the original row of each row the decoder still runs; None: all of them, in order
    while True:
        token = _choose(logits, temperature, top_p, generator)
        alive = ~finished
        token = torch.where(alive, token, pad_id)
        if rows is None:
            out_tokens[:, written], out_mask[:, written] = token, alive
        else:
            out_tokens[rows, written], out_mask[rows, written] = token, alive
        written += 1
        finished = finished | (token == eos_id)
        live = int((~finished).sum())
        if written == max_new_tokens or live == 0:
            return Responses(out_tokens[:, :written], out_mask[:, :written])
        if live <= COMPACT_BELOW * finished.shape[0]:
            keep = (~finished).nonzero().squeeze(1)
            decoder.keep(keep)
            rows = keep if rows is None else rows[keep]
            token, alive, finished, next_pos = token[keep], alive[keep], finished[keep], next_pos[keep]
        logits = decoder.next(token, alive, next_pos)
        next_pos = next_pos + alive.long()
