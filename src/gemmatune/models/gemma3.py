"""Gemma 3 (text, and the 270M the project embeds)."""

from gemmatune.models import ModelFamily, language_model_projections

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
    sentencepiece_tokenizer=True,
    ollama_chat_template=OLLAMA_CHAT_TEMPLATE,
)
