"""What the client commands share: connection options, consoles, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
from rich.console import Console

from app.cli.api import ApiClient

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="FAULTFLEET_URL", help="faultfleet API base URL [default: http://127.0.0.1:8000]"),
]
KeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="FAULTFLEET_API_KEY", help="API key", show_default=False)
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def client(url: str | None, key: str | None) -> ApiClient:
    return ApiClient(url, key)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"
