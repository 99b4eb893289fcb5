from fastapi import APIRouter

from app.api.routes import accelerators, chips, downloads, jobs, models, plans

api_router = APIRouter()
# chips first: POST /chips is the hot path (test lines), matched before the others
api_router.include_router(chips.router)
api_router.include_router(accelerators.router)
api_router.include_router(jobs.router)
api_router.include_router(models.router)
api_router.include_router(plans.router)
api_router.include_router(downloads.router)
