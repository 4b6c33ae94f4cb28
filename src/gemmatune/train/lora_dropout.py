"""Which LoRA dropout a training method uses, and a cheaper one than PEFT's for layers kernels/lora.py does not fuse.

PEFT gives every LoRA layer its own `nn.Dropout` on the layer's input. On a CPU that costs far more than it looks:
`bernoulli_` draws one random number per element (measured here: a 1024 x 640 fp32 mask took 7 ms, the
multiplication it gates 0.06 ms), and it runs for each of the 7 projections of every layer. `LoraDropout` keeps
PEFT's distribution with the 16-bit draws of kernels.lora.keep_mask; the fused LoRA branch (kernels.lora), which
every plain linear LoRA layer trains with, reads its rate from here and draws its mask the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from gemmatune.kernels.lora import dropped, use_fused_lora


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
    """The LoRA dropout a training method uses, then every plain linear LoRA layer's branch fused with it
    (kernels.lora.use_fused_lora). sft: PEFT's distribution at a fraction of its cost; dpo, orpo and grpo: none
    (`remove_lora_dropout`). Returns how many layers' dropouts were replaced."""
    replaced = use_fast_lora_dropout(peft_model) if method == "sft" else remove_lora_dropout(peft_model)
    use_fused_lora(peft_model)
    return replaced


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
