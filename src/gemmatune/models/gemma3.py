"""Gemma 3 (text, and the 270M the project embeds)."""

from gemmatune.models import GgufLayout, ModelFamily, language_model_projections

# Gemma's chat format, text-only. A GGUF carries no template, so the embedded model gets this one.
# The system turn is folded into the first user turn, as in Google's template.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# The same format for Ollama (Go text/template): a system message folded into the first user turn as above.
OLLAMA_CHAT_TEMPLATE = (
    # No "{{-" after a newline that belongs to the format: it would trim it. printf's "\\n" is a Go escape.
    '{{- $system := "" }}'
    '{{- range .Messages }}{{- if eq .Role "system" }}{{ $system = printf "%s\\n\\n" .Content }}{{- end }}{{- end }}'
    '{{- range $i, $m := .Messages }}'
    '{{ if eq $m.Role "user" }}<start_of_turn>user\n{{ $system }}{{ $system = "" }}{{ $m.Content }}<end_of_turn>\n'
    '{{ else if eq $m.Role "assistant" }}<start_of_turn>model\n{{ $m.Content }}<end_of_turn>\n'
    '{{ end }}{{ end }}<start_of_turn>model\n'
)

TOWERS = ("vision_tower", "multi_modal_projector")


def gguf_hparams(config) -> list[tuple[str, object]]:
    """llama.cpp's Gemma 3 keys (GGUFWriter method, value) from a Gemma 3 text config."""
    from gguf import RopeScalingType

    from gemmatune.errors import GemmatuneError

    rope = config.rope_parameters or {}
    full, sliding = rope.get("full_attention", rope), rope.get("sliding_attention", {})
    keys: list[tuple[str, object]] = [
        ("add_block_count", config.num_hidden_layers),
        ("add_context_length", config.max_position_embeddings),
        ("add_embedding_length", config.hidden_size),
        ("add_feed_forward_length", config.intermediate_size),
        ("add_head_count", config.num_attention_heads),
        ("add_head_count_kv", config.num_key_value_heads),
        ("add_key_length", config.head_dim),
        ("add_value_length", config.head_dim),
        ("add_layer_norm_rms_eps", config.rms_norm_eps),
        ("add_rope_freq_base", full["rope_theta"]),  # the global (full attention) layers'
        ("add_sliding_window", config.sliding_window),
    ]
    if "rope_theta" in sliding:
        keys.append(("add_rope_freq_base_swa", sliding["rope_theta"]))
    if config.final_logit_softcapping:
        keys.append(("add_final_logit_softcapping", config.final_logit_softcapping))
    kind = full.get("rope_type", "default")
    if kind == "linear":  # Gemma 3 4B and larger stretch the global layers' positions by 8
        keys += [("add_rope_scaling_type", RopeScalingType.LINEAR), ("add_rope_scaling_factor", full["factor"])]
    elif kind != "default":
        raise GemmatuneError(f"rope scaling {kind!r}: a GGUF export knows Gemma's 'default' and 'linear' only")
    return keys


GGUF = GgufLayout(arch="GEMMA3", hparams=gguf_hparams)

FAMILY = ModelFamily(
    name="gemma3",
    model_types=("gemma3_text", "gemma3"),
    # 4B/12B/27B checkpoints are Gemma3ForConditionalGeneration with a SigLIP tower that has q/k/v_proj too.
    lora_targets=language_model_projections(TOWERS),
    chat_template=CHAT_TEMPLATE,
    stop_tokens=("<end_of_turn>",),
    known_ids=(
        "google/gemma-3-270m", "google/gemma-3-270m-it", "google/gemma-3-1b-pt", "google/gemma-3-1b-it",
        "google/gemma-3-4b-pt", "google/gemma-3-4b-it", "google/gemma-3-12b-pt", "google/gemma-3-12b-it",
        "google/gemma-3-27b-pt", "google/gemma-3-27b-it",
    ),
    text_config_attr="text_config",
    tower_modules=TOWERS,
    rms_norm="Gemma3RMSNorm",
    rms_norm_offset=1.0,  # output * (1.0 + weight)
    ollama_chat_template=OLLAMA_CHAT_TEMPLATE,
    gguf=GGUF,
)
