"""The prefix axis: where the training states come from (dataset, teacher samples, student samples, mixtures)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kltd.sampling import (
    Responses,
    encode_prompts,
    encode_responses,
    pad_responses,
    position_ids_from_mask,
    responses_to_lists,
    sample,
)


@dataclass
class StateBatch:
    """Prompts and responses in the shared layout (see kltd.sampling); the response tokens are the states."""

    prompt_ids: Tensor  # [B, P]
    prompt_mask: Tensor  # [B, P]
    responses: Responses  # [B, N]
    from_student: Tensor  # [B] bool: the row's states were sampled by the student (they depend on theta)
    examples: list = field(default_factory=list)

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.responses.tokens], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask.long(), self.responses.mask.long()], 1)

    @property
    def num_sequences(self) -> int:
        return self.prompt_ids.shape[0]


@dataclass
class TokenCounts:
    student_generated: int = 0
    teacher_generated: int = 0
    scored: int = 0

    def add(self, other: "TokenCounts") -> None:
        self.student_generated += other.student_generated
        self.teacher_generated += other.teacher_generated
        self.scored += other.scored


@dataclass
class Sampler:
    """Everything needed to draw responses from one model."""

    model: torch.nn.Module
    tokenizer: object
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0

    def __call__(self, prompt_ids, prompt_mask, generator, prefix: Responses | None = None) -> Responses:
        return sample(
            self.model,
            prompt_ids,
            prompt_mask,
            max_new_tokens=self.max_new_tokens,
            eos_id=self.tokenizer.eos_token_id,
            pad_id=self.tokenizer.pad_token_id,
            temperature=self.temperature,
            top_p=self.top_p,
            generator=generator,
            prefix=prefix,
        )


class StateSource:
    """Builds a StateBatch for a list of examples from the configured prefix source."""

    def __init__(
        self, source: str, *, student: Sampler, teacher: Sampler, tokenizer, student_fraction=0.5, other="fixed", seed=0
    ):
        self.source, self.student, self.teacher, self.tokenizer = source, student, teacher, tokenizer
        self.student_fraction, self.other = student_fraction, other
        # the per-sequence coins live on the CPU, apart from the sampling generator (which may be on a GPU)
        self.coins = torch.Generator().manual_seed(seed)

    def _draw(self, source: str, prompt_ids, prompt_mask, examples, generator, counts: TokenCounts) -> Responses:
        if source == "fixed":
            return encode_responses(self.tokenizer, [e.response for e in examples], prompt_ids.device)
        sampler = self.student if source == "student" else self.teacher
        responses = sampler(prompt_ids, prompt_mask, generator)
        if source == "student":
            counts.student_generated += responses.num_tokens
        else:
            counts.teacher_generated += responses.num_tokens
        return responses

    def build(self, examples: list, generator: torch.Generator) -> tuple[StateBatch, TokenCounts]:
        counts = TokenCounts()
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [e.prompt for e in examples], self.student.model.device)
        n = len(examples)
        if self.source != "mixed":
            responses = self._draw(self.source, prompt_ids, prompt_mask, examples, generator, counts)
            from_student = torch.full((n,), self.source == "student", dtype=torch.bool)
            return StateBatch(prompt_ids, prompt_mask, responses, from_student.to(prompt_ids.device), examples), counts
        # GKD-style: one coin per sequence; only the rows that need a model are sampled by it
        coins = torch.rand(n, generator=self.coins) < self.student_fraction
        responses_by_row: list[list[int]] = [[] for _ in range(n)]
        for source, rows in (("student", coins), (self.other, ~coins)):
            idx = rows.nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            part = self._draw(source, prompt_ids[idx], prompt_mask[idx], [examples[i] for i in idx], generator, counts)
            for i, row in zip(idx.tolist(), responses_to_lists(part)):
                responses_by_row[i] = row
        responses = pad_responses(responses_by_row, self.tokenizer.pad_token_id, prompt_ids.device)
        return StateBatch(prompt_ids, prompt_mask, responses, coins.to(prompt_ids.device), examples), counts


def response_logits(model, batch: StateBatch) -> Tensor:
    """[B, N, V] logits at the N response states: entry t predicts response token t.

    Only the response positions are projected onto the vocabulary (logits_to_keep), so the prompt
    never costs a B x P x V tensor.
    """
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    n = batch.responses.tokens.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=n + 1,
        use_cache=False,
    )
    return out.logits[:, :-1]
