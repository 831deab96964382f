"""The paper's metrics: Pass@k against enumeration, Avg@k, truncation, intervals, batches sized to the budget."""

import itertools
import math

import pytest
import torch

from kltd.report.bootstrap import interval, paired_interval
from kltd.schema.config import ConfigError, EvalConfig
from kltd.train.evaluation import pass_at_k, question_pass_at_k, questions_per_call


def enumerated_pass_at_k(outcomes: list[bool], k: int) -> float:
    """The share of all k-subsets of the samples that hold a correct one: the quantity the estimator is unbiased for."""
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_pass_at_k_equals_the_share_of_k_subsets_with_a_correct_sample(n):
    for correct in range(n + 1):
        outcomes = [True] * correct + [False] * (n - correct)
        for k in range(1, n + 1):
            assert question_pass_at_k(outcomes, k) == pytest.approx(enumerated_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_by_hand():
    assert question_pass_at_k([True, False, False, False], 2) == pytest.approx(1 - 3 / 6)  # 1 - C(3,2)/C(4,2)
    assert question_pass_at_k([True, True, False, False, False], 3) == pytest.approx(1 - 1 / 10)  # 1 - C(3,3)/C(5,3)
    assert question_pass_at_k([False] * 4, 4) == 0.0 and question_pass_at_k([True, False], 2) == 1.0
    assert pass_at_k([[True, False, False, False], [False] * 4], 2) == pytest.approx(0.25)


def test_intervals_hold_the_mean_and_collapse_on_constant_values():
    assert interval([0.3] * 50) == pytest.approx((0.3, 0.3))
    values = [i % 3 / 2 for i in range(90)]
    low, high = interval(values)
    assert min(values) <= low <= sum(values) / len(values) <= high <= max(values)
    assert interval(values) == interval(values)  # seeded
    assert paired_interval(values, values) == (0.0, 0.0)
    assert paired_interval(values, [v - 0.1 for v in values]) == pytest.approx((0.1, 0.1))
    with pytest.raises(ValueError):
        paired_interval([1.0], [1.0, 2.0])


def test_a_bernoulli_interval_is_as_wide_as_the_normal_approximation_says():
    """400 questions, half right: standard error 0.025, a 95% interval 2 x 1.96 x 0.025 = 0.098 wide. The bootstrap's
    percentiles from 1000 resamples move by about sqrt(0.025 x 0.975 / 1000) / (phi(1.96) / 0.025) = 0.0021 each,
    and a mean of 400 0/1 values moves in steps of 0.0025: 0.012 covers both ends with room."""
    low, high = interval([1.0, 0.0] * 200, resamples=1000)
    assert high - low == pytest.approx(2 * 1.96 * 0.025, abs=0.012)
    assert low < 0.5 < high


def test_questions_per_call_follow_the_token_budget():
    settings = EvalConfig(batch_size=200, max_new_tokens=64, pass_k=4, max_batch_tokens=131072)
    assert questions_per_call(settings, longest_prompt=36) == 200  # 200 x 4 x 100 = 80,000 tokens fit
    long = EvalConfig(batch_size=200, max_new_tokens=32768, pass_k=4, samples=8, max_batch_tokens=131072)
    assert questions_per_call(long, longest_prompt=200) == 1  # 8 rows of 32,968 tokens pass the limit: one, never none
    assert questions_per_call(EvalConfig(max_new_tokens=4096, pass_k=4), longest_prompt=100) == 7  # 131072 // 16784


def test_samples_below_k_and_unknown_sets_are_refused():
    from kltd.schema.config import Config

    with pytest.raises(ConfigError, match="eval.samples=2 is below eval.pass_k=4"):
        EvalConfig(samples=2, pass_k=4).check()
    cfg = Config()
    cfg.eval.sets = ["heldout", "gsm9k"]
    with pytest.raises(ConfigError, match="'gsm9k', which is not an evaluation set"):
        cfg.check()
    cfg.eval.sets = []
    with pytest.raises(ConfigError, match="eval.sets is empty"):
        cfg.check()


@pytest.fixture(scope="module")
def toy():
    from kltd.data.addition import make_splits
    from kltd.train.models import load_pair

    pair = load_pair("toy/teacher", "toy/student", device="cpu")
    _, held_out = make_splits(0, 0, 6)
    return pair, held_out


def test_avg_and_pass_at_k_come_from_the_same_samples_and_a_tight_budget_cuts_every_response(toy):
    from kltd.data.addition import is_correct
    from kltd.train.evaluation import evaluate

    pair, held_out = toy
    settings = EvalConfig(num_prompts=6, batch_size=6, max_new_tokens=24, pass_k=2, samples=4)
    result = evaluate(pair.student, pair.teacher, pair.tokenizer, held_out, settings, checker=is_correct)
    per = result["per_question"]
    assert result["samples"] == 4 and result["pass_k"] == 2 and len(per["avg_at_k"]) == 6
    assert result["avg_at_k"] == pytest.approx(sum(per["avg_at_k"]) / 6)
    for avg, passed in zip(per["avg_at_k"], per["pass_at_k"]):  # from c = 4 x Avg correct samples of 4
        c = round(avg * 4)
        assert passed == pytest.approx(question_pass_at_k([True] * c + [False] * (4 - c), 2))
    for key in ("avg_at_k", "pass_at_k", "response_length", "truncated", "student_entropy", "accuracy"):
        low, high = result["intervals"][key]
        assert low <= result[key] + 1e-12 and result[key] - 1e-12 <= high
    tight = evaluate(pair.student, pair.teacher, pair.tokenizer, held_out,
                     EvalConfig(num_prompts=6, batch_size=6, max_new_tokens=2, pass_k=2), checker=is_correct)
    # every answer of the task is longer than 2 tokens: each response is cut, and is 2 tokens long
    assert tight["truncated"] == 1.0 and tight["response_length"] == 2.0


def test_without_a_teacher_there_are_no_kl_columns(toy):
    from kltd.train.evaluation import evaluate

    pair, held_out = toy
    result = evaluate(pair.student, None, pair.tokenizer, held_out, EvalConfig(num_prompts=4, batch_size=4,
                      max_new_tokens=16, pass_k=2), checker=None)
    assert "reverse_kl_student_states" not in result and "forward_kl_teacher_states" not in result
    assert "avg_at_k" not in result and result["student_entropy"] > 0 and result["teacher_tokens_generated"] == 0


def test_a_budget_of_4096_tokens_runs_on_the_toy_pair_in_batches_sized_to_it(toy):
    """The questions of the math fixtures, 4,096 tokens each: sampling calls stay under eval.max_batch_tokens."""
    from kltd.data.example import Example
    from kltd.train.evaluation import evaluate

    pair, _ = toy
    questions = [Example(f"{a}+{b}=", None, None, None, None) for a, b in ((12, 7), (3, 45), (9, 9), (31, 2))]
    settings = EvalConfig(num_prompts=4, batch_size=4, max_new_tokens=4096, pass_k=2, max_batch_tokens=3 * 4200 * 2)
    assert questions_per_call(settings, longest_prompt=6) == 3
    result = evaluate(pair.student, pair.teacher, pair.tokenizer, questions, settings, checker=None)
    assert result["questions"] == 4 and 0 < result["response_length"] <= 4096
    assert math.isfinite(result["reverse_kl_student_states"])


def test_the_chat_template_gets_data_chat_template_kwargs():
    from kltd.data.chat import PromptRenderer
    from tests.support.fixtures import chat_tokenizer

    tok = chat_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if enable_thinking is defined and not enable_thinking %}<no-think>{% endif %}")
    assert PromptRenderer(tok)("q") == "q"
    assert PromptRenderer(tok, template_kwargs={"enable_thinking": False})("q") == "q<no-think>"


def test_truncation_is_an_end_that_is_not_the_end_token():
    from kltd.rollout.batch import Responses
    from kltd.train.evaluation import _ended

    tokens = torch.tensor([[5, 1, 0], [5, 6, 7], [5, 6, 1]])  # eos = 1
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert _ended(Responses(tokens, mask), eos_id=1) == [True, False, True]
