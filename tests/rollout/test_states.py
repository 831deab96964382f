"""The prefix axis: where states come from, mixtures, schedules and the hand-off."""

import pytest
import torch

from kltd.schema.config import PrefixConfig
from kltd.train.models import load_model, load_tokenizer
from kltd.rollout.batch import decode_responses
from kltd.rollout.sampling import sample
from kltd.rollout.sampling import Sampler
from kltd.rollout.noise import RowNoise
from kltd.rollout.states import StateSource, student_fraction_at
from kltd.data.addition import make_splits
from tests.support.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("m")
    teacher = load_model(str(make_tiny_model(root / "t", seed=1))).eval()
    student = load_model(str(make_tiny_model(root / "s", seed=2))).eval()
    tokenizer = load_tokenizer(str(root / "t"))
    train, _ = make_splits(0, 200, 4)
    return teacher, student, tokenizer, train


def source(parts, teacher_temperature=1.0, **prefix):
    teacher, student, tokenizer, _ = parts
    return StateSource(PrefixConfig(**prefix), student=Sampler(student, tokenizer, 12),
                       teacher=Sampler(teacher, tokenizer, 12, temperature=teacher_temperature), tokenizer=tokenizer)


def test_fixed_states_are_the_dataset_responses(parts):
    *_, tokenizer, train = parts
    batch, counts = source(parts, source="fixed").build(train[:5], torch.Generator().manual_seed(0))
    assert decode_responses(tokenizer, batch.responses) == [e.response for e in train[:5]]
    assert not batch.from_student.any() and counts.student_generated == counts.teacher_generated == 0


def test_student_states_depend_on_the_student(parts):
    batch, counts = source(parts, source="student").build(parts[3][:5], torch.Generator().manual_seed(0))
    assert batch.from_student.all() and torch.equal(batch.student_written, batch.responses.mask)
    assert counts.student_generated == batch.responses.num_tokens and counts.teacher_generated == 0


def test_mixed_coins_follow_the_student_fraction(parts):
    src = source(parts, source="mixed", student_fraction=0.3, other="teacher")
    batch, counts = src.build(parts[3][:200], torch.Generator().manual_seed(0))
    share = batch.from_student.float().mean().item()
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 200) ** 0.5
    assert counts.student_generated > 0 and counts.teacher_generated > 0


def test_linear_schedule_ramps_the_fraction():
    mix = PrefixConfig(source="mixed", schedule="linear", student_fraction_start=0.0, student_fraction=1.0,
                       schedule_steps=10)
    assert [student_fraction_at(mix, s) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("supervise", ["all", "after_handoff"])
def test_handoff_student_writes_k_tokens_then_the_teacher_continues(parts, supervise):
    teacher, student, tokenizer, train = parts
    src = source(parts, teacher_temperature=0.0, source="mixed", student_fraction=1.0, handoff=True,
                 handoff_k="fixed", handoff_k_value=3, supervise=supervise)
    examples = train[:6]
    batch, counts = src.build(examples, torch.Generator().manual_seed(0))
    eos = tokenizer.eos_token_id
    for row in range(len(examples)):
        tokens = batch.responses.tokens[row][batch.responses.mask[row]].tolist()
        written = batch.student_written[row][batch.responses.mask[row]].tolist()
        k = sum(written)
        assert written == [True] * k + [False] * (len(tokens) - k)
        assert k == 3 or (k < 3 and tokens[-1] == eos)
        if k == 3 and eos not in tokens[:3]:
            # the rest is the (greedy) teacher's own continuation of prompt + the student's 3 tokens
            prompt = tokenizer.encode(examples[row].prompt, add_special_tokens=False)
            ids = torch.tensor([prompt + tokens[:3]])
            expected = sample(teacher, ids, torch.ones_like(ids), max_new_tokens=9, eos_id=eos,
                              pad_id=tokenizer.pad_token_id, temperature=0)
            assert tokens[3:] == expected.tokens[0][expected.mask[0]].tolist()
        supervised = batch.supervised[row][batch.responses.mask[row]].tolist()
        assert supervised == ([not w for w in written] if supervise == "after_handoff" else [True] * len(tokens))
    assert counts.student_generated > 0 and counts.teacher_generated > 0


def test_a_handoff_row_at_k_0_is_still_the_students(parts):
    """The coin chose the student and the hand-off point came up 0: the teacher wrote every token, yet the row
    is a draw of the hand-off distribution (its prefix term is an empty score function, so 0), not a fixed
    row (whose prefix term is cross-entropy on its tokens), and it was written live (no cache serves it)."""
    examples = parts[3][:6]
    handoff = dict(source="mixed", handoff=True, handoff_k="fixed", handoff_k_value=0)
    batch, counts = source(parts, student_fraction=1.0, **handoff).build(examples, torch.Generator().manual_seed(0))
    assert not batch.student_written.any() and counts.student_generated == 0 and counts.teacher_generated > 0
    assert batch.from_student.all()
    assert batch.select([4, 1]).from_student.all() and all(p.from_student.all() for p in batch.by_length(3))
    fixed, _ = source(parts, student_fraction=0.0, **handoff).build(examples, torch.Generator().manual_seed(0))
    assert not fixed.from_student.any()


def test_handoff_points_by_distribution(parts):
    train = parts[3]
    def noise(n):
        return RowNoise(seed=0, step=0, rows=tuple(range(n)))

    uniform = source(parts, source="mixed", handoff=True, handoff_k="uniform")._handoff_points(train[:300], noise(300))
    assert min(uniform) == 0 and max(uniform) > 20
    many = train[:2000] if len(train) >= 2000 else train * 10
    geometric = source(parts, source="mixed", handoff=True, handoff_k="geometric", handoff_p=0.25)._handoff_points(
        many, noise(len(many)))
    mean = sum(geometric) / len(geometric)
    assert abs(mean - 3.0) < 0.5  # failures before the first success: (1 - p) / p


@pytest.mark.parametrize("prefix", [dict(source="student"), dict(source="teacher"),
                                    dict(source="mixed", student_fraction=0.5, other="teacher"),
                                    dict(source="mixed", student_fraction=0.7, handoff=True, handoff_k="geometric"),
                                    dict(source="mixed", student_fraction=1.0, handoff=True, handoff_k="uniform")])
def test_a_rows_state_does_not_depend_on_how_the_batch_is_split(parts, prefix):
    """What lets N processes sample the global batch of one: each row's draws are its own (kltd.rollout.noise)."""
    *_, tokenizer, train = parts
    src, examples = source(parts, **prefix), train[:8]
    whole, _ = src.build(examples, RowNoise(seed=3, step=5, rows=tuple(range(8))), step=5)
    halves = [src.build(examples[i:i + 4], RowNoise(seed=3, step=5, rows=tuple(range(i, i + 4))), step=5)[0]
              for i in (0, 4)]
    split = [row for half in halves for row in decode_responses(tokenizer, half.responses)]
    assert split == decode_responses(tokenizer, whole.responses)
    assert [int(r.sum()) for h in halves for r in h.from_student] == [int(r.sum()) for r in whole.from_student]
    other_step, _ = src.build(examples, RowNoise(seed=3, step=6, rows=tuple(range(8))), step=5)
    assert decode_responses(tokenizer, other_step.responses) != decode_responses(tokenizer, whole.responses)
