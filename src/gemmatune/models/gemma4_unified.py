"""Gemma 4 12B "unified" (`gemma4_unified`, google/gemma-4-12B(-it)): images and audio enter the transformer itself
through small embedders (no vision encoder or audio conformer), from transformers 5.25's source.

- The language model has Gemma 4's decoder layers (sliding and full attention 5:1, keys = values on full layers with
  one global key/value head, no per-layer embeddings, no KV sharing) and Gemma 4's chat format, stop token and
  thinking markers: those are shared with `gemma4`.
- gemmatune fine-tunes its language model on text (`Gemma4UnifiedForCausalLM` from the multimodal checkpoint, keys
  mapped as for Gemma 4). Image and audio rows (`model.multimodal: true`) are not offered: its processor and
  embedders take other inputs than Gemma 4's towers, and no media path for them is tested here.
- The bundled config (gemma4_12b.json) holds the arguments Google's conversion script gives `Gemma4UnifiedConfig`
  (transformers' models/gemma4_unified/convert_gemma4_unified_weights.py, `_VARIANTS["gemma-4-12b"]`).
- fp16 is refused as for Gemma 4 (same layers, same activations).
"""

from gemmatune.models import ModelFamily, language_model_projections
from gemmatune.models.gemma4 import CHAT_TEMPLATE, END_OF_TURN, THINKING

# The embedders that bring images and audio into the language model's space: never given LoRA by default.
EMBEDDERS = ("vision_embedder", "embed_vision", "embed_audio")

FAMILY = ModelFamily(
    name="gemma4_unified",
    model_types=("gemma4_unified", "gemma4_unified_text"),
    lora_targets=language_model_projections(EMBEDDERS),
    chat_template=CHAT_TEMPLATE,
    stop_tokens=(END_OF_TURN,),
    fp16_safe=False,
    known_ids=("google/gemma-4-12B", "google/gemma-4-12B-it"),
    text_config_attr="text_config",
    multimodal_model_types=("gemma4_unified",),
    text_class="Gemma4UnifiedForCausalLM",
    text_key_mapping=((r"^model\.language_model\.", "model."),),
    tower_modules=EMBEDDERS,
    bundled_configs=(("google/gemma-4-12B", "gemma4_12b.json"), ("google/gemma-4-12B-it", "gemma4_12b.json")),
    rms_norm="Gemma4UnifiedRMSNorm",
    rms_norm_offset=0.0,  # output * weight, as Gemma 4
    thinking_markers=THINKING,
)
