"""A Hugging Face Gemma folder (a merged run, or a base model) as a llama.cpp GGUF model file.

What changes between the two formats is family data (`models/<family>.py`, `GgufLayout`): llama.cpp's names for the
tensors, its keys for the config, the norm offset, stacked and placeholder tensors. This module applies it.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, size_label

from gemmatune.errors import GemmatuneError
from gemmatune.export.gguf_tensors import (
    TYPES,
    PlannedTensor,
    TensorNames,
    as_numpy,
    general_keys,
    tensor_type,
    write_gguf,
)
from gemmatune.export.gguf_vocab import vocabulary_size, write_vocabulary
from gemmatune.models import ModelFamily
from gemmatune.models.registry import family_for, family_named, gguf_families

log = logging.getLogger(__name__)


def gguf_family(model_type: str) -> ModelFamily:
    """The family of `model_type` if a GGUF export writes it; otherwise one line saying which families do."""
    family = family_for(model_type)
    if family.gguf is None:
        raise _unsupported(repr(model_type))
    return family


def check_family_exports(family_name: str | None) -> None:
    """Refuse, before any merge, a run whose recorded family GGUF export does not write (None: not recorded, as
    in a bare PEFT folder; the model's own config decides later)."""
    family = family_named(family_name) if family_name else None
    if family is not None and family.gguf is None:
        raise _unsupported(f"a {family.name} model")


def _unsupported(what: str) -> GemmatuneError:
    names = ", ".join(f.name for f in gguf_families())
    return GemmatuneError(f"GGUF export writes the {names} families (text); this model is {what}")


def text_config(folder: Path):
    """The model's config and its text part (a multimodal checkpoint keeps it in `text_config`). transformers reads
    it, so older spellings of the same fields (rope_theta, rope_scaling) arrive normalized."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return config, config.get_text_config()


def write_model_gguf(folder: Path, out: Path, quant: str, chat_template: str, name: str) -> None:
    """Write `folder` (safetensors weights, config, tokenizer) as a GGUF model with `quant` weights (f32, f16, bf16,
    q8_0) and `chat_template` as its chat template."""
    config, text = text_config(folder)
    family = gguf_family(config.model_type)
    names = TensorNames(family, text.num_hidden_layers)
    n_vocab = vocabulary_size(folder, text)
    tied = getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", True))
    tensors = plan_model_tensors(folder, family, names, n_vocab, TYPES[quant][0], tied=tied)
    writer = GGUFWriter(None, names.arch_name)
    general_keys(writer, "model", name, quant)
    writer.add_size_label(size_label(sum(int(np.prod(t.shape)) for t in tensors), 0, 0, 0))
    for method, value in family.gguf.hparams(text):
        getattr(writer, method)(value)
    write_vocabulary(writer, folder, n_vocab, chat_template)
    log.info("writing %s: %d tensors, %s", out.name, len(tensors), quant)
    write_gguf(writer, out, tensors)


def plan_model_tensors(folder: Path, family: ModelFamily, names: TensorNames, n_vocab: int, wanted,
                       tied: bool = True) -> list[PlannedTensor]:
    """Every tensor of the GGUF, in the checkpoint's order, with how to load it."""
    layout = family.gguf
    sources = safetensors_index(folder)
    planned: dict[str, PlannedTensor] = {}
    stacks: dict[str, dict[int, str]] = {}

    def add(gguf_name: str, hf_names: list[str], shape: tuple[int, ...]) -> None:
        if gguf_name in layout.vocab_sized:
            shape = (n_vocab, *shape[1:])
        load = partial(_load, sources, hf_names, gguf_name, n_vocab if gguf_name in layout.vocab_sized else None,
                       family.rms_norm_offset if gguf_name.endswith("norm.weight") else 0.0)
        planned[gguf_name] = PlannedTensor(gguf_name, shape, tensor_type(gguf_name, shape, wanted, layout.keep_f32),
                                           load)

    for hf_name, (_, shape) in sources.items():
        if names.skipped(hf_name) and (tied or not hf_name.startswith("lm_head")):
            continue
        if stacked := names.stacked(hf_name):
            stacks.setdefault(stacked[0], {})[stacked[1]] = hf_name
            continue
        add(names.gguf_name(hf_name), [hf_name], shape)
    for stack_name, members in stacks.items():
        order = [members[i] for i in sorted(members)]
        if sorted(members) != list(range(len(members))):
            raise GemmatuneError(f"{stack_name}: members {sorted(members)} are not 0..{len(members) - 1}")
        add(names.gguf_name(stack_name), order, (len(order), *sources[order[0]][1]))
    for kind in layout.kv_shared_placeholders:
        present = [b for b in range(names.n_layers) if f"blk.{b}.{kind}" in planned]
        if not present:
            continue
        shape = planned[f"blk.{present[-1]}.{kind}"].shape
        for layer in sorted(set(range(names.n_layers)) - set(present)):
            zero_name = f"blk.{layer}.{kind}"
            planned[zero_name] = PlannedTensor(zero_name, shape, tensor_type(zero_name, shape, wanted, layout.keep_f32),
                                               partial(np.zeros, shape, dtype=np.float32))
    return list(planned.values())


def safetensors_index(folder: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (file, shape) over the folder's safetensors files, without loading any tensor."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GemmatuneError(f"{folder} has no .safetensors weights to convert")
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        with safe_open(str(path), "pt") as fh:
            for key in fh.keys():
                found[key] = (path, tuple(fh.get_slice(key).get_shape()))
    return found


def _load(sources: dict, hf_names: list[str], gguf_name: str, rows: int | None, offset: float) -> np.ndarray:
    """One GGUF tensor's values: the checkpoint tensor (or the stack of several), its rows cut or zero-padded to the
    vocabulary for embeddings, `offset` added (Gemma 3's norms store weight - 1; llama.cpp multiplies by the weight).
    """
    import torch
    from safetensors import safe_open

    parts = []
    for hf_name in hf_names:
        with safe_open(str(sources[hf_name][0]), "pt") as fh:
            tensor = fh.get_tensor(hf_name)
        if tensor.dtype not in (torch.float16, torch.float32):
            tensor = tensor.to(torch.float32)
        parts.append(tensor)
    tensor = torch.stack(parts) if len(parts) > 1 else parts[0]
    if rows is not None:
        if tensor.shape[0] > rows:  # ids past the vocabulary: never produced, never read
            tensor = tensor[:rows]
        elif tensor.shape[0] < rows:
            pad = torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
            tensor = torch.cat([tensor, pad])
    if offset:
        tensor = tensor + offset
    return as_numpy(tensor)
