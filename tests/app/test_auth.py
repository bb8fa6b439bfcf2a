"""API keys over the api: issuing, revoking, malformed keys, who did what, CORS and the abuse limits."""

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.auth.scopes import ALL_SCOPES, Scope
from app.auth.startup import is_loopback, refuse_unsafe_bind
from app.config import Settings
from app.db import session_scope
from app.domain import JobStatus
from app.tables import ApiKey, FeedbackPair
from tests.app.factories import activate_directly, insert_face, insert_job, insert_model, read_job
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key, key_id

FRONTEND = [Scope.FACES_READ, Scope.FACES_WRITE, Scope.FEEDBACK_WRITE]


def pair(a: uuid.UUID, b: uuid.UUID, label: int = 1, **extra: object) -> dict[str, object]:
    return {"face_a": str(a), "face_b": str(b), "label": label, **extra}


# ---- keys ------------------------------------------------------------------------------------------------


def test_an_admin_issues_a_key_that_works_at_once_and_is_shown_once(
    client: TestClient, anonymous_client: TestClient
) -> None:
    created = client.post("/v1/keys", json={"name": "labelling app", "scopes": ["faces:read"]})

    assert created.status_code == 201, created.text
    body = created.json()
    assert body["key"].startswith(f"mt_{body['id']}_") and body["state"] == "active"
    assert created.headers["Location"] == f"/v1/keys/{body['id']}"
    assert anonymous_client.get("/v1/faces", headers=bearer(body["key"])).status_code == 200
    listed = client.get("/v1/keys").json()["items"]
    assert body["id"] in {key["id"] for key in listed}
    assert all("key" not in key and "secret_sha256" not in key for key in listed)
    assert "key" not in client.get(f"/v1/keys/{body['id']}").json()


def test_only_a_hash_of_the_secret_is_stored(client: TestClient, settings: Settings) -> None:
    body = client.post("/v1/keys", json={"name": "x", "scopes": ["jobs:read"]}).json()
    secret = body["key"].split("_", 2)[2]

    with session_scope(settings.database_url) as session:
        row = session.get(ApiKey, body["id"])
        assert row is not None
        stored = [row.secret_sha256, row.name, str(row.scopes), row.created_by or ""]
    assert all(
        secret.encode() not in (value if isinstance(value, bytes) else value.encode()) for value in stored
    )


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "scopes": ["faces:rule"]},
        {"name": "x", "scopes": []},
        {"name": "", "scopes": ["faces:read"]},
        {"name": "a\u0000b", "scopes": ["faces:read"]},
        {"name": "x" * 257, "scopes": ["faces:read"]},
        {"name": "x", "scopes": ["faces:read"], "expires_in_s": 0},
        {"name": "x", "scopes": ["faces:read"], "secret": "mine"},
    ],
)
def test_a_bad_key_request_is_a_422_and_stores_nothing(client: TestClient, body: dict[str, object]) -> None:
    before = len(client.get("/v1/keys").json()["items"])

    assert_problem(client.post("/v1/keys", json=body), 422, "validation-error")
    assert len(client.get("/v1/keys").json()["items"]) == before


def test_revoking_refuses_the_key_at_once_and_is_idempotent(
    client: TestClient, anonymous_client: TestClient, settings: Settings
) -> None:
    key = issue_test_key(settings.database_url, [Scope.FACES_READ])
    assert anonymous_client.get("/v1/faces", headers=bearer(key)).status_code == 200

    first = client.post(f"/v1/keys/{key_id(key)}/revoke")
    again = client.post(f"/v1/keys/{key_id(key)}/revoke")

    assert first.status_code == again.status_code == 200
    assert first.json()["state"] == "revoked" and again.json()["revoked_at"] == first.json()["revoked_at"]
    body = assert_problem(anonymous_client.get("/v1/faces", headers=bearer(key)), 401, "unauthenticated")
    assert body["detail"] == f"key {key_id(key)} is revoked"
    assert_problem(client.post("/v1/keys/0123456789abcdef/revoke"), 404, "unknown-key")
    assert_problem(client.post("/v1/keys/not-an-id/revoke"), 422, "validation-error")


