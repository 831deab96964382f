"""scripts/layout_memory.py: the parameter counts behind docs/teacher_layouts.md, checked against a closed-form
count of a decoder block and against the totals the model cards publish; the layouts' arithmetic; the pairs are
the presets' own."""

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import layout_memory  # noqa: E402

# the model cards' totals, in billions, to the digits they print
PUBLISHED = {"Qwen/Qwen3-8B": 8.2, "Qwen/Qwen3-4B": 4.0, "Qwen/Qwen3-0.6B": 0.6, "Qwen/Qwen2.5-7B-Instruct": 7.61,
             "Qwen/Qwen2.5-0.5B-Instruct": 0.49, "meta-llama/Llama-3.2-3B-Instruct": 3.21,
             "meta-llama/Llama-3.2-1B-Instruct": 1.23, "HuggingFaceTB/SmolLM2-1.7B-Instruct": 1.71,
             "HuggingFaceTB/SmolLM2-135M-Instruct": 0.135}


def closed_form(a: dict) -> int:
    """Embedding, per layer attention (q, k, v, o; Qwen2's q/k/v biases; Qwen3's q/k norms), SwiGLU MLP and two
    norms, the final norm, an untied output layer."""
    h, f, layers, v = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"], a["vocab_size"]
    d = a.get("head_dim", h // a["num_attention_heads"])
    q, kv = a["num_attention_heads"] * d, a["num_key_value_heads"] * d
    attention = h * q + 2 * h * kv + q * h
    if a["model_type"] == "qwen2":
        attention += q + 2 * kv
    if a["model_type"] == "qwen3":
        attention += 2 * d
    layer = attention + 3 * h * f + 2 * h
    return v * h + layers * layer + h + (0 if a["tie_word_embeddings"] else v * h)


@pytest.mark.parametrize("name", sorted(layout_memory.ARCHITECTURES))
def test_counts_match_the_closed_form_and_the_model_cards(name):
    counts = layout_memory.counts(name)
    assert counts.parameters == closed_form(layout_memory.ARCHITECTURES[name])
    published = PUBLISHED[name]
    digits = len(str(published).split(".")[1])
    assert abs(counts.parameters / 1e9 - published) <= 10 ** -digits  # within one unit of the card's last digit


def test_the_pairs_are_the_presets():
    for preset, teacher, student in layout_memory.PAIRS:
        model = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())["model"]
        assert (model["teacher"], model["student"]) == (teacher, student)


def test_layouts_arithmetic():
    teacher = layout_memory.Counts(parameters=2 * 2**30, lora=0, vocab=10)
    student = layout_memory.Counts(parameters=2**30, lora=2**20, vocab=10)
    rows = {name.split(" (")[0]: (train, own) for name, train, own in layout_memory.layouts(teacher, student, "bfloat16")}
    # teacher 4 GiB of bf16 weights; student 2 GiB of weights, as much again of gradients, twice that of moments
    assert rows["one GPU"] == (4 + 8, 0)
    assert rows["two GPUs, the teacher on the second"] == (8, 4)
    assert rows["FSDP over 2 GPUs"] == (4 + 4, 0)
    assert rows["teacher server"] == (8, 4)
    # rank 16 on 2^20 (in + out) features: 16 MiB adapter parameters, float32, four copies = 256 MiB
    assert rows["LoRA r=16"] == (4 + 2 + 0.25, 0)


def test_the_docs_show_the_table_as_printed():
    assert layout_memory.table("bfloat16") in (ROOT / "docs" / "teacher_layouts.md").read_text()
