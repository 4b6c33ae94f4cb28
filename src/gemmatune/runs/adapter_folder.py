"""An adapter folder (a run, a combined adapter or a bare PEFT folder): read and checked once, as `AdapterFolder`;
written atomically."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gemmatune.config import Config, DataConfig, ModelConfig, dump_config
from gemmatune.errors import GemmatuneError
from gemmatune.runs.files import ordinary_modes, read_json_file, write_atomic
from gemmatune.runs.folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG_FILE,
    MODEL_CONFIG,
    PICKLED_ADAPTER,
    RunRecord,
    read_record,
    read_run_config,
    write_record,
)
from gemmatune.runs.weight_files import safetensors_problem


@dataclass(frozen=True)
class AdapterFolder:
    """A run folder or a bare PEFT adapter folder, as gemmatune reads it back."""

    path: Path
    base: ModelConfig
    """The base model it was trained on: config.yaml's model section, or PEFT's base_model_name_or_path."""
    template: str | None
    """The prompt template it was trained with; None when the folder does not say."""
    base_class: str | None
    """The transformers class of the base model at training time (run.json); None for a bare PEFT folder."""
    test_file: str | None
    """The run's data.test_file (the default file of `gemmatune eval`)."""
    family: str | None = None
    """The model family gemmatune trained it as (run.json); None for a bare PEFT folder."""


def read_adapter_folder(path: str | Path, key: str = "adapter") -> AdapterFolder:
    """Read and check an adapter folder a user hands in: PEFT config readable, weights in safetensors and whole
    (a pickled adapter_model.bin is refused: loading it can run code). Errors name `key` and the folder."""
    path = Path(path).expanduser()
    if not (path / ADAPTER_CONFIG).is_file():
        if (path / MODEL_CONFIG).is_file():
            raise GemmatuneError(f"{key} {path} is a full model folder, not an adapter; pass it as the base model")
        raise GemmatuneError(f"{key} {path}: no {ADAPTER_CONFIG} there; give a run folder or a PEFT adapter folder")
    try:
        peft_config = read_json_file(path / ADAPTER_CONFIG, None)
    except GemmatuneError as exc:
        raise GemmatuneError(f"{key} {path}/{exc}") from None
    if not isinstance(peft_config, dict):
        raise GemmatuneError(f"{key} {path}/{ADAPTER_CONFIG}: not a JSON object")
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = f"; {PICKLED_ADAPTER} is a pickle file that can run code when loaded: convert it to safetensors " \
            "where you trust it" if (path / PICKLED_ADAPTER).is_file() else ""
        raise GemmatuneError(f"{key} {path}: no {ADAPTER_WEIGHTS}{pickled}")
    problem = safetensors_problem(weights)
    if problem:
        raise GemmatuneError(f"{key} {weights} is {problem}; the adapter cannot be used")
    record = read_record(path) or RunRecord()
    template = record.data.template
    test_file = None
    cfg = read_run_config(path)
    if cfg is not None:
        base = cfg.model
        test_file = cfg.data.test_file
        if template is None and cfg.data.template != "auto":
            template = cfg.data.template
    else:
        name = peft_config.get("base_model_name_or_path")
        base = ModelConfig(name=name if isinstance(name, str) and name else "embedded")
    return AdapterFolder(path, base, template, record.base_model.model_class, test_file, record.base_model.family)


def describe_adapter(folder: Path, base: ModelConfig, template: str, record: RunRecord) -> None:
    """Write config.yaml and run.json into an adapter folder gemmatune made without training it (e.g. a
    combination of adapters), so it reads back like a run: which base, which template, where it came from."""
    write_atomic(folder / CONFIG_FILE, dump_config(Config(model=base, data=DataConfig(template=template))))
    record.data.template = template
    write_record(folder, record)


def save_adapter(peft_model, tokenizer, run_dir: Path, state_dict: dict | None = None) -> None:
    """Save adapter + tokenizer into a temporary folder, then move the files into place.

    `state_dict`: the full (gathered) model state when the live weights are sharded, as under FSDP.
    """
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".adapter-") as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        ordinary_modes(tmp)
        for item in Path(tmp).iterdir():
            os.replace(item, run_dir / item.name)
