"""The dashboard document (`GET /v1/metrics`) and the Prometheus text (`GET /metrics`)."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.db import session_scope
from app.observability import record_feedback_ingested
from app.tables import Activation, Evaluation, FaceEmbedding, FeedbackPair, ModelVersion
from tests.app.factories import face_row, insert_job, insert_model


def insert_faces(settings: Settings, splits: list[str]) -> list[uuid.UUID]:
    with session_scope(settings.database_url) as session:
        faces = [face_row(split=split, byte_size=100) for split in splits]
        session.add_all(faces)
        session.flush()
        return [face.id for face in faces]


def insert_pairs(settings: Settings, faces: list[uuid.UUID], pairs: list[tuple[int, int, int, str]]) -> None:
    with session_scope(settings.database_url) as session:
        for a, b, label, split in pairs:
            low, high = sorted((faces[a], faces[b]))
            session.add(FeedbackPair(face_a=low, face_b=high, label=label, split=split))


def evaluation(model_id: uuid.UUID, job_id: uuid.UUID | None, split: str, auc: float) -> Evaluation:
    return Evaluation(
        model_id=model_id,
        job_id=job_id,
        split=split,
        pairs_sha256="ab" * 32,
        pair_count=40,
        threshold=0.3,
        metrics={"auc": auc},
    )


def test_an_empty_service(client: TestClient) -> None:
    body = client.get("/v1/metrics").json()

    assert body["feedback"]["total"] == 0
    assert body["feedback"]["by_label"] == {"1": 0, "0": 0}
    assert body["faces"] == {
        "total": 0,
        "by_split": {"train": 0, "val": 0, "test": 0},
        "embedded_by_active_model": None,
        "waiting_for_active_model": None,
        "embedded_by_serving_model": None,
        "waiting_for_serving_model": None,
    }
    assert body["jobs"]["total"] == 0
    assert body["active_model"] is None
    assert body["serving_model"] is None
    assert body["latest_finetune"] is None


def test_the_dashboard_counts_and_compares(client: TestClient, settings: Settings) -> None:
    faces = insert_faces(settings, ["train", "train", "train", "test", "test", "val"])
    insert_pairs(
        settings,
        faces,
        [
            (0, 1, 1, "train"),
            (0, 2, 0, "train"),
            (1, 2, 0, "train"),
            (3, 4, 1, "test"),
            (4, 5, 0, "regression"),
        ],
    )
    parent = insert_model(settings)
    finetune = insert_job(
        settings,
        status="succeeded",
        params={"base_model": str(parent)},
        result={"gate": {"promoted": True, "reasons": ["test AUC not worse"], "test": {"auc": 0.99}}},
    )
    insert_job(settings, kind="finetune", status="failed", created_at=datetime.now(UTC) - timedelta(days=1))
    insert_job(settings, kind="reindex", status="running")
    with session_scope(settings.database_url) as session:
        child = ModelVersion(
            arch="mobilefacenet",
            status="ready",
            sha256="cd" * 32,
            byte_size=10,
            parent_id=parent,
            created_by_job_id=finetune,
            threshold=0.31,
        )
        session.add(child)
        session.flush()
        child_id = child.id
        session.add_all(
            [
                evaluation(parent, finetune, "test", 0.95),
                evaluation(child_id, finetune, "test", 0.99),
                evaluation(parent, finetune, "regression", 0.97),
                evaluation(child_id, finetune, "regression", 0.969),
                evaluation(child_id, None, "val", 0.98),
            ]
        )
        session.add(
            Activation(model_id=child.id, previous_model_id=parent, actor="auto-promote", job_id=finetune)
        )
        session.add_all(
            FaceEmbedding(face_id=face, model_id=child_id, vector=b"\0" * 16, quality=20.0)
            for face in faces[:4]
        )

    body = client.get("/v1/metrics").json()

    assert body["feedback"]["total"] == 5
    assert body["feedback"]["by_label"] == {"1": 2, "0": 3}
    assert body["feedback"]["by_split"] == {"train": 3, "val": 0, "test": 1, "cross": 0, "regression": 1}
    assert body["feedback"]["by_split_label"]["train"] == {"1": 1, "0": 2}
    assert body["faces"] == {
        "total": 6,
        "by_split": {"train": 3, "val": 1, "test": 2},
        "embedded_by_active_model": 4,
        "waiting_for_active_model": 2,
        "embedded_by_serving_model": None,
        "waiting_for_serving_model": None,
    }
    assert body["serving_model"] is None  # the child's embeddings do not cover every face yet
    assert body["jobs"]["total"] == 3
    assert body["jobs"]["by_status"]["succeeded"] == 1
    assert body["jobs"]["by_kind_status"]["finetune"] == {
        "queued": 0,
        "running": 0,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }
    active = body["active_model"]
    assert active["id"] == str(child_id)
    assert active["activated_by"] == "auto-promote"
    assert {split: e["metrics"]["auc"] for split, e in active["latest_evaluations"].items()} == {
        "test": 0.99,
        "regression": 0.969,
        "val": 0.98,
    }
    latest = body["latest_finetune"]
    assert latest["job_id"] == str(finetune)
    assert latest["parent_model_id"] == str(parent)
    assert latest["new_model_id"] == str(child_id)
    assert latest["evaluations"]["test"]["candidate"]["metrics"] == {"auc": 0.99}
    assert latest["evaluations"]["test"]["parent"]["metrics"] == {"auc": 0.95}
    assert latest["evaluations"]["regression"]["parent"]["metrics"] == {"auc": 0.97}
    assert latest["promoted"] is True
    assert latest["gate"]["reasons"] == ["test AUC not worse"]


def test_the_serving_model_and_what_waits_for_each_model(client: TestClient, settings: Settings) -> None:
    faces = insert_faces(settings, ["train"] * 5)
    serving, active = insert_model(settings), insert_model(settings)
    with session_scope(settings.database_url) as session:
        session.add_all(
            FaceEmbedding(face_id=f, model_id=serving, vector=b"\0" * 8, quality=1.0) for f in faces[:4]
        )
        session.add_all(
            FaceEmbedding(face_id=f, model_id=active, vector=b"\0" * 8, quality=1.0) for f in faces[:1]
        )
        session.add(
            Activation(
                model_id=serving,
                actor="ops",
                reason="base",
                created_at=datetime.now(UTC) - timedelta(hours=1),
                embedded_at=datetime.now(UTC) - timedelta(minutes=50),
            )
        )
        session.add(Activation(model_id=active, previous_model_id=serving, reason="better"))

    body = client.get("/v1/metrics").json()

    assert {key: body["faces"][key] for key in body["faces"] if key not in ("total", "by_split")} == {
        "embedded_by_active_model": 1,
        "waiting_for_active_model": 4,
        "embedded_by_serving_model": 4,
        "waiting_for_serving_model": 1,
    }
    assert body["active_model"]["id"] == str(active)
    assert body["serving_model"]["id"] == str(serving)
    assert (body["serving_model"]["activated_by"], body["serving_model"]["activation_reason"]) == (
        "ops",
        "base",
    )
    assert body["serving_model"]["embedded_at"].endswith("+00:00")


def test_a_finetune_without_results_is_shown_as_far_as_it_got(client: TestClient, settings: Settings) -> None:
    parent = insert_model(settings)
    insert_job(settings, status="running", params={"base_model": str(parent)}, progress={"epoch": 2})

    latest = client.get("/v1/metrics").json()["latest_finetune"]

    assert latest["status"] == "running"
    assert latest["progress"] == {"epoch": 2}
    assert latest["new_model_id"] is None
    assert latest["gate"] is None
    assert latest["promoted"] is None
    assert latest["evaluations"]["test"] == {"candidate": None, "parent": None}


def _samples(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_prometheus_text_has_the_service_figures(client: TestClient, settings: Settings) -> None:
    started = datetime.now(UTC) - timedelta(minutes=3)
    insert_job(
        settings,
        kind="evaluate",
        status="succeeded",
        started_at=started,
        finished_at=started + timedelta(seconds=90),
    )
    insert_job(settings, kind="finetune", status="queued")
    job_id = insert_job(settings, kind="reindex", status="running")
    client.get(f"/v1/jobs/{job_id}")
    client.get(f"/v1/jobs/{uuid.uuid4()}")
    record_feedback_ingested(1, 2)

    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = _samples(response.text)
    latency = {
        (s.labels["route"], s.labels["status"])
        for s in samples["magtune_http_request_duration_seconds"]
        if s.name.endswith("_count")
    }
    assert {("/v1/jobs/{job_id}", "200"), ("/v1/jobs/{job_id}", "404")} <= latency
    jobs = {(s.labels["kind"], s.labels["status"]): s.value for s in samples["magtune_jobs"]}
    assert jobs == {("evaluate", "succeeded"): 1, ("finetune", "queued"): 1, ("reindex", "running"): 1}
    durations = {
        (s.name, s.labels.get("le")): s.value
        for s in samples["magtune_job_duration_seconds"]
        if s.labels["kind"] == "evaluate"
    }
    assert durations[("magtune_job_duration_seconds_bucket", "60.0")] == 0
    assert durations[("magtune_job_duration_seconds_bucket", "120.0")] == 1
    assert durations[("magtune_job_duration_seconds_count", None)] == 1
    assert durations[("magtune_job_duration_seconds_sum", None)] == pytest.approx(90, abs=0.01)
    ingested = {
        s.labels["label"]: s.value for s in samples["magtune_feedback_ingested"] if s.name.endswith("_total")
    }
    assert ingested["1"] >= 2


def _bootstrap(auc: tuple[float, float, float] | None) -> dict:
    low_high = dict(zip(("estimate", "low", "high"), auc or (None, None, None), strict=True))
    none = {"estimate": None, "low": None, "high": None}
    return {
        "method": "paired percentile bootstrap, resampling faces",
        "samples": 1000,
        "seed": 0,
        "confidence": 0.95,
        "pairs": 120,
        "faces": 40,
        "valid": 1000 if auc else 0,
        "roc_auc": low_high,
        "eer": {"estimate": -0.01, "low": -0.03, "high": 0.004} if auc else none,
        "tar_at_far_1e_2": none,
    }


def test_the_latest_gate_decision_shows_its_intervals_and_evidence(
    client: TestClient, settings: Settings
) -> None:
    assert client.get("/v1/metrics").json()["latest_gate"] is None
    parent, candidate = insert_model(settings), insert_model(settings)
    evidence = {"counts": {"test_same": 5}, "needed": {"test": {"same": 15}}}
    older = datetime.now(UTC) - timedelta(hours=1)
    insert_job(  # an older decision, then the newest; a running fine-tune has none yet
        settings,
        status="succeeded",
        finished_at=older,
        result={"gate": {"promoted": True, "passed": True, "intervals": {"test": _bootstrap(None)}}},
    )
    newest = insert_job(
        settings,
        status="succeeded",
        finished_at=datetime.now(UTC),
        params={"base_model": str(parent)},
        result={
            "model_id": str(candidate),
            "parent_id": str(parent),
            "gate": {
                "promoted": False,
                "passed": False,
                "refusals": ["not-enough-evidence"],
                "reasons": ["not-enough-evidence: test needs 15 more same"],
                "intervals": {"test": _bootstrap((0.01, -0.004, 0.03)), "regression": None},
                "evidence": evidence,
            },
        },
    )
    insert_job(settings, status="running", params={"base_model": str(parent)})

    gate = client.get("/v1/metrics").json()["latest_gate"]

    assert gate["job_id"] == str(newest)
    assert (gate["candidate_model_id"], gate["parent_model_id"]) == (str(candidate), str(parent))
    assert (gate["promoted"], gate["passed"], gate["refusals"]) == (False, False, ["not-enough-evidence"])
    test = gate["intervals"]["test"]
    assert test["roc_auc"] == {"estimate": 0.01, "low": -0.004, "high": 0.03}
    assert test["tar_at_far_1e_2"] == {"estimate": None, "low": None, "high": None}
    assert test["valid"] == 1000 and test["faces"] == 40
    assert gate["intervals"]["regression"] is None
    assert gate["evidence"] == evidence
