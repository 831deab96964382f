"""Local stand-ins for real models and data, built in seconds with no network.

- a character-level tokenizer with a ChatML chat template (like Qwen's: turns end with <|im_end|>, which
  is not the tokenizer's end-of-sequence token);
- tiny random models of the real architectures, all sharing it: Qwen3, Qwen2 with padded embedding rows
  (as Qwen2.5-7B has), Llama, and GPT-2 (not Llama-family: no fast path);
- datasets in the real schemas: GSM8K (question / answer with "####") as JSONL, MATH (problem / solution
  with \\boxed{}) as Parquet, TRL conversational messages as a save_to_disk directory.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<pad>", "<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]


def chat_tokenizer(template: bool = True):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {token: i for i, token in enumerate(SPECIALS + characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|endoftext|>",
                                  unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
    if template:
        tok.chat_template = CHATML
    return tok


ARCHS = ("qwen3", "qwen2_padded", "llama", "gpt2")


def tiny_model(arch: str, directory: Path, *, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    """A random model of `arch` with the chat tokenizer, saved as a Hugging Face directory."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    tok = chat_tokenizer()
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, vocab_size=len(tok), **ids)
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    elif arch == "qwen2_padded":  # the embedding matrix has rows beyond the tokenizer's ids
        model = Qwen2ForCausalLM(Qwen2Config(**{**common, "vocab_size": len(tok) + 7}))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=width, n_layer=layers, n_head=4, n_positions=512,
                                           vocab_size=len(tok), **ids))
    else:
        raise ValueError(arch)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return Path(directory)


GSM8K = [
    ("Natalia sold clips to 48 of her friends in April, and then half as many in May. How many in all?",
     "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"),
    ("Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?",
     "Per minute 12/60 = $<<12/60=0.2>>0.2.\nFor 50 minutes 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"),
    ("Betty needs $100 for a wallet. She has half. Her parents give $15, grandparents twice that. How much more?",
     "She has 100 / 2 = $<<100/2=50>>50.\nGrandparents give 15 * 2 = $<<15*2=30>>30.\n"
     "She needs 100-50-30-15 = $<<100-50-30-15=5>>5 more.\n#### 5"),
    ("James writes a 3-page letter to 2 friends twice a week. How many pages a year?",
     "Each week 3*2*2 = <<3*2*2=12>>12 pages.\nA year is 12*52 = <<12*52=624>>624 pages.\n#### 624"),
    ("A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total?",
     "White is 2/2 = <<2/2=1>>1 bolt.\nTotal 2+1 = <<2+1=3>>3 bolts.\n#### 3"),
    ("Josh buys a house for $80,000 and puts in $50,000 of repairs, raising its value by 150%. Profit?",
     "Cost 80,000+50,000 = $<<80000+50000=130000>>130,000.\nValue 80,000*2.5 = $<<80000*2.5=200000>>200,000.\n"
     "Profit 200,000-130,000 = $<<200000-130000=70000>>70,000.\n#### 70000"),
]

MATH = [
    ("What is $\\frac{1}{2} + \\frac{1}{4}$?", "Add: $\\frac{2}{4} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."),
    ("Simplify $\\sqrt{12}$.", "$\\sqrt{12} = \\sqrt{4 \\cdot 3} = \\boxed{2\\sqrt{3}}$."),
    ("Solve $2x + 3 = 11$.", "Subtract 3 and divide by 2: $x = \\boxed{4}$."),
    ("What is $3^3$?", "$3^3 = 27$, so the answer is $\\boxed{27}$."),
    ("Compute $0.5 \\times 8$.", "$0.5 \\times 8 = \\boxed{4}$."),
    ("What is $10 \\% $ of $50$?", "$0.1 \\cdot 50 = \\boxed{5}$."),
]


def gsm8k_jsonl(path: Path, repeat: int = 4) -> Path:
    rows = [{"question": q, "answer": a} for q, a in GSM8K] * repeat
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def math_parquet(path: Path, repeat: int = 4) -> Path:
    import datasets

    datasets.Dataset.from_list([{"problem": p, "solution": s} for p, s in MATH] * repeat).to_parquet(str(path))
    return path


def conversational_dir(path: Path, repeat: int = 4, split_dict: bool = True) -> Path:
    """TRL conversational rows: a system message, the question, the assistant's answer."""
    import datasets

    def rows(pairs):
        return [{"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q},
                              {"role": "assistant", "content": a}]} for q, a in pairs]

    train = datasets.Dataset.from_list(rows(GSM8K * repeat))
    if split_dict:
        datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_list(rows(GSM8K[:3]))}).save_to_disk(str(path))
    else:
        train.save_to_disk(str(path))
    return path


def strip_tokenizer(directory: Path, *tokens: str, template: bool = True) -> Path:
    """A model directory's tokenizer without these special tokens (e.g. "pad_token": GPT-2's and Llama's have
    none) and, with template=False, without its chat template. Returns the directory."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    for token in tokens:
        config.pop(token, None)
    if not template:
        config.pop("chat_template", None)
        (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path.write_text(json.dumps(config, indent=2))
    model_config = json.loads((directory / "config.json").read_text())
    for token in tokens:
        model_config[token.replace("_token", "_token_id")] = None
    (directory / "config.json").write_text(json.dumps(model_config, indent=2))
    return directory


def on_local_gsm8k_pair(cfg, tmp_path: Path, arch: str, budget: int = 8):
    """`cfg` (a kltd Config) on a tiny random `arch` pair and a GSM8K-schema JSONL file with its checker, responses
    and evaluations of `budget` tokens: the local stand-in for a real pair on a real data set."""
    cfg.model.teacher = str(tiny_model(arch, tmp_path / "teacher", seed=1))
    cfg.model.student = str(tiny_model(arch, tmp_path / "student", seed=2))
    cfg.data.source, cfg.data.path, cfg.data.checker = "file", str(gsm8k_jsonl(tmp_path / "gsm8k.jsonl")), "gsm8k"
    cfg.data.fields.prompt, cfg.data.fields.response, cfg.data.eval_fraction = "question", "answer", 0.2
    cfg.data.n_train, cfg.data.n_eval = 20000, 500
    cfg.eval.max_new_tokens = cfg.sampling.max_new_tokens = budget
    return cfg
