"""Tiny random Llama models with the toy tokenizer, for tests that need real models but not trained ones."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from kltd.data.toy_tokenizer import build_tokenizer, save_tokenizer


def make_tiny_model(directory: Path, *, width: int = 32, layers: int = 1, seed: int = 0, tied: bool = False) -> Path:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return Path(directory)


def make_head64_pair(root: Path) -> tuple[str, str]:
    """A toy-task teacher and student (seeds 0 and 1, 2 layers x 128, two heads of 64: vLLM's CPU attention refuses
    the toy pair's 16), in root/teacher and root/student."""
    tokenizer, dirs = build_tokenizer(), []
    for seed, name in ((0, "teacher"), (1, "student")):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        LlamaForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs[0], dirs[1]


# The Llama family kltd arranges itself (kltd.fast.arranged), one configuration per feature it must get right.
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama-gqa": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),  # per-head q/k norms
}


def tiny_architecture(name: str, layers: int = 2):
    """(model, tokenizer): a random two-layer model of one family, with random biases so a dropped one shows."""
    config_class, model_class, extra = ARCHITECTURES[name]
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = config_class(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, max_position_embeddings=64, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, **{"num_key_value_heads": 4, **extra})
    model = model_class(config).eval()
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_.endswith("bias"):
                p.normal_(0, 0.5)
            elif name_.endswith("norm.weight"):  # norms away from 1, so a misplaced norm weight shows too
                p.uniform_(0.5, 1.5)
    return model, tok
