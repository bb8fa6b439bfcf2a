"""Verify and search on real processes, checked against numpy over the vectors the workers stored.

On PostgreSQL + Redis with `magtune serve`, a gpu worker and an embed worker, and on the embedded
`magtune up`. The switch from one model to the next is blue/green: while the new model's reindex has not
run, every answer still comes from the previous model's embeddings, and once it has, every answer comes from
the new one's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from sqlalchemy import select

from app.db import session_scope
from app.tables import Face, FaceEmbedding
from tests.e2e.flow import activate, ok, register_model, wait_embedded, wait_for_success
from tests.e2e.services import RunningApi, ServiceProcess, client_with_key

pytestmark = pytest.mark.slow

PEOPLE = ("John_Salley", "John_Savage", "John_Simm")
FACES_PER_PERSON = 4


def _upload_people(http: httpx.Client, johns_dir: Path) -> dict[str, str]:
    """Face id → subject, for a few images of each person."""
    faces: dict[str, str] = {}
    for person in PEOPLE:
        for image in sorted((johns_dir / "aligned_112" / person).glob("*.png"))[:FACES_PER_PERSON]:
            files = {"file": ("face.png", image.read_bytes(), "image/png")}
            face = ok(http.post("/v1/faces", files=files, data={"subject": person}), 200, 201)
            faces[face["id"]] = person
    return faces


def _stored_vectors(database_url: str, model_id: str) -> dict[str, np.ndarray]:
    with session_scope(database_url) as session:
        rows = session.execute(
            select(FaceEmbedding.face_id, FaceEmbedding.vector).where(
                FaceEmbedding.model_id == uuid.UUID(model_id)
            )
        ).all()
        assert session.scalar(select(Face.id).limit(1)) is not None
    return {str(face_id): np.frombuffer(raw, dtype="<f4").astype(np.float64) for face_id, raw in rows}


def _check_answers(
    http: httpx.Client, database_url: str, model_id: str, faces: dict[str, str]
) -> dict[str, np.ndarray]:
    """Verify and search answer with `model_id`'s stored vectors, to 1e-6, and nothing else."""
    vectors = _stored_vectors(database_url, model_id)
    assert set(vectors) >= set(faces), "every uploaded face is embedded by the serving model"
    ids = list(faces)
    same_person = next(b for b in ids[1:] if faces[b] == faces[ids[0]])
    other_person = next(b for b in ids if faces[b] != faces[ids[0]])
    for face_b in (same_person, other_person):
        answer = ok(http.post("/v1/verify", json={"face_a": ids[0], "face_b": face_b}), 200)
        assert answer["model_id"] == model_id
        assert answer["score"] == pytest.approx(float(vectors[ids[0]] @ vectors[face_b]), abs=1e-6)
        if answer["threshold"] is None:
            assert answer["same"] is None and answer["same_reason"]
        else:
            assert answer["same"] == (answer["score"] >= answer["threshold"])

    k = 5
    found = ok(http.post("/v1/search", json={"face": ids[0], "k": k}), 200)
    assert found["model_id"] == model_id
    others = [face_id for face_id in vectors if face_id != ids[0]]
    scores = np.array([vectors[face_id] @ vectors[ids[0]] for face_id in others])
    order = np.argsort(-scores, kind="stable")[:k]
    assert [match["id"] for match in found["results"]] == [others[i] for i in order]
    assert [match["score"] for match in found["results"]] == pytest.approx(scores[order].tolist(), abs=1e-6)
    best_by_subject: dict[str, float] = {}
    for face_id, score in zip(others, scores, strict=True):
        subject = faces.get(face_id)
        if subject is not None:
            best_by_subject[subject] = max(best_by_subject.get(subject, -2.0), float(score))
    expected_subjects = sorted(best_by_subject.items(), key=lambda item: -item[1])
    assert [(s["subject"], s["score"]) for s in found["subjects"]] == [
        (name, pytest.approx(score, abs=1e-6)) for name, score in expected_subjects
    ]
    return vectors


def _perturbed_copy(checkpoint: Path, target: Path) -> Path:
    """Another real model: the same network with its weights nudged, so its embeddings differ."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    nudged = {
        name: tensor + 0.05 * tensor.std() * torch.randn(tensor.shape, generator=generator)
        if tensor.is_floating_point() and tensor.dim() == 4
        else tensor
        for name, tensor in state.items()
    }
    torch.save(nudged, target)
    return target


def test_verify_and_search_answer_from_the_serving_model_and_switch_only_when_its_successor_is_complete(
    http: httpx.Client,
    service_settings: dict[str, str],
    start_worker: Callable[[], ServiceProcess],
    start_embed_worker: Callable[[], ServiceProcess],
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
    tmp_path: Path,
) -> None:
    database_url = service_settings["MAGTUNE_DATABASE_URL"]
    gpu = start_worker()
    start_embed_worker()
    first = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
    second = register_model(
        http, _perturbed_copy(mobilefacenet_checkpoint, tmp_path / "nudged.pt"), "mobilefacenet"
    )
    wait_for_success(http, activate(http, first["id"], "base")["reindex_job_id"])

    faces = _upload_people(http, johns_dir)  # after the activation: embedded on arrival
    wait_embedded(http, list(faces))
    first_vectors = _check_answers(http, database_url, first["id"], faces)

    gpu.stop()  # the second model's reindex waits for a gpu worker: the first must keep answering
    reindex = activate(http, second["id"], "nudged")["reindex_job_id"]
    active = ok(http.get("/v1/models/active"), 200)
    assert (active["id"], active["serving_model_id"], active["switching"]) == (
        second["id"],
        first["id"],
        True,
    )
    assert active["waiting_faces"] == len(faces)
    _check_answers(http, database_url, first["id"], faces)
    assert _stored_vectors(database_url, second["id"]) == {}

    start_worker()
    wait_for_success(http, reindex)
    active = ok(http.get("/v1/models/active"), 200)
    assert (active["serving_model_id"], active["switching"], active["waiting_faces"]) == (
        second["id"],
        False,
        0,
    )
    second_vectors = _check_answers(http, database_url, second["id"], faces)
    assert any(
        not np.allclose(first_vectors[face_id], second_vectors[face_id], atol=1e-4) for face_id in faces
    ), "the two models embed differently, so the answers above came from the second model's vectors"


def test_verify_and_search_on_the_embedded_default(
    start_up: Callable[[Path], RunningApi],
    tmp_path: Path,
    johns_dir: Path,
    mobilefacenet_checkpoint: Path,
) -> None:
    data_dir = tmp_path / "data"
    up = start_up(data_dir)
    assert up.admin_key is not None, "magtune up prints its admin key on first start"
    with client_with_key(up.url, up.admin_key) as http:
        model = register_model(http, mobilefacenet_checkpoint, "mobilefacenet")
        wait_for_success(http, activate(http, model["id"], "base")["reindex_job_id"])
        faces = _upload_people(http, johns_dir)
        wait_embedded(http, list(faces))
        _check_answers(http, f"sqlite:///{(data_dir / 'magtune.db').resolve()}", model["id"], faces)
        refused: dict[str, Any] = http.post("/v1/search", json={"face": next(iter(faces)), "k": 101}).json()
    assert refused["status"] == 422
