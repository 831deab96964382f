"""Tiny random Llama models with the toy tokenizer, for tests that need real models but not trained ones."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kltd.toy_tokenizer import build_tokenizer, save_tokenizer


def make_tiny_model(directory: Path, *, width: int = 32, layers: int = 1, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return Path(directory)
