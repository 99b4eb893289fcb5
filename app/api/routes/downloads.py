"""Model downloads: per group and per chip, streamed, with ETag = sha256 of the file."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response, StreamingResponse

from app.api.deps import IdPath, SessionDep, require
from app.db.models import Artifact
from app.schemas.chips import normalize_chip_id
from app.schemas.common import ERROR_RESPONSES
from app.services import plans as svc
from app.services.artifacts import iter_artifact

router = APIRouter(tags=["downloads"], responses=ERROR_RESPONSES, dependencies=[Depends(require("read"))])

Format = Literal["safetensors", "manifest", "delta"]
_FILES = {"safetensors": "model.safetensors", "manifest": "manifest.json", "delta": "model.delta.safetensors.gz"}


def _not_modified(request: Request, sha256: str) -> bool:
    tags = request.headers.get("if-none-match", "")
    return any(t.strip().strip('"') == sha256 for t in tags.split(",")) if tags else False


def content_disposition(filename: str) -> str:
    """`attachment` with the name in RFC 5987 form (any Unicode) and an ASCII fallback for old clients.

    The fallback keeps letters, digits and ``._-`` (accents stripped), so it never needs quoting
    rules a chip id could break (quotes, backslashes, non-Latin-1 characters).
    """
    unaccented = "".join(c for c in unicodedata.normalize("NFKD", filename) if not unicodedata.combining(c))
    fallback = re.sub(r"[^A-Za-z0-9._-]", "_", unaccented)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _stream(request: Request, art: Artifact, filename: str) -> Response:
    headers = {"ETag": f'"{art.sha256}"', "Content-Disposition": content_disposition(filename)}
    if _not_modified(request, art.sha256):
        return Response(status_code=304, headers=headers)
    headers["Content-Length"] = str(art.size)
    media = "application/json" if filename.endswith(".json") else art.media_type
    return StreamingResponse(iter_artifact(art.sha256), media_type=media, headers=headers)


def _bytes(request: Request, data: bytes, filename: str) -> Response:
    sha = hashlib.sha256(data).hexdigest()
    headers = {"ETag": f'"{sha}"', "Content-Disposition": content_disposition(filename)}
    if _not_modified(request, sha):
        return Response(status_code=304, headers=headers)
    return Response(data, media_type="application/json", headers=headers)


@router.get(
    "/groups/{group_id}/model",
    summary="A group's retrained model (safetensors), its manifest, or its sparse delta against the base model",
    response_class=Response,
)
def group_model(
    group_id: IdPath, request: Request, session: SessionDep, format: Format = Query(default="safetensors")
) -> Any:
    g = svc.get_group(session, group_id)
    return _stream(request, svc.group_artifact(g, format), f"group-{group_id}-{_FILES[format]}")


@router.get(
    "/chips/{chip_id}/model",
    summary="The model a chip must run: its group's, or the base model pruned for its dead PEs",
    response_class=Response,
)
def chip_model(
    chip_id: str,
    request: Request,
    session: SessionDep,
    format: Literal["safetensors", "manifest"] = Query(default="safetensors"),
    model: str | None = Query(default=None, description="base model name (default: the latest assignment)"),
) -> Any:
    chip_id = normalize_chip_id(chip_id)
    chip, a = svc.chip_assignment(session, chip_id, model)
    if format == "manifest":
        return _bytes(request, svc.chip_manifest(session, chip, a), f"{chip_id}-manifest.json")
    assert a.artifact is not None
    return _stream(request, a.artifact, f"{chip_id}-model.safetensors")
