"""Attention over a packed row (examples concatenated, positions restarting at 0), none crossing another: the
examples in groups of similar length, each group padded to its longest and computed at once, scores and output by
matmul; examples too long for that by sdpa one at a time. models/packing.py calls it for packed rows.

An example may also have a context: rows of an earlier example it shares its first tokens with (a shared prompt,
computed once), which its queries see before its own keys, as if they were its own first rows."""

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


def packed_layout(position_ids: torch.Tensor) -> tuple[list[tuple[int, int]], list[tuple[int, int] | None]]:
    """The examples of a packed row: (start, end) of each one's own rows, and the rows of its context or None.

    An example starts where `position_ids` restart at 0. One that starts at position p > 0 (after a jump)
    continues the last example that started at 0 and has at least p rows: its first p tokens are that example's
    (the collator shared them, `data.examples.PackCollator`), and it attends to those rows before its own. A jump
    that fits no such example stays inside the current one, as before contexts existed."""
    row = position_ids.reshape(-1)
    jumps = torch.nonzero((row[1:] != row[:-1] + 1) | (row[1:] == 0)).flatten().add_(1).tolist()
    starts = [0, *jumps]
    first = row[starts].tolist()
    bounds: list[tuple[int, int]] = []
    contexts: list[tuple[int, int] | None] = []
    root = None
    for start, end, position in zip(starts, [*jumps, row.numel()], first, strict=True):
        if position == 0 or not bounds:
            bounds.append((start, end))
            contexts.append(None)
            root = len(bounds) - 1
        elif root is not None and bounds[root][1] - bounds[root][0] >= position:
            bounds.append((start, end))
            contexts.append((bounds[root][0], bounds[root][0] + position))
        else:
            bounds[-1] = (bounds[-1][0], end)
    return bounds, contexts


def shared_tokens(position_ids: torch.Tensor) -> int:
    """Tokens of a packed row computed once for several examples: each counts once more per example sharing it."""
    return sum(_length(context) for context in packed_layout(position_ids)[1])


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: list[tuple[int, int]],
                     scaling: float | None, window: int | None, one_example: Callable, padded_ok: bool = True,
                     contexts: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """Attention of every example of a packed row ((start, end) `bounds`), none crossing another: groups from
    `attention_groups` padded at once, the rest by `one_example(q, k, v)` (sdpa; its k and v begin with the
    context's rows where the example has one, so they may be longer than q). `contexts`: per example, the rows
    (start, end) of the shared first tokens it continues, or None. Returns [total, heads, dim]."""
    contexts = contexts or [None] * len(bounds)
    lengths = [end - start for start, end in bounds]
    seen = [n + _length(c) for n, c in zip(lengths, contexts, strict=True)]
    groups = attention_groups(seen, query.shape[1]) if padded_ok else [(list(range(len(lengths))), False)]
    # split, not a slice per example: the backward of a split is one cat of the gradients, while each slice's
    # backward writes its gradient into a zero tensor as large as the whole row.
    split = list(zip(*(x.split(lengths, dim=2) for x in (query, key, value)), strict=True))
    pieces, order = [], []
    for members, padded in groups:
        if padded:
            pieces.append(padded_attention(query, key, value, [bounds[i] for i in members], scaling, window,
                                           [contexts[i] for i in members]))
        else:
            pieces.extend(one_example(*_with_context(split[i], key, value, contexts[i])) for i in members)
        order.extend(j for i in members for j in range(*bounds[i]))
    out = torch.cat(pieces)
    if order != list(range(len(order))):  # back to the row's order
        out = out.index_select(0, torch.tensor(order, device=out.device).argsort())
    return out


def _length(span: tuple[int, int] | None) -> int:
    return 0 if span is None else span[1] - span[0]


def _with_context(qkv: tuple[torch.Tensor, ...], key: torch.Tensor, value: torch.Tensor,
                  context: tuple[int, int] | None) -> tuple[torch.Tensor, ...]:
    """An example's q, k, v, with the context's keys and values put before its own."""
    if context is None:
        return qkv
    q, k, v = qkv
    start, end = context
    return q, torch.cat([key[:, :, start:end], k], dim=2), torch.cat([value[:, :, start:end], v], dim=2)


