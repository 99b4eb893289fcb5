"""schemathesis against a live server on both backends: no 5xx, every response as the OpenAPI document says.

Each backend gets a service of its own (a real uvicorn + worker), since the generated requests
register profiles, chips and models, and queue jobs that no other test should have to wait for.
The budget (`MAX_EXAMPLES` per operation and phase, a fixed seed) keeps a run near half a minute
per backend; `FAULTFLEET_ST_EXAMPLES` raises it for a deeper local run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
MAX_EXAMPLES = int(os.environ.get("FAULTFLEET_ST_EXAMPLES", "10"))
CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


@pytest.mark.parametrize("kind", ["embedded", "postgres"])
def test_schemathesis(kind: str, ff_tools: Any, tmp_path: Path) -> None:
    with ff_tools.running_service(kind, tmp_path / kind) as svc:
        env = {**svc.env, "SCHEMATHESIS_HOOKS": "tests.service.st_hooks", "PYTHONPATH": str(ROOT)}
        argv = [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{svc.base_url}/openapi.json",
            "--header",
            f"Authorization: Bearer {svc.admin_key}",
            "--checks",
            CHECKS,
            "--max-examples",
            str(MAX_EXAMPLES),
            "--seed",
            "19",
            "--no-shrink",
            # one worker: hypothesis's lambda descriptions call ast.parse, which CPython 3.11 can
            # break on from concurrent threads ("AST constructor recursion depth mismatch")
            "--workers",
            "1",
            "--request-timeout",
            "60",
            "--warnings",
            "off",
        ]
        res = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
        out = res.stdout + res.stderr
        api_log = svc.api.log_tail(6000) if svc.api else ""
        assert res.returncode == 0, f"schemathesis on {kind}:\n{out[-15000:]}\n--- API log ---\n{api_log}"
        assert "API Operations" in out, out[-5000:]  # it ran, not merely exited 0
