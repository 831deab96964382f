"""Compute accounting: the model FLOPs a run spends, counted from each model's shape and the tokens it ran.

One forward of one token at context c (the tokens it attends to, itself included) costs

    F(c) = 2 x M  +  2 x 2 x layers x c x (heads x head_dim)

where M is the number of matmul weights a token passes through: the projections and MLP weights of every block
(`ModelShape.non_embedding_params`) plus the output layer (vocab x hidden, counted whether or not it is tied to
the embeddings). The second term is the attention's two context products (scores q.k and the weighted sum of
the values, 2 FLOPs per multiply-add each). This is the matmul part of Chinchilla's count (Hoffmann et al.
2022, appendix F) with causal contexts (token t of a sequence attends to t tokens, not to the whole sequence);
Kaplan et al. (2020) write 2N + 2 n_layer n_ctx d_attn, leaving out the output layer and the value product.
Embedding lookups, norms, biases, rotary embeddings, softmax and activation functions count 0. A backward pass
costs 2 x its forward (Kaplan et al.), so a training forward and backward costs 3 x F per token.

A LoRA student (kltd.train.lora) adds its adapter's weights to M (every token passes through them), and trains
only them: its backward passes the gradient back through each frozen weight once (its input's gradient, not its
own: 1 x that weight's forward), through attention's two context products as before (both operands are
activations: 2 x), and through the adapter as through any trained weight (2 x). The first block's products whose
input is the frozen embedding need no input gradient at all; the count keeps them (a few percent of one block).

A causal forward over a sequence of L tokens (contexts 1 .. L) therefore costs

    L x 2M  +  4 x layers x (heads x head_dim) x L (L + 1) / 2

and decoding with a KV cache reads each token once, at its own context: n tokens sampled after a context of P
tokens cost the prefill of the P context tokens plus one token-forward for each sampled token but the last
(which is never read back), i.e. the causal forward over P + n - 1 tokens.

These are model FLOPs (what MFU counts): what the arithmetic of the models requires for the real tokens, not
what the hardware ran. Padding, rows that have ended but are still in a decoding batch, a gradient
checkpoint's recomputed forward, and the tokens a hand-off's student roll-in wrote past its hand-off point
(discarded) are not counted; the output layer is counted at every position, as a plain forward computes it
(the packed forward and the fused head compute it at the response positions only). Evaluations are not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

FORMULA = ("forward per token at context c: 2 x (block matmul weights + vocab x hidden) "
           "+ 4 x layers x c x heads x head_dim (causal: c = position + 1); backward = 2 x forward "
           "(a LoRA student's: its frozen weights' input gradients only); decoding reads each token once with a KV cache")

# block architectures whose MLP is two matrices (up, down); the others (the Llama family) have three (gate, up,
# down)
UNGATED_MLP = frozenset({"gpt2", "gpt_neo", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi",
                         "starcoder2", "codegen"})


@dataclass(frozen=True)
class ModelShape:
    """What a model's FLOPs depend on, read from its Hugging Face config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int  # rows of the output layer (padded rows included: they are computed)
    non_embedding_params: int  # the matmul weights of the blocks (q, k, v, o and the MLP; no norms or biases)
    tied_head: bool  # the output layer is the embedding matrix (the same FLOPs; fewer parameters)
    adapter: int = 0  # a LoRA adapter's weights (r x (inputs + outputs) per wrapped layer); 0: every weight trains

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        """Llama / Qwen / Mistral-like configs (gated MLP) and GPT-2-like ones (n_embd, n_inner; two-matrix MLP).
        Mixture-of-experts configs are not modelled."""
        hidden = _first(config, "hidden_size", "n_embd", "d_model")
        layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
        heads = _first(config, "num_attention_heads", "n_head")
        kv_heads = _first(config, "num_key_value_heads", "num_kv_heads", default=heads) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        intermediate = _first(config, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
        gated = getattr(config, "model_type", "") not in UNGATED_MLP
        attention = hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden
        mlp = (3 if gated else 2) * hidden * intermediate
        return cls(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                   intermediate=intermediate, vocab=config.vocab_size, non_embedding_params=layers * (attention + mlp),
                   tied_head=bool(getattr(config, "tie_word_embeddings", True)))

    @classmethod
    def of(cls, model) -> "ModelShape":
        """The model's shape; a peft LoRA wrapper's adapter included."""
        adapter = sum(p.numel() for name, p in model.named_parameters() if ".lora_A." in name or ".lora_B." in name)
        return dataclasses.replace(cls.from_config(model.config), adapter=adapter)

    @property
    def matmul_params(self) -> int:
        """The weights one token's forward multiplies by: the blocks', the output layer's and an adapter's."""
        return self.non_embedding_params + self.vocab * self.hidden + self.adapter

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim


def _first(config, *names, default=...):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    if default is ...:
        raise ValueError(f"the model's config has none of {', '.join(names)}: its FLOPs cannot be counted")
    return default


def token_flops(shape: ModelShape, context: int) -> int:
    """One forward of one token that attends to `context` tokens (itself included)."""
    return 2 * shape.matmul_params + 4 * shape.layers * context * shape.attention_width


def forward_flops(shape: ModelShape, n_tokens: int, mean_context: float) -> int:
    """A forward over `n_tokens` tokens whose contexts average `mean_context` (F is linear in the context, so
    this is exact given the exact mean)."""
    return round(n_tokens * (2 * shape.matmul_params + 4 * shape.layers * mean_context * shape.attention_width))


def sequence_flops(shape: ModelShape, lengths) -> int:
    """Causal forwards over sequences of these lengths (a [B] tensor or a list), each from position 0: the token
    at position t has context t + 1. Exact, in integers."""
    lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    tokens = sum(lengths)
    contexts = sum(n * (n + 1) // 2 for n in lengths)
    return 2 * shape.matmul_params * tokens + 4 * shape.layers * shape.attention_width * contexts


def training_flops(shape: ModelShape, lengths) -> int:
    """A training forward and backward over sequences of these lengths: 3 x the forward, or with a LoRA adapter
    the forward, the frozen weights' input gradients, attention's two and the adapter's two (see the module)."""
    forward = sequence_flops(shape, lengths)
    if not shape.adapter:
        return 3 * forward
    tokens = sum(int(n) for n in (lengths.tolist() if isinstance(lengths, Tensor) else lengths))
    matmuls = 2 * shape.matmul_params * tokens
    frozen = 2 * (shape.matmul_params - shape.adapter) * tokens
    return forward + frozen + 2 * (forward - matmuls) + 2 * 2 * shape.adapter * tokens


def batch_flops(shape: ModelShape, batch) -> int:
    """One forward over every real token of a StateBatch (prompt and response; padding excluded)."""
    return sequence_flops(shape, batch.attention_mask.sum(1))


def sampling_flops(batch, prefix, student: ModelShape, teacher: ModelShape) -> tuple[int, int]:
    """(student, teacher) FLOPs of decoding the responses of a StateBatch drawn from `prefix`
    (kltd.schema.axes.PrefixConfig), read off its masks: the student wrote its `student_written` tokens (the
    first k of a row); the teacher wrote the rest of a row where it samples (prefix=teacher, a hand-off's tail,
    or a mixed row whose other source is the teacher). Each model reads its context then its own tokens but the
    last one: the causal forward over prompt + (its last token's column) tokens."""
    prompt = batch.prompt_mask.long().sum(1)
    written = batch.responses.mask.long().sum(1)
    by_student = batch.student_written.long().sum(1)
    rows = torch.zeros_like(batch.from_student)
    if prefix.source == "teacher":
        rows = ~rows
    elif prefix.source == "mixed":
        rows = (batch.from_student if prefix.handoff else rows) | (~batch.from_student if prefix.other == "teacher"
                                                                  else torch.zeros_like(rows))
    by_teacher = torch.where(rows, written - by_student, torch.zeros_like(written))
    student_reads = torch.where(by_student > 0, prompt + by_student - 1, torch.zeros_like(prompt))
    teacher_reads = torch.where(by_teacher > 0, prompt + written - 1, torch.zeros_like(prompt))
    return sequence_flops(student, student_reads), sequence_flops(teacher, teacher_reads)


PARTS = ("student_train", "teacher_score", "student_sampling", "teacher_sampling", "cache_fill")


@dataclass
class FlopCounter:
    """FLOPs by what they were spent on (integers; cumulative where a run keeps one).

    student_train: the student's forward and backward over the scored batches (3 x F per real token; less for a
    LoRA student, training_flops);
    teacher_score: the live teacher's forwards over them (the teacher cache spares them);
    student_sampling, teacher_sampling: decoding the training states; cache_fill: the teacher's forwards over
    the fixed states when this run filled the teacher cache."""

    student_train: int = 0
    teacher_score: int = 0
    student_sampling: int = 0
    teacher_sampling: int = 0
    cache_fill: int = 0

    @property
    def sampling(self) -> int:
        return self.student_sampling + self.teacher_sampling

    @property
    def total(self) -> int:
        return sum(self.values())

    def values(self) -> list[int]:
        return [getattr(self, name) for name in PARTS]

    @classmethod
    def from_sums(cls, values) -> "FlopCounter":
        """A counter from `values()` summed across processes (float64 all-reduce: exact to 2^53)."""
        return cls(**{name: int(round(v)) for name, v in zip(PARTS, values)})

    def add(self, other: "FlopCounter") -> None:
        for name in PARTS:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def record(self) -> dict:
        """Each part, the sampling parts' sum and the total (metrics.json's compute.flops)."""
        return {**dataclasses.asdict(self), "sampling": self.sampling, "total": self.total}


def cost_metrics(flops: FlopCounter, tokens, trained_tokens: int, wall_time_s: float) -> dict:
    """The cumulative cost/* keys of a metrics.jsonl row. `tokens`: kltd.rollout.batch.TokenCounts."""
    return {"cost/flops": flops.total, "cost/flops_student_train": flops.student_train,
            "cost/flops_teacher_score": flops.teacher_score, "cost/flops_sampling": flops.sampling,
            "cost/flops_cache_fill": flops.cache_fill,
            "cost/student_tokens_generated": tokens.student_generated,
            "cost/teacher_tokens_generated": tokens.teacher_generated, "cost/tokens_scored": tokens.scored,
            "cost/tokens_trained": trained_tokens,
            "cost/tokens_processed": tokens.student_generated + tokens.teacher_generated + tokens.scored
            + trained_tokens,
            "cost/wall_time_s": wall_time_s}
