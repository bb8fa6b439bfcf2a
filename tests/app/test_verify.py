"""POST /v1/verify against the real PostgreSQL, with known unit vectors stored as the worker stores them."""

import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics.pairwise import cosine_similarity

from app.config import Settings
from app.tables import Activation, FaceEmbedding, Job
from tests.app.embedding_factories import (
    activate,
    embed,
    insert_faces,
    mark_serving,
    set_threshold,
    unit_vectors,
)
from tests.app.factories import count_rows, insert_model
from tests.app.problems import assert_problem

THRESHOLD = 0.3


@pytest.fixture
def served(settings: Settings) -> tuple[uuid.UUID, list[uuid.UUID], np.ndarray]:
    """A serving model with a threshold and six faces: three of "ann", two of "bob", one without a subject."""
    model = insert_model(settings)
    set_threshold(settings, model, THRESHOLD)
    faces = insert_faces(settings, ["ann", "ann", "ann", "bob", "bob", None])
    vectors = unit_vectors(np.random.default_rng(1), len(faces))
    embed(settings, model, faces, vectors)
    activate(settings, model, serving=True)
    return model, faces, vectors


def stored_state(settings: Settings) -> tuple[int, int, int]:
    return count_rows(settings, FaceEmbedding), count_rows(settings, Job), count_rows(settings, Activation)


def test_a_pair_scores_the_cosine_of_its_stored_vectors(client: TestClient, served) -> None:
    model, faces, vectors = served
    expected = cosine_similarity(vectors.astype(np.float64))

    for i, j in [(0, 1), (0, 3), (4, 5), (2, 1)]:
        body = client.post("/v1/verify", json={"face_a": str(faces[i]), "face_b": str(faces[j])}).json()

        assert body["score"] == pytest.approx(expected[i, j], abs=1e-6)
        assert body["model_id"] == str(model)
        assert body["threshold"] == THRESHOLD
        assert body["same"] is (body["score"] >= THRESHOLD)
        assert body["same_reason"] is None
        assert (body["face_a"], body["face_b"]) == (str(faces[i]), str(faces[j]))


def test_a_pair_scores_exactly_at_the_threshold_as_same(
    client: TestClient, settings: Settings, served
) -> None:
    model, faces, vectors = served
    score = float(np.dot(vectors[0].astype(np.float64), vectors[1].astype(np.float64)))
    set_threshold(settings, model, score)

    body = client.post("/v1/verify", json={"face_a": str(faces[0]), "face_b": str(faces[1])}).json()

    assert body["same"] is True


def test_without_a_threshold_same_is_null_with_the_reason(
    client: TestClient, settings: Settings, served
) -> None:
    model, faces, _ = served
    set_threshold(settings, model, None)

    pair = client.post("/v1/verify", json={"face_a": str(faces[0]), "face_b": str(faces[1])}).json()
    subject = client.post("/v1/verify", json={"face": str(faces[0]), "subject": "bob"}).json()

    for body in (pair, subject):
        assert body["same"] is None and body["threshold"] is None
        assert body["same_reason"] == "the serving model has no calibrated threshold yet"


def test_a_face_against_a_subject_compares_every_other_embedded_face(
    client: TestClient, settings: Settings, served
) -> None:
    model, faces, vectors = served
    waiting = insert_faces(settings, ["ann"])[0]  # stored, not embedded yet
    expected = cosine_similarity(vectors.astype(np.float64))

    body = client.post("/v1/verify", json={"face": str(faces[0]), "subject": "ann"}).json()

    others = expected[0, [1, 2]]
    assert body["compared"] == 2 and body["waiting"] == 1
    assert body["best_score"] == pytest.approx(others.max(), abs=1e-6)
    assert body["mean_score"] == pytest.approx(others.mean(), abs=1e-6)
    assert body["best_face"] == str(faces[1 + int(np.argmax(others))])
    assert body["same"] is (body["best_score"] >= THRESHOLD)
    assert (body["face"], body["subject"], body["model_id"]) == (str(faces[0]), "ann", str(model))

    of_bob = client.post("/v1/verify", json={"face": str(faces[5]), "subject": "bob"}).json()
    assert of_bob["compared"] == 2 and of_bob["waiting"] == 0
    assert of_bob["best_score"] == pytest.approx(expected[5, [3, 4]].max(), abs=1e-6)
    assert waiting not in {body["best_face"], of_bob["best_face"]}


