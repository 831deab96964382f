"""The vLLM sampler (sampling.backend=vllm) on a CPU: its draws follow the model's own softmax, pushed weights
reach the engine, and its layout, EOS stopping, max_new_tokens and prefix handling are kltd's Sampler's.

Needs the vllm extra: without it every test but the first (the error that names the extra) is skipped.
vLLM's CPU attention refuses head_dim 16, so the tiny Llama here has head_dim 64 (hidden 128, 2 heads).
One engine serves the whole module (about 35 s in all on two cores).
"""

import copy
import importlib.util
import math
import sys
from dataclasses import replace

import pytest
import torch

from transformers import LlamaConfig, LlamaForCausalLM

from kltd.data.toy_tokenizer import build_tokenizer
from kltd.objectives.divergences import nucleus
from kltd.rollout.batch import encode_prompts, pad_responses
from kltd.rollout.sampling import Sampler
from kltd.rollout.vllm_sampler import EngineOptions, VllmSampler, row_seeds
from tests.support.tolerances import forward_bound

# a skip per test, not one for the module: a run of this file alone then still collects tests (exit 0, not 5)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs the vllm extra")

PADDED = 7  # embedding rows past the tokenizer's vocabulary (as Qwen2.5 has): never to be returned
MAX_NEW = 10
PROMPTS = ["1+2=", "12+45+7+88=", "99+9+9=", "3=", "5+5+5+5+5=", "77+1=", "8+0=", "40+2+1="]
DRAWN = "5+5+5+5+5="  # the prompt whose first token is drawn many times
BLOCK = 32  # KV-cache block (the CPU default, 128, would leave every prompt here uncached)
# longer than a block: the engine caches its first block's keys and values, which a push must drop
LONG = "11+22+33+44+55+66+77+88+99+10+20+30="


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tok = build_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok) + PADDED, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # peaked next-token distributions (about 1 nat): a wrong one shows
        model.lm_head.weight[tok.eos_token_id].mul_(1.3)  # EOS ends some greedy rows early, not all
    directory = tmp_path_factory.mktemp("tiny-llama-hd64")
    model.save_pretrained(directory)
    return model, tok, directory


@pytest.fixture(scope="module")
def started(tiny):
    """(sampler, what the process looked like before the engine started)."""
    model, tok, directory = tiny
    before = {"rng": torch.get_rng_state(), "threads": torch.get_num_threads(), "set": torch.set_num_threads}
    sampler = VllmSampler(model, tok, max_new_tokens=MAX_NEW, temperature=1.0, vocab=len(tok),
                          options=EngineOptions(model_dir=str(directory), kv_cache_bytes=64 << 20, max_model_len=128,
                                                extra={"block_size": BLOCK}))
    yield sampler, before
    sampler.close()


@pytest.fixture
def vsampler(started):
    return started[0]


def kltd_sampler(model, tok, **kw) -> Sampler:
    """kltd's own sampler on the same model, greedy unless told otherwise."""
    settings = {"max_new_tokens": MAX_NEW, "temperature": 0.0, "vocab": len(tok), **kw}
    return Sampler(model=model, tokenizer=tok, **settings)


def hf_logprobs(model, tok, prompts) -> torch.Tensor:
    """[B, vocab_size] float64 next-token log-probabilities after each prompt, by the model's own forward."""
    ids, mask = encode_prompts(tok, prompts, "cpu")
    with torch.no_grad():
        return torch.log_softmax(model(ids, attention_mask=mask).logits[:, -1].double(), -1)


def engine_logprobs(sampler: VllmSampler, tok, prompts) -> torch.Tensor:
    """[B, vocab_size] the first-token log-probabilities the engine computes (vLLM's raw logprobs)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    size = sampler.engine.vocab_size
    params = SamplingParams(max_tokens=1, temperature=1.0, logprobs=-1, seed=0, detokenize=False)
    outs = sampler.engine.llm.generate([TokensPrompt(prompt_token_ids=tok.encode(p, add_special_tokens=False))
                                        for p in prompts], params, use_tqdm=False)
    table = torch.full((len(prompts), size), -math.inf, dtype=torch.float64)
    for row, out in enumerate(outs):
        for token, lp in out.outputs[0].logprobs[0].items():
            table[row, token] = lp.logprob
    return table


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom over the tokens of positive probability, the least
    likely ones merged (in order of expected count) until every bin expects at least 5 draws."""
    n = float(counts.sum())
    support = (probs > 0).nonzero().squeeze(1)
    order = support[probs[support].argsort()].tolist()
    bins, current = [], []
    for token in order:
        current.append(token)
        if n * float(probs[current].sum()) >= 5:
            bins.append(current)
            current = []
    if current:  # the leftover joins the last bin
        bins[-1] = bins[-1] + current
    stat = 0.0
    for b in bins:
        expected = n * float(probs[b].sum())
        stat += (float(counts[b].sum()) - expected) ** 2 / expected
    return stat, len(bins) - 1


