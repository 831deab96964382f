"""The Markov task: a teacher whose distribution over responses is known exactly, generated from a seed.

Tokens are `<pad>` (id 0), `<eos>` (id 1) and one letter per state ('a', 'b', ...; ids 2..n+1). A prompt is
one state token, the start state; a response is a walk of the chain from it, ending with `<eos>` or cut at
`horizon` tokens. The chain is first order: the next token depends on the last token only, so the teacher
is exactly a one-layer transformer (kltd.data.markov_models) and every response can be enumerated.

Each state allows `branching` next tokens (its support). `final_states` of the states have `<eos>` among them,
with probability `end_probability` (the response length is then geometric: the teacher ends within the horizon
with probability about 1 - (1 - end_probability)^horizon, which the exact figures report as `teacher_ends`);
the others have states only. The probability left for the successor states is a Dirichlet(`concentration`)
draw mixed with a uniform share (`MIN_SHARE`), so every allowed transition keeps at least MIN_SHARE / k of it
(k successors) and the support is unambiguous. Plain Python, deterministic from the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

PAD, EOS = "<pad>", "<eos>"
SPECIAL_TOKENS = (PAD, EOS)
PAD_ID, EOS_ID = 0, 1
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Part of the uniform distribution mixed into each state's Dirichlet draw (a floor on every allowed transition).
MIN_SHARE = 0.1
# The teacher's logit for a transition outside the support, relative to log-probabilities on it. It defines
# the teacher model exactly: such a token gets probability about e^-30 (1e-13) times the allowed ones.
OFF_SUPPORT = -30.0


@dataclass(frozen=True)
class MarkovSettings:
    n_states: int = 6
    branching: int = 3
    final_states: int = 3  # states from which <eos> is allowed (one of their `branching` next tokens)
    end_probability: float = 0.7  # P(<eos>) from a final state
    concentration: float = 1.0  # Dirichlet parameter: small -> peaked next-token distributions
    horizon: int = 7  # the most response tokens, <eos> included
    seed: int = 1

    def __post_init__(self):
        if not 1 <= self.n_states <= len(LETTERS):
            raise ValueError(f"n_states={self.n_states}: between 1 and {len(LETTERS)} (one letter per state)")
        if not 1 <= self.branching <= self.n_states:
            raise ValueError(f"branching={self.branching}: between 1 and n_states={self.n_states}")
        if not 1 <= self.final_states <= self.n_states:
            raise ValueError(f"final_states={self.final_states}: between 1 and n_states (some state must end)")
        if self.branching < 2:
            raise ValueError("branching < 2: a final state needs <eos> and a successor; a chain without choices "
                             "separates nothing")
        if not 0 < self.end_probability < 1:
            raise ValueError(f"end_probability={self.end_probability}: strictly between 0 and 1")
        if self.concentration <= 0 or self.horizon < 1:
            raise ValueError("concentration must be positive and horizon at least 1")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MarkovChain:
    settings: MarkovSettings
    # next[i]: {token id: probability} for the state with token id STATE_IDS[i]; the support is its keys
    next: tuple[dict[int, float], ...]

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + self.settings.n_states

    @property
    def horizon(self) -> int:
        return self.settings.horizon

    eos_id = EOS_ID  # the evaluation's exact figures read these three: horizon, eos_id, support()

    @property
    def state_ids(self) -> list[int]:
        return list(range(len(SPECIAL_TOKENS), self.vocab_size))

    @property
    def start_ids(self) -> list[int]:
        """The states a prompt starts from: those that cannot end at once (no <eos> after them), so that no response
        is a bare <eos>; every state when all of them are final."""
        starts = [s for s in self.state_ids if EOS_ID not in self.row(s)]
        return starts or self.state_ids

    def row(self, token: int) -> dict[int, float]:
        """The next-token distribution after `token`. After <pad> or <eos> (never a state) the chain ends: <eos>."""
        if token < len(SPECIAL_TOKENS):
            return {EOS_ID: 1.0}
        return self.next[token - len(SPECIAL_TOKENS)]

    def log_table(self) -> list[list[float]]:
        """[V][V] the teacher's logits: entry [a][b] is log P(b | a) on the support, OFF_SUPPORT elsewhere."""
        return [[math.log(row[b]) if b in row else OFF_SUPPORT for b in range(self.vocab_size)]
                for row in map(self.row, range(self.vocab_size))]

    def support(self) -> list[list[bool]]:
        """[V][V]: True where the chain allows b after a."""
        return [[b in self.row(a) for b in range(self.vocab_size)] for a in range(self.vocab_size)]

    def accepts(self, start: int, response: list[int]) -> bool:
        """Every transition allowed and the response ends with <eos> (within the horizon)."""
        if not response or response[-1] != EOS_ID or len(response) > self.settings.horizon:
            return False
        previous = start
        for token in response:
            if token not in self.row(previous):
                return False
            previous = token
        return True

    def walk(self, start: int, rng: random.Random) -> list[int]:
        """One response drawn from the chain (its exact table, not a model), cut at the horizon."""
        out, previous = [], start
        while len(out) < self.settings.horizon and previous != EOS_ID:
            tokens, probs = zip(*sorted(self.row(previous).items()))
            previous = rng.choices(tokens, probs)[0]
            out.append(previous)
        return out


