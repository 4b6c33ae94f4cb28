"""The LoRA branch of a linear layer, `result + scale * dropout(x) @ A^T @ B^T`, as one autograd function.

PEFT computes it as separate torch ops: a dropout mask and a scaled copy of the input, two matmuls, a
multiplication of the whole [tokens, out] product by the scale and an addition to the base output, each with its
own pass over memory and its own backward, and it keeps the dropped-out input for backward. Here the scale and the
dropout's 1 / keep rate multiply the small [tokens, r] product, the result is added in place by the second matmul,
and backward keeps a 1-byte mask and recomputes the masked input from the input the base layer keeps anyway.
Same values, same gradients (tests/test_fused_lora.py against PEFT's own layer).

The dropout mask: each element is dropped where 16 random bits fall below round(p * 65536), four elements from
each 64-bit random number (PEFT's `bernoulli_` draws one per element); so the drop rate is p to within 1 / 131072
and kept elements are scaled by the exact inverse of the keep rate. Masks are independent between layers, as PEFT's
are: sharing one between the projections that read the same tensor would change the expected gradient
(tests/test_lora_dropout.py). On a CPU the bits come from numpy's SFC64 (2.3x faster than torch's Mersenne
Twister, 1.15x numpy's PCG64: 588, 1,337 and 690 us for 409,600 64-bit draws on 2 cores), seeded by one draw of
torch's default generator; elsewhere from torch's generator of the device. Either
way torch's seed fixes them, and gradient checkpointing, which restores torch's generator state before recomputing
a layer, recomputes the same masks. The compare runs in numpy on a CPU, and a mask is applied as an AND of the
value's bits with all ones or all zeros (`kept`): torch's CPU kernels for an int16 compare and for `where` or `mul`
with a bool mask take 5-10x as long (measured on 2 cores, [418, 640] bf16: compare 111 vs 12 us, where 118-185 vs
13-24 us).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

LEVELS = 1 << 16
"""Resolution of the drop rate: each element's draw is one of 65,536 values."""


def drop_rate(p: float) -> float:
    """The rate `keep_mask` drops at for a requested `p`: the nearest multiple of 1/65536."""
    return round(p * LEVELS) / LEVELS


