"""`gemmatune chat`: a multi-turn conversation in the terminal, replies streamed token by token."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from transformers import TextStreamer

from gemmatune.data.templates import conversation_row
from gemmatune.infer.model import BASE, SamplingSettings, TunedModel

HELP = ("/reset starts a new conversation, /exit quits (Ctrl-D too), Ctrl-C stops a reply; with a multimodal model, "
        "/image FILE and /audio FILE attach a file to your next message")


class TerminalStreamer(TextStreamer):
    """Writes new text to `out` as tokens arrive, skipping the prompt and special tokens."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def chat_loop(tuned: TunedModel, adapter: str, settings: SamplingSettings, system: str | None = None,
              read=input, out: TextIO = sys.stdout) -> int:
    """Read a line, answer it streaming, keep the history; returns the exit code."""
    template = tuned.template_for(adapter)
    multi_turn = template == "chat"
    who = "the base model" if adapter == BASE else f"adapter '{adapter}'"
    out.write(f"Chatting with {who} (template {template}). {HELP}.\n")
    if not multi_turn:
        out.write(f"Template {template} has no turns: each message is answered on its own.\n")
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    start = list(history)
    attached: list[dict] = []  # image/audio parts for the next message
    while True:
        try:
            line = read("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        if not line:
            continue
        if line.startswith("/"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                history, attached = list(start), []
                out.write("(new conversation)\n")
            elif command in ("/image", "/audio"):
                part = _attach(tuned, command[1:], line[len(command):].strip(), multi_turn)
                if isinstance(part, str):
                    out.write(part + "\n")
                else:
                    attached.append(part)
                    out.write(f"({command[1:]} {part['path']} goes with your next message)\n")
            else:
                out.write(f"unknown command {command}; {HELP}\n")
            continue
        content = [*attached, {"type": "text", "text": line}] if attached else line
        turn = history + [{"role": "user", "content": content}]
        row = conversation_row(turn, template)
        out.write("model> ")
        out.flush()
        try:
            streamer = TerminalStreamer(tuned.tokenizer, out)
            gen = tuned.generate(row, adapter=adapter, settings=settings, streamer=streamer)[0]
        except KeyboardInterrupt:
            out.write("\n(reply stopped; it is not kept in the conversation)\n")
            continue
        attached = []
        if not gen.stopped:
            out.write(f"(cut at {settings.max_new_tokens} new tokens; raise --max-new-tokens for longer replies)\n")
        if multi_turn:
            history = turn + [{"role": "assistant", "content": gen.text}]


def _attach(tuned: TunedModel, kind: str, path: str, multi_turn: bool) -> dict | str:
    """The part for `/image FILE` or `/audio FILE`, or the line that says why not (the chat goes on)."""
    from gemmatune.data.media import check_media_file
    from gemmatune.errors import GemmatuneError

    if tuned.processor is None or not multi_turn:
        return f"this model takes no {kind} here: it needs a multimodal model (e.g. Gemma 3n) and the chat template"
    if not path:
        return f"usage: /{kind} FILE"
    file = Path(path).expanduser().resolve()
    try:
        check_media_file(kind, file, f"/{kind}")
    except GemmatuneError as exc:
        return str(exc)
    return {"type": kind, "path": str(file)}
