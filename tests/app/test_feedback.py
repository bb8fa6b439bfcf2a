"""/v1/feedback against the real PostgreSQL: pairs, conflicts, idempotency, batches, listing, retraction."""

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from sqlalchemy import select

from app.config import Settings
from app.db import session_scope
from app.feedback.service import canonical_pair
from app.main import create_app
from app.migrate import upgrade_database
from app.tables import Face, FeedbackPair, IdempotencyRecord
from tests.app.factories import count_rows, insert_face
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key

SPLITS = ("train", "val", "test")


def pair(face_a: uuid.UUID, face_b: uuid.UUID, label: int = 1, **extra: Any) -> dict[str, Any]:
    return {"face_a": str(face_a), "face_b": str(face_b), "label": label, **extra}


def ingested(label: int) -> float:
    return REGISTRY.get_sample_value("magtune_feedback_ingested_total", {"label": str(label)}) or 0.0


@pytest.fixture
def train_faces(settings: Settings) -> list[uuid.UUID]:
    return [insert_face(settings, split="train") for _ in range(6)]


# ---- one pair --------------------------------------------------------------------------------------------


def test_a_pair_is_stored_in_canonical_order(client: TestClient, train_faces: list[uuid.UUID]) -> None:
    low, high = sorted(train_faces[:2])

    response = client.post("/v1/feedback", json=pair(high, low, 1, annotator="ann", source="ui"))

    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/feedback/{body['id']}"
    assert (body["face_a"], body["face_b"]) == (str(low), str(high))
    assert (body["label"], body["split"], body["annotator"], body["source"]) == (1, "train", "ann", "ui")
    assert body["created_at"].endswith("+00:00")
    assert client.get(f"/v1/feedback/{body['id']}").json() == body


def test_the_same_pair_in_either_order_is_one_pair(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    a, b = train_faces[:2]
    first = client.post("/v1/feedback", json=pair(a, b, 0))

    again = client.post("/v1/feedback", json=pair(b, a, 0, annotator="someone else"))

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert count_rows(settings, FeedbackPair) == 1


def test_another_label_for_a_stored_pair_is_a_conflict(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    a, b = train_faces[:2]
    stored = client.post("/v1/feedback", json=pair(a, b, 1)).json()

    body = assert_problem(client.post("/v1/feedback", json=pair(b, a, 0)), 409, "conflicting-label")

    assert body["feedback_id"] == stored["id"]
    assert client.get(f"/v1/feedback/{stored['id']}").json()["label"] == 1
    assert client.delete(f"/v1/feedback/{stored['id']}").status_code == 204
    relabelled = client.post("/v1/feedback", json=pair(b, a, 0))
    assert relabelled.status_code == 201
    assert count_rows(settings, FeedbackPair) == 1


def test_a_pair_takes_its_faces_common_split_or_cross(client: TestClient, settings: Settings) -> None:
    train_a, train_b = insert_face(settings, split="train"), insert_face(settings, split="train")
    test_a, test_b = insert_face(settings, split="test"), insert_face(settings, split="test")

    def split_of(face_a: uuid.UUID, face_b: uuid.UUID, **extra: Any) -> str:
        response = client.post("/v1/feedback", json=pair(face_a, face_b, 1, **extra))
        assert response.status_code == 201, response.text
        return response.json()["split"]

    assert split_of(train_a, train_b) == "train"
    assert split_of(test_a, test_b) == "test"
    assert split_of(train_a, test_a) == "cross"
    assert split_of(train_b, test_b, split="regression") == "regression"


def test_regression_pairs_keep_their_split(client: TestClient, train_faces: list[uuid.UUID]) -> None:
    a, b, c, d = train_faces[:4]
    regression = client.post("/v1/feedback", json=pair(a, b, 1, split="regression")).json()
    assert regression["split"] == "regression"

    plain_again = client.post("/v1/feedback", json=pair(b, a, 1))
    assert (plain_again.status_code, plain_again.json()["split"]) == (200, "regression")

    client.post("/v1/feedback", json=pair(c, d, 1))
    body = assert_problem(
        client.post("/v1/feedback", json=pair(c, d, 1, split="regression")), 409, "conflicting-split"
    )
    assert "retract" in body["detail"]


@pytest.mark.parametrize("label", [True, False, "1", "0", 2, -1, 1.0, None])
def test_labels_other_than_0_or_1_are_refused(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID], label: Any
) -> None:
    body = assert_problem(
        client.post("/v1/feedback", json=pair(*train_faces[:2], label)), 422, "validation-error"
    )

    assert body["errors"][0]["loc"] == ["body", "label"]
    assert count_rows(settings, FeedbackPair) == 0


@pytest.mark.parametrize(
    "change",
    [
        {"split": "train"},
        {"unknown_field": 1},
        {"face_a": "not-a-uuid"},
        {"annotator": "x" * 257},
    ],
    ids=["split-other-than-regression", "unknown-field", "malformed-face", "long-annotator"],
)
def test_malformed_bodies_are_refused(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID], change: dict[str, Any]
) -> None:
    assert_problem(client.post("/v1/feedback", json=pair(*train_faces[:2]) | change), 422, "validation-error")
    assert count_rows(settings, FeedbackPair) == 0


