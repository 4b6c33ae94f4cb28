"""A PEFT LoRA adapter as a llama.cpp GGUF adapter (`llama-server -m BASE.gguf --lora FILE.gguf`).

llama.cpp finds each pair by name: `<base tensor's GGUF name>.lora_a` (rank x inputs) and `.lora_b` (outputs x rank),
and scales B @ A by `adapter.lora.alpha` / rank as PEFT does (gemmatune trains no rsLoRA or DoRA).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

from gguf import GGUFWriter, Keys

from gemmatune.errors import GemmatuneError
from gemmatune.export.gguf_model import gguf_family, text_config
from gemmatune.export.gguf_tensors import (
    TYPES,
    PlannedTensor,
    TensorNames,
    as_numpy,
    general_keys,
    tensor_type,
    write_gguf,
)

_LORA_NAME = re.compile(r"(?:base_model\.model\.)?(.*)\.lora_([AB])\.weight")


def write_lora_gguf(adapter_dir: Path, base_folder: Path, out: Path, quant: str, name: str) -> None:
    """Write the adapter in `adapter_dir` (adapter_config.json, adapter_model.safetensors) for the base model in
    `base_folder` (its config gives the family and layer count) as a GGUF LoRA with `quant` matrices."""
    from safetensors import safe_open

    settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if settings.get("use_dora") or settings.get("use_rslora"):
        raise GemmatuneError(f"{adapter_dir}: llama.cpp's LoRA format has no DoRA or rsLoRA scaling")
    config, text = text_config(base_folder)
    family = gguf_family(config.model_type)
    names = TensorNames(family, text.num_hidden_layers)
    weights = adapter_dir / "adapter_model.safetensors"
    tensors: list[PlannedTensor] = []
    with safe_open(str(weights), "pt") as fh:
        for key in fh.keys():
            m = _LORA_NAME.fullmatch(key)
            if m is None:
                raise GemmatuneError(f"{weights}: {key} is not a LoRA A or B matrix; llama.cpp's LoRA format holds "
                                     "only those")
            if names.skipped(m[1]):  # a tower's adapter: llama.cpp runs the language model only
                continue
            gguf_name = f"{names.gguf_name(m[1] + '.weight')}.lora_{m[2].lower()}"
            shape = tuple(fh.get_slice(key).get_shape())
            tensors.append(PlannedTensor(gguf_name, shape, tensor_type(gguf_name, shape, TYPES[quant][0], ()),
                                         partial(_load, weights, key)))
    writer = GGUFWriter(None, names.arch_name)
    general_keys(writer, "adapter", name, quant)
    writer.add_string(Keys.Adapter.TYPE, "lora")
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(settings["lora_alpha"]))
    write_gguf(writer, out, tensors)


def _load(weights: Path, key: str):
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as fh:
        return as_numpy(fh.get_tensor(key))
