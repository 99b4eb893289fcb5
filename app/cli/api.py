"""The HTTP side of the client commands: one `ApiClient`, and `CliError` for one-line failures."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
API = "/api/v1"


class CliError(Exception):
    """A failure shown as one line on stderr (no traceback), with the exit code to leave with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _error_line(r: httpx.Response) -> str:
    """`POST /api/v1/chips/bulk: HTTP 413: <detail>` from the API's JSON error body (or its text)."""
    detail = ""
    try:
        body = r.json()
        if isinstance(body, dict):
            detail = str(body.get("detail") or "")
            errors = body.get("errors") or []
            if errors and isinstance(errors[0], dict) and errors[0].get("msg") and errors[0]["msg"] not in detail:
                loc = ".".join(str(p) for p in errors[0].get("loc", []))
                detail = f"{detail} ({loc}: {errors[0]['msg']})" if detail else f"{loc}: {errors[0]['msg']}"
    except (json.JSONDecodeError, UnicodeDecodeError):
        pass
    if not detail:
        detail = " ".join(r.text.split())[:300] or r.reason_phrase
    return f"{r.request.method} {r.request.url.path}: HTTP {r.status_code}: {detail}"


class ApiClient:
    """A faultfleet API at `url` with an API key; every non-2xx answer raises `CliError`."""

    def __init__(self, url: str | None, key: str | None, timeout: float = 120.0) -> None:
        self.url = (url or os.environ.get("FAULTFLEET_URL") or DEFAULT_URL).rstrip("/")
        key = key or os.environ.get("FAULTFLEET_API_KEY")
        if not key:
            raise CliError("no API key: pass --api-key or set FAULTFLEET_API_KEY", exit_code=2)
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, ok: tuple[int, ...] = (), **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, API + path, **kw)
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the faultfleet API at {self.url}: {exc or type(exc).__name__}") from None
        if r.is_success or r.status_code in ok:
            return r
        raise CliError(_error_line(r))

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw).json()

    def post(self, path: str, **kw: Any) -> Any:
        return self.request("POST", path, **kw).json()

    @contextmanager
    def stream(self, path: str, ok: tuple[int, ...] = (304,), **kw: Any) -> Iterator[httpx.Response]:
        """GET `path` streamed; 304 (Not Modified) is an answer too, not an error."""
        try:
            with self._http.stream("GET", API + path, **kw) as r:
                if not (r.is_success or r.status_code in ok):
                    r.read()
                    raise CliError(_error_line(r))
                yield r
        except httpx.TransportError as exc:
            raise CliError(f"cannot reach the faultfleet API at {self.url}: {exc or type(exc).__name__}") from None
