"""The review queue over HTTP on the real PostgreSQL: what it never offers, leases, answers, refusals."""

import uuid
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from app.config import Settings
from app.db import session_scope
from app.tables import Face, FeedbackPair, ReviewLease, utcnow
from tests.app.embedding_factories import activate, embed
from tests.app.factories import count_rows, face_row, insert_model
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key

THRESHOLD = 0.5
DIM = 32
SPLITS = ("train", "train", "train", "train", "val", "test")


class Gallery:
    """Faces of several subjects in every split, embedded by a serving model: a subject's faces share a
    direction (same-subject cosine about 0.6 to 0.9), different subjects score about 0."""

    def __init__(self, settings: Settings, subjects: int = 8, per_subject: int = 12, seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.model = insert_model(settings, threshold=THRESHOLD)
        centres = rng.standard_normal((subjects, DIM))
        rows: list[Face] = []
        vectors = []
        for s in range(subjects):
            for i in range(per_subject):
                rows.append(face_row(split=SPLITS[i % len(SPLITS)], subject=f"s{s}"))
                v = centres[s] / np.linalg.norm(centres[s]) + rng.normal(0, 0.12, DIM) * rng.uniform(0.5, 3)
                vectors.append(v / np.linalg.norm(v))
        with session_scope(settings.database_url) as session:
            session.add_all(rows)
            session.flush()
            self.faces = [face.id for face in rows]
        self.split = {face.id: face.split for face in rows}
        self.subject = {face.id: face.subject for face in rows}
        embed(settings, self.model, self.faces, np.asarray(vectors, np.float32))
        activate(settings, self.model, serving=True)


def lease(client: TestClient, limit: int = 10) -> dict[str, Any]:
    response = client.post("/v1/review/leases", json={"limit": limit})
    assert response.status_code == 200, response.text
    return response.json()


def key(item: dict[str, Any]) -> frozenset[str]:
    return frozenset((item["face_a"]["id"], item["face_b"]["id"]))


@pytest.fixture
def seeded(client_with: Callable[..., TestClient]) -> TestClient:
    return client_with(review_seed=11)


def test_a_page_offers_only_eligible_diverse_pairs(seeded: TestClient, settings: Settings) -> None:
    gallery = Gallery(settings)
    labelled = []
    for i in range(0, 24, 2):  # label some within-split pairs: they must never come back
        a, b = gallery.faces[i], gallery.faces[i + 6]
        if gallery.split[a] == gallery.split[b]:
            labelled.append(frozenset((str(a), str(b))))
            seeded.post("/v1/feedback", json={"face_a": str(a), "face_b": str(b), "label": 1})

    page = lease(seeded, 20)

    items = page["items"]
    assert len(items) == 20
    assert page["model_id"] == str(gallery.model) and page["threshold"] == THRESHOLD
    uses = Counter(face for item in items for face in key(item))
    assert max(uses.values()) <= 2
    for item in items:
        a, b = uuid.UUID(item["face_a"]["id"]), uuid.UUID(item["face_b"]["id"])
        assert a != b
        assert gallery.split[a] == gallery.split[b] == item["split"]
        assert key(item) not in labelled
        assert item["reason"] in {"uncertain", "likely-same", "hard-different", "explore"}
        assert item["face_a"]["subject"] == gallery.subject[a]
    assert len({item["lease_id"] for item in items}) == 20
    subjects = Counter(s for item in items for s in {item["face_a"]["subject"], item["face_b"]["subject"]})
    assert len(subjects) >= 6  # spread over most of the 8 subjects
    # the gate needs test pairs (20 + 20 by default): the page gives test its capped share, val a steady one
    # Test needs 40 for the gate and val 16 for calibration (it holds 4 same pairs of the 10 it wants);
    # together they take the evaluation cap (half the page) in proportion: 7 and 3.
    assert page["evidence_needed"]["test"] == {"same": 20, "different": 20}
    assert page["evidence_needed"]["val"] == {"same": 6, "different": 10}
    assert page["shares"] == {"train": 10, "val": 3, "test": 7}
    assert Counter(item["split"] for item in items) == Counter(page["shares"])
    assert count_rows(settings, ReviewLease) == 20


def test_training_pairs_carry_informative_reasons(seeded: TestClient, settings: Settings) -> None:
    Gallery(settings)

    items = lease(seeded, 30)["items"]

    train = [item for item in items if item["split"] == "train"]
    reasons = Counter(item["reason"] for item in train)
    assert reasons["hard-different"] + reasons["uncertain"] + reasons["likely-same"] >= len(train) - 2
    for item in train:
        if item["reason"] == "hard-different":
            assert item["face_a"]["subject"] != item["face_b"]["subject"]
        if item["reason"] == "uncertain":
            assert abs(item["score"] - THRESHOLD) <= 0.08 + 1e-9
        if item["reason"] == "likely-same":
            assert item["score"] > THRESHOLD + 0.08
    evaluation = [item for item in items if item["split"] != "train"]
    assert {item["stratum"] for item in evaluation} == {"predicted-same", "predicted-different"}


def test_leased_pairs_are_not_offered_again_until_released(seeded: TestClient, settings: Settings) -> None:
    Gallery(settings)
    first = lease(seeded, 15)["items"]

    second = lease(seeded, 15)["items"]

    assert not {key(item) for item in first} & {key(item) for item in second}
    skipped = first[0]
    assert seeded.delete(f"/v1/review/leases/{skipped['lease_id']}").status_code == 204
    assert_problem(seeded.delete(f"/v1/review/leases/{skipped['lease_id']}"), 404, "unknown-lease")
    assert count_rows(settings, ReviewLease) == 29


def test_an_expired_lease_is_offered_again(seeded: TestClient, settings: Settings) -> None:
    Gallery(settings)
    first = lease(seeded, 10)["items"]
    with session_scope(settings.database_url) as session:
        session.execute(update(ReviewLease).values(expires_at=utcnow() - timedelta(seconds=1)))

    again = lease(seeded, 10)["items"]  # the same seed and state: the same choice, now free again

    assert {key(item) for item in again} == {key(item) for item in first}
    answer = first[0]
    body = {"face_a": answer["face_a"]["id"], "face_b": answer["face_b"]["id"], "label": 1}
    assert_problem(
        seeded.post("/v1/feedback", json={**body, "lease_id": answer["lease_id"]}), 409, "unknown-lease"
    )


def test_answering_a_lease_records_a_review_and_releases_it(seeded: TestClient, settings: Settings) -> None:
    Gallery(settings)
    item = lease(seeded, 3)["items"][0]
    body = {
        "face_a": item["face_b"]["id"],  # either order
        "face_b": item["face_a"]["id"],
        "label": 0,
        "lease_id": item["lease_id"],
    }

    answered = seeded.post("/v1/feedback", json=body, headers={"Idempotency-Key": "k1"})
    replayed = seeded.post("/v1/feedback", json=body, headers={"Idempotency-Key": "k1"})

    assert answered.status_code == 201, answered.text
    assert answered.json()["source"] == "review" and answered.json()["split"] == item["split"]
    assert (replayed.status_code, replayed.json()) == (201, answered.json())
    assert_problem(seeded.post("/v1/feedback", json=body), 409, "unknown-lease")
    with session_scope(settings.database_url) as session:
        assert session.get(ReviewLease, uuid.UUID(item["lease_id"])) is None
    assert count_rows(settings, FeedbackPair) == 1
    later = lease(seeded, 50)["items"]
    assert key(item) not in {key(other) for other in later}


def test_bad_answers_are_refused_and_change_nothing(seeded: TestClient, settings: Settings) -> None:
    gallery = Gallery(settings)
    items = lease(seeded, 2)["items"]
    first, second = items
    other = {"face_a": second["face_a"]["id"], "face_b": second["face_b"]["id"], "label": 1}

    assert_problem(
        seeded.post("/v1/feedback", json={**other, "lease_id": first["lease_id"]}), 409, "lease-mismatch"
    )
    assert_problem(
        seeded.post("/v1/feedback", json={**other, "lease_id": str(uuid.uuid4())}), 409, "unknown-lease"
    )
    with session_scope(settings.database_url) as session:
        session.execute(
            update(ReviewLease)
            .where(ReviewLease.id == uuid.UUID(second["lease_id"]))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    assert_problem(
        seeded.post("/v1/feedback", json={**other, "lease_id": second["lease_id"]}), 409, "lease-expired"
    )
    assert_problem(
        seeded.post("/v1/feedback", json={**other, "lease_id": second["lease_id"], "source": "import"}),
        422,
        "validation-error",
    )
    batch = seeded.post("/v1/feedback/batch", json={"items": [{**other, "lease_id": second["lease_id"]}]})
    assert batch.json()["results"][0]["error"]["type"].endswith("/lease-in-batch")
    assert count_rows(settings, FeedbackPair) == 0
    assert count_rows(settings, ReviewLease) == 2
    with session_scope(settings.database_url) as session:
        assert {f.id: f.split for f in session.scalars(select(Face))} == gallery.split


@pytest.mark.parametrize("limit", [0, -1, 51, 10_000])
def test_a_limit_out_of_range_is_refused(seeded: TestClient, settings: Settings, limit: int) -> None:
    Gallery(settings, subjects=2, per_subject=6)

    assert_problem(seeded.post("/v1/review/leases", json={"limit": limit}), 422, "invalid-limit")

    assert count_rows(settings, ReviewLease) == 0


def test_a_queue_without_a_serving_model_is_refused(client: TestClient, settings: Settings) -> None:
    insert_model(settings)

    assert_problem(client.post("/v1/review/leases", json={"limit": 5}), 409, "no-serving-model")
    assert_problem(client.post("/v1/review/leases", json={"limit": 5, "extra": 1}), 422, "validation-error")
    assert_problem(client.post("/v1/review/leases", json={"limit": "5"}), 422, "validation-error")
    assert_problem(client.post("/v1/review/leases", json={"limit": True}), 422, "validation-error")


def test_a_page_without_a_limit_has_ten_pairs(seeded: TestClient, settings: Settings) -> None:
    Gallery(settings)

    assert len(seeded.post("/v1/review/leases").json()["items"]) == 10
    assert len(seeded.post("/v1/review/leases", json={}).json()["items"]) == 10


def test_the_same_seed_and_state_give_the_same_page(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    Gallery(settings)
    first = lease(client_with(review_seed=5), 10)["items"]
    with session_scope(settings.database_url) as session:
        session.execute(update(ReviewLease).values(expires_at=utcnow() - timedelta(seconds=1)))

    second = lease(client_with(review_seed=5), 10)["items"]

    assert [(key(i), i["reason"]) for i in first] == [(key(i), i["reason"]) for i in second]


def test_two_reviewers_asking_at_once_never_hold_the_same_pair(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    """Both use the same seed, so both choose the same pairs first: one gets them, the other others."""
    import threading

    Gallery(settings)
    reviewers = [client_with(review_seed=11) for _ in range(2)]
    pages: list[list[dict[str, Any]]] = [[], []]
    start = threading.Barrier(2)

    def ask(n: int) -> None:
        start.wait()
        pages[n] = lease(reviewers[n], 12)["items"]

    threads = [threading.Thread(target=ask, args=(n,)) for n in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(pages[0]) == len(pages[1]) == 12
    assert not {key(item) for item in pages[0]} & {key(item) for item in pages[1]}
    assert count_rows(settings, ReviewLease) == 24


def test_only_the_key_a_pair_was_leased_to_may_answer_or_skip_it(
    seeded: TestClient, settings: Settings
) -> None:
    Gallery(settings)
    item = lease(seeded, 2)["items"][0]
    other = bearer(issue_test_key(settings.database_url, ["review", "feedback:write"], name="other reviewer"))
    body = {"face_a": item["face_a"]["id"], "face_b": item["face_b"]["id"], "label": 1}
    stored = count_rows(settings, FeedbackPair)

    answered = seeded.post("/v1/feedback", json={**body, "lease_id": item["lease_id"]}, headers=other)
    skipped = seeded.delete(f"/v1/review/leases/{item['lease_id']}", headers=other)

    assert_problem(answered, 409, "lease-not-yours")
    assert_problem(skipped, 409, "lease-not-yours")
    assert count_rows(settings, FeedbackPair) == stored
    with session_scope(settings.database_url) as session:
        assert session.get(ReviewLease, uuid.UUID(item["lease_id"])) is not None, "the holder keeps its lease"
    assert seeded.post("/v1/feedback", json={**body, "lease_id": item["lease_id"]}).status_code == 201
