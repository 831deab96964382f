"""The teacher cache returns what the live teacher would, and is keyed by everything that matters."""

import pytest
import torch

from kltd.train.models import load_model, load_tokenizer
from kltd.rollout.batch import StateBatch, encode_prompts, encode_responses
from kltd.rollout.scoring import Scorer
from kltd.data.addition import make_splits
from kltd.train.teacher_cache import TeacherCache, cached_teacher, entry_key
from tests.support.tiny_models import make_tiny_model
from tests.support.tolerances import forward_bound


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    teacher_dir = make_tiny_model(root / "teacher", width=32, layers=2)
    teacher = load_model(str(teacher_dir)).eval()
    tokenizer = load_tokenizer(str(teacher_dir))
    train, _ = make_splits(0, 40, 4)
    return teacher, tokenizer, teacher_dir, train


def live_logits(teacher, tokenizer, examples):
    ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples], "cpu")
    batch = StateBatch(ids, mask, encode_responses(tokenizer, [e.response for e in examples], "cpu"), examples=examples)
    with torch.inference_mode():
        return batch, Scorer().logits(teacher, batch)


def tolerance(teacher, extra_terms: int = 0) -> float:
    """Logits of one forward pass in another batch composition (the cache scores its own batches): float32's bound."""
    return forward_bound(teacher.config.to_dict(), extra_terms=extra_terms)


def test_cached_logits_equal_live_logits(setup):
    teacher, tokenizer, _, train = setup
    cache = TeacherCache.build(teacher, tokenizer, train, batch_size=16)
    batch, live = live_logits(teacher, tokenizer, train[5:13])  # another batch composition and padding
    mask = batch.responses.mask
    tol = tolerance(teacher)
    assert torch.allclose(cache.lookup(batch)[mask], live[mask], atol=tol, rtol=tol)


def test_topk_format_keeps_the_top_logits_and_the_tail_mass(setup):
    teacher, tokenizer, _, train = setup
    cache = TeacherCache.build(teacher, tokenizer, train, fmt="topk", top_k=4)
    batch, live = live_logits(teacher, tokenizer, train[:6])
    mask = batch.responses.mask
    got, want = torch.log_softmax(cache.lookup(batch)[mask], -1), torch.log_softmax(live[mask].float(), -1)
    top = want.topk(4, -1).indices
    tol = tolerance(teacher, extra_terms=want.shape[-1])  # a log-softmax sums the vocabulary after the forward
    assert torch.allclose(got.gather(-1, top), want.gather(-1, top), atol=tol, rtol=tol)
    tail = torch.ones_like(want, dtype=torch.bool).scatter(-1, top, False)
    # probabilities (at most 1) summed over the tail: the log-probabilities' error, and the sum's own
    assert torch.allclose((got.exp() * tail).sum(-1), (want.exp() * tail).sum(-1), atol=2 * tol)


@pytest.mark.parametrize("fmt", ["full", "topk"])
def test_the_packed_forward_fills_the_cache_with_the_teachers_own_numbers(setup, fmt, monkeypatch):
    """The cache is filled through the packed forward (the teacher's own forward never runs) and holds what
    the teacher's own forward gives (packed=False): the same entries and offsets, values to float rounding."""
    import kltd.rollout.scoring as scoring

    teacher, tokenizer, _, train = setup
    monkeypatch.setattr(scoring, "PART_LOGITS", 7 * len(tokenizer))  # a batch's states in several parts
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in (teacher, teacher.base_model)]
    try:
        fast = TeacherCache.build(teacher, tokenizer, train, fmt=fmt, top_k=4, batch_size=16)
        assert not calls
        own = TeacherCache.build(teacher, tokenizer, train, fmt=fmt, top_k=4, batch_size=16, packed=False)
        assert calls
    finally:
        for hook in hooks:
            hook.remove()
    assert fast.index == own.index and torch.equal(fast.offsets, own.offsets) and fast.vocab_size == own.vocab_size
    assert fast.values.shape == own.values.shape and (fast.indices is None) == (fmt == "full")
    tol = tolerance(teacher, extra_terms=len(tokenizer))  # the top-k format stores log-probabilities
    torch.testing.assert_close(fast.values, own.values, atol=tol, rtol=tol)
    batch, _ = live_logits(teacher, tokenizer, train)
    mask = batch.responses.mask
    torch.testing.assert_close(fast.lookup(batch)[mask], own.lookup(batch)[mask], atol=tol, rtol=tol)


