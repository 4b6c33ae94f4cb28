"""Answer log-probabilities: the sum of log p(token) over the answer tokens of each sequence (the prompt and
padding never count), with the LM head run a chunk of rows at a time. Preference evaluation (infer/preference.py)
and the preference and GRPO trainers (train/preference.py, train/grpo.py) compute theirs here, from batches of
data/pairs.py's PairCollator (`answer_labels`, `sequence`) or GRPO's sampled answers."""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from gemmatune.errors import GemmatuneError
from gemmatune.models.loss import IGNORE, CausalLMParts, causal_lm_parts, chunk_rows


def _chunk_log_probs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                     softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_log_probs(hidden: torch.Tensor, targets: torch.Tensor, parts: CausalLMParts) -> torch.Tensor:
    """log p(target) for each row of `hidden` [n, d], the LM head run on a few hundred rows at a time. With
    gradients, each chunk's logits are recomputed in backward (torch.utils.checkpoint), so no [n, vocab] tensor is
    ever kept; the LM head may be any module."""
    vocab = getattr(parts.head, "out_features", None) or parts.head.weight.shape[0]
    chunk = chunk_rows(vocab, None)  # any head module: its logits' dtype is not known, fp32 assumed
    grad = torch.is_grad_enabled() and hidden.requires_grad
    out = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if grad:
            out.append(torch.utils.checkpoint.checkpoint(_chunk_log_probs, h, t, parts.head, parts.softcap,
                                                         use_reentrant=False))
        else:
            out.append(_chunk_log_probs(h, t, parts.head, parts.softcap))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def sequence_log_probs(model: torch.nn.Module, inputs: dict,
                       parts: CausalLMParts | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of a PairCollator batch: the sum of its answer tokens' log-probabilities, and their count.

    The body runs once over every sequence; the LM head only where a position predicts an answer token."""
    parts = parts or causal_lm_parts(model, any_head=True)
    if parts is None:
        raise GemmatuneError(f"{type(model).__name__}: no body and LM head to compute log-probabilities with")
    labels, sequence = inputs["answer_labels"], inputs["sequence"]
    body_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
    hidden = parts.body(**body_inputs, use_cache=False).last_hidden_state
    # Position t predicts token t + 1; a sequence's first token is never a label, so t and t + 1 are one sequence.
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    keep = shifted != IGNORE
    log_probs = token_log_probs(hidden[keep], shifted[keep], parts)
    count = int(sequence.max()) + 1
    owner = sequence[keep]
    sums = torch.zeros(count, dtype=torch.float32, device=log_probs.device).index_add(0, owner, log_probs)
    tokens = torch.bincount(owner, minlength=count)
    return sums, tokens
