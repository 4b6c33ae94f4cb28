"""Random-initialised PEFT adapters on the tiny Gemma 3 model, saved as plain PEFT folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def make_adapter(base_dir: Path, out: Path, seed: int, r: int = 4, targets=("q_proj", "v_proj", "down_proj")) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the adapter really changes the output.
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def two_adapters(tiny_gemma3, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return (make_adapter(tiny_gemma3, root / "a", seed=1),
            make_adapter(tiny_gemma3, root / "b", seed=2, r=2, targets=("k_proj", "o_proj", "up_proj")))
