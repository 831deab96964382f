"""The prefix axis: where the training states come from (dataset, teacher samples, student samples, mixtures)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from kltd.spec.config import PrefixConfig

from kltd.rollout.sampling import (
    Responses,
    encode_prompts,
    encode_responses,
    left_pad,
    pad_responses,
    position_ids_from_mask,
    responses_to_lists,
    sample,
)


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

    def __post_init__(self):
        if self.student_written is None:
            self.student_written = torch.zeros_like(self.responses.mask)
        if self.supervised is None:
            self.supervised = self.responses.mask

    @property
    def from_student(self) -> Tensor:
        """[B] bool: rows whose states depend on the student."""
        return self.student_written.any(1)

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
            [self.examples[i] for i in rows] if self.examples else [],
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


@dataclass
class Sampler:
    """Everything needed to draw responses from one model."""

    model: torch.nn.Module
    tokenizer: object
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    lean: bool = True

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
            lean=self.lean,
        )


def student_fraction_at(mix: PrefixConfig, step: int) -> float:
    """The per-sequence probability of student states at an optimiser step (constant or a linear ramp)."""
    if mix.schedule == "constant":
        return mix.student_fraction
    progress = min(1.0, step / mix.schedule_steps)
    return mix.student_fraction_start + progress * (mix.student_fraction - mix.student_fraction_start)


def _unpadded(ids: Tensor, mask: Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


class StateSource:
    """Builds a StateBatch for a list of examples from the configured prefix source."""

    def __init__(self, mix: PrefixConfig, *, student: Sampler, teacher: Sampler, tokenizer, seed: int = 0):
        self.source, self.student, self.teacher, self.tokenizer = mix.source, student, teacher, tokenizer
        self.mix = mix
        # coins and hand-off points live on the CPU, apart from the sampling generator (maybe on a GPU)
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

    def _handoff_points(self, examples) -> list[int]:
        m = self.mix
        if m.handoff_k == "fixed":
            return [m.handoff_k_value] * len(examples)
        if m.handoff_k == "uniform":  # over the reference response (EOS included)
            lengths = [len(self.tokenizer.encode(e.response, add_special_tokens=False)) + 1 for e in examples]
            return [int(torch.randint(0, n + 1, (1,), generator=self.coins)) for n in lengths]
        # geometric on {0, 1, 2, ...}: the number of failures before the first success
        u = torch.rand(len(examples), generator=self.coins).clamp(min=1e-12)
        return [int(torch.floor(torch.log(x) / torch.log1p(torch.tensor(-m.handoff_p)))) if m.handoff_p < 1 else 0
                for x in u]

    def _handoff(self, prompt_ids, prompt_mask, examples, generator, counts) -> tuple[list[list[int]], list[int]]:
        """Student writes the first k_i tokens of row i, the teacher continues. Returns rows and k_i."""
        ks = [min(k, self.student.max_new_tokens) for k in self._handoff_points(examples)]
        eos = self.tokenizer.eos_token_id
        heads = [[] for _ in ks]
        if max(ks) > 0:
            rolled_in = replace(self.student, max_new_tokens=max(ks))(prompt_ids, prompt_mask, generator)
            heads = [row[:k] for row, k in zip(responses_to_lists(rolled_in), ks)]
            counts.student_generated += sum(len(h) for h in heads)
        # rows whose student part already ended (EOS) get no teacher continuation
        open_rows = [i for i, h in enumerate(heads) if eos not in h and len(h) < self.teacher.max_new_tokens]
        rows = [list(h) for h in heads]
        if open_rows:
            contexts = [_unpadded(prompt_ids[i], prompt_mask[i]) + heads[i] for i in open_rows]
            ctx_ids, ctx_mask = left_pad(contexts, self.tokenizer.pad_token_id, prompt_ids.device)
            budget = self.teacher.max_new_tokens - min(len(heads[i]) for i in open_rows)
            tails = replace(self.teacher, max_new_tokens=budget)(ctx_ids, ctx_mask, generator)
            for i, tail in zip(open_rows, responses_to_lists(tails)):
                rows[i] += tail[: self.teacher.max_new_tokens - len(heads[i])]
            counts.teacher_generated += sum(len(rows[i]) - len(heads[i]) for i in open_rows)
        return rows, [len(h) for h in heads]

    def build(self, examples: list, generator: torch.Generator, step: int = 0) -> tuple[StateBatch, TokenCounts]:
        counts = TokenCounts()
        device = self.student.model.device
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, [e.prompt for e in examples], device)
        n = len(examples)
        if self.source != "mixed":
            responses = self._draw(self.source, prompt_ids, prompt_mask, examples, generator, counts)
            written = responses.mask if self.source == "student" else None
            return StateBatch(prompt_ids, prompt_mask, responses, written, examples=examples), counts
        # GKD-style: one coin per sequence; only the rows that need a model are sampled by it
        coins = torch.rand(n, generator=self.coins) < student_fraction_at(self.mix, step)
        rows: list[list[int]] = [[] for _ in range(n)]
        student_len = [0] * n  # how many leading response tokens of each row the student wrote
        for source, chosen in (("student", coins), (self.mix.other, ~coins)):
            idx = chosen.nonzero().squeeze(1).tolist()
            if not idx:
                continue
            sub = (prompt_ids[idx], prompt_mask[idx], [examples[i] for i in idx], generator, counts)
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
        return StateBatch(prompt_ids, prompt_mask, responses, written, supervised, examples), counts


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
