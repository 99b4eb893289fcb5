"""Celery tasks. One task runs any job row by id; job kinds are handlers (see workers/jobs.py).

Task design: ids as arguments (never objects), ``acks_late`` (a message is acknowledged after
the work), idempotent (the job row's lease protocol makes a second delivery a no-op), progress
written to the job row.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from sqlalchemy import select

from accelerator.faults import ArrayConfig, FaultMap
from app.db.models import AcceleratorProfile, Chip
from app.services.jobs import TASK_NAME
from workers.celery_app import celery_app
from workers.jobs import JobContext, handler, run_job

log = logging.getLogger("faultfleet.worker")


@celery_app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job_task(self: Any, job_id: str) -> str:
    outcome = run_job(job_id, worker=self.request.hostname or "worker")
    log.info("job %s: %s", job_id, outcome)
    return outcome


RATE_BIN = 0.005  # fault-rate histogram bin width (0.5 % of the PEs)


def _empty_stats() -> dict[str, Any]:
    return {
        "chips": 0,
        "faults": 0,
        "invalid": [],
        "by_site": {},
        "by_bit": {},
        "rate_sum": 0.0,
        "rate_max": 0.0,
        "rate_min": None,
        "rate_hist": {},
        "by_lot": {},
        "by_profile": {},
        "pe_heat": {},
    }


@handler("fleet_stats")
def fleet_stats(ctx: JobContext) -> dict[str, Any]:
    """Fleet statistics over the stored chips, re-validating every stored map as it goes.

    Scans chips in primary-key order in batches, folding each batch into running aggregates;
    the aggregates and the last key are the checkpoint, so a resumed job neither misses nor
    double-counts a chip.
    """
    p = ctx.params
    batch = int(p.get("batch_size", 500))
    throttle = float(p.get("throttle_s", 0.0))
    cp = ctx.checkpoint or {"after": 0, "stats": _empty_stats(), "total": None}
    stats: dict[str, Any] = cp["stats"]
    after: int = cp["after"]
    resumed_from = stats["chips"]
    with ctx.engine.connect() as conn:
        profiles = {
            r.id: (r.name, ArrayConfig(r.rows, r.cols, r.fmt, r.bypass))
            for r in conn.execute(select(AcceleratorProfile))
        }
        base = select(Chip.id, Chip.chip_id, Chip.accelerator_id, Chip.lot, Chip.fault_map)
        filters = []
        if p.get("lot") is not None:
            filters.append(Chip.lot == p["lot"])
        if p.get("wafer") is not None:
            filters.append(Chip.wafer == p["wafer"])
        if p.get("accelerator") is not None:
            ids = [i for i, (n, _) in profiles.items() if n == p["accelerator"]]
            filters.append(Chip.accelerator_id.in_(ids))
        total = cp.get("total")
        if total is None:
            from sqlalchemy import func

            total = conn.execute(select(func.count()).select_from(Chip).where(*filters)).scalar_one()
    ctx.report(stats["chips"] / total if total else 0.0, f"scanned {stats['chips']} of {total} chips")
    while True:
        with ctx.engine.connect() as conn:
            rows = conn.execute(base.where(Chip.id > after, *filters).order_by(Chip.id).limit(batch)).all()
        if not rows:
            break
        for r in rows:
            name, array = profiles[r.accelerator_id]
            try:
                fm = FaultMap.from_dict(r.fault_map, array=array)
            except ValueError as exc:
                stats["invalid"].append({"chip_id": r.chip_id, "error": str(exc)})
                continue
            _fold(stats, fm, name, r.lot)
        after = rows[-1].id
        ctx.report(
            stats["chips"] / total if total else 1.0,
            f"scanned {stats['chips']} of {total} chips",
            checkpoint={"after": after, "stats": stats, "total": total},
        )
        if throttle:
            time.sleep(throttle)
    return {**_summarise(stats), "run": {"attempt": ctx.attempt, "resumed_after_chips": resumed_from}}


def _fold(stats: dict[str, Any], fm: FaultMap, profile: str, lot: str | None) -> None:
    stats["chips"] += 1
    stats["faults"] += len(fm)
    rate = fm.rate
    stats["rate_sum"] += rate
    stats["rate_max"] = max(stats["rate_max"], rate)
    stats["rate_min"] = rate if stats["rate_min"] is None else min(stats["rate_min"], rate)
    b = str(int(rate / RATE_BIN))
    stats["rate_hist"][b] = stats["rate_hist"].get(b, 0) + 1
    sites = Counter(f.site for f in fm.faults)
    for s, n in sites.items():
        stats["by_site"][s] = stats["by_site"].get(s, 0) + n
    for f in fm.faults:
        if f.bit is not None:
            k = f"{f.site}:{f.bit}"
            stats["by_bit"][k] = stats["by_bit"].get(k, 0) + 1
    key = lot if lot is not None else "(none)"
    stats["by_lot"][key] = stats["by_lot"].get(key, 0) + 1
    prof = stats["by_profile"].setdefault(
        profile, {"chips": 0, "rows": fm.array.rows, "cols": fm.array.cols, "rate_sum": 0.0}
    )
    prof["chips"] += 1
    prof["rate_sum"] += rate
    heat = stats["pe_heat"].setdefault(profile, [[0] * fm.array.cols for _ in range(fm.array.rows)])
    for r, c in fm.faulty_pes:
        heat[r][c] += 1


def _summarise(stats: dict[str, Any]) -> dict[str, Any]:
    n = stats["chips"]
    hist = {f"{int(k) * RATE_BIN:.3f}": v for k, v in sorted(stats["rate_hist"].items(), key=lambda kv: int(kv[0]))}
    profiles = {}
    for name, pr in stats["by_profile"].items():
        heat = stats["pe_heat"][name]
        worst = max(((heat[r][c], r, c) for r in range(len(heat)) for c in range(len(heat[0]))), default=(0, 0, 0))
        profiles[name] = {
            "chips": pr["chips"],
            "array": {"rows": pr["rows"], "cols": pr["cols"]},
            "mean_fault_rate": pr["rate_sum"] / pr["chips"] if pr["chips"] else 0.0,
            "hottest_pe": {"row": worst[1], "col": worst[2], "chips": worst[0]},
            "faulty_pe_counts": heat,
        }
    return {
        "chips": n,
        "faults": stats["faults"],
        "invalid_maps": stats["invalid"],
        "faults_per_chip": stats["faults"] / n if n else 0.0,
        "fault_rate": {
            "mean": stats["rate_sum"] / n if n else 0.0,
            "min": stats["rate_min"] or 0.0,
            "max": stats["rate_max"],
            "histogram": {"bin_width": RATE_BIN, "counts": hist},
        },
        "faults_by_site": stats["by_site"],
        "faults_by_site_bit": stats["by_bit"],
        "chips_by_lot": stats["by_lot"],
        "profiles": profiles,
    }
