"""Prompt templates: turn a row into token ids plus labels that are -100 outside the loss.

Prompt and response are tokenized separately, exactly as generation will see them (the prompt is
tokenized alone, the model continues it), so no token straddles the boundary. The response always
ends with the stop token the model must learn: EOS for the Alpaca templates, the end-of-turn
marker of the chat template for chat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gemmatune.errors import GemmatuneError
from gemmatune.models.loss import IGNORE

ALPACA_ZH = ("### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:\n", "### 指令:\n{instruction}\n\n### 回答:\n")
ALPACA_EN = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n",
)
_ALPACA = {"alpaca-zh": ALPACA_ZH, "alpaca-en": ALPACA_EN}
TEMPLATE_FORMATS = {
    "alpaca-zh": ("alpaca",),
    "alpaca-en": ("alpaca",),
    "chat": ("alpaca", "messages"),
    "text": ("text",),
}


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    media: tuple = ()  # media.Part of each image/audio part, in the order their soft tokens appear


def content_text(content) -> str:
    """A message's content as one line of text for reports: text parts as written, image/audio parts by file."""
    if isinstance(content, str):
        return content
    from pathlib import Path

    return " ".join(p["text"] if p["type"] == "text" else f"[{p['type']}: {Path(p['path']).name}]" for p in content)


def text_messages(messages: list[dict], media=None) -> tuple[list[dict], tuple]:
    """Messages whose content lists (text, image and audio parts) become text: each image/audio part the text
    `media` (media.MediaTokens) gives for it, text parts trimmed and joined as the Gemma 3n chat template
    joins them. Returns the messages and the parts (media.Part) in order."""
    from gemmatune.data.media import Part

    out, parts = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            pieces = []
            for part in content:
                if part["type"] == "text":
                    pieces.append(part["text"].strip())
                else:
                    if media is None:
                        raise GemmatuneError("rows with image/audio parts need the multimodal model: set "
                                             "model.multimodal: true")
                    parts.append(Part(part["type"], part["path"]))
                    pieces.append(media.text_for(parts[-1]))
            content = "".join(pieces)
        out.append({**m, "content": content})
    return out, tuple(parts)


def default_template(fmt: str) -> str:
    return {"alpaca": "alpaca-en", "messages": "chat", "text": "text"}[fmt]


def check_template(template: str, fmt: str, tokenizer) -> None:
    if fmt not in TEMPLATE_FORMATS[template]:
        allowed = ", ".join(t for t, fmts in TEMPLATE_FORMATS.items() if fmt in fmts)
        raise GemmatuneError(f"config key data.template: {template} does not fit {fmt} rows; use one of: {allowed}")
    if template == "chat" and not tokenizer.chat_template:
        raise GemmatuneError(
            "config key data.template: chat needs a tokenizer with a chat template, and this one has none; "
            "use alpaca-en or alpaca-zh"
        )


def alpaca_messages(row: dict) -> list[dict]:
    user = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    return [{"role": "user", "content": user}]


def prompt_text(row: dict, template: str, tokenizer) -> str:
    """The text the model sees before its answer; used for generation and evaluation."""
    if template in _ALPACA:
        with_input, without = _ALPACA[template]
        return (with_input if row.get("input") else without).format(**{"input": "", **row})
    if template == "chat":
        messages = row["messages"] if "messages" in row else alpaca_messages(row)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise GemmatuneError(f"template {template} has no prompt/response split; generation needs alpaca or chat")


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize_row(row: dict, template: str, tokenizer, train_on_prompt: bool = False, media=None,
                 thinking: tuple[int, int] | None = None) -> Tokenized:
    """`thinking`: the token ids that open and close a reply's thinking span, which is then kept out of the loss
    (markers included); None: every reply token is a target."""
    if template == "text":
        ids = _encode(tokenizer, row["text"], True) + [tokenizer.eos_token_id]
        return Tokenized(ids, list(ids))
    if template in _ALPACA:
        prompt = _encode(tokenizer, prompt_text(row, template, tokenizer), True)
        response = _encode(tokenizer, row["output"], False) + [tokenizer.eos_token_id]
        prompt_labels = list(prompt) if train_on_prompt else [IGNORE] * len(prompt)
        return Tokenized(prompt + response, prompt_labels + response)
    messages = row["messages"] if "messages" in row else alpaca_messages(row) + [
        {"role": "assistant", "content": row["output"]}
    ]
    messages, parts = text_messages(messages, media)
    ex = _tokenize_chat(messages, tokenizer, train_on_prompt)
    if media is not None:
        # Soft tokens and their markers stand for an image or a clip: never a target, also with train_on_prompt.
        ex.labels = [IGNORE if i in media.ids else label for i, label in zip(ex.input_ids, ex.labels, strict=True)]
    if thinking is not None:
        ex.labels = without_thinking(ex.input_ids, ex.labels, thinking)
    return Tokenized(ex.input_ids, ex.labels, parts)


