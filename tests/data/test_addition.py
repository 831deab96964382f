import random

import pytest

from kltd.data.addition import CHARACTERS, Example, is_correct, make_example, make_splits, parse_answer, solve


def test_example_format():
    assert solve("12+45+7+88=") == "12+45=57,57+7=64,64+88=152;152"
    assert solve("0+0=") == "0+0=0;0"
    example = make_example([12, 45, 7, 88])
    assert example == Example(prompt="12+45+7+88=", response="12+45=57,57+7=64,64+88=152;152", answer=152)


def test_splits_are_deterministic_per_seed():
    assert make_splits(3, 300, 50) == make_splits(3, 300, 50)
    assert make_splits(3, 300, 50) != make_splits(4, 300, 50)


def test_eval_split_does_not_depend_on_train_size():
    assert make_splits(0, 100, 40)[1] == make_splits(0, 500, 40)[1]


def test_splits_are_disjoint_and_without_duplicates():
    train, evaluation = make_splits(0, 20000, 500)
    assert len(train) == 20000 and len(evaluation) == 500
    train_prompts = {e.prompt for e in train}
    eval_prompts = {e.prompt for e in evaluation}
    assert len(train_prompts) == len(train) and len(eval_prompts) == len(evaluation)
    assert not train_prompts & eval_prompts


@pytest.mark.parametrize("min_terms,max_terms", [(2, 2), (2, 5), (3, 4), (5, 5)])
def test_term_count_and_range_bounds(min_terms, max_terms):
    train, evaluation = make_splits(1, 400, 100, min_terms, max_terms)
    counts = set()
    for e in train + evaluation:
        terms = [int(t) for t in e.prompt[:-1].split("+")]
        assert min_terms <= len(terms) <= max_terms
        assert all(0 <= t <= 99 for t in terms)
        counts.add(len(terms))
    assert counts == set(range(min_terms, max_terms + 1))


def test_examples_are_self_consistent_and_use_task_characters():
    train, evaluation = make_splits(2, 1000, 100)
    for e in train + evaluation:
        assert e.response == solve(e.prompt)
        assert parse_answer(e.response) == e.answer
        assert is_correct(e.response, e)
        assert set(e.prompt + e.response) <= set(CHARACTERS)


def test_solve_matches_python_arithmetic():
    rng = random.Random(123)
    for _ in range(2000):
        terms = [rng.randint(0, 99) for _ in range(rng.randint(2, 5))]
        prompt = "+".join(map(str, terms)) + "="
        response = solve(prompt)
        scratch, answer = response.split(";")
        steps = [s.replace("=", "+").split("+") for s in scratch.split(",")]
        partial = [int(step[2]) for step in steps]
        # each step restates the previous sum and the next term
        assert [int(step[0]) for step in steps] == [terms[0], *partial[:-1]]
        assert [int(step[1]) for step in steps] == terms[1:]
        assert int(answer) == eval(prompt[:-1])  # noqa: S307 - digits and '+' only
        assert partial == [eval("+".join(map(str, terms[: i + 1]))) for i in range(1, len(terms))]  # noqa: S307
        assert partial[-1] == int(answer)


@pytest.mark.parametrize("prompt", ["", "12=", "12+", "1+2", "a+b=", "1++2=", "+1+2=", "1 + 2="])
def test_solve_refuses_malformed_prompts(prompt):
    with pytest.raises(ValueError):
        solve(prompt)


def test_parse_answer_good_strings():
    assert parse_answer("12+45=57,57+7=64,64+88=152;152") == 152
    assert parse_answer("1+2=3;3") == 3
    assert parse_answer(" 1+4=5,5+7=12;12\n") == 12
    # the scratchpad is not checked against the answer: only the final answer is graded
    assert parse_answer("1+1=2,2+2=4;99") == 99


@pytest.mark.parametrize(
    "response", ["", ";", "152", "1+2=3", "1+2=3;", ";152", "57,64,152;152", "1+2=3,,3+4=7;7", "1+2=3;3;3",
                 "5+7;12", "1+2=3;1a", "1+2=;3", "x"]
)
def test_parse_answer_malformed(response):
    assert parse_answer(response) is None


def test_is_correct():
    example = make_example([12, 45, 7, 88])
    assert is_correct("12+45=57,57+7=64,64+88=152;152", example)
    assert is_correct("12+45=57,57+7=64,64+88=153;152", example)  # final answer only
    assert not is_correct("12+45=57,57+7=64,64+88=153;153", example)
    assert not is_correct("12+45=57,57+7=64,64+88=152", example)
    assert not is_correct("", example)


def test_space_too_small_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="distinct prompts"):
        make_splits(0, 9000, 1001, min_terms=2, max_terms=2)
    with pytest.raises(ValueError, match="min_terms"):
        make_splits(0, 10, 10, min_terms=1)
    with pytest.raises(ValueError, match="max_terms"):
        make_splits(0, 10, 10, min_terms=4, max_terms=3)


def test_whole_space_can_be_drawn():
    train, evaluation = make_splits(0, 9000, 1000, min_terms=2, max_terms=2)
    assert len({e.prompt for e in train + evaluation}) == 10000
