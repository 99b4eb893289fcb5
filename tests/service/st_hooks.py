"""schemathesis hooks for tests/service/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

POST /chips/bulk takes NDJSON; its OpenAPI body is an array whose items are the lines.
"""

from __future__ import annotations

import json
from typing import Any

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(_ctx: Any, value: Any) -> bytes:
    if isinstance(value, list):
        return "".join(json.dumps(item) + "\n" for item in value).encode()
    return json.dumps(value).encode()  # negative cases: not an array, sent as one line
