"""A Llama-family model's weights arranged for few, large tensor operations.

For small models most of a forward pass is per-operation overhead, not arithmetic. Arranged once per
use, the same weights need far fewer operations: q, k and v come from one matrix (q's rows pre-scaled by
the attention scale), gate and up from another, each RMS norm's weight is folded into the matrix after
it (so a norm is one vector norm and one division), and q and k are stored with each rotary pair of
features side by side, so the rotary embedding is one complex multiplication. Attention scores are
unchanged by a common permutation of q's and k's features, so outputs equal the model's own forward to
float rounding (tested on Llama, Qwen2 and Qwen3 configurations). The arrangement is differentiable: a
student trains through it and its gradients reach the model's own parameters.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import Tensor

from kltd.matmul import linear, plus_linear

# Architectures whose decoder layer is exactly: x + attn(norm(x)), then x + mlp(norm(x)), with rotary
# embeddings on q and k (and, for Qwen3, a per-head norm on q and k before them).
SUPPORTED = {"llama", "qwen2", "qwen3"}
# Rotary variants whose frequencies do not depend on the sequence length (a table computed once is exact).
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
# Without autograd on a CPU, a layer's work after attention runs on blocks of rows whose MLP intermediate
# ([rows, 2 x intermediate size]) takes about this many bytes per thread, so it is still in cache when the
# activation and the down projection read it (measured on the toy teacher's MLP over 31k rows, one thread:
# 2.6x faster than all rows at once). Autograd keeps its own intermediates, and a GPU has the bandwidth.
CACHE_BLOCK_BYTES = 2**20
# Each block reads the layer's weights after attention (the output projection and the MLP) once more. Without
# blocks the intermediate goes to memory and back about four times its size (gate and up written, the
# activation and the product read and write them, down reads them), so blocks pay only while those weights
# take at most about that many blocks' worth of bytes. Measured on teachers' forwards without autograd, two
# threads, blocked time over whole: the toy's (0.85 MB of such weights, 800 rows) 0.76x, the 32k scale's
# (3.4 MB) 0.88x, SmolLM2-135M's (12 MB) 1.13x, Qwen3-1.7B's (168 MB) 1.56x.
BLOCK_REREAD_LIMIT = 4
# Above this many parameters the weights are used as they are, not copied into the arranged form: the
# copy costs a whole extra set of weights (every step for a student, resident for a teacher), which at the
# toy's size is nothing and buys speed, and at a real model's size is gigabytes.
COPY_LIMIT = 50_000_000


def _rope_type(config) -> str:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def is_sharded(model) -> bool:
    """A model sharded across processes (FSDP2's fully_shard): its parameters are shards, gathered only inside
    the module's own call, so it runs through its own forward. (No model is sharded before torch's FSDP
    module is imported, and importing it costs seconds, so it is looked up, not imported.)"""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


# The linear maps of a block that the arrangement reads as weights
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


def plain_projections(model) -> bool:
    """Whether every projection of every block is a plain torch.nn.Linear. A layer replaced by a wrapper (a LoRA
    adapter adds B A x to its output; a quantised layer stores no float weight) computes something its `weight`
    does not say, and the arrangement, reading weights, would silently drop it."""
    body = getattr(model, "base_model", None)
    for layer in getattr(body, "layers", None) or ():
        for part, names in PROJECTIONS.items():
            block = getattr(layer, part, None)
            if any(type(getattr(block, name, None)) is not torch.nn.Linear for name in names):
                return False
    return True


def family_supported(model) -> bool:
    """The Llama family in a form the arrangement reproduces exactly, whatever its layers are wrapped in."""
    if is_sharded(model):
        return False
    config = getattr(model, "config", None)
    body = getattr(model, "base_model", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED or body is model:
        return False
    if getattr(config, "use_sliding_window", False) or getattr(config, "final_logit_softcapping", None):
        return False
    if getattr(config, "attention_dropout", 0.0) or _rope_type(config) not in STATIC_ROPE:
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types) and hasattr(body, "rotary_emb")


def supports(model) -> bool:
    """Whether kltd's fast paths (the packed forward, the lean decoder) compute exactly what `model` computes."""
    return family_supported(model) and plain_projections(model)


