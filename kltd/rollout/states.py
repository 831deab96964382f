"""The prefix axis: where the training states come from (dataset, teacher samples, student samples, mixtures)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from kltd.rollout.batch import (
    Responses,
    StateBatch,
    TokenCounts,
    encode_prompts,
    encode_responses,
    left_pad,
    pad_responses,
    responses_to_lists,
)
from kltd.rollout.noise import RowNoise
from kltd.rollout.sampling import Sampler
from kltd.schema.config import PrefixConfig


def student_fraction_at(mix: PrefixConfig, step: int) -> float:
    """The per-sequence probability of student states at an optimiser step (constant or a linear ramp)."""
    if mix.schedule == "constant":
        return mix.student_fraction
    progress = min(1.0, step / mix.schedule_steps)
    return mix.student_fraction_start + progress * (mix.student_fraction - mix.student_fraction_start)


def _unpadded(ids: Tensor, mask: Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


class StateSource:
    """Builds a StateBatch for a list of examples from the configured prefix source.

    Every draw (tokens, mixture coins, hand-off points) comes from the rows' own RowNoise streams, so a row's
    state is the same however the global batch is split into calls or processes.
    """

    def __init__(self, mix: PrefixConfig, *, student: Sampler, teacher: Sampler, tokenizer):
        self.source, self.student, self.teacher, self.tokenizer = mix.source, student, teacher, tokenizer
        self.mix = mix

    def set_horizon(self, max_new_tokens: int) -> int:
        """Sample states of up to `max_new_tokens` tokens from now on (a length schedule's current horizon)."""
        self.student.max_new_tokens = self.teacher.max_new_tokens = max_new_tokens
        return max_new_tokens

    def _draw(self, source: str, prompt_ids, prompt_mask, examples, noise: RowNoise, counts: TokenCounts) -> Responses:
        if source == "fixed":
            return encode_responses(self.tokenizer, [e.response for e in examples], prompt_ids.device)
        sampler = self.student if source == "student" else self.teacher
        responses = sampler(prompt_ids, prompt_mask, noise.named(source))
        if source == "student":
            counts.student_generated += responses.num_tokens
        else:
            counts.teacher_generated += responses.num_tokens
        return responses

    def _handoff_points(self, examples, noise: RowNoise) -> list[int]:
        m = self.mix
        if m.handoff_k == "fixed":
            return [m.handoff_k_value] * len(examples)
        u = noise.named("handoff").uniforms(1)[:, 0]
        if m.handoff_k == "uniform":  # over the reference response (EOS included): k in {0, ..., n}
            lengths = [len(self.tokenizer.encode(e.response, add_special_tokens=False)) + 1 for e in examples]
            return [min(int(x * (n + 1)), n) for x, n in zip(u.tolist(), lengths)]
        # geometric on {0, 1, 2, ...}: the number of failures before the first success
        u = u.clamp(min=1e-12)
        return [int(torch.floor(torch.log(x) / torch.log1p(torch.tensor(-m.handoff_p)))) if m.handoff_p < 1 else 0
                for x in u]

    def _handoff(self, prompt_ids, prompt_mask, examples, noise: RowNoise, counts) -> tuple[list[list[int]], list[int]]:
        """Student writes the first k_i tokens of row i, the teacher continues. Returns rows and k_i."""
        ks = [min(k, self.student.max_new_tokens) for k in self._handoff_points(examples, noise)]
        eos = self.tokenizer.eos_token_id
        heads = [[] for _ in ks]
        if max(ks) > 0:
            rolled_in = replace(self.student, max_new_tokens=max(ks))(prompt_ids, prompt_mask, noise.named("student"))
            heads = [row[:k] for row, k in zip(responses_to_lists(rolled_in), ks)]
            counts.student_generated += sum(len(h) for h in heads)
        # rows whose student part already ended (EOS) get no teacher continuation
        open_rows = [i for i, h in enumerate(heads) if eos not in h and len(h) < self.teacher.max_new_tokens]
        rows = [list(h) for h in heads]
        if open_rows:
            contexts = [_unpadded(prompt_ids[i], prompt_mask[i]) + heads[i] for i in open_rows]
            ctx_ids, ctx_mask = left_pad(contexts, self.tokenizer.pad_token_id, prompt_ids.device)
            budget = self.teacher.max_new_tokens - min(len(heads[i]) for i in open_rows)
            tails = replace(self.teacher, max_new_tokens=budget)(ctx_ids, ctx_mask,
                                                                 noise.subset(open_rows).named("teacher_tail"))
            for i, tail in zip(open_rows, responses_to_lists(tails)):
                rows[i] += tail[: self.teacher.max_new_tokens - len(heads[i])]
            counts.teacher_generated += sum(len(rows[i]) - len(heads[i]) for i in open_rows)
        return rows, [len(h) for h in heads]

    def build(self, examples: list, noise: RowNoise | torch.Generator, step: int = 0) -> tuple[StateBatch, TokenCounts]:
        """The states of `examples`; `noise` holds their rows' streams (a generator: rows 0.. under a seed
        drawn from it)."""
        if isinstance(noise, torch.Generator):
            noise = RowNoise.from_generator(noise, len(examples))
        counts = TokenCounts()
        device = self.student.model.device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [e.prompt for e in examples], device)
        n = len(examples)
        if self.source != "mixed":
            responses = self._draw(self.source, prompt_ids, prompt_mask, examples, noise, counts)
            mine = self.source == "student"
            rows = torch.full((n,), mine, dtype=torch.bool, device=device)
            return StateBatch(prompt_ids, prompt_mask, responses, responses.mask if mine else None, examples=examples,
                              student_rows=rows), counts
        # GKD-style: one coin per sequence; only the rows that need a model are sampled by it
        coins = noise.named("coin").uniforms(1)[:, 0] < student_fraction_at(self.mix, step)
        rows: list[list[int]] = [[] for _ in range(n)]
        student_len = [0] * n  # how many leading response tokens of each row the student wrote
        for source, chosen in (("student", coins), (self.mix.other, ~coins)):
            idx = chosen.nonzero().squeeze(1).tolist()
            if not idx:
                continue
            sub = (prompt_ids[idx], prompt_mask[idx], [examples[i] for i in idx], noise.subset(idx), counts)
            if source == "student" and self.mix.handoff:
                part, heads = self._handoff(*sub)
            else:
                part = responses_to_lists(self._draw(source, *sub))
                heads = [len(r) for r in part] if source == "student" else [0] * len(part)
            for i, row, head in zip(idx, part, heads):
                rows[i], student_len[i] = row, head
        responses = pad_responses(rows, self.tokenizer.pad_token_id, device)
        columns = torch.arange(responses.tokens.shape[1], device=device)
        written = (columns < torch.tensor(student_len, device=device).unsqueeze(1)) & responses.mask
        supervised = responses.mask
        if self.mix.handoff and self.mix.supervise == "after_handoff":
            supervised = responses.mask & ~written
        # a row is the student's when its coin says so: a hand-off at k = 0 leaves it no written token, yet it
        # is a draw of the hand-off distribution, not a fixed row (whose prefix term would be cross-entropy)
        return StateBatch(prompt_ids, prompt_mask, responses, written, supervised, examples, coins.to(device)), counts
