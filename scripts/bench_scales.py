"""The scales scripts/bench_vs_trl.py runs at: the models, tokenizer and data of each, written to a work folder.

`toy` is the shipped character-level pair (random stand-ins when it is missing, or with --quick) on the
built-in addition task; `2k` and `32k` are random Llama pairs of one shape (teacher 4x256, student 2x128)
with a 2,000- and a 32,000-token word-level vocabulary and fixed-length rows (batch 16, 32 prompt + 224
response tokens). At 32k the [B, T, V] logits dominate memory and time; at 2k the model bodies do, with the
same sequence lengths, so the two separate what is the vocabulary's and what is the rest of the step's.

`smollm2` and `qwen3` are real model shapes with random weights (nothing is downloaded): a SmolLM2-135M
teacher (30 layers x 576, 9 query / 3 key-value heads, tied embeddings, 49,152 tokens) with a 10-layer
student of the same width, and a Qwen3-1.7B teacher with a Qwen3-0.6B student (151,936 tokens), on rows of
32 prompt + 64 response tokens: OPD samples 64 tokens for 4 prompts, the fixed prefix trains 8 rows, the
lengths the real-shape figures in docs/performance.md were first taken at. With --quick they keep their
family, heads, tying and vocabulary but shrink to 32-wide heads and 1 or 2 layers.
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
    fixed_batch_size: int | None = None  # the fixed-prefix case's batch, where it differs from OPD's

    def batch_for(self, case: str) -> int:
        return self.fixed_batch_size if case == "fixed" and self.fixed_batch_size else self.batch_size


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
    rows = random_rows(vocab, prompt_len, new_tokens)
    note = (f"random Llama, vocab {vocab}, teacher {layers[0]}x{width[0]}, student {layers[1]}x{width[1]}, "
            f"{prompt_len}-token prompts + {new_tokens} response tokens")
    return rows, teacher, student, note, batch, new_tokens


# Real configurations (from the models' published config.json files), weights random.
SMOLLM2_135M = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.041666666666666664)
QWEN3 = dict(model_type="qwen3", vocab_size=151936, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
             head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=0.02)
REAL_SHAPES = {  # name -> (teacher config, student config, the pair in words)
    "smollm2": (SMOLLM2_135M, {**SMOLLM2_135M, "num_hidden_layers": 10},
                "SmolLM2-135M-shaped teacher (30x576, GQA 9/3, tied, 49,152 tokens), 10-layer student"),
    "qwen3": ({**QWEN3, "hidden_size": 2048, "intermediate_size": 6144},
              {**QWEN3, "hidden_size": 1024, "intermediate_size": 3072},
              "Qwen3-1.7B-shaped teacher (28x2048), Qwen3-0.6B-shaped student (28x1024), GQA 16/8, tied, 151,936 tokens"),
}
REAL_LENGTHS = dict(prompt=32, new_tokens=64, opd_batch=4, fixed_batch=8)


def real_config(shape: dict, *, quick: bool, eos: int, pad: int):
    """A transformers config of a real shape (REAL_SHAPES), shrunk to a few small layers with `quick`."""
    from transformers import AutoConfig

    shape = dict(shape)
    if quick:  # same family, heads, tying and vocabulary; 32-wide heads (the narrowest vLLM's CPU kernels take), 1-2 layers
        width = 32 * shape["num_attention_heads"]
        shape.update(hidden_size=width, intermediate_size=2 * width, head_dim=32,
                     num_hidden_layers=max(1, min(2, shape["num_hidden_layers"] // 15)))
    return AutoConfig.for_model(shape.pop("model_type"), max_position_embeddings=4096, eos_token_id=eos,
                                pad_token_id=pad, bos_token_id=eos, **shape)


def real_model(directory: Path, tokenizer, shape: dict, *, seed: int, quick: bool) -> str:
    """A causal LM of a real configuration with random weights, saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    config = real_config(shape, quick=quick, eos=tokenizer.eos_token_id, pad=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def real_shape_scale(name: str, quick: bool, work: Path) -> tuple[list[dict], str, str, str]:
    """(rows, teacher, student, note) of a real-shape scale: rows of random words, fixed length."""
    teacher_shape, student_shape, words_note = REAL_SHAPES[name]
    vocab = teacher_shape["vocab_size"]
    tokenizer = synthetic_tokenizer(vocab)
    teacher = real_model(work / f"{name}_teacher", tokenizer, teacher_shape, seed=1, quick=quick)
    student = real_model(work / f"{name}_student", tokenizer, student_shape, seed=2, quick=quick)
    rows = random_rows(vocab, REAL_LENGTHS["prompt"], REAL_LENGTHS["new_tokens"])
    note = (f"{words_note}{' (shrunk: --quick)' if quick else ''}, random weights, fp32, "
            f"{REAL_LENGTHS['prompt']}-token prompts + {REAL_LENGTHS['new_tokens']} response tokens; "
            f"OPD batch {REAL_LENGTHS['opd_batch']}, fixed batch {REAL_LENGTHS['fixed_batch']}")
    return rows, teacher, student, note


def random_rows(vocab: int, prompt_len: int, new_tokens: int, count: int = 1000) -> list[dict]:
    """Rows of random words, prompt + response + EOS = prompt_len + new_tokens tokens each."""
    rng = random.Random(SEED)

    def words(n: int) -> str:
        return " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(n))

    return [{"prompt": words(prompt_len), "response": words(new_tokens - 1)} for _ in range(count)]


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
        elif name in REAL_SHAPES:
            rows, teacher, student, note = real_shape_scale(name, args.quick, work)
            batch, new_tokens = REAL_LENGTHS["opd_batch"], REAL_LENGTHS["new_tokens"]
            fixed_batch = REAL_LENGTHS["fixed_batch"]
        else:
            raise SystemExit(f"unknown scale {name!r}; choose from {', '.join(['toy', *VOCABS, *REAL_SHAPES])}")
        data = work / f"{name}_data.json"
        data.write_text(json.dumps(rows))
        scales.append(Scale(name, teacher, student, str(data), batch, new_tokens, note,
                            fixed_batch if name in REAL_SHAPES else None))
    return scales