def keep_mask(like: torch.Tensor, p: float) -> torch.Tensor | None:
    """A bool tensor shaped like `like`: False with probability `drop_rate(p)`; None when that rate is 0."""
    threshold = round(p * LEVELS)
    if threshold == 0:
        return None
    bits = random_int16(like.numel(), like.device)
    if bits.device.type == "cpu":  # numpy's compare: see the module's docstring
        return torch.from_numpy(np.greater_equal(bits.numpy(), threshold - LEVELS // 2)).view(like.shape)
    return (bits >= threshold - LEVELS // 2).view(like.shape)


_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def kept(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`torch.where(keep, x, 0)`, bit for bit (a dropped element is +0), as an AND of `x`'s bits with `keep` widened
    to all ones or all zeros: see the module's docstring. Not differentiable: for `LoraBranch`, which has its own
    backward. `keep` may be given widened already (`widened`)."""
    ints = _SAME_SIZE_INT[x.element_size()]
    return (x.view(ints) & (keep if keep.dtype == ints else widened(keep, x))).view(x.dtype)


def keep_(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`kept`, in place in `x`."""
    ints = _SAME_SIZE_INT[x.element_size()]
    x.view(ints).bitwise_and_(keep if keep.dtype == ints else widened(keep, x))
    return x


def widened(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool mask as integers of `like`'s element size: all ones where True, all zeros where False."""
    return keep.to(_SAME_SIZE_INT[like.element_size()]).neg_()


def random_int16(n: int, device: torch.device) -> torch.Tensor:
    """`n` independent uniform 16-bit integers, from torch's seed (see the module's docstring)."""
    if device.type == "cpu":
        seed = int(torch.empty((), dtype=torch.int64).random_())  # one draw of torch's generator: its seed rules
        return torch.from_numpy(np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n])
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    return draws.view(torch.int16)[:n]


def dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """`x` with each element zeroed with probability `drop_rate(p)` and the rest scaled by 1 / (1 - that rate)."""
    keep = keep_mask(x, p)
    return x if keep is None else torch.where(keep, x * (1 / (1 - drop_rate(p))), 0)  # differentiable, unlike kept


class LoraBranch(torch.autograd.Function):
    """`result += scale / keep_rate * (x * keep) @ a.T @ b.T`, in place; gradients for x, a and b (result's passes
    through). Computes in the dtypes of x and result (bf16 activations under autocast), returns a and b's gradients
    in theirs. `result` comes first: autograd's in-place handling of a view (a linear layer with a bias returns
    one) routes the first gradient to the tensor modified in place."""

    @staticmethod
    def forward(ctx, result, x, a, b, scale: float, p: float):  # noqa: ANN001, ANN205 - autograd's signature
        with torch.autocast(x.device.type, enabled=False):
            keep = keep_mask(x, p)
            masked = x if keep is None else kept(x, keep)
            small = masked.reshape(-1, x.shape[-1]) @ a.to(x.dtype).t()  # [tokens, r]
            scale = scale if keep is None else scale / (1 - drop_rate(p))
            result.view(-1, result.shape[-1]).addmm_(small.to(result.dtype), b.to(result.dtype).t(), alpha=scale)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, keep, a, b, small)
        ctx.scale = scale
        return result

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, keep, a, b, small = ctx.saved_tensors
        with torch.autocast(x.device.type, enabled=False):
            flat = grad.reshape(-1, grad.shape[-1])
            grad_small = (flat @ b.to(flat.dtype)).mul_(ctx.scale).to(x.dtype)  # [tokens, r]
            grad_b = (flat.t() @ small.to(flat.dtype)).mul_(ctx.scale).to(b.dtype)
            keep = None if keep is None else widened(keep, x)  # once for both uses below
            masked = x if keep is None else kept(x, keep)
            grad_a = (grad_small.t() @ masked.reshape(-1, x.shape[-1])).to(a.dtype)
            grad_x = None
            if ctx.needs_input_grad[1]:
                grad_x = (grad_small @ a.to(x.dtype)).view(x.shape)
                if keep is not None:
                    keep_(grad_x, keep)
        return grad, grad_x, grad_a, grad_b, None, None


def fusable(layer: nn.Module, adapter: str) -> bool:
    """A plain LoRA adapter of a linear layer (no DoRA or other variant, no LoRA bias, weights not transposed)."""
    from gemmatune.compat import lora_variants

    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    return (adapter not in lora_variants(layer) and type(a) is nn.Linear and type(b) is nn.Linear
            and b.bias is None and not getattr(layer, "fan_in_fan_out", False))


def use_fused_lora(peft_model: nn.Module) -> int:
    """Route every fusable LoRA adapter of `peft_model` through `LoraBranch`, by PEFT's own hook for LoRA variants
    (compat.lora_variants). Merging and unmerging stay PEFT's plain LoRA arithmetic. Returns how many."""
    from peft.tuners.lora import LoraLayer

    from gemmatune.compat import lora_variants

    variant = fused_variant()
    fused = 0
    for layer in peft_model.modules():
        if isinstance(layer, LoraLayer):
            for adapter in list(layer.lora_A):
                if fusable(layer, adapter):
                    lora_variants(layer)[adapter] = variant
                    fused += 1
    return fused


@functools.cache
def fused_variant():  # noqa: ANN201 - a subclass of a PEFT class only compat imports
    """The PEFT LoRA variant whose forward is `LoraBranch` (one instance serves every layer: it keeps no state)."""
    from gemmatune.compat import lora_variant_base

    class FusedLora(lora_variant_base()):
        @staticmethod
        def init(module: nn.Module, adapter_name: str, **kwargs) -> None:
            pass

        @staticmethod
        def forward(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                    **kwargs) -> torch.Tensor:
            dropout = module.lora_dropout[active_adapter]
            p = getattr(dropout, "p", 0.0) if dropout.training else 0.0
            return LoraBranch.apply(result.contiguous(), x, module.lora_A[active_adapter].weight,
                                    module.lora_B[active_adapter].weight, module.scaling[active_adapter], p)

        @staticmethod
        def merge_safe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
            orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

        @staticmethod
        def unmerge(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    return FusedLora()
