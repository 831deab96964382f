"""The shipped toy pair loads offline through the Auto classes and speaks the task's vocabulary."""

import json
from pathlib import Path

import pytest
import torch

import kltd
from kltd.data.addition import make_splits
from kltd.data.toy_tokenizer import build_tokenizer

TOY = Path(kltd.__file__).parent / "assets" / "toy"
ROLES = ("teacher", "student")


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    return {role: AutoTokenizer.from_pretrained(TOY / role, local_files_only=True) for role in ROLES}


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM

    return {role: AutoModelForCausalLM.from_pretrained(TOY / role, local_files_only=True).eval() for role in ROLES}


def test_assets_are_small():
    total = sum(f.stat().st_size for f in TOY.rglob("*") if f.is_file())
    assert total < 20 * 1024 * 1024, f"toy assets are {total / 2**20:.1f} MiB"


def test_tokenizer_round_trip_and_specials(tokenizers):
    fresh = build_tokenizer()
    train, evaluation = make_splits(0, 200, 50)
    for tok in tokenizers.values():
        assert tok.get_vocab() == fresh.get_vocab()
        assert (tok.pad_token, tok.pad_token_id, tok.eos_token, tok.eos_token_id) == ("<pad>", 0, "<eos>", 1)
        assert tok.padding_side == "left"
        for e in train + evaluation:
            for text in (e.prompt, e.response, e.prompt + e.response):
                ids = tok.encode(text, add_special_tokens=False)
                assert len(ids) == len(text)  # one token per character
                assert tok.encode(text) == ids  # no BOS/EOS added either way
                assert tok.decode(ids) == text
        assert tok.decode(tok.encode("12+3=", add_special_tokens=False) + [tok.eos_token_id], skip_special_tokens=True) == "12+3="


def test_models_match_tokenizer_and_forward(models, tokenizers):
    tok = tokenizers["student"]
    prompts = ["12+45+7+88=", "3+4="]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    for role, model in models.items():
        config = model.config
        assert config.model_type == "llama"
        assert config.vocab_size == len(tokenizers[role])
        assert (config.eos_token_id, config.pad_token_id) == (1, 0)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions).logits
        assert logits.shape == (len(prompts), batch["input_ids"].shape[1], config.vocab_size)
        assert torch.isfinite(logits[mask.bool()]).all()


def test_model_shapes(models):
    student, teacher = models["student"].config, models["teacher"].config
    assert (student.num_hidden_layers, student.hidden_size) == (2, 64)
    assert teacher.num_hidden_layers > student.num_hidden_layers and teacher.hidden_size > student.hidden_size


def _teacher_forced_token_accuracy(model, tok, examples) -> float:
    """Fraction of response + EOS tokens the model predicts right given the correct prefix (one forward)."""
    prompts = [tok.encode(e.prompt, add_special_tokens=False) for e in examples]
    responses = [tok.encode(e.response, add_special_tokens=False) + [tok.eos_token_id] for e in examples]
    width_p, width_r = max(map(len, prompts)), max(map(len, responses))
    ids = torch.full((len(examples), width_p + width_r), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    target = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, width_p - len(p) : width_p + len(r)] = torch.tensor(p + r)
        mask[i, width_p - len(p) : width_p + len(r)] = 1
        target[i, width_p : width_p + len(r)] = torch.tensor(r)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    predicted, target = logits[:, :-1].argmax(-1), target[:, 1:]
    scored = target != -100
    return (predicted[scored] == target[scored]).float().mean().item()


def test_teacher_is_trained_and_student_is_weaker(models, tokenizers):
    """Cheap smoke test on held-out prompts (left padding, positions from the mask), no decoding."""
    _, evaluation = make_splits(0, 0, 500)  # the eval split does not depend on n_train
    chunk = evaluation[:48]
    teacher = _teacher_forced_token_accuracy(models["teacher"], tokenizers["teacher"], chunk)
    student = _teacher_forced_token_accuracy(models["student"], tokenizers["student"], chunk)
    assert teacher > 0.99
    assert 0.5 < student < teacher


def test_calibration_record():
    record = json.loads((TOY / "calibration.json").read_text())
    assert record["models"]["teacher"]["eval_greedy_accuracy"] >= 0.95
    assert 0.3 <= record["models"]["student"]["eval_greedy_accuracy"] <= 0.6
