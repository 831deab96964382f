"""Token-by-token decoding for Llama-family models with a preallocated KV cache and no per-call framework overhead.

A Hugging Face forward call builds a 4-D mask, grows a dynamic cache by concatenation and wraps its
outputs for every new token; for small models that bookkeeping costs more than the arithmetic. This
decoder runs the same modules (embedding, norms, projections, MLP, rotary embedding, output layer) on the
model's own weights, writes keys and values into a cache allocated once, and attends with one
scaled-dot-product call per layer. Its logits equal the Hugging Face forward's to float rounding (tested
on Llama, Qwen2 and Qwen3 configurations); any other architecture uses the plain forward instead.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

# Architectures whose decoder layer is exactly: x + attn(norm(x)), then x + mlp(norm(x)), with rotary
# embeddings on q and k (and, for Qwen3, a per-head norm on q and k before them).
SUPPORTED = {"llama", "qwen2", "qwen3"}


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class LeanDecoder:
    """Prefill a left-padded context, then feed one token per row per step; returns last-position logits."""

    def __init__(self, model):
        self.model, self.body, config = model, model.base_model, model.config
        self.layers = list(self.body.layers[: config.num_hidden_layers])
        attn = self.layers[0].self_attn
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = getattr(attn, "scaling", self.head_dim**-0.5)  # older transformers: the default

    @staticmethod
    def supports(model) -> bool:
        config = getattr(model, "config", None)
        body = getattr(model, "base_model", None)
        if config is None or getattr(config, "model_type", None) not in SUPPORTED or body is model:
            return False
        if getattr(config, "use_sliding_window", False) or getattr(config, "final_logit_softcapping", None):
            return False
        layer_types = getattr(config, "layer_types", None) or []
        return all(t == "full_attention" for t in layer_types) and hasattr(body, "rotary_emb")

    def start(self, ids: Tensor, mask: Tensor, positions: Tensor, capacity: int) -> Tensor:
        """Prefill [B, P] tokens (mask: real tokens) into a cache of `capacity` columns; [B, V] logits at the end."""
        batch, width = ids.shape
        dtype, device = self.body.embed_tokens.weight.dtype, ids.device
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in self.layers]
        self.valid = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.valid[:, :width] = mask.bool()
        self.width = width
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        # a padding query sees only itself, so no row of the mask is empty (its output is never used)
        allowed = (causal & self.valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)
        return self._forward(ids, positions, allowed.unsqueeze(1), 0)

    def next(self, token: Tensor, alive: Tensor, position: Tensor) -> Tensor:
        """Feed one token per row ([B]); rows that have ended (alive False) are masked out of later steps."""
        column = self.width
        self.valid[:, column] = alive
        self.width += 1
        allowed = self.valid[:, None, None, : self.width] | ~alive[:, None, None, None]
        return self._forward(token.unsqueeze(1), position.unsqueeze(1), allowed, column)

    def _forward(self, ids: Tensor, positions: Tensor, allowed: Tensor, column: int) -> Tensor:
        hidden = self.body.embed_tokens(ids)
        cos, sin = self.body.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        end = column + ids.shape[1]
        groups = self.heads // self.kv_heads
        for layer, keys, values in zip(self.layers, self.keys, self.values):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).unflatten(-1, (self.heads, self.head_dim))
            k = attn.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            keys[:, :, column:end] = _rotary(k.transpose(1, 2), cos, sin)
            values[:, :, column:end] = attn.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim)).transpose(1, 2)
            out = scaled_dot_product_attention(
                _rotary(q.transpose(1, 2), cos, sin), keys[:, :, :end], values[:, :, :end], attn_mask=allowed,
                scale=self.scaling, enable_gqa=groups > 1,
            )
            hidden = hidden + attn.o_proj(out.transpose(1, 2).flatten(2))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.get_output_embeddings()(self.body.norm(hidden[:, -1]))
