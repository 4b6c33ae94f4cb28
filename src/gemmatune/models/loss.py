"""Causal-LM loss without full logits: the LM head runs only where a label is, in chunks.

For Gemma the LM head (262,144 x hidden) is most of the matmul work per token and its fp32 logits are
1 MiB per token. So the model body runs to hidden states, the positions whose (shifted) label is not -100
are selected, and the LM head + cross-entropy run over them in chunks. Each chunk's gradient with
respect to its hidden states is computed right away in the forward pass (as fused linear-CE kernels do),
so only [chunk, vocab] logits exist at any time, and backward is one multiply. The math equals the plain
`model(labels=...)` loss: sum over label tokens divided by their count (or the Trainer's
`num_items_in_batch`, which spans all gradient-accumulation micro-batches).

Evaluation (the Trainer's eval loop, `gemmatune eval`, the evaluation after training) runs the same code under
torch.no_grad: then no chunk gradient is formed, and any LM head module (LoRA-wrapped, quantized) can be used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position outside the loss (cross-entropy's ignore_index)


# Rows per LM-head matmul: as many as 256 MiB of logits hold (Gemma's 262,144-token vocabulary: 512 rows in bf16,
# 256 in fp32). Fewer rows make the matmul slower per row on a CPU (2-core Xeon with AMX, bf16 [n, 640] x [640,
# 262144]: 1,200 GFLOP/s at 256 rows, 2,000-2,100 at 384-512; AVX512 without AMX: 335 at 128, 375 at 256), more
# cost memory.
LOGITS_BYTES_PER_CHUNK = 1 << 28
# Rows per gradient product [rows, vocab] x [vocab, d] inside a chunk: oneDNN's kernel for 512 rows runs at 1,030
# GFLOP/s where two of 256 run at 1,700 (bf16, 2-core Xeon with AMX); 256 rows are enough elsewhere too.
GRADIENT_ROWS = 256
# Rows per fp32 softmax pass inside a chunk: 2**22 logits (16 MiB) stays in a CPU's last-level cache.
LOGITS_PER_FP32_BLOCK = 1 << 22


@dataclass
class CausalLMParts:
    body: torch.nn.Module  # input_ids -> last_hidden_state
    head: torch.nn.Module  # hidden -> vocab: a plain nn.Linear, except for `causal_lm_parts(any_head=True)`
    softcap: float | None  # final logit soft-capping (Gemma 3n: 30), None when the family has none


def causal_lm_parts(model: torch.nn.Module, any_head: bool = False) -> CausalLMParts | None:
    """Body, LM head and softcap of a (PEFT-wrapped) causal LM through public attributes; None if the
    model is not laid out that way (then the caller uses the plain loss).

    Training needs a plain nn.Linear head (its gradient is computed here from the weight). `any_head`
    accepts any head module (LoRA-wrapped, quantized): a loss without gradient only calls it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or head is None or (type(head) is not torch.nn.Linear and not any_head):
        return None  # e.g. a LoRA-wrapped or quantized LM head in training: its own forward must run
    config = base.config
    softcap = getattr(config, "final_logit_softcapping", None)
    text_config = getattr(config, "text_config", None)
    if softcap is None and text_config is not None:
        softcap = getattr(text_config, "final_logit_softcapping", None)
    return CausalLMParts(body, head, softcap)


# Below this a target's fp32 softmax probability may have lost precision to underflow (exp(z - max) is exact to
# an ulp down to 2**-126 and the sum is >= 1), so its log is taken from a recomputed log_softmax instead.
_SMALLEST_EXACT_PROB = 2.0**-100


def _cross_entropy_and_grad_(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                              work: torch.Tensor | None, need_grad: bool, raw_rows) -> torch.Tensor:
    """Sum of cross-entropy over the rows of `logits` (the LM head's raw output, any float dtype); with
    `need_grad`, `logits` is overwritten with d(sum)/d(logits). `raw_rows(index)` recomputes the raw logits
    of the rows `index` (rarely needed, see `_SMALLEST_EXACT_PROB`).

    The loss is computed in fp32 (in `work`, a float32 buffer, when `logits` is not float32 already), as
    the plain path does after `logits.float()`. Without a softcap it is three passes over the vocabulary-wide
    rows, the softmax kernel's (max, exp and sum, scale), instead of log_softmax + exp: each row's loss is
    -log p[target], and the softmax is the gradient. Only the target column, p - 1, is written from fp32
    (as expm1 of the log-probability): rounded to bf16 a p of 0.999 is 1.0 and that token's gradient would
    be lost.
    """
    rows = torch.arange(targets.shape[0], device=targets.device)
    x = logits if work is None else work[: logits.shape[0]].copy_(logits)
    if softcap is not None:
        return _softcapped_cross_entropy_and_grad_(logits, x, rows, targets, softcap, need_grad)
    torch.softmax(x, dim=-1, out=x)
    target_probs = x[rows, targets]
    target_log_probs = torch.log(target_probs)
    underflow = torch.nonzero(target_probs < _SMALLEST_EXACT_PROB).flatten()
    if underflow.numel():
        raw = raw_rows(underflow).float()
        target_log_probs[underflow] = torch.log_softmax(raw, dim=-1)[rows[: underflow.numel()], targets[underflow]]
    if need_grad:
        x[rows, targets] = torch.expm1(target_log_probs)
        if x is not logits:
            logits.copy_(x)
    return -target_log_probs.sum()


