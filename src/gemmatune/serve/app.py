"""`gemmatune serve`: an OpenAI-compatible HTTP API over a base model and its adapters, plus the run page.

The request's `model` names the adapter (or `base`); concurrent requests are answered in mixed-adapter
batches (gemmatune.serve.batching). Routes: /v1/models, /v1/chat/completions, /v1/completions (streamed as
server-sent events when `stream` is true), /health, and the page of gemmatune.serve.page under /.

A completion prompt is answered like `gemmatune generate --prompt`: as an instruction in the adapter's
template, so both give the same text. Chat messages go through the chat template; an adapter trained on
an Alpaca template answers the last user message alone (its template has no turns), as `gemmatune chat` does.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import shutil
import tempfile
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from gemmatune.data.templates import conversation_row, prompt_ids
from gemmatune.errors import GemmatuneError
from gemmatune.infer.model import BASE, TunedModel
from gemmatune.serve.batching import Batcher, Job, Result
from gemmatune.serve.errors import INTERNAL, APIError, add_error_handlers, send_error
from gemmatune.serve.requests import AudioPart, ChatRequest, CompletionRequest, ImagePart, check_conversation

log = logging.getLogger(__name__)


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # a request body larger than this gets 413
    max_tokens: int = 2048  # the largest max_tokens a request may ask for (also the default)
    max_prompt_tokens: int = 8192
    max_batch: int = 16  # rows per forward pass
    max_messages: int = 256  # a chat's messages: rendering them is quadratic in their number (turn-by-turn split)


class Service:
    """What the routes share: the model, its batcher, the names and the limits."""

    def __init__(self, tuned: TunedModel, base_name: str, limits: Limits, api_key: str | None):
        self.tuned = tuned
        self.base_name = base_name
        self.limits = limits
        self.api_key = api_key
        self.created = int(time.time())
        self.batcher: Batcher | None = None
        # Prompts are checked here, in the event loop, while the worker thread encodes and decodes with the
        # model's tokenizer: a copy of its own keeps the two from sharing one Rust tokenizer across threads.
        self.tokenizer = copy.deepcopy(tuned.tokenizer)

    def start(self) -> None:
        self.batcher = Batcher(self.tuned, self.limits.max_batch)
        self.batcher.start()

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.close(timeout=60)

    def model_list(self) -> dict:
        base = {"id": BASE, "object": "model", "created": self.created, "owned_by": "gemmatune",
                "root": self.base_name, "parent": None}
        adapters = [{"id": name, "object": "model", "created": self.created, "owned_by": "gemmatune",
                     "root": name, "parent": BASE} for name in self.tuned.adapters]
        return {"object": "list", "data": [base, *adapters]}

    def adapter(self, model: str) -> str:
        if model == BASE or model in self.tuned.adapters:
            return model
        raise APIError(404, f"The model '{model}' does not exist; served: {', '.join([BASE, *self.tuned.adapters])}",
                       param="model", code="model_not_found")

    def job(self, req, row: dict, emit, media_dir: Path | None = None) -> tuple[Job, asyncio.Future]:
        """Queue a request; `media_dir` (its image/audio files) belongs to the job from here on."""
        try:
            return self._job(req, row, emit, media_dir)
        except BaseException:
            if media_dir is not None:
                shutil.rmtree(media_dir, ignore_errors=True)
            raise

    def _job(self, req, row: dict, emit, media_dir: Path | None) -> tuple[Job, asyncio.Future]:
        adapter = self.adapter(req.model)
        max_tokens = req.max_completion_tokens or req.max_tokens or self.limits.max_tokens
        if max_tokens > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_tokens}; this server allows at most {self.limits.max_tokens}",
                           param="max_tokens")
        from jinja2 import TemplateError

        try:
            ids = prompt_ids(row, self.tuned.template_for(adapter), self.tokenizer, self.tuned.media_tokens_for(row))
        except GemmatuneError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        except TemplateError as exc:  # the tokenizer's own template refused the conversation
            raise APIError(400, f"messages: the chat template cannot render them ({str(exc)[:200]})",
                           param="messages") from None
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server allows at most "
                           f"{self.limits.max_prompt_tokens}", param="messages")
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def done(result: Result | BaseException) -> None:
            def settle() -> None:
                if future.done():
                    return
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(settle)

        threadsafe_emit = None
        if emit is not None:
            def threadsafe_emit(text: str) -> None:
                loop.call_soon_threadsafe(emit, text)

        job = Job(row=row, adapter=adapter, max_tokens=max_tokens, greedy=req.temperature == 0,
                  temperature=req.temperature or 1.0, top_p=req.top_p, seed=req.seed, stop=list(req.stop or []),
                  emit=threadsafe_emit, done=done, prompt_ids=ids, media_dir=media_dir)
        assert self.batcher is not None
        self.batcher.submit(job)
        return job, future


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def create_app(tuned: TunedModel, base_name: str = "base", limits: Limits | None = None, api_key: str | None = None,
               runs_dir: str | Path | None = None):
    """The ASGI app: FastAPI routes inside a guard that checks the API key and the body size first."""
    service = Service(tuned, base_name, limits or Limits(), api_key)

    @asynccontextmanager
    async def lifespan(_app):
        service.start()
        yield
        service.stop()  # uvicorn has let in-flight requests finish before this
        log.info("stopped; every request in flight was answered")

    app = FastAPI(title="gemmatune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    add_error_handlers(app)
    _add_routes(app, service)
    if runs_dir is not None:
        from gemmatune.serve.page import add_run_page

        add_run_page(app, Path(runs_dir))
    return Guard(app, service)


def _add_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health():
        return {"status": "ok", **(service.batcher.status() if service.batcher else {})}

    @app.get("/v1/models")
    async def models():
        return service.model_list()

    @app.get("/v1/models/{name}")
    async def model(name: str):
        service.adapter(name)
        return next(m for m in service.model_list()["data"] if m["id"] == name)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        adapter = service.adapter(req.model)
        check_conversation(req.messages, service.limits.max_messages)
        has_media = any(isinstance(p, (ImagePart, AudioPart)) for m in req.messages if isinstance(m.content, list)
                        for p in m.content)
        media_dir = Path(tempfile.mkdtemp(prefix="gemmatune-serve-")) if has_media else None
        try:
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.parts(i, media_dir)}
                        for i, m in enumerate(req.messages)]
            row = conversation_row(messages, service.tuned.template_for(adapter))
        except BaseException as exc:
            if media_dir is not None:
                shutil.rmtree(media_dir, ignore_errors=True)
            if isinstance(exc, GemmatuneError):
                raise APIError(400, str(exc), param="messages") from None
            raise
        return await _answer(service, req, row, request, "chat.completion", media_dir)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        row = {"instruction": req.prompt, "input": ""}
        return await _answer(service, req, row, request, "text_completion")


async def _answer(service: Service, req, row: dict, request: Request, kind: str, media_dir: Path | None = None):
    """The reply to one request: one JSON body, or server-sent events as the text is generated (`req.stream`)."""
    rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if req.stream:
        pieces: asyncio.Queue[str] = asyncio.Queue()
        job, future = service.job(req, row, pieces.put_nowait, media_dir)
        events = _Events(req, rid, created, kind)
        return StreamingResponse(events.stream(job, future, pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    job, future = service.job(req, row, None, media_dir)
    while not future.done():
        await asyncio.wait({future}, timeout=0.5)
        if not future.done() and await request.is_disconnected():
            job.cancelled = True  # its row stops taking part in the batch
            return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
    result: Result = future.result()
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": result.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
    return {"id": rid, "object": kind, "created": created, "model": req.model, "choices": [choice],
            "usage": _usage(result)}


class _Events:
    """A streamed reply as OpenAI's server-sent chunks."""

    def __init__(self, req, rid: str, created: int, kind: str):
        self.req, self.rid, self.created, self.kind = req, rid, created, kind
        self.chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        self.include_usage = bool((req.stream_options or {}).get("include_usage"))

    def chunk(self, delta: str | None, finish: str | None, first: bool = False) -> str:
        if self.kind == "chat.completion":
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta is not None:
                d["content"] = delta
            choice = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        body = {"id": self.rid, "object": self.chunk_kind, "created": self.created, "model": self.req.model,
                "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def stream(self, job: Job, future: asyncio.Future, pieces: asyncio.Queue):
        try:
            if self.kind == "chat.completion":
                yield self.chunk(None, None, first=True)
            while True:
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield self.chunk(getter.result(), None)
                    continue
                getter.cancel()
                break
            while not pieces.empty():
                yield self.chunk(pieces.get_nowait(), None)
            if future.exception() is not None:
                yield f"data: {json.dumps(INTERNAL.body())}\n\n"  # the text is in the server log
                return
            result: Result = future.result()
            yield self.chunk(None if self.kind == "chat.completion" else "", result.finish_reason)
            if self.include_usage:
                body = {"id": self.rid, "object": self.chunk_kind, "created": self.created, "model": self.req.model,
                        "choices": [], "usage": _usage(result)}
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled = not future.done()  # the client left: its row's output is dropped


class Guard:
    """Pure ASGI, outside FastAPI: the API key (every route but the page's static files, which hold no data)
    and the body size, checked before a byte of the body is read."""

    def __init__(self, app, service: Service):
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        key = self.service.api_key
        if key and not _is_page_asset(path):
            given = headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return await send_error(send, APIError(401, "Incorrect or missing API key: send 'Authorization: "
                                                        "Bearer KEY'", code="invalid_api_key"))
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None or not length.isdigit():
                return await send_error(send, APIError(411, "send the body with a Content-Length header"))
            limit = self.service.limits.max_body_bytes
            if int(length) > limit:
                return await send_error(send, APIError(413, f"the body is {length} bytes; this server allows at "
                                                        f"most {limit}"))
        return await self.app(scope, receive, send)


def _is_page_asset(path: str) -> bool:
    return path == "/" or path.startswith("/static/")


def serve(tuned: TunedModel, base_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, runs_dir: str | Path | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; uvicorn lets in-flight requests finish before it stops."""
    import uvicorn
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who reaches this address can use the model", host)
    app = create_app(tuned, base_name, limits, api_key, runs_dir)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=120,
                            lifespan="on")
    server = uvicorn.Server(config)
    log.info("serving %s on http://%s:%d (models: %s)", base_name, host, port,
             ", ".join([BASE, *tuned.adapters]))
    server.run()
