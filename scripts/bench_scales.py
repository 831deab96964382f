"""The scales scripts/bench_vs_trl.py runs at: the models, tokenizer and data of each, written to a work folder.

`toy` is the shipped character-level pair (random stand-ins when it is missing, or with --quick) on the
built-in addition task; `2k` and `32k` are random Llama pairs of one shape (teacher 4x256, student 2x128)
with a 2,000- and a 32,000-token word-level vocabulary and fixed-length rows (batch 16, 32 prompt + 224
response tokens). At 32k the [B, T, V] logits dominate memory and time; at 2k the model bodies do, with the
same sequence lengths, so the two separate what is the vocabulary's and what is the rest of the step's.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 0
# the random-vocabulary scales: name -> vocabulary size (same models, batch and lengths otherwise)
VOCABS = {"2k": 2000, "32k": 32000}


@dataclass
class Scale:
    name: str
    teacher: str
    student: str
    data: str  # JSON file: [{"prompt": ..., "response": ...}, ...]
    batch_size: int
    max_new_tokens: int
    note: str = ""


# ---------------------------------------------------------------------------------------------------------
# Models and data


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` tokens: <pad>, <eos>, <unk>, then words t3 .. t{V-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(["<pad>", "<eos>", "<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left", model_max_length=4096)


def random_llama(directory: Path, tokenizer, *, width: int, layers: int, seed: int, max_positions: int,
                 init_range: float = 0.02) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max_positions, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         initializer_range=init_range)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def toy_pair(args, work: Path) -> tuple[str, str, str]:
    """The shipped toy pair, or random stand-ins of the documented shape (teacher 4x256, student 2x128)."""
    teacher, student = Path(args.toy_teacher), Path(args.toy_student)
    if not args.quick and (teacher / "config.json").is_file() and (student / "config.json").is_file():
        def shape(d: Path) -> str:
            return "{num_hidden_layers}x{hidden_size}".format(**json.loads((d / "config.json").read_text()))

        return str(teacher), str(student), f"shipped toy pair (teacher {shape(teacher)}, student {shape(student)})"
    from kltd.data.toy_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    if args.quick:
        shapes, note = ((32, 2), (32, 1)), "tiny random stand-ins (--quick)"
    else:
        shapes, note = ((256, 4), (128, 2)), f"RANDOM stand-ins: no toy pair at {teacher} / {student}"
    t = random_llama(work / "toy_teacher", tokenizer, width=shapes[0][0], layers=shapes[0][1], seed=1,
                     max_positions=128, init_range=0.1)
    s = random_llama(work / "toy_student", tokenizer, width=shapes[1][0], layers=shapes[1][1], seed=2,
                     max_positions=128, init_range=0.1)
    return t, s, note


def random_vocab_scale(name: str, vocab: int, quick: bool, work: Path) -> tuple[list[dict], str, str, str, int, int]:
    """A random Llama pair with a `vocab`-token word-level vocabulary and fixed-length rows of random words:
    (rows, teacher, student, note, batch size, new tokens). Every such scale has the same shapes and lengths
    (teacher 4x256, student 2x128, batch 16, 32 prompt + 224 response tokens), so scales differ only in V."""
    batch, prompt_len, new_tokens = (2, 8, 8) if quick else (16, 32, 224)
    tokenizer = synthetic_tokenizer(vocab)
    width = (32, 32) if quick else (256, 128)
    layers = (1, 1) if quick else (4, 2)
    max_pos = prompt_len + new_tokens + 8
    # init_range 0.1: logits spread enough that the two models' distributions differ by O(1) nats
    teacher = random_llama(work / f"{name}_teacher", tokenizer, width=width[0], layers=layers[0], seed=1,
                           max_positions=max_pos, init_range=0.1)
    student = random_llama(work / f"{name}_student", tokenizer, width=width[1], layers=layers[1], seed=2,
                           max_positions=max_pos, init_range=0.1)
    rng = random.Random(SEED)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))

    # fixed length: prompt + response + EOS = prompt_len + new_tokens tokens in every row
    rows = [{"prompt": words(prompt_len), "response": words(new_tokens - 1)} for _ in range(1000)]
    note = (f"random Llama, vocab {vocab}, teacher {layers[0]}x{width[0]}, student {layers[1]}x{width[1]}, "
            f"{prompt_len}-token prompts + {new_tokens} response tokens")
    return rows, teacher, student, note, batch, new_tokens


def build_scales(args, work: Path) -> list[Scale]:
    from kltd.data.addition import make_splits

    scales = []
    for name in args.scales:
        if name == "toy":
            teacher, student, note = toy_pair(args, work)
            batch, new_tokens = (4, 8) if args.quick else (32, 48)
            train, _ = make_splits(SEED, n_train=4000, n_eval=0)
            rows = [{"prompt": e.prompt, "response": e.response} for e in train]
        elif name in VOCABS:
            rows, teacher, student, note, batch, new_tokens = random_vocab_scale(name, VOCABS[name], args.quick, work)
        else:
            raise SystemExit(f"unknown scale {name!r}; choose from {', '.join(['toy', *VOCABS])}")
        data = work / f"{name}_data.json"
        data.write_text(json.dumps(rows))
        scales.append(Scale(name, teacher, student, str(data), batch, new_tokens, note))
    return scales
