"""POST /v1/search against the real PostgreSQL: the answer equals brute force over the serving model's stored
vectors (with either path of the in-memory index), stays exact as embeddings arrive and faces go, and never
reads another model's vectors."""

import uuid
from collections.abc import Sequence

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics.pairwise import cosine_similarity

from app.config import Settings
from app.search import index as index_module
from app.search.service import cached_index
from app.tables import Activation, Face, FaceEmbedding, Job
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

THRESHOLD = 0.25
N = 300
DIM = 32


class Stored:
    """The faces and vectors a test stored, and brute force over them."""

    def __init__(
        self, model: uuid.UUID, faces: list[uuid.UUID], vectors: np.ndarray, subjects, sources
    ) -> None:
        self.model, self.faces, self.vectors = model, list(faces), vectors
        self.subjects, self.sources = list(subjects), list(sources)

    def add(self, faces: Sequence[uuid.UUID], vectors: np.ndarray, subjects, sources) -> None:
        self.faces += faces
        self.vectors = np.concatenate([self.vectors, vectors])
        self.subjects += subjects
        self.sources += sources

    def drop(self, face: uuid.UUID) -> None:
        row = self.faces.index(face)
        del self.faces[row], self.subjects[row], self.sources[row]
        self.vectors = np.delete(self.vectors, row, axis=0)

    def brute(self, face: uuid.UUID, k: int, subject: str | None = None, source: str | None = None):
        """(faces, subjects) as the api should rank them: scores by scikit-learn in float64."""
        q = self.faces.index(face)
        scores = cosine_similarity(
            self.vectors[q : q + 1].astype(np.float64), self.vectors.astype(np.float64)
        )[0]
        rows = [
            r
            for r in range(len(self.faces))
            if r != q
            and (subject is None or self.subjects[r] == subject)
            and (source is None or self.sources[r] == source)
        ]
        rows.sort(key=lambda r: -scores[r])
        best: dict[str, int] = {}
        for r in rows:
            if self.subjects[r] is not None:
                best.setdefault(self.subjects[r], r)
        faces = [(self.faces[r], float(scores[r])) for r in rows[:k]]
        subjects = [(name, self.faces[r], float(scores[r])) for name, r in list(best.items())[:k]]
        return faces, subjects


