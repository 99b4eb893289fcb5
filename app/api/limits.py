"""ASGI middleware: reject request bodies over the size limit with 413 before reading them whole."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """An HTTPException, so FastAPI's body parsing re-raises it instead of answering 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than the limit of {limit} bytes")


class BodySizeLimit:
    """`overrides`: path suffix -> limit; `multipart_overrides`: the same, for multipart bodies only."""

    def __init__(
        self,
        app: ASGIApp,
        default_limit: int,
        overrides: dict[str, int],
        multipart_overrides: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.default_limit = default_limit
        self.overrides = overrides
        self.multipart_overrides = multipart_overrides or {}

    def _limit(self, scope: Scope) -> int:
        path = scope.get("path", "")
        for suffix, limit in self.overrides.items():
            if path.endswith(suffix):
                return limit
        if self.multipart_overrides:
            ctype = next((v for k, v in scope.get("headers", []) if k == b"content-type"), b"")
            if ctype.lower().startswith(b"multipart/form-data"):
                for suffix, limit in self.multipart_overrides.items():
                    if path.endswith(suffix):
                        return limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    await _reject(send, limit)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _reject(send, limit)


async def _reject(send: Send, limit: int) -> None:
    body: dict[str, Any] = {
        "detail": f"request body larger than the limit of {limit} bytes",
        "errors": [{"loc": ["body"], "msg": f"more than {limit} bytes"}],
    }
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": raw})
