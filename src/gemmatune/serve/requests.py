"""The request bodies the API takes (OpenAI's chat and completion requests), checked as they are parsed: what
the server does not support is refused, not ignored; image and audio parts are written to files and checked as
training checks them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from gemmatune.errors import GemmatuneError
from gemmatune.serve.errors import APIError


def _encodable(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer can encode: a 400, not a 500 later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"the text holds {exc.object[exc.start:exc.end]!a}, which is not valid Unicode text "
                         "(a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]

# The request bodies. Unknown fields are ignored, as many clients send defaults (user, presence_penalty=0, ...).
class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImageURL(BaseModel):
    url: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    data: Text
    format: Literal["wav"]


class AudioPart(BaseModel):
    type: Literal["input_audio"]
    input_audio: InputAudio


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart | ImagePart | AudioPart] | None = None

    def parts(self, index: int, media_dir: Path) -> str | list[dict]:
        """The content as gemmatune's chat rows hold it: text, or text/image/audio parts whose data are written
        into `media_dir` (OpenAI's image_url data: URLs and input_audio parts) and checked as training checks
        files."""
        if not isinstance(self.content, list):
            return self.content or ""
        if all(isinstance(p, TextPart) for p in self.content):
            return "".join(p.text for p in self.content)
        return [_media_part(p, f"messages[{index}].content[{k}]", media_dir) for k, p in enumerate(self.content)]


def _media_part(part: TextPart | ImagePart | AudioPart, where: str, media_dir: Path) -> dict:
    import base64
    import binascii

    from gemmatune.data.media import check_media_file

    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        kind, url = "image", part.image_url.url
        if not url.startswith("data:") or ";base64," not in url:
            raise APIError(400, f"{where}: image_url must be a data: URL with base64 data (this server fetches "
                           "nothing)", param="messages")
        data = url.split(";base64,", 1)[1]
    else:
        kind, data = "audio", part.input_audio.data
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the {kind} data is not valid base64", param="messages") from None
    path = media_dir / (re.sub(r"\W+", "-", where).strip("-") + (".wav" if kind == "audio" else ".img"))
    path.write_bytes(raw)
    try:
        check_media_file(kind, path, where)
    except GemmatuneError as exc:
        # The checks name the file (and PIL quotes it): the client sent data, not a file, and must not learn the
        # server's temporary paths.
        message = str(exc).replace(f" {path}", "").replace(str(path), "the data").replace(str(media_dir), "")
        raise APIError(400, message, param="messages") from None
    return {"type": kind, "path": str(path)}


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch.Generator takes
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    logprobs: bool | int | None = None
    # Not supported: refused rather than ignored, since a client relying on them would get a plain answer.
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tool and function calling are not supported by this server")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v):
        if v is not None and v != "none":
            raise ValueError("tool and function calling are not supported by this server")
        return v

    @field_validator("n")
    @classmethod
    def _one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: at most 4 non-empty strings")
        return stops

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _single(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("prompt: give one string (batches of prompts are not supported)")
            return v[0]
        return v



def check_conversation(messages: list[Message], limit: int) -> None:
    """The turns a chat template can render, checked before it runs (Gemma's raises "roles must alternate"):
    system/developer messages first, then user and assistant alternating, starting and ending with the user."""
    if len(messages) > limit:
        raise APIError(400, f"messages: {len(messages)} messages; this server takes at most {limit}",
                       param="messages")
    turns = [m.role for m in messages]
    system = 0
    while system < len(turns) and turns[system] in ("system", "developer"):
        system += 1
    if system > 1:
        raise APIError(400, "messages: give at most one system (or developer) message", param="messages")
    rest = turns[system:]
    for i, role in enumerate(rest):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            where = system + i
            raise APIError(400, f"messages[{where}]: expected a {want} message, got {role}: after an optional "
                           "system message, user and assistant messages alternate, starting with the user",
                           param="messages")
    if not rest or rest[-1] != "user":
        raise APIError(400, "messages: the last message must be the user's (the reply to it is generated)",
                       param="messages")
