"""Loading a result: a base model with zero, one or several adapters (run folders or PEFT folders, each read
and checked once, as `AdapterSource`), ready to generate as a `TunedModel`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from gemmatune.config import ModelConfig
from gemmatune.config_checks import TEMPLATES
from gemmatune.errors import GemmatuneError
from gemmatune.hardware import DTYPE_NAMES, device_kind, resolve_precision, weight_dtype
from gemmatune.infer.adapter_fit import check_adapter_fits
from gemmatune.infer.model import BASE, PEFT_BASE, TunedModel
from gemmatune.models.loading import load_model
from gemmatune.models.quantization import bitsandbytes_usable
from gemmatune.runs.adapter_folder import AdapterFolder, read_adapter_folder
from gemmatune.runs.folder import read_merged_info

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterSource:
    name: str
    folder: AdapterFolder

    @property
    def path(self) -> Path:
        return self.folder.path


def adapter_source(spec: str | Path | AdapterSource) -> AdapterSource:
    """`PATH` or `NAME=PATH`: a run folder or a PEFT adapter folder, read and checked (an AdapterSource already
    read is handed back as it is, so a folder is read once however many steps use it)."""
    if isinstance(spec, AdapterSource):
        return spec
    spec = str(spec)
    name, sep, path_text = spec.partition("=")
    if not sep or Path(spec).exists():
        name, path_text = "", spec
    folder = read_adapter_folder(path_text)
    name = name or folder.path.resolve().name
    if name in (BASE, PEFT_BASE):
        raise GemmatuneError(f"adapter {folder.path}: the name '{name}' is reserved for the base model; use NAME=PATH")
    return AdapterSource(name, folder)


def load(
    adapters: Sequence[str | Path | AdapterSource] = (),
    base: str | None = None,
    template: str | None = None,
    precision: str = "auto",
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    force_unquantized: bool = False,
) -> TunedModel:
    """A base model with adapters loaded, ready to generate.

    `adapters`: run folders or PEFT adapter folders, each `PATH` or `NAME=PATH` (name defaults to the folder
    name). `base`: the base model (embedded, hub id, folder, .gguf); by default the one the first adapter
    was trained on. `template`: alpaca-zh, alpaca-en or chat for every adapter; by default each adapter's own
    (and the first adapter's for the base model).
    `force_unquantized`: load a QLoRA adapter's base unquantized (for merging) even where CUDA is present.
    """
    sources = [adapter_source(a) for a in adapters]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise GemmatuneError(f"two adapters are both named '{names[0]}'; name them with NAME=PATH")
    model_cfg = _base_config(sources, base, cache_dir, trust_remote_code)
    if force_unquantized:
        model_cfg.quantization = "none"
    if model_cfg.dtype == "auto":
        model_cfg.dtype = DTYPE_NAMES[weight_dtype(resolve_precision(precision), device_kind())]
    # Per-example sdpa: response_loss packs rows as training does (no padding); generation and padded batches
    # run plain sdpa through it (packing.packed_sdpa_attention). Never FlashAttention-2 here: `load` also serves
    # fp32 (merge, --precision fp32) and pre-Ampere GPUs, where it fails.
    loaded = load_model(model_cfg, precision, packing=True, flash=False)
    model = loaded.model
    for src in sources:
        # PEFT only warns when an adapter does not fit, then behaves like the base model: refuse instead.
        check_adapter_fits(src.folder, model)
    if torch.cuda.is_available() and model_cfg.quantization != "4bit":
        model = model.to("cuda")
    if sources:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(sources[0].path), adapter_name=sources[0].name)
        for src in sources[1:]:
            model.load_adapter(str(src.path), adapter_name=src.name)
        model.set_adapter(sources[0].name)
    chosen = template or (sources[0].folder.template if sources else None) or _merged_template(model_cfg.name)
    if chosen is None:
        chosen = "chat" if loaded.tokenizer.chat_template else "alpaca-en"
    if chosen not in TEMPLATES or chosen in ("auto", "text"):
        raise GemmatuneError(f"template {chosen!r}: generation needs alpaca-zh, alpaca-en or chat")
    log.info("loaded %s with %s; template %s", loaded.source.describe(),
             ", ".join(names) if names else "no adapter", chosen)
    trained_with = {s.name: template or s.folder.template for s in sources}
    return TunedModel(model, loaded.tokenizer, loaded.family, chosen, trained_with, loaded.precision,
                      loaded.checkpoint_dtype, loaded.processor)


def _base_config(sources: list[AdapterSource], base: str | None, cache_dir: str | None,
                 trust_remote_code: bool) -> ModelConfig:
    if base is not None:
        return ModelConfig(name=base, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    if not sources:
        return ModelConfig(name="embedded", cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    first = sources[0]
    for other in sources[1:]:
        if other.folder.base.name != first.folder.base.name:
            raise GemmatuneError(
                f"adapters {first.path} and {other.path} were trained on different bases ({first.folder.base.name} vs "
                f"{other.folder.base.name}); load them separately or name one base with --base"
            )
    cfg = ModelConfig(**vars(first.folder.base))
    if cache_dir:
        cfg.cache_dir = cache_dir
    if cfg.quantization == "4bit" and not bitsandbytes_usable(device_kind()):
        log.warning("adapter %s was trained on a 4-bit base; without a usable bitsandbytes it runs on the 16/32-bit "
                    "base (pip install 'gemmatune[qlora]' for the 4-bit one)", first.path)
        cfg.quantization = "none"
    return cfg


def _merged_template(base: str) -> str | None:
    """The template recorded by `gemmatune merge` in a merged model folder."""
    info = read_merged_info(Path(base))
    return info.template if info else None
