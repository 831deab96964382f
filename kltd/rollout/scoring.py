"""Scoring a batch of states with a model: the one seam between the trainer (and evaluation) and the fast
path.

The trainer, the evaluation and the teacher cache ask a `Scorer` for the models' logits, final hidden
states or logit rows at a batch's response states; a Scorer runs kltd's packed forward (kltd.fast.packed,
Llama-family models, real tokens only) or the model's own Hugging Face forward, as the job's execution plan
(kltd.rollout.plan) says. Both give the same numbers to float rounding (tests/fast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kltd.fast.arranged import supports
from kltd.fast.packed import packed_hidden
from kltd.matmul import linear
from kltd.objectives.fused_head import plain_output_layer
from kltd.objectives.tied_gradient import GradientHandoff
from kltd.rollout.batch import StateBatch, position_ids_from_mask


def device_of(model) -> torch.device:
    return next(model.parameters()).device


# Logits in one part of a batch's rows (LogitRows.parts): about this many numbers (128 MiB in float32), whatever
# the vocabulary and however many states the batch holds
PART_LOGITS = 2**25


@dataclass
class LogitRows:
    """The logits at a batch's M supervised states, row-major (Scorer.hidden_states' order), a part at a time.

    rows(part) is [m, width] for a slice of the M states, in the model's dtype, on the batch's device.
    """

    count: int  # M
    width: int  # V, the compared ids
    take: Callable[[slice], Tensor]

    @classmethod
    def of(cls, rows: Tensor) -> LogitRows:
        """Logit rows already at hand ([M, V])."""
        return cls(rows.shape[0], rows.shape[-1], lambda part: rows[part])

    def __call__(self, part: slice) -> Tensor:
        return self.take(part)

    def parts(self, logits: int | None = None) -> list[slice]:
        """The rows in order, as slices of about `logits` numbers each (default PART_LOGITS; at least one row)."""
        step = max(1, (logits or PART_LOGITS) // self.width)
        return [slice(start, start + step) for start in range(0, self.count, step)]


class Scorer:
    """Logits or hidden states at the response states of a StateBatch.

    packed: run kltd's packed forward (the plan asks for it only for the models it supports; for another model
        the model's own forward runs).
    vocab: compare logits on the first `vocab` ids only (the shared tokenizer's; an output layer may have
        padded rows beyond it); None: all of them.
    A model on another device than the batch (a teacher on its own GPU) gets the batch there and gives its
    results back on the batch's device.
    """

    def __init__(self, packed: bool = True, vocab: int | None = None):
        self.packed, self.vocab = packed, vocab

    def output_weight(self, model) -> Tensor:
        """The output layer's weight over the compared ids (for the fused head; a plain linear layer)."""
        weight = model.get_output_embeddings().weight
        return weight if self.vocab is None else weight[: self.vocab]

    def packs(self, model) -> bool:
        """Whether `hidden_states` runs the packed forward for this model (real tokens only, no padding)."""
        return self.packed and supports(model)

    def logits(self, model, batch: StateBatch) -> Tensor:
        """[B, N, V] logits at the N response states: entry t predicts response token t.

        Only the response positions are projected onto the vocabulary (logits_to_keep), so the prompt never
        costs a B x P x V tensor.
        """
        device, home = device_of(model), batch.prompt_ids.device
        attention_mask = batch.attention_mask.to(device)
        out = model(input_ids=batch.input_ids.to(device), attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask),
                    logits_to_keep=batch.responses.tokens.shape[1] + 1, use_cache=False)
        return out.logits[:, :-1, : self.vocab].to(home)

    def hidden_states(self, model, batch: StateBatch, handoff: GradientHandoff | None = None) -> Tensor:
        """[M, D] final hidden states (after the final norm) at the batch's supervised states, row-major.

        handoff: the packed forward looks the embedding up through it (kltd.objectives.tied_gradient).
        """
        device, home = device_of(model), batch.prompt_ids.device
        supervised, attention_mask = batch.supervised.to(device), batch.attention_mask.to(device)
        input_ids, positions = batch.input_ids.to(device), position_ids_from_mask(attention_mask)
        n = supervised.shape[1]
        if self.packs(model):
            select = torch.zeros_like(attention_mask, dtype=torch.bool)
            select[:, -(n + 1) : -1] = supervised
            lookup = handoff.lookup if handoff is not None else None
            return packed_hidden(model, input_ids, attention_mask, positions, select, lookup).to(home)
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                               use_cache=False)
        return out.last_hidden_state[:, -(n + 1) : -1][supervised].to(home)

    def logit_rows(self, model, batch: StateBatch) -> LogitRows:
        """The logits at the batch's supervised states only, as rows (no [B, N, V] tensor, no padding).

        Through the packed forward (with a plain output layer) only the [M, D] hidden states are kept and a
        part of the rows is projected when it is asked for, so [M, V] never exists at once; otherwise the
        model's own forward, its logits at those states.
        """
        count = int(batch.supervised.sum())
        if self.packs(model) and plain_output_layer(model) is not None:
            hidden = self.hidden_states(model, batch)
            weight = self.output_weight(model).to(hidden.device)
            return LogitRows(count, weight.shape[0], lambda part: linear(hidden[part], weight))
        return LogitRows.of(self.logits(model, batch)[batch.supervised])
