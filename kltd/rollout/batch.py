"""The token layout every batch of states shares, and the batch itself.

Layout: prompts are left-padded to a common width P; responses start at column P and are right-padded.
`attention_mask` marks real tokens, `response_mask` the response tokens (EOS included). Position ids
come from the attention mask, so left padding does not shift positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Responses:
    tokens: Tensor  # [B, N] long, pad after the end
    mask: Tensor  # [B, N] bool, True for real response tokens (EOS included)
    # [B, N, V] the sampling model's logits at each response state (entry t chose token t), where the sampler
    # was asked to keep them (evaluation reuses them instead of scoring the samples with that model again)
    logits: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, L] 0/1 mask -> [B, L] positions counting real tokens only (pads get 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Token lists -> left-padded ids [B, P] and mask [B, P]."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(tokenizer, prompts: list[str], device) -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids [B, P] and mask [B, P]."""
    return left_pad([tokenizer.encode(p, add_special_tokens=False) for p in prompts], tokenizer.pad_token_id, device)


def encode_responses(tokenizer, texts: list[str], device) -> Responses:
    """Right-padded response ids with EOS appended, as a dataset supplies them."""
    rows = [tokenizer.encode(t, add_special_tokens=False) + [tokenizer.eos_token_id] for t in texts]
    return pad_responses(rows, tokenizer.pad_token_id, device)


def pad_responses(rows: list[list[int]], pad_id: int, device) -> Responses:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = True
    return Responses(tokens.to(device), mask.to(device))


def responses_to_lists(responses: Responses) -> list[list[int]]:
    return [row[m].tolist() for row, m in zip(responses.tokens, responses.mask)]


def decode_responses(tokenizer, responses: Responses) -> list[str]:
    """Text of each response without EOS or padding."""
    eos = tokenizer.eos_token_id
    return [tokenizer.decode([t for t in row if t != eos]) for row in responses_to_lists(responses)]


@dataclass
class StateBatch:
    """Prompts and responses in the shared layout (see kltd.rollout.sampling); the response tokens are the states."""

    prompt_ids: Tensor  # [B, P]
    prompt_mask: Tensor  # [B, P]
    responses: Responses  # [B, N]
    # [B, N] bool: response tokens the student sampled (their states depend on theta). None: none did.
    student_written: Tensor | None = None
    # [B, N] bool: the positions the loss supervises. None: every response token.
    supervised: Tensor | None = None
    examples: list = field(default_factory=list)
    # [B] bool: the rows drawn from the student's side (see from_student). None: the rows with a
    # student-written token.
    student_rows: Tensor | None = None

    def __post_init__(self):
        if self.student_written is None:
            self.student_written = torch.zeros_like(self.responses.mask)
        if self.supervised is None:
            self.supervised = self.responses.mask
        if self.student_rows is None:
            self.student_rows = self.student_written.any(1)

    @property
    def from_student(self) -> Tensor:
        """[B] bool: rows whose state distribution is the student's: its own samples, or a hand-off row whose
        coin chose the student, even when the student wrote 0 of its tokens before the teacher took over.
        Their prefix term is the score function over `student_written` (empty, so 0, for such a row), never
        the cross-entropy of fixed states; and their states were written live, never by a cache."""
        return self.student_rows

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.responses.tokens], 1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask.long(), self.responses.mask.long()], 1)

    @property
    def num_sequences(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: list[int]) -> StateBatch:
        """These rows only, without the columns that are padding in every one of them."""
        idx = torch.tensor(rows, device=self.prompt_ids.device)
        prompt_mask, response_mask = self.prompt_mask[idx], self.responses.mask[idx]
        first = int(prompt_mask.any(0).long().argmax()) if bool(prompt_mask.any()) else prompt_mask.shape[1]
        used = response_mask.any(0)
        end = int(used.nonzero().max()) + 1 if bool(used.any()) else 0
        return StateBatch(
            self.prompt_ids[idx, first:], prompt_mask[:, first:],
            Responses(self.responses.tokens[idx, :end], response_mask[:, :end]),
            self.student_written[idx, :end], self.supervised[idx, :end],
            [self.examples[i] for i in rows] if self.examples else [], self.student_rows[idx],
        )

    def by_length(self, max_groups: int, overhead_tokens: int = 64) -> list[StateBatch]:
        """The rows in up to `max_groups` groups of similar length, each trimmed of its own padding.

        Rows are sorted by response then prompt length and cut into k equal groups, k chosen to minimise
        the padded size (rows x (prompt width + response width)) plus `overhead_tokens` per extra group,
        the fixed cost of another model call in token-equivalents. Losses that are sums over rows are
        unchanged by the split; padding columns are simply not computed.
        """
        n = self.num_sequences
        if max_groups <= 1 or n < 2:
            return [self]
        prompt_len, response_len = self.prompt_mask.sum(1).tolist(), self.responses.mask.sum(1).tolist()
        order = sorted(range(n), key=lambda i: (response_len[i], prompt_len[i]))

        def groups(k: int) -> list[list[int]]:
            bounds = [round(j * n / k) for j in range(k + 1)]
            return [order[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]

        def cost(parts: list[list[int]]) -> int:
            return sum(len(g) * (max(prompt_len[i] for i in g) + max(response_len[i] for i in g)) + overhead_tokens
                       for g in parts)

        best = min((groups(k) for k in range(1, min(max_groups, n) + 1)), key=cost)
        return [self] if len(best) == 1 else [self.select(g) for g in best]


@dataclass
class TokenCounts:
    student_generated: int = 0
    teacher_generated: int = 0
    scored: int = 0

    def add(self, other: "TokenCounts") -> None:
        self.student_generated += other.student_generated
        self.teacher_generated += other.teacher_generated
        self.scored += other.scored
