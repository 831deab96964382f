"""The Markov task's models as plain Hugging Face `LlamaForCausalLM`s: the teacher built exactly from the chain,
a student too small to represent it.

The teacher is one Llama layer whose weights are all zero (attention and MLP add zero: the layer is the identity
on the residual stream), one-hot token embeddings, and an output layer that holds the chain's log-table. With
embedding e_i (one-hot, hidden size D), the final RMSNorm gives e_i * s with s = 1 / sqrt(1/D + eps), so
lm_head column i = log-table row i / s makes the logits after token i exactly that row (to float32 rounding).
Positions and the rest of the prefix play no part: the model is the first-order chain.

The student's logits are lm_head @ h with h of `width` dimensions: over all contexts they span at most `width`
dimensions (the softmax bottleneck), and so do they once each row's mean is removed (which softmax ignores). A
width below the rank of the states' log-table rows with their means removed (6 for the shipped chain; the
script records it) cannot represent the teacher, however the student reads its context.
"""

from __future__ import annotations

import math
import random

import torch

from kltd.data.markov import EOS_ID, PAD_ID, MarkovChain

RMS_NORM_EPS = 1e-6
MAX_POSITIONS = 128


def teacher_model(chain: MarkovChain):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = chain.vocab_size
    hidden = vocab + vocab % 2  # even: rotary embeddings split a head in halves (one head of width `hidden`)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=hidden,
                         max_position_embeddings=MAX_POSITIONS, rms_norm_eps=RMS_NORM_EPS, tie_word_embeddings=False,
                         pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (model.model.norm, model.model.layers[0].input_layernorm,
                     model.model.layers[0].post_attention_layernorm):
            norm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        scale = 1.0 / math.sqrt(1.0 / hidden + RMS_NORM_EPS)  # what the final norm makes of a one-hot 1
        table = torch.tensor(chain.log_table(), dtype=torch.float64)  # [input token, next token]
        model.lm_head.weight[:, :vocab] = (table.T / scale).float()
    return model.eval()


def student_model(vocab_size: int, width: int, layers: int, seed: int, heads: int = 2):
    """A randomly initialised Llama (Hugging Face's own initialisation, seeded) with `width` hidden dimensions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if width % (2 * heads):
        raise ValueError(f"width={width}: a multiple of 2 * heads ({2 * heads}) so each head's rotary halves match")
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=MAX_POSITIONS, rms_norm_eps=RMS_NORM_EPS, tie_word_embeddings=True,
                         pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def warm_up(student, chain: MarkovChain, steps: int, *, batch_size: int = 32, lr: float = 3e-3, seed: int = 0):
    """A light pre-training of the student, in place: `steps` AdamW steps of teacher-forced cross-entropy on
    walks drawn from the chain's table (start states uniform over `start_ids`, loss on the response and its EOS). Reverse-KL
    methods need a student that already writes some accepted responses (design.md section 7)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    student.train()
    for _ in range(steps):
        rows = []
        for _ in range(batch_size):
            start = rng.choice(chain.start_ids)
            rows.append([start] + chain.walk(start, rng))
        width = max(map(len, rows))
        ids = torch.tensor([row + [PAD_ID] * (width - len(row)) for row in rows])
        labels = torch.tensor([row[1:] + [-100] * (width - len(row)) for row in rows])  # right padding: no shift
        logits = student(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return student.eval()
