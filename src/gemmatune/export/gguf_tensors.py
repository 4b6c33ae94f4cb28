"""Tensors of a GGUF file: Hugging Face names to llama.cpp's, the type each is stored in, and the streaming write.

A GGUF is written in two passes so a model never has to fit in memory twice: every tensor is first planned (name,
shape, type: the header needs them all), then loaded, converted and written one at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, get_tensor_name_map
from gguf import quants as gguf_quants

from gemmatune.errors import GemmatuneError
from gemmatune.models import ModelFamily

# --quant name: (type of the weight matrices, llama.cpp's file type)
TYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    """numpy order (rows first); GGUF stores it reversed."""
    qtype: GGMLQuantizationType
    load: Callable[[], np.ndarray]
    """The values (float16 or float32) with every family change applied."""


class TensorNames:
    """Hugging Face tensor names to llama.cpp's for one family and layer count (`gguf`'s own name map)."""

    def __init__(self, family: ModelFamily, n_layers: int):
        import gguf

        assert family.gguf is not None
        self.layout = family.gguf
        self.family = family
        self.n_layers = n_layers
        self.arch = getattr(gguf.MODEL_ARCH, self.layout.arch)
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self._map = get_tensor_name_map(self.arch, n_layers)

    def skipped(self, hf_name: str) -> bool:
        """Towers (vision, audio) are not part of llama.cpp's text model; lm_head is the tied embedding."""
        parts = hf_name.split(".")
        return any(tower in parts for tower in self.family.tower_modules) or parts[0] == "lm_head"

    def stacked(self, hf_name: str) -> tuple[str, int] | None:
        """(name of the stacked tensor, index) for a member of a module list llama.cpp reads as one tensor."""
        for stack in self.layout.stacked:
            if m := re.fullmatch(rf"(.*\.{stack})\.(\d+)\.weight", hf_name):
                return f"{m[1]}.weight", int(m[2])
        return None

    def gguf_name(self, hf_name: str) -> str:
        name = hf_name.replace("language_model.", "")
        for pattern, replacement in self.layout.renames:
            name = re.sub(pattern, replacement, name)
        found = self._map.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise GemmatuneError(f"tensor {hf_name}: llama.cpp's {self.arch_name} has no place for it; this GGUF "
                                 "export cannot write this checkpoint")
        return found


def tensor_type(gguf_name: str, shape: tuple[int, ...], wanted: GGMLQuantizationType,
                keep_f32: Iterable[str]) -> GGMLQuantizationType:
    """The type a tensor is stored in: llama.cpp's kernels read norms, 1-D tensors and a family's `keep_f32` tensors in
    F32; the rest in the requested type, or F16 where rows do not split into the type's blocks."""
    base = re.sub(r"^blk\.\d+\.", "", gguf_name)
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or base in keep_f32 or \
            not gguf_name.endswith((".weight", ".lora_a", ".lora_b")):
        return GGMLQuantizationType.F32
    block, _ = GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else GGMLQuantizationType.F16


def as_numpy(tensor) -> np.ndarray:
    """A torch tensor as numpy: float16 and float32 as they are, anything else (bf16) as float32."""
    import torch

    if tensor.dtype not in (torch.float16, torch.float32):
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def write_gguf(writer: GGUFWriter, path: Path, tensors: list[PlannedTensor]) -> None:
    """Header, keys and tensor table, then each tensor's data, loaded and converted one at a time."""
    for t in tensors:
        block, size = GGML_QUANT_SIZES[t.qtype]
        rows = int(np.prod(t.shape[:-1], dtype=np.int64))
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), rows * (t.shape[-1] // block) * size,
                               raw_dtype=t.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        data = t.load()
        if tuple(data.shape) != t.shape:
            raise GemmatuneError(f"tensor {t.name}: planned shape {t.shape}, got {tuple(data.shape)}")
        writer.write_tensor_data(gguf_quants.quantize(data, t.qtype))
    writer.close()
    with open(path, "rb+") as fh:  # on disk before the rename that publishes it
        os.fsync(fh.fileno())


def general_keys(writer: GGUFWriter, kind: str, name: str, quant: str) -> None:
    """The `general.*` keys llama.cpp and the tools around it show: kind (model or adapter), name, file type and the
    quantization format version."""
    import gguf

    writer.add_type(kind)
    writer.add_name(name)
    writer.add_file_type(TYPES[quant][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
