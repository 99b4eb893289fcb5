"""`/metrics` in the Prometheus text format.

- HTTP: `faultfleet_http_requests_total{method,route,status}` and
  `faultfleet_http_request_duration_seconds{method,route}`, counted by a pure ASGI middleware
  per route template (`/api/v1/chips/{chip_id}`, never the raw path).
- Fleet figures read from the database at scrape time (`FleetCollector`): jobs by kind and
  state, queue depth, job durations, chips by state, full passes over the train split trained
  (`train_passes`). The database is shared by every API process, so these are right whichever
  process answers the scrape.
- With several uvicorn processes (`faultfleet serve --workers N`) the HTTP counters of every
  process are merged through prometheus-client's multiprocess mode: `serve` sets
  PROMETHEUS_MULTIPROC_DIR to a fresh folder under var/ before the processes start.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)

# HTTP metrics live in this process's registry (or, multiprocess, in files every process writes).
HTTP_REGISTRY = CollectorRegistry(auto_describe=True)
_registry_kw: dict[str, Any] = {} if MULTIPROC else {"registry": HTTP_REGISTRY}
REQUESTS = Counter("faultfleet_http_requests", "HTTP requests answered", ("method", "route", "status"), **_registry_kw)
LATENCY = Histogram(
    "faultfleet_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ("method", "route"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    **_registry_kw,
)


def route_template(scope: Scope) -> str:
    """The matched route's path template with its router prefix (`/api/v1/plans/{plan_id}`):
    FastAPI keeps included routes under their router and the prefix in an "effective route"."""
    effective = (scope.get("fastapi") or {}).get("effective_route_context")
    for obj in (effective, scope.get("route")):
        path = getattr(obj, "path_format", None) or getattr(obj, "path", None)
        if isinstance(path, str) and path:
            return path
    return "unmatched"


class HttpMetrics:
    """Counts every HTTP request by route template, method and status, and times it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        template: str | None = None
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, template
            if message["type"] == "http.response.start":
                status = message["status"]
                template = route_template(scope)  # while the router's scope keys are still set
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = template or route_template(scope)
            method = scope.get("method", "")
            REQUESTS.labels(method, template, str(status)).inc()
            LATENCY.labels(method, template).observe(time.perf_counter() - start)


def train_passes(s: Any) -> dict[str, float]:
    """Full passes over the train split spent, by purpose, in session `s`: the retraining
    epochs of every trained group and of every resilience map, each weighted by the share
    of the train split one of its epochs read (`train.epoch_fraction` of the group's plan,
    `meta.train.epoch_fraction` of the map; absent: 1), as `workers.pipeline.TrainConfig.passes`
    counts them."""
    from sqlalchemy import func, select

    from app.db.models import GroupRecord, PlanRecord, ResilienceMapRecord

    plan_fraction = func.coalesce(PlanRecord.params[("train", "epoch_fraction")].as_float(), 1.0)
    groups = s.scalar(
        select(func.coalesce(func.sum(GroupRecord.epochs * plan_fraction), 0.0))
        .join(PlanRecord, PlanRecord.id == GroupRecord.plan_id)
        .where(GroupRecord.model_artifact_id.is_not(None))
    )
    map_fraction = func.coalesce(ResilienceMapRecord.document[("meta", "train", "epoch_fraction")].as_float(), 1.0)
    maps = s.scalar(select(func.coalesce(func.sum(ResilienceMapRecord.training_epochs * map_fraction), 0.0)))
    return {"group_retraining": float(groups or 0.0), "resilience_map": float(maps or 0.0)}


class FleetCollector(Collector):
    """Fleet figures from the database, computed when Prometheus scrapes."""

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy import func, select

        from app.db.models import Job
        from app.db.session import get_sessionmaker
        from app.services.fleet_state import chip_state_counts

        with get_sessionmaker()() as s:
            jobs = GaugeMetricFamily("faultfleet_jobs", "Jobs by kind and state", labels=("kind", "state"))
            by_kind: dict[str, dict[str, int]] = {}
            for kind, state, n in s.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)):
                by_kind.setdefault(kind, dict.fromkeys(JOB_STATES, 0))[state] = int(n)
            for kind, states in sorted(by_kind.items()):
                for state, n in states.items():
                    jobs.add_metric((kind, state), n)
            yield jobs

            depth = GaugeMetricFamily("faultfleet_queue_depth", "Jobs queued and not yet claimed by a worker")
            depth.add_metric((), sum(states["queued"] for states in by_kind.values()))
            yield depth

            yield self._durations(s)

            chips = GaugeMetricFamily("faultfleet_chips", "Chips by retraining state", labels=("state",))
            for state, n in chip_state_counts(s).items():
                chips.add_metric((state,), n)
            yield chips

            epochs = CounterMetricFamily(
                "faultfleet_epochs_trained",
                "Full passes over the train split spent training, by purpose (a retraining epoch of a plan "
                "with train.epoch_fraction f counts f, as the plan's ledger does)",
                labels=("purpose",),
            )
            for purpose, passes in train_passes(s).items():
                epochs.add_metric((purpose,), passes)
            yield epochs

    @staticmethod
    def _durations(s: Any) -> Metric:
        from sqlalchemy import select

        from app.db.models import Job

        fam = HistogramMetricFamily(
            "faultfleet_job_duration_seconds", "Run time of finished jobs (started to finished)", labels=("kind",)
        )
        per_kind: dict[str, list[float]] = {}
        q = select(Job.kind, Job.started_at, Job.finished_at).where(
            Job.state.in_(("succeeded", "failed")), Job.started_at.is_not(None), Job.finished_at.is_not(None)
        )
        for kind, started, finished in s.execute(q):
            per_kind.setdefault(kind, []).append(max((finished - started).total_seconds(), 0.0))
        for kind, values in sorted(per_kind.items()):
            buckets = [(str(b), float(sum(1 for v in values if v <= b))) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            fam.add_metric((kind,), buckets, sum(values))
        return fam


def _render() -> bytes:
    registry = CollectorRegistry()
    if MULTIPROC:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Forward(HTTP_REGISTRY))
    registry.register(FleetCollector())
    return generate_latest(registry)


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


# Not in the OpenAPI document: an operator's endpoint (no key, like /healthz), not the API's.
router = APIRouter(include_in_schema=False)


@router.get("/metrics", response_class=Response)
async def metrics() -> Response:
    return Response(await run_in_threadpool(_render), media_type=CONTENT_TYPE_LATEST)
