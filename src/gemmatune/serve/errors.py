"""The API's errors, in OpenAI's body ({"error": {"message", "type", "param", "code"}}) whatever raised them:
our own checks, FastAPI's body validation, unknown routes, and anything unexpected (logged, not shown)."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


INTERNAL = APIError(500, "internal error; the server log has the details", "server_error")


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app answers, as OpenAI's error object."""

    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        # A union field (text or parts) reports one error per member: our own checks (value_error) say most.
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON (at character {first.get('loc', ('', '?'))[-1]})"
            return JSONResponse(APIError(400, message).body(), status_code=400)
        # pydantic's location names union members too ("str", "function-after[...]"): not fields a client sent
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _union_member(p))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(APIError(400, message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        # Unknown routes (404), wrong methods (405) and bodies FastAPI cannot parse (400): OpenAI's error object
        # too, not FastAPI's {"detail": ...}.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: "no such route", 405: "method not allowed on this route"}.get(exc.status_code,
                                                                                     str(exc.detail)[:200])
        body = APIError(exc.status_code, message, code=code).body()
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_request: Request, exc: Exception):
        log.exception("request failed")
        # The exception's text stays in the server log: it may name server paths.
        return JSONResponse(INTERNAL.body(), status_code=500)


def _union_member(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "list", "dict"))


async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


