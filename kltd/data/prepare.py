"""The examples of one run, from whichever source the config names: a built-in task, a file or a hub
dataset. A file's or hub dataset's rows are read and checked by kltd.data.rows (the checks `kltd train` also
runs before any model loads); here prompts are rendered with the chat template and the token limits
applied; what was dropped or truncated is counted and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kltd.data import addition, markov
from kltd.data.chat import PromptRenderer, use_end_token
from kltd.data.checkers import Checker, get_checker
from kltd.data.example import Example
from kltd.data.formats import DataError
from kltd.data.rows import prompt_only_problem


@dataclass
class TaskData:
    train: list[Example]
    eval: list[Example]
    checker: Checker | None
    end_token: str  # the token every response ends with
    summary: dict = field(default_factory=dict)  # recorded in the run: sources, splits, counts
    held_out: list[int] | None = None  # training-split rows held out for evaluation
    chain: object = None  # data=markov: the chain (kltd.data.markov.MarkovChain), for the exact figures


class Limits:
    """data.max_prompt_tokens / data.max_response_tokens, with the overflow policy; counts what it did."""

    def __init__(self, tokenizer, cfg):
        self.tokenizer, self.prompt_max, self.response_max = tokenizer, cfg.max_prompt_tokens, cfg.max_response_tokens
        self.truncate = cfg.overflow == "truncate"
        self.dropped = self.truncated = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def apply(self, example: Example) -> Example | None:
        prompt, response = example.prompt, example.response
        if self.prompt_max is not None:
            ids = self._ids(prompt)
            if len(ids) > self.prompt_max:
                if not self.truncate:
                    self.dropped += 1
                    return None
                prompt = self.tokenizer.decode(ids[-self.prompt_max:])  # the end of a prompt leads into the answer
                self.truncated += 1
        if self.response_max is not None and response is not None:
            ids = self._ids(response)
            if len(ids) + 1 > self.response_max:  # + the end token
                if not self.truncate:
                    self.dropped += 1
                    return None
                response = self.tokenizer.decode(ids[: self.response_max - 1])
                self.truncated += 1
        return Example(prompt, response, example.answer, example.raw_prompt, example.answer_text)


def _from_datasets(cfg, renderer, limits) -> tuple[list, list, dict, list | None]:
    from kltd.data.rows import checked_rows, take

    rows = checked_rows(cfg)  # read and checked once per process: preflight has usually done it already

    def example(good) -> Example | None:
        row = good.row
        return limits.apply(Example(renderer(row.prompt), row.response, good.answer, row.prompt, good.answer_text))

    train = take(rows, "train", cfg.n_train, cfg.bad_rows, example)
    held = take(rows, "eval", cfg.n_eval, cfg.bad_rows, example)
    splits = rows.splits
    summary = {"where": splits.where, "format": rows.format, "train_split": splits.train_name,
               "eval_split": splits.eval_name, "train_rows": len(splits.train), "eval_rows": len(splits.eval),
               "bad_rows": cfg.bad_rows, "bad_rows_dropped": dict(train.bad + held.bad)}
    return train.kept, held.kept, summary, splits.held_out


def _from_addition(cfg, renderer, limits) -> tuple[list, list, dict]:
    train, held = addition.make_splits(cfg.seed, cfg.n_train, cfg.n_eval, cfg.min_terms, cfg.max_terms)
    if cfg.responses_file:
        from kltd.data.responses_file import examples_from_file

        train = examples_from_file(cfg.responses_file, held)
    rendered = [[limits.apply(Example(renderer(e.prompt), e.response, e.answer, e.prompt, e.response)) for e in part]
                for part in (train, held)]
    train, held = ([e for e in part if e is not None] for part in rendered)
    return train, held, {"where": "the built-in addition task", "format": "generated", "seed": cfg.seed}


def _from_markov(cfg, tokenizer, renderer, limits) -> tuple[list, list, dict, object]:
    from dataclasses import asdict

    chain = markov.make_chain(markov.MarkovSettings(**asdict(cfg.markov)))
    wanted = markov.vocabulary(chain.settings.n_states)
    if tokenizer.get_vocab() != wanted:
        raise DataError(f"data=markov writes the letters of {chain.settings.n_states} states, and the student's "
                        f"tokenizer is not the chain's ({len(tokenizer.get_vocab())} tokens, not {len(wanted)}); use "
                        "model=markov, or a pair made by scripts/make_markov_task.py with these data.markov settings")
    parts = []
    for part in markov.make_walks(chain, cfg.seed, cfg.n_train, cfg.n_eval):
        examples = (Example(renderer(markov.text_of([start])), markov.text_of(walk), markov.Walk(chain, start))
                    for start, walk in part)
        parts.append([e for e in map(limits.apply, examples) if e is not None])
    return parts[0], parts[1], {"where": "the built-in Markov task", "format": "generated", "seed": cfg.seed,
                                "chain": dict(cfg.markov.chain_settings(), horizon=cfg.markov.horizon)}, chain


def prepare(cfg, tokenizer, *, needs_responses: bool) -> TaskData:
    """Every example of the run. `needs_responses`: the states include the dataset's responses (prefix=fixed,
    a mixture with fixed states, a hand-off drawn over the reference length), so prompt-only rows are refused."""
    renderer = PromptRenderer(tokenizer, cfg.chat_template, cfg.system_prompt, cfg.chat_template_kwargs)
    end = use_end_token(tokenizer, renderer)
    checker = get_checker(cfg.checker_name)
    limits = Limits(tokenizer, cfg)
    held_out = chain = None
    if cfg.source == "addition":
        train, held, summary = _from_addition(cfg, renderer, limits)
    elif cfg.source == "markov":
        train, held, summary, chain = _from_markov(cfg, tokenizer, renderer, limits)
    else:
        train, held, summary, held_out = _from_datasets(cfg, renderer, limits)
    where = summary["where"]
    if not train:
        raise DataError(f"{where}: no training examples left (after data.max_*_tokens with data.overflow=drop?)")
    if not held:
        raise DataError(f"{where}: no evaluation examples left")
    if needs_responses and any(e.response is None for e in train):
        raise DataError(prompt_only_problem(where))
    summary.update(train_examples=len(train), eval_examples=len(held), dropped=limits.dropped,
                   truncated=limits.truncated, overflow=cfg.overflow, checker=checker.name if checker else "none",
                   chat_template=renderer.templated, chat_template_kwargs=renderer.template_kwargs, end_token=end,
                   notes=renderer.notes())
    return TaskData(train, held, checker, end, summary, held_out, chain)


def rendered_example(example: Example, end_token: str) -> str:
    """The first example as the model sees it: the prompt, then the supervised response and its end token."""
    response = "(no response: prompt-only data)" if example.response is None else example.response + end_token
    return f"--- prompt (never supervised) ---\n{example.prompt}\n--- response (supervised) ---\n{response}\n"
