"""The Markov task: the teacher model is the chain, the exact sequence-level figures agree with a direct sum over
every response and with Monte-Carlo estimates from kltd's own sampler, and the shipped models are reproducible."""

import dataclasses
import importlib.util
import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kltd
from kltd.data.markov import EOS_ID, MIN_SHARE, MarkovSettings, build_tokenizer, make_chain
from kltd.data.markov_models import student_model, teacher_model, warm_up
from kltd.rollout.exact_kl import exact_sequence_figures, exact_sequence_kl
from kltd.rollout.sampling import Sampler

REPO = Path(kltd.__file__).resolve().parents[1]
ASSETS = Path(kltd.__file__).parent / "assets" / "markov"
F32 = torch.finfo(torch.float32).eps


def load_script():
    spec = importlib.util.spec_from_file_location("make_markov_task", REPO / "scripts" / "make_markov_task.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def logit_tolerance(table: torch.Tensor) -> float:
    # the model computes a logit as (weight = logit / s) * (s from the norm: a division, a mean, a rsqrt), each
    # rounded once in float32: a few ulps of the largest logit; 8 leaves room for each operation's rounding
    return 8 * F32 * float(table.abs().max())


# --- the chain and the teacher model -------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [MarkovSettings(), MarkovSettings(n_states=9, branching=2, final_states=2,
                                                                       concentration=0.3, end_probability=0.6, seed=5)])
def test_the_chain_has_the_settings_support(settings):
    chain = make_chain(settings)
    assert chain == make_chain(settings)  # deterministic from the seed
    ends = 0
    for state in chain.state_ids:
        row = dict(chain.row(state))
        assert len(row) == settings.branching and math.isclose(sum(row.values()), 1.0, rel_tol=1e-12)
        end = row.pop(EOS_ID, None)
        ends += end is not None
        assert end in (None, settings.end_probability)
        mass = 1 - (end or 0.0)  # what the successor states share, each at least MIN_SHARE / k of it
        assert min(row.values()) >= mass * MIN_SHARE / len(row) * (1 - 1e-12)
    assert ends == settings.final_states
    # the prompts start where the chain cannot end at once; with every state final, anywhere
    finals = [s for s in chain.state_ids if EOS_ID in chain.row(s)]
    assert chain.start_ids == ([s for s in chain.state_ids if s not in finals] or chain.state_ids)
    assert make_chain(dataclasses.replace(settings, final_states=settings.n_states)).start_ids == chain.state_ids


@pytest.mark.parametrize("settings", [MarkovSettings(), MarkovSettings(n_states=7, branching=2, final_states=4, seed=3)])
def test_the_teacher_model_reproduces_the_table_in_any_context(settings):
    chain = make_chain(settings)
    model = teacher_model(chain)
    table = torch.tensor(chain.log_table(), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, chain.vocab_size, (16, 12), generator=gen)  # any prefix: only the last token matters
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    assert torch.allclose(logits, table[ids], rtol=0, atol=logit_tolerance(table))
    # its distribution is the chain's, up to the mass it gives tokens off the support (about e^-30 each)
    probs = logits.softmax(-1)
    wanted = torch.tensor([[chain.row(a).get(b, 0.0) for b in range(chain.vocab_size)] for a in range(chain.vocab_size)],
                          dtype=torch.float64)[ids]
    assert torch.allclose(probs, wanted, rtol=0, atol=chain.vocab_size * math.exp(-30) + 64 * F32)


def test_the_lean_decoder_samples_from_the_table():
    """kltd's sampler (the lean decoder, a KV cache, left padding) sees the same logits as the model's forward."""
    chain = make_chain(MarkovSettings())
    model, tok = teacher_model(chain), build_tokenizer(chain.settings.n_states)
    table = torch.tensor(chain.log_table(), dtype=torch.float64)
    ids = torch.tensor([[0, 2], [3, 4], [0, 5]])  # the first and last rows left-padded
    mask = (ids != 0).long()
    out = Sampler(model, tok, max_new_tokens=6, keep_logits=True)(ids, mask, torch.Generator().manual_seed(1))
    previous = torch.cat([ids[:, -1:], out.tokens[:, :-1]], 1)  # the token each logit row was computed after
    got, wanted = out.logits.double()[out.mask], table[previous[out.mask]]
    assert torch.allclose(got, wanted, rtol=0, atol=logit_tolerance(table))


def test_the_tokenizer_round_trips_and_refuses_other_characters():
    tok = build_tokenizer(4)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 1) and tok.padding_side == "left"
    assert tok.encode("abdc", add_special_tokens=False) == [2, 3, 5, 4]
    assert tok.decode([2, 3, 5, 4]) == "abdc"
    with pytest.raises(Exception):
        tok.encode("e", add_special_tokens=False)


