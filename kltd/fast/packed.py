"""Final hidden states of a Llama-family model at chosen positions, computing real tokens only.

A padded batch of sampled responses is mostly padding, and a Hugging Face forward computes every column
of it. Here the projections and MLPs run on the real tokens alone, packed into one [N, D] matrix; only
attention needs a grid, and it gets small ones: rows of similar length together, each row's tokens from
column 0, under a plain causal mask. The last layer's output projection and MLP run only at the positions asked for, since nothing else is
read from them. Hidden states equal the model's own forward to float rounding, and gradients flow to the
model's parameters (tested against the Hugging Face forward); unsupported architectures use that forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.functional import scaled_dot_product_attention

from kltd.fast.arranged import LlamaBlocks, arranged

Lookup = Callable[[Tensor, Tensor, "int | None"], Tensor]


def packed_hidden(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, select: Tensor,
                  lookup: Lookup | None = None) -> Tensor:
    """[M, D] final hidden states (after the final norm) at the positions `select` ([B, L] bool) marks, row-major.

    lookup(ids, weight, padding_idx): the embedding lookup, F.embedding unless given.
    """
    blocks = arranged(model)
    return blocks.final_hidden(packed_layers(blocks, input_ids, attention_mask, position_ids, select, lookup=lookup))


def packed_layers(blocks: LlamaBlocks, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, select: Tensor,
                  keep: Callable[[int, Tensor, Tensor, Tensor], None] | None = None, attention_groups: int = 4,
                  lookup: Lookup | None = None) -> Tensor:
    """[M, D] last-layer hidden states (before the final norm) at the `select` positions, row-major.

    keep(layer, k, v, places): receives each layer's keys and values ([N, Hkv, d], rotated) and their
    places in the B x L grid (a decoder fills its cache from them).
    """
    real = attention_mask.bool() | select
    tokens = real.flatten().nonzero().squeeze(1)  # [N] indices into the B x L grid, row-major
    wanted = select.flatten()[tokens]  # [N] bool: the rows of the packed matrix to return
    embed = blocks.body.embed_tokens  # its padding_idx too: that row gets no gradient, as in the model's forward
    hidden = (lookup or F.embedding)(input_ids.flatten()[tokens], embed.weight, embed.padding_idx)
    rotations = blocks.rotary(position_ids.flatten()[tokens])
    layout = AttentionLayout(real, attention_groups)
    last = len(blocks.layers) - 1
    for i, layer in enumerate(blocks.layers):
        q, k, v = blocks.qkv(layer, hidden, rotations)
        if keep is not None:
            keep(i, k, v, tokens)
        attended = layout.attend(q, k, v, gqa=blocks.heads != blocks.kv_heads)
        if i == last:  # only the asked-for positions are read from here on
            hidden, attended = hidden[wanted], attended[wanted]
        hidden = blocks.after_attention(layer, hidden, attended)
    return hidden


class AttentionLayout:
    """Causal attention for packed rows: rows sorted by length into a few groups, each row's tokens from column 0.

    A row's real tokens, packed in order to the left of a grid as wide as the group's longest row, see each
    other under a plain causal mask exactly as in the padded row (the grid's padding sits only after them).
    Grouping rows of similar length keeps the grids small: attention is the one cost that grows with them.
    """

    def __init__(self, real: Tensor, groups: int):
        lengths = real.sum(1)
        order = torch.argsort(lengths, descending=True, stable=True).tolist()
        sizes = lengths.tolist()
        base = [0] * len(order)
        self.groups = []  # (offset, rows, width)
        offset, per_group = 0, -(-len(order) // max(1, groups))
        for start in range(0, len(order), per_group):
            members = order[start : start + per_group]
            width = sizes[members[0]]
            for j, row in enumerate(members):
                base[row] = offset + j * width
            if width:
                self.groups.append((offset, len(members), width))
            offset += len(members) * width
        self.size = offset
        rank = real.long().cumsum(1) - 1  # each real token's place among its row's real tokens
        self.index = (torch.tensor(base, device=real.device)[:, None] + rank)[real]  # [N] places in the grids
        # the grids' other places (after each row's tokens): zeroed, since causal attention still multiplies
        # them by a zero weight, and uninitialised memory could hold NaN
        free = torch.ones(offset, dtype=torch.bool, device=real.device)
        free[self.index] = False
        self.padding = free.nonzero().squeeze(1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, gqa: bool) -> Tensor:
        """[N, heads, d] packed q (pre-scaled), k, v -> [N, Hq * d] attention outputs."""
        # written in place into fresh tensors: a zero-filled grid and an out-of-place copy would each cost a pass
        grids = [x.new_empty((self.size, *x.shape[1:])).index_fill_(0, self.padding, 0).index_copy_(0, self.index, x)
                 for x in (q, k, v)]
        outs = []
        for offset, rows, width in self.groups:
            part = [g[offset : offset + rows * width].view(rows, width, *g.shape[1:]).transpose(1, 2) for g in grids]
            out = scaled_dot_product_attention(*part, is_causal=True, scale=1.0, enable_gqa=gqa)
            outs.append(out.transpose(1, 2).flatten(2).flatten(0, 1))
        return torch.cat(outs)[self.index] if len(outs) > 1 else outs[0][self.index]
