"""Prometheus figures at `GET /metrics`.

Request latency and ingested feedback are counted in the process that served the request (set
`PROMETHEUS_MULTIPROC_DIR` when one api runs several worker processes, and they are merged at scrape time).
Jobs by kind and status, and job durations, are read from the database at scrape time: the jobs run in the
worker, so no api process sees them change, and the database is the one place every process agrees on.
Those two are therefore the same on every api replica: aggregate them across replicas with max, not sum.
"""

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.dependencies import requires
from app.auth.scopes import Scope as KeyScope
from app.db import get_session_factory
from app.domain import FINISHED_JOB_STATUSES
from app.tables import Job

log = logging.getLogger(__name__)

REQUEST_LATENCY = Histogram(
    "magtune_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template, method and status code",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
FEEDBACK_INGESTED = Counter(
    "magtune_feedback_ingested_total", "Feedback pairs stored, by label (1 same, 0 different)", ["label"]
)
JOB_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
UNMATCHED_ROUTE = "unmatched"


def record_feedback_ingested(label: int, count: int = 1) -> None:
    """Count newly stored feedback pairs (not replays of an idempotent request)."""
    if count > 0:
        FEEDBACK_INGESTED.labels(label=str(label)).inc(count)


class RequestMetricsMiddleware:
    """Observe every request's latency under its route template, so ids do not explode the label set."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            REQUEST_LATENCY.labels(
                route=route_template(scope), method=scope["method"], status=str(status)
            ).observe(time.perf_counter() - started)


def route_template(scope: Scope) -> str:
    """The matched route's path template, with the prefixes of the routers that include it.

    The route in the scope may carry only its own router's part of the path (FastAPI resolves included
    routers lazily), so the prefix is taken from the request path: the segments before the template's own.
    """
    template = getattr(scope.get("route"), "path", None)
    if not template:
        return UNMATCHED_ROUTE
    own = template.strip("/").split("/") if template.strip("/") else []
    requested = scope["path"].strip("/").split("/")
    prefix = requested[: max(len(requested) - len(own), 0)]
    return "/" + "/".join([*prefix, *own])


def _job_seconds(session: Session) -> ColumnElement[float]:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


class JobsCollector(Collector):
    """`magtune_jobs` (gauge) and `magtune_job_duration_seconds` (histogram of finished jobs), from SQL."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def _families(self) -> tuple[GaugeMetricFamily, HistogramMetricFamily]:
        jobs = GaugeMetricFamily("magtune_jobs", "Jobs by kind and status", labels=["kind", "status"])
        durations = HistogramMetricFamily(
            "magtune_job_duration_seconds",
            "Run time of finished jobs (started to finished), by kind and final status",
            labels=["kind", "status"],
        )
        return jobs, durations

    def collect(self) -> Iterator[Metric]:
        jobs, durations = self._families()
        try:
            with get_session_factory(self.database_url)() as session:
                for kind, status, count in session.execute(
                    select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
                ):
                    jobs.add_metric([kind, status], count)
                for row in session.execute(self._duration_query(session)):
                    durations.add_metric(
                        [row.kind, row.status],
                        buckets=[
                            *(
                                (str(float(bound)), row._mapping[f"le_{i}"] or 0)
                                for i, bound in enumerate(JOB_DURATION_BUCKETS)
                            ),
                            ("+Inf", row.total),
                        ],
                        sum_value=float(row.seconds or 0.0),
                    )
        except SQLAlchemyError:
            log.warning("could not read job figures for /metrics", exc_info=True)
            return
        yield jobs
        yield durations

    @staticmethod
    def _duration_query(session: Session) -> Any:
        seconds = _job_seconds(session)
        cumulative = [
            func.sum(case((seconds <= bound, 1), else_=0)).label(f"le_{i}")
            for i, bound in enumerate(JOB_DURATION_BUCKETS)
        ]
        return (
            select(
                Job.kind,
                Job.status,
                *cumulative,
                func.count().label("total"),
                func.sum(seconds).label("seconds"),
            )
            .where(
                Job.status.in_(sorted(FINISHED_JOB_STATUSES)),
                Job.started_at.is_not(None),
                Job.finished_at.is_not(None),
            )
            .group_by(Job.kind, Job.status)
        )


def _exposition(database_url: str, local: CollectorRegistry) -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)
        merged.register(JobsCollector(database_url))
        return generate_latest(merged)
    return generate_latest(REGISTRY) + generate_latest(local)


def install(app: FastAPI) -> None:
    """Time every request and serve `GET /metrics` (Prometheus text format, behind scope metrics:read)."""
    database_url = app.state.settings.database_url
    local = CollectorRegistry(auto_describe=True)
    local.register(JobsCollector(database_url))
    app.add_middleware(RequestMetricsMiddleware)

    @app.get("/metrics", include_in_schema=False, dependencies=[requires(KeyScope.METRICS_READ)])
    def prometheus_metrics() -> Response:
        return Response(_exposition(database_url, local), media_type=CONTENT_TYPE_LATEST)
