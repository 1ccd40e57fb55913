"""ASGI middlewares that vet a request before the app sees it: the API key, and the
size and encoding of the body.

Plain ASGI (not Starlette's BaseHTTPMiddleware), so that streaming responses and
the detection of client disconnects pass through untouched.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse


def error_response(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status, headers=headers)


class ApiKeyMiddleware:
    """Requires `Authorization: Bearer KEY` on /v1/* (compared in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                info = ErrorInfo(message="invalid or missing API key (Authorization: Bearer KEY)",
                                 type="invalid_request_error", code="invalid_api_key")
                await error_response(401, info)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Reads the whole body first, at most `max_bytes` of it: a larger one gets 413
    (at once when Content-Length says so, else as soon as a chunked body passes the
    cap); one that is not UTF-8 (all our bodies are JSON) gets 400. The app then
    gets the body replayed, and later messages (the disconnect) as they come."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # nobody left to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as error:
            info = ErrorInfo(message=f"the request body is not valid UTF-8 ({error.reason} at byte {error.start})",
                             type="invalid_request_error")
            await error_response(400, info)(scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = ErrorInfo(message=f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                                 "(--max-request-bytes)", type="invalid_request_error", code="request_too_large")
        # The rest of the body is never read: the connection cannot be reused.
        await error_response(413, info, {"Connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