def without_thinking(ids: list[int], labels: list[int], markers: tuple[int, int]) -> list[int]:
    """`labels` with every thinking span (from the opening marker through the closing one) set to IGNORE; a span
    left open runs to the end."""
    start, end = markers
    out, inside = [], False
    for token, label in zip(ids, labels, strict=True):
        if token == start:
            inside = True
        out.append(IGNORE if inside else label)
        if token == end:
            inside = False
    return out


def _tokenize_chat(messages: list[dict], tokenizer, train_on_prompt: bool) -> Tokenized:
    """Label every assistant turn (through its end-of-turn marker), by rendering growing prefixes."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (through.startswith(before) and before.startswith(rendered)):
            raise GemmatuneError(
                "the tokenizer's chat template renders a reply differently from its prompt; use an alpaca template"
            )
        prompt_part = _encode(tokenizer, before[len(rendered):], False)
        reply_part = _encode(tokenizer, through[len(before):], False)
        ids += prompt_part + reply_part
        labels += (list(prompt_part) if train_on_prompt else [IGNORE] * len(prompt_part)) + reply_part
        rendered = through
    return Tokenized(ids, labels)


def conversation_row(messages: list[dict], template: str) -> dict:
    """The prompt row that answers the last user message of a conversation: the conversation itself for the chat
    template; for an Alpaca template, which has no turns, the last user message alone (`gemmatune chat` and
    `gemmatune serve` answer alike)."""
    if template == "chat":
        return {"messages": messages}
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise GemmatuneError("messages: no user message")
    if not isinstance(users[-1], str):
        raise GemmatuneError(f"images and audio need an adapter trained on the chat template (this one: {template})")
    return {"instruction": users[-1], "input": ""}


def prompt_ids(row: dict, template: str, tokenizer, media=None) -> list[int]:
    """Token ids the model continues to answer `row`, split exactly as `tokenize_row` splits them in training.

    A trailing assistant message (the reference answer) is dropped; earlier turns are encoded turn by turn
    as in training, so a multi-turn prompt sees the same token boundaries the adapter learned on.
    """
    if template in _ALPACA:
        return _encode(tokenizer, prompt_text(row, template, tokenizer), True)
    if template != "chat":
        raise GemmatuneError(f"template {template} has no prompt/response split; generation needs alpaca or chat")
    messages = row["messages"] if "messages" in row else alpaca_messages(row)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    messages, _ = text_messages(messages, media)
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    done = messages[: last_reply + 1]
    ids = _tokenize_chat(done, tokenizer, True).input_ids if done else []
    rendered = tokenizer.apply_chat_template(done, tokenize=False) if done else ""
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return ids + _encode(tokenizer, full[len(rendered):], False)


def gguf_chat_template(template: str, tokenizer) -> str:
    """The Jinja chat template a GGUF carries (llama.cpp formats chat requests with it): the one the run was
    trained with. For the Alpaca templates, each user message is rendered as an instruction without input and
    each reply ends with EOS, exactly the prompt/response split of `tokenize_row`."""
    if template == "chat":
        if not tokenizer.chat_template:
            raise GemmatuneError("the run's chat template is missing from its tokenizer; cannot write it to the GGUF")
        return tokenizer.chat_template
    if template not in _ALPACA:
        raise GemmatuneError(f"template {template} has no prompt/response split; a chat model needs alpaca or chat")
    prefix, _, suffix = _ALPACA[template][1].partition("{instruction}")

    def literal(text: str) -> str:  # a Jinja string literal (escapes as in JSON; CJK text kept as it is)
        return json.dumps(text, ensure_ascii=False)

    return (
        "{{ bos_token }}{%- for message in messages -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{ {literal(prefix)} + message['content'] + {literal(suffix)} }}}}"
        "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
        "{%- endif -%}{%- endfor -%}"
    )


def ollama_template(template: str, family_template: str | None) -> str:
    """The run's template as an Ollama TEMPLATE (Go text/template; Ollama adds BOS as the GGUF says)."""
    if template == "chat":
        if family_template is None:
            raise GemmatuneError("--ollama: this model family's chat format has no Ollama template in gemmatune; "
                                 "write the Modelfile's TEMPLATE by hand")
        return family_template
    if template not in _ALPACA:
        raise GemmatuneError(f"template {template} has no prompt/response split; a chat model needs alpaca or chat")
    prefix, _, suffix = _ALPACA[template][1].partition("{instruction}")
    return f"{prefix}{{{{ .Prompt }}}}{suffix}"
