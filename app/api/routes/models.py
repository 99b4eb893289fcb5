"""Base models: register (train on a worker, or upload weights and/or a dataset), read."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from app.api.deps import Principal, SessionDep, SettingsDep, require
from app.api.errors import ApiError
from app.core.config import get_settings
from app.core.queue import get_celery, require_broker
from app.schemas.common import ERROR_RESPONSES
from app.schemas.plans import LibraryOut, ModelAccepted, ModelIn, ModelOut
from app.services import jobs as jobsvc
from app.services import plans as svc
from app.services.artifacts import store_bytes
from app.services.library import library_view

router = APIRouter(prefix="/models", tags=["models"], responses=ERROR_RESPONSES)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _request_body_doc() -> dict[str, Any]:
    """The body POST /models takes, as parsed by hand below: JSON (train on a worker) or multipart (upload)."""
    fields = ModelIn.model_json_schema()
    as_json = {**fields, "required": [*fields["required"], "train"]}
    as_json["properties"] = {
        **fields["properties"],
        "train": {"const": True, "description": "JSON registers by training"},
    }
    binary = {"type": "string", "format": "binary"}
    form = {
        **fields,
        "properties": {
            **fields["properties"],
            "weights": {**binary, "description": f"safetensors or a state_dict; file name ending {WEIGHT_SUFFIXES}"},
            "dataset_file": {**binary, "description": ".npz with x_train, y_train, x_test, y_test (no object arrays)"},
        },
        "description": "exactly one of: a 'weights' file, or train=true (both is a 422)",
        "anyOf": [
            {"required": ["weights"], "properties": {"train": {"const": False}}},
            {"required": ["train"], "properties": {"train": {"const": True}}},
        ],
    }
    return {
        "required": True,
        "content": {"application/json": {"schema": as_json}, "multipart/form-data": {"schema": form}},
    }


def _validation_error(exc: ValidationError) -> ApiError:
    errors = [{"loc": ["body", *e["loc"]], "msg": e["msg"]} for e in exc.errors()]
    first = errors[0]
    return ApiError(422, f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}", errors)


def _check_dataset_size(path: Path) -> None:
    """Refuse an .npz whose arrays, as its headers state them, inflate past the configured caps."""
    import accelerator as acc

    settings = get_settings()
    try:
        arrays = acc.npz_arrays(path)
    except ValueError as exc:
        raise ApiError(422, f"dataset_file: {exc}", [{"loc": ["body", "dataset_file"], "msg": str(exc)}]) from None
    for total, cap, setting, unit in (
        (sum(a.nbytes for a in arrays), settings.max_dataset_bytes, "max_dataset_bytes", "bytes"),
        (sum(a.elements for a in arrays), settings.max_dataset_elements, "max_dataset_elements", "elements"),
    ):
        if total > cap:
            msg = (
                f"dataset_file: its arrays hold {total} {unit} once decompressed, more than {setting} "
                f"({cap}; FAULTFLEET_{setting.upper()})"
            )
            raise ApiError(413, msg, [{"loc": ["body", "dataset_file"], "msg": msg}])


def _check_weights_size(path: Path) -> None:
    """Refuse a weights file that, as its zip directory states it, inflates past max_weights_bytes."""
    import accelerator as acc

    cap = get_settings().max_weights_bytes
    try:
        total = acc.weights_file_bytes(path)
    except ValueError as exc:
        msg = f"weights: {exc}"
        raise ApiError(422, msg, [{"loc": ["body", "weights"], "msg": msg}]) from None
    if total > cap:
        msg = (
            f"weights: the file holds {total} bytes once decompressed ({path.stat().st_size} uploaded), "
            f"more than max_weights_bytes ({cap}; FAULTFLEET_MAX_WEIGHTS_BYTES)"
        )
        raise ApiError(413, msg, [{"loc": ["body", "weights"], "msg": msg}])


def _check_uploads(body: ModelIn, weights: bytes | None, weights_suffix: str, npz: bytes | None) -> None:
    """Load the uploads the way a worker will, so bad files fail here with a 422, not later in a job."""
    import accelerator as acc

    with tempfile.TemporaryDirectory() as d:
        if npz is not None:
            path = Path(d) / "data.npz"
            path.write_bytes(npz)
            _check_dataset_size(path)
            try:
                data = acc.load_dataset(body.dataset, path)
            except Exception as exc:
                raise ApiError(
                    422, f"dataset_file: {exc}", [{"loc": ["body", "dataset_file"], "msg": str(exc)}]
                ) from None
        else:
            data = acc.load_dataset(body.dataset)
        if weights is not None:
            path = Path(d) / f"weights{weights_suffix}"
            path.write_bytes(weights)
            _check_weights_size(path)
            try:
                acc.load_model(body.architecture, path, data.input_shape, data.num_classes)
            except Exception as exc:
                msg = f"weights: cannot be loaded into {body.architecture} for {data.name}: {exc}"
                raise ApiError(422, msg, [{"loc": ["body", "weights"], "msg": msg}]) from None


async def _read_form(request: Request) -> tuple[dict[str, Any], UploadFile | None, UploadFile | None]:
    try:
        form = await request.form()
    except Exception as exc:
        raise ApiError(400, f"malformed multipart body: {exc}", [{"loc": ["body"], "msg": str(exc)}]) from None
    fields: dict[str, Any] = {}
    files: dict[str, UploadFile] = {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            files[key] = value
        else:
            fields[key] = value
    unknown = set(files) - {"weights", "dataset_file"}
    if unknown:
        msg = f"unknown file field(s) {sorted(unknown)}: expected 'weights' and/or 'dataset_file'"
        raise ApiError(422, msg, [{"loc": ["body", sorted(unknown)[0]], "msg": msg}])
    return fields, files.get("weights"), files.get("dataset_file")


@router.post(
    "",
    status_code=202,
    response_model=ModelAccepted,
    summary="Register a base model: JSON with train=true, or multipart with a 'weights' file "
    "(safetensors or state_dict) and/or a 'dataset_file' (.npz with x_train, y_train, x_test, y_test)",
    openapi_extra={"requestBody": _request_body_doc()},
)
async def register_model(
    request: Request, settings: SettingsDep, principal: Principal = Depends(require("plan"))
) -> Any:
    ctype = request.headers.get("content-type", "")
    weights: bytes | None = None
    npz: bytes | None = None
    suffix = ".safetensors"
    multipart = ctype.startswith("multipart/form-data")
    if multipart:
        fields, wfile, dfile = await _read_form(request)
        if wfile is not None:
            suffix = Path(wfile.filename or "").suffix.lower() or ".safetensors"
            if suffix not in WEIGHT_SUFFIXES:
                msg = f"weights: file name must end in one of {list(WEIGHT_SUFFIXES)}, got {wfile.filename!r}"
                raise ApiError(422, msg, [{"loc": ["body", "weights"], "msg": msg}])
            weights = await wfile.read()
        if dfile is not None:
            npz = await dfile.read()
        raw: Any = fields
    else:
        try:
            raw = await request.json()
        except Exception:
            raise ApiError(400, "malformed JSON body", [{"loc": ["body"], "msg": "invalid JSON"}]) from None
    try:
        # form fields are text ("10", "true"): parsed; JSON keeps its types (strict: `true` is no 1)
        body = ModelIn.model_validate(raw, strict=not multipart)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if weights is None and not body.train:
        msg = "no weights: upload a 'weights' file (multipart) or set train=true to train on a worker"
        raise ApiError(422, msg, [{"loc": ["body", "train"], "msg": msg}])
    if weights is not None and body.train:
        msg = "train=true and an uploaded 'weights' file exclude each other"
        raise ApiError(422, msg, [{"loc": ["body", "train"], "msg": msg}])
    svc.check_architecture(body.architecture)
    svc.check_dataset_name(body.dataset, uploaded=npz is not None)
    await run_in_threadpool(_check_uploads, body, weights, suffix, npz)
    await run_in_threadpool(require_broker)
    return await run_in_threadpool(_create, body, weights, suffix, npz, settings, principal)


def _create(
    body: ModelIn, weights: bytes | None, suffix: str, npz: bytes | None, settings: Any, principal: Principal
) -> Any:
    from app.db.session import get_sessionmaker

    with get_sessionmaker()() as session:
        config: dict[str, Any] = {"seed": body.seed}
        if body.train:
            config.update(train=True, epochs=body.epochs, lr=body.lr, batch_size=body.batch_size)
        # checks first (404/409), then blobs, then rows + job in one commit: nothing partial
        svc.check_new_model(session, body.name, body.accelerator)
        if weights is not None:
            config.update(
                uploaded_weights_sha256=store_bytes(
                    session, weights, "upload_weights", "application/octet-stream"
                ).sha256,
                weights_suffix=suffix,
            )
        if npz is not None:
            config["dataset_sha256"] = store_bytes(session, npz, "upload_dataset", "application/octet-stream").sha256
        bm = svc.new_model(
            session,
            name=body.name,
            architecture=body.architecture,
            dataset=body.dataset,
            accelerator=body.accelerator,
            config=config,
        )
        return _queue_registration(session, settings, principal, bm)


@router.post(
    "/{model}/retry",
    status_code=202,
    response_model=ModelAccepted,
    summary="Run a failed registration again (a new job)",
)
def retry_model(
    model: str, session: SessionDep, settings: SettingsDep, principal: Principal = Depends(require("plan"))
) -> Any:
    require_broker()  # as every submission: 503 before anything is written while the broker is down
    return _queue_registration(session, settings, principal, svc.retry_model(session, model))


def _queue_registration(session: Any, settings: Any, principal: Principal, bm: Any) -> dict[str, Any]:
    """Commit a registration job for `bm`, publish it, and answer as `POST /models` does (202)."""
    job = jobsvc.create_job(
        session, "register_model", {"model_id": bm.id}, subject=f"model:{bm.id}", created_by=principal.key_prefix
    )
    session.commit()
    jobsvc.enqueue(job.id, get_celery(), settings)
    session.refresh(bm)
    return {"model": svc.model_view(bm), "job": jobsvc.job_view(job)}


@router.get("/{model}/library", response_model=LibraryOut, dependencies=[Depends(require("read"))])
def get_model_library(model: str, session: SessionDep) -> Any:
    """Every verified model of the base model that chips may run, and how many chips each serves."""
    return library_view(session, svc.get_model(session, model))


@router.get("/{model}", response_model=ModelOut, dependencies=[Depends(require("read"))])
def get_model(model: str, session: SessionDep) -> Any:
    return svc.model_view(svc.get_model(session, model))