def padded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     segments: list[tuple[int, int]], scaling: float | None, window: int | None,
                     contexts: list[tuple[int, int] | None] | None = None) -> torch.Tensor:
    """The examples at `segments` ((start, end) in the row) at once, padded to the longest: scores by matmul, a
    softmax over them, the output by matmul, as transformers' eager attention computes (scores and weights in the
    input's dtype, the softmax accumulating in fp32). On a CPU sdpa's per-call cost dominates short examples: eight
    of 40-90 tokens are 2.3x faster this way, four of 512 1.4x, forward and backward. `query` is [1, heads, total,
    dim], `key` and `value` [1, kv heads, total, dim]; an example's keys are its context's rows (`contexts`, as in
    `packed_attention`) then its own. Returns [tokens of the segments, heads, dim] in their order."""
    contexts = contexts or [None] * len(segments)
    q_lengths = [end - start for start, end in segments]
    k_spans = [[span] if context is None else [context, span] for context, span in zip(contexts, segments, strict=True)]
    k_lengths = [sum(end - start for start, end in spans) for spans in k_spans]
    count, q_longest, k_longest = len(segments), max(q_lengths), max(k_lengths)
    heads, dim, groups = query.shape[1], query.shape[3], key.shape[1]
    device = query.device
    # The segments cover the row in order (decided in Python: a check on the device would wait for it on a GPU).
    whole = segments[0][0] == 0 and segments[-1][1] == query.shape[2] and all(
        end == start for (_, end), (start, _) in pairwise(segments))

    def rows(spans: list[tuple[int, int]]) -> torch.Tensor:
        return torch.cat([torch.arange(start, end, device=device) for start, end in spans])

    def places(lengths: list[int], longest: int) -> torch.Tensor:
        return torch.cat([torch.arange(n, device=device) + i * longest for i, n in enumerate(lengths)])

    def padded(x: torch.Tensor, taken: torch.Tensor | None, index: torch.Tensor, longest: int) -> torch.Tensor:
        tokens = x[0].transpose(0, 1) if taken is None else x[0].transpose(0, 1).index_select(0, taken)
        out = x.new_zeros(count * longest, x.shape[1], dim).index_copy(0, index, tokens)
        return out.view(count, longest, x.shape[1], dim).transpose(1, 2)  # [count, h, longest, dim]

    q_index, k_index = places(q_lengths, q_longest), places(k_lengths, k_longest)
    q_rows = None if whole else rows(segments)
    k_rows = q_rows if all(c is None for c in contexts) else rows([s for spans in k_spans for s in spans])
    q = padded(query, q_rows, q_index, q_longest).reshape(count, groups, heads // groups * q_longest, dim)
    k, v = (padded(x, k_rows, k_index, k_longest) for x in (key, value))  # a group's heads share its k, v
    scores = torch.matmul(q, k.transpose(2, 3)).view(count, heads, q_longest, k_longest)
    scores.mul_(dim**-0.5 if scaling is None else scaling).add_(padding_bias(q_lengths, window, query, k_lengths))
    weights = torch.softmax(scores, dim=-1).view(count, groups, -1, k_longest)
    out = torch.matmul(weights, v).view(count, heads, q_longest, dim).transpose(1, 2)
    return out.reshape(count * q_longest, heads, dim).index_select(0, q_index)


def padding_bias(lengths: list[int], window: int | None, like: torch.Tensor,
                 key_lengths: list[int] | None = None) -> torch.Tensor:
    """[count, 1, longest query, longest key]: 0 where a query may see a key (causal, inside its example and the
    sliding window), -inf elsewhere. An example's queries are its last `lengths` positions, its keys all
    `key_lengths` (default: the same; more where it has a context). Padding query rows see all their example's
    keys: a row with nothing to see would be NaN, and NaN times the zero gradient of a dropped row is still NaN."""
    key_lengths = key_lengths or lengths
    device = like.device
    q_len = torch.tensor(lengths, device=device)[:, None, None]
    k_len = torch.tensor(key_lengths, device=device)[:, None, None]
    i = torch.arange(max(lengths), device=device)[None, :, None]
    j = torch.arange(max(key_lengths), device=device)[None, None, :]
    position = i + (k_len - q_len)  # of each query among its example's keys
    seen = j <= position
    if window is not None:
        seen = seen & (position - j < window)
    allowed = (seen | (i >= q_len)) & (j < k_len)  # [count, longest query, longest key]
    bias = torch.zeros(len(lengths), 1, max(lengths), max(key_lengths), dtype=like.dtype, device=device)
    return bias.masked_fill_(~allowed[:, None], float("-inf"))