def test_second_use_is_a_hit_with_no_teacher_pass_and_changes_invalidate(setup, tmp_path):
    teacher, tokenizer, teacher_dir, train = setup
    passes = []
    kwargs = dict(cache_dir=tmp_path, dtype="float32", counter=passes.append, echo=lambda *_: None)
    cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, **kwargs)
    first = len(passes)
    assert first > 0
    cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, **kwargs)
    assert len(passes) == first  # warm: no teacher forward pass
    cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train[:-1], **kwargs)
    assert len(passes) > first  # other examples: a new entry
    n = len(passes)
    cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, **{**kwargs, "fmt": "topk"})
    assert len(passes) > n  # other format: a new entry
    (teacher_dir / "extra.txt").write_text("changed")  # any change to the teacher's files
    n = len(passes)
    cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, **kwargs)
    assert len(passes) > n
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 4 and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("fmt", ["full", "topk"])
def test_the_entry_fills_lazily_with_the_examples_a_run_needs(setup, tmp_path, fmt):
    teacher, tokenizer, teacher_dir, train = setup
    passes = []
    kwargs = dict(cache_dir=tmp_path, dtype="float32", fmt=fmt, top_k=4, counter=passes.append,
                  echo=lambda *_: None)
    first = cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, needed=train[:10], **kwargs)
    assert len(first) == 10 and len(passes) == 1
    again = cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, needed=train[2:8], **kwargs)
    assert len(passes) == 1 and len(again) == 10  # all there: no teacher pass
    grown = cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, needed=train[5:25], **kwargs)
    assert len(passes) == 2 and len(grown) == 25  # only the 15 missing ones were scored
    stored = TeacherCache.load(next(tmp_path.glob("teacher-*.pt")))
    whole = TeacherCache.build(teacher, tokenizer, train[:25], fmt=fmt, top_k=4)
    for cache in (grown, stored):  # every entry equals a cache built in one go, whatever the order of filling
        batch, _ = live_logits(teacher, tokenizer, train[:25])
        mask = batch.responses.mask
        tol = tolerance(teacher, extra_terms=len(tokenizer))  # batches of other examples; top-k: log-probabilities
        assert torch.allclose(cache.lookup(batch)[mask], whole.lookup(batch)[mask], atol=tol, rtol=tol)


def test_merging_keeps_entries_written_by_another_job(setup, tmp_path):
    teacher, tokenizer, teacher_dir, train = setup
    kwargs = dict(cache_dir=tmp_path, dtype="float32", echo=lambda *_: None)
    cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, needed=train[:6], **kwargs)
    path = next(tmp_path.glob("teacher-*.pt"))

    def another_job_stores_its_entries(_passes):  # runs while this job scores its missing examples
        TeacherCache.build(teacher, tokenizer, train[20:30]).merged(TeacherCache.load(path)).save(path)

    cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), train, needed=train[6:12],
                   counter=another_job_stores_its_entries, **kwargs)
    assert set(TeacherCache.load(path).index) == {entry_key(e) for e in train[:12] + train[20:30]}


def test_one_prompt_with_several_responses_keeps_an_entry_for_each(setup, tmp_path):
    """The Markov task's prompts repeat (one per start state), each with many responses: an entry per pair, and a
    lookup gives each row its own response's logits."""
    from kltd.data.example import Example

    teacher, tokenizer, teacher_dir, train = setup
    same = [Example(train[0].prompt, response) for response in ("1+2=3;3", "40+2=42;42", "1+2=3;3")]
    cache = cached_teacher(teacher, tokenizer, str(teacher_dir), str(teacher_dir), same, cache_dir=tmp_path,
                           dtype="float32", echo=lambda *_: None)
    assert len(cache) == 2
    batch, live = live_logits(teacher, tokenizer, same)
    stored = cache.lookup(batch)
    mask, tol = batch.responses.mask, tolerance(teacher)
    assert torch.allclose(stored[mask], live[mask], atol=tol, rtol=tol)