@dataclass(frozen=True)
class Walk:
    """What the `markov` checker grades a response against (an Example's answer): the chain and the start state."""

    chain: MarkovChain
    start: int

    def accepts_text(self, text: str) -> bool:
        """A response as kltd decodes it (its end token removed, kltd.rollout.batch.decode_responses): accepted when
        it is state letters only (a special token such as <pad> is not) and the chain accepts them followed by
        <eos>. The sampler stops at the horizon, so a response of `horizon` letters was cut, never ended: then
        letters + <eos> are horizon + 1 tokens, which `accepts` refuses."""
        ids = vocabulary(self.chain.settings.n_states)
        letters = LETTERS[: self.chain.settings.n_states]
        if any(c not in letters for c in text):
            return False
        return self.chain.accepts(self.start, [ids[c] for c in text] + [EOS_ID])


def text_of(tokens: list[int]) -> str:
    """State tokens as their letters (<eos> dropped: kltd appends the end token to every response)."""
    return "".join(LETTERS[t - len(SPECIAL_TOKENS)] for t in tokens if t != EOS_ID)


def make_walks(chain: MarkovChain, seed: int, n_train: int, n_eval: int) -> tuple[list, list]:
    """(train, eval) as (start, walk) pairs, from the chain's start states (`MarkovChain.start_ids`). Training starts
    are uniform draws; evaluation starts cycle through them in order, so any multiple of their number of questions
    weighs each start state equally. The two splits draw
    from separate seeded streams (the prompts cannot be disjoint: there are only n_states of them). A walk cut at
    the horizon is kept: it is a sample of the teacher too (kltd appends its end token, a state the sampler never
    reaches)."""
    states = chain.start_ids
    train_rng, eval_rng = random.Random(f"markov-train-{seed}"), random.Random(f"markov-eval-{seed}")
    train = [(start, chain.walk(start, train_rng)) for start in (train_rng.choice(states) for _ in range(n_train))]
    held = [(start, chain.walk(start, eval_rng)) for start in (states[i % len(states)] for i in range(n_eval))]
    return train, held


def make_chain(settings: MarkovSettings) -> MarkovChain:
    rng = random.Random(settings.seed)
    n, b = settings.n_states, settings.branching
    states = list(range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + n))
    finals = set(rng.sample(states, settings.final_states))
    rows = []
    for state in states:
        final = state in finals
        successors = rng.sample(states, b - 1 if final else b)
        mass = 1 - settings.end_probability if final else 1.0  # what the successor states share
        draws = [rng.gammavariate(settings.concentration, 1.0) for _ in successors]
        total, k = sum(draws), len(successors)
        row = {token: mass * ((1 - MIN_SHARE) * d / total + MIN_SHARE / k) for token, d in zip(successors, draws)}
        if final:
            row[EOS_ID] = settings.end_probability
        rows.append(row)
    return MarkovChain(settings, tuple(rows))


def vocabulary(n_states: int) -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS) + list(LETTERS[:n_states])
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer(n_states: int, model_max_length: int = 128):
    """A `PreTrainedTokenizerFast`, one token per letter (as kltd.data.toy_tokenizer); no <unk>: a character
    outside the states is refused. Save it with kltd.data.toy_tokenizer.save_tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=vocabulary(n_states)))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, padding_side="left",
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
