"""Every divergence against a formula written independently (float64 probabilities), chunking, top-k, TRL parity."""

import math
import warnings

import pytest
import torch

from kltd.schema.choices import DIVERGENCES
from kltd.objectives.divergences import DivergenceSpec, token_divergence, topk_token_divergence
from kltd.objectives.chunked import chunked_token_divergence
from tests.support.tolerances import U, divergence_bound, divergence_gradient_bound

V = 11
U64 = 2.0**-53  # float64's unit roundoff


def _probs(logits, temperature):
    z = logits.double() / temperature
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _kl(a, b):
    # sum a log(a / b) with 0 log 0 = 0
    terms = torch.where(a > 0, a * torch.log(a / b), torch.zeros_like(a))
    return terms.sum(-1)


def reference(student_logits, teacher_logits, spec):
    """The definitions in kltd/divergences.py, computed from explicit probabilities in float64."""
    p, q = _probs(teacher_logits, spec.temperature), _probs(student_logits, spec.temperature)
    b, a = spec.beta, spec.alpha
    if spec.name == "forward_kl":
        return _kl(p, q)
    if spec.name == "reverse_kl":
        return _kl(q, p)
    if spec.name in ("jsd", "jsd_scaled"):
        if b == 0:
            return _kl(p, q)
        if b == 1:
            return _kl(q, p)
        m = b * p + (1 - b) * q
        jsd = b * _kl(p, m) + (1 - b) * _kl(q, m)
        return jsd if spec.name == "jsd" else jsd / (b * (1 - b))
    if spec.name == "skew_kl":
        return _kl(p, a * p + (1 - a) * q)
    if spec.name == "skew_reverse_kl":
        return _kl(q, a * q + (1 - a) * p)
    if spec.name == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if spec.name == "kl_mix":
        return (1 - spec.mix) * _kl(p, q) + spec.mix * _kl(q, p)
    raise AssertionError(spec.name)


SPECS = [
    DivergenceSpec("forward_kl"),
    DivergenceSpec("reverse_kl"),
    DivergenceSpec("jsd", beta=0.0),
    DivergenceSpec("jsd", beta=0.5),
    DivergenceSpec("jsd", beta=1.0),
    DivergenceSpec("jsd", beta=0.2, temperature=2.0),
    DivergenceSpec("jsd_scaled", beta=0.0),
    DivergenceSpec("jsd_scaled", beta=0.3),
    DivergenceSpec("jsd_scaled", beta=1.0),
    DivergenceSpec("skew_kl", alpha=0.1),
    DivergenceSpec("skew_kl", alpha=0.7, temperature=0.5),
    DivergenceSpec("skew_reverse_kl", alpha=0.1),
    DivergenceSpec("skew_reverse_kl", alpha=0.4, temperature=1.7),
    DivergenceSpec("tv"),
    DivergenceSpec("tv", temperature=3.0),
    DivergenceSpec("kl_mix", mix=0.5),
    DivergenceSpec("kl_mix", mix=0.25, temperature=2.0),
    DivergenceSpec("forward_kl", temperature=2.0),
    DivergenceSpec("reverse_kl", temperature=0.7),
]


