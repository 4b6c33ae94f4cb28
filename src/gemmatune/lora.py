"""Attach LoRA adapters with PEFT and report what was wrapped and what trains."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gemmatune.config import LoraSection
from gemmatune.errors import GemmatuneError
from gemmatune.models import ModelFamily
from gemmatune.quantization import keep_4bit_layout

log = logging.getLogger(__name__)


@dataclass
class TrainableReport:
    trainable: int
    total: int
    wrapped_modules: int

    def line(self) -> str:
        share = 100 * self.trainable / max(1, self.total)
        return (
            f"LoRA: {self.wrapped_modules} modules wrapped, {self.trainable:,} trainable of {self.total:,} "
            f"parameters ({share:.3f}%)"
        )


def peft_lora_config(cfg: LoraSection, family: ModelFamily):
    from peft import LoraConfig

    targets = cfg.target_modules if cfg.target_modules is not None else family.lora_targets
    if isinstance(targets, tuple):
        targets = list(targets)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.bias,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def attach_lora(model, cfg: LoraSection, family: ModelFamily, quantized: bool = False, autocast: bool = False):
    """Freeze the base model and wrap the target modules; returns (peft_model, report).

    `autocast`: training runs under bf16/fp16 autocast. PEFT then need not cast each LoRA input to the fp32 of
    the adapter weights (autocast casts for the matmul anyway): that cast copied every projection's input
    twice per step and kept a separate copy per projection for backward where q/k/v could share one.
    """
    from peft import get_peft_model

    if quantized:
        freeze_quantized(model)
        keep_4bit_layout(model)
    try:
        peft_model = get_peft_model(model, peft_lora_config(cfg, family))
    except ValueError as exc:
        raise GemmatuneError(f"config key lora.target_modules: {str(exc).splitlines()[0]}") from None
    if autocast:
        skip_input_casts(peft_model)
    return peft_model, trainable_report(peft_model)


def skip_input_casts(peft_model) -> None:
    """Under autocast, LoRA layers take their input as it comes (autocast casts for each matmul)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = False  # PEFT's switch (peft.helpers.disable_input_dtype_casting)


def freeze_quantized(model) -> None:
    """Freeze a 4-bit model for QLoRA, keeping its non-quantized weights in their loaded dtype.

    Not `peft.prepare_model_for_kbit_training`: it casts every bf16 weight that is not 4-bit to fp32 —
    for Gemma 3n that is the embeddings and per-layer embeddings (2.9B parameters in E4B, +5.8 GB),
    which alone defeats QLoRA on a 16 GB GPU. With bf16 compute the norms need no fp32 copy.
    """
    for param in model.parameters():
        param.requires_grad_(False)


def wrapped_module_names(peft_model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]


def trainable_report(peft_model) -> TrainableReport:
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    return TrainableReport(trainable, total, len(wrapped_module_names(peft_model)))
