from fastapi import APIRouter

from app.api.routes import accelerators, chips, jobs

api_router = APIRouter()
api_router.include_router(accelerators.router)
api_router.include_router(chips.router)
api_router.include_router(jobs.router)
