"""The shape of a model and its LoRA, counted exactly on the meta device: no weights are read or allocated.

The planner needs parameter counts per storage kind (what 4-bit quantization converts, what it leaves),
the wrapped modules and the LoRA parameter count; PEFT attached to a meta model gives all of them exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from gemmatune.config import Config
from gemmatune.models import ModelFamily
from gemmatune.models.loading import build_on_meta, choose_model_class
from gemmatune.models.meta import attach_lora_on_meta, load_architecture
from gemmatune.models.quantization import is_kept, modules_to_keep_unquantized
from gemmatune.models.registry import family_for


@dataclass
class ModelShape:
    source: str
    """Where the architecture came from (bundled config file, local folder...)."""
    model_class: str
    family: ModelFamily
    total_params: int
    """Base model parameters (tied weights once)."""
    quantizable_params: int
    """Weights of Linear layers that bitsandbytes 4-bit converts (all but the output/tied/last modules)."""
    linear_params: int
    """Weights of all Linear layers, the output projection included even when tied to the embedding."""
    layers: int
    hidden: int
    intermediate: list[int]
    """Per layer."""
    vocab: int
    streams: int
    """Parallel residual streams (Gemma 3n AltUp: 4); 1 for ordinary transformers."""
    heads: int
    wrapped: list[str]
    """Module paths that get LoRA."""
    lora_params: int
    """Trainable parameters PEFT reports for the configured rank."""
    lora_params_per_rank: int
    """Sum of in+out features over wrapped Linear (and convolution) modules: LoRA parameters = rank x this."""
    per_tower: dict[str, int] | None = None
    """Wrapped modules per part of a multimodal model (language model, audio, vision); None for text models."""

    def wrapped_summary(self) -> str:
        counts = Counter(name.rsplit(".", 1)[-1] for name in self.wrapped)
        text = ", ".join(f"{leaf} {n}" for leaf, n in counts.items())
        if self.per_tower:
            text += "; per tower: " + ", ".join(f"{part} {n}" for part, n in self.per_tower.items())
        return text


def measure(cfg: Config) -> ModelShape:
    from gemmatune.models.lora import check_towers, trainable_report, wrapped_module_names

    config, where = load_architecture(cfg)
    family = family_for(config.model_type)

    model_class = choose_model_class(cfg.model, config.model_type, family, where)
    model = build_on_meta(model_class, config)
    total = sum(p.numel() for p in model.parameters())
    keep = modules_to_keep_unquantized(model, family)  # exactly what a 4-bit load leaves in 16 bits
    quantizable = sum(
        m.weight.numel() for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not is_kept(name, keep)
    )
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    text = config.get_text_config()
    intermediate = text.intermediate_size
    if not isinstance(intermediate, (list, tuple)):
        intermediate = [intermediate] * text.num_hidden_layers
    peft_model = attach_lora_on_meta(model, cfg, family)
    wrapped = wrapped_module_names(peft_model)
    lora_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    modules = dict(peft_model.named_modules())
    per_rank = sum(_lora_width(modules[n].base_layer) for n in wrapped)
    per_tower = None
    if cfg.model.multimodal and family.towers:
        per_tower = trainable_report(peft_model, family).per_tower
        check_towers(cfg.lora, per_tower, peft_model, family)
    return ModelShape(
        source=where, model_class=type(model).__name__, family=family, total_params=total,
        quantizable_params=quantizable, linear_params=linear, layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=list(intermediate), vocab=text.vocab_size, streams=_streams(text, family),
        heads=text.num_attention_heads, wrapped=wrapped, lora_params=lora_params, lora_params_per_rank=per_rank,
        per_tower=per_tower,
    )


def _streams(text_config, family: ModelFamily) -> int:
    attr = family.residual_streams_attr
    return (getattr(text_config, attr, 1) or 1) if attr else 1


def _lora_width(layer) -> int:
    """LoRA parameters per unit of rank for a wrapped layer: A takes its input (a convolution's whole kernel
    window), B gives its output."""
    if hasattr(layer, "in_features"):
        return layer.in_features + layer.out_features
    if hasattr(layer, "in_channels"):
        window = 1
        for k in layer.kernel_size:
            window *= k
        return layer.in_channels * window + layer.out_channels
    return 0