def test_an_expiring_key_works_until_it_expires(anonymous_client: TestClient, settings: Settings) -> None:
    fresh = issue_test_key(settings.database_url, [Scope.JOBS_READ], expires_in=timedelta(hours=1))
    stale = issue_test_key(settings.database_url, [Scope.JOBS_READ], expires_in=timedelta(seconds=-1))

    assert anonymous_client.get("/v1/jobs", headers=bearer(fresh)).status_code == 200
    assert_problem(anonymous_client.get("/v1/jobs", headers=bearer(stale)), 401, "unauthenticated")


VALID_SHAPE = "mt_0123456789abcdef_" + "A" * 43


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer mt_short_secret",
        "Bearer " + VALID_SHAPE[:-1],
        "Bearer " + VALID_SHAPE + "A",
        "Bearer " + VALID_SHAPE.replace("mt_", "xx_"),
        "Bearer " + VALID_SHAPE.replace("0123", "01G3"),
        "Bearer " + VALID_SHAPE,  # well formed, unknown
        "Bearer " + "mt_" + "a" * 100_000,
        "Bearer mt_0123456789abcdef_" + "A" * 42 + "\u00e9",
    ],
)
def test_a_malformed_or_unknown_key_is_a_401(anonymous_client: TestClient, authorization: str) -> None:
    response = anonymous_client.get("/v1/faces", headers={"Authorization": authorization.encode("latin-1")})

    assert_problem(response, 401, "unauthenticated")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert "A" * 20 not in response.text and "a" * 20 not in response.text


def test_a_wrong_secret_for_a_real_id_is_a_401(anonymous_client: TestClient, settings: Settings) -> None:
    key = issue_test_key(settings.database_url, ALL_SCOPES)
    forged = key[: -len("AAAA")] + ("AAAA" if not key.endswith("AAAA") else "BBBB")

    body = assert_problem(anonymous_client.get("/v1/faces", headers=bearer(forged)), 401, "unauthenticated")
    assert body["detail"] == f"unknown key {key_id(key)}"


