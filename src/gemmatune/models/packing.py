"""Padding-free packing: a batch becomes one row of concatenated examples, and attention stays per example.

The collator (data.examples.PackCollator) concatenates the examples of a batch into a single row with
`position_ids` restarting at 0 for each example and no attention mask (nothing is padding). Each example's first
label is -100, so no token is ever trained to predict across a boundary (labels are shifted by one inside the loss).

Attention must never cross examples. Transformers builds a dense block-diagonal T x T mask for packed rows, and
the CPU sdpa kernel computes every block of it. Here the row is split where positions restart (or continue a
shared prefix: kernels.attention.packed_layout), the examples attended all at once, padded to the longest, where
that costs less than sdpa per example, else by sdpa one by one; both exact. Registered through transformers' public
`AttentionInterface` under `PACKED_SDPA`. On CUDA with flash-attn installed, `flash_attention_2` does the same
natively (varlen). Training must run with `use_cache=False`: with a cache, transformers builds no per-example mask.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from gemmatune.kernels.attention import needs_stock_attention, packed_attention, packed_layout

PACKED_SDPA = "gemmatune_packed_sdpa"


def sequence_bounds(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed example's own rows in a single row (`packed_layout`)."""
    return packed_layout(position_ids)[0]


def reads_shared_prefixes(model: torch.nn.Module) -> bool:
    """Whether `model` attends with `packed_sdpa_attention`, which reads shared prefixes from the position ids
    (transformers' own implementations, flash-attn's varlen among them, would not see them)."""
    from gemmatune.compat import attn_implementation

    return attn_implementation(model.config) == PACKED_SDPA


def _window_mask(length: int, window: int | None, device: torch.device, keys: int | None = None) -> torch.Tensor:
    """Causal band mask (True = attend) for one example's last `length` positions against its `keys` first ones
    (default: `length`), as transformers defines it: query at position i sees keys j with i - window < j <= i."""
    keys = keys or length
    i = torch.arange(keys - length, keys, device=device)
    diff = i[:, None] - torch.arange(keys, device=device)[None, :]
    band = (diff >= 0) if window is None else (diff >= 0) & (diff < window)
    return band[None, None]


@functools.cache
def _stock_sdpa():
    """transformers' own sdpa attention function, looked up through its public registry."""
    from transformers import AttentionInterface

    return AttentionInterface()["sdpa"]


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention per packed example when the row is packed (one row, several position restarts, no cache); plain
    sdpa otherwise (generation, padded batches), so a model loaded with it behaves as sdpa does."""
    sdpa_attention_forward = _stock_sdpa()
    q_len, kv_len = query.shape[2], key.shape[2]
    packed = position_ids is not None and query.shape[0] == 1 and q_len == kv_len and q_len > 1
    bounds, contexts = packed_layout(position_ids) if packed else ([], [])
    if len(bounds) < 2:
        if sliding_window is not None and attention_mask is None and q_len == kv_len and q_len > sliding_window:
            attention_mask = _window_mask(q_len, sliding_window, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    def one_example(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        length, keys, mask = q.shape[2], k.shape[2], None
        if keys > length or (sliding_window is not None and length > sliding_window):  # else sdpa's is_causal
            mask = _window_mask(length, sliding_window, q.device, keys)
        return sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0][0]  # [length, heads, head_dim]

    padded_ok = not needs_stock_attention(module, kwargs)
    out = packed_attention(query, key, value, bounds, kwargs.get("scaling"), sliding_window, one_example, padded_ok,
                           contexts)
    return out[None], None


def flash_attention_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def register_packed_attention() -> None:
    """Make `PACKED_SDPA` a valid `attn_implementation` (attention function and its mask builder)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # With the sdpa mask builder, padded batches and generation keep their masks. For a packed row the
    # mask it builds is the block-diagonal one, which the split above makes unnecessary to compute with.
    AttentionMaskInterface.register(PACKED_SDPA, AttentionMaskInterface()["sdpa"])


def attention_for_packing(requested: str | None, allow_flash: bool = True) -> str | None:
    """The attention implementation to load a model with when batches are packed.

    None or sdpa: flash_attention_2 on CUDA when flash-attn is installed and `allow_flash`, else per-example
    sdpa. Anything else the user named (eager, flex_attention...) is kept: transformers masks packed rows for it.
    """
    if requested not in (None, "sdpa"):
        return requested
    if allow_flash and flash_attention_available():
        return "flash_attention_2"
    register_packed_attention()
    return PACKED_SDPA