@pytest.mark.parametrize("field", ["annotator", "source"])
def test_text_holding_nul_is_refused_alone_and_item_by_item(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID], field: str
) -> None:
    bad = pair(*train_faces[:2], **{field: "an\u0000n"})  # PostgreSQL cannot store NUL in text

    body = assert_problem(client.post("/v1/feedback", json=bad), 422, "validation-error")
    assert [error["loc"] for error in body["errors"]] == [["body", field]]
    assert count_rows(settings, FeedbackPair) == 0

    batch = client.post("/v1/feedback/batch", json={"items": [bad, pair(*train_faces[2:4])]})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert [result["status"] for result in results] == ["error", "created"]
    assert results[0]["error"]["type"].endswith("/validation-error")
    assert [error["loc"] for error in results[0]["error"]["errors"]] == [[field]]
    assert count_rows(settings, FeedbackPair) == 1


def test_a_list_filter_holding_nul_is_refused(client: TestClient) -> None:
    response = client.get("/v1/feedback", params={"split": "tr\u0000ain"})

    body = assert_problem(response, 422, "validation-error")
    assert [error["loc"] for error in body["errors"]] == [["query", "split"]]


def test_unknown_faces_are_named(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    ghost = uuid.uuid4()

    body = assert_problem(client.post("/v1/feedback", json=pair(train_faces[0], ghost)), 422, "unknown-face")

    assert str(ghost) in body["detail"]
    assert [error["loc"] for error in body["errors"]] == [["body", "face_b"]]
    both = assert_problem(client.post("/v1/feedback", json=pair(uuid.uuid4(), ghost)), 422, "unknown-face")
    assert [error["loc"] for error in both["errors"]] == [["body", "face_a"], ["body", "face_b"]]
    assert count_rows(settings, FeedbackPair) == 0


def test_a_face_cannot_be_paired_with_itself(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    face = train_faces[0]
    assert_problem(client.post("/v1/feedback", json=pair(face, face)), 422, "same-face")
    assert count_rows(settings, FeedbackPair) == 0


def test_the_ingestion_counter_counts_new_pairs_only(
    client: TestClient, train_faces: list[uuid.UUID]
) -> None:
    before = ingested(0)
    client.post("/v1/feedback", json=pair(*train_faces[:2], 0))
    client.post("/v1/feedback", json=pair(*train_faces[:2], 0))
    client.post("/v1/feedback/batch", json={"items": [pair(*train_faces[2:4], 0), pair(*train_faces[:2], 0)]})

    assert ingested(0) - before == 2


# ---- Idempotency-Key -------------------------------------------------------------------------------------


def test_a_retried_request_replays_the_first_answer(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    headers = {"Idempotency-Key": "retry-1"}
    first = client.post("/v1/feedback", json=pair(*train_faces[:2], 1), headers=headers)
    # Same meaning, other key order: the same request.
    reordered = {"label": 1, "face_b": str(train_faces[1]), "face_a": str(train_faces[0])}

    again = client.post("/v1/feedback", json=reordered, headers=headers)

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert count_rows(settings, FeedbackPair) == 1
    assert count_rows(settings, IdempotencyRecord) == 1


def test_a_key_reused_with_another_body_is_refused(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    headers = {"Idempotency-Key": "reused"}
    client.post("/v1/feedback", json=pair(*train_faces[:2], 1), headers=headers)

    assert_problem(
        client.post("/v1/feedback", json=pair(*train_faces[2:4], 1), headers=headers),
        409,
        "idempotency-key-reused",
    )
    assert count_rows(settings, FeedbackPair) == 1


def test_refusals_are_not_remembered(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    headers = {"Idempotency-Key": "after-upload"}
    late_face = uuid.uuid4()
    assert_problem(
        client.post("/v1/feedback", json=pair(train_faces[0], late_face), headers=headers),
        422,
        "unknown-face",
    )

    assert count_rows(settings, IdempotencyRecord) == 0


def test_batches_are_idempotent_too(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    headers = {"Idempotency-Key": "batch-1"}
    items = {"items": [pair(*train_faces[:2], 1), pair(*train_faces[2:4], 0)]}
    first = client.post("/v1/feedback/batch", json=items, headers=headers)

    again = client.post("/v1/feedback/batch", json=items, headers=headers)

    assert again.status_code == first.status_code == 200
    assert again.json() == first.json()
    assert [result["status"] for result in again.json()["results"]] == ["created", "created"]
    assert_problem(
        client.post("/v1/feedback/batch", json={"items": items["items"][:1]}, headers=headers),
        409,
        "idempotency-key-reused",
    )
    assert count_rows(settings, FeedbackPair) == 2


# ---- batches ---------------------------------------------------------------------------------------------


def test_a_batch_stores_the_good_items_and_reports_each_bad_one(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    a, b, c, d, e, f = train_faces
    existing = client.post("/v1/feedback", json=pair(e, f, 1)).json()
    ghost = uuid.uuid4()
    items = [
        pair(a, b, 1),  # 0 created
        pair(a, a, 1),  # 1 same face
        pair(c, ghost, 0),  # 2 unknown face
        pair(a, c, True),  # 3 bad label
        "not an object",  # 4
        pair(b, a, 1),  # 5 repeats item 0 in the other order
        pair(f, e, 1),  # 6 stored before
        pair(f, e, 0),  # 7 conflicts with the stored pair
        pair(c, d, 0, split="regression"),  # 8 created
    ]

    response = client.post("/v1/feedback/batch", json={"items": items})

    assert response.status_code == 200, response.text
    body = response.json()
    statuses = [
        (r["index"], r["status"], r.get("error", {}).get("type", "").rsplit("/", 1)[-1])
        for r in body["results"]
    ]
    assert statuses == [
        (0, "created", ""),
        (1, "error", "same-face"),
        (2, "error", "unknown-face"),
        (3, "error", "validation-error"),
        (4, "error", "validation-error"),
        (5, "existing", ""),
        (6, "existing", ""),
        (7, "error", "conflicting-label"),
        (8, "created", ""),
    ]
    results = body["results"]
    assert results[5]["id"] == results[0]["id"]
    assert results[6]["id"] == existing["id"]
    assert results[7]["error"]["feedback_id"] == existing["id"]
    assert str(ghost) in results[2]["error"]["detail"]
    assert (body["created"], body["existing"], body["failed"]) == (2, 2, 5)
    assert count_rows(settings, FeedbackPair) == 3
    stored = client.get(f"/v1/feedback/{results[8]['id']}").json()
    assert (stored["label"], stored["split"]) == (0, "regression")
    assert (stored["face_a"], stored["face_b"]) == tuple(str(face) for face in canonical_pair(c, d))


def test_every_column_of_a_batch_is_stored_as_sent(any_settings: Settings) -> None:
    """PostgreSQL gets a batch as packed columns (app/feedback/service.py): each row's every value, text
    that needs quoting in an array and missing values included, must land in that row, on both databases."""
    splits = ["train", "val", "test", "train", "val", "test", "train", "train"]
    faces = [insert_face(any_settings, split=split) for split in splits]
    texts = [None, "ann", 'quo"te', "{brace},comma", "ünïcode ✓", "back\\slash", "NULL", ""]
    sent = [
        pair(faces[i], faces[j], (i + j) % 2, annotator=texts[i], source=texts[j])
        for i, j in [(1, 0), (2, 5), (3, 6), (4, 7), (5, 3), (6, 1), (7, 0)]
    ]
    sent.append(pair(faces[4], faces[1], 1, split="regression"))
    key = issue_test_key(any_settings.database_url)

    with TestClient(create_app(any_settings, run_sweeper=False), headers=bearer(key)) as client:
        body = client.post("/v1/feedback/batch", json={"items": sent}).json()

    assert body["created"] == len(sent), body
    with session_scope(any_settings.database_url) as session:
        stored = {row.id: row for row in session.scalars(select(FeedbackPair))}
        key_id = session.scalar(select(FeedbackPair.api_key_id).limit(1))
        # after the batch: a face without labels may have joined its partner's split (placement)
        split_of = {face: split for face, split in session.execute(select(Face.id, Face.split))}
    assert key.startswith(f"mt_{key_id}_")
    for item, result in zip(sent, body["results"], strict=True):
        row = stored[uuid.UUID(result["id"])]
        low, high = canonical_pair(uuid.UUID(item["face_a"]), uuid.UUID(item["face_b"]))
        split_a, split_b = split_of[low], split_of[high]
        expected_split = item.get("split") or (split_a if split_a == split_b else "cross")
        assert (row.face_a, row.face_b, row.label, row.annotator, row.source) == (
            low,
            high,
            item["label"],
            item.get("annotator"),
            item.get("source"),
        )
        assert (row.split, result["split"], row.api_key_id) == (expected_split, expected_split, key_id)


def test_a_pair_named_twice_with_two_labels_keeps_the_first(
    client: TestClient, train_faces: list[uuid.UUID]
) -> None:
    a, b = train_faces[:2]

    body = client.post("/v1/feedback/batch", json={"items": [pair(a, b, 0), pair(b, a, 1)]}).json()

    assert [result["status"] for result in body["results"]] == ["created", "error"]
    assert body["results"][1]["error"]["feedback_id"] == body["results"][0]["id"]


def test_a_batch_over_the_limit_stores_nothing(
    client_with: Callable[..., TestClient], settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    limited = client_with(max_feedback_batch=3)
    items = [pair(train_faces[0], other) for other in train_faces[1:5]]

    body = assert_problem(limited.post("/v1/feedback/batch", json={"items": items}), 413, "batch-too-large")

    assert body["max_items"] == 3
    assert count_rows(settings, FeedbackPair) == 0
    assert limited.post("/v1/feedback/batch", json={"items": items[:3]}).json()["created"] == 3


def test_a_large_batch_is_stored_whole(client: TestClient, settings: Settings) -> None:
    faces = [insert_face(settings, split=SPLITS[i % 3]) for i in range(60)]
    items = [pair(faces[i], faces[j], (i + j) % 2) for i in range(60) for j in range(i + 1, 60)]

    body = client.post("/v1/feedback/batch", json={"items": items}).json()

    assert (body["created"], body["existing"], body["failed"]) == (len(items), 0, 0)
    assert count_rows(settings, FeedbackPair) == len(items) == 1770
    again = client.post("/v1/feedback/batch", json={"items": items}).json()
    assert (again["created"], again["existing"], again["failed"]) == (0, len(items), 0)
    assert [r["id"] for r in again["results"]] == [r["id"] for r in body["results"]]
    with session_scope(settings.database_url) as session:
        face_split = dict(session.execute(select(Face.id, Face.split)).all())
        stored = session.execute(select(FeedbackPair.face_a, FeedbackPair.face_b, FeedbackPair.split)).all()
    # Every pair took its faces' final split (faces without labels joined their partners on the way).
    for face_a, face_b, split in stored:
        expected = face_split[face_a] if face_split[face_a] == face_split[face_b] else "cross"
        assert split == expected
    assert len(stored) == len(items)


def test_a_batch_body_must_hold_items(client: TestClient) -> None:
    assert_problem(
        client.post("/v1/feedback/batch", json=[pair(uuid.uuid4(), uuid.uuid4())]), 422, "validation-error"
    )
    assert client.post("/v1/feedback/batch", json={"items": []}).json() == {
        "results": [],
        "created": 0,
        "existing": 0,
        "failed": 0,
    }


# ---- list, read, retract ---------------------------------------------------------------------------------


def test_listing_pages_through_a_batch_with_one_timestamp(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    items = [pair(train_faces[i], train_faces[j], 1) for i in range(6) for j in range(i + 1, 6)]
    created = client.post("/v1/feedback/batch", json={"items": items}).json()

    seen: list[str] = []
    cursor: str | None = None
    while True:
        page = client.get("/v1/feedback", params={"limit": 4} | ({"cursor": cursor} if cursor else {})).json()
        seen.extend(item["id"] for item in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert len(seen) == len(set(seen)) == len(items) == 15
    assert set(seen) == {result["id"] for result in created["results"]}


def test_listing_filters_by_label_split_and_face(client: TestClient, settings: Settings) -> None:
    a, b, c = (insert_face(settings, split="val") for _ in range(3))
    x = insert_face(settings, split="test")
    ids = {
        name: client.post("/v1/feedback", json=body).json()["id"]
        for name, body in {
            "ab": pair(a, b, 1),
            "bc": pair(b, c, 0),
            "cx": pair(c, x, 1, split="regression"),
            "ax": pair(a, x, 0),  # both faces have labels by now: neither moves, the pair is across splits
        }.items()
    }

    def listed(**params: Any) -> set[str]:
        return {item["id"] for item in client.get("/v1/feedback", params=params).json()["items"]}

    assert listed(label=1) == {ids["ab"], ids["cx"]}
    assert listed(label=0) == {ids["bc"], ids["ax"]}
    assert listed(split="val") == {ids["ab"], ids["bc"]}
    assert listed(split="cross") == {ids["ax"]}
    assert listed(split="regression") == {ids["cx"]}
    assert listed(face=str(x)) == {ids["ax"], ids["cx"]}
    assert listed(face=str(b), label=0) == {ids["bc"]}
    assert_problem(client.get("/v1/feedback", params={"label": 2}), 422, "validation-error")


def test_unknown_and_malformed_feedback_ids(client: TestClient) -> None:
    assert_problem(client.get(f"/v1/feedback/{uuid.uuid4()}"), 404, "unknown-feedback")
    assert_problem(client.delete(f"/v1/feedback/{uuid.uuid4()}"), 404, "unknown-feedback")
    assert_problem(client.get("/v1/feedback/42"), 404, "http-404")  # not a UUID: no feedback has that path
    assert_problem(client.get("/v1/feedback/batch"), 405, "http-405")  # the batch's path takes POST only


def test_retracting_a_pair_removes_it_only(
    client: TestClient, settings: Settings, train_faces: list[uuid.UUID]
) -> None:
    kept = client.post("/v1/feedback", json=pair(*train_faces[:2])).json()
    retracted = client.post("/v1/feedback", json=pair(*train_faces[2:4])).json()

    response = client.delete(f"/v1/feedback/{retracted['id']}")

    assert response.status_code == 204
    assert_problem(client.get(f"/v1/feedback/{retracted['id']}"), 404, "unknown-feedback")
    assert [item["id"] for item in client.get("/v1/feedback").json()["items"]] == [kept["id"]]
    assert count_rows(settings, FeedbackPair) == 1


# ---- the embedded database -------------------------------------------------------------------------------


def test_the_embedded_sqlite_database_behaves_the_same(tmp_path: Path, johns_dir: Path) -> None:
    """Embedded mode runs the SQLite statements (chunked reads, VALUES inserts) instead of PostgreSQL's."""
    data_dir = tmp_path / "embedded"
    settings = Settings(data_dir=data_dir, broker_url="memory://")
    upgrade_database(settings.database_url)
    images = sorted((johns_dir / "aligned_112").glob("*/*.png"))[:4]

    with TestClient(
        create_app(settings, run_sweeper=False), headers=bearer(issue_test_key(settings.database_url))
    ) as client:
        faces = [
            client.post("/v1/faces", files={"file": (p.name, p.read_bytes(), "image/png")}).json()["id"]
            for p in images
        ]
        a, b, c, d = (uuid.UUID(face) for face in faces)
        items = [pair(a, b, 1), pair(b, a, 1), pair(c, a, 0), pair(a, c, 1), pair(d, d, 1), pair(c, d, 0)]
        body = client.post("/v1/feedback/batch", json={"items": items}).json()
        statuses = [result["status"] for result in body["results"]]
        assert statuses == ["created", "existing", "created", "error", "error", "created"]
        single = client.post("/v1/feedback", json=pair(b, a, 1))
        assert (single.status_code, single.json()["id"]) == (200, body["results"][0]["id"])
        assert single.json()["created_at"].endswith("+00:00")
        assert_problem(client.post("/v1/feedback", json=pair(a, b, 0)), 409, "conflicting-label")

        assert client.delete(f"/v1/faces/{a}").status_code == 204
        remaining = client.get("/v1/feedback").json()["items"]
        assert [item["id"] for item in remaining] == [body["results"][5]["id"]]
    assert len([path for path in settings.blob_dir.rglob("*") if path.is_file()]) == 3


def test_the_embedded_sqlite_database_refuses_nul_too(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "embedded", broker_url="memory://")
    upgrade_database(settings.database_url)

    with TestClient(
        create_app(settings, run_sweeper=False), headers=bearer(issue_test_key(settings.database_url))
    ) as client:
        bad = pair(uuid.uuid4(), uuid.uuid4(), annotator="an\u0000n")
        body = assert_problem(client.post("/v1/feedback", json=bad), 422, "validation-error")
        assert [error["loc"] for error in body["errors"]] == [["body", "annotator"]]
        listed = client.get("/v1/faces", params={"subject": "an\u0000n"})
        assert_problem(listed, 422, "validation-error")
