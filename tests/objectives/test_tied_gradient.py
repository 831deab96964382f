"""A tied embedding and output matrix through the gradient handoff: the same gradient as autograd's two
tensors summed, formed without a second [V, H] tensor."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from kltd.objectives.divergences import DivergenceSpec
from kltd.objectives.fused_head import fused_divergence
from kltd.objectives.tied_gradient import GradientHandoff

VOCAB, WIDTH, PAD = 40, 6, 3


def tiny_tied_model(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, WIDTH, generator=g, dtype=dtype, requires_grad=True)  # embedding = output matrix
    body = torch.randn(WIDTH, WIDTH, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, VOCAB, (17,), generator=g)
    ids[[2, 9]] = PAD
    teacher = 3 * torch.randn(17, VOCAB, generator=g, dtype=dtype)
    return weight, body, ids, teacher


def loss_of(weight, body, ids, teacher, handoff, scale=1.0, spec=DivergenceSpec("reverse_kl"), compared=VOCAB):
    """The head compares the first `compared` ids (an output layer padded beyond the tokenizer's is sliced)."""
    embedded = handoff.lookup(ids, weight, PAD) if handoff else F.embedding(ids, weight, PAD)
    hidden = torch.tanh(embedded @ body)
    row_weights = torch.full((len(ids),), 1 / len(ids))
    head = weight if compared == VOCAB else weight[:compared]
    return scale * fused_divergence(hidden, head, lambda rows: teacher[rows, :compared], row_weights, spec, chunk=5,
                                    handoff=handoff)


@pytest.mark.parametrize("compared", [VOCAB, VOCAB - 4])
@pytest.mark.parametrize("scale", [1.0, 0.7])
@pytest.mark.parametrize("spec", [DivergenceSpec("reverse_kl"), DivergenceSpec("kl_mix", mix=0.3),
                                  DivergenceSpec("jsd", beta=0.5)], ids=lambda s: s.name)
def test_the_handed_over_gradient_equals_autograds(scale, spec, compared):
    """Two micro-batches accumulate into the weight's gradient, as a step does; float64, to rounding."""
    grads = []
    for use_handoff in (False, True):
        weight, body, ids, teacher = tiny_tied_model()
        for part in (slice(0, 9), slice(9, 17)):
            handoff = GradientHandoff() if use_handoff else None
            loss_of(weight, body, ids[part], teacher[part], handoff, scale, spec, compared).backward()
        grads.append((weight.grad, body.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_padding_row_gets_only_the_heads_gradient():
    weight, body, ids, teacher = tiny_tied_model()
    loss_of(weight, body, ids, teacher, GradientHandoff()).backward()
    head_only = weight.detach().clone().requires_grad_(True)
    frozen_lookup = F.embedding(ids, weight.detach(), PAD)
    hidden = torch.tanh(frozen_lookup @ body.detach())
    fused_divergence(hidden, head_only, lambda rows: teacher[rows], torch.full((len(ids),), 1 / len(ids)),
                     DivergenceSpec("reverse_kl"), chunk=5).backward()
    torch.testing.assert_close(weight.grad[PAD], head_only.grad[PAD], rtol=1e-12, atol=1e-14)


class NewTensorsShaped(TorchDispatchMode):
    """Counts the ops that return a tensor of the given shape in new memory (not in place, not a view)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        inputs = [a.untyped_storage().data_ptr() for a in tensors]
        if (isinstance(out, torch.Tensor) and out.shape == self.shape
                and out.untyped_storage().data_ptr() not in inputs):
            self.count += 1
        return out


@pytest.mark.parametrize("compared", [VOCAB, VOCAB - 4])
@pytest.mark.parametrize("use_handoff", [False, True])
def test_backward_forms_no_second_vocabulary_sized_tensor(use_handoff, compared):
    """Without the handoff the lookup's backward forms a dense [V, H] gradient, and autograd's buffer their
    sum in a third tensor (the head's is still held for backward); with it, the lookup adds into the head's."""
    weight, body, ids, teacher = tiny_tied_model(torch.float32)
    loss = loss_of(weight, body, ids, teacher, GradientHandoff() if use_handoff else None, compared=compared)
    with NewTensorsShaped(weight.shape) as counter:
        loss.backward()
    assert (counter.count == 0) if use_handoff else (counter.count >= 1)


def test_an_untied_weight_keeps_its_own_gradient():
    """The head's matrix is not the looked-up one: each gets its own gradient, as without a handoff."""
    weight, body, ids, teacher = tiny_tied_model()
    head = weight.detach().clone().requires_grad_(True)
    handoff = GradientHandoff()
    hidden = torch.tanh(handoff.lookup(ids, weight, PAD) @ body)
    fused_divergence(hidden, head, lambda rows: teacher[rows], torch.full((len(ids),), 1 / len(ids)),
                     DivergenceSpec("reverse_kl"), handoff=handoff).backward()
    assert handoff.gradient_buffer(head) is None and head.grad is not None and weight.grad is not None
    assert weight.grad[ids[ids != PAD]].abs().sum() > 0 and not head.grad.equal(weight.grad)
