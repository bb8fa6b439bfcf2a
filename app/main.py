"""The api's app factory: one router per resource under /v1, problem+json errors, Prometheus and health."""

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from app import docs, health, observability
from app.auth import openapi as auth_openapi
from app.auth.dependencies import guard_undeclared
from app.auth.key_cache import KeyCache, start_key_listener
from app.auth.keys import LastUsed
from app.auth.limits import WriteLimiter
from app.auth.router import router as keys_router
from app.body_limit import BodyLimitMiddleware
from app.config import Settings, get_settings
from app.console.router import router as console_router
from app.faces.router import router as faces_router
from app.failures import install_failure_handlers
from app.feedback.router import router as feedback_router
from app.feedback.settled import SettledPairs
from app.jobs.events import StreamSlots
from app.jobs.router import router as jobs_router
from app.jobs.sweeper import start_background_sweeper
from app.metrics.router import router as metrics_router
from app.models.router import router as models_router
from app.openapi_errors import document_errors
from app.problems import install_problem_handlers
from app.review.router import router as review_router
from app.search.router import router as search_router
from app.verify.router import router as verify_router


def _operation_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


# What a browser frontend may send and read across origins (MAGTUNE_CORS_ORIGINS).
CORS_REQUEST_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key"]
CORS_EXPOSED_HEADERS = ["Location", "Retry-After", "WWW-Authenticate", "Idempotent-Replayed"]


def create_app(settings: Settings | None = None, *, run_sweeper: bool = True) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        stop_sweeper = start_background_sweeper(settings) if run_sweeper else None
        key_listener = start_key_listener(settings, app.state.key_cache)
        await app.state.settled_pairs.open()
        # What import and start-up made lives as long as the app: moved out of the collector's sight, a full
        # collection no longer walks it again and again (a third of a 10,000-pair batch's CPU went there;
        # bench/README.md). Given back on shutdown, so that an app made and dropped in one process (tests)
        # leaves nothing the collector cannot reach.
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await app.state.settled_pairs.close()
            if key_listener is not None:
                key_listener.stop()
            if stop_sweeper is not None:
                stop_sweeper()

    app = FastAPI(
        title="magtune",
        version="1.0.0",
        description="Face crops and same/different feedback in; fine-tuned, evaluated MagFace models out.",
        generate_unique_id_function=_operation_id,
        lifespan=lifespan,
        docs_url=None,  # app.docs serves /docs and /redoc with local assets instead of a CDN's
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_open else None,
        # A route that declares no scope needs `admin` (app/auth/dependencies.py): closed, not open.
        dependencies=[Depends(guard_undeclared)],
    )
    app.state.settings = settings
    app.state.last_used = LastUsed()
    app.state.key_cache = KeyCache()
    app.state.write_limiter = WriteLimiter(settings.write_rate_per_s, settings.write_burst)
    app.state.event_streams = StreamSlots(settings.job_events_max_streams)
    app.state.settled_pairs = SettledPairs(settings.database_url, max_size=settings.api_threads)
    install_problem_handlers(app)
    install_failure_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)  # inside the metrics: its 413s are counted
    observability.install(app)
    routers = (
        faces_router,
        feedback_router,
        jobs_router,
        models_router,
        metrics_router,
        verify_router,
        search_router,
        review_router,
        keys_router,
    )
    for router in routers:
        app.include_router(router, prefix="/v1")
    app.include_router(health.router)
    app.include_router(console_router)
    if settings.docs_open:
        docs.install(app)
    auth_openapi.install(app)
    document_errors(app)  # outermost: it gives every error, the auth ones included, the one Problem schema
    # Outermost, so refusals (401, 429, ...) carry the CORS headers too and a browser can read them.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=CORS_REQUEST_HEADERS,
        expose_headers=CORS_EXPOSED_HEADERS,
        max_age=600,
    )
    return app
