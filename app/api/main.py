from fastapi import APIRouter

from app.api.deps import document_scopes
from app.api.routes import accelerators, chips, downloads, jobs, models, plans

api_router = APIRouter()
# chips first: POST /chips is the hot path (test lines), matched before the others
api_router.include_router(document_scopes(chips.router))
api_router.include_router(document_scopes(accelerators.router))
api_router.include_router(document_scopes(jobs.router))
api_router.include_router(document_scopes(models.router))
api_router.include_router(document_scopes(plans.router))
api_router.include_router(document_scopes(downloads.router))
