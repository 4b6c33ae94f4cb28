"""Gemma 3n (E2B, E4B): a multimodal checkpoint whose language model is what we tune.

- LoRA stays inside the language model: the 7 projection names would also hit the audio tower.
- KV-shared layers have no k_proj/v_proj, so k/v get adapters only in the first layers.
- fp16 overflows (activations past 65,504 are reported), so fp16 is refused.
- Training flags such as use_cache live in `config.text_config` on the multimodal class.
"""

from gemmatune.models import ModelFamily
from gemmatune.models.gemma3 import CHAT_TEMPLATE

LANGUAGE_MODEL_PROJECTIONS = (
    r"^(?!.*(?:audio_tower|vision_tower)).*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
)

FAMILY = ModelFamily(
    name="gemma3n",
    model_types=("gemma3n", "gemma3n_text"),
    lora_targets=LANGUAGE_MODEL_PROJECTIONS,
    chat_template=CHAT_TEMPLATE,
    stop_tokens=("<end_of_turn>",),
    fp16_safe=False,
    known_ids=("google/gemma-3n-E2B", "google/gemma-3n-E2B-it", "google/gemma-3n-E4B", "google/gemma-3n-E4B-it"),
    text_config_attr="text_config",
)
