"""The read-only dashboard at `/`: server-rendered pages (Jinja2) and matplotlib PNGs.

A reader signs in with an API key (scope `read`) in a form; the key is kept in an HttpOnly,
SameSite=Strict cookie and checked like a Bearer key on every request. Every asset is served
by the app (no script, style or font from elsewhere); the only script is the plan page's
few lines that poll its jobs' progress.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import Principal, SessionDep, _lookup
from app.api.errors import ApiError
from app.core.config import get_settings
from app.core.security import allows
from app.dashboard import plots
from app.db.models import Chip, ChipAssignment, GroupMember, GroupRecord, PlanRecord
from app.services import plans as plansvc
from app.services.fleet_state import CHIP_STATES, chip_state_counts, chip_states, group_job_progress
from app.services.plan_costs import cost_alternatives

COOKIE = "faultfleet_key"
WAFERS_PER_PAGE = 12
CHIPS_PER_PAGE = 100
GROUPS_PER_PAGE = 20
PLANS_PER_PAGE = 50

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.globals.update(
    state_colors=plots.STATE_COLORS, states=CHIP_STATES, quote=lambda s: quote(str(s), safe="")
)
router = APIRouter(include_in_schema=False)


class LoginRequired(Exception):
    pass


async def viewer(request: Request) -> Principal:
    """The reader signed in by cookie, with scope `read`; else a redirect to the login form."""
    key = request.cookies.get(COOKIE)
    principal = await run_in_threadpool(_lookup, key, get_settings()) if key else None
    if principal is None or not allows(principal.scopes, "read"):
        raise LoginRequired
    return principal


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=5"})


def _pages(total: int, per: int) -> int:
    return max(1, math.ceil(total / per))


# --- sign in / out ------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> Response:
    return templates.TemplateResponse(request, "login.html", {"error": None})


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    form = await request.form()
    key = str(form.get("key") or "").strip()
    principal = await run_in_threadpool(_lookup, key, get_settings()) if key else None
    if principal is None or not allows(principal.scopes, "read"):
        msg = "unknown or revoked key" if principal is None else "this key lacks the 'read' scope"
        return templates.TemplateResponse(request, "login.html", {"error": msg}, status_code=401)
    resp = RedirectResponse("/", status_code=303)
    resp.set_cookie(COOKIE, key, httponly=True, samesite="strict", secure=request.url.scheme == "https")
    return resp


@router.post("/logout")
def logout() -> Response:
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE)
    return resp


# --- fleet overview -------------------------------------------------------------------------------


def _cost_to_date(s: Session) -> dict[str, float]:
    total = {"plans": 0, "retraining_epochs": 0.0, "per_chip_fat_epochs": 0.0}
    for summary in s.scalars(select(PlanRecord.summary).where(PlanRecord.status == "executed")):
        summary = summary or {}
        total["plans"] += 1
        total["retraining_epochs"] += float(summary.get("retraining_epochs") or 0)
        total["per_chip_fat_epochs"] += float(summary.get("per_chip_fat_epochs") or 0)
    return total


@router.get("/", response_class=HTMLResponse)
def overview(
    request: Request, session: SessionDep, page: int = Query(1, ge=1, le=10**6), _v: Principal = Depends(viewer)
) -> Response:
    wafer_key = (Chip.lot, Chip.wafer)
    n_wafers = int(session.scalar(select(func.count()).select_from(select(*wafer_key).distinct().subquery())) or 0)
    rows = session.execute(
        select(Chip.lot, Chip.wafer, func.count())
        .group_by(*wafer_key)
        .order_by(Chip.lot, Chip.wafer)
        .limit(WAFERS_PER_PAGE)
        .offset((page - 1) * WAFERS_PER_PAGE)
    ).all()
    wafers = []
    for lot, wafer, n in rows:
        pks = session.scalars(select(Chip.id).where(_is(Chip.lot, lot), _is(Chip.wafer, wafer))).all()
        states = chip_states(session, pks)
        counts = dict.fromkeys(CHIP_STATES, 0)
        for pk in pks:
            counts[states.get(pk, "unplanned")] += 1
        wafers.append({"lot": lot, "wafer": wafer, "chips": n, "counts": counts})
    ctx = {
        "counts": chip_state_counts(session),
        "cost": _cost_to_date(session),
        "wafers": wafers,
        "page": page,
        "pages": _pages(n_wafers, WAFERS_PER_PAGE),
        "n_wafers": n_wafers,
    }
    return templates.TemplateResponse(request, "overview.html", ctx)


def _is(col: Any, value: Any) -> Any:
    return col.is_(None) if value is None else col == value


@router.get("/dash/wafer.png")
def wafer_png(
    session: SessionDep,
    lot: str = Query("", max_length=64),
    wafer: int | None = Query(None, ge=-(2**31), le=2**31 - 1),
    _v: Principal = Depends(viewer),
) -> Response:
    lot_value = lot or None
    rows = session.execute(
        select(Chip.id, Chip.die_x, Chip.die_y).where(_is(Chip.lot, lot_value), _is(Chip.wafer, wafer))
    ).all()
    states = chip_states(session, [r[0] for r in rows])
    dies = [(x, y, states.get(pk, "unplanned")) for pk, x, y in rows]
    return _png(plots.wafer_map(dies, f"lot {lot_value or '-'} wafer {wafer if wafer is not None else '-'}"))


# --- chips ----------------------------------------------------------------------------------------


@router.get("/chips", response_class=HTMLResponse)
def chip_list(
    request: Request,
    session: SessionDep,
    lot: str = Query("", max_length=64),
    wafer: int | None = Query(None, ge=-(2**31), le=2**31 - 1),
    page: int = Query(1, ge=1, le=10**6),
    _v: Principal = Depends(viewer),
) -> Response:
    q = select(Chip)
    if lot:
        q = q.where(Chip.lot == lot)
    if wafer is not None:
        q = q.where(Chip.wafer == wafer)
    total = int(session.scalar(select(func.count()).select_from(q.subquery())) or 0)
    chips = session.scalars(q.order_by(Chip.id).limit(CHIPS_PER_PAGE).offset((page - 1) * CHIPS_PER_PAGE)).all()
    states = chip_states(session, [c.id for c in chips])
    ctx = {
        "chips": [(c, states.get(c.id, "unplanned")) for c in chips],
        "lot": lot,
        "wafer": wafer,
        "page": page,
        "pages": _pages(total, CHIPS_PER_PAGE),
        "total": total,
    }
    return templates.TemplateResponse(request, "chips.html", ctx)


def _chip(session: Session, chip_id: str) -> Chip:
    chip = session.scalar(select(Chip).where(Chip.chip_id == chip_id))
    if chip is None:
        raise ApiError(404, f"no chip {chip_id!r}", [{"loc": ["path", "chip_id"], "msg": "not found"}])
    return chip


def _assignment(session: Session, chip: Chip) -> ChipAssignment | None:
    q = select(ChipAssignment).where(ChipAssignment.chip_pk == chip.id).order_by(ChipAssignment.updated_at.desc())
    return session.scalars(q).first()


def _screening(session: Session, chip: Chip, plan_id: int | None) -> dict[str, Any] | None:
    """The chip's entry in its plan's document (screening accuracy, rate, retraining epochs), latest plan first."""
    q = (
        select(PlanRecord)
        .join(GroupRecord, GroupRecord.plan_id == PlanRecord.id)
        .join(GroupMember, GroupMember.group_id == GroupRecord.id)
        .where(GroupMember.chip_pk == chip.id)
    )
    plans = [session.get(PlanRecord, plan_id)] if plan_id is not None else []
    plans += list(session.scalars(q.order_by(PlanRecord.id.desc()).limit(1)))
    for plan in plans:
        if plan is None or plan.document is None:
            continue
        for st in plan.document.get("chips", []):
            if st.get("chip_id") == chip.chip_id:
                return {"plan_id": plan.id, **st}
    return None


@router.get("/chips/{chip_id:path}/faults.png")
def chip_faults_png(chip_id: str, session: SessionDep, _v: Principal = Depends(viewer)) -> Response:
    chip = _chip(session, chip_id)
    a = _assignment(session, chip)
    bypass = None
    if a is not None:
        bypass = plansvc.chip_bypass(chip, a.bypass, a.group.fused_map if a.group is not None else None)
    bypassed = {(int(r), int(c)) for r, c in (bypass or {}).get("pes", [])}
    arr = chip.fault_map["array"]
    title = f"{chip.chip_id}: {chip.n_faults} faults on {arr['rows']}x{arr['cols']} PEs"
    return _png(plots.fault_grid(arr["rows"], arr["cols"], chip.fault_map.get("faults", []), bypassed, title))


@router.get("/chips/{chip_id:path}/model")
def chip_model_download(chip_id: str, request: Request, session: SessionDep, _v: Principal = Depends(viewer)) -> Any:
    from app.api.routes.downloads import chip_model

    return chip_model(chip_id, request, session, format="safetensors", model=None)


@router.get("/chips/{chip_id:path}", response_class=HTMLResponse)
def chip_page(chip_id: str, request: Request, session: SessionDep, _v: Principal = Depends(viewer)) -> Response:
    chip = _chip(session, chip_id)
    a = _assignment(session, chip)
    ctx = {
        "chip": chip,
        "state": chip_states(session, [chip.id]).get(chip.id, "unplanned"),
        "assignment": a,
        "screening": _screening(session, chip, a.plan_id if a is not None else None),
        "faults": chip.fault_map.get("faults", []),
    }
    return templates.TemplateResponse(request, "chip.html", ctx)


# --- plans ----------------------------------------------------------------------------------------


@router.get("/plans", response_class=HTMLResponse)
def plan_list(
    request: Request, session: SessionDep, page: int = Query(1, ge=1, le=10**6), _v: Principal = Depends(viewer)
) -> Response:
    total = int(session.scalar(select(func.count()).select_from(PlanRecord)) or 0)
    q = select(PlanRecord).order_by(PlanRecord.id.desc()).limit(PLANS_PER_PAGE).offset((page - 1) * PLANS_PER_PAGE)
    ctx = {"plans": session.scalars(q).all(), "page": page, "pages": _pages(total, PLANS_PER_PAGE)}
    return templates.TemplateResponse(request, "plans.html", ctx)


def _plan_view(session: Session, plan_id: int) -> dict[str, Any]:
    """The plan as the API shows it, with every group and every chip state of its document (not one page)."""
    plan = plansvc.get_plan(session, plan_id)
    view = plansvc.plan_view(session, plan, groups_limit=None)
    fields = ("chip_id", "status", "screening", "effective_rate", "epochs", "group_id", "accuracy", "reason")
    view["chips"] = [{k: st.get(k) for k in fields} for st in (plan.document or {}).get("chips", [])]
    return dict(view)


@router.get("/plans/{plan_id}", response_class=HTMLResponse)
def plan_page(
    plan_id: int,
    request: Request,
    session: SessionDep,
    page: int = Query(1, ge=1, le=10**6),
    _v: Principal = Depends(viewer),
) -> Response:
    view = _plan_view(session, plan_id)
    statuses: dict[str, int] = {}
    for ch in view["chips"]:
        statuses[ch["status"]] = statuses.get(ch["status"], 0) + 1
    groups = view["groups"][(page - 1) * GROUPS_PER_PAGE : page * GROUPS_PER_PAGE]
    ctx = {
        "plan": view,
        "statuses": statuses,
        "groups": groups,
        "page": page,
        "pages": _pages(len(view["groups"]), GROUPS_PER_PAGE),
        "costs": cost_alternatives(view),
        "protected": sum(1 for g in view["groups"] if g["protect"]),
        "jobs": group_job_progress(session, plan_id),
    }
    return templates.TemplateResponse(request, "plan.html", ctx)


@router.get("/plans/{plan_id}/progress.json")
def plan_progress(plan_id: int, session: SessionDep, _v: Principal = Depends(viewer)) -> JSONResponse:
    plan = plansvc.get_plan(session, plan_id)
    return JSONResponse({"status": plan.status, "jobs": group_job_progress(session, plan_id)})


@router.get("/plans/{plan_id}/resilience.png")
def plan_resilience_png(plan_id: int, session: SessionDep, _v: Principal = Depends(viewer)) -> Response:
    from planner import AccuracyConstraint, ResilienceMap

    view = _plan_view(session, plan_id)
    if view["resilience_map_id"] is None:
        raise ApiError(409, f"plan {plan_id} has no resilience map yet", [{"loc": ["path"], "msg": "not yet"}])
    rec = plansvc.get_resilience_map(session, view["resilience_map_id"])
    if rec.document is None:
        raise ApiError(409, f"resilience map {rec.id} is {rec.status}", [{"loc": ["path"], "msg": rec.status}])
    rmap = ResilienceMap.from_dict(rec.document)
    threshold = AccuracyConstraint.from_dict(view["constraint"]).threshold(rmap.baseline)
    return _png(plots.resilience_map(rmap, threshold, view["chips"], f"plan {plan_id}: worst accuracy"))


@router.get("/plans/{plan_id}/cost.png")
def plan_cost_png(plan_id: int, session: SessionDep, _v: Principal = Depends(viewer)) -> Response:
    view = _plan_view(session, plan_id)
    return _png(
        plots.cost_bars(cost_alternatives(view), f"plan {plan_id}: training epochs against per-chip alternatives")
    )


@router.get("/plans/{plan_id}/protection", response_class=HTMLResponse)
def plan_protection(
    plan_id: int,
    request: Request,
    session: SessionDep,
    page: int = Query(1, ge=1, le=10**6),
    _v: Principal = Depends(viewer),
) -> Response:
    plan = plansvc.get_plan(session, plan_id)
    total, groups = plansvc.protected_groups(
        session, plan_id, limit=GROUPS_PER_PAGE, offset=(page - 1) * GROUPS_PER_PAGE
    )
    ctx = {"plan": plan, "groups": groups, "total": total, "page": page, "pages": _pages(total, GROUPS_PER_PAGE)}
    return templates.TemplateResponse(request, "protection.html", ctx)


# --- resilience maps ------------------------------------------------------------------------------


@router.get("/resilience-maps/{map_id}", response_class=HTMLResponse)
def resilience_map_page(
    map_id: int,
    request: Request,
    session: SessionDep,
    plan: int | None = Query(None, ge=1, le=2**31 - 1, description="draw this plan's constraint"),
    page: int = Query(1, ge=1, le=10**6),
    _v: Principal = Depends(viewer),
) -> Response:
    from planner import ResilienceMap

    rec = plansvc.get_resilience_map(session, map_id)
    total, plans = plansvc.plans_using_map(session, map_id, limit=PLANS_PER_PAGE, offset=(page - 1) * PLANS_PER_PAGE)
    if plan is None:  # the contour of the newest plan built on it
        plan = next((p.id for p in plansvc.plans_using_map(session, map_id, limit=1)[1]), None)
    rmap = ResilienceMap.from_dict(rec.document) if rec.document is not None else None
    ctx = {
        "rec": rec,
        "rmap": rmap,
        # what the worker recorded; else what the grid implies (one run of the largest epochs per sampled map)
        "cost": rec.training_epochs if rec.training_epochs is not None else (rmap.training_epochs if rmap else None),
        "plans": plans,
        "total": total,
        "contour_plan": plan,
        "page": page,
        "pages": _pages(total, PLANS_PER_PAGE),
    }
    return templates.TemplateResponse(request, "resilience_map.html", ctx)


@router.get("/resilience-maps/{map_id}/heatmap.png")
def resilience_map_png(
    map_id: int,
    session: SessionDep,
    plan: int | None = Query(None, ge=1, le=2**31 - 1),
    _v: Principal = Depends(viewer),
) -> Response:
    from planner import AccuracyConstraint, ResilienceMap

    rec = plansvc.get_resilience_map(session, map_id)
    if rec.document is None:
        raise ApiError(409, f"resilience map {rec.id} is {rec.status}", [{"loc": ["path"], "msg": rec.status}])
    rmap = ResilienceMap.from_dict(rec.document)
    threshold = None
    if plan is not None:
        threshold = AccuracyConstraint.from_dict(plansvc.get_plan(session, plan).constraint).threshold(rmap.baseline)
    return _png(plots.resilience_map(rmap, threshold, [], f"map {rec.id}: worst accuracy"))


@router.get("/groups/{group_id}/fused.png")
def group_fused_png(group_id: int, session: SessionDep, _v: Principal = Depends(viewer)) -> Response:
    g = plansvc.get_group(session, group_id)
    fm = g.fused_map
    arr = fm["array"]
    dead = {(f["row"], f["col"]) for f in fm.get("faults", []) if f["site"] == "pe"}
    title = f"group {g.id}: fused map of {len(g.members)} chips, rate {g.fused_rate:.3f}"
    return _png(plots.fault_grid(arr["rows"], arr["cols"], fm.get("faults", []), dead, title))


def install(app: Any) -> None:
    """Mount the dashboard on `app` (its routes are not in the OpenAPI document)."""

    async def to_login(_request: Request, _exc: Exception) -> Response:
        return RedirectResponse("/login", status_code=303)

    app.add_exception_handler(LoginRequired, to_login)
    app.include_router(router)
