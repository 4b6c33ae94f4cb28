"""Gemma 4 (E2B, E4B with audio and vision; 26B-A4B mixture of experts; 31B dense), from transformers 5.25's source.

- Text data loads `Gemma4ForCausalLM` (the language model alone) from a multimodal `gemma4` checkpoint;
  `model.multimodal: true` loads `Gemma4ForConditionalGeneration`, towers frozen unless `lora.towers` names them.
- E2B/E4B have per-layer embeddings (PLE) and KV sharing: KV-shared layers have no k_proj/v_proj, so k/v get
  adapters only in the first layers (as Gemma 3n). `attention_k_eq_v` models have no v_proj on full-attention layers.
- LoRA stays inside the language model by default: the 7 projection names also occur in both towers.
- The towers' linears are `Gemma4ClippableLinear`: an `nn.Linear` at `.linear` between input/output clamps. PEFT
  cannot wrap the outer module (it is no Linear), so the tower targets name the inner `.linear`: the clamps stay
  around the adapted layer, exactly as the checkpoint's bounds were meant.
- MoE layers (26B-A4B) have a router (`router.proj`), experts stored as 3-D parameters (`experts.gate_up_proj`,
  `experts.down_proj`: no module target reaches them) and a dense "shared" MLP beside them (`mlp.*_proj`). The
  experts get LoRA only with `lora.experts: true`, through PEFT's `target_parameters`.
- QLoRA keeps the router's projection unquantized: its scores pick the experts (a discrete top-k choice that 4-bit
  rounding would change), and it is small. The experts' 3-D weights are no Linear and stay 16-bit anyway.
- fp16 overflows are reported for Gemma 4 (unsloth-zoo#866, #931): fp16 is refused.
- Chat format `<|turn>role ... <turn|>`; the end-of-turn marker ends a reply (learned, and a stop token). Thinking
  is `<|channel>thought ... <channel|>` inside a model turn: kept out of the loss unless `data.train_on_thinking`.
- The four checkpoints' configs are bundled for `plan` (gemma4_e2b.json, gemma4_e4b.json, gemma4_26b_a4b.json,
  gemma4_31b.json): the arguments Google's conversion script gives `Gemma4Config` for each variant (transformers'
  models/gemma4/convert_gemma4_weights.py, `_VARIANTS`, read at commit 0f3f0632), everything else the defaults it
  relied on. The hub's config.json files cannot be read here; the transformers defaults alone are no checkpoint's
  (`Gemma4TextConfig()` has no KV sharing, which E2B has). E2B/E4B have both towers, 26B-A4B/31B the larger vision
  tower and no audio. The media tokens' strings (`<|image|>`, `<|image>`...) are the ones that script gives the
  tokenizer.
"""

from gemmatune.models import MediaDefaults, ModelFamily, language_model_projections

# Google's Gemma 4 chat format (the `chat_template` of google/gemma-4-E2B-it, as TRL ships it in
# trl/chat_templates/gemma4*.jinja), text only: an optional system turn, `<|turn>user` / `<|turn>model` turns closed
# by `<turn|>`, and an assistant message's `reasoning` rendered as the thinking channel before its reply. Unlike
# Google's template, reasoning is rendered in every turn that has it (Google's drops it before the last user turn):
# a conversation must render each reply the same way whatever follows it, or its labels could not be placed.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ '<|turn>system\n' + messages[0]['content'] | trim + '<turn|>\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- set thinking = message.get('reasoning') or message.get('reasoning_content') -%}"
    "{%- if role == 'model' and thinking -%}"
    "{{ '<|channel>thought\n' + thinking + '\n<channel|>' }}"
    "{%- endif -%}"
    "{{ message['content'] | trim }}"
    "{{ '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|turn>model\n' }}"
    "{%- endif -%}"
)
END_OF_TURN = "<turn|>"
THINKING = ("<|channel>", "<channel|>")

TOWERS = ("audio_tower", "vision_tower", "embed_audio", "embed_vision")
LANGUAGE_MODEL_PROJECTIONS = language_model_projections(TOWERS)
# Inside Gemma4ClippableLinear: the `.linear` (see above). Audio: conformer attention (q/k/v, post), both feed-forward
# blocks, the light convolution's projections. Vision: the encoder's attention and MLP. Each adds its embedder's
# projection into the language model's space (a plain Linear).
AUDIO_TARGETS = (r"^.*\.audio_tower\..*\.(?:q_proj|k_proj|v_proj|post|ffw_layer_1|ffw_layer_2|linear_start"
                 r"|linear_end)\.linear$|^.*\.embed_audio\.embedding_projection$")
VISION_TARGETS = (r"^.*\.vision_tower\..*\.(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.linear$"
                  r"|^.*\.embed_vision\.embedding_projection$")

FAMILY = ModelFamily(
    name="gemma4",
    model_types=("gemma4", "gemma4_text"),
    lora_targets=LANGUAGE_MODEL_PROJECTIONS,
    chat_template=CHAT_TEMPLATE,
    stop_tokens=(END_OF_TURN,),
    fp16_safe=False,
    # The ids transformers 5.25 names (google/gemma-4-E2B-it, google/gemma-4-26B-A4B-it) and their siblings as the
    # release named them: E2B, E4B, 26B-A4B, 31B, base and -it.
    known_ids=tuple(f"google/gemma-4-{size}{suffix}" for size in ("E2B", "E4B", "26B-A4B", "31B")
                    for suffix in ("", "-it")),
    text_config_attr="text_config",
    multimodal_model_types=("gemma4",),
    text_class="Gemma4ForCausalLM",
    # transformers 5.25 maps gemma3n_text's keys but not gemma4_text's: the language model sits under
    # model.language_model in the checkpoint and under model in Gemma4ForCausalLM.
    text_key_mapping=((r"^model\.language_model\.", "model."),),
    multimodal_class="Gemma4ForConditionalGeneration",
    # The towers are plain torch modules (no timm), but AutoProcessor builds Gemma4Processor with its video processor,
    # which imports torchvision (without it the processor cannot be made: VIDEO_PROCESSOR_MAPPING is a stub); the
    # image processor needs Pillow.
    multimodal_requires=("PIL", "torchvision"),
    tower_modules=TOWERS,
    patch_images=True,
    media=MediaDefaults(max_soft_tokens=280, mel_bins=128),  # each soft token pooled from 3x3 patches
    audio_mask_marks_frames=True,
    towers=(("audio", ("audio_tower", "embed_audio"), AUDIO_TARGETS),
            ("vision", ("vision_tower", "embed_vision"), VISION_TARGETS)),
    keep_unquantized=("router.proj",),
    rms_norm="Gemma4RMSNorm",
    rms_norm_offset=0.0,  # output * weight (norms built with_scale=False have no weight)
    expert_parameters=("experts.gate_up_proj", "experts.down_proj"),
    moe_parts=(("experts", "experts"), ("router", "router"), ("shared MLP", "mlp")),
    thinking_markers=THINKING,
    bundled_configs=tuple((f"google/gemma-4-{size}{suffix}", f"gemma4_{size.lower().replace('-', '_')}.json")
                          for size in ("E2B", "E4B", "26B-A4B", "31B") for suffix in ("", "-it")),
)
