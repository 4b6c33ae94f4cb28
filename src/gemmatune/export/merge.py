"""`gemmatune merge`: fold an adapter into a standalone model, or combine adapters into a new one.

A merged folder is an ordinary Hugging Face model folder (safetensors, tokenizer, chat template, a
generation config that stops on EOS and end-of-turn) that stock `AutoModelForCausalLM` loads.
A combined adapter is an ordinary PEFT adapter folder that gemmatune (or PEFT) loads like a run.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from gemmatune.errors import GemmatuneError
from gemmatune.hardware import DTYPES
from gemmatune.infer.load import AdapterSource, adapter_source, load
from gemmatune.infer.model import TunedModel
from gemmatune.runs.adapter_folder import describe_adapter
from gemmatune.runs.files import now
from gemmatune.runs.folder import BaseModelRecord, MergedInfo, RunRecord, write_merged_info
from gemmatune.runs.publish import check_output_folder, publish_folder

log = logging.getLogger(__name__)

COMBINATIONS = ("cat", "svd", "linear")


def _inputs(adapters: list[str | Path], base: str | None) -> list[Path]:
    """What a merge or combination reads: --out may not be, or hold, any of them."""
    paths = [Path(a) for a in adapters] + ([Path(base)] if base else [])
    return [p for p in paths if p.exists()]


def merge(adapter: str | Path | AdapterSource, out_dir: str | Path, base: str | None = None, dtype: str = "auto",
          overwrite: bool = False) -> Path:
    """Fold one adapter into its base model's weights and save a standalone model folder.

    The adapter is merged into unquantized weights: for an adapter trained on a 4-bit base (QLoRA) the
    base is loaded again in bf16 and merged there, never re-quantized. `dtype` (auto|bf16|fp16|fp32) is
    the saved dtype; auto keeps the checkpoint's own dtype (bf16 for a QLoRA base).
    """
    out_dir = Path(out_dir)
    inputs = _inputs([adapter.path if isinstance(adapter, AdapterSource) else adapter], base)
    check_output_folder(out_dir, "merge", overwrite, inputs)
    source = adapter_source(adapter)
    if dtype not in ("auto", *DTYPES):
        raise GemmatuneError(f"--dtype: must be auto, bf16, fp16 or fp32, got {dtype!r}")
    was_4bit = source.folder.base.quantization == "4bit"
    if was_4bit and base is None:
        log.warning("%s was trained on a 4-bit base: merging into a 16-bit (bf16) copy of the base, not into "
                    "re-quantized weights", source.path)
    # Merging is exact arithmetic on the weights: do it in fp32, then store in the chosen dtype.
    tuned = load([source], base=base, precision="fp32", force_unquantized=True)
    save_dtype = _save_dtype(tuned, dtype, was_4bit)
    merged = tuned.model.merge_and_unload().to(save_dtype)
    merged.generation_config.eos_token_id = tuned.stop_ids
    merged.generation_config.pad_token_id = tuned.tokenizer.pad_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        folder = Path(tmp) / "model"
        merged.save_pretrained(folder)
        tuned.tokenizer.save_pretrained(folder)
        if tuned.processor is not None:  # a multimodal model keeps its towers, and needs its processor with them
            tuned.processor.save_pretrained(folder)
        info = MergedInfo(merged_from=str(source.path.resolve()), base_model=source.folder.base.name,
                          template=tuned.template_for(source.name), dtype=str(save_dtype).removeprefix("torch."),
                          stop_token_ids=tuned.stop_ids)
        write_merged_info(folder, info)
        publish_folder(folder, out_dir, "merge", inputs)
    log.info("merged %s into %s (%s)", source.path, out_dir, info.dtype)
    return out_dir


def _save_dtype(tuned: TunedModel, dtype: str, was_4bit: bool) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if was_4bit:
        return torch.bfloat16
    # The checkpoint's own dtype as saved, not the model's config: loading in fp32 for merging rewrote that.
    return tuned.checkpoint_dtype or torch.float32


def parse_weighted(spec: str) -> tuple[str, float]:
    """`PATH:WEIGHT` (the last colon splits, so paths may hold colons)."""
    path, sep, weight = spec.rpartition(":")
    try:
        if not sep:
            raise ValueError
        return path, float(weight)
    except ValueError:
        raise GemmatuneError(f"--combine {spec!r}: expected ADAPTER:WEIGHT, e.g. runs/billing:0.7") from None


def combine(weighted: list[tuple[str, float]], out_dir: str | Path, combination: str = "cat",
            base: str | None = None, overwrite: bool = False) -> Path:
    """Combine adapters with weights into a new adapter folder (PEFT `add_weighted_adapter`).

    `cat` (default) stacks the adapters: its update is exactly the weighted sum of their updates, at the
    sum of their ranks. `svd` compresses that sum back to the largest rank; `linear` mixes the A and B
    matrices directly (same ranks needed; only approximately the weighted sum).
    """
    if len(weighted) < 2:
        raise GemmatuneError("--combine needs at least two ADAPTER:WEIGHT items")
    if combination not in COMBINATIONS:
        raise GemmatuneError(f"--combination: must be one of {', '.join(COMBINATIONS)}, got {combination!r}")
    out_dir = Path(out_dir)
    inputs = _inputs([path for path, _ in weighted], base)
    check_output_folder(out_dir, "combine", overwrite, inputs)
    sources = [adapter_source(path) for path, _ in weighted]
    tuned = load(sources, base=base, precision="fp32", force_unquantized=True)
    names = [s.name for s in sources]
    new_name = "combined"
    while new_name in names:
        new_name += "_"
    try:
        tuned.model.add_weighted_adapter(names, [w for _, w in weighted], new_name, combination_type=combination)
    except ValueError as exc:
        raise GemmatuneError(f"--combine: PEFT cannot combine these adapters ({str(exc).splitlines()[0]})") from None
    template = tuned.template_for(names[0])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        tuned.model.save_pretrained(tmp, selected_adapters=[new_name])
        folder = Path(tmp) / new_name  # PEFT saves a non-default adapter in a subfolder of its name
        tuned.tokenizer.save_pretrained(folder)
        first = sources[0].folder
        describe_adapter(folder, first.base, template, RunRecord(
            finished=now(), combined_from=[{"adapter": str(s.path.resolve()), "weight": w}
                                           for s, (_, w) in zip(sources, weighted, strict=True)],
            combination=combination, base_model=BaseModelRecord(source=first.base.name, model_class=first.base_class),
        ))
        publish_folder(folder, out_dir, "combine", inputs)
    log.info("combined %s into %s (%s)", ", ".join(f"{n}:{w}" for n, (_, w) in zip(names, weighted, strict=True)),
             out_dir, combination)
    return out_dir
