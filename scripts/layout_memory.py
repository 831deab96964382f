"""Memory of each way to lay out a teacher and a student, for the paper's pairs, from parameter counts.

    python scripts/layout_memory.py                  # the table in docs/teacher_layouts.md (GiB)
    python scripts/layout_memory.py --dtype float32  # the same with fp32 weights

Each model is built from its published configuration on torch's meta device (no weights, no download), so the
parameter counts are transformers' own. The figures are the resident state only: weights (the teacher's, the
student's), the student's gradients and AdamW's two moments (torch keeps them in the parameters' dtype; a
peft LoRA adapter is kept in float32 whatever the base's dtype). Activations, the KV cache of sampling, the
logits and the CUDA context come on top and depend on the batch and the lengths.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ADAPTER_BYTES = 4  # peft keeps a LoRA adapter in float32 over a bf16/fp16 base
NF4_BYTES = 0.5 + 4 / 64 * 0.25  # 4-bit weights, plus one 8-bit scale per 64 weights (double quantisation) ~ 0.52
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# From each model's published config.json (the fields that set the parameter count).
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, num_key_value_heads=8)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, tie_word_embeddings=True)
ARCHITECTURES = {
    "Qwen/Qwen3-8B": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=False),
    "Qwen/Qwen3-4B": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                          num_attention_heads=32, tie_word_embeddings=True),
    "Qwen/Qwen3-0.6B": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                            num_attention_heads=16, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-3B-Instruct": dict(_LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                             num_attention_heads=24, head_dim=128),
    "meta-llama/Llama-3.2-1B-Instruct": dict(_LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                             num_attention_heads=32, head_dim=64),
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     tie_word_embeddings=False),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": dict(model_type="llama", vocab_size=49152, hidden_size=2048,
                                                intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                                                num_key_value_heads=32, tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                                                intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                                num_key_value_heads=3, head_dim=64, tie_word_embeddings=True),
}
PAIRS = [  # (conf/model preset, teacher, student)
    ("qwen3_8b_to_0_6b", "Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B"),
    ("qwen3_4b_to_0_6b", "Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"),
    ("qwen2_5_7b_to_0_5b", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
    ("llama3_2_3b_to_1b", "meta-llama/Llama-3.2-3B-Instruct", "meta-llama/Llama-3.2-1B-Instruct"),
    ("smollm2_1_7b_to_135m", "HuggingFaceTB/SmolLM2-1.7B-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
]


@dataclass(frozen=True)
class Counts:
    parameters: int  # a tied embedding counted once
    lora: int  # the adapter's parameters at rank 1 on LORA_TARGETS (linear in the rank)
    vocab: int


def counts(name: str) -> Counts:
    """Parameter counts of a published model, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(ARCHITECTURES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    lora = sum(m.in_features + m.out_features for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LORA_TARGETS)
    return Counts(sum(p.numel() for p in model.parameters()), lora, config.vocab_size)


def layouts(teacher: Counts, student: Counts, dtype: str, lora_r: int = 16) -> list[tuple[str, float, float]]:
    """(layout, GiB on each GPU that trains, GiB of the teacher's own GPUs: 0 where the teacher shares them)."""
    w = BYTES[dtype]
    t, s = teacher.parameters * w, student.parameters * w
    trained = 4 * s  # weights, gradients, AdamW's two moments
    adapter = 4 * lora_r * student.lora * ADAPTER_BYTES
    rows = [("one GPU", t + trained, 0.0),
            ("two GPUs, the teacher on the second (`model.teacher_device=cuda:1`)", trained, t)]
    rows += [(f"FSDP over {n} GPUs (`distributed.strategy=fsdp`): a whole teacher each", t + trained / n, 0.0)
             for n in (2, 8)]
    rows += [(f"LoRA r={lora_r} (`model.lora.r={lora_r}`)", t + s + adapter, 0.0),
             (f"QLoRA r={lora_r} (`model.lora.quantize_base=4bit`)", t + student.parameters * NF4_BYTES + adapter, 0.0),
             ("teacher server (`model.teacher_server=URL`)", trained, t)]
    return [(name, train / GIB, own / GIB) for name, train, own in rows]


SHORT = {"Qwen/Qwen2.5-7B-Instruct": "Qwen2.5-7B", "Qwen/Qwen2.5-0.5B-Instruct": "Qwen2.5-0.5B"}
HEADER = ("| pair (`model=`) | teacher | student | one GPU | teacher on a second GPU: student's GPU / teacher's "
          "| FSDP, 8 GPUs, each | LoRA r=16 | QLoRA r=16 |")


def _name(name: str, parameters: int) -> str:
    short = SHORT.get(name, name.split("/")[-1].removesuffix("-Instruct"))
    return f"{short}, {parameters / 1e9:.{3 if parameters < 1e9 else 2}f}B"


def table(dtype: str) -> str:
    """One row per pair: GiB on the fullest GPU in each layout (docs/teacher_layouts.md shows it as printed)."""
    lines = [HEADER, "|---|---|---|---|---|---|---|---|"]
    for preset, teacher_name, student_name in PAIRS:
        teacher, student = counts(teacher_name), counts(student_name)
        gib = {name.split(" (")[0]: (train, own) for name, train, own in layouts(teacher, student, dtype)}
        apart = gib["two GPUs, the teacher on the second"]
        lines.append(f"| `{preset}` | {_name(teacher_name, teacher.parameters)} | "
                     f"{_name(student_name, student.parameters)} | {gib['one GPU'][0]:.1f} | "
                     f"{apart[0]:.1f} / {apart[1]:.1f} | {gib['FSDP over 8 GPUs'][0]:.1f} | "
                     f"{gib['LoRA r=16'][0]:.1f} | {gib['QLoRA r=16'][0]:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(BYTES), default="bfloat16")
    print(table(parser.parse_args().dtype))


if __name__ == "__main__":
    main()
