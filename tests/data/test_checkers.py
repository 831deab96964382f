"""Answer checkers on answers in the real formats, including ones that must not match."""

import pytest

from kltd.data.checkers import get_checker, gsm8k_number
from kltd.data.example import Example
from tests.support.fixtures import GSM8K, MATH


def graded(name: str, reference: str, response: str) -> bool:
    checker = get_checker(name)
    return checker(response, Example("q", None, checker.reference(reference)))


@pytest.mark.parametrize("question,answer", GSM8K)
def test_gsm8k_reads_the_number_after_the_marks(question, answer):
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    assert graded("gsm8k", answer, f"Let me think. ... #### {gold}")
    assert graded("gsm8k", answer, f"So the answer is {int(gold):,}.")  # the last number, commas ignored


@pytest.mark.parametrize("response", ["#### 73", "The answer is 72 apples, no, 71.", "seventy-two", "", "#### 7.2"])
def test_gsm8k_refuses_wrong_or_missing_numbers(response):
    assert not graded("gsm8k", GSM8K[0][1], response)


def test_gsm8k_number_forms():
    assert gsm8k_number("costs $1,234.50 in all") == gsm8k_number("#### 1234.5")
    assert gsm8k_number("-3 degrees") == -3 and gsm8k_number("no digits") is None
    with pytest.raises(ValueError):
        get_checker("gsm8k").reference("an answer without any number")


@pytest.mark.parametrize("solution,right,wrong", [
    (MATH[0][1], "The sum is $\\boxed{0.75}$", "$\\boxed{\\frac{3}{5}}$"),
    (MATH[1][1], "$\\boxed{\\sqrt{12}}$", "$\\boxed{3\\sqrt{2}}$"),
    (MATH[2][1], "so $x=\\boxed{4}$", "$\\boxed{5}$"),
    (MATH[3][1], "\\boxed{27}", "\\boxed{28}"),
])
def test_boxed_compares_answers_by_value(solution, right, wrong):
    assert graded("boxed", solution, right)
    assert not graded("boxed", solution, wrong)
    assert not graded("boxed", solution, "I am not sure.")


def test_boxed_reads_a_bare_answer_field_and_refuses_an_unreadable_one():
    assert graded("boxed", "3/4", "$\\boxed{\\frac{3}{4}}$")
    with pytest.raises(ValueError):
        get_checker("boxed").reference("")


def test_exact_strips_and_compares_whole_answers():
    assert graded("exact", " Paris ", "Paris\n") and not graded("exact", "Paris", "paris")


def test_addition_and_none():
    assert graded("addition", "1+2=3;3", "1+2=3;3") and not graded("addition", "1+2=3;3", "1+2=4;4")
    assert get_checker("none") is None
