"""Per-position curves: exact means, and no tail resting on a handful of long responses."""

import math

import pytest
import torch

from kltd.train.evaluation import PositionCurve
from tests.support.tolerances import llama_chain, two_orders


def metric_bound(pair, result: dict, value: float) -> float:
    """How far two float32 evaluations of an evaluation's mean divergence or entropy (`value`) can be apart: per
    token both models' forward chains and vocabularies, then the mean over the generated tokens; the magnitude
    per token is the divergence's own plus 2 ln V (tests/support/tolerances.py, divergence_magnitude)."""
    vocab = pair.vocab_size or pair.student.config.vocab_size
    tokens = result["student_tokens_generated"] + result["teacher_tokens_generated"]
    chains = sum(llama_chain(m.config.to_dict()) for m in (pair.student, pair.teacher))
    return two_orders(tokens + 2 * vocab + chains, abs(value) + 2 * math.log(vocab))


def test_means_by_position_and_the_tail_that_too_few_sequences_reach_is_dropped():
    curve = PositionCurve()
    lengths = [3] * 60 + [5] * 38 + [9] * 2  # 100 sequences; only 2 (2%) reach positions 5..8
    values = torch.arange(1.0, 101.0).unsqueeze(1).expand(100, 9)  # row i holds i + 1 everywhere
    mask = torch.arange(9).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    curve.add(values[:50], mask[:50])  # in two batches, as evaluation adds them
    curve.add(values[50:], mask[50:])
    means = curve.means()
    assert len(means) == 5  # positions 0..4 are reached by >= 5% of the sequences, 5..8 by 2%
    # integers below 2**24 add up exactly in float32; a mean is one rounding (u = 6e-8), within approx's 1e-6
    assert means[0] == pytest.approx(values[:, 0].mean().item())
    assert means[4] == pytest.approx(values[60:, 0].mean().item())  # the 40 sequences of length >= 5


def test_an_empty_curve_has_no_means():
    assert PositionCurve().means() == []


@pytest.mark.parametrize("lean", [True, False])
def test_evaluation_decodes_as_sampling_lean_decoder_says(lean, monkeypatch):
    """Every sampling call of the evaluation picks its decoder with the run's lean_decoder setting, and the
    numbers do not depend on it (same samples either way)."""
    import kltd.rollout.sampling as sampling
    from kltd.data.addition import is_correct, make_splits
    from kltd.schema.config import EvalConfig
    from kltd.train.evaluation import evaluate
    from kltd.train.models import load_pair

    asked = []
    plain = sampling.decoder_for
    monkeypatch.setattr(sampling, "decoder_for", lambda model, lean_: asked.append(lean_) or plain(model, lean_))
    pair = load_pair("toy/teacher", "toy/student", device="cpu")
    _, held_out = make_splits(0, 0, 6)
    settings = EvalConfig(num_prompts=6, batch_size=6, max_new_tokens=24, pass_k=2)
    result = evaluate(pair.student, pair.teacher, pair.tokenizer, held_out, settings, checker=is_correct, lean=lean)
    assert asked and set(asked) == {lean}
    other = evaluate(pair.student, pair.teacher, pair.tokenizer, held_out, settings, checker=is_correct, lean=not lean)
    assert result["accuracy"] == other["accuracy"] and result["response_length"] == other["response_length"]
    key = "reverse_kl_student_states"  # the same samples, scored by another decoder's forward: float32's bound
    assert result[key] == pytest.approx(other[key], rel=0, abs=metric_bound(pair, result, other[key]))


def test_lean_evaluation_scores_through_the_packed_forward_with_the_models_own_numbers(monkeypatch):
    """lean=True: no model's own forward runs anywhere in the evaluation (the lean decoder samples, the packed
    forward scores), and every metric equals lean=False, the models' own forward throughout: counts and
    grades exactly, divergences, entropy and per-position curves to float rounding."""
    import kltd.rollout.scoring as scoring
    from kltd.data.addition import is_correct, make_splits
    from kltd.schema.config import EvalConfig
    from kltd.train.evaluation import evaluate
    from kltd.train.models import load_pair

    pair = load_pair("toy/teacher", "toy/student", device="cpu")
    # logits a few rows at a time, so the states of a batch come back in several parts
    monkeypatch.setattr(scoring, "PART_LOGITS", 40 * pair.vocab_size)
    _, held_out = make_splits(0, 0, 12)
    settings = EvalConfig(num_prompts=12, batch_size=5, max_new_tokens=24, pass_k=3)  # 3 batches, the last short
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1))
             for model in (pair.student, pair.teacher) for m in (model, model.base_model)]

    def run(lean: bool) -> dict:
        return evaluate(pair.student, pair.teacher, pair.tokenizer, held_out, settings, checker=is_correct,
                        lean=lean, vocab=pair.vocab_size)

    scored = []  # (model, rows): a model's own samples are scored from its sampler's logits, never again
    plain_rows = scoring.Scorer.logit_rows
    monkeypatch.setattr(scoring.Scorer, "logit_rows", lambda self, model, batch: scored.append(
        (model, batch.responses.tokens.shape[0])) or plain_rows(self, model, batch))
    fast = run(lean=True)
    assert not calls
    # per batch: the teacher on the student's k samples per prompt, the student on the teacher's one
    assert [(m is pair.teacher, n) for m, n in scored] == [(True, 15), (False, 5), (True, 15), (False, 5),
                                                             (True, 6), (False, 2)]
    scored.clear()
    own = run(lean=False)
    assert calls
    assert len(scored) == 12  # the models' own forward scores both models on both sets of samples
    for hook in hooks:
        hook.remove()
    exact = ("accuracy", "pass_at_k", "pass_k", "response_length", "student_tokens_generated",
             "teacher_tokens_generated")
    assert {k: fast[k] for k in exact} == {k: own[k] for k in exact}
    assert fast["response_length"] > 0 and fast["reverse_kl_student_states"] > 0.01
    for key in ("reverse_kl_student_states", "forward_kl_teacher_states", "student_entropy"):
        assert fast[key] == pytest.approx(own[key], rel=0, abs=metric_bound(pair, own, own[key])), key
    # a position's mean: fewer tokens than the whole mean (metric_bound counts them all), its own size
    for name, curve in own["divergence_by_position"].items():
        assert len(curve) > 5 and fast["divergence_by_position"][name] == pytest.approx(
            curve, rel=0, abs=metric_bound(pair, own, max(curve))), name
