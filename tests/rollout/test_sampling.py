"""The KV-cache sampler against a plain recompute-everything decoder, on a tiny random Llama."""


import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kltd.rollout.noise import RowNoise
from kltd.rollout.sampling import _choose, draw_categorical, sample
from kltd.rollout.batch import decode_responses, encode_prompts, encode_responses, position_ids_from_mask
from kltd.data.toy_tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def reference_greedy(model, tok, prompt: str, max_new: int) -> list[int]:
    """One unpadded prompt, full forward every step, no cache."""
    ids = tok.encode(prompt, add_special_tokens=False)
    out = []
    for _ in range(max_new):
        logits = model(torch.tensor([ids + out])).logits[0, -1]
        out.append(int(logits.argmax()))
        if out[-1] == tok.eos_token_id:
            break
    return out


def test_greedy_with_cache_and_left_padding_matches_plain_decoding(tiny):
    model, tok = tiny
    prompts = ["1+2=", "12+45+7+88=", "99+9+9="]
    ids, mask = encode_prompts(tok, prompts, "cpu")
    got = sample(model, ids, mask, max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0)
    for row, prompt in enumerate(prompts):
        expected = reference_greedy(model, tok, prompt, 12)
        assert got.tokens[row][got.mask[row]].tolist() == expected


def test_rows_stop_at_eos_and_are_padded_after(tiny):
    model, tok = tiny
    # force EOS as the second token of row 0 by biasing the lm head through a hook on the logits
    ids, mask = encode_prompts(tok, ["1+2=", "3+4="], "cpu")
    calls = {"n": 0}

    def bias_eos(module, inputs, output):
        calls["n"] += 1
        if calls["n"] == 2:  # second model call: first decoding step
            output[0, ..., tok.eos_token_id] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(bias_eos)
    try:  # the model's own forward calls lm_head (the lean decoder uses its weight directly); same loop either way
        got = sample(model, ids, mask, max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0,
                     lean=False)
    finally:
        handle.remove()
    assert got.tokens[0, 1] == tok.eos_token_id
    assert got.mask[0].tolist()[:2] == [True, True] and not got.mask[0, 2:].any()
    assert (got.tokens[0, 2:] == tok.pad_token_id).all()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {int(_choose(logits, 1.0, 0.7, gen)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; the tail is cut
    draws = {int(_choose(logits, 1.0, 1.0, gen)) for _ in range(2000)}
    assert draws == {0, 1, 2, 3}


def test_positions_ignore_left_padding(tiny):
    _, tok = tiny
    ids, mask = encode_prompts(tok, ["1+2=", "12+45="], "cpu")
    pos = position_ids_from_mask(mask)
    assert pos[0, -4:].tolist() == [0, 1, 2, 3] and pos[1].tolist() == list(range(6))


def test_dataset_responses_end_with_eos_and_decode_back(tiny):
    _, tok = tiny
    r = encode_responses(tok, ["3", "57,64;64"], "cpu")
    assert r.mask.sum(1).tolist() == [2, 9]
    assert decode_responses(tok, r) == ["3", "57,64;64"]


def test_sampling_with_a_given_prefix_continues_after_it(tiny):
    model, tok = tiny
    ids, mask = encode_prompts(tok, ["1+2="], "cpu")
    prefix = encode_responses(tok, ["3"], "cpu")
    prefix.tokens, prefix.mask = prefix.tokens[:, :1], prefix.mask[:, :1]  # "3" without EOS
    got = sample(model, ids, mask, max_new_tokens=5, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0,
                 prefix=prefix)
    expected = reference_greedy(model, tok, "1+2=3", 4)
    assert got.tokens[0, 0] == prefix.tokens[0, 0]
    assert got.tokens[0][got.mask[0]].tolist()[1:] == expected


def assert_frequencies_match(draws: torch.Tensor, probs: torch.Tensor, sigmas: float = 5.0):
    """Empirical frequencies within `sigmas` binomial standard errors of probs; zero-probability tokens never drawn."""
    n = draws.numel()
    freq = torch.bincount(draws, minlength=probs.numel()).double() / n
    p = probs.double() / probs.double().sum()
    se = (p * (1 - p) / n).sqrt()
    assert (freq[p == 0] == 0).all()
    # a true distribution's frequency lies beyond 5 standard errors with probability below 6e-7 per token (the
    # generator's seed is fixed, so the outcome is too); 1e-12 only absorbs float64 rounding of freq - p
    assert ((freq - p).abs() <= sigmas * se + 1e-12).all(), float(((freq - p).abs() / se.clamp(min=1e-12)).max())


@pytest.mark.parametrize("vocab, block", [(5, 2), (1000, 256), (300, 16)])
def test_draw_categorical_matches_the_distribution_and_never_draws_a_zero(vocab, block):
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(vocab, generator=gen) ** 4  # uneven, unnormalised
    probs[torch.randperm(vocab, generator=gen)[: vocab // 3]] = 0.0
    probs[-1] = 0.0  # a trailing zero, where rounding could otherwise land
    probs[block - 1 if block < vocab else 0] = 0.0  # a zero at a block edge
    draws = draw_categorical(probs.expand(200_000, vocab), gen, block=block)
    assert_frequencies_match(draws, probs)


def test_draw_categorical_draws_each_row_from_its_own_distribution():
    gen = torch.Generator().manual_seed(1)
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8]])
    draws = draw_categorical(probs.repeat(50_000, 1), gen, block=2).view(50_000, 2)
    assert_frequencies_match(draws[:, 0], probs[0])
    assert_frequencies_match(draws[:, 1], probs[1])
    again = draw_categorical(probs.repeat(50_000, 1), torch.Generator().manual_seed(1), block=2).view(50_000, 2)
    assert torch.equal(draws, again)  # the same seed gives the same draws


@pytest.mark.parametrize("keyed", [False, True])
def test_sampled_first_tokens_follow_the_model_distribution(tiny, keyed):
    """keyed: each row's draws from its own stream (kltd.rollout.noise), as in training."""
    model, tok = tiny
    ids, mask = encode_prompts(tok, ["12+3="] * 20_000, "cpu")
    noise = RowNoise(seed=2, step=7, rows=tuple(range(20_000))) if keyed else torch.Generator().manual_seed(2)
    got = sample(model, ids, mask, max_new_tokens=1, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 temperature=0.7, generator=noise)
    with torch.no_grad():
        probs = torch.softmax(model(ids[:1]).logits[0, -1] / 0.7, -1)
    assert_frequencies_match(got.tokens[:, 0], probs)


@pytest.mark.parametrize("lean", [True, False])
def test_dropping_ended_rows_changes_no_greedy_output(monkeypatch, lean):
    """The shipped toy student ends its answers at different lengths; the decoder sheds ended rows as it goes."""
    import kltd.rollout.sampling as sampling
    from kltd.fast.lean_decoder import LeanDecoder
    from kltd.rollout.decoders import ForwardDecoder
    from kltd.train.models import load_model, load_tokenizer, toy_dir
    from kltd.data.addition import make_splits

    toy = toy_dir() / "student"
    model, tok = load_model(str(toy)), load_tokenizer(str(toy))
    prompts = [e.prompt for e in make_splits(0, 16, 0)[0]]
    ids, mask = encode_prompts(tok, prompts, "cpu")
    kept = []
    for decoder in (LeanDecoder, ForwardDecoder):
        plain_keep = decoder.keep
        monkeypatch.setattr(decoder, "keep", lambda self, rows, plain_keep=plain_keep: kept.append(len(rows))
                            or plain_keep(self, rows))
    runs = []
    for share in (0.0, 1.0):  # never drop ended rows; drop them as soon as one ends
        monkeypatch.setattr(sampling, "COMPACT_BELOW", share)
        kept.clear()
        runs.append(sample(model, ids, mask, max_new_tokens=40, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                           temperature=0, lean=lean))
    assert len(kept) >= 3 and kept == sorted(kept, reverse=True)  # rows were shed several times, never regained
    lengths = runs[0].mask.sum(1)
    assert lengths.min() < lengths.max()  # answers of different lengths, so there was something to shed
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].mask, runs[1].mask)


