"""The ASGI app: ``uvicorn app.main:app`` (or ``faultfleet serve``)."""

from __future__ import annotations

import gc
import logging

from fastapi import FastAPI

from app.api import errors, metrics
from app.api.deps import document_security_schemes
from app.api.limits import BodySizeLimit
from app.api.main import api_router
from app.api.routes import health
from app.core.config import get_settings
from app.dashboard import routes as dashboard

API_PREFIX = "/api/v1"


def create_app() -> FastAPI:
    settings = get_settings()
    settings.ensure_dirs()
    app = FastAPI(
        title="faultfleet",
        version="0.1.0",
        description="Fault-aware retraining for fleets of faulty systolic-array accelerator chips. "
        "Every /api/v1 route needs an API key (`Authorization: Bearer <key>` or `X-API-Key`).",
        openapi_url="/openapi.json",
        docs_url="/docs",
    )
    errors.install(app)
    app.add_middleware(
        BodySizeLimit,
        default_limit=settings.max_body_bytes,
        overrides={"/chips/bulk": settings.max_bulk_bytes},
        # uploads of weights and datasets; a JSON registration is small and has the normal limit
        multipart_overrides={"/models": settings.max_upload_bytes},
    )
    # outermost: counts every answer, the body-size limit's 413s included
    app.add_middleware(metrics.HttpMetrics)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(api_router, prefix=API_PREFIX)
    dashboard.install(app)
    document_security_schemes(app)
    dashboard.install(app)
    logging.getLogger("faultfleet").setLevel(logging.INFO)
    return app


app = create_app()
# Everything built so far (framework, ORM metadata, routes) lives as long as the process: keep it
# out of the cyclic GC's generations, so that a full collection does not scan it and pause
# every request in flight for tens of milliseconds.
gc.freeze()
