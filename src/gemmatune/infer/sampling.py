"""Sampling a next token as transformers samples it, from the few tokens that can be drawn.

transformers' sampling divides the scores by the temperature, keeps the top_k highest (tokens tied with the k-th
too), keeps the smallest set of the likeliest whose probability reaches top_p (the likeliest always), and draws
with `torch.multinomial` over the whole vocabulary. For Gemma's 262,144 tokens that is a full sort (top_p) and a
random number per token (multinomial's `exponential_`) per row and step: on the embedded 270M on a 2-core Xeon, 33%
of a sampled decode step, which ran at 53 tokens/s against 94 greedy. Here the candidates come from `topk`: the
top_k (more where the k-th ties), or without top_k as many of the likeliest as top_p needs (fetched by doubling);
only the whole-vocabulary case (no top_k, top_p 1) reads every token, with one random number per row.

The arithmetic is float64 relative to the row's best score: a temperature of 1e-300 divides finite differences
(0 for the best token), so no inf - inf becomes NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LogitsProcessor

FIRST_FETCH = 256
"""Candidates fetched first for top_p without top_k (doubled while the nucleus reaches past them)."""


def candidates(scores: torch.Tensor, temperature: float, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens one row's `scores` (1-D) can draw and their probabilities (summing to 1), likeliest first:
    temperature, then top_k (0: off), then top_p, as transformers' warpers apply them."""
    vocab = scores.numel()
    top_k = top_k if 0 < top_k < vocab else 0
    fetch = min(vocab, 2 * top_k if top_k else FIRST_FETCH)
    full_log_norm = None
    while True:
        values, tokens = scores.topk(fetch)
        z = (values.double() - values[0].double()) / temperature
        if top_k:  # tokens tied with the k-th stay (transformers compares with the k-th value)
            kept = int((values >= values[top_k - 1]).sum())
            if kept == fetch < vocab:
                fetch = min(vocab, 2 * fetch)
                continue
            z, tokens = z[:kept], tokens[:kept]
            log_norm = torch.logsumexp(z, 0)
        else:
            if full_log_norm is None:
                full_log_norm = torch.logsumexp((scores.double() - values[0].double()) / temperature, 0)
            log_norm = full_log_norm
        probs = torch.exp(z - log_norm)
        inside = int(((probs.cumsum(0) - probs) < top_p).sum())  # the mass before a token is below top_p
        if top_k or inside < fetch or fetch == vocab:
            break
        fetch = min(vocab, 2 * fetch)  # the nucleus may reach past the fetched tokens
    probs = probs[:max(inside, 1)]
    return tokens[:probs.numel()], probs / probs.sum()


def draw(scores: torch.Tensor, temperature: float, top_p: float, top_k: int = 0,
         generator: torch.Generator | None = None) -> int:
    """One token from one row's `scores` (1-D), as `candidates` describes, with `generator` (None: torch's)."""
    if top_k <= 0 and top_p >= 1:  # the whole vocabulary: no order needed, one random number
        scaled = (scores.double() - scores.max().double()) / temperature
        tokens, probs = None, torch.softmax(scaled, 0)
    else:
        tokens, probs = candidates(scores, temperature, top_p, top_k)
    cumulative = probs.cumsum(0)
    u = torch.rand((1,), generator=generator, device=scores.device, dtype=torch.float64) * cumulative[-1]
    k = torch.searchsorted(cumulative, u, right=True).clamp(max=cumulative.numel() - 1)
    return int(k.item() if tokens is None else tokens[k].item())


Settings = tuple[float, float, int, torch.Generator | None]
"""temperature, top_p, top_k (0: off) and the generator (None: torch's) of one row."""


class SampleRows(LogitsProcessor):
    """Draws each sampled row's next token (`draw`) and leaves that token alone allowed in the row's scores, so
    generate's greedy pick takes it: run generate with `do_sample=False` and this processor last.
    `settings(i, device)` gives row i's `Settings` (a generator on `device`), or None for a greedy row (its scores
    pass unchanged)."""

    def __init__(self, settings: Callable[[int, torch.device], Settings | None]):
        self.settings = settings

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for i, row in enumerate(scores):
            chosen = self.settings(i, scores.device)
            if chosen is not None:
                token = draw(row, *chosen)
                row.fill_(float("-inf"))
                row[token] = 0.0
        return scores