def test_no_part_of_a_key_but_its_id_reaches_the_logs(
    anonymous_client: TestClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    key = issue_test_key(settings.database_url, [Scope.FACES_READ])
    secret = key.split("_", 2)[2]
    forged = f"mt_{key_id(key)}_{secret[::-1]}"
    caplog.set_level(logging.DEBUG)

    anonymous_client.get("/v1/faces", headers=bearer(forged))
    anonymous_client.get("/v1/jobs", headers=bearer(key))  # the wrong scope
    anonymous_client.get("/v1/faces", headers=bearer(key))  # fine

    text = caplog.text
    assert secret not in text and secret[::-1] not in text
    assert secret[:12] not in text and secret[::-1][:12] not in text


def test_last_used_is_written_once_however_many_requests(
    anonymous_client: TestClient, settings: Settings
) -> None:
    key = issue_test_key(settings.database_url, [Scope.FACES_READ])

    def last_used() -> object:
        with session_scope(settings.database_url) as session:
            return session.scalar(select(ApiKey.last_used_at).where(ApiKey.id == key_id(key)))

    assert last_used() is None
    anonymous_client.get("/v1/faces", headers=bearer(key))
    first = last_used()
    for _ in range(5):
        anonymous_client.get("/v1/faces", headers=bearer(key))
    assert first is not None and last_used() == first


# ---- who did what ----------------------------------------------------------------------------------------


def test_feedback_records_its_key_and_lists_and_retracts_by_key(
    client: TestClient, anonymous_client: TestClient, settings: Settings
) -> None:
    faces = [insert_face(settings) for _ in range(4)]
    careful = issue_test_key(settings.database_url, [Scope.FEEDBACK_WRITE])
    sloppy = issue_test_key(settings.database_url, [Scope.FEEDBACK_WRITE])
    one = anonymous_client.post(
        "/v1/feedback", json=pair(faces[0], faces[1], annotator="ann"), headers=bearer(careful)
    )
    batch = anonymous_client.post(
        "/v1/feedback/batch",
        json={"items": [pair(faces[0], faces[2]), pair(faces[1], faces[3], 0)]},
        headers=bearer(sloppy),
    )
    assert one.status_code == 201 and batch.json()["created"] == 2
    assert (one.json()["api_key_id"], one.json()["annotator"]) == (key_id(careful), "ann")

    by_sloppy = client.get("/v1/feedback", params={"api_key": key_id(sloppy)}).json()["items"]
    assert {item["api_key_id"] for item in by_sloppy} == {key_id(sloppy)} and len(by_sloppy) == 2

    retracted = client.post(f"/v1/keys/{key_id(sloppy)}/retract-feedback")
    again = client.post(f"/v1/keys/{key_id(sloppy)}/retract-feedback")

    assert retracted.json() == {"key_id": key_id(sloppy), "retracted": 2}
    assert again.json() == {"key_id": key_id(sloppy), "retracted": 0}
    with session_scope(settings.database_url) as session:
        remaining = session.scalars(select(FeedbackPair.api_key_id)).all()
    assert remaining == [key_id(careful)]
    assert_problem(client.post("/v1/keys/0123456789abcdef/retract-feedback"), 404, "unknown-key")
    assert_problem(client.get("/v1/feedback", params={"api_key": "a\u0000"}), 422, "validation-error")


def test_idempotency_keys_belong_to_their_api_key(anonymous_client: TestClient, settings: Settings) -> None:
    """Another API key sending the same Idempotency-Key is a request of its own, not a replay of the first."""
    faces = [insert_face(settings) for _ in range(3)]
    first, second = (issue_test_key(settings.database_url, [Scope.FEEDBACK_WRITE]) for _ in range(2))
    header = {"Idempotency-Key": "same-header"}

    one = anonymous_client.post("/v1/feedback", json=pair(faces[0], faces[1]), headers=bearer(first) | header)
    two = anonymous_client.post(
        "/v1/feedback", json=pair(faces[0], faces[2]), headers=bearer(second) | header
    )

    assert one.status_code == two.status_code == 201
    assert one.json()["id"] != two.json()["id"]


def test_jobs_record_who_created_and_cancelled_them(anonymous_client: TestClient, settings: Settings) -> None:
    activate_directly(settings, insert_model(settings, threshold=0.4))
    operator = issue_test_key(settings.database_url, [Scope.JOBS_WRITE])
    other = issue_test_key(settings.database_url, [Scope.JOBS_WRITE])

    job = anonymous_client.post("/v1/jobs", json={"kind": "reindex"}, headers=bearer(operator)).json()
    cancelled = anonymous_client.post(f"/v1/jobs/{job['id']}/cancel", headers=bearer(other)).json()

    assert (job["created_by"], cancelled["cancelled_by"]) == (key_id(operator), key_id(other))
    assert cancelled["status"] == "cancelled"


def test_an_activation_names_the_key_not_the_body(client: TestClient, settings: Settings) -> None:
    model = insert_model(settings, threshold=0.4)
    ops = issue_test_key(settings.database_url, [Scope.MODELS_ACTIVATE], name="ops team")

    response = client.post(f"/v1/models/{model}/activate", json={"reason": "base"}, headers=bearer(ops))

    assert response.status_code == 200, response.text
    assert (response.json()["actor"], response.json()["api_key_id"]) == ("ops team", key_id(ops))
    logged = client.get("/v1/models/activations").json()["items"][0]
    assert (logged["actor"], logged["api_key_id"]) == ("ops team", key_id(ops))
    reindex = client.get(f"/v1/jobs/{response.json()['reindex_job_id']}").json()
    assert reindex["created_by"] == key_id(ops)


# ---- abuse limits ----------------------------------------------------------------------------------------


def test_writes_over_the_rate_are_a_429_with_retry_after(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    limited = client_with(write_rate_per_s=0.01, write_burst=3)
    faces = [insert_face(settings) for _ in range(5)]
    answers = [limited.post("/v1/feedback", json=pair(faces[0], faces[i])) for i in range(1, 5)]

    assert [answer.status_code for answer in answers[:3]] == [201, 201, 201]
    body = assert_problem(answers[3], 429, "rate-limited")
    assert int(answers[3].headers["Retry-After"]) >= 1
    assert "per api process" in body["detail"]
    assert limited.get("/v1/feedback").status_code == 200  # reads are not limited
    verdict = limited.post("/v1/verify", json={"face_a": str(faces[0]), "face_b": str(faces[1])})
    assert verdict.status_code != 429, "verify reads, though it is a POST"
    with session_scope(settings.database_url) as session:
        assert len(session.scalars(select(FeedbackPair.id)).all()) == 3


def test_a_key_over_its_job_cap_is_a_429_until_one_finishes(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    activate_directly(settings, insert_model(settings, threshold=0.4))
    capped = client_with(max_active_jobs_per_key=2)
    for status in (JobStatus.QUEUED, JobStatus.RUNNING):  # jobs no key created (internal ones) do not count
        insert_job(settings, kind="reindex", status=status)

    first = capped.post("/v1/jobs", json={"kind": "reindex"})
    second = capped.post("/v1/jobs", json={"kind": "reindex"})
    third = capped.post("/v1/jobs", json={"kind": "reindex"})

    assert first.status_code == second.status_code == 202
    body = assert_problem(third, 429, "too-many-jobs")
    assert third.headers["Retry-After"] and body["active_jobs"] == 2
    assert capped.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200
    assert capped.post("/v1/jobs", json={"kind": "reindex"}).status_code == 202
    assert read_job(settings, uuid.UUID(second.json()["id"])).created_by is not None


# ---- CORS ------------------------------------------------------------------------------------------------

PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, idempotency-key, content-type",
}


def test_a_listed_origin_may_call_with_a_key_and_an_idempotency_key(
    client_with: Callable[..., TestClient],
) -> None:
    browser = client_with(cors_origins=["https://labels.example.org"])

    allowed = browser.options("/v1/feedback", headers={"Origin": "https://labels.example.org", **PREFLIGHT})
    refused = browser.options("/v1/feedback", headers={"Origin": "https://evil.example.com", **PREFLIGHT})

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://labels.example.org"
    allowed_headers = allowed.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed_headers and "idempotency-key" in allowed_headers
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers

    answer = browser.get("/v1/jobs", headers={"Origin": "https://labels.example.org"})
    assert answer.headers["access-control-allow-origin"] == "https://labels.example.org"
    exposed = answer.headers["access-control-expose-headers"]
    assert "Location" in exposed and "Retry-After" in exposed


def test_no_origin_is_allowed_by_default(client: TestClient) -> None:
    preflight = client.options("/v1/feedback", headers={"Origin": "https://labels.example.org", **PREFLIGHT})

    assert preflight.status_code == 400
    assert "access-control-allow-origin" not in preflight.headers


# ---- auth off --------------------------------------------------------------------------------------------


def test_auth_off_lets_every_call_through_unattributed(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    open_client = client_with(auth_disabled=True)
    open_client.headers.pop("Authorization")
    faces = [insert_face(settings) for _ in range(2)]

    posted = open_client.post("/v1/feedback", json=pair(faces[0], faces[1]))

    assert posted.status_code == 201 and posted.json()["api_key_id"] is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("", False),
        ("10.0.0.5", False),
        ("::", False),
        ("example.org", False),
    ],
)
def test_auth_can_be_off_only_on_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
    assert (refuse_unsafe_bind(Settings(auth_disabled=True), host) is None) is loopback
    assert refuse_unsafe_bind(Settings(auth_disabled=False), host) is None


def test_a_key_reads_its_own_scopes_whatever_they_are(
    anonymous_client: TestClient, settings: Settings
) -> None:
    key = issue_test_key(settings.database_url, [Scope.REVIEW, Scope.FACES_READ])
    me = anonymous_client.get("/v1/keys/me", headers=bearer(key))
    assert me.status_code == 200
    assert me.json() == {
        "id": key_id(key),
        "name": me.json()["name"],
        "scopes": ["faces:read", "review"],
        "auth_disabled": False,
    }