def test_only_the_serving_model_answers_until_the_new_one_covers_every_face(
    client: TestClient, settings: Settings, served
) -> None:
    old, faces, old_vectors = served
    new = insert_model(settings)
    new_vectors = unit_vectors(np.random.default_rng(2), len(faces))
    embed(settings, new, faces, new_vectors)
    activation = activate(settings, new, serving=False)
    pair = {"face_a": str(faces[0]), "face_b": str(faces[3])}

    before = client.post("/v1/verify", json=pair).json()
    mark_serving(settings, activation)
    after = client.post("/v1/verify", json=pair).json()

    assert before["model_id"] == str(old)
    assert before["score"] == pytest.approx(float(old_vectors[0].astype(float) @ old_vectors[3]), abs=1e-6)
    assert after["model_id"] == str(new) and after["threshold"] is None
    assert after["score"] == pytest.approx(float(new_vectors[0].astype(float) @ new_vectors[3]), abs=1e-6)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"face_a": str(uuid.uuid4())},
        {"face": str(uuid.uuid4())},
        {"subject": "ann"},
        {
            "face_a": str(uuid.uuid4()),
            "face_b": str(uuid.uuid4()),
            "face": str(uuid.uuid4()),
            "subject": "ann",
        },
        {"face_a": str(uuid.uuid4()), "face_b": str(uuid.uuid4()), "subject": "ann"},
        {"face": str(uuid.uuid4()), "subject": ""},
        {"face": str(uuid.uuid4()), "subject": "x" * 257},
        {"face": str(uuid.uuid4()), "subject": "an\u0000n"},  # PostgreSQL cannot store NUL in text
        {"face_a": "not-a-uuid", "face_b": str(uuid.uuid4())},
        {"face_a": str(uuid.uuid4()), "face_b": str(uuid.uuid4()), "threshold": 0.5},
    ],
)
def test_anything_but_exactly_one_form_is_a_422(client: TestClient, body: dict) -> None:
    assert_problem(client.post("/v1/verify", json=body), 422, "validation-error")


def test_refusals(client: TestClient, settings: Settings, served) -> None:
    model, faces, _ = served
    unknown = uuid.uuid4()
    late = insert_faces(settings, ["carl", "carl"])
    before = stored_state(settings)

    both = assert_problem(
        client.post("/v1/verify", json={"face_a": str(unknown), "face_b": str(uuid.uuid4())}),
        404,
        "unknown-face",
    )
    assert [error["loc"] for error in both["errors"]] == [["body", "face_a"], ["body", "face_b"]]
    assert str(unknown) in both["detail"]
    assert_problem(
        client.post("/v1/verify", json={"face": str(unknown), "subject": "ann"}), 404, "unknown-face"
    )
    assert_problem(
        client.post("/v1/verify", json={"face_a": str(faces[0]), "face_b": str(faces[0])}), 422, "same-face"
    )
    nobody = assert_problem(
        client.post("/v1/verify", json={"face": str(faces[0]), "subject": "nobody"}), 404, "unknown-subject"
    )
    assert nobody["subject"] == "nobody"
    response = client.post("/v1/verify", json={"face": str(late[0]), "subject": "ann"})
    problem = assert_problem(response, 409, "not-embedded")
    assert response.headers["Retry-After"] == "5"
    assert (problem["face_id"], problem["model_id"]) == (str(late[0]), str(model))

    response = client.post("/v1/verify", json={"face_a": str(faces[0]), "face_b": str(late[1])})
    problem = assert_problem(response, 409, "not-embedded")
    assert response.headers["Retry-After"] == "5"
    assert (problem["face_id"], problem["model_id"]) == (str(late[1]), str(model))

    response = client.post("/v1/verify", json={"face": str(faces[0]), "subject": "carl"})
    problem = assert_problem(response, 409, "not-embedded")
    assert response.headers["Retry-After"] == "5"
    assert (problem["subject"], problem["model_id"]) == ("carl", str(model))
    assert stored_state(settings) == before


def test_a_subject_with_only_the_face_itself_is_unknown(
    client: TestClient, settings: Settings, served
) -> None:
    alone = insert_faces(settings, ["dora"])[0]

    assert_problem(
        client.post("/v1/verify", json={"face": str(alone), "subject": "dora"}), 404, "unknown-subject"
    )


def test_no_serving_model_is_a_409(client: TestClient, settings: Settings) -> None:
    faces = insert_faces(settings, ["ann", "ann"])
    model = insert_model(settings)
    embed(settings, model, faces, unit_vectors(np.random.default_rng(3), 2))
    activate(settings, model, serving=False)  # activated, its embeddings not yet known to cover every face

    for body in (
        {"face_a": str(faces[0]), "face_b": str(faces[1])},
        {"face": str(faces[0]), "subject": "ann"},
    ):
        assert_problem(client.post("/v1/verify", json=body), 409, "no-serving-model")
