"""Attention over a packed row (examples concatenated, positions restarting at 0), none crossing another: the
examples in groups of similar length, each group padded to its longest and computed at once, scores and output by
matmul; examples too long for that by sdpa one at a time. models/packing.py calls it for packed rows."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

PADDED_WEIGHTS = 1 << 22
"""Most attention weights (examples x heads x longest^2) a padded group keeps for one layer's backward (8 MiB in
bf16); above it, sdpa per example, which keeps none."""
PADDED_LONGEST = 512
"""Longest example attended by matmul (measured faster than sdpa up to here, 2-core CPU, bf16); beyond it the
weights grow with its square, and sdpa's tiled kernel keeps none."""
CALL_COST = 80**2
"""The fixed cost of one more group in attention-weight elements (measured on a 2-core CPU: a 32-token example
costs what an 80-token one would without it)."""


def attention_groups(lengths: list[int], heads: int) -> list[tuple[list[int], bool]]:
    """A packed row's examples (their indices) in groups, longest first, each attended at once padded to its
    longest (True) or by sdpa one example at a time (False: too long, or its weights over `PADDED_WEIGHTS`). A group
    takes the next example while the padding it adds costs less than a group of its own: padded, the work is count
    x longest^2 elements at about half sdpa's cost per element, forward and backward (2-core CPU)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        members = [*groups[-1], i] if groups else [i]
        longest, count = lengths[members[0]], len(members)
        if groups and count * longest**2 <= 1.5 * sum(lengths[j] ** 2 for j in members) + 2 * CALL_COST * count:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [(g, heads * len(g) * lengths[g[0]] ** 2 <= PADDED_WEIGHTS and lengths[g[0]] <= PADDED_LONGEST)
            for g in groups]


def needs_stock_attention(module: torch.nn.Module, kwargs: dict) -> bool:
    """What only transformers' sdpa path handles: attention dropout, softcapping, sinks, position bias, no mask."""
    dropout = kwargs.get("dropout", 0.0) if getattr(module, "training", False) else 0.0
    extras = ("softcap", "s_aux", "sinks", "position_bias", "output_attentions")
    return bool(dropout) or not getattr(module, "is_causal", True) or any(kwargs.get(name) for name in extras)


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[tuple[int, int]],
                     scaling: float | None, window: int | None, one_example: Callable, padded_ok: bool = True,
                     ) -> torch.Tensor:
    """Attention of every example of a packed row ((start, end) `bounds`), none crossing another: groups from
    `attention_groups` padded at once, the rest by `one_example(q, k, v)` (sdpa). Returns [total, heads, dim]."""
    lengths = [end - start for start, end in bounds]
    groups = attention_groups(lengths, query.shape[1]) if padded_ok else [(list(range(len(lengths))), False)]
    # split, not a slice per example: the backward of a split is one cat of the gradients, while each slice's
    # backward writes its gradient into a zero tensor as large as the whole row.
    split = list(zip(*(x.split(lengths, dim=2) for x in (query, key, value)), strict=True))
    pieces, order = [], []
    for members, padded in groups:
        if padded:
            pieces.append(padded_attention(query, key, value, [bounds[i] for i in members], scaling, window))
        else:
            pieces.extend(one_example(*split[i]) for i in members)
        order.extend(j for i in members for j in range(*bounds[i]))
    out = torch.cat(pieces)
    if order != list(range(len(order))):  # back to the row's order
        out = out.index_select(0, torch.tensor(order, device=out.device).argsort())
    return out


def padded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     segments: list[tuple[int, int]], scaling: float | None, window: int | None) -> torch.Tensor:
    """The examples at `segments` ((start, end) in the row) at once, padded to the longest: scores by matmul, a
    softmax over them, the output by matmul, as transformers' eager attention computes (scores and weights in the
    input's dtype, the softmax accumulating in fp32). On a CPU sdpa's per-call cost dominates short examples: eight
    of 40-90 tokens are 2.3x faster this way, four of 512 1.4x, forward and backward. `query` is [1, heads, total,
    dim], `key` and `value` [1, kv heads, total, dim]; returns [tokens of the segments, heads, dim] in their order."""
    lengths = [end - start for start, end in segments]
    count, longest = len(lengths), max(lengths)
    heads, dim, groups = query.shape[1], query.shape[3], key.shape[1]
    device = query.device
    # The segments cover the row in order (decided in Python: a check on the device would wait for it on a GPU).
    whole = segments[0][0] == 0 and segments[-1][1] == query.shape[2] and all(
        end == start for (_, end), (start, _) in pairwise(segments))
    rows = None if whole else torch.cat([torch.arange(start, end, device=device) for start, end in segments])
    index = torch.cat([torch.arange(n, device=device) + i * longest for i, n in enumerate(lengths)])

    def padded(x: torch.Tensor) -> torch.Tensor:  # [1, h, total, dim] -> [count, h, longest, dim]
        tokens = x[0].transpose(0, 1) if whole else x[0].transpose(0, 1).index_select(0, rows)
        out = x.new_zeros(count * longest, x.shape[1], dim).index_copy(0, index, tokens)
        return out.view(count, longest, x.shape[1], dim).transpose(1, 2)

    q = padded(query).reshape(count, groups, heads // groups * longest, dim)  # a group's heads share its k, v
    k, v = padded(key), padded(value)
    scores = torch.matmul(q, k.transpose(2, 3)).view(count, heads, longest, longest)
    scores.mul_(dim**-0.5 if scaling is None else scaling).add_(padding_bias(lengths, window, query))
    weights = torch.softmax(scores, dim=-1).view(count, groups, -1, longest)
    out = torch.matmul(weights, v).view(count, heads, longest, dim).transpose(1, 2)
    return out.reshape(count * longest, heads, dim).index_select(0, index)


def padding_bias(lengths: list[int], window: int | None, like: torch.Tensor) -> torch.Tensor:
    """[count, 1, longest, longest]: 0 where a query may see a key (causal, inside its example and the sliding
    window), -inf elsewhere. Padding query rows see all their example's keys: a row with nothing to see would be
    NaN, and NaN times the zero gradient of a dropped row is still NaN."""
    longest = max(lengths)
    i = torch.arange(longest, device=like.device)
    seen = i[:, None] >= i[None, :]
    if window is not None:
        seen = seen & (i[:, None] - i[None, :] < window)
    inside = i[None, :] < torch.tensor(lengths, device=like.device)[:, None]  # [count, longest]
    allowed = (seen[None] | ~inside[:, :, None]) & inside[:, None, :]
    bias = torch.zeros(len(lengths), 1, longest, longest, dtype=like.dtype, device=like.device)
    return bias.masked_fill_(~allowed[:, None], float("-inf"))
