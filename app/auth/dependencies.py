"""The scope each route needs, declared on the route itself, and the check behind it.

Every route declares exactly one of:
- `dependencies=[requires(Scope.X)]`: a valid key holding scope X (`admin` is the keys' own scope and
  implies no other);
- `dependencies=[any_key()]`: a valid key, whatever its scopes (a key reading itself: GET /v1/keys/me);
- `dependencies=[open_route()]`: no key (health probes, docs, the console's static page).
`route_access(route)` reads the declaration back; the app-wide `guard_undeclared` dependency makes a route
that declares neither need `admin`, so a forgotten declaration is a closed door (and
tests/app/test_auth_matrix.py fails on it). The OpenAPI document shows the bearer scheme and, per
operation, the scope (its security requirement's scope list, and `x-required-scope`: app.auth.openapi).

Each of these dependencies takes the request alone. FastAPI solves a dependency's own dependencies again
wherever it appears, cache or not, so a check that asked for the session and the settings cost every request
a dozen dependency nodes; it opens a session of its own only when it must read the database (a key this
process has not verified yet, or a last-used time due).
"""

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.params import Depends as DependsParam
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from app.auth.key_cache import KeyCache
from app.auth.keys import Caller, LastUsed, remembered_caller, touch_last_used, unauthenticated, verify_key
from app.auth.limits import WriteLimiter
from app.auth.scopes import Scope
from app.db import session_scope
from app.deps import app_settings
from app.problems import Problem

BEARER_SCHEME = "apiKey"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Routes that are not FastAPI operations and are open by declaration: the OpenAPI document and the docs'
# static files (the docs pages themselves are APIRoutes declared with open_route()).
OPEN_PATHS = frozenset({"/openapi.json", "/docs-assets"})

# The scheme as the OpenAPI document shows it (app.auth.openapi); the header itself is read by _bearer_token.
bearer = HTTPBearer(
    auto_error=False,
    scheme_name=BEARER_SCHEME,
    bearerFormat="mt_<id>_<secret>",
    description="An API key: `Authorization: Bearer mt_<id>_<secret>`. Each operation names the scope it "
    "needs.",
)
OPEN = "open"
ANY_KEY = "any-key"


def _auth_state(request: Request) -> tuple[LastUsed, WriteLimiter, KeyCache]:
    state = request.app.state
    return state.last_used, state.write_limiter, state.key_cache


def _bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _verify(database_url: str, token: str, last_used: LastUsed, cache: KeyCache) -> Caller:
    with session_scope(database_url) as session:
        return verify_key(session, token, last_used, cache)


def _touch(database_url: str, key_id: str) -> None:
    with session_scope(database_url) as session:
        touch_last_used(session, key_id)


async def authenticate(request: Request) -> Caller:
    """The caller of the request's key (checked once per request): else 401.

    A key this process verified and no change has touched since is answered from memory, on the event loop;
    anything else is read from the database in the thread pool, in a session of its own.
    """
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        token = _bearer_token(request)
        if token is None:
            raise unauthenticated("no key: send Authorization: Bearer <key>")
        last_used, _limiter, cache = _auth_state(request)
        database_url = app_settings(request).database_url
        caller = remembered_caller(cache, token)
        if caller is None:
            caller = await run_in_threadpool(_verify, database_url, token, last_used, cache)
        elif last_used.due(caller.key_id):
            await run_in_threadpool(_touch, database_url, caller.key_id)
        request.state.caller = caller
    return caller


async def authorize(request: Request, scope: Scope) -> Caller | None:
    """The caller, when its key is valid and holds `scope`: else 401, 403 or (a write over its rate) 429."""
    settings = app_settings(request)
    if settings.auth_disabled:
        request.state.caller = None
        return None
    cached = await authenticate(request)
    if scope not in cached.scopes:
        raise Problem(
            403,
            "insufficient-scope",
            "Insufficient scope",
            f"this operation needs scope {scope.value}; key {cached.key_id} does not hold it",
            scope=scope.value,
        )
    if request.method in WRITE_METHODS and not scope.value.endswith(":read"):  # verify/search read
        _last_used, limiter, _cache = _auth_state(request)
        wait_s = limiter.take(cached.key_id)
        if wait_s > 0:
            raise Problem(
                429,
                "rate-limited",
                "Too many writes",
                f"key {cached.key_id} is over its write rate "
                f"({settings.write_rate_per_s:g}/s per api process)",
                headers={"Retry-After": str(max(1, round(wait_s + 0.5)))},
            )
    return cached


class ScopeRequirement:
    """The dependency behind `requires(scope)`; `scope` is read back by route_access."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope

    async def __call__(self, request: Request) -> Caller | None:
        return await authorize(request, self.scope)


def requires(scope: Scope) -> Any:
    """Declare on a route: `dependencies=[requires(Scope.FACES_READ)]`."""
    return Depends(ScopeRequirement(scope))


class AnyKeyRequirement:
    """The dependency behind `any_key()`: a valid key, whatever its scopes (None with auth disabled)."""

    async def __call__(self, request: Request) -> Caller | None:
        if app_settings(request).auth_disabled:
            request.state.caller = None
            return None
        return await authenticate(request)


def any_key() -> Any:
    """Declare on a route that any valid key may call: `dependencies=[any_key()]`."""
    return Depends(AnyKeyRequirement())


def _open() -> None:
    """Marker of a route that needs no key."""


def open_route() -> Any:
    """Declare on a route that needs no key: `dependencies=[open_route()]`."""
    return Depends(_open)


def route_access(route: Any) -> list[Scope | str]:
    """Every declaration on a route (an APIRoute or a RouteContext): its scopes and OPEN markers (exactly one
    is expected)."""
    found: list[Scope | str] = []
    for depends in getattr(route, "dependencies", None) or ():
        if not isinstance(depends, DependsParam):
            continue
        if isinstance(depends.dependency, ScopeRequirement):
            found.append(depends.dependency.scope)
        elif isinstance(depends.dependency, AnyKeyRequirement):
            found.append(ANY_KEY)
        elif depends.dependency is _open:
            found.append(OPEN)
    return found


async def guard_undeclared(request: Request) -> None:
    """App-wide: a route that declares no access at all needs `admin` instead of being open."""
    route = request.scope.get("route")
    if isinstance(route, APIRoute) and not route_access(route):
        await authorize(request, Scope.ADMIN)


def request_caller(request: Request) -> Caller | None:
    """The key the request was authorized with (None with auth disabled); set by the route's scope check."""
    return getattr(request.state, "caller", None)


async def current_caller(request: Request) -> Caller | None:
    return request_caller(request)


CallerDep = Annotated[Caller | None, Depends(current_caller)]


def caller_id(caller: Caller | None) -> str | None:
    return caller.key_id if caller is not None else None
