"""Measure the bytes autograd keeps for backward, per token and per layer, for the planner's TrainingPath.

Builds real-width layers with random weights (no download): the embedded Gemma 3 270M architecture and the
Gemma 3n E4B text architecture, each with 2 and 4 layers and a small vocabulary, prepares them as
`gemmatune train` does with bf16 compute (bf16 frozen weights, lean RMSNorms, LoRA r=16 without PEFT's input
casts) and runs one forward under bf16 autocast at two sequence lengths. `--as-loaded` measures the
transformers modules as they come (fp32 weights, PEFT defaults), the path the first calibration used.
Saved tensors are counted once per storage; parameters themselves are excluded (they are weights).
Differences between 4 and 2 layers and between the two lengths give bytes per layer per token.

    flock /tmp/gemmatune-heavy.lock python benchmarks/activation_bytes.py

`--towers` (needs the multimodal extra): Gemma 3n E2B's real-size vision tower (one 768x768 image) and audio
tower (one 30 s clip), random fp32 weights on the CPU with LoRA in both towers, one forward each: the memory the
forward still holds when it returns (the profiler's allocator events: what autograd keeps for backward plus the
soft tokens) beside `plan`'s figure for the same tower (tower_memory.py: meta device, no weights).

    flock /tmp/gemmatune-heavy.lock python benchmarks/activation_bytes.py --towers
"""

from __future__ import annotations

import argparse
import json

import peft
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gemmatune.config import LoraConfig
from gemmatune.models.gemma3n import LANGUAGE_MODEL_PROJECTIONS
from gemmatune.models.lora import attach_lora
from gemmatune.models.registry import bundled_config_file, family_for
from gemmatune.train.norms import use_lean_rms_norm

GEMMA3_270M = {  # the embedded model's architecture (config.json of the converted GGUF)
    "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512,
}


def saved_bytes(model, tokens: int, bf16: bool) -> int:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(3, 250, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # logits are measured elsewhere
    return sum(seen.values())


def build(arch: dict, layers: int, targets, as_loaded: bool):
    data = dict(arch, num_hidden_layers=layers, vocab_size=256, max_position_embeddings=4096)
    if "num_kv_shared_layers" in data:
        data.update(vocab_size_per_layer_input=256, num_kv_shared_layers=0, layer_types=None,
                    activation_sparsity_pattern=[0.95] * layers, intermediate_size=data["intermediate_size"][0])
    model_type = data.pop("model_type")
    config = AutoConfig.for_model(model_type, **data)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if as_loaded:
        return peft.get_peft_model(model, peft.LoraConfig(r=16, lora_dropout=0.05, target_modules=targets,
                                                task_type="CAUSAL_LM"))
    family = family_for(model_type)
    model.to(torch.bfloat16)
    use_lean_rms_norm(model, family.rms_norm, family.rms_norm_offset)
    return attach_lora(model, LoraConfig(r=16, lora_dropout=0.05, target_modules=targets), family, autocast=True)[0]


def towers() -> None:
    """Real-size towers on the CPU against plan's meta-device figures (see the module docstring)."""
    import time

    from torch.profiler import ProfilerActivity, profile
    from transformers import Gemma3nForConditionalGeneration

    from gemmatune.plan.towers import clip_frames, measure_towers

    data = json.loads(bundled_config_file("google/gemma-3n-E2B-it").read_text())
    text = AutoConfig.for_model(data.pop("model_type"), **data)
    config = AutoConfig.for_model("gemma3n", text_config=text.to_dict())
    family = family_for("gemma3n")
    lora = LoraConfig(r=16, towers=["audio", "vision"])

    def with_lora(device: str):
        with torch.device("meta"):
            model = Gemma3nForConditionalGeneration(config)
        for param in model.parameters():
            param.requires_grad_(False)
        model = attach_lora(model, lora, family)[0]
        if device == "cpu":  # only the towers get memory (the language model is not run)
            torch.manual_seed(0)
            inner = model.get_base_model().model
            for name in ("vision_tower", "embed_vision", "audio_tower", "embed_audio"):
                part = getattr(inner, name).to_empty(device="cpu")
                for tensor in [*part.parameters(), *part.buffers()]:
                    if tensor.is_floating_point():
                        tensor.data.normal_(0, 0.02)
        return model

    planned = {t.tower: t for t in measure_towers(with_lora("meta"), lora.towers, family, dtype_bytes=4)}
    model = with_lora("cpu")
    model.train()
    inner = model.get_base_model().model
    frames = clip_frames()
    forwards = {
        "vision": lambda: inner.get_image_features(torch.randn(1, 3, 768, 768), return_dict=True).pooler_output,
        "audio": lambda: inner.get_audio_features(torch.randn(1, frames, 128), torch.zeros(1, frames, dtype=torch.bool),
                                                  return_dict=True).pooler_output,
    }
    for tower, forward in forwards.items():
        started = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            output = forward()
        held = sum(e.self_cpu_memory_usage for e in prof.events())
        seconds = time.perf_counter() - started
        del output
        plan = planned[tower]
        print(json.dumps({"tower": tower, "unit": plan.unit, "held_bytes_fp32": held,
                          "planned_bytes_fp32": round(plan.per_unit),
                          "planned_over_held": round(plan.per_unit / held, 4),
                          "planned_bf16_gib": round(plan.per_unit / 2 / 2**30, 3), "forward_s": round(seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--as-loaded", action="store_true", help="fp32 weights and PEFT defaults, no lean norms")
    parser.add_argument("--towers", action="store_true", help="Gemma 3n's vision and audio towers against plan")
    args = parser.parse_args()
    as_loaded = args.as_loaded
    if args.towers:
        torch.set_flush_denormal(True)
        return towers()
    torch.set_flush_denormal(True)
    e4b = json.loads(bundled_config_file("google/gemma-3n-E4B-it").read_text())
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, arch, targets in (("gemma3-270m", GEMMA3_270M, seven), ("gemma3n-e4b", e4b, LANGUAGE_MODEL_PROJECTIONS)):
        hidden = arch["hidden_size"]
        inter = arch["intermediate_size"]
        inter = inter[0] if isinstance(inter, list) else inter
        t1, t2 = 128, 256
        per_layer = {}
        for layers in (2, 4):
            model = build(arch, layers, targets, as_loaded)
            a, b = saved_bytes(model, t1, True), saved_bytes(model, t2, True)
            per_layer[layers] = (b - a) / (t2 - t1)
            del model
        per_layer_token = (per_layer[4] - per_layer[2]) / 2
        outside = per_layer[2] - 2 * per_layer_token
        print(json.dumps({"model": name, "bytes_per_layer_per_token": round(per_layer_token),
                          "per_hidden_unit": round(per_layer_token / hidden, 2), "hidden": hidden,
                          "intermediate": inter, "outside_layers_per_token": round(outside)}))


if __name__ == "__main__":
    main()
