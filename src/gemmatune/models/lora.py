"""Attach LoRA adapters with PEFT and report what was wrapped and what trains."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from gemmatune.config import LoraConfig
from gemmatune.errors import GemmatuneError
from gemmatune.models import ModelFamily
from gemmatune.models.quantization import keep_4bit_layout

log = logging.getLogger(__name__)


LANGUAGE_MODEL = "language model"
EXPERTS = "experts"  # the name of the experts' part in a family's `moe_parts`


@dataclass
class TrainableReport:
    trainable: int
    total: int
    wrapped_modules: int
    per_tower: dict[str, int] = field(default_factory=dict)  # "language model" / tower name -> wrapped modules
    moe: dict[str, int] = field(default_factory=dict)
    """Mixture-of-experts models only: part (experts, router, shared MLP) -> LoRA layers on it (experts: adapted
    3-D parameters); empty for dense models."""

    def line(self) -> str:
        share = 100 * self.trainable / max(1, self.total)
        text = (
            f"LoRA: {self.wrapped_modules} modules wrapped, {self.trainable:,} trainable of {self.total:,} "
            f"parameters ({share:.3f}%)"
        )
        if len(self.per_tower) > 1:
            text += "; " + ", ".join(f"{part}: {n}" for part, n in self.per_tower.items())
        if self.moe:
            parts = [f"{part} {n}" if n or part != EXPERTS else f"{part} frozen (lora.experts: false)"
                     for part, n in self.moe.items()]
            text += "; mixture of experts: " + ", ".join(parts)
        return text


def tower_of(module_name: str, family: ModelFamily) -> str:
    """Which part of a multimodal model a module belongs to: a tower name from `family.towers`, or the language
    model."""
    parts = module_name.split(".")
    for tower, prefixes, _ in family.towers:
        if any(prefix in parts for prefix in prefixes):
            return tower
    return LANGUAGE_MODEL


def lora_targets(cfg: LoraConfig, family: ModelFamily) -> str | list[str]:
    """The PEFT `target_modules`: the language model's (the family default or the user's), plus the projections of
    each tower `lora.towers` names, as one regex (PEFT full-matches a string against module paths)."""
    targets = cfg.target_modules if cfg.target_modules is not None else family.lora_targets
    if not cfg.towers:
        return list(targets) if isinstance(targets, tuple) else targets
    known = {tower: regex for tower, _, regex in family.towers}
    missing = [t for t in cfg.towers if t not in known]
    if missing:
        raise GemmatuneError(f"config key lora.towers: the {family.name} family has no {', '.join(missing)} tower")
    if isinstance(targets, str):
        if cfg.target_modules is not None:
            raise GemmatuneError(
                "config key lora.towers: cannot be combined with a lora.target_modules regex or 'all-linear'; give "
                "target_modules as a list of names, or write the tower modules into your regex and drop lora.towers"
            )
        language = targets
    else:
        from gemmatune.models import language_model_projections

        names = tuple(re.escape(n) for n in targets)
        language = language_model_projections(family.tower_modules, names)
    return "|".join(f"(?:{regex})" for regex in [language] + [known[t] for t in cfg.towers])


def expert_targets(cfg: LoraConfig, family: ModelFamily) -> list[str] | None:
    """PEFT `target_parameters` for `lora.experts: true` (the family's 3-D expert weights), else None."""
    if not cfg.experts:
        return None
    if not family.expert_parameters:
        raise GemmatuneError(f"config key lora.experts: the {family.name} family has no mixture-of-experts layers")
    return list(family.expert_parameters)


def check_experts(model, cfg: LoraConfig, family: ModelFamily) -> None:
    """`lora.experts: true` on a model without experts (a dense Gemma 4) is an error, before PEFT's own message."""
    wanted = expert_targets(cfg, family)
    if not wanted:
        return
    names = {name for name, _ in model.named_parameters()}
    if not any(name.endswith("." + target) for name in names for target in wanted):
        raise GemmatuneError("config key lora.experts: this model has no experts (it is not a mixture-of-experts "
                             "model); set lora.experts: false")


def peft_lora_config(cfg: LoraConfig, family: ModelFamily):
    from peft import LoraConfig as PeftLoraConfig

    targets = lora_targets(cfg, family)
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        bias=cfg.bias,
        target_modules=targets,
        target_parameters=expert_targets(cfg, family),
        task_type="CAUSAL_LM",
    )


