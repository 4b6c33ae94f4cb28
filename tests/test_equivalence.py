"""The check that catches a library drifting under us: per family, the training forward exactly as gemmatune runs it
(packed attention, lean RMSNorm, LoRA, label-only chunked loss, no KV cache, train mode) gives the same per-token
log-probs as stock transformers + stock PEFT decoding the same tokens one at a time with its KV cache.

This is what failed silently for Gemma 3n on transformers 5.0-5.5: without a cache its KV-shared layers computed
keys and values of their own, so the model trained was not the model that generates. On transformers 5.5 the
Gemma 3n case here fails (0.25 nats per token at worst on this tiny model, checked with
tools/try_versions.py pin transformers==5.5.0); from 5.6 on it passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import (
    VOCAB,
    gemma3_config,
    gemma3n_config,
    gemma4_config,
    gemma4_unified_config,
    make_gemma4_tokenizer,
    needs_multimodal,
    save_tiny,
    tiny_config,
    write_jsonl,
)

# Longer than the tiny models' sliding window (16), so the local layers' windows are exercised in both paths.
LENGTHS = (27, 19)
TOLERANCE = 2e-4  # nats, fp32


def _llama_config():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    return config


def _sequences() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [[2, *torch.randint(6, VOCAB, (n - 1,), generator=generator).tolist()] for n in LENGTHS]


def _training_logprobs(model_dir: Path, tmp: Path, sequences, multimodal: bool,
                       overrides: tuple[str, ...] = ()) -> tuple[list[list[float]], Path]:
    """Per-token log-probs from gemmatune's training forward; the (randomised) LoRA adapter is saved beside."""
    from gemmatune.compat import attn_implementation
    from gemmatune.data.examples import PackCollator
    from gemmatune.models import packing
    from gemmatune.models.loading import load_model
    from gemmatune.models.loss import causal_lm_parts, chunked_cross_entropy_sum, selected_hidden
    from gemmatune.train.norms import LeanRMSNorm
    from gemmatune.train.recipe import prepare_for_training

    cfg = tiny_config(model_dir, write_jsonl(tmp / "rows.jsonl", [{"text": "x"}]), tmp / "runs")
    cfg.model.multimodal = multimodal
    for item in overrides:
        section, _, rest = item.partition(".")
        key, _, value = rest.partition("=")
        setattr(getattr(cfg, section), key, value == "true" if value in ("true", "false") else value)
    loaded = load_model(cfg.model, "fp32", packing=True)
    model, _ = prepare_for_training(loaded, cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapter something to say
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.train()
    # The path under test, not a fallback: per-example attention, lean norms, a plain head for the chunked loss.
    assert attn_implementation(model.get_base_model().config) == packing.PACKED_SDPA
    assert any(isinstance(m, LeanRMSNorm) for m in model.modules()) == (loaded.family.rms_norm is not None)
    parts = causal_lm_parts(model)
    assert parts is not None
    batch = PackCollator()([{"input_ids": s, "labels": s} for s in sequences])
    hidden, targets = selected_hidden(parts, batch)
    assert targets.numel() == sum(len(s) - 1 for s in sequences)
    nll = [chunked_cross_entropy_sum(hidden[i:i + 1], targets[i:i + 1], parts).item() for i in range(len(targets))]
    model.save_pretrained(tmp / "adapter")
    out, start = [], 0
    for s in sequences:
        out.append([-x for x in nll[start:start + len(s) - 1]])
        start += len(s) - 1
    return out, tmp / "adapter"


def _decoded_logprobs(model_dir: Path, adapter: Path, sequences, model_class: str) -> list[list[float]]:
    """Stock transformers + PEFT, one token at a time with the KV cache, as generation runs."""
    import transformers
    from peft import PeftModel

    base = getattr(transformers, model_class).from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    out = []
    with torch.no_grad():
        for s in sequences:
            past, logprobs = None, []
            for t in range(len(s) - 1):
                step = model(input_ids=torch.tensor([[s[t]]]), past_key_values=past, use_cache=True)
                # Gemma 4 (transformers 5.25) returns the cache as `cache`; the others as `past_key_values`.
                past = getattr(step, "past_key_values", None) or getattr(step, "cache", None)
                logprobs.append(torch.log_softmax(step.logits[0, -1].float(), -1)[s[t + 1]].item())
            out.append(logprobs)
    return out


def _check(model_dir: Path, tmp: Path, model_class: str, multimodal: bool = False, overrides=()) -> None:
    sequences = _sequences()
    trained, adapter = _training_logprobs(model_dir, tmp, sequences, multimodal, tuple(overrides))
    decoded = _decoded_logprobs(model_dir, adapter, sequences, model_class)
    for got, want in zip(trained, decoded, strict=True):
        worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
        assert worst < TOLERANCE, (
            f"{model_class}: training forward and cached decoding differ by up to {worst:.4g} nats per token "
            f"(transformers {__import__('transformers').__version__}); the model trained is not the model that "
            "generates")


@pytest.mark.parametrize("family", ["gemma3", "gemma3n", "generic", "gemma4-e", "gemma4-moe", "gemma4-dense",
                                    "gemma4-unified"])
def test_training_forward_equals_cached_decoding(family, tmp_path):
    config, model_class = {
        "gemma3": (gemma3_config(), "Gemma3ForCausalLM"),
        "gemma3n": (gemma3n_config(), "Gemma3nForCausalLM"),
        "generic": (_llama_config(), "LlamaForCausalLM"),
        # E-style: per-layer embeddings + KV sharing (the layers that reuse keys/values must do so without a cache)
        "gemma4-e": (gemma4_config("e"), "Gemma4ForCausalLM"),
        "gemma4-moe": (gemma4_config("moe"), "Gemma4ForCausalLM"),
        "gemma4-dense": (gemma4_config("dense"), "Gemma4ForCausalLM"),
        "gemma4-unified": (gemma4_unified_config(), "Gemma4UnifiedForCausalLM"),
    }[family]
    config.architectures = [model_class]
    tokenizer = make_gemma4_tokenizer() if family.startswith("gemma4") else None
    _check(save_tiny(config, tmp_path / "base", tokenizer=tokenizer), tmp_path, model_class)


def test_gemma4_experts_lora_keeps_training_forward_equal_to_cached_decoding(tmp_path):
    """With `lora.experts: true` the experts' parameter LoRA (PEFT ParamWrapper) is in both paths too."""
    config = gemma4_config("moe")
    _check(save_tiny(config, tmp_path / "base", tokenizer=make_gemma4_tokenizer()), tmp_path, "Gemma4ForCausalLM",
           overrides=["lora.experts=true"])


@pytest.mark.multimodal
def test_training_forward_equals_cached_decoding_gemma3n_multimodal(tiny_gemma3n_multimodal, tmp_path):
    needs_multimodal()
    _check(tiny_gemma3n_multimodal, tmp_path, "Gemma3nForConditionalGeneration", multimodal=True)
