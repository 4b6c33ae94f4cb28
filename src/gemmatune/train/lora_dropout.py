"""LoRA dropout with PEFT's distribution, at a fraction of its cost.

PEFT gives every LoRA layer its own `nn.Dropout` on the layer's input. On a CPU that costs far more than it looks:
`bernoulli_` draws one random number per element (measured here: a 1024 x 640 fp32 mask took 7 ms, the
multiplication it gates 0.06 ms), and it runs for each of the 7 projections of every layer. Here each layer still
draws its own mask, independent of every other layer's, as PEFT's do, but four elements' worth from each 64-bit
random number: an element is dropped where its 16 bits fall below round(p * 65536), so the drop rate is p to within
1 / 131072, and kept elements are scaled by the exact inverse of the keep rate (the expectation stays the input's).
Backward keeps a 1-byte mask, as `torch.nn.functional.dropout` does.

Sharing one mask between the layers that read the same tensor (q/k/v, gate/up) would be cheaper still, but it is not
the same training: q and k meet in a softmax, gate and up in a product, so correlated masks change the expected
gradient (tests/test_lora_dropout.py measures it: 14 standard errors off on a two-reader block).

The random numbers come from torch's default generator, so the trainer's seed fixes them, and gradient checkpointing,
which restores the generator's state before recomputing a layer, recomputes the same masks.
"""

from __future__ import annotations

import torch
from torch import nn

LEVELS = 1 << 16
"""Resolution of the drop rate: each element's draw is one of 65,536 values."""


def drop_rate(p: float) -> float:
    """The rate `dropped` drops at for a requested `p`: the nearest multiple of 1/65536."""
    return round(p * LEVELS) / LEVELS


def dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """`x` with each element zeroed with probability `drop_rate(p)` and the rest scaled by 1 / (1 - that rate)."""
    threshold = round(p * LEVELS)
    if threshold == 0:
        return x
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), 2**63 - 1)
    keep = draws.view(torch.int16)[:n].view(x.shape) >= threshold - LEVELS // 2
    return torch.where(keep, x * (LEVELS / (LEVELS - threshold)), 0)


class LoraDropout(nn.Module):
    """Stands in for PEFT's `nn.Dropout` in one LoRA layer: identity in eval mode, else `dropped`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropped(x, self.p) if self.training else x

    def extra_repr(self) -> str:
        return f"p={self.p}, 16-bit draws"


def set_lora_dropout(peft_model: nn.Module, method: str) -> int:
    """The LoRA dropout a training method uses: sft, PEFT's distribution at a fraction of its cost; dpo, orpo and
    grpo, none (`remove_lora_dropout`). Returns how many layers' dropouts were replaced."""
    return use_fast_lora_dropout(peft_model) if method == "sft" else remove_lora_dropout(peft_model)


def use_fast_lora_dropout(peft_model: nn.Module) -> int:
    """Replace every LoRA layer's `nn.Dropout` with a `LoraDropout` of the same rate. Layers without dropout
    (`lora_dropout: 0`: PEFT puts nn.Identity) are left exactly as they are. Returns how many were replaced."""
    replaced = 0
    for dropouts, adapter, dropout in _lora_dropouts(peft_model):
        dropouts[adapter] = LoraDropout(dropout.p)
        replaced += 1
    return replaced


def remove_lora_dropout(peft_model: nn.Module) -> int:
    """Replace every LoRA layer's `nn.Dropout` with `nn.Identity`, what PEFT itself puts for `lora_dropout: 0`.
    Preference tuning and GRPO train this way (TRL's `disable_dropout`): their losses compare the policy's log-probs
    with the reference's, and dropout noise would enter that difference (at step 1 the policy would not equal the
    reference it starts from). Returns how many were replaced."""
    removed = 0
    for dropouts, adapter, _ in _lora_dropouts(peft_model):
        dropouts[adapter] = nn.Identity()
        removed += 1
    return removed


def _lora_dropouts(peft_model: nn.Module):
    """(the layer's dropout ModuleDict, adapter name, its nn.Dropout) for every LoRA layer whose dropout is on."""
    from peft.tuners.lora import LoraLayer

    from gemmatune.compat import lora_dropout_modules

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            dropouts = lora_dropout_modules(module)
            for adapter, dropout in list(dropouts.items()):
                if isinstance(dropout, nn.Dropout) and dropout.p > 0:
                    yield dropouts, adapter, dropout