@pytest.fixture(params=["float32", "8-bit"])
def index_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The index as configured for small sets (float32 scans), and with its 8-bit first pass from 64 rows."""
    if request.param == "8-bit":
        if index_module.faiss is None:
            pytest.skip("faiss-cpu is not installed")
        monkeypatch.setattr(index_module, "QUANTIZE_MIN_VALUES", 64 * DIM)
    return request.param


def store(settings: Settings, n: int = N, *, seed: int = 0, serving: bool = True) -> Stored:
    rng = np.random.default_rng(seed)
    subjects = [None if i % 11 == 0 else f"s{i % 23}" for i in range(n)]
    sources = [("cam", "web", None)[i % 3] for i in range(n)]
    faces = insert_faces(settings, subjects, sources)
    model = insert_model(settings)
    set_threshold(settings, model, THRESHOLD)
    vectors = unit_vectors(rng, n, DIM)
    embed(settings, model, faces, vectors)
    activate(settings, model, serving=serving)
    return Stored(model, faces, vectors, subjects, sources)


def search(client: TestClient, face: uuid.UUID, **fields) -> dict:
    response = client.post("/v1/search", json={"face": str(face), **fields})
    assert response.status_code == 200, response.text
    return response.json()


def assert_matches(body: dict, stored: Stored, face: uuid.UUID, k: int, **filters) -> None:
    faces, subjects = stored.brute(face, k, **filters)
    assert [m["id"] for m in body["results"]] == [str(f) for f, _ in faces]
    for match, (face_id, score) in zip(body["results"], faces, strict=True):
        assert match["score"] == pytest.approx(score, abs=1e-6)
        row = stored.faces.index(face_id)
        assert (match["subject"], match["source"]) == (stored.subjects[row], stored.sources[row])
        threshold = body["threshold"]
        assert match["same"] is (None if threshold is None else match["score"] >= threshold)
    assert [(s["subject"], s["best_face"]) for s in body["subjects"]] == [(n, str(f)) for n, f, _ in subjects]
    for got, (_, _, score) in zip(body["subjects"], subjects, strict=True):
        assert got["score"] == pytest.approx(score, abs=1e-6)
    assert body["model_id"] == str(stored.model) and body["face"] == str(face)


def test_search_equals_brute_force(client: TestClient, settings: Settings, index_path: str) -> None:
    stored = store(settings)

    for q in (0, 7, 150):
        face = stored.faces[q]
        for k in (1, 5, 30, 100):
            assert_matches(search(client, face, k=k), stored, face, k)
        assert_matches(search(client, face), stored, face, 10)
        for filters in ({"subject": "s4"}, {"source": "web"}, {"subject": "s5", "source": "cam"}):
            assert_matches(search(client, face, k=7, **filters), stored, face, 7, **filters)
        for filters in ({"subject": "nobody"}, {"source": "nowhere"}):
            body = search(client, face, **filters)
            assert body["results"] == [] and body["subjects"] == []
    entry = cached_index(settings.database_url, stored.model)
    assert entry.rows_read == N
    assert entry.index.quantized is (index_path == "8-bit")


def test_fewer_subjects_than_k_are_all_ranked(client: TestClient, settings: Settings) -> None:
    stored = store(settings, 60)

    body = search(client, stored.faces[1], k=100)

    assert len(body["results"]) == 59 and len(body["subjects"]) == 23
    assert_matches(body, stored, stored.faces[1], 100)


def test_new_embeddings_become_searchable_without_reloading(
    client: TestClient, settings: Settings, index_path: str
) -> None:
    stored = store(settings)
    face = stored.faces[3]
    search(client, face)
    entry = cached_index(settings.database_url, stored.model)
    index, read = entry.index, entry.rows_read
    search(client, face)
    assert entry.rows_read == read  # nothing new: one generation lookup, no rows

    rng = np.random.default_rng(9)
    near = stored.vectors[3] + 0.05 * rng.standard_normal((5, DIM)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    new_faces = insert_faces(settings, ["newcomer"] * 5, ["cam"] * 5)
    embed(settings, stored.model, new_faces, near)
    stored.add(new_faces, near, ["newcomer"] * 5, ["cam"] * 5)

    body = search(client, face, k=20)

    assert_matches(body, stored, face, 20)
    assert {m["id"] for m in body["results"][:5]} == {str(f) for f in new_faces}
    assert body["subjects"][0]["subject"] == "newcomer"
    assert cached_index(settings.database_url, stored.model) is entry and entry.index is index
    assert entry.rows_read == read + 5

    # A re-embedding of stored faces (a later generation) replaces their rows in place.
    moved = unit_vectors(rng, 2, DIM)
    embed(settings, stored.model, stored.faces[10:12], moved)
    stored.vectors[10:12] = moved
    assert_matches(search(client, face, k=50), stored, face, 50)
    assert entry.rows_read == read + 7 and len(entry.index) == N + 5


def test_deleted_faces_disappear_from_results(
    client: TestClient, settings: Settings, index_path: str
) -> None:
    stored = store(settings)
    face = stored.faces[0]
    first = search(client, face, k=5)
    entry = cached_index(settings.database_url, stored.model)
    read = entry.rows_read
    gone = [uuid.UUID(first["results"][0]["id"]), uuid.UUID(first["subjects"][1]["best_face"])]

    for face_id in gone:
        assert client.delete(f"/v1/faces/{face_id}").status_code == 204
        stored.drop(face_id)
    body = search(client, face, k=5)

    assert_matches(body, stored, face, 5)
    assert not {str(f) for f in gone} & {m["id"] for m in body["results"]}
    assert all(f not in entry.index for f in gone)
    assert entry.rows_read == read


def test_the_serving_model_switches_only_once_its_activation_is_embedded(
    client: TestClient, settings: Settings
) -> None:
    old = store(settings)
    face = old.faces[2]
    search(client, face)
    new_model = insert_model(settings)
    new_vectors = unit_vectors(np.random.default_rng(5), N, DIM)
    embed(settings, new_model, old.faces, new_vectors)
    activation = activate(settings, new_model, serving=False)

    before = search(client, face, k=10)
    assert_matches(before, old, face, 10)
    assert cached_index(settings.database_url, new_model) is None

    mark_serving(settings, activation)
    after = search(client, face, k=10)

    new = Stored(new_model, old.faces, new_vectors, old.subjects, old.sources)
    assert_matches(after, new, face, 10)
    assert after["threshold"] is None and after["same_reason"] is not None
    assert all(match["same"] is None for match in after["results"])
    assert cached_index(settings.database_url, old.model) is None  # the old model's index was dropped


@pytest.mark.parametrize(
    "fields",
    [
        {"k": 0},
        {"k": 101},
        {"k": "many"},
        {"subject": ""},
        {"source": "x" * 257},
        {"subject": "an\u0000n"},  # PostgreSQL cannot store NUL in text
        {"source": "\u0000"},
        {"limit": 3},
    ],
)
def test_bad_requests_are_422(client: TestClient, settings: Settings, fields: dict) -> None:
    face = insert_faces(settings, ["ann"])[0]

    assert_problem(client.post("/v1/search", json={"face": str(face), **fields}), 422, "validation-error")
    assert_problem(client.post("/v1/search", json=fields), 422, "validation-error")


def test_refusals_change_nothing(client: TestClient, settings: Settings) -> None:
    stored = store(settings, 20)
    late = insert_faces(settings, ["ann"])[0]
    counts = [count_rows(settings, table) for table in (Face, FaceEmbedding, Job, Activation)]

    assert_problem(client.post("/v1/search", json={"face": str(uuid.uuid4())}), 404, "unknown-face")
    response = client.post("/v1/search", json={"face": str(late)})
    problem = assert_problem(response, 409, "not-embedded")
    assert response.headers["Retry-After"] == "5"
    assert (problem["face_id"], problem["model_id"]) == (str(late), str(stored.model))

    assert [count_rows(settings, table) for table in (Face, FaceEmbedding, Job, Activation)] == counts


def test_no_serving_model_is_a_409(client: TestClient, settings: Settings) -> None:
    stored = store(settings, 5, serving=False)

    assert_problem(client.post("/v1/search", json={"face": str(stored.faces[0])}), 409, "no-serving-model")
