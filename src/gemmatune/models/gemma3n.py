"""Gemma 3n (E2B, E4B): a multimodal checkpoint whose language model is what we tune.

- Text data loads `Gemma3nForCausalLM` from the multimodal checkpoint: the language model alone, no timm,
  same logits as the full model on text. `model.multimodal: true` loads the full model; its towers stay frozen.
- LoRA stays inside the language model: the 7 projection names would also hit the audio tower.
- KV-shared layers have no k_proj/v_proj, so k/v get adapters only in the first layers.
- QLoRA keeps AltUp's coefficient layers unquantized (the model clamps and reads their weights directly).
- fp16 overflows (activations past 65,504 are reported), so fp16 is refused.
- Training flags such as use_cache live in `config.text_config` on the multimodal class.
- The real E2B / E4B text configs are bundled (gemma3n_e2b_text.json, gemma3n_e4b_text.json) for `plan`.
- `lora.towers` opts the towers in. Audio: the conformer's attention (q/k/v, post), feed-forward and light-conv
  projections. Vision (timm MobileNetV5): the multi-query attention's 1x1 convolutions and the multi-scale fusion
  adapter's FFN; the depthwise (grouped) convolutions are left alone. Each adds its embedder's projection into
  the language model's space.
"""

import math

from gemmatune.models import GgufLayout, MediaDefaults, ModelFamily, language_model_projections
from gemmatune.models.gemma3 import CHAT_TEMPLATE, OLLAMA_CHAT_TEMPLATE
from gemmatune.models.gemma3 import gguf_hparams as gemma3_gguf_hparams

TOWERS = ("audio_tower", "vision_tower", "embed_audio", "embed_vision")
LANGUAGE_MODEL_PROJECTIONS = language_model_projections(TOWERS)
AUDIO_TARGETS = (r"^.*\.audio_tower\..*\.(?:q_proj|k_proj|v_proj|post|ffw_layer_1|ffw_layer_2|linear_start"
                 r"|linear_end)$|^.*\.embed_audio\.embedding_projection$")
VISION_TARGETS = (r"^.*\.vision_tower\..*\.(?:attn\.(?:query|key|value|output)\.proj"
                  r"|msfa\.ffn\.(?:pw_exp|pw_proj)\.conv)$|^.*\.embed_vision\.embedding_projection$")



def gguf_hparams(config) -> list[tuple[str, object]]:
    """llama.cpp's Gemma 3n keys: Gemma 3's plus AltUp, per-layer inputs, KV sharing and activation sparsity."""
    import torch

    # The sparsity cutoff is mean + std * (standard normal quantile of the layer's target sparsity), as in
    # transformers; float32 as there (-inf where the pattern is 0: no sparsity).
    pattern = torch.tensor(config.activation_sparsity_pattern, dtype=torch.float32)
    quantiles = torch.erfinv(2 * pattern - 1) * math.sqrt(2)
    return [
        *gemma3_gguf_hparams(config),
        ("add_altup_active_idx", config.altup_active_idx),
        ("add_altup_num_inputs", config.altup_num_inputs),
        ("add_embedding_length_per_layer_input", config.hidden_size_per_layer_input),
        ("add_shared_kv_layers", config.num_kv_shared_layers),
        ("add_activation_sparsity_scale", quantiles.tolist()),
        ("add_sliding_window_pattern", [kind == "sliding_attention" for kind in config.layer_types]),
    ]


GGUF = GgufLayout(
    arch="GEMMA3N",
    hparams=gguf_hparams,
    renames=((r"_scale$", "_scale.weight"),),  # LAuReL / AltUp scales are bare parameters in transformers
    stacked=("altup_projections", "altup_unembed_projections"),
    # AltUp's coefficients: llama.cpp keeps them in F32 as its quantizer does (tiny, and clamped at run time).
    keep_f32=("altup_correct_coef.weight", "altup_predict_coef.weight"),
    # The vision / audio token rows (ids past the per-layer table) are zeros: those tokens come from the towers.
    vocab_sized=("token_embd.weight", "per_layer_token_embd.weight"),
    kv_shared_placeholders=("attn_k.weight", "attn_v.weight", "attn_k_norm.weight"),
)

_E2B = "gemma3n_e2b_text.json"
_E4B = "gemma3n_e4b_text.json"

FAMILY = ModelFamily(
    name="gemma3n",
    model_types=("gemma3n", "gemma3n_text"),
    lora_targets=LANGUAGE_MODEL_PROJECTIONS,
    chat_template=CHAT_TEMPLATE,
    stop_tokens=("<end_of_turn>",),
    fp16_safe=False,
    known_ids=("google/gemma-3n-E2B", "google/gemma-3n-E2B-it", "google/gemma-3n-E4B", "google/gemma-3n-E4B-it"),
    text_config_attr="text_config",
    multimodal_model_types=("gemma3n",),
    text_class="Gemma3nForCausalLM",
    multimodal_class="Gemma3nForConditionalGeneration",
    # The vision tower is a timm MobileNetV5; timm imports torchvision, which must match torch.
    multimodal_requires=("timm", "PIL", "torchvision"),
    tower_modules=TOWERS,
    towers=(("audio", ("audio_tower", "embed_audio"), AUDIO_TARGETS),
            ("vision", ("vision_tower", "embed_vision"), VISION_TARGETS)),
    # AltUp clamps prediction_coefs.weight in place and calls F.linear on correction_coefs.weight: with packed
    # 4-bit bytes the clamp corrupts them (bf16 storage) or raises (uint8); the router is 2048 -> 4.
    keep_unquantized=("altup.prediction_coefs", "altup.correction_coefs", "altup.modality_router"),
    bundled_configs=(
        ("google/gemma-3n-E2B", _E2B), ("google/gemma-3n-E2B-it", _E2B),
        ("google/gemma-3n-E4B", _E4B), ("google/gemma-3n-E4B-it", _E4B),
    ),
    rms_norm="Gemma3nRMSNorm",
    rms_norm_offset=0.0,  # output * weight (norms built with_scale=False have no weight)
    gguf=GGUF,
    ollama_chat_template=OLLAMA_CHAT_TEMPLATE,
    media=MediaDefaults(image_size=768),  # audio: 32 ms windows every 10 ms, 2,997 frames for 30 s
    residual_streams_attr="altup_num_inputs",
)
