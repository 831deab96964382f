"""A teacher known by its top-k tokens and tail (a served teacher): the k + 1 bucket divergences against formulas
written here in float64, and exact (values and gradients) when k covers the vocabulary."""

import math

import pytest
import torch

from kltd.objectives.divergences import DivergenceSpec, log_probs, token_divergence
from kltd.objectives.losses import prefix_loss, trajectory_loss
from kltd.objectives.topk_teacher import TopKTeacher, topk_teacher_divergence

V = 11
SPECS = [DivergenceSpec("forward_kl"), DivergenceSpec("reverse_kl"), DivergenceSpec("jsd", beta=0.5),
         DivergenceSpec("kl_mix", mix=0.3), DivergenceSpec("forward_kl", temperature=2.0)]


def _logits(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def served(teacher_logits, k, temperature=1.0):
    """What a server sends: the k most likely ids (any order), their log-probabilities and the tail's log-mass."""
    log_p = log_probs(teacher_logits, temperature)
    ids = log_p.topk(k, dim=-1).indices.flip(-1)  # the order must not matter
    picked = log_p.gather(-1, ids)
    rest = log_p.scatter(-1, ids, -math.inf)
    tail = rest.logsumexp(-1) if k < V else torch.full(picked.shape[:-1], -math.inf, dtype=picked.dtype)
    return TopKTeacher(ids, picked, tail)


def by_hand(student_logits, teacher: TopKTeacher, spec):
    """The bucketed divergence from probabilities, in float64, position by position."""
    out = torch.zeros(student_logits.shape[:-1], dtype=torch.float64)
    for index in torch.cartesian_prod(*(torch.arange(n) for n in student_logits.shape[:-1])):
        index = tuple(index.tolist())
        z = student_logits[index].double() / spec.temperature
        q_all = torch.exp(z - z.max()) / torch.exp(z - z.max()).sum()
        ids = teacher.ids[index].tolist()
        q = [float(q_all[i]) for i in ids] + [1.0 - sum(float(q_all[i]) for i in ids)]
        p = [math.exp(x) for x in teacher.logprobs[index].tolist()] + [math.exp(float(teacher.tail[index]))]

        def kl(a, b):
            return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)

        if spec.name == "forward_kl":
            value = kl(p, q)
        elif spec.name == "reverse_kl":
            value = kl(q, p)
        elif spec.name == "kl_mix":
            value = (1 - spec.mix) * kl(p, q) + spec.mix * kl(q, p)
        else:  # TRL's generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
            m = [spec.beta * a + (1 - spec.beta) * b for a, b in zip(p, q)]
            value = spec.beta * kl(p, m) + (1 - spec.beta) * kl(q, m)
        out[index] = value
    return out


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-T{s.temperature}")
@pytest.mark.parametrize("k", [1, 3, 6])
def test_small_k_matches_the_bucket_formula_and_bounds_the_full_divergence(spec, k):
    s, t = _logits(2, 3, V, seed=1), _logits(2, 3, V, seed=2)
    teacher = served(t, k, spec.temperature)
    got = topk_teacher_divergence(s, teacher.packed(), spec)
    # float64 sums of O(V) terms of size O(1): far below 1e-12 (the ids, exact in float64, are cast back to long)
    torch.testing.assert_close(got, by_hand(s, teacher, spec), rtol=1e-10, atol=1e-12)
    # the data-processing inequality: lumping the tail never increases an f-divergence
    assert (got <= token_divergence(s, t, spec) + 1e-12).all()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-T{s.temperature}")
def test_k_equal_to_the_vocabulary_is_the_exact_loss(spec):
    s = _logits(2, 4, V, seed=3).float().requires_grad_()
    t = _logits(2, 4, V, seed=4).float()
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 3] = False
    targets = torch.zeros(2, 4, dtype=torch.long)
    trajectory = "student" if spec.name == "reverse_kl" else "expert"
    exact = trajectory_loss(s, t, targets, mask, trajectory=trajectory, spec=spec)
    remote = trajectory_loss(s, served(t, V, spec.temperature), targets, mask, trajectory=trajectory, spec=spec)
    (g_exact,) = torch.autograd.grad(exact, s)
    (g_remote,) = torch.autograd.grad(remote, s)
    # the same float32 terms summed in another order (the ids come permuted): a few float32 ulps of the sum
    torch.testing.assert_close(remote, exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_remote, g_exact, rtol=1e-5, atol=1e-6)


def test_the_prefix_term_reads_a_served_teacher():
    s = _logits(4, 5, V, seed=5).float().requires_grad_()
    t = _logits(4, 5, V, seed=6).float()
    targets = torch.randint(V, (4, 5), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(4, 5, dtype=torch.bool)
    exact = prefix_loss(s, t, targets, mask, states="student")
    remote = prefix_loss(s, served(t, V), targets, mask, states="student")
    torch.testing.assert_close(remote, exact, rtol=1e-5, atol=1e-6)


def test_a_sampled_estimator_is_refused_with_a_served_teacher():
    s, t = _logits(1, 2, V, seed=8).float(), _logits(1, 2, V, seed=9).float()
    with pytest.raises(ValueError, match="needs the teacher's full distribution"):
        trajectory_loss(s, served(t, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                        trajectory="expert", estimator="sampled_k1")