# model -> (weights' identity and versions, LlamaBlocks). Weak: an entry dies with its model (tested).
_reusable: WeakKeyDictionary = WeakKeyDictionary()


def arranged(model, copy: bool | None = None) -> LlamaBlocks:
    """The model's weights arranged; without autograd, reused for as long as no parameter has changed.

    A frozen teacher is arranged once, not at every step (its arranged copy then stays in memory); a
    student's weights change every optimiser step, which bumps their versions, so it is arranged anew.
    With autograd on, the arrangement is part of the graph and always built fresh.
    """
    if torch.is_grad_enabled():
        return LlamaBlocks(model, copy)
    state = (copy, tuple((p.data_ptr(), p._version) for p in model.parameters()))
    cached = _reusable.get(model)
    if cached is None or cached[0] != state:
        cached = _reusable[model] = (state, LlamaBlocks(model, copy))
    return cached[1]


def _pairs_side_by_side(w: Tensor, heads: int, head_dim: int) -> Tensor:
    """Reorder each head's features (rows of w) from [x_0..x_{h-1}, y_0..y_{h-1}] to [x_0, y_0, x_1, y_1, ...]."""
    order = torch.arange(head_dim, device=w.device).view(2, head_dim // 2).t().reshape(-1)
    return w.unflatten(0, (heads, head_dim))[:, order].flatten(0, 1)


@dataclass
class SharedLayer:
    """A layer's own tensors, shared with the model (no copy); q and k keep the model's half-split rotary layout."""

    attn_norm: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    q_bias: Tensor | None
    k_bias: Tensor | None
    v_bias: Tensor | None
    q_norm: Tensor | None  # Qwen3: the model's per-head norms
    k_norm: Tensor | None
    out: Tensor
    mlp_norm: Tensor
    gate: Tensor
    up: Tensor
    down: Tensor


@dataclass
class Layer:
    qkv: Tensor  # [(Hq + 2 Hkv) * d, D], the attention norm's weight folded in
    qkv_bias: Tensor | None
    q_norm: Tensor | None  # Qwen3: per-head norms of q (scale folded in) and k
    k_norm: Tensor | None
    out: Tensor  # [D, Hq * d]
    gate_up: Tensor  # [2 I, D], the MLP norm's weight folded in
    down: Tensor  # [D, I]


class LlamaBlocks:
    """The weights of one Llama-family model, arranged (kltd.fast.arranged.arranged builds or reuses one).

    copy: arrange copies of the weights (fewer, larger operations) or use the model's own tensors as they
    are (no extra memory); None: copies up to COPY_LIMIT parameters. Both give the model's own outputs.
    """

    def __init__(self, model, copy: bool | None = None):
        config, body = model.config, model.base_model
        # never the model itself: the cache below holds arrangements weakly by model, and a reference back
        # to the key would keep every model ever arranged alive for the life of the process
        self.body, self.output_layer = body, model.get_output_embeddings()
        attn = body.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
        self.hidden_size = config.hidden_size
        self.eps = config.rms_norm_eps
        # rms(x) = |x| / sqrt(D) (+ eps): with sqrt(D) folded into the weights, a norm divides by hypot(|x|, c)
        self.root = self.hidden_size**0.5
        self.norm_floor = torch.tensor((self.hidden_size * self.eps) ** 0.5)
        self.scale = scale = getattr(attn, "scaling", self.head_dim**-0.5)
        self.copied = sum(p.numel() for p in model.parameters()) <= COPY_LIMIT if copy is None else copy
        build = self._arrange if self.copied else self._share
        self.layers = [build(layer, scale) for layer in body.layers[: config.num_hidden_layers]]
        # what a block of rows re-reads (BLOCK_REREAD_LIMIT): the output projection and the MLP, one layer's worth
        # (every layer of these families has the same shapes); read on every layer of every decoding step
        first = self.layers[0]
        parts = (first.gate_up, first.down, first.out) if self.copied else (first.gate, first.up, first.down, first.out)
        self.reread_bytes = sum(w.numel() * w.element_size() for w in parts)
        self.final_norm = body.norm.weight
        # the MLP's activation (a plain function where it is SiLU: a module call costs more than the op)
        self.act = F.silu if getattr(config, "hidden_act", None) == "silu" else body.layers[0].mlp.act_fn
        self.head = None  # arranged on first use (only decoding needs logits)

    def _share(self, layer, scale: float) -> SharedLayer:
        a, m = layer.self_attn, layer.mlp
        qk_norm = hasattr(a, "q_norm")
        return SharedLayer(
            attn_norm=layer.input_layernorm.weight, q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight,
            q_bias=a.q_proj.bias, k_bias=a.k_proj.bias, v_bias=a.v_proj.bias,
            q_norm=a.q_norm.weight if qk_norm else None, k_norm=a.k_norm.weight if qk_norm else None,
            out=a.o_proj.weight, mlp_norm=layer.post_attention_layernorm.weight, gate=m.gate_proj.weight,
            up=m.up_proj.weight, down=m.down_proj.weight)

    def _arrange(self, layer, scale: float) -> Layer:
        a, m = layer.self_attn, layer.mlp
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qk_norm = hasattr(a, "q_norm")  # Qwen3: the scale goes on q's norm, applied after the projection
        q_scale = 1.0 if qk_norm else scale
        # (projection, its heads, factor, rotated?): q and k get their rotary pairs side by side
        parts = [(a.q_proj, h, q_scale, True), (a.k_proj, kv, 1.0, True), (a.v_proj, kv, 1.0, False)]

        def arranged(w: Tensor, heads: int, factor: float, rotated: bool) -> Tensor:
            return (_pairs_side_by_side(w, heads, d) if rotated else w) * factor

        bias = None
        if any(p.bias is not None for p, *_ in parts):  # Qwen2: a missing one is zeros
            bias = torch.cat([arranged(p.bias, *rest) if p.bias is not None else p.weight.new_zeros(p.weight.shape[0])
                              for p, *rest in parts])
        return Layer(
            qkv=torch.cat([arranged(p.weight, *rest) for p, *rest in parts]) * (layer.input_layernorm.weight * self.root),
            qkv_bias=bias,
            q_norm=_pairs_side_by_side(a.q_norm.weight, 1, d) * scale if qk_norm else None,
            k_norm=_pairs_side_by_side(a.k_norm.weight, 1, d) if qk_norm else None,
            out=a.o_proj.weight,
            gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]) * (layer.post_attention_layernorm.weight * self.root),
            down=m.down_proj.weight,
        )

    def rotary(self, positions: Tensor) -> Tensor:
        """Complex rotations [..., d/2] for integer positions of any shape (the model's own rotary module)."""
        top = int(positions.max()) + 1 if positions.numel() else 1
        anchor = self.final_norm.detach()[:1]  # carries dtype and device only
        cos, sin = self.body.rotary_emb(anchor, torch.arange(top, device=positions.device)[None])
        half = self.head_dim // 2
        table = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float())
        return table[positions]

    def norm(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    def normed_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """norm(x) @ W^T for a weight arranged with its norm folded in."""
        rms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).hypot(self.norm_floor)
        # divide the input, not the (wider) output: the division and its backward cost less
        return linear(x / (rms if x.dtype == torch.float32 else rms.to(x.dtype)), weight)

    def _shared_qkv(self, layer: SharedLayer, hidden: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.norm(hidden, layer.attn_norm)
        q = linear(x, layer.q, layer.q_bias).unflatten(-1, (self.heads, self.head_dim))
        k = linear(x, layer.k, layer.k_bias).unflatten(-1, (self.kv_heads, self.head_dim))
        v = linear(x, layer.v, layer.v_bias).unflatten(-1, (self.kv_heads, self.head_dim))
        if layer.q_norm is not None:
            q, k = self.norm(q, layer.q_norm), self.norm(k, layer.k_norm)
        cos, sin = rotations.real.unsqueeze(-2), rotations.imag.unsqueeze(-2)

        def turn(x: Tensor) -> Tensor:  # the model's own layout: feature i pairs with feature i + d/2
            first, second = x.float().chunk(2, -1)
            return torch.cat([first * cos - second * sin, second * cos + first * sin], -1).to(x.dtype)

        return turn(q) * self.scale, turn(k), v

    def qkv(self, layer: Layer | SharedLayer, hidden: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """hidden [..., D], rotations [..., d/2] -> q [..., Hq, d] (scaled), k and v [..., Hkv, d]."""
        if not self.copied:
            return self._shared_qkv(layer, hidden, rotations)
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        x = self.normed_linear(hidden, layer.qkv)
        if layer.qkv_bias is not None:
            x = x + layer.qkv_bias
        x = x.unflatten(-1, (h + 2 * kv, d))
        qk, v = x[..., : h + kv, :], x[..., h + kv :, :]
        if layer.q_norm is not None:
            qk = torch.cat([self.norm(qk[..., :h, :], layer.q_norm), self.norm(qk[..., h:, :], layer.k_norm)], -2)
        wide = x.dtype == torch.float32  # the rotation is done in float32 (complex64)
        turned = torch.view_as_complex((qk if wide else qk.float()).unflatten(-1, (d // 2, 2))) * rotations.unsqueeze(-2)
        qk = torch.view_as_real(turned).flatten(-2)
        qk = qk if wide else qk.to(x.dtype)
        return qk[..., :h, :], qk[..., h:, :], v

    def attention_out(self, layer: Layer, hidden: Tensor, attended: Tensor) -> Tensor:
        """The residual stream after the attention output projection: hidden + attended @ W_o^T."""
        return plus_linear(hidden, attended, layer.out)

    def mlp(self, layer: Layer | SharedLayer, hidden: Tensor) -> Tensor:
        if self.copied:
            gate, up = self.normed_linear(hidden, layer.gate_up).chunk(2, -1)
        else:
            x = self.norm(hidden, layer.mlp_norm)
            gate, up = linear(x, layer.gate), linear(x, layer.up)
        if torch.is_grad_enabled():  # autograd keeps gate and up for the backward pass
            return plus_linear(hidden, self.act(gate) * up, layer.down)
        # no copies: the activation and the product are written over gate (a fresh tensor, read by nothing else)
        active = F.silu(gate, inplace=True) if self.act is F.silu else self.act(gate)
        return plus_linear(hidden, active.mul_(up), layer.down)

    def after_attention(self, layer: Layer | SharedLayer, hidden: Tensor, attended: Tensor) -> Tensor:
        """A decoder layer's second half on [N, D] rows: the attention output projection and the MLP, both
        residual. A block of rows at a time where CACHE_BLOCK_BYTES and BLOCK_REREAD_LIMIT say so; each row's result
        is the same."""
        rows = self._block_rows(layer, hidden)
        if rows >= hidden.shape[0]:
            return self.mlp(layer, self.attention_out(layer, hidden, attended))
        out = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            out[part] = self.mlp(layer, self.attention_out(layer, hidden[part], attended[part]))
        return out

    def _block_rows(self, layer: Layer | SharedLayer, hidden: Tensor) -> int:
        if torch.is_grad_enabled() or hidden.device.type != "cpu" or hidden.dim() != 2:
            return hidden.shape[0]
        budget = CACHE_BLOCK_BYTES * torch.get_num_threads()
        if self.reread_bytes > BLOCK_REREAD_LIMIT * budget:
            return hidden.shape[0]
        width = layer.gate_up.shape[0] if self.copied else 2 * layer.gate.shape[0]
        return max(1, budget // (width * hidden.element_size()))

    def final_hidden(self, hidden: Tensor) -> Tensor:
        return self.norm(hidden, self.final_norm)

    def logits(self, hidden: Tensor) -> Tensor:
        """Logits from last-layer hidden states [B, D]; needs a plain (bias-free) output layer or takes the module."""
        out = self.output_layer
        if type(out) is not torch.nn.Linear:
            return out(self.final_hidden(hidden))
        if out.bias is not None or not self.copied:
            return linear(self.final_hidden(hidden), out.weight, out.bias)
        if self.head is None:
            self.head = out.weight * (self.final_norm * self.root)
        return self.normed_linear(hidden, self.head)