def _logits(*shape, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------------------------------------------------
# Tolerances from the arithmetic (tests/support/tolerances.py: divergence_bound and its gradient's): the
# vocabulary V, the logits' size over T, how many terms are summed and how large they are. Each is far below
# what a wrong formula gives (another divergence, direction, beta or temperature: differences of 1e-2 or more
# on these logits, whose distributions differ by O(1) nats).


def _shape(spec: DivergenceSpec) -> tuple[float, float | None]:
    """(weight, mix) for divergence_bound: the sum of the |weights| on the spec's KLs, and the smaller weight of
    its mixture (None: it has none)."""
    if spec.name in ("jsd", "jsd_scaled") and 0 < spec.beta < 1:
        return (1 / (spec.beta * (1 - spec.beta)) if spec.name == "jsd_scaled" else 1.0), min(spec.beta, 1 - spec.beta)
    if spec.name in ("skew_kl", "skew_reverse_kl") and 0 < spec.alpha < 1:
        return 1.0, min(spec.alpha, 1 - spec.alpha)
    return 1.0, None


def _max_logit(s, t, temperature) -> float:
    """max |z| / T over both models' finite logits."""
    z = torch.cat([s.detach().double().flatten(), t.detach().double().flatten()])
    return float(z[torch.isfinite(z)].abs().max()) / temperature


def _magnitude(s, t, spec) -> torch.Tensor:
    """Per position, the largest sum_v a_v |log a_v - log b_v| over the pairs the spec's KLs may take (a teacher
    p or student q, b either or one of their mixtures), from float64 probabilities; at least 1 (tv's)."""
    p, q = _probs(t.detach(), spec.temperature), _probs(s.detach(), spec.temperature)
    _, mix = _shape(spec)
    others = [p, q] + ([mix * p + (1 - mix) * q, mix * q + (1 - mix) * p] if mix else [])
    sums = [torch.where(a > 0, a * (a.log() - b.log()).abs(), torch.zeros_like(a)).sum(-1) for a in (p, q)
            for b in others]
    return torch.stack(sums).max(0).values.clamp_min(1.0)


def _bound(s, t, spec, u=U, positions=None) -> float:
    """divergence_bound for one position's value (the largest over the positions), or for the sum over
    `positions` (a bool mask) of them."""
    weight, mix = _shape(spec)
    m = _magnitude(s, t, spec)
    z = _max_logit(s, t, spec.temperature)
    if positions is None:
        return divergence_bound(V, z, float(m.max()), weight=weight, mix=mix, u=u)
    return divergence_bound(V, z, float(m[positions].sum()), weight=weight, mix=mix, tokens=int(positions.sum()), u=u)


def _gradient_bound(s, t, spec) -> float:
    """divergence_gradient_bound for one position (the largest over the positions), in float32."""
    weight, mix = _shape(spec)
    return divergence_gradient_bound(V, _max_logit(s, t, spec.temperature), float(_magnitude(s, t, spec).max()),
                                     weight=weight, mix=mix, temperature=spec.temperature)


def test_every_divergence_is_listed():
    assert {s.name for s in SPECS} == set(DIVERGENCES)
    with pytest.raises(ValueError):
        DivergenceSpec("chi2")
    with pytest.raises(ValueError):
        DivergenceSpec("jsd", beta=1.5)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-b{s.beta}-a{s.alpha}-m{s.mix}-T{s.temperature}")
def test_matches_direct_formula(spec):
    s, t = _logits(3, 5, V, seed=1), _logits(3, 5, V, seed=2)
    want = reference(s, t, spec)
    # float64 both: kltd's and the reference's evaluations (the same roundings: exp, a sum of V, logs) are each
    # within divergence_bound at u = 2**-53 of the exact value (some 1e-13 here)
    float64 = _bound(s, t, spec, u=U64)
    torch.testing.assert_close(token_divergence(s, t, spec), want, rtol=0, atol=2 * float64)
    # float32 inputs run in float32 and stay within float32's bound (some 1e-5 to 1e-3 here) of the reference on
    # the same (float32-rounded) logits, itself within float64's
    s32, t32 = s.float(), t.float()
    got32 = token_divergence(s32, t32, spec)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), reference(s32.double(), t32.double(), spec), rtol=0,
                               atol=_bound(s32, t32, spec) + float64)
    assert (want >= -float64).all()  # a divergence is >= 0: the reference is, to its own rounding


