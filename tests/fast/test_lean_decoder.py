"""The lean decoder against the model's own forward: same logits at every step, same greedy tokens."""

import pytest
import torch
from tests.support.tiny_models import ARCHITECTURES
from tests.support.tiny_models import tiny_architecture as tiny_model
from tests.support.tolerances import forward_bound

from kltd.fast.lean_decoder import LeanDecoder
from kltd.rollout.decoders import ForwardDecoder
from kltd.rollout.batch import encode_prompts, position_ids_from_mask
from kltd.rollout.sampling import sample


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "shared"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logits_match_the_forward_at_every_step(name, copied, monkeypatch):
    import kltd.fast.arranged as arranged_module

    monkeypatch.setattr(arranged_module, "COPY_LIMIT", 10**12 if copied else 0)
    model, tok = tiny_model(name)
    assert LeanDecoder.supports(model)
    ids, mask = encode_prompts(tok, ["1+2=", "12+45+7+88=", "99+9="], "cpu")
    positions = position_ids_from_mask(mask)
    lean, plain = LeanDecoder(model), ForwardDecoder(model)
    tol = forward_bound(model.config.to_dict())  # the same logits through a cache of keys and values: float32's bound
    with torch.inference_mode():
        a, b = lean.start(ids, mask, positions, ids.shape[1] + 6), plain.start(ids, mask, positions, 0)
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
        pos = positions[:, -1] + 1
        for step in range(6):
            token = b.argmax(-1)
            alive = torch.tensor([True, step < 2, True])  # row 1 ends early: its later columns are masked out
            a, b = lean.next(token, alive, pos), plain.next(token, alive, pos)
            torch.testing.assert_close(a[alive], b[alive], atol=tol, rtol=tol)
            pos = pos + alive.long()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_the_cache_grows_and_drops_rows_without_changing_the_logits(name):
    """Past GROWTH new tokens the cache grows (twice here), and rows dropped in between are gone from it."""
    from kltd.fast.lean_decoder import GROWTH

    model, tok = tiny_model(name)
    ids, mask = encode_prompts(tok, ["1+2=", "12+45+7+88=", "99+9=", "5="], "cpu")
    positions = position_ids_from_mask(mask)
    steps = 2 * GROWTH + 3
    lean, plain = LeanDecoder(model), ForwardDecoder(model)
    tol = forward_bound(model.config.to_dict())  # the same logits through a cache of keys and values: float32's bound
    with torch.inference_mode():
        a, b = lean.start(ids, mask, positions, ids.shape[1] + steps), plain.start(ids, mask, positions, 0)
        assert lean.bias.shape[-1] == ids.shape[1] + GROWTH  # not the whole capacity at once
        pos = positions[:, -1] + 1
        for step in range(steps):
            if step == GROWTH + 5:  # rows 0 and 2 go on
                rows = torch.tensor([0, 2])
                lean.keep(rows)
                plain.keep(rows)
                a, b, pos = a[rows], b[rows], pos[rows]
            token = b.argmax(-1)
            alive = torch.ones_like(token, dtype=torch.bool)
            a, b = lean.next(token, alive, pos), plain.next(token, alive, pos)
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)
            pos = pos + 1
        assert lean.bias.shape[-1] == ids.shape[1] + steps and lean.keys[0].shape[0] == 2
        with pytest.raises(ValueError, match="cache is full"):
            lean.next(token, alive, pos)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_sampling_is_the_same_with_either_decoder(name):
    model, tok = tiny_model(name)
    ids, mask = encode_prompts(tok, ["1+2=", "12+45+7+88=", "3+4+5="] * 4, "cpu")
    runs = [sample(model, ids, mask, max_new_tokens=10, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                   temperature=1.0, generator=torch.Generator().manual_seed(3), lean=lean) for lean in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].mask, runs[1].mask)


def test_unsupported_architectures_use_the_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=17, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    assert not LeanDecoder.supports(model)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_both_decoders_implement_the_one_declared_interface(name):
    from kltd.rollout.decoders import Decoder

    model, _ = tiny_model(name)
    assert isinstance(LeanDecoder(model), Decoder) and isinstance(ForwardDecoder(model), Decoder)