def _softcapped_cross_entropy_and_grad_(logits: torch.Tensor, x: torch.Tensor, rows: torch.Tensor,
                                        targets: torch.Tensor, softcap: float, need_grad: bool) -> torch.Tensor:
    """`_cross_entropy_and_grad_` for logits capped as softcap * tanh(logits / softcap); `x` is the fp32
    copy (or `logits` itself when fp32)."""
    tanh = torch.tanh(x / softcap)
    torch.mul(tanh, softcap, out=x)
    torch.log_softmax(x, dim=-1, out=x)
    target_log_probs = x[rows, targets]
    if need_grad:
        x.exp_()
        x[rows, targets] = torch.expm1(target_log_probs)
        x *= 1 - tanh * tanh
        if x is not logits:
            logits.copy_(x)
    return -target_log_probs.sum()


def _chunked_sum(hidden: torch.Tensor, targets: torch.Tensor, head, softcap: float | None, chunk: int | None,
                 on_gradient=None) -> torch.Tensor:
    """Sum of cross-entropy over the rows of `hidden`, `chunk` rows of logits at a time (None: `chunk_rows`).

    `head` maps [rows, d] to [rows, vocab] logits. With `on_gradient`, each chunk's logits are overwritten
    with d(sum)/d(logits) and passed on as `on_gradient(start, grad_logits, hidden_rows)`; without it no
    gradient is formed (evaluation).
    """
    n = hidden.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    logits_of, logits_dtype = _head_matmul(head, hidden)
    if chunk is None:
        chunk = chunk_rows(_vocab(head), logits_dtype)
    chunk = -(-n // -(-n // chunk))  # equal chunks: 1,100 rows at most 512 -> 3 x 367, not 512 + 512 + 76
    # One logits buffer for every chunk: a fresh [256, 262144] fp32 output per chunk is 256 MiB of new pages to
    # fault in (glibc maps blocks over 32 MiB anew each time): 150 vs 196 GFLOP/s on a 2-core Xeon.
    buffer = None if logits_dtype is None else torch.empty((min(chunk, n), _vocab(head)), dtype=logits_dtype,
                                                           device=hidden.device)
    block = None
    work = None
    for start in range(0, n, chunk):
        h = hidden[start:start + chunk]
        t = targets[start:start + chunk]
        logits = logits_of(h, None if buffer is None else buffer[: h.shape[0]])
        if block is None:
            block = max(1, LOGITS_PER_FP32_BLOCK // logits.shape[1])
        if logits.dtype != torch.float32 and work is None:
            work = torch.empty((min(block, logits.shape[0]), logits.shape[1]), dtype=torch.float32,
                               device=logits.device)
        # Block by block so the fp32 passes stay in cache; each block's rows become their gradient in place.
        for b in range(0, logits.shape[0], block):
            rows = h[b:b + block]
            total += _cross_entropy_and_grad_(logits[b:b + block], t[b:b + block], softcap, work,
                                              on_gradient is not None, lambda index, rows=rows: logits_of(rows[index]))
        if on_gradient is not None:
            on_gradient(start, logits, h)
    return total


def _vocab(head: torch.nn.Module) -> int:
    return getattr(head, "out_features", None) or head.weight.shape[0]


def chunk_rows(vocab: int, logits_dtype: torch.dtype | None) -> int:
    """Rows of logits per LM-head chunk: `LOGITS_BYTES_PER_CHUNK` of them, in `logits_dtype` (None: fp32)."""
    size = torch.finfo(logits_dtype).bits // 8 if logits_dtype is not None else 4
    return max(1, LOGITS_BYTES_PER_CHUNK // (vocab * size))


def _head_matmul(head, hidden: torch.Tensor):
    """`head` as `logits_of(h, out=None)`, and the dtype of its logits when they can be written into `out`.

    A plain bias-free nn.Linear is one matmul into `out`, in the dtype autocast would give it; its weight is
    cast to that dtype once here, not per chunk (autocast caches casts only of weights that require grad, and
    evaluation keeps frozen fp32 weights under bf16 autocast: 2 x 168M elements per chunk for Gemma's head).
    Any other head module (LoRA-wrapped, quantized, placed by accelerate hooks) is called as it is (dtype None:
    no buffer). Hooks registered on a plain head do not run: the matmul is called, not the module.
    """
    if (type(head) is not torch.nn.Linear or head.bias is not None or not head.weight.is_floating_point()
            or head.weight.device != hidden.device or hasattr(head, "_hf_hook")):  # accelerate moves/offloads it
        return (lambda h, out=None: head(h)), None
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else \
        torch.promote_types(hidden.dtype, head.weight.dtype)
    weight_t = head.weight.detach().to(dtype).t()

    def logits_of(h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(kind, enabled=False):
            return torch.mm(h.to(dtype), weight_t, out=out)

    return logits_of, dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over rows of `hidden`; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, head, softcap, chunk):
        need_hidden_grad = ctx.needs_input_grad[0]
        need_weight_grad = ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
        # The gradient matmuls run in the autocast dtype when autocast is on (bf16 on CPU/GPU), as the
        # backward of a plain LM head would; the weight is cast once, not per chunk.
        kind = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
        w = weight.to(compute_dtype) if need_hidden_grad else None

        def accumulate(start: int, grad_logits: torch.Tensor, h: torch.Tensor) -> None:
            g = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                for piece in range(0, g.shape[0], GRADIENT_ROWS):
                    rows = slice(start + piece, start + min(piece + GRADIENT_ROWS, g.shape[0]))
                    grad_hidden[rows] = (g[piece:piece + GRADIENT_ROWS] @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.add_((g.T @ h.to(g.dtype)).float())

        need_grad = need_hidden_grad or need_weight_grad
        total = _chunked_sum(hidden, targets, head, softcap, chunk, accumulate if need_grad else None)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


def _needs_grad(hidden: torch.Tensor, head: torch.nn.Module) -> bool:
    # Decided here, not inside the autograd.Function: its `needs_input_grad` follows `requires_grad` even
    # under torch.no_grad, so an evaluation of a model whose head weight requires grad (a plain transformers
    # model, never frozen) would build a [vocab, d] weight gradient and a gradient matmul per chunk for nothing.
    return torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))


def chunked_cross_entropy_sum(hidden: torch.Tensor, targets: torch.Tensor, parts: CausalLMParts,
                              chunk: int | None = None) -> torch.Tensor:
    """Sum of next-token cross-entropy over the rows of `hidden` [n, d] against `targets` [n].

    Under torch.no_grad (evaluation) only the loss is computed, with any head module; with gradients the
    head must be a plain nn.Linear.
    """
    head = parts.head
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if not _needs_grad(hidden, head):
        with torch.no_grad():
            return _chunked_sum(hidden, targets, head, parts.softcap, chunk)
    if type(head) is not torch.nn.Linear:
        raise ValueError("the chunked loss computes gradients only for a plain nn.Linear LM head")
    if head.bias is not None:
        # Rare for causal LMs; keep the exact path simple rather than fuse a bias gradient.
        logits = head(hidden).float()
        if parts.softcap is not None:
            logits = torch.tanh(logits / parts.softcap) * parts.softcap
        return F.cross_entropy(logits, targets, reduction="sum")
    return _ChunkedLinearCrossEntropy.apply(hidden, head.weight, targets, head, parts.softcap, chunk)


def selected_hidden(parts: CausalLMParts, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the body; return hidden states at positions that predict a label, and those labels."""
    labels = inputs["labels"]
    body_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = parts.body(**body_inputs, use_cache=False).last_hidden_state
    # Position t predicts label t+1: the standard causal shift, done on indices instead of logits.
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    keep = shifted != IGNORE
    return hidden[keep], shifted[keep]


def causal_lm_loss(model: torch.nn.Module, inputs: dict, num_items_in_batch=None,
                   parts: CausalLMParts | None = None, chunk: int | None = None) -> torch.Tensor:
    """Mean next-token loss over label tokens, without a [tokens, vocab] tensor for the whole batch."""
    parts = parts or causal_lm_parts(model)
    if parts is None:
        raise ValueError("model has no body/LM-head layout the chunked loss can use")
    hidden, targets = selected_hidden(parts, inputs)
    total = chunked_cross_entropy_sum(hidden, targets, parts, chunk)
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    if torch.is_tensor(count):
        count = count.to(total.device)
    return total / count

