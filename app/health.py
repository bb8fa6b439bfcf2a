"""Liveness and readiness probes, outside /v1 where orchestrators expect them."""

import logging

from fastapi import APIRouter
from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from app.auth.dependencies import open_route
from app.blobs import NAMESPACES
from app.config import Settings
from app.db import get_engine
from app.deps import SettingsDep
from app.durable import DurableFile
from app.problems import PROBLEM_MEDIA_TYPE, Problem

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"], dependencies=[open_route()])

BROKER_TIMEOUT_S = 2.0


def _check_database(settings: Settings) -> str | None:
    try:
        with get_engine(settings.database_url).connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _check_blob_store(settings: Settings) -> str | None:
    """Write, sync and remove a small file where uploads are staged: the store takes files."""
    try:
        for namespace in NAMESPACES:
            with DurableFile(settings.blob_dir / namespace, prefix=".ready-") as probe:
                probe.write(b"ready")
                probe.finish()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def _check_broker(settings: Settings) -> str | None:
    """Connect to Redis; for the embedded SQLAlchemy transport, reach the database that holds the queue."""
    try:
        if settings.broker_url.startswith("sqla+"):
            engine = create_engine(settings.broker_url.removeprefix("sqla+"), poolclass=NullPool)
            try:
                with engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
            finally:
                engine.dispose()
            return None
        options = {"socket_connect_timeout": BROKER_TIMEOUT_S, "socket_timeout": BROKER_TIMEOUT_S}
        with Connection(
            settings.broker_url, connect_timeout=BROKER_TIMEOUT_S, transport_options=options
        ) as conn:
            conn.ensure_connection(
                max_retries=1, interval_start=0, interval_step=0.2, timeout=BROKER_TIMEOUT_S
            )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up and serving; says nothing about its dependencies."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={503: {"description": "A dependency is down", "content": {PROBLEM_MEDIA_TYPE: {}}}},
)
def readyz(settings: SettingsDep) -> dict[str, object]:
    """Ready when the database answers `SELECT 1`, the broker accepts a connection and the blob store takes
    a file."""
    probes = {"database": _check_database, "broker": _check_broker, "blob_store": _check_blob_store}
    failures = {name: error for name, probe in probes.items() if (error := probe(settings)) is not None}
    checks = {name: failures.get(name, "ok") for name in probes}
    if failures:
        log.warning("not ready: %s", failures)
        raise Problem(
            503,
            "not-ready",
            "Not ready",
            f"down: {', '.join(failures)}",
            checks=checks,
            down=sorted(failures),
        )
    return {"status": "ready", "checks": checks}
