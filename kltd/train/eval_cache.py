"""The evaluation before training, computed once and kept on disk.

Every cell and seed of a sweep starts from the same student and is evaluated on the same prompts with the
same seed (kltd.train.evaluation), so the evaluation before training is the same for all of them. It is
stored in a small JSON file, one per evaluation set, whose name is a hash of everything the figures depend on
(both models' files, the student's tokenizer among them, the set's examples and their checker, the evaluation
settings, dtype, device type and the decoding path), like the teacher cache: a changed input gets a new entry,
a stale one is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from kltd.files import atomic_write_json, remove_stale_temporaries
from kltd.schema.config import Config, EvalConfig
from kltd.train.teacher_cache import examples_fingerprint, source_fingerprint

# raised when the evaluation's own arithmetic changes (2: the samplers' logits reused, blocked MLP rows;
# 3: Avg@k, truncation, intervals and per-question figures; one entry per evaluation set; 4: teacher samples drawn
# with per-row noise, as a served teacher draws them)
EVAL_CACHE_VERSION = 4
# settings that do not change what one evaluation computes (a set's own settings are in its entry; whether it has
# exact figures is EvalInputs.exact)
NOT_IN_KEY = ("every", "before", "sets", "exact_kl")


@dataclasses.dataclass(frozen=True)
class EvalInputs:
    """What the evaluation before training depends on, besides the code."""

    student_dir: str
    teacher_dir: str  # the tokenizer is the student's: its files are in the student's fingerprint
    examples: list
    checker: str
    settings: EvalConfig
    dtype: str
    device: str  # "cpu" or "cuda": rounding differs between them
    paths: dict  # how the models run (the execution plan's evaluation part): rounding differs between paths
    exact: dict | None = None  # the chain of the exact figures (data=markov), whose support grades acceptance
    served: dict | None = None  # a served teacher: its server's fingerprint, model and k (its figures are k + 1 bins)

    def digest(self) -> str:
        settings = {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in NOT_IN_KEY}
        payload = {"version": EVAL_CACHE_VERSION, "student": source_fingerprint(self.student_dir),
                   "teacher": source_fingerprint(self.teacher_dir),
                   "examples": examples_fingerprint(self.examples), "checker": self.checker, "settings": settings,
                   "dtype": self.dtype, "device": self.device, "paths": self.paths}
        if self.exact is not None:  # only then: the keys of evaluations without exact figures stay as they were
            payload["exact"] = self.exact
        if self.served is not None:  # never the key of an in-process evaluation, nor of another k
            payload["served"] = self.served
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cached_evaluation(inputs: EvalInputs, evaluate: Callable[[], dict], cache_dir: Path, echo=print) -> dict:
    """The stored figures for these inputs, else `evaluate()`'s, stored for the next run."""
    path = Path(cache_dir) / f"eval-before-{inputs.digest()}.json"
    remove_stale_temporaries(cache_dir)  # what a writer killed half-way left (a writer still at work keeps its own)
    if path.is_file():
        try:
            result = json.loads(path.read_text())
            echo(f"evaluation before training: reused {path}")
            return result
        except ValueError:  # torn or corrupt: evaluated again and rewritten
            echo(f"warning: evaluation cache {path} is unreadable; evaluating again")
    result = evaluate()
    atomic_write_json(path, result)
    return result


def evaluation_inputs(cfg: Config, eval_set, device, plan, served=None) -> EvalInputs:
    """The inputs of this run's evaluation before training on one set (kltd.data.eval_sets.EvalSet; plan: the
    execution plan's evaluation part, kltd.rollout.plan.EvaluationPlan; served: the client of model.teacher_server,
    checked)."""
    from kltd.train.models import resolve_model_path

    m = cfg.model
    key = None
    if served is not None:  # the teacher is the server's model; its tokenizer's fingerprint (an OpenAI server has none)
        info = served.info or {}
        key = {"fingerprint": info.get("fingerprint"), "model": info.get("model"), "source": info.get("source"),
               "openai": bool(info.get("openai")), "top_k": served.top_k}
    return EvalInputs(student_dir=resolve_model_path(m.student), teacher_dir=resolve_model_path(m.teacher),
                      examples=eval_set.examples, checker=eval_set.checker_name, settings=eval_set.settings,
                      dtype=m.dtype, device=str(getattr(device, "type", device)), paths=dataclasses.asdict(plan),
                      exact=eval_set.exact.settings.as_dict() if eval_set.exact is not None else None, served=key)
