"""The auth matrix, walked over every operation of the live OpenAPI document.

Each /api/v1 operation states its scope (`x-required-scope`); with no key, an unknown key (in
either header) it answers 401, with a key of any other scope 403, and with its own scope
neither (the body sent is invalid on purpose, so nothing is written).
"""

from __future__ import annotations

from typing import Any

import pytest

from app.core.security import SCOPES

pytestmark = pytest.mark.integration

JUNK_BODY = {"not_a_field": 1}


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if method in ("get", "post", "put", "patch", "delete"):
                ops.append((method.upper(), path, op))
    return ops


def _concrete(path: str, op: dict[str, Any]) -> str:
    for p in op.get("parameters", []):
        if p["in"] == "path":
            value = "1" if p["schema"].get("type") == "integer" else "x"
            path = path.replace("{" + p["name"] + "}", value)
    return path


def _send(c: Any, method: str, path: str, headers: dict[str, str] | None = None) -> Any:
    kw: dict[str, Any] = {"headers": headers or {}}
    if method in ("POST", "PUT", "PATCH"):
        kw["json"] = JUNK_BODY
    return c.request(method, path, **kw)


def test_every_operation_walks_the_auth_matrix(service: Any) -> None:
    keys = {scope: service.create_key(scope) for scope in SCOPES if scope != "admin"}
    with service.client("") as anon:
        doc = anon.get("/openapi.json").json()
    ops = [(m, p, op) for m, p, op in _operations(doc) if p.startswith("/api/v1/")]
    assert len(ops) >= 19, [f"{m} {p}" for m, p, _ in ops]
    assert doc["components"]["securitySchemes"].keys() == {"bearer", "apiKey"}
    problems: list[str] = []
    with service.client("") as c:
        for method, path, op in ops:
            scope = op.get("x-required-scope")
            if scope not in SCOPES:
                problems.append(f"{method} {path}: states no scope ({scope!r})")
                continue
            url = _concrete(path, op)
            for name, headers in (
                ("no key", {}),
                ("unknown bearer key", {"Authorization": "Bearer ff_not-a-key-of-this-service"}),
                ("unknown X-API-Key", {"X-API-Key": "ff_not-a-key-of-this-service"}),
                ("bearer without a key", {"Authorization": "Bearer"}),
                ("another scheme", {"Authorization": f"Basic {keys['read']}"}),
            ):
                r = _send(c, method, url, headers)
                if r.status_code != 401 or not r.json().get("detail"):
                    problems.append(f"{method} {url} with {name}: {r.status_code} {r.text[:200]}")
                elif "www-authenticate" not in r.headers:
                    problems.append(f"{method} {url} with {name}: 401 without WWW-Authenticate")
            for other, key in keys.items():
                r = _send(c, method, url, {"Authorization": f"Bearer {key}"})
                if other == scope:
                    if r.status_code in (401, 403):
                        problems.append(f"{method} {url} with its own scope {scope!r}: {r.status_code} {r.text[:200]}")
                elif r.status_code != 403 or scope not in r.json()["detail"]:
                    problems.append(f"{method} {url} (needs {scope!r}) with {other!r}: {r.status_code} {r.text[:200]}")
                r = _send(c, method, url, {"X-API-Key": key})  # the other header, same verdict
                if (other == scope) == (r.status_code in (401, 403)):
                    problems.append(f"{method} {url} with X-API-Key of {other!r}: {r.status_code}")
    assert not problems, "\n".join(problems)