def attach_lora(model, cfg: LoraConfig, family: ModelFamily, quantized: bool = False, autocast: bool = False):
    """Freeze the base model and wrap the target modules; returns (peft_model, report).

    `autocast`: training runs under bf16/fp16 autocast. PEFT then need not cast each LoRA input to the fp32 of
    the adapter weights (autocast casts for the matmul anyway): that cast copied every projection's input
    twice per step and kept a separate copy per projection for backward where q/k/v could share one.
    """
    from peft import get_peft_model

    if quantized:
        freeze_quantized(model)
        keep_4bit_layout(model)
    check_experts(model, cfg, family)
    try:
        peft_model = get_peft_model(model, peft_lora_config(cfg, family))
    except ValueError as exc:
        raise GemmatuneError(f"config key lora.target_modules: {str(exc).splitlines()[0]}") from None
    if autocast:
        skip_input_casts(peft_model)
    report = trainable_report(peft_model, family)
    check_towers(cfg, report.per_tower, peft_model, family)
    return peft_model, report


def check_towers(cfg: LoraConfig, per_tower: dict[str, int], model=None, family: ModelFamily | None = None) -> None:
    """A tower asked for in `lora.towers` that got no adapter is an error: it would train nothing, silently.
    Given the model and its family, a tower the model does not have at all (Gemma 4 26B/31B: no audio) is said so."""
    empty = [t for t in cfg.towers if not per_tower.get(t)]
    if empty and model is not None and family is not None:
        present = {tower_of(name, family) for name, _ in model.named_modules()}
        absent = [t for t in empty if t not in present]
        if absent:
            raise GemmatuneError(
                f"config key lora.towers: this model has no {' and no '.join(absent)} tower; "
                f"the {family.name} towers it has: {', '.join(sorted(present - {LANGUAGE_MODEL})) or 'none'}"
            )
    if empty:
        raise GemmatuneError(
            f"config key lora.towers: {', '.join(empty)} asked for, but no module of that tower matched the LoRA "
            "targets (is the tower loaded? model.multimodal: true loads it)"
        )


def skip_input_casts(peft_model) -> None:
    """Under autocast, LoRA layers take their input as it comes (autocast casts for each matmul)."""
    from peft.tuners.lora import LoraLayer

    from gemmatune.compat import skip_lora_input_cast

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            skip_lora_input_cast(module)


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


def trainable_report(peft_model, family: ModelFamily | None = None) -> TrainableReport:
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    names = wrapped_module_names(peft_model)
    per_tower: dict[str, int] = {LANGUAGE_MODEL: 0}
    if family is not None:
        for tower, _, _ in family.towers:
            per_tower[tower] = 0
        for name in names:
            per_tower[tower_of(name, family)] += 1
    else:
        per_tower[LANGUAGE_MODEL] = len(names)
    return TrainableReport(trainable, total, len(names), per_tower, moe_report(peft_model, names, family))


def moe_report(peft_model, wrapped: list[str], family: ModelFamily | None) -> dict[str, int]:
    """LoRA layers per part of the mixture-of-experts layers (`family.moe_parts`), counted only in layers that have
    experts (a dense model's MLP is no "shared MLP"); {} for a model without experts."""
    if family is None or not family.moe_parts:
        return {}
    expert_part = dict(family.moe_parts).get(EXPERTS)
    layers = {name.rsplit("." + expert_part, 1)[0] for name, _ in peft_model.named_modules()
              if expert_part and name.endswith("." + expert_part)}
    if not layers:
        return {}
    counts = dict.fromkeys((part for part, _ in family.moe_parts), 0)
    for name in wrapped:
        layer = next((prefix for prefix in layers if name.startswith(prefix + ".")), None)
        if layer is None:
            continue
        first = name[len(layer) + 1:].split(".")[0]
        for part, module in family.moe_parts:
            if first == module:
                counts[part] += 1
    return counts
