"""4-bit (QLoRA) weights: where bitsandbytes runs, which Linear layers stay unquantized, and the nf4 config.

One rule for CPU and CUDA, computed from the model's own structure before its weights are read:
- transformers' defaults (the output projection and weights tied to it);
- the family's `keep_unquantized` modules, whose weights the model code reads or rewrites directly
  (Gemma 3n's AltUp coefficients are clamped in place and used through `F.linear(weight)`);
- every Linear whose shape bitsandbytes' CPU inference kernel cannot repack (out_features not a multiple
  of 32, in_features not a multiple of the 64-weight quantization block): on a CPU with AVX512-BF16 an
  eval-mode forward of such a layer fails an assertion. Real Gemma layers all fit except the ones above
  and SigLIP's 4304-wide MLP; keeping the rule on GPUs too keeps one memory plan for both.
"""

from __future__ import annotations

import torch

from gemmatune.errors import GemmatuneError
from gemmatune.models import ModelFamily

# bitsandbytes' CPU backend (nf4 forward and backward on CPU tensors) arrived in 0.49.
MIN_BNB_CPU = (0, 49)
# bitsandbytes' CPU repacking kernel: output rows in blocks of 32, input in quantization blocks of 64.
CPU_KERNEL_BLOCK_OUT = 32
QUANT_BLOCK = 64


def require_bitsandbytes(device: str) -> None:
    """Refuse, in one line, a 4-bit load that cannot run on `device` (cpu or cuda)."""
    try:
        import bitsandbytes
    except ImportError:
        raise GemmatuneError(
            "config key model.quantization: 4bit (QLoRA) needs bitsandbytes: pip install 'gemmatune[qlora]'"
        ) from None
    if device == "cpu" and _version(bitsandbytes.__version__) < MIN_BNB_CPU:
        raise GemmatuneError(
            f"config key model.quantization: 4bit on CPU needs bitsandbytes >= {'.'.join(map(str, MIN_BNB_CPU))} "
            f"(installed: {bitsandbytes.__version__}): pip install -U 'gemmatune[qlora]'"
        )


def bitsandbytes_usable(device: str) -> bool:
    try:
        require_bitsandbytes(device)
    except GemmatuneError:
        return False
    return True


def _version(text: str) -> tuple[int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in text.split(".")[:2]]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def modules_to_keep_unquantized(model: torch.nn.Module, family: ModelFamily) -> list[str]:
    """Module paths (of a model built on the meta device or loaded) that must stay in 16/32 bits."""
    from gemmatune.compat import keys_to_not_convert

    keep = set(keys_to_not_convert(model))
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf_path = name.split(".")
        if any(_ends_with(leaf_path, part.split(".")) for part in family.keep_unquantized):
            keep.add(name)
        elif module.out_features % CPU_KERNEL_BLOCK_OUT or module.in_features % QUANT_BLOCK:
            keep.add(name)
    return sorted(keep)


def _ends_with(path: list[str], suffix: list[str]) -> bool:
    return len(path) >= len(suffix) and path[-len(suffix):] == suffix


def is_kept(name: str, keep: list[str] | set[str]) -> bool:
    """True when module `name` is one of `keep` or inside one of them."""
    return any(name == k or name.startswith(k + ".") for k in keep if k)


def bnb_4bit_config(keep_unquantized: list[str]):
    """nf4 with double quantization and bf16 compute, on CPU and CUDA alike."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        # 4-bit weights packed in bf16 containers: FSDP can only shard parameters of a float dtype,
        # and single-device QLoRA is unaffected (same bytes, same kernels).
        bnb_4bit_quant_storage=torch.bfloat16,
        # A given list replaces transformers' defaults, so the list holds them too (see above).
        llm_int8_skip_modules=list(keep_unquantized),
    )


def quantized_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The bitsandbytes 4-bit Linear layers of a model (none when bitsandbytes is not imported)."""
    import sys

    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the layers changed.

    On a CPU with AVX512-BF16, the first eval-mode forward of a `Linear4bit` rewrites its weight into a
    kernel layout (absmax rounded to bf16) for good, and later training forwards then run a kernel without
    autograd: no gradient reaches the layers below (checked with bitsandbytes 0.50.2). A model that trains,
    and evaluates between steps, must keep the training layout; the 4-bit bytes then never change.
    """
    from gemmatune.compat import keep_training_layout

    layers = quantized_layers(model)
    for layer in layers:
        keep_training_layout(layer)
    return len(layers)
