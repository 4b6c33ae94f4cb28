"""Gemma 3n specifics: which class loads, LoRA only in the language model, QLoRA refusals, multimodal option."""

import importlib.util

import pytest
import torch

from gemmatune.config import load_config
from gemmatune.errors import GemmatuneError
from gemmatune.models.gemma3n import FAMILY
from gemmatune.models.loading import choose_model_class, load_model
from gemmatune.models.lora import attach_lora, wrapped_module_names
from gemmatune.models.registry import family_for
from gemmatune.train import train
from tests.conftest import gemma3n_config, tiny_config

SOURCE = "google/gemma-3n-E4B-it"


def _model_cfg(*sets):
    return load_config(None, list(sets)).model


def test_text_data_loads_the_language_model_alone_from_the_multimodal_checkpoint():
    assert choose_model_class(_model_cfg(), "gemma3n", FAMILY, SOURCE).__name__ == "Gemma3nForCausalLM"
    # a text-only checkpoint goes through AutoModelForCausalLM (which maps it to Gemma3nForCausalLM)
    assert choose_model_class(_model_cfg(), "gemma3n_text", FAMILY, SOURCE).__name__ == "AutoModelForCausalLM"


def test_multimodal_option_refused_for_a_text_only_checkpoint():
    with pytest.raises(GemmatuneError, match="model.multimodal: .*has no multimodal model"):
        choose_model_class(_model_cfg("model.multimodal=true"), "gemma3n_text", FAMILY, SOURCE)
    with pytest.raises(GemmatuneError, match="model.multimodal"):
        choose_model_class(_model_cfg("model.multimodal=true"), "gemma3_text", family_for("gemma3_text"), SOURCE)


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_multimodal_option_without_its_extra_names_the_install():
    with pytest.raises(GemmatuneError, match=r"needs timm.*pip install 'gemmatune\[multimodal\]'"):
        choose_model_class(_model_cfg("model.multimodal=true"), "gemma3n", FAMILY, SOURCE)


def test_default_targets_are_exactly_the_language_projections(tiny_gemma3n):
    model = load_model(_model_cfg(f"model.name={tiny_gemma3n}"), "fp32").model
    peft_model, _ = attach_lora(model, load_config().lora, FAMILY)
    expected = set()
    for i in range(10):  # 10 layers; layers 5-9 share KV and have no k/v projections
        expected |= {f"base_model.model.model.layers.{i}.self_attn.{p}" for p in ("q_proj", "o_proj")}
        expected |= {f"base_model.model.model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
        if i < 5:
            expected |= {f"base_model.model.model.layers.{i}.self_attn.{p}" for p in ("k_proj", "v_proj")}
    assert set(wrapped_module_names(peft_model)) == expected


def test_multimodal_model_gets_lora_only_in_the_language_model():
    pytest.importorskip("timm", reason="the multimodal Gemma 3n needs timm + a torchvision matching torch")
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    model = Gemma3nForConditionalGeneration(Gemma3nConfig(text_config=gemma3n_config().to_dict()))
    peft_model, _ = attach_lora(model, load_config().lora, FAMILY)
    names = wrapped_module_names(peft_model)
    assert names and all(".language_model." in n for n in names)
    towers = [p for n, p in peft_model.named_parameters() if any(t in n for t in FAMILY.tower_modules)]
    assert towers and not any(p.requires_grad for p in towers)


def test_4bit_without_bitsandbytes_names_the_extra(monkeypatch, tiny_gemma3n, alpaca_file, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    cfg = tiny_config(tiny_gemma3n, alpaca_file, tmp_path / "runs", max_steps=1)
    cfg.model.quantization = "4bit"
    with pytest.raises(GemmatuneError, match=r"4bit \(QLoRA\) needs bitsandbytes: pip install 'gemmatune\[qlora\]'"):
        train(cfg)
    assert not (tmp_path / "runs").exists()


def test_qlora_keeps_the_unquantized_weights_bf16(tiny_gemma3n_4bit):
    # peft.prepare_model_for_kbit_training upcasts every non-4-bit weight to fp32 (Gemma 3n E4B: +5.8 GB of
    # embeddings); attach_lora(quantized=True) freezes them in the bf16 they were loaded in.
    from peft import prepare_model_for_kbit_training

    cfg = load_config(None, [f"model.name={tiny_gemma3n_4bit}", "model.quantization=4bit"])
    model = load_model(cfg.model, "bf16").model
    peft_model, _ = attach_lora(model, cfg.lora, FAMILY, quantized=True)
    frozen = {n: p for n, p in peft_model.named_parameters() if not p.requires_grad and p.dtype != torch.uint8}
    assert frozen and {p.dtype for p in frozen.values()} == {torch.bfloat16}
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.float32}
    reference = prepare_model_for_kbit_training(load_model(cfg.model, "bf16").model)
    assert any(p.dtype == torch.float32 for n, p in reference.named_parameters() if "embed_tokens" in n), \
        "PEFT no longer upcasts embeddings for k-bit training: freeze_quantized may be unnecessary"