# --- the exact figures against a direct sum over every response ---------------------------------------------


def every_response(vocab: int, horizon: int):
    """Each outcome of sampling up to `horizon` tokens: non-EOS tokens then EOS, or `horizon` non-EOS tokens."""
    go_on = [i for i in range(vocab) if i != EOS_ID]
    for length in range(horizon):
        for body in itertools.product(go_on, repeat=length):
            yield list(body) + [EOS_ID]
    yield from (list(body) for body in itertools.product(go_on, repeat=horizon))


def response_log_prob(model, prompt: list[int], response: list[int]) -> float:
    """log P(response | prompt): one sequence, the model's own forward, its log-softmax read token by token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    log_probs = logits[len(prompt) - 1: -1].log_softmax(-1)
    return float(sum(log_probs[t, token] for t, token in enumerate(response)))


@pytest.mark.parametrize("horizon,prompt_length", [(1, 1), (2, 1), (4, 1), (3, 3)])
def test_exact_figures_match_a_direct_sum_over_every_response(horizon, prompt_length):
    chain = make_chain(MarkovSettings(n_states=2, branching=2, final_states=1, horizon=horizon, seed=2))
    # in float64: the two computations run different batch shapes, whose float32 products round differently
    teacher, student = teacher_model(chain).double(), student_model(chain.vocab_size, 4, 1, seed=0).double()
    prompt = [chain.state_ids[0], chain.state_ids[0], chain.state_ids[1]][-prompt_length:]  # the student reads it all
    start = prompt[-1]
    figures = exact_sequence_figures(student, teacher, prompt, horizon=horizon, eos_id=EOS_ID,
                                     support=torch.tensor(chain.support()), batch_size=5)  # batches cut prefixes
    sums = dict.fromkeys(("p", "q", "fwd", "rev", "h_p", "h_q", "len_p", "len_q", "end_p", "end_q", "acc"), 0.0)
    for response in every_response(chain.vocab_size, horizon):
        lp, lq = response_log_prob(teacher, prompt, response), response_log_prob(student, prompt, response)
        p, q = math.exp(lp), math.exp(lq)
        ended = response[-1] == EOS_ID
        for key, value in (("p", p), ("q", q), ("fwd", p * (lp - lq)), ("rev", q * (lq - lp)), ("h_p", -p * lp),
                           ("h_q", -q * lq), ("len_p", p * len(response)), ("len_q", q * len(response)),
                           ("end_p", p * ended), ("end_q", q * ended),
                           ("acc", q * chain.accepts(start, response))):
            sums[key] += value
    # both distributions sum to one over the outcomes: the list is complete
    assert sums["p"] == pytest.approx(1.0, abs=1e-9) and sums["q"] == pytest.approx(1.0, abs=1e-9)
    # float64 models (Llama's RMSNorm still rounds to float32, but token by token: the same in both computations),
    # so the two differ by float64 rounding in different orders, about 1e-15 relative per term
    close = dict(rel=1e-10, abs=1e-12)
    assert figures.forward_kl == pytest.approx(sums["fwd"], **close)
    assert figures.reverse_kl == pytest.approx(sums["rev"], **close)
    assert figures.teacher_entropy == pytest.approx(sums["h_p"], **close)
    assert figures.student_entropy == pytest.approx(sums["h_q"], **close)
    assert figures.teacher_length == pytest.approx(sums["len_p"], **close)
    assert figures.teacher_entropy_rate == pytest.approx(sums["h_p"] / sums["len_p"], **close)
    assert figures.student_length == pytest.approx(sums["len_q"], **close)
    assert figures.teacher_ends == pytest.approx(sums["end_p"], **close)
    assert figures.student_ends == pytest.approx(sums["end_q"], **close)
    assert figures.student_accepted == pytest.approx(sums["acc"], **close)
    assert sum(figures.reverse_kl_by_position) == pytest.approx(figures.reverse_kl, rel=1e-12)
    assert len(figures.forward_kl_by_position) == horizon


def test_the_exact_kls_gradients_match_autograd_through_a_direct_sum():
    """The chain-rule sums are the same function of the student's weights as the sum over every response, so
    their gradients agree: to float32 rounding, since Llama's RMSNorm computes in float32 even in a float64 model
    and its backward rounds each gradient there (a few ulps of the gradient's scale)."""
    chain = make_chain(MarkovSettings(n_states=2, branching=2, final_states=2, horizon=3, seed=8))
    teacher, student = teacher_model(chain).double(), student_model(chain.vocab_size, 4, 1, seed=5).double()
    start = chain.state_ids[0]
    params = list(student.parameters())
    forward, reverse = exact_sequence_kl(student, teacher, [start], horizon=3, eos_id=EOS_ID, batch_size=4)
    got = [torch.autograd.grad(kl, params, retain_graph=True) for kl in (forward, reverse)]
    forward, reverse = forward.detach(), reverse.detach()
    direct_forward = direct_reverse = 0.0
    for response in every_response(chain.vocab_size, 3):
        ids = torch.tensor([[start] + response])
        lq = student(input_ids=ids).logits[0, :-1].double().log_softmax(-1).gather(-1, ids[0, 1:, None]).sum()
        lp = torch.tensor(response_log_prob(teacher, [start], response), dtype=torch.float64)
        direct_forward = direct_forward + lp.exp() * (lp - lq)
        direct_reverse = direct_reverse + lq.exp() * (lq - lp)
    wanted = [torch.autograd.grad(kl, params, retain_graph=True) for kl in (direct_forward, direct_reverse)]
    direct_forward, direct_reverse = direct_forward.detach(), direct_reverse.detach()
    assert float(forward) == pytest.approx(float(direct_forward), rel=1e-10)
    assert float(reverse) == pytest.approx(float(direct_reverse), rel=1e-10)
    for got_kl, wanted_kl in zip(got, wanted):
        for g, w in zip(got_kl, wanted_kl):
            assert torch.allclose(g, w, rtol=0, atol=16 * F32 * float(w.abs().max()))
        assert any(float(g.abs().max()) > 1e-3 for g in got_kl)  # not trivially zero


def test_the_teacher_against_itself_has_no_divergence_and_is_accepted():
    chain = make_chain(MarkovSettings(n_states=3, branching=2, final_states=2, horizon=5, seed=4))
    teacher = teacher_model(chain)
    figures = exact_sequence_figures(teacher, teacher, [chain.state_ids[0]], horizon=5, eos_id=EOS_ID,
                                     support=torch.tensor(chain.support()))
    assert figures.reverse_kl == 0 and figures.forward_kl == 0
    # what it writes outside the support has probability about e^-30 per token
    assert figures.student_accepted == pytest.approx(figures.teacher_ends, abs=5 * chain.vocab_size * math.exp(-30))


def test_too_many_sequences_are_refused():
    chain = make_chain(MarkovSettings())
    teacher = teacher_model(chain)
    with pytest.raises(ValueError, match="max_leaves"):
        exact_sequence_figures(teacher, teacher, [2], horizon=6, eos_id=EOS_ID, max_leaves=1000)


def test_walks_of_the_table_end_as_often_as_the_teacher_model_says():
    """The chain's own walks (what warm_up trains on) against the teacher model's exact figures: every walk that
    ends is accepted, and the share that ends within the horizon is within 4 standard errors of teacher_ends."""
    chain = make_chain(MarkovSettings(horizon=5, seed=3))
    start, n = chain.state_ids[2], 4000
    figures = exact_sequence_figures(teacher_model(chain), teacher_model(chain), [start], horizon=5, eos_id=EOS_ID)
    rng = random.Random(0)
    walks = [chain.walk(start, rng) for _ in range(n)]
    ended = [walk[-1] == EOS_ID for walk in walks]
    assert all(chain.accepts(start, walk) == end for walk, end in zip(walks, ended))
    share = sum(ended) / n
    se = math.sqrt(figures.teacher_ends * (1 - figures.teacher_ends) / n)
    assert abs(share - figures.teacher_ends) < 4 * se
    # lengths lie in 1..5: their standard deviation is at most half the range, 2
    assert sum(map(len, walks)) / n == pytest.approx(figures.teacher_length, abs=4 * 2 / math.sqrt(n))


def test_warming_up_moves_the_student_toward_the_teacher():
    chain = make_chain(MarkovSettings(n_states=3, branching=2, final_states=3, horizon=4, seed=6))
    teacher, student = teacher_model(chain), student_model(chain.vocab_size, 4, 1, seed=0)
    support = torch.tensor(chain.support())

    def figures():
        return [exact_sequence_figures(student, teacher, [s], horizon=4, eos_id=EOS_ID, support=support)
                for s in chain.state_ids]

    before = figures()
    warm_up(student, chain, 60, seed=0)
    after = figures()
    assert not student.training
    # cross-entropy on the teacher's walks is the forward KL plus a constant: it falls, and the student writes
    # more responses the chain accepts
    assert sum(f.forward_kl for f in after) < sum(f.forward_kl for f in before)
    assert sum(f.student_accepted for f in after) > sum(f.student_accepted for f in before)


# --- the exact figures against Monte-Carlo estimates from kltd's sampler --------------------------------------


def sampled_log_probs(models, prompt, responses):
    """Per sampled response: its log-probability under each model, and the exact per-token KL(first || second)
    summed along it (the chain rule's terms at the states the sample visits)."""
    ids = torch.cat([torch.tensor(prompt).expand(len(responses.tokens), -1), responses.tokens], 1)
    with torch.no_grad():
        first, second = (m(input_ids=ids).logits[:, len(prompt) - 1: -1].double().log_softmax(-1) for m in models)
    mask = responses.mask.double()
    picked = [lp.gather(-1, responses.tokens[..., None]).squeeze(-1) for lp in (first, second)]
    per_token_kl = (first.exp() * (first - second)).sum(-1)
    return ((picked[0] - picked[1]) * mask).sum(1), (per_token_kl * mask).sum(1)


@pytest.fixture(scope="module")
def mc_case():
    chain = make_chain(MarkovSettings(n_states=4, branching=2, final_states=2, horizon=5, seed=7))
    teacher, student = teacher_model(chain), student_model(chain.vocab_size, 4, 2, seed=3)
    prompt = [chain.state_ids[0]]
    exact = exact_sequence_figures(student, teacher, prompt, horizon=5, eos_id=EOS_ID)
    return chain, teacher, student, prompt, exact


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_exact_kl_agrees_with_monte_carlo_from_kltds_sampler(mc_case, direction):
    """KL(q||p) from student samples and KL(p||q) from teacher samples, each estimated two ways: the mean log-ratio
    of the sampled responses, and the per-token KLs summed along them. Both are unbiased; each must land within
    4 standard errors of the exact value (a wrong exact value, e.g. one position dropped, is many away)."""
    chain, teacher, student, prompt, exact = mc_case
    sampler_model, other = (student, teacher) if direction == "reverse" else (teacher, student)
    wanted = exact.reverse_kl if direction == "reverse" else exact.forward_kl
    n = 6000
    sampler = Sampler(sampler_model, build_tokenizer(chain.settings.n_states), max_new_tokens=chain.settings.horizon)
    ids = torch.tensor([prompt] * n)
    responses = sampler(ids, torch.ones_like(ids), torch.Generator().manual_seed(11))
    for estimate in sampled_log_probs((sampler_model, other), prompt, responses):
        mean, se = float(estimate.mean()), float(estimate.std() / math.sqrt(n))
        assert abs(mean - wanted) < 4 * se, f"{direction}: exact {wanted:.4f}, MC {mean:.4f} +- {se:.4f}"
    # the smallest standard error is small next to the KL: the test can tell a wrong value
    assert se < 0.05 * wanted


# --- the script -------------------------------------------------------------------------------------------


def test_the_script_is_deterministic_and_the_shipped_models_load(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = load_script()
    task, student = MarkovSettings(n_states=3, branching=2, final_states=1, seed=9), script.StudentSettings(width=4)
    first = script.build(tmp_path / "one", task, student)
    second = script.build(tmp_path / "two", task, student)
    assert first["models"] == second["models"]
    other = script.build(tmp_path / "three", MarkovSettings(n_states=3, branching=2, final_states=1, seed=10), student)
    assert other["models"]["teacher"] != first["models"]["teacher"]
    shipped = json.loads((ASSETS / "task.json").read_text())
    for role in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(ASSETS / role, local_files_only=True)
        assert tok.get_vocab() == build_tokenizer(shipped["task"]["n_states"]).get_vocab()
    teacher = AutoModelForCausalLM.from_pretrained(ASSETS / "teacher", local_files_only=True).eval()
    chain = make_chain(MarkovSettings(**shipped["task"]))
    table = torch.tensor(chain.log_table(), dtype=torch.float64)
    with torch.no_grad():
        logits = teacher(input_ids=torch.arange(chain.vocab_size)[None]).logits[0].double()
    assert torch.allclose(logits, table, rtol=0, atol=logit_tolerance(table))
    assert shipped["teacher_logit_rank"] > shipped["student"]["width"]  # the student cannot represent the teacher


def test_the_script_rebuilds_the_shipped_pair_bit_for_bit():
    """`make_markov_task.py --check` in a process of its own (it picks torch's kernel set before torch loads):
    the shipped pair is what the script writes from the settings it recorded, on any CPU with those kernels."""
    shipped = json.loads((ASSETS / "task.json").read_text())
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"the shipped pair was built with torch's {shipped['cpu_kernels']} kernels, which this CPU lacks "
                    "(vectorised math differs in its last bits between kernel sets)")
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_markov_task.py"), "--check"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "OK" and shipped["cpu_kernels"] == "AVX2"
