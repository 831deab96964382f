"""Responses sampled from a model (or a mixture of teacher and student) for the training prompts of a
dataset: data for SeqKD and offline RL, written as JSONL that `data=file` (or, for the built-in task,
data.responses_file) reads back.

Rows are in TRL's format: {"prompt", "completion", "answer", "source"}; a conversational prompt stays a
list of messages and its completion becomes one assistant message. "answer" carries the reference the
checker reads, so a sampled (possibly wrong) completion is still graded against the truth.
"""

from __future__ import annotations

import torch

from kltd.data.prepare import prepare
from kltd.files import atomic_write_jsonl
from kltd.rollout.batch import decode_responses, encode_prompts
from kltd.rollout.sampling import Sampler
from kltd.schema.config import ConfigError, MakeDataConfig
from kltd.train.models import check_model_reference, check_tokenizers, load_model, pick_device


def _row(example, text: str, source: str) -> dict:
    raw = example.raw_prompt if example.raw_prompt is not None else example.prompt
    completion = [{"role": "assistant", "content": text}] if isinstance(raw, list) else text
    row = {"prompt": raw, "completion": completion, "source": source}
    if example.answer_text is not None:
        row["answer"] = example.answer_text
    return row


def make_data(cfg: MakeDataConfig, echo=print) -> dict:
    """Sample, grade (when the data have a checker) and write `cfg.out`; returns a summary."""
    cfg.check()
    m = cfg.model
    roles = {"writer": cfg.writer, **({"other": "teacher" if cfg.writer == "student" else "student"}
                                      if cfg.other_fraction > 0 else {})}
    for role in set(roles.values()):
        problem = check_model_reference(getattr(m, role))
        if problem:
            raise ConfigError(f"model.{role}: {problem}")
    tokenizer = check_tokenizers(m.teacher, m.student, trust_remote_code=m.trust_remote_code)
    data = prepare(cfg.data, tokenizer, needs_responses=False)
    examples = data.train[: cfg.n]
    device = pick_device(m.device)
    s, vocab = cfg.sampling, len(tokenizer)
    samplers = {role: Sampler(load_model(getattr(m, who), m.dtype, device, m.trust_remote_code).eval(), tokenizer, s.max_new_tokens,
                              s.temperature, s.top_p, s.lean_decoder, vocab) for role, who in roles.items()}
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    coins = torch.rand(len(examples), generator=torch.Generator().manual_seed(cfg.seed)) < cfg.other_fraction
    rows: list[dict | None] = [None] * len(examples)
    correct = empty = 0
    for role, chosen in (("writer", ~coins), ("other", coins)):
        idx = chosen.nonzero().squeeze(1).tolist()
        for start in range(0, len(idx), cfg.batch_size):
            part = idx[start : start + cfg.batch_size]
            ids, mask = encode_prompts(tokenizer, [examples[i].prompt for i in part], device)
            texts = decode_responses(tokenizer, samplers[role](ids, mask, generator))
            for i, text in zip(part, texts):
                if not text.strip():  # the model ended at once: no state to train on (data=file refuses it)
                    empty += 1
                    continue
                rows[i] = _row(examples[i], text, getattr(m, roles[role]))
                correct += bool(data.checker and data.checker(text, examples[i]))
    rows = [row for row in rows if row is not None]
    if not rows:
        raise ConfigError(f"every one of the {len(examples)} sampled responses was empty; nothing to write to {cfg.out}")
    atomic_write_jsonl(cfg.out, rows)
    summary = {"rows": len(rows), "empty_left_out": empty, "out": cfg.out,
               "checker": data.checker.name if data.checker else "none",
               "correct": correct / len(examples) if data.checker else None}  # an empty response is a wrong one
    graded = f", {summary['correct']:.1%} correct ({summary['checker']})" if data.checker else ""
    left_out = f"; {empty} empty responses left out" if empty else ""
    echo(f"wrote {len(rows)} responses to {cfg.out}{graded}{left_out}")
    return summary