def test_jsd_endpoints_and_scaled_continuity():
    s, t = _logits(4, V, seed=3), _logits(4, V, seed=4)
    fwd = token_divergence(s, t, DivergenceSpec("forward_kl"))
    rev = token_divergence(s, t, DivergenceSpec("reverse_kl"))
    torch.testing.assert_close(token_divergence(s, t, DivergenceSpec("jsd", beta=0.0)), fwd)
    torch.testing.assert_close(token_divergence(s, t, DivergenceSpec("jsd", beta=1.0)), rev)
    # TRL's mixture form vanishes as beta -> 0 or 1 (the endpoints are special-cased) ...
    assert (token_divergence(s, t, DivergenceSpec("jsd", beta=1e-6)) < 1e-4 * fwd).all()
    # ... the scaled one tends to the KLs
    torch.testing.assert_close(token_divergence(s, t, DivergenceSpec("jsd_scaled", beta=1e-6)), fwd, rtol=1e-4, atol=0)
    torch.testing.assert_close(token_divergence(s, t, DivergenceSpec("jsd_scaled", beta=1 - 1e-6)), rev, rtol=1e-4, atol=0)
    # symmetric JSD at beta = 0.5, bounded by log 2
    half = token_divergence(s, t, DivergenceSpec("jsd", beta=0.5))
    torch.testing.assert_close(half, token_divergence(t, s, DivergenceSpec("jsd", beta=0.5)))
    assert (half <= math.log(2)).all()


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_probabilities_give_no_nan(name):
    """-inf logits (a masked vocabulary) in float32: finite values, finite gradients."""
    spec = DivergenceSpec(name, beta=0.3, alpha=0.2)
    s, t = _logits(6, V, seed=5, dtype=torch.float32), _logits(6, V, seed=6, dtype=torch.float32)
    s[:, :3] = -math.inf  # both models give tokens 0..2 probability 0
    t[:, :3] = -math.inf
    s.requires_grad_()
    value = token_divergence(s, t, spec)
    assert torch.isfinite(value).all()
    # float32 against the float64 reference on the live tokens: float32's bound (the sums run over all V entries,
    # the zeros adding exactly), plus the reference's own at float64
    live_s, live_t = s.detach()[:, 3:], t[:, 3:]
    torch.testing.assert_close(value.double(), reference(live_s, live_t, spec), rtol=0,
                               atol=_bound(live_s, live_t, spec) + _bound(live_s, live_t, spec, u=U64))
    value.sum().backward()
    assert torch.isfinite(s.grad).all() and (s.grad[:, :3] == 0).all()


def test_one_sided_zero_probabilities():
    """p = 0 where q > 0: forward KL, JSD, skew KLs, TV stay finite; reverse KL is +inf (true value), not NaN."""
    s, t = _logits(2, V, seed=7, dtype=torch.float32), _logits(2, V, seed=8, dtype=torch.float32)
    t[:, 0] = -math.inf
    for name in ("forward_kl", "jsd", "jsd_scaled", "skew_kl", "skew_reverse_kl", "tv"):
        s_ = s.clone().requires_grad_()
        v = token_divergence(s_, t, DivergenceSpec(name, beta=0.5, alpha=0.1))
        v.sum().backward()
        assert torch.isfinite(v).all() and torch.isfinite(s_.grad).all(), name
    assert torch.isposinf(token_divergence(s, t, DivergenceSpec("reverse_kl"))).all()


@pytest.mark.parametrize("spec", SPECS[::2], ids=lambda s: f"{s.name}-T{s.temperature}")
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_chunked_equals_unchunked(spec, chunk_size):
    s = _logits(3, 6, V, seed=9, dtype=torch.float32).requires_grad_()
    t = _logits(3, 6, V, seed=10, dtype=torch.float32)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    upstream = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))  # a non-uniform upstream gradient

    full = token_divergence(s, t, spec) * mask
    (g_full,) = torch.autograd.grad((full * upstream).sum(), s)
    chunked = chunked_token_divergence(s, t, mask, spec, chunk_size=chunk_size)
    (g_chunk,) = torch.autograd.grad((chunked * upstream).sum(), s)
    # two float32 evaluations of the same values (chunks of other sizes may block the sums otherwise), each
    # within float32's bound of the exact value; a gradient entry is upstream x the position's gradient (one
    # more rounding of the product)
    torch.testing.assert_close(chunked, full, rtol=0, atol=2 * _bound(s, t, spec))
    up = float(upstream.abs().max())
    torch.testing.assert_close(g_chunk, g_full, rtol=0,
                               atol=2 * (up * _gradient_bound(s, t, spec) + U * float(g_full.abs().max())))
    assert (chunked[~mask] == 0).all() and (g_chunk[~mask] == 0).all()


