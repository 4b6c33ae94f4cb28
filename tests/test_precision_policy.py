"""One precision policy on CPU and CUDA, and the GPU-path bugs it fixed, reproduced on CPU."""

import json

import pytest
import torch
from safetensors import safe_open

from gemmatune import hardware
from gemmatune.compat import attn_implementation
from gemmatune.config import load_config
from gemmatune.export.merge import merge
from gemmatune.hardware import autocast_dtype, weight_dtype
from gemmatune.infer.evaluation import response_loss
from gemmatune.infer.model import TunedModel
from gemmatune.models.loading import load_model
from gemmatune.train.recipe import prepare_for_training, train
from tests.conftest import gemma3_config, save_tiny, tiny_config

CHAT = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "team: billing"}]}]


def test_training_dtypes_are_the_same_on_cpu_and_cuda():
    for precision in ("bf16", "fp32"):
        assert weight_dtype(precision, "cpu") == weight_dtype(precision, "cuda")
        assert autocast_dtype(precision) == (torch.bfloat16 if precision == "bf16" else None)
    assert weight_dtype("bf16", "cpu") == torch.bfloat16


def test_inference_keeps_the_training_dtype_on_cpu(tiny_gemma3, two_adapters):
    # fp32 base weights under bf16 autocast were cast again at every decode step (generation 2.5x slower on the
    # embedded 270M); loaded for inference or handed over from training, the base stays in the compute dtype.
    from gemmatune.infer.load import load

    tuned = load([str(two_adapters[0])], base=str(tiny_gemma3), precision="bf16")
    base = {p.dtype for n, p in tuned.model.named_parameters() if "lora_" not in n}
    assert base == {torch.bfloat16}
    assert {p.dtype for n, p in tuned.model.named_parameters() if "lora_" in n} == {torch.float32}
    assert tuned.generate(["hello"], greedy=True, max_new_tokens=3)[0].new_tokens > 0
    assert load([str(two_adapters[0])], base=str(tiny_gemma3), precision="fp32").model.dtype == torch.float32


def test_auto_precision_on_cpu_follows_measured_matmul_speed(monkeypatch):
    # An Intel Xeon with AVX512_BF16 but no AMX runs bf16 matmuls at half the fp32 speed (150 vs 290 GFLOP/s,
    # measured): reading the flag alone chose bf16 there and trained 1.5x slower than fp32.
    monkeypatch.setattr(hardware, "device_kind", lambda: "cpu")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(hardware, "cpu_bf16_speed", lambda: (150.0, 290.0))
    assert hardware.resolve_precision("auto") == "fp32"
    monkeypatch.setattr(hardware, "cpu_bf16_speed", lambda: (410.0, 180.0))  # AMD Zen 4
    assert hardware.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_precision("auto") == "fp32"
    assert hardware.resolve_precision("bf16") == "bf16"  # asked for: kept


def test_cpu_matmul_speed_is_measured():
    bf16, fp32 = hardware.cpu_bf16_speed()
    assert bf16 > 1 and fp32 > 1
    assert hardware.cpu_bf16_speed() == (bf16, fp32)  # once per process
    if not torch.cuda.is_available():
        expected = hardware.choose_cpu_precision(hardware.cpu_has_native_bf16(), bf16, fp32)
        assert hardware.resolve_precision("auto") == expected


def test_model_in_training_dtypes_evaluates_and_generates(tiny_gemma3):
    # What a CUDA run hands to the evaluation after training: bf16 base weights, fp32 LoRA weights, PEFT's input
    # casts off. Without autocast around evaluation that is "expected m1 and m2 to have the same dtype".
    cfg = load_config(None, [f"model.name={tiny_gemma3}", "train.precision=bf16", "lora.lora_dropout=0"])
    loaded = load_model(cfg.model, "bf16")
    model, _ = prepare_for_training(loaded, cfg)
    assert model.base_model.model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    tuned = TunedModel(model, loaded.tokenizer, loaded.family, "chat", {"default": "chat"}, "bf16")
    assert tuned.model.base_model.model.lm_head.weight.dtype == torch.bfloat16  # not cast to fp32 on the way
    loss, count = response_loss(tuned, CHAT, "default")
    assert count > 0 and loss == loss
    assert tuned.generate(["hello"], greedy=True, max_new_tokens=3)[0].new_tokens > 0


def test_packing_falls_back_from_flash_attention_where_the_class_refuses_it(monkeypatch, tiny_gemma3_multimodal):
    # flash-attn installed (faked here) + Gemma 3 with a vision tower: from_pretrained raised a raw ValueError.
    import gemmatune.models.packing as packing

    monkeypatch.setattr(packing, "flash_attention_available", lambda: True)
    cfg = load_config(None, [f"model.name={tiny_gemma3_multimodal}"])
    model = load_model(cfg.model, "fp32", packing=True).model
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert attn_implementation(model.config) == packing.PACKED_SDPA


def test_merge_auto_keeps_the_checkpoint_dtype(alpaca_file, tmp_path):
    # The base is loaded in fp32 for exact merging; --dtype auto must still save the checkpoint's bf16.
    base = save_tiny(gemma3_config(), tmp_path / "bf16-base")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    assert json.loads((base / "config.json").read_text())["dtype"] == "bfloat16"
    result = train(tiny_config(base, alpaca_file, tmp_path / "runs", max_steps=1))
    out = merge(str(result.run_dir), tmp_path / "merged")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "gemmatune.json").read_text())["dtype"] == "bfloat16"
    fp32 = merge(str(result.run_dir), tmp_path / "merged32", dtype="fp32")
    with safe_open(str(fp32 / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


@pytest.mark.parametrize("family", ["gemma3", "gemma3n"])
def test_default_targets_never_reach_a_tower(family):
    from gemmatune.models.registry import family_for

    targets = family_for(family).lora_targets
    import re

    assert re.fullmatch(targets, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(targets, "model.vision_tower.encoder.layers.0.self_attn.q_proj")
