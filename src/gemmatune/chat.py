"""`gemmatune chat`: a multi-turn conversation in the terminal, replies streamed token by token."""

from __future__ import annotations

import sys
from typing import TextIO

from transformers import TextStreamer

from gemmatune.infer import BASE, SamplingSettings, TunedModel

HELP = "/reset starts a new conversation, /exit quits (Ctrl-D too), Ctrl-C stops a reply"


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
                history = list(start)
                out.write("(new conversation)\n")
            else:
                out.write(f"unknown command {command}; {HELP}\n")
            continue
        turn = history + [{"role": "user", "content": line}]
        row = {"messages": turn} if multi_turn else {"instruction": line, "input": ""}
        out.write("model> ")
        out.flush()
        try:
            streamer = TerminalStreamer(tuned.tokenizer, out)
            gen = tuned.generate(row, adapter=adapter, settings=settings, streamer=streamer)[0]
        except KeyboardInterrupt:
            out.write("\n(reply stopped; it is not kept in the conversation)\n")
            continue
        if not gen.stopped:
            out.write(f"(cut at {settings.max_new_tokens} new tokens; raise --max-new-tokens for longer replies)\n")
        if multi_turn:
            history = turn + [{"role": "assistant", "content": gen.text}]