def test_chunked_ignores_garbage_at_masked_out_positions_and_upcasts():
    s = _logits(2, 4, V, seed=11, dtype=torch.bfloat16).requires_grad_()
    t = _logits(2, 4, V, seed=12, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    t = t.clone()
    t[~mask] = float("nan")  # padding logits must not leak
    out = chunked_token_divergence(s, t, mask, DivergenceSpec("reverse_kl"), chunk_size=2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all() and (s.grad[~mask] == 0).all()
    want = token_divergence(s.detach().float()[mask], t.float()[mask], DivergenceSpec("reverse_kl"))
    torch.testing.assert_close(out[mask], want)


def _bucketed_reference(s, t, spec, k):
    p, q = _probs(t, spec.temperature), _probs(s, spec.temperature)
    order = p.argsort(-1, descending=True)
    top, rest = order[..., :k], order[..., k:]
    pb = torch.cat([p.gather(-1, top), p.gather(-1, rest).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q.gather(-1, top), q.gather(-1, rest).sum(-1, keepdim=True)], -1)
    return reference(qb.log(), pb.log(), DivergenceSpec(spec.name, spec.beta, spec.alpha, spec.mix, 1.0))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.name}-T{s.temperature}")
def test_topk_tail_bucket(spec):
    s, t = _logits(3, 4, V, seed=13), _logits(3, 4, V, seed=14)
    exact = token_divergence(s, t, spec)
    for k in (1, 3, 6):
        got = topk_token_divergence(s, t, spec, k)
        torch.testing.assert_close(got, _bucketed_reference(s, t, spec, k), rtol=1e-9, atol=1e-12)
        assert (got <= exact + 1e-12).all()  # lumping never increases an f-divergence
    # with k = V - 1 the tail is a single token: exact, values and gradients
    s_ = s.clone().requires_grad_()
    (g_top,) = torch.autograd.grad(topk_token_divergence(s_, t, spec, V - 1).sum(), s_)
    (g_ex,) = torch.autograd.grad(token_divergence(s_, t, spec).sum(), s_)
    torch.testing.assert_close(topk_token_divergence(s, t, spec, V - 1), exact)
    torch.testing.assert_close(g_top, g_ex)
    torch.testing.assert_close(topk_token_divergence(s, t, spec, V + 5), exact)


def test_topk_chunked_matches_and_empty_tail_is_finite():
    s = _logits(2, 5, V, seed=15, dtype=torch.float32).requires_grad_()
    t = _logits(2, 5, V, seed=16, dtype=torch.float32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    spec = DivergenceSpec("forward_kl")
    a = chunked_token_divergence(s, t, mask, spec, chunk_size=3, top_k=4)
    b = topk_token_divergence(s, t, spec, 4)
    (ga,) = torch.autograd.grad(a.sum(), s)
    (gb,) = torch.autograd.grad(b.sum(), s)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    # the teacher puts all its mass on its top-k: tail bucket is empty for p, and gradients stay finite
    t2 = t.clone()
    t2[..., 4:] = -math.inf
    v = topk_token_divergence(s, t2, spec, 4)
    (g,) = torch.autograd.grad(v.sum(), s)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()


# ---------------------------------------------------------------------------------------------------------
# Parity with TRL's GKDTrainer.generalized_jsd_loss


def _trl_jsd():
    pytest.importorskip("trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "trl.experimental is unstable"
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:  # older layouts
            from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_trl_generalized_jsd_parity(beta, temperature):
    """TRL: per-token jsd summed over the vocabulary; labels == -100 drop positions; "batchmean" divides the
    sum by the number of kept tokens (our normalization="token"), "sum" sums, "none" returns kept tokens."""
    trl_loss = _trl_jsd()
    from kltd.objectives.losses import normalize

    s = _logits(3, 7, V, seed=17, dtype=torch.float32)
    t = _logits(3, 7, V, seed=18, dtype=torch.float32)
    labels = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(1))
    labels[0, 4:] = -100
    labels[2, :2] = -100
    mask = labels != -100
    spec = DivergenceSpec("jsd", beta=beta, temperature=temperature)

    # ours and TRL's: two float32 evaluations of the same sums (TRL sums all kept tokens' V terms at once), each
    # within float32's bound of the exact value; "batchmean" divides the sum over the kept tokens by their count
    # (one more rounding of the loss), and so is each token's gradient
    n = int(mask.sum())
    total = _bound(s, t, spec, positions=mask)
    s1 = s.clone().requires_grad_()
    ours = normalize(chunked_token_divergence(s1, t, mask, spec, chunk_size=5), mask, "token")
    s2 = s.clone().requires_grad_()
    theirs = trl_loss(s2, t, labels=labels, beta=beta, temperature=temperature, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2 * (total / n + U * float(theirs.detach().abs())))
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0,
                               atol=2 * (_gradient_bound(s, t, spec) / n + U * float(s2.grad.abs().max())))

    per_token = token_divergence(s, t, spec)
    kw = dict(labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(per_token[mask], trl_loss(s, t, reduction="none", **kw).sum(-1), rtol=0,
                               atol=2 * _bound(s, t, spec))
    torch.testing.assert_close(per_token[mask].sum(), trl_loss(s, t, reduction="sum", **kw), rtol=0, atol=2 * total)


@pytest.mark.parametrize("top_k", [None, 3])
def test_chunked_saves_no_vocabulary_sized_tensor(top_k):
    """Autograd keeps only the logits themselves (by reference), even from a non-contiguous view."""
    full = _logits(2, 9, V, seed=19, dtype=torch.float32).requires_grad_()
    s = full[:, :-1]  # the trainer's shifted view
    t = _logits(2, 8, V, seed=20, dtype=torch.float32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    spec = DivergenceSpec("jsd", beta=0.5, temperature=2.0)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        out = chunked_token_divergence(s, t, mask, spec, chunk_size=4, top_k=top_k)
    big = [x for x in saved if x.numel() >= s.numel()]
    inputs = (full.untyped_storage().data_ptr(), t.untyped_storage().data_ptr())
    assert all(x.untyped_storage().data_ptr() in inputs for x in big)
    assert len(big) <= 2
    (g,) = torch.autograd.grad(out.sum(), full)
    (g_ref,) = torch.autograd.grad(
        (topk_token_divergence(s, t, spec, top_k) if top_k else token_divergence(s, t, spec)).sum(), full
    )
    torch.testing.assert_close(g, g_ref)
    assert (g[:, -1] == 0).all()


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("value", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_the_table_entries_kl_weights_and_leaning_are_what_it_computes(name, value):
    """Each entry of the divergence table says where it is a weighting of the two KLs (the fused head's closed
    form and the matrix's one-direction rule read it): that must be what the formula computes; and a blend is
    filed under the KL that carries at least as much weight."""
    from kltd.objectives.divergences import kl_weights
    from kltd.schema.divergences import FORWARD, REVERSE, entry

    d = entry(name)
    spec = DivergenceSpec(name, **({d.parameter: value} if d.parameter else {}))
    torch.manual_seed(0)
    student, teacher = torch.randn(6, V, dtype=torch.float64), torch.randn(6, V, dtype=torch.float64)
    weights = kl_weights(spec)
    if weights is not None:
        p, q = _probs(teacher, 1.0), _probs(student, 1.0)
        torch.testing.assert_close(token_divergence(student, teacher, spec), weights[0] * _kl(p, q) + weights[1] * _kl(q, p))
        assert d.leans(spec.parameter) == (REVERSE if weights[1] > weights[0] else FORWARD)
    assert d.direction(spec.parameter) in (None, FORWARD, REVERSE)
    assert d.tag(spec.parameter) == (f"{name}({value:g})" if d.parameter else name)
