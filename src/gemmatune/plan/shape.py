"""The shape of a model and its LoRA, counted exactly on the meta device: no weights are read or allocated.

The planner needs parameter counts per storage kind (what 4-bit quantization converts, what it leaves),
the wrapped modules and the LoRA parameter count; PEFT attached to a meta model gives all of them exactly.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmatune.config import Config
from gemmatune.errors import GemmatuneError
from gemmatune.models import ModelFamily, all_known_ids, bundled_config_file, family_for
from gemmatune.models.loading import build_on_meta, choose_model_class, resolve_source
from gemmatune.models.quantization import is_kept, modules_to_keep_unquantized


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


def load_architecture(cfg: Config):
    """(transformers config, description) for `cfg.model`, without downloading weights.

    Known hub ids use the bundled config; local folders and the embedded model read their config.json.
    """
    from transformers import AutoConfig

    name = cfg.model.name
    bundled = bundled_config_file(name) if "/" in name and not Path(name).exists() else None
    if bundled is not None:
        data = json.loads(bundled.read_text(encoding="utf-8"))
        text = AutoConfig.for_model(data.pop("model_type"), **data)
        family = family_for(text.model_type)
        if cfg.model.multimodal and family.multimodal_model_types:
            # The full checkpoint: the bundled text config inside the family's multimodal config, whose tower
            # configs default to the real ones (Gemma 3n: the E2B/E4B audio conformer and MobileNetV5).
            full = AutoConfig.for_model(family.multimodal_model_types[0], text_config=text.to_dict())
            return full, f"bundled config {Path(str(bundled)).name} + the default towers"
        return text, f"bundled config {Path(str(bundled)).name}"
    not_bundled = GemmatuneError(
        # A real id whose config gemmatune could not bundle (Gemma 4: its config.json was not readable where this
        # release was made, and transformers' defaults are no checkpoint's): say so in one line, invent nothing.
        f"model.name: gemmatune bundles no config for {name} (the real one was not available offline when this "
        "release was made) and none is in the local cache; plan needs the model folder or a cached download"
    )
    try:
        source = resolve_source(cfg.model)  # near-miss ids fail here with 'did you mean'
    except GemmatuneError:
        if name in all_known_ids():
            raise not_bundled from None
        raise
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return AutoConfig.from_pretrained(source.path, local_files_only=True, **kwargs), source.describe()
    except OSError:
        if name in all_known_ids():
            raise not_bundled from None
        raise GemmatuneError(
            f"model.name: no bundled config for {name} and none in the local cache; plan needs a local model "
            "folder, a .gguf file, 'embedded' or one of the bundled ids"
        ) from None


def _attach_lora(model, cfg: Config, family: ModelFamily):
    """PEFT's LoRA on a meta model; targets that match nothing -> one GemmatuneError line."""
    from peft import get_peft_model

    from gemmatune.models.lora import check_experts, peft_lora_config

    check_experts(model, cfg.lora, family)
    try:
        return get_peft_model(model, peft_lora_config(cfg.lora, family))
    except ValueError as exc:
        raise GemmatuneError(f"config key lora.target_modules: {str(exc).splitlines()[0]}") from None


def check_lora_targets(cfg: Config) -> None:
    """Raise GemmatuneError when the user's lora.target_modules match no module of the model, before any weights
    load: the same meta-device build as `gemmatune plan`, so a typo costs a second, not the model load.

    Skipped where the architecture is not on this machine without the weights (a hub id neither bundled nor
    cached): the load checks the targets then, as before."""
    if cfg.lora.target_modules is None:  # the family's own targets: known to match
        return
    try:
        config, where = load_architecture(cfg)
    except GemmatuneError:
        return
    family = family_for(config.model_type)
    model = build_on_meta(choose_model_class(cfg.model, config.model_type, family, where), config)
    _attach_lora(model, cfg, family)


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
    peft_model = _attach_lora(model, cfg, family)
    wrapped = wrapped_module_names(peft_model)
    lora_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    modules = dict(peft_model.named_modules())
    per_rank = sum(_lora_width(modules[n].base_layer) for n in wrapped)
    per_tower = None
    if cfg.model.multimodal and family.towers:
        per_tower = trainable_report(peft_model, family).per_tower
        check_towers(cfg.lora, per_tower)
    return ModelShape(
        source=where, model_class=type(model).__name__, family=family, total_params=total,
        quantizable_params=quantizable, linear_params=linear, layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=list(intermediate), vocab=text.vocab_size, streams=getattr(text, "altup_num_inputs", 1) or 1,
        heads=text.num_attention_heads, wrapped=wrapped, lora_params=lora_params, lora_params_per_rank=per_rank,
        per_tower=per_tower,
    )


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
