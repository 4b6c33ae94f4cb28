"""A model's architecture without its weights: its config read from the bundled files, a local folder or the
cache, built on the meta device with LoRA attached, so a typo in lora.target_modules costs a second, not a
model load (`gemmatune train`), and `gemmatune plan` counts exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

from gemmatune.config import Config
from gemmatune.errors import GemmatuneError
from gemmatune.models import ModelFamily
from gemmatune.models.loading import resolve_source
from gemmatune.models.registry import all_known_ids, bundled_config_file, family_for


def load_architecture(cfg: Config):
    """(transformers config, description) for `cfg.model`, without downloading weights.

    Known hub ids use the bundled config; local folders and the embedded model read their config.json.
    """
    from transformers import AutoConfig

    name = cfg.model.name
    bundled = bundled_config_file(name) if "/" in name and not Path(name).exists() else None
    if bundled is not None:
        data = json.loads(bundled.read_text(encoding="utf-8"))
        config = AutoConfig.for_model(data.pop("model_type"), **data)
        family = family_for(config.model_type)
        if config.model_type in family.multimodal_model_types:  # the whole checkpoint's config (Gemma 4)
            if cfg.model.multimodal:
                return config, f"bundled config {Path(str(bundled)).name}"
            return config.get_text_config(), f"bundled config {Path(str(bundled)).name} (its language model)"
        text = config
        if cfg.model.multimodal and family.multimodal_model_types:
            # The full checkpoint: the bundled text config inside the family's multimodal config, whose tower
            # configs default to the real ones (Gemma 3n: the E2B/E4B audio conformer and MobileNetV5).
            full = AutoConfig.for_model(family.multimodal_model_types[0], text_config=text.to_dict())
            return full, f"bundled config {Path(str(bundled)).name} + the default towers"
        return text, f"bundled config {Path(str(bundled)).name}"
    not_bundled = GemmatuneError(
        # A known id without a bundled config (a sibling added to a family's ids before its config was known):
        # say so in one line, invent nothing.
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


def attach_lora_on_meta(model, cfg: Config, family: ModelFamily):
    """PEFT's LoRA on a meta model; targets that match nothing -> one GemmatuneError line."""
    from peft import get_peft_model

    from gemmatune.models.lora import check_experts, peft_lora_config

    check_experts(model, cfg.lora, family)
    try:
        return get_peft_model(model, peft_lora_config(cfg.lora, family))
    except ValueError as exc:
        raise GemmatuneError(f"config key lora.target_modules: {str(exc).splitlines()[0]}") from None
