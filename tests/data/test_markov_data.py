"""data=markov as a run sees it: its config (one-line refusals), its examples and its checker."""

import dataclasses

import pytest

from kltd.data.checkers import get_checker
from kltd.data.formats import DataError
from kltd.data.markov import EOS_ID, LETTERS, MarkovSettings, Walk, build_tokenizer, make_chain, text_of
from kltd.data.prepare import prepare
from kltd.schema.config import ConfigError, MarkovTaskConfig
from tests.schema.test_config import compose_typed


def markov_data(**changes):
    cfg = compose_typed("data=markov").data
    return dataclasses.replace(cfg, **changes)


def chain_of(data):
    return make_chain(MarkovSettings(**dataclasses.asdict(data.markov)))


# --- the config ---------------------------------------------------------------------------------------------


def test_data_markov_picks_the_markov_pair_and_the_tasks_horizon():
    cfg = compose_typed("data=markov")
    assert (cfg.model.teacher, cfg.model.student) == ("markov/teacher", "markov/student")
    assert cfg.sampling.max_new_tokens == cfg.eval.max_new_tokens == cfg.data.markov.horizon == 7
    assert cfg.data.checker_name == "markov"
    cfg.check()
    # the horizon is the task's setting: the budgets follow it
    longer = compose_typed("data=markov", "data.markov.horizon=4")
    assert longer.sampling.max_new_tokens == longer.eval.max_new_tokens == 4


@pytest.mark.parametrize("overrides,message", [
    (["data=markov", "eval.max_new_tokens=64"], r"eval.max_new_tokens=64 differs from data.markov.horizon=7"),
    (["data=markov", "data.markov.branching=1"], r"data.markov.branching=1 must lie in \[2, data.markov.n_states=6\]"),
    (["data=markov", "data.markov.n_states=60"], r"data.markov.n_states=60 must lie in \[1, 52\]"),
    (["data=markov", "data.markov.end_probability=1.0"], r"data.markov.end_probability=1.0 must lie strictly"),
    (["data=markov", "data.markov.horizon=9", "eval.exact_kl=true"],
     r"eval.exact_kl=true with .*horizon=9 scores 5764801 sequences per prompt, above 131072"),
    (["data=addition", "eval.exact_kl=true"],
     r"eval.exact_kl=true enumerates every response, which only data=markov"),
    (["data=addition", "data.checker=markov"],
     r"data.checker=markov grades walks of the built-in chain; it needs data=markov"),
    (["data=markov", "data.path=x.jsonl"], r"data.path needs data=file or data=hub \(data=markov is generated\)"),
])
def test_bad_markov_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as refused:
        compose_typed(*overrides).check()
    assert "\n" not in str(refused.value)


def test_the_schemas_defaults_are_the_chains_and_the_shipped_teachers():
    """data.markov's schema (kltd.schema, which imports nothing of kltd.data) repeats MarkovSettings' keys and
    defaults, and conf/data/markov.yaml names the chain kltd/assets/markov/task.json records."""
    import json

    from kltd.train.models import markov_dir

    assert dataclasses.asdict(MarkovTaskConfig()) == MarkovSettings().as_dict()
    recorded = json.loads((markov_dir() / "task.json").read_text())["task"]
    assert dataclasses.asdict(compose_typed("data=markov").data.markov) == recorded


def test_a_long_horizon_runs_without_the_exact_figures():
    """Above 131,072 sequences per prompt the exact figures are off unless asked for (then refused): the sampled
    figures are the measure. At the shipped horizon (7**6 = 117,649) they are on."""
    from kltd.schema.config import exact_figures

    for extra in ([], ["eval.exact_kl=false"]):
        cfg = compose_typed("data=markov", "data.markov.horizon=9", *extra)
        cfg.check()
        assert not exact_figures(cfg)
    assert MarkovTaskConfig(horizon=9).leaves == 7**8
    assert exact_figures(compose_typed("data=markov")) and MarkovTaskConfig().leaves == 7**6 <= 131072


# --- the examples --------------------------------------------------------------------------------------------


def test_examples_are_walks_of_the_chain_with_the_start_states_in_turn():
    data = markov_data(n_train=300, n_eval=14)
    tok = build_tokenizer(data.markov.n_states)
    task = prepare(data, tok, needs_responses=True)
    chain = chain_of(data)
    assert task.chain == chain and task.checker.name == "markov" and task.end_token == "<eos>"
    # the prompts are the states that cannot end at once (no response is a bare <eos>); the held-out questions go
    # through them in order: each weighs the same in a multiple of their number
    starts = [s for s in chain.state_ids if EOS_ID not in chain.row(s)]
    assert starts == chain.start_ids and 0 < len(starts) < chain.settings.n_states
    assert [e.prompt for e in task.eval] == [text_of([starts[i % len(starts)]]) for i in range(14)]
    assert len(task.train) == 300 and {e.prompt for e in task.train} == set(text_of([s]) for s in starts)
    cut = 0
    for e in task.train + task.eval:
        ids = tok.encode(e.response, add_special_tokens=False)
        start = tok.convert_tokens_to_ids(e.prompt)
        assert e.answer == Walk(chain, start)
        if len(ids) == chain.horizon:  # cut at the horizon: every transition allowed, no room for <eos>
            cut += 1
            assert all(b in chain.row(a) for a, b in zip([start] + ids, ids))
        else:  # ended: the chain accepts it with its <eos>
            assert chain.accepts(start, ids + [EOS_ID])
    # cut walks are rare but there: the teacher ends within the horizon with probability 0.904 (task.json's
    # teacher_ends), so about 9.6% are cut
    assert 0 < cut < 0.2 * len(task.train + task.eval)
    # seeded: the same seed, the same examples; another seed, other walks from the same chain
    again = prepare(data, tok, needs_responses=True)
    assert [(e.prompt, e.response) for e in again.train] == [(e.prompt, e.response) for e in task.train]
    other = prepare(dataclasses.replace(data, seed=1), tok, needs_responses=True)
    assert [e.response for e in other.train] != [e.response for e in task.train]
    assert other.chain == task.chain


def test_a_tokenizer_that_is_not_the_chains_is_refused_in_one_line():
    data = markov_data()
    with pytest.raises(DataError, match="the student's tokenizer is not the chain's \\(10 tokens, not 8\\)"):
        prepare(data, build_tokenizer(8), needs_responses=True)


# --- the checker ---------------------------------------------------------------------------------------------


def test_the_checker_accepts_exactly_what_the_chain_accepts():
    """Every decoded response of up to the horizon from every start state (the alphabet plus <pad>), graded by the
    checker and by MarkovChain.accepts on the token ids the sampler would have drawn."""
    import itertools

    chain = make_chain(MarkovSettings(n_states=3, branching=2, final_states=2, horizon=4, seed=5))
    tok = build_tokenizer(3)
    checker = get_checker("markov")
    from kltd.data.example import Example

    alphabet = ["<pad>"] + list(LETTERS[:3])
    seen = {True: 0, False: 0}
    for start in chain.state_ids:
        example = Example(text_of([start]), None, Walk(chain, start))
        for length in range(chain.horizon + 1):
            for body in itertools.product(alphabet, repeat=length):
                ids = tok.convert_tokens_to_ids(list(body))
                # the sampler's tokens: ended (<eos> within the horizon), or cut at the horizon
                tokens = ids + [EOS_ID] if length < chain.horizon else ids
                wanted = chain.accepts(start, tokens)
                assert checker("".join(body), example) == wanted, (start, body)
                seen[wanted] += 1
    assert seen[True] > 5 and seen[False] > 5