def chi_square_bound(df: int, z: float = 3.719) -> float:
    """The chi-square quantile that a true hypothesis exceeds with probability about 1e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_without_vllm_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed (it may really not be)
    with pytest.raises(ImportError, match="sampling.backend=vllm needs the vllm extra: pip install"):
        VllmSampler(model=None, tokenizer=None, max_new_tokens=4)


@needs_vllm
def test_starting_the_engine_leaves_the_process_as_it_was(started):
    _, before = started
    assert torch.equal(torch.get_rng_state(), before["rng"])  # vLLM seeds the global generators
    assert torch.set_num_threads is before["set"]  # vLLM's CPU worker replaces it with a no-op
    assert torch.get_num_threads() == before["threads"]


@needs_vllm
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_first_tokens_follow_the_models_softmax(tiny, vsampler, top_p):
    model, tok, _ = tiny
    vocab, n = len(tok), 4000
    logits = hf_logprobs(model, tok, [DRAWN])[0]
    assert float(logits[vocab:].exp().sum()) > 0.5  # the padded rows hold most of the mass: `vocab` must cut them
    probs = torch.softmax(logits[:vocab], -1)
    if top_p < 1:
        probs = torch.where(nucleus(probs, top_p), probs, 0.0)
        probs = probs / probs.sum()
        assert 1 < int((probs > 0).sum()) < vocab  # the nucleus cuts some tokens, not all but one
    ids, mask = encode_prompts(tok, [DRAWN] * n, "cpu")
    out = replace(vsampler, max_new_tokens=1, top_p=top_p)(ids, mask, torch.Generator().manual_seed(1))
    assert out.tokens.shape == (n, 1) and bool(out.mask.all())
    counts = torch.bincount(out.tokens[:, 0], minlength=vocab + PADDED).double()
    assert counts[vocab:].sum() == 0, "a token id >= vocab was drawn"
    assert counts[:vocab][probs == 0].sum() == 0, "a token outside the nucleus was drawn"
    stat, df = chi_square(counts[:vocab], probs)
    assert stat < chi_square_bound(df), (stat, df, counts[:vocab].tolist(), (n * probs).tolist())
    # the same test refuses a wrong distribution: temperature 2 on the same tokens
    wrong = torch.where(probs > 0, torch.softmax(logits[:vocab] / 2, -1), 0.0)
    wrong_stat, wrong_df = chi_square(counts[:vocab], wrong / wrong.sum())
    assert wrong_stat > 10 * chi_square_bound(wrong_df), (wrong_stat, wrong_df)


@needs_vllm
def test_draws_are_reproducible_and_each_rows_own(tiny, vsampler):
    _, tok, _ = tiny
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    first = vsampler(ids, mask, torch.Generator().manual_seed(3))
    again = vsampler(ids, mask, torch.Generator().manual_seed(3))
    other = vsampler(ids, mask, torch.Generator().manual_seed(4))
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.mask, again.mask)
    assert not torch.equal(first.tokens, other.tokens)

    class Noise:  # row-keyed noise (the shape of kltd's RowNoise): one fixed stream per row
        def __init__(self, rows):
            self.rows = rows

        def uniforms(self, n):
            return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64)
                                for r in self.rows])

    assert row_seeds(Noise([5, 6]), 2)[1] == row_seeds(Noise([6]), 1)[0]
    whole = vsampler(ids, mask, Noise(list(range(len(PROMPTS)))))
    part = vsampler(ids[3:5], mask[3:5], Noise([3, 4]))  # rows 3 and 4 alone: the same draws as in the batch
    width = part.tokens.shape[1]
    assert torch.equal(whole.tokens[3:5, :width], part.tokens) and not whole.mask[3:5, width:].any()


@needs_vllm
def test_sampled_rows_stop_at_eos_and_are_padded_after(tiny, vsampler):
    _, tok, _ = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids, mask = encode_prompts(tok, PROMPTS * 32, "cpu")
    out = vsampler(ids, mask, torch.Generator().manual_seed(0))
    lengths = out.mask.sum(1)
    assert out.tokens.dtype == torch.long and out.mask.dtype == torch.bool
    assert out.tokens.shape == out.mask.shape == (len(ids), int(lengths.max()))
    assert int(lengths.max()) <= MAX_NEW and int(lengths.min()) >= 1
    for tokens, m, n in zip(out.tokens, out.mask, lengths.tolist()):
        assert m[:n].all() and not m[n:].any()
        assert (tokens[n:] == pad).all()
        assert eos not in tokens[: n - 1].tolist()  # nothing after EOS
        assert n == MAX_NEW or tokens[n - 1] == eos  # a row ends at EOS or at max_new_tokens
    assert (lengths < MAX_NEW).any() and (lengths == MAX_NEW).any()  # both endings happened
    assert (out.tokens[out.mask] < len(tok)).all()


@needs_vllm
def test_greedy_matches_kltds_sampler_token_for_token(tiny, vsampler):
    model, tok, _ = tiny
    ids, mask = encode_prompts(tok, PROMPTS, "cpu")
    for max_new in (MAX_NEW, 3):
        ours = replace(vsampler, temperature=0.0, max_new_tokens=max_new)(ids, mask, None)
        theirs = kltd_sampler(model, tok, max_new_tokens=max_new)(ids, mask, None)
        assert torch.equal(ours.tokens, theirs.tokens), (ours.tokens, theirs.tokens)
        assert torch.equal(ours.mask, theirs.mask)
    full = replace(vsampler, temperature=0.0)(ids, mask, None)
    lengths = full.mask.sum(1)
    assert (lengths < MAX_NEW).any() and (lengths == MAX_NEW).any()  # the comparison covered both endings


@needs_vllm
def test_a_prefix_is_kept_and_continued_as_kltds_sampler_does(tiny, vsampler):
    model, tok, _ = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    ids, mask = encode_prompts(tok, PROMPTS[:4], "cpu")
    prefix = pad_responses([[5, 6], [7, 8], [8, eos], [8, 9]], pad, "cpu")  # row 2 has ended inside its prefix
    for max_new in (MAX_NEW, 4, 2, 1):  # 2 and 1: the prefix fills (or is cut to) the budget, nothing is drawn
        ours = replace(vsampler, temperature=0.0, max_new_tokens=max_new)(ids, mask, None, prefix=prefix)
        theirs = kltd_sampler(model, tok, max_new_tokens=max_new)(ids, mask, None, prefix=prefix)
        assert torch.equal(ours.tokens, theirs.tokens), (max_new, ours.tokens, theirs.tokens)
        assert torch.equal(ours.mask, theirs.mask), (max_new, ours.mask, theirs.mask)
        assert ours.tokens.shape[1] <= max_new and not ours.mask[2, 2:].any()  # nothing after the prefix's EOS
    everything_ended = pad_responses([[eos], [5, eos], [eos], [eos]], pad, "cpu")
    out = vsampler(ids, mask, torch.Generator().manual_seed(0), prefix=everything_ended)
    assert torch.equal(out.tokens, everything_ended.tokens) and torch.equal(out.mask, everything_ended.mask)


@needs_vllm
def test_a_ragged_prefix_is_continued_from_each_rows_own_last_token(tiny, vsampler):
    """Rows whose prefixes differ in length: as in kltd's Sampler, the new tokens start after the prefix's last
    column (a shorter prefix leaves masked padding before them), and each row continues its prompt and its
    own prefix. (kltd's Sampler refuses a ragged prefix; no caller in kltd passes one.)"""
    model, tok, _ = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    heads = [[5, 6], [7], [8, eos], [8, 9, 10]]
    ids, mask = encode_prompts(tok, PROMPTS[:4], "cpu")
    prefix = pad_responses(heads, pad, "cpu")
    ours = replace(vsampler, temperature=0.0)(ids, mask, None, prefix=prefix)
    assert torch.equal(ours.tokens[:, :3], prefix.tokens) and torch.equal(ours.mask[:, :3], prefix.mask)
    assert not ours.mask[2, 2:].any()
    for row in (0, 1, 3):
        context_ids, _ = encode_prompts(tok, [PROMPTS[row]], "cpu")
        context = torch.cat([context_ids, torch.tensor([heads[row]])], 1)
        alone = kltd_sampler(model, tok, max_new_tokens=MAX_NEW - 3)(context, torch.ones_like(context), None)
        n = int(alone.mask.sum())
        assert ours.tokens[row, 3 : 3 + n].tolist() == alone.tokens[0, :n].tolist()
        assert ours.mask[row, 3:].sum() == n


@needs_vllm
def test_push_weights_makes_the_engine_sample_the_updated_model(tiny, vsampler):
    model, tok, _ = tiny
    prompts = PROMPTS + [LONG]
    assert len(tok.encode(LONG, add_special_tokens=False)) > BLOCK
    student = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    ids, mask = encode_prompts(tok, prompts, "cpu")
    logits = student(ids, attention_mask=mask).logits[:, -1]
    torch.nn.functional.cross_entropy(logits, torch.full((len(prompts),), 5)).backward()
    optimizer.step()  # one optimiser step changes every weight
    student.eval()
    old, new = hf_logprobs(model, tok, prompts), hf_logprobs(student, tok, prompts)
    assert float((new - old).abs().max()) > 0.1
    # another implementation of the same forward, then a log-softmax over the vocabulary: float32's bound, for
    # logits whose terms run to about 10 (the output layer was scaled by 10)
    tol = forward_bound(model.config.to_dict(), magnitude=10.0, extra_terms=model.config.vocab_size)
    before = engine_logprobs(vsampler, tok, prompts)
    torch.testing.assert_close(before, old, atol=tol, rtol=0)
    pushes = vsampler.pushes
    try:
        assert vsampler.push_weights(student, step=1) == pushes + 1
        after = engine_logprobs(vsampler, tok, prompts)
        assert float((after - old).abs().max()) > 0.1
        torch.testing.assert_close(after, new, atol=tol, rtol=0)
        greedy = replace(vsampler, temperature=0.0)(ids, mask, None)  # and the samples: the new model's
        reference = kltd_sampler(student, tok)(ids, mask, None)
        assert torch.equal(greedy.tokens, reference.tokens) and torch.equal(greedy.mask, reference.mask)
        assert vsampler.staleness(4) == 3
    finally:
        vsampler.push_weights(model)
    assert vsampler.pushes == pushes + 2
    torch.testing.assert_close(engine_logprobs(vsampler, tok, prompts), old, atol=tol, rtol=0)


@needs_vllm
def test_a_lora_students_engine_is_given_its_merged_weights(tiny, vsampler):
    """A LoRA student (kltd.train.lora) is the plain model with adapted layers, which the engine does not know: with
    EngineOptions.weights=merged_weights (what the trainer sets for model.lora.r > 0) a push gives the engine
    W + (alpha / r) B A under the plain names, and it samples the adapted model."""
    pytest.importorskip("peft")
    from kltd.schema.config import LoraSettings
    from kltd.train.lora import merged_weights, wrap

    model, tok, _ = tiny
    prompts = PROMPTS + [LONG]
    student = copy.deepcopy(model)
    wrap(student, LoraSettings(r=4, alpha=8.0))
    with torch.no_grad():  # a trained adapter: B away from its zero start
        for name, p in student.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    student.eval()
    old, new = hf_logprobs(model, tok, prompts), hf_logprobs(student, tok, prompts)
    assert float((new - old).abs().max()) > 0.1
    # as test_push_weights_makes_the_engine_sample_the_updated_model, plus the adapter's two products per layer
    tol = forward_bound(model.config.to_dict(), magnitude=10.0, extra_terms=model.config.vocab_size + 8)
    engine, options = vsampler.engine, vsampler.engine.options
    engine.options = replace(options, weights=merged_weights)
    try:
        vsampler.push_weights(student, step=1)
        torch.testing.assert_close(engine_logprobs(vsampler, tok, prompts), new, atol=tol, rtol=0)
        ids, mask = encode_prompts(tok, prompts, "cpu")
        greedy = replace(vsampler, temperature=0.0)(ids, mask, None)
        reference = kltd_sampler(student, tok)(ids, mask, None)  # the model's own forward: no lean decoder for it
        assert torch.equal(greedy.tokens, reference.tokens) and torch.equal(greedy.mask, reference.mask)
    finally:
        engine.options = options
        vsampler.push_weights(model)
    torch.testing.assert_close(engine_logprobs(vsampler, tok, prompts), old, atol=tol, rtol=0)
