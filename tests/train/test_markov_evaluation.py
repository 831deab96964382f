"""The evaluation's exact figures on data=markov: what the shipped pair's task.json records, and what the evaluation's
own sampled figures estimate (within their standard errors)."""

import dataclasses
import json
import math

import pytest
import torch

from kltd.data.markov import MarkovSettings, make_chain
from kltd.data.prepare import prepare
from kltd.train.evaluation import evaluate
from kltd.train.models import load_pair, markov_dir
from tests.schema.test_config import compose_typed

SHIPPED = json.loads((markov_dir() / "task.json").read_text())
STARTS = len(make_chain(MarkovSettings(**SHIPPED["task"])).start_ids)  # the prompts: the states that cannot end at once
# per question: 900 questions x 10 = 9,000 student samples, 900 teacher samples. The rarest figure, the chance of a cut
# response (0.058 for the shipped student), has a standard error sqrt(p (1 - p) / n) / p = 4.2% of itself at 9,000
# samples (5.6% at 5,400): below the 5% the last check asks for
SAMPLES = 10
QUESTIONS_PER_STATE = 900 // STARTS


@pytest.fixture(scope="module")
def evaluated():
    torch.set_num_threads(1)
    cfg = compose_typed("data=markov", f"data.n_eval={STARTS * QUESTIONS_PER_STATE}")
    pair = load_pair(cfg.model.teacher, cfg.model.student, device="cpu")
    task = prepare(cfg.data, pair.tokenizer, needs_responses=True)
    settings = dataclasses.replace(cfg.eval, num_prompts=len(task.eval), batch_size=300, samples=SAMPLES, pass_k=1,
                                   intervals=200)
    result = evaluate(pair.student, pair.teacher, pair.tokenizer, task.eval, settings, checker=task.checker,
                      vocab=pair.vocab_size, exact=task.chain)
    return result, task


def test_the_exact_figures_are_the_shipped_students_recorded_ones(evaluated):
    """scripts/make_markov_task.py recorded the shipped student's exact figures, averaged over the start states; the
    evaluation computes them per start state, once each (the questions repeat the states)."""
    result, task = evaluated
    recorded = SHIPPED["models"]["student"]["exact"]
    per = result["per_question"]
    assert len(per["exact_reverse_kl"]) == STARTS
    for name, key in (("exact_reverse_kl", "reverse_kl"), ("exact_forward_kl", "forward_kl"),
                      ("exact_accepted", "student_accepted"), ("exact_response_length", "student_length"),
                      ("exact_teacher_entropy_rate", "teacher_entropy_rate")):
        assert result[name] == pytest.approx(recorded[key], rel=1e-9), name
        low, high = result["intervals"][name]
        assert low <= result[name] <= high


def within(sampled: list[float], exact: float) -> tuple[float, float]:
    """(|mean - exact| in standard errors, the standard error). Questions cycle through the start states in equal
    numbers, so the mean of the per-question values estimates the mean over states; the standard error is taken
    from the values' plain spread, which includes the spread between states and so overstates it (a safe side)."""
    n = len(sampled)
    mean = sum(sampled) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in sampled) / (n - 1) / n)
    return abs(mean - exact) / se, se


@pytest.mark.parametrize("sampled,exact", [
    ("reverse_kl_student_states", "exact_reverse_kl"),  # per-token KLs summed along student samples
    ("forward_kl_teacher_states", "exact_forward_kl"),  # ... along teacher samples
    ("avg_at_k", "exact_accepted"),  # the checker's verdicts on student samples
    ("response_length", "exact_response_length"),
    ("truncated", "exact_truncated"),
])
def test_the_sampled_figures_agree_with_the_exact_ones_within_4_standard_errors(evaluated, sampled, exact):
    result, _ = evaluated
    values = result["per_question"][sampled]
    assert len(values) == STARTS * QUESTIONS_PER_STATE
    off, se = within(values, result[exact])
    assert off < 4, f"{sampled}: {result[sampled]:.4f} vs exact {result[exact]:.4f} (se {se:.4f})"
    # the test can tell a wrong exact value: the standard error is small next to the figure
    assert se < 0.05 * result[exact]


def test_the_chain_is_the_one_the_teacher_encodes(evaluated):
    _, task = evaluated
    assert task.chain == make_chain(MarkovSettings(**SHIPPED["task"]))