def test_row_noise_columns_do_not_depend_on_the_table_width_or_the_other_rows():
    noise = RowNoise(seed=1, step=3, rows=(5, 9, 2))
    wide, narrow = noise.uniforms(40), noise.subset([2, 0]).uniforms(7)
    assert torch.equal(narrow, wide[[2, 0], :7])
    assert wide.dtype == torch.float64 and 0 <= float(wide.min()) and float(wide.max()) < 1
    assert not torch.equal(noise.named("teacher").uniforms(40), wide)  # another purpose, other draws
    assert len({tuple(r.tolist()) for r in wide}) == 3


def test_a_ragged_prefix_is_refused(tiny):
    """New tokens start after the prefix's last column for every row: a shorter open row would continue
    from padding."""
    model, tok = tiny
    ids, mask = encode_prompts(tok, ["1+2=", "3+4="], "cpu")
    prefix = encode_responses(tok, ["3", "71"], "cpu")  # EOS at column 1 and 2: row 0 has ended, fine
    sample(model, ids, mask, max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0,
           prefix=prefix)
    prefix.tokens, prefix.mask = prefix.tokens[:, :2], prefix.mask[:, :2].clone()
    prefix.mask[0, 1] = False  # row 0: one token, no EOS; row 1: two tokens
    with pytest.raises(ValueError, match="equal lengths"):
        sample(model, ids, mask, max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, temperature=0,
               prefix=prefix)


@pytest.mark.parametrize("lean", [True, False])
def test_kept_logits_are_the_models_own_at_each_sampled_state(monkeypatch, lean):
    """keep_logits returns, for every response token, the logits it was drawn from: the model's own forward on
    the whole sequence gives the same rows (also after ended rows were dropped mid-way), zeros past the end."""
    import kltd.rollout.sampling as sampling
    from kltd.data.addition import make_splits
    from kltd.rollout.batch import StateBatch
    from kltd.rollout.scoring import Scorer
    from kltd.train.models import load_model, load_tokenizer, toy_dir

    monkeypatch.setattr(sampling, "COMPACT_BELOW", 1.0)  # drop rows as soon as one ends
    toy = toy_dir() / "student"
    model, tok = load_model(str(toy)), load_tokenizer(str(toy))
    ids, mask = encode_prompts(tok, [e.prompt for e in make_splits(0, 12, 0)[0]], "cpu")
    got = sample(model, ids, mask, max_new_tokens=40, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                 temperature=1.0, generator=torch.Generator().manual_seed(3), lean=lean, vocab=len(tok),
                 keep_logits=True)
    lengths = got.mask.sum(1)
    assert lengths.min() < lengths.max() and got.logits.shape == (*got.tokens.shape, len(tok))
    with torch.no_grad():
        own = Scorer(packed=False, vocab=len(tok)).logits(model, StateBatch(ids, mask, got))
    from tests.support.tolerances import forward_bound

    tol = forward_bound(model.config.to_dict())  # the same logits through a decoder's cache: float32's bound
    assert torch.allclose(got.logits[got.mask], own[got.mask], atol=tol, rtol=tol)
    assert not got.logits[~got.mask].any()
    with pytest.raises(ValueError, match="prefix"):
        sample(model, ids, mask, max_new_tokens=4, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
               prefix=got, keep_logits=True)
