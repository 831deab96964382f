"""The packed forward against the model's own forward: same hidden states, same gradients, per architecture."""

import pytest
import torch
from tests.support.tiny_models import ARCHITECTURES, tiny_architecture
from tests.support.tolerances import forward_bound, llama_chain

import gc
import weakref

import kltd.fast.arranged as arranged_module
from kltd.fast.arranged import arranged, supports
from kltd.fast.packed import AttentionLayout
from kltd.rollout.batch import StateBatch, encode_prompts, encode_responses
from kltd.rollout.scoring import Scorer


def state_batch(tok, prompts, responses):
    """Left-padded prompts then right-padded responses, the layout every state batch has."""
    ids, mask = encode_prompts(tok, prompts, "cpu")
    return StateBatch(ids, mask, encode_responses(tok, responses, "cpu"))


def response_states(model, batch, packed=True):
    return Scorer(packed).hidden_states(model, batch)


PROMPTS = ["1+2=", "12+45+7+88=", "99+9=", "3+4+5+6=", "7="]
RESPONSES = ["3", "12+45=57,57+7=64,64+88=152", "108", "3+4=7", ""]


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "shared"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_hidden_states_and_gradients_match_the_models_forward(name, copied, monkeypatch):
    """Both arrangements: weights copied into few large matrices (small models) or used as they are."""
    monkeypatch.setattr(arranged_module, "COPY_LIMIT", 10**12 if copied else 0)
    model, tok = tiny_architecture(name)
    assert supports(model)
    batch = state_batch(tok, PROMPTS, RESPONSES)
    supervised = batch.supervised
    # a sampled token can be the padding id: as a real token its row gets no gradient
    batch.responses.tokens[1, -3] = tok.pad_token_id
    assert batch.responses.mask[1, -3]
    weights = torch.randn(int(supervised.sum()), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    results = []
    for packed in (True, False):
        model.zero_grad(set_to_none=True)
        hidden = response_states(model, batch, packed=packed)
        (hidden * weights).sum().backward()
        results.append((hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (mine, my_grads), (theirs, their_grads) = results
    assert mine.shape == (int(supervised.sum()), model.config.hidden_size)
    tol = forward_bound(model.config.to_dict())  # the same forward in another arrangement: float32's bound
    torch.testing.assert_close(mine, theirs, atol=tol, rtol=tol)
    assert my_grads.keys() == their_grads.keys() and len(my_grads) > 0
    # a weight's gradient: the backward pass's chain (as long as the forward's) and a sum over the rows, relative
    # to each gradient's own scale (some entries are in the hundreds)
    tol = forward_bound(model.config.to_dict(),
                        extra_terms=llama_chain(model.config.to_dict()) + int(supervised.sum()))
    for n in my_grads:
        scale = float(their_grads[n].abs().max())
        assert float((my_grads[n] - their_grads[n]).abs().max()) <= tol * scale, n


def test_attention_layout_groups_rows_by_length_and_starts_each_row_at_column_zero():
    real = torch.tensor([[0, 1, 1, 0, 0],   # 2 tokens
                         [1, 1, 1, 1, 1],   # 5
                         [0, 0, 1, 1, 1],   # 3
                         [0, 0, 0, 1, 0]], dtype=torch.bool)  # 1
    layout = AttentionLayout(real, groups=2)
    # longest rows first: (row 1, row 2) in a grid 5 wide, then (row 0, row 3) in one 2 wide
    assert layout.groups == [(0, 2, 5), (10, 2, 2)]
    assert layout.index.tolist() == [10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 12]
    # one token per row seen by each query: attention over v = its own position's value equals a causal average
    n = int(real.sum())
    v = torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    out = layout.attend(torch.zeros(n, 1, 1), torch.zeros(n, 1, 1), v, gqa=False).squeeze(1)
    expected = torch.cat([torch.arange(len(r), dtype=torch.float32).cumsum(0) / torch.arange(1, len(r) + 1) + r[0]
                          for r in torch.arange(n).split(real.sum(1).tolist())])
    torch.testing.assert_close(out, expected)


def test_arranged_weights_are_reused_until_a_parameter_changes():
    model, tok = tiny_architecture("llama")
    batch = state_batch(tok, PROMPTS, RESPONSES)
    with torch.inference_mode():
        first = arranged(model)
        assert arranged(model) is first  # a frozen model (the teacher) is arranged once
        before = response_states(model, batch)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # what an optimiser step does to a student
    with torch.inference_mode():
        assert arranged(model) is not first
        after = response_states(model, batch)
        reference = response_states(model, batch, packed=False)
    assert not torch.allclose(before, after)
    tol = forward_bound(model.config.to_dict())  # the same forward in another arrangement: float32's bound
    torch.testing.assert_close(after, reference, atol=tol, rtol=tol)
    assert arranged(model) is not arranged(model)  # with autograd on, always fresh (it is part of the graph)


def test_an_arranged_model_is_freed_with_its_last_reference():
    """The reuse cache holds models weakly: arranging a model must not keep it (and its copies) alive."""
    model, tok = tiny_architecture("qwen3")
    batch = state_batch(tok, PROMPTS, RESPONSES)
    with torch.inference_mode():
        response_states(model, batch)
        assert arranged(model) is arranged(model)  # cached
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


def test_above_the_copy_limit_no_weight_is_copied(monkeypatch):
    monkeypatch.setattr(arranged_module, "COPY_LIMIT", 0)
    model, _ = tiny_architecture("qwen2")
    blocks = arranged_module.LlamaBlocks(model)
    own = {p.data_ptr() for p in model.parameters()}
    held = [t for layer in blocks.layers for t in vars(layer).values() if isinstance(t, torch.Tensor)]
    assert not blocks.copied and held and all(t.data_ptr() in own for t in held)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_logit_rows_from_the_packed_forward_equal_the_models_own_logits(name):
    """Scorer.logit_rows: the logits at the supervised states only, projected a part at a time from packed
    hidden states onto the compared ids, equal the model's own logits there; the model's own forward never
    runs (packed=False runs it, and gives the same rows)."""
    model, tok = tiny_architecture(name)
    batch = state_batch(tok, PROMPTS, RESPONSES)
    batch.supervised = batch.responses.mask.clone()
    batch.supervised[1, 2:9] = False  # states the caller does not ask for are not returned
    vocab = len(tok) - 2  # fewer ids than the output layer has rows
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in (model, model.base_model)]
    with torch.inference_mode():
        rows = Scorer(vocab=vocab).logit_rows(model, batch)
        parts = rows.parts(logits=7 * vocab)  # 7 rows a part
        fast = torch.cat([rows(part) for part in parts])
        assert not calls
        own = Scorer(packed=False, vocab=vocab).logit_rows(model, batch)
        assert calls
        reference = Scorer(packed=False, vocab=vocab).logits(model, batch)[batch.supervised]
    for hook in hooks:
        hook.remove()
    assert rows.count == own.count == int(batch.supervised.sum()) and rows.width == own.width == vocab
    assert len(parts) == -(-rows.count // 7)
    torch.testing.assert_close(own(slice(None)), reference, atol=0, rtol=0)  # the same forward: bit for bit
    tol = forward_bound(model.config.to_dict())  # the same forward in another arrangement: float32's bound
    torch.testing.assert_close(fast, reference, atol=tol, rtol=tol)


def mlp_rows(monkeypatch) -> list[int]:
    """The rows of every call of the arrangement's MLP, appended as they happen."""
    calls = []
    plain = arranged_module.LlamaBlocks.mlp
    monkeypatch.setattr(arranged_module.LlamaBlocks, "mlp", lambda self, layer, hidden: calls.append(hidden.shape[0])
                        or plain(self, layer, hidden))
    return calls


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "shared"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_without_autograd_rows_run_in_blocks_with_the_models_own_results(name, copied, monkeypatch):
    """Without autograd on a CPU the layer's second half runs a block of rows at a time (here 3 or so rows a
    block, the MLP in place): the hidden states still equal the model's own forward, and with autograd on
    nothing is split."""
    monkeypatch.setattr(arranged_module, "COPY_LIMIT", 10**12 if copied else 0)
    model, tok = tiny_architecture(name)
    width = 2 * model.config.intermediate_size
    monkeypatch.setattr(arranged_module, "CACHE_BLOCK_BYTES", 3 * width * 4 // torch.get_num_threads())
    monkeypatch.setattr(arranged_module, "BLOCK_REREAD_LIMIT", 10**6)  # the tiny model's weights count as small
    calls = mlp_rows(monkeypatch)
    batch = state_batch(tok, PROMPTS, RESPONSES)
    with torch.no_grad():
        blocked = response_states(model, batch)
        assert max(calls) == 3 and len(calls) > 2 * model.config.num_hidden_layers
        theirs = response_states(model, batch, packed=False)
    tol = forward_bound(model.config.to_dict())  # the same forward in another arrangement: float32's bound
    torch.testing.assert_close(blocked, theirs, atol=tol, rtol=tol)
    calls.clear()
    response_states(model, batch)
    assert len(calls) == model.config.num_hidden_layers


@pytest.mark.parametrize("copied", [True, False], ids=["copied", "shared"])
def test_rows_are_not_blocked_where_the_weights_are_large(copied, monkeypatch):
    """Blocks re-read the layer's weights after attention: above BLOCK_REREAD_LIMIT blocks' worth of bytes all rows
    go at once, and just below it they are blocked."""
    monkeypatch.setattr(arranged_module, "COPY_LIMIT", 10**12 if copied else 0)
    model, tok = tiny_architecture("llama")
    width, layer = 2 * model.config.intermediate_size, model.model.layers[0]
    weights = sum(m.weight.numel() * 4 for m in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj,
                                                  layer.self_attn.o_proj))
    monkeypatch.setattr(arranged_module, "CACHE_BLOCK_BYTES", 3 * width * 4 // torch.get_num_threads())  # 3 rows a block
    budget = arranged_module.CACHE_BLOCK_BYTES * torch.get_num_threads()
    calls = mlp_rows(monkeypatch)
    batch = state_batch(tok, PROMPTS, RESPONSES)
    rows = int(batch.attention_mask.sum())
    for limit, most in ((weights / budget * 0.99, rows), (weights / budget * 1.01, 3)):
        monkeypatch.setattr(arranged_module, "BLOCK_REREAD_LIMIT", limit)
        calls.clear()
        with torch.no_grad():
            response_states(model, batch)
        assert max(calls) == most


@pytest.mark.parametrize("shape", [(3, 24), (2, 5, 24)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_few_rows_without_autograd_run_as_the_transposed_product(shape, with_bias):
    """kltd.matmul.linear: F.linear's values (float32's bound for a 24-term sum), row-major, any leading
    shape; a few rows without autograd against a weight of more than LARGE_WEIGHT entries are the (W @ x^T)^T
    product, with autograd it is F.linear itself."""
    from kltd.matmul import LARGE_WEIGHT, linear, plus_linear

    torch.manual_seed(0)
    outputs = LARGE_WEIGHT // 24 + 1
    x, weight = torch.randn(shape), torch.randn(outputs, 24)
    bias = torch.randn(outputs) if with_bias else None
    expected = torch.nn.functional.linear(x, weight, bias)
    transposed = (weight @ x.reshape(-1, 24).t()).t().reshape(expected.shape)
    transposed = transposed if bias is None else transposed + bias
    with torch.no_grad():
        out = linear(x, weight, bias)
        residual = torch.randn(expected.shape)
        plus = plus_linear(residual, x, weight)
    assert out.is_contiguous() and out.shape == expected.shape and plus.is_contiguous()
    assert torch.equal(out, transposed)
    bound = 24 * 2**-24 * float((x.abs().reshape(-1, 24) @ weight.abs().t()).max()) * 2
    torch.testing.assert_close(out, expected, atol=bound, rtol=0)
    torch.testing.assert_close(plus, residual + expected - (0 if bias is None else bias), atol=bound, rtol=0)
    assert torch.equal(linear(x, weight, bias), expected)  # autograd on: F.linear itself


# weights of 24 columns: 10,923 rows are just above LARGE_WEIGHT entries, 174,763 just above OUTPUT_LAYER
@pytest.mark.parametrize("rows,outputs,transposed", [
    (4, 10922, False), (4, 10923, True), (64, 10923, True), (65, 10923, False),
    (65, 174763, True), (128, 174763, True), (129, 174763, False)])
def test_which_products_run_transposed(monkeypatch, rows, outputs, transposed):
    """The limits of kltd.matmul: up to FEW_ROWS rows against a large weight, up to FEW_ROWS_OUTPUT_LAYER against
    an output layer; F.linear for everything else (its calls counted: both forms give the same bits here)."""
    import kltd.matmul as matmul

    assert matmul.LARGE_WEIGHT == 10922 * 24 + 16 and matmul.OUTPUT_LAYER == 174762 * 24 + 16
    assert (matmul.FEW_ROWS, matmul.FEW_ROWS_OUTPUT_LAYER) == (64, 128)
    calls, original = [], torch.nn.functional.linear
    monkeypatch.setattr(matmul.F, "linear", lambda *a: calls.append(a) or original(*a))
    x, weight = torch.randn(rows, 24), torch.randn(outputs, 24)
    with torch.no_grad():
        matmul.linear(x, weight)
    assert (not calls) == transposed
