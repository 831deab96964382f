"""The evaluation sets of a run (eval.sets, each defined in eval_sets / conf/eval_set/): their questions,
rendered as the model sees them, and their checkers.

`heldout` is the training data's held-out split (kltd.data.prepare). A hub or file set is read and checked
by kltd.data.rows like training data (the whole of its `split`, so no row is held out of it), before any
model loads: offline, a hub set that is not in the local datasets cache is refused then, in one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from kltd.data.chat import PromptRenderer
from kltd.data.checkers import Checker, get_checker
from kltd.data.example import Example
from kltd.data.formats import DataError
from kltd.schema.config import DataConfig, EvalConfig, EvalSetConfig


@dataclass
class EvalSet:
    name: str
    examples: list[Example]
    checker: Checker | None
    settings: EvalConfig  # eval.* with this set's own budget and size
    checker_name: str
    # the exact figures' reference (kltd.data.markov.MarkovChain: horizon, eos_id, support()); None: none computed
    exact: object = None

    @property
    def summary(self) -> dict:
        return {"questions": len(self.examples), "checker": self.checker_name,
                "max_new_tokens": self.settings.max_new_tokens}


def set_settings(settings: EvalConfig, spec: EvalSetConfig) -> EvalConfig:
    """eval.* as one set runs it: its own token budget and number of questions where it names them."""
    return dataclasses.replace(settings, max_new_tokens=spec.max_new_tokens or settings.max_new_tokens,
                               num_prompts=spec.num_prompts or settings.num_prompts)


def source_of(spec: EvalSetConfig, data: DataConfig, settings: EvalConfig) -> DataConfig:
    """A hub or file set as a data source whose evaluation part is the set's whole split (a single file is one
    split, which `datasets` calls train; a save_to_disk directory has the set's own split names)."""
    one_file = spec.source == "file" and not Path(spec.path).expanduser().is_dir()
    split = "train" if one_file else spec.split
    return DataConfig(source=spec.source, path=spec.path, name=spec.name, train_split=split, eval_split=split,
                      fields=spec.fields, checker=spec.checker, bad_rows=data.bad_rows,
                      n_eval=set_settings(settings, spec).num_prompts)


def check_set_rows(settings: EvalConfig, catalog: dict, data: DataConfig) -> None:
    """Every hub or file set's rows that a run would evaluate, read and checked (DataError: one line)."""
    from kltd.data.rows import take

    for name in settings.sets:
        spec = catalog[name]
        if spec.source == "heldout":
            continue
        source = source_of(spec, data, settings)
        try:
            take(_rows(source), "eval", source.n_eval, source.bad_rows, keep=lambda good: good)
        except DataError as error:
            raise DataError(f"evaluation set {name}: {error}{_fix(name, spec, str(error))}") from None


def _fix(name: str, spec: EvalSetConfig, problem: str) -> str:
    if spec.source != "hub" or "cannot be loaded" not in problem:
        return ""
    return (f"; put it in the local datasets cache first (on a machine online: python -c \"import datasets; "
            f"datasets.load_dataset('{spec.path}'{f', {spec.name!r}' if spec.name else ''})\"), or point the set at "
            f"a local file: eval_sets.{name}.source=file eval_sets.{name}.path=FILE")


def _rows(source: DataConfig):
    from kltd.data.rows import checked_rows

    return checked_rows(source)


def load_sets(settings: EvalConfig, catalog: dict, data: DataConfig, tokenizer, heldout: list[Example],
              heldout_checker: Checker | None, exact=None) -> list[EvalSet]:
    """The sets eval.sets names, in its order. `heldout`: the training data's held-out examples (prepared); `exact`:
    the Markov chain whose exact figures the held-out split gets (its prompts are the chain's states)."""
    from kltd.data.rows import take

    renderer = PromptRenderer(tokenizer, data.chat_template, data.system_prompt, data.chat_template_kwargs)
    sets = []
    for name in settings.sets:
        spec = catalog[name]
        own = set_settings(settings, spec)
        if spec.source == "heldout":
            checker = heldout_checker if spec.checker == "auto" else get_checker(spec.checker)
            examples = heldout[: own.num_prompts]
        else:
            checker = get_checker(spec.checker)
            source = source_of(spec, data, settings)
            instruction = spec.instruction or ""

            def example(good, instruction=instruction) -> Example:
                question = good.row.prompt + instruction if isinstance(good.row.prompt, str) else good.row.prompt
                return Example(renderer(question), None, good.answer, good.row.prompt, good.answer_text)

            examples = take(_rows(source), "eval", own.num_prompts, source.bad_rows, example).kept
        sets.append(EvalSet(name, examples, checker, own, checker.name if checker else "none",
                            exact if spec.source == "heldout" else None))
    return sets
