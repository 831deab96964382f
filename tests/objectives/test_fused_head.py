"""The fused head's written-down KL gradients against autograd through token_divergence (the reference)."""

import math

import pytest
import torch

from kltd.objectives import fused_head
from kltd.objectives.divergences import DivergenceSpec, token_divergence
from kltd.objectives.fused_head import fused_divergence, kl_and_gradient

SPECS = [DivergenceSpec("forward_kl"), DivergenceSpec("reverse_kl"), DivergenceSpec("kl_mix", mix=0.3),
         DivergenceSpec("reverse_kl", temperature=2.0), DivergenceSpec("forward_kl", temperature=0.5),
         DivergenceSpec("jsd", beta=0.0), DivergenceSpec("jsd_scaled", beta=1.0)]


def reference(hidden, weight, teacher, row_weights, spec):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    value = (token_divergence(h @ w.T, teacher, spec) * row_weights).sum()
    return (value, *torch.autograd.grad(value, (h, w)))


def inputs(dtype=torch.float64, rows=13, width=6, vocab=40):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=g, dtype=dtype)
    weight = torch.randn(vocab, width, generator=g, dtype=dtype)
    teacher = 3 * torch.randn(rows, vocab, generator=g, dtype=dtype)
    row_weights = torch.rand(rows, generator=g, dtype=dtype)
    return hidden, weight, teacher, row_weights


def fused(hidden, weight, teacher, row_weights, spec):
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    value = fused_divergence(h, w, lambda rows: teacher[rows], row_weights, spec, chunk=5)  # chunks of 5, 5, 3
    value.backward()
    return value, h.grad, w.grad


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-b{s.beta}-T{s.temperature}")
def test_the_written_down_gradient_equals_autograds(spec, monkeypatch):
    """In float64: against the same fused loop with autograd's gradient (the row weights are float32 in
    both), and against autograd through the whole [M, V] logits (float32 row weights: to 1e-6)."""
    args = inputs()
    value, g_h, g_w = fused(*args, spec)
    monkeypatch.setattr(fused_head, "kl_weights", lambda spec: None)
    by_autograd = fused(*args, spec)
    for got, want in zip((value, g_h, g_w), by_autograd):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for got, want in zip((value, g_h, g_w), reference(*args, spec)):
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-7)


def test_other_divergences_go_through_autograd(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_head, "kl_and_gradient", lambda *a: calls.append(a))
    hidden, weight, teacher, row_weights = inputs()
    spec = DivergenceSpec("jsd", beta=0.5)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused_divergence(h, w, lambda rows: teacher[rows], row_weights, spec).backward()
    _, want_h, want_w = reference(hidden, weight, teacher, row_weights, spec)
    assert calls == []
    torch.testing.assert_close(h.grad, want_h)
    torch.testing.assert_close(w.grad, want_w)


@pytest.mark.parametrize("width, want", [(16, 4), (48, 6)])
def test_chunks_hold_chunk_logits_or_an_eighth_of_the_width_in_rows(width, want, monkeypatch):
    """By default a chunk takes CHUNK_LOGITS // V rows, or H // 8 where that is more (a large vocabulary)."""
    monkeypatch.setattr(fused_head, "CHUNK_LOGITS", 4 * 40)  # 4 rows of the 40-token vocabulary
    hidden, weight, teacher, row_weights = inputs(rows=13, width=width)
    sizes = []

    def rows_of(part):
        sizes.append(teacher[part].shape[0])
        return teacher[part]

    h = hidden.clone().requires_grad_(True)
    fused_divergence(h, weight.clone().requires_grad_(True), rows_of, row_weights, DivergenceSpec()).backward()
    assert sizes[0] == want and sum(sizes) == 13 and len(sizes) == -(-13 // want)


@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.3, 0.7)])
def test_the_teachers_logits_are_left_as_they_were(weights):
    """The student's chunk is written over; the teacher's rows may be a cache's and must not be."""
    hidden, weight, teacher, row_weights = inputs()
    kept = teacher.clone()
    assert kl_and_gradient(hidden @ weight.T, teacher, DivergenceSpec("kl_mix", mix=0.3, temperature=2.0), weights,
                           row_weights) is not None
    assert torch.equal(teacher, kept)


def test_a_teacher_probability_of_zero_takes_autograds_path():
    """A -inf teacher logit: the written-down form declines (its arithmetic would give NaN or inf there), and
    the fused forward KL, which is finite, still equals autograd's in value and gradients."""
    hidden, weight, teacher, row_weights = inputs()
    teacher[2, 7] = -math.inf
    for spec, weights in ((DivergenceSpec("reverse_kl"), (0.0, 1.0)), (DivergenceSpec("forward_kl"), (1.0, 0.0))):
        assert kl_and_gradient(hidden @ weight.T, teacher, spec, weights, row_weights) is None
    args = hidden, weight, teacher, row_weights, DivergenceSpec("forward_kl")
    for got, want in zip(fused(*args), reference(*args)):
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-7)
