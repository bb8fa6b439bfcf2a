"""/v1/faces against the real PostgreSQL: uploads of real face crops, every refusal, listing and erasure."""

import hashlib
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from app.config import Settings
from app.db import get_engine, session_scope
from app.domain import JobKind, JobStatus
from app.faces import service as face_service
from app.splits import split_for_digest
from app.tables import Activation, Face, FaceEmbedding, FeedbackPair, Job, ModelVersion, utcnow
from tests.app.factories import activate_directly, count_rows, insert_face, insert_model
from tests.app.problems import assert_problem
from tests.queues import QueueProbe
from tests.services import CLOSED_PORT_BROKER

# ---- helpers ---------------------------------------------------------------------------------------------


def blob_files(settings: Settings) -> list[Path]:
    """Every file under the blob store, temp files included."""
    return sorted(path for path in settings.blob_dir.rglob("*") if path.is_file())


def png(width: int, height: int, idat: bytes) -> bytes:
    """A greyscale PNG assembled by hand, so its header can claim any size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def upload(client: TestClient, data: bytes, name: str = "face.png", **fields: str) -> Response:
    return client.post("/v1/faces", files={"file": (name, data, "application/octet-stream")}, data=fields)


# ---- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def face_pngs(johns_dir: Path) -> list[Path]:
    paths = sorted((johns_dir / "aligned_112").glob("*/*.png"))
    assert len(paths) >= 12
    return paths


# ---- upload ----------------------------------------------------------------------------------------------


def test_upload_stores_a_face_crop(client: TestClient, settings: Settings, face_pngs: list[Path]) -> None:
    data = face_pngs[0].read_bytes()
    sha = hashlib.sha256(data).hexdigest()

    response = upload(client, data, subject="John_Salley", source="johns")

    assert response.status_code == 201, response.text
    face = response.json()
    assert response.headers["location"] == f"/v1/faces/{face['id']}"
    assert face["sha256"] == sha
    assert (face["width"], face["height"], face["channels"]) == (112, 112, 3)
    assert face["media_type"] == "image/png"
    assert face["byte_size"] == len(data)
    assert face["split"] == split_for_digest(sha, settings.split_fractions)
    assert (face["subject"], face["source"]) == ("John_Salley", "johns")
    assert face["created_at"].endswith("+00:00")
    assert blob_files(settings) == [settings.blob_dir / "faces" / sha[:2] / sha]
    assert blob_files(settings)[0].read_bytes() == data


def test_the_same_bytes_again_return_the_existing_face(
    client: TestClient, settings: Settings, face_pngs: list[Path]
) -> None:
    data = face_pngs[1].read_bytes()
    first = upload(client, data, subject="first")

    again = upload(client, data, name="renamed.png", subject="second")

    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert count_rows(settings, Face) == 1
    assert len(blob_files(settings)) == 1


def test_a_jpeg_keeps_its_media_type(client: TestClient, johns_dir: Path) -> None:
    jpeg = sorted((johns_dir / "original").glob("*/*.jpg"))[0]

    response = upload(client, jpeg.read_bytes(), name=jpeg.name)

    assert response.status_code == 201, response.text
    assert response.json()["media_type"] == "image/jpeg"
    image = client.get(f"/v1/faces/{response.json()['id']}/image")
    assert image.headers["content-type"] == "image/jpeg"
    assert image.content == jpeg.read_bytes()


# ---- refused uploads: nothing may be stored --------------------------------------------------------------


def _truncated(face_pngs: list[Path]) -> bytes:
    data = face_pngs[2].read_bytes()
    return data[: len(data) // 2]


def _real_bomb() -> bytes:
    """A valid 8000×6000 black PNG of ~50 kB: 48 megapixels, over the default 40 M limit."""
    compressor = zlib.compressobj(9)
    row = bytes(8000 + 1)
    idat = b"".join(compressor.compress(row) for _ in range(6000)) + compressor.flush()
    return png(8000, 6000, idat)


REFUSED_UPLOADS: list[tuple[str, Callable[[list[Path]], bytes], int, str]] = [
    ("text", lambda _: b"definitely not an image\n" * 10, 415, "not-an-image"),
    ("gif", lambda _: b"GIF89a" + bytes(64), 415, "not-an-image"),
    ("truncated-png", _truncated, 422, "corrupt-image"),
    ("declared-bomb", lambda _: png(100_000, 100_000, zlib.compress(bytes(100))), 422, "image-too-large"),
    ("real-bomb", lambda _: _real_bomb(), 422, "image-too-large"),
    ("empty", lambda _: b"", 422, "empty-upload"),
]


@pytest.mark.parametrize(
    ("make_bytes", "status", "kind"),
    [case[1:] for case in REFUSED_UPLOADS],
    ids=[case[0] for case in REFUSED_UPLOADS],
)
def test_refused_uploads_store_nothing(
    client: TestClient,
    settings: Settings,
    face_pngs: list[Path],
    make_bytes: Callable[[list[Path]], bytes],
    status: int,
    kind: str,
) -> None:
    response = upload(client, make_bytes(face_pngs))

    assert_problem(response, status, kind)
    assert count_rows(settings, Face) == 0
    assert blob_files(settings) == []


def test_a_file_over_the_size_limit_is_refused_while_streaming(
    client_with: Callable[..., TestClient], settings: Settings, face_pngs: list[Path]
) -> None:
    data = face_pngs[3].read_bytes()
    limited = client_with(max_image_bytes=len(data) - 1)

    body = assert_problem(upload(limited, data), 413, "upload-too-large")

    assert body["max_bytes"] == len(data) - 1
    assert count_rows(settings, Face) == 0
    assert blob_files(settings) == []
    assert upload(client_with(max_image_bytes=len(data)), data).status_code == 201


def test_a_body_declared_far_over_the_limit_is_refused_before_reading(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    limited = client_with(max_image_bytes=1000)

    assert_problem(upload(limited, bytes(200_000)), 413, "upload-too-large")
    assert blob_files(settings) == []


def test_a_chunked_body_without_length_is_cut_off_at_the_limit(
    client_with: Callable[..., TestClient], settings: Settings
) -> None:
    limited = client_with(max_image_bytes=1000)
    boundary = "magtuneboundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(100):
            yield bytes(1000)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = limited.post(
        "/v1/faces", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )

    assert_problem(response, 413, "upload-too-large")
    assert blob_files(settings) == []


def test_a_request_without_a_file_is_refused(client: TestClient, settings: Settings) -> None:
    no_file = client.post("/v1/faces", files={"subject": (None, "nobody")})
    body = assert_problem(no_file, 422, "validation-error")

    assert body["errors"][0]["loc"] == ["body", "file"]
    assert_problem(client.post("/v1/faces", data={"subject": "nobody"}), 415, "expected-multipart")
    assert_problem(client.post("/v1/faces", json={"file": "x"}), 415, "expected-multipart")
    assert count_rows(settings, Face) == 0


def test_an_over_long_subject_is_refused(
    client: TestClient, settings: Settings, face_pngs: list[Path]
) -> None:
    body = assert_problem(
        upload(client, face_pngs[0].read_bytes(), subject="x" * 257), 422, "validation-error"
    )

    assert body["errors"][0]["loc"] == ["body", "subject"]
    assert count_rows(settings, Face) == 0
    assert blob_files(settings) == []


@pytest.mark.parametrize("field", ["subject", "source"])
def test_a_label_holding_nul_is_refused(
    client: TestClient, settings: Settings, face_pngs: list[Path], field: str
) -> None:
    response = upload(client, face_pngs[0].read_bytes(), **{field: "an\u0000n"})  # PostgreSQL refuses NUL

    body = assert_problem(response, 422, "validation-error")
    assert [error["loc"] for error in body["errors"]] == [["body", field]]
    assert count_rows(settings, Face) == 0
    assert blob_files(settings) == []


# ---- read, list ------------------------------------------------------------------------------------------


def test_read_a_face_and_its_image(client: TestClient, face_pngs: list[Path]) -> None:
    data = face_pngs[4].read_bytes()
    face = upload(client, data).json()

    assert client.get(f"/v1/faces/{face['id']}").json() == face
    image = client.get(f"/v1/faces/{face['id']}/image")
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.content == data


@pytest.mark.parametrize("suffix", ["", "/image"])
def test_unknown_and_malformed_face_ids(client: TestClient, suffix: str) -> None:
    body = assert_problem(client.get(f"/v1/faces/{uuid.uuid4()}{suffix}"), 404, "unknown-face")
    assert "no face with id" in body["detail"]

    assert_problem(client.get(f"/v1/faces/not-a-uuid{suffix}"), 422, "validation-error")


def test_listing_pages_through_every_face_once(client: TestClient, face_pngs: list[Path]) -> None:
    uploaded = [upload(client, path.read_bytes(), subject=path.parent.name).json() for path in face_pngs[:11]]

    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/faces", params=params).json()
        seen.extend(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 4
    assert len(seen) == len(uploaded)
    assert {face["id"] for face in seen} == {face["id"] for face in uploaded}
    order = [(face["created_at"], face["id"]) for face in seen]
    assert order == sorted(order, reverse=True)


def test_listing_filters_by_subject_and_split(client: TestClient, face_pngs: list[Path]) -> None:
    uploaded = [upload(client, path.read_bytes(), subject=path.parent.name).json() for path in face_pngs[:12]]

    subject = uploaded[0]["subject"]
    by_subject = client.get("/v1/faces", params={"subject": subject}).json()["items"]
    assert {f["id"] for f in by_subject} == {f["id"] for f in uploaded if f["subject"] == subject}

    for split in ("train", "val", "test"):
        listed = client.get("/v1/faces", params={"split": split, "limit": 100}).json()["items"]
        assert {f["id"] for f in listed} == {f["id"] for f in uploaded if f["split"] == split}


@pytest.mark.parametrize("param", ["subject", "split"])
def test_a_list_filter_holding_nul_is_refused(client: TestClient, settings: Settings, param: str) -> None:
    insert_face(settings, subject="ann")

    body = assert_problem(client.get("/v1/faces", params={param: "an\u0000n"}), 422, "validation-error")

    assert [error["loc"] for error in body["errors"]] == [["query", param]]


def test_a_cursor_not_issued_by_the_api_is_refused(client: TestClient) -> None:
    assert_problem(client.get("/v1/faces", params={"cursor": "garbage"}), 400, "invalid-cursor")


# ---- erase -----------------------------------------------------------------------------------------------


def test_delete_erases_the_image_embeddings_and_feedback(
    client: TestClient, settings: Settings, face_pngs: list[Path]
) -> None:
    doomed, kept, other = (upload(client, path.read_bytes()).json() for path in face_pngs[5:8])
    for partner in (kept, other):
        response = client.post(
            "/v1/feedback", json={"face_a": doomed["id"], "face_b": partner["id"], "label": 0}
        )
        assert response.status_code == 201
    surviving_pair = client.post(
        "/v1/feedback", json={"face_a": kept["id"], "face_b": other["id"], "label": 0}
    )
    with session_scope(settings.database_url) as session:
        model = ModelVersion(arch="mobilefacenet", status="ready", sha256="0" * 64, byte_size=1)
        session.add(model)
        session.flush()
        for face in (doomed, kept):
            session.add(
                FaceEmbedding(
                    face_id=uuid.UUID(face["id"]), model_id=model.id, vector=bytes(512), quality=1.0
                )
            )
    doomed_blob = settings.blob_dir / "faces" / doomed["sha256"][:2] / doomed["sha256"]
    assert doomed_blob.is_file()

    response = client.delete(f"/v1/faces/{doomed['id']}")

    assert response.status_code == 204
    assert response.content == b""
    assert not doomed_blob.exists()
    assert len(blob_files(settings)) == 2
    assert count_rows(settings, Face) == 2
    assert count_rows(settings, FaceEmbedding) == 1
    remaining = client.get("/v1/feedback").json()["items"]
    assert [pair["id"] for pair in remaining] == [surviving_pair.json()["id"]]
    assert_problem(client.get(f"/v1/faces/{doomed['id']}"), 404, "unknown-face")
    assert_problem(client.delete(f"/v1/faces/{doomed['id']}"), 404, "unknown-face")


def test_a_deleted_face_can_be_uploaded_again(client: TestClient, face_pngs: list[Path]) -> None:
    data = face_pngs[8].read_bytes()
    first = upload(client, data).json()
    assert client.delete(f"/v1/faces/{first['id']}").status_code == 204

    again = upload(client, data)

    assert again.status_code == 201
    assert again.json()["id"] != first["id"]
    assert client.get(f"/v1/faces/{again.json()['id']}/image").content == data


def test_feedback_rows_are_untouched_by_other_faces_deletion(client: TestClient, settings: Settings) -> None:
    a, b, c = (insert_face(settings) for _ in range(3))
    client.post("/v1/feedback", json={"face_a": str(a), "face_b": str(b), "label": 1})

    assert client.delete(f"/v1/faces/{c}").status_code == 204
    assert count_rows(settings, FeedbackPair) == 1


# ---- embedding on arrival, and what the api shows of it --------------------------------------------------


@pytest.fixture
def embed_client(client_with: Callable[..., TestClient], broker: QueueProbe) -> TestClient:
    """A client whose embed jobs go to the test's own queue, to read them back."""
    return client_with(embed_queue_name=broker.name)


def embed_jobs(settings: Settings) -> list[Job]:
    with session_scope(settings.database_url) as session:
        jobs = session.scalars(select(Job).where(Job.kind == JobKind.EMBED)).all()
        session.expunge_all()
        return list(jobs)


def test_new_faces_queue_one_coalesced_embedding_job(
    embed_client: TestClient, settings: Settings, broker: QueueProbe, face_pngs: list[Path]
) -> None:
    model = insert_model(settings)
    activate_directly(settings, model)

    first = upload(embed_client, face_pngs[0].read_bytes())
    second = upload(embed_client, face_pngs[1].read_bytes())
    again = upload(embed_client, face_pngs[0].read_bytes())

    assert (first.status_code, second.status_code, again.status_code) == (201, 201, 200)
    jobs = embed_jobs(settings)
    assert len(jobs) == 1
    assert jobs[0].status == JobStatus.QUEUED and jobs[0].params == {"model": str(model)}
    assert broker.sent_job_ids() == [str(jobs[0].id)]
    assert first.json()["embedded"] is False and first.json()["serving_model_id"] is None


def test_without_a_model_in_service_an_upload_queues_nothing(
    embed_client: TestClient, settings: Settings, broker: QueueProbe, face_pngs: list[Path]
) -> None:
    assert upload(embed_client, face_pngs[0].read_bytes()).status_code == 201
    assert embed_jobs(settings) == [] and broker.sent_job_ids() == []


def test_a_broker_that_is_down_leaves_the_embedding_job_to_the_sweeper(
    client_with: Callable[..., TestClient], settings: Settings, face_pngs: list[Path]
) -> None:
    activate_directly(settings, insert_model(settings))
    down = client_with(broker_url=CLOSED_PORT_BROKER)

    assert upload(down, face_pngs[0].read_bytes()).status_code == 201
    jobs = embed_jobs(settings)
    assert len(jobs) == 1 and jobs[0].status == JobStatus.QUEUED and jobs[0].enqueued_at is None


def test_a_failed_job_insert_does_not_lose_the_face(
    client: TestClient, settings: Settings, face_pngs: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    activate_directly(settings, insert_model(settings))

    def fail(*_args: Any) -> None:
        raise OperationalError("INSERT INTO jobs", {}, Exception("connection lost"))

    monkeypatch.setattr(face_service, "request_embedding", fail)
    response = upload(client, face_pngs[0].read_bytes())

    assert response.status_code == 201
    assert client.get(f"/v1/faces/{response.json()['id']}").status_code == 200
    assert count_rows(settings, Face) == 1 and embed_jobs(settings) == []


def test_faces_show_whether_the_serving_model_embedded_them_and_its_quality(
    client: TestClient, settings: Settings
) -> None:
    faces = [insert_face(settings) for _ in range(3)]
    old, new = insert_model(settings), insert_model(settings)
    with session_scope(settings.database_url) as session:
        session.add_all(
            FaceEmbedding(face_id=f, model_id=old, vector=b"\0" * 8, quality=q)
            for f, q in zip(faces[:2], (21.5, 7.25), strict=True)
        )
        session.add_all(FaceEmbedding(face_id=f, model_id=new, vector=b"\0" * 8, quality=1.0) for f in faces)
        session.add(Activation(model_id=old, embedded_at=utcnow()))
    with session_scope(settings.database_url) as session:
        session.add(Activation(model_id=new))  # activated, not serving yet

    shown = {face["id"]: face for face in client.get("/v1/faces").json()["items"]}
    one = client.get(f"/v1/faces/{faces[2]}").json()

    assert [shown[str(f)]["embedded"] for f in faces] == [True, True, False]
    assert [shown[str(f)]["quality"] for f in faces] == [21.5, 7.25, None], "the serving model's, not new's"
    assert {face["serving_model_id"] for face in shown.values()} == {str(old)}
    assert (one["embedded"], one["quality"], one["serving_model_id"]) == (False, None, str(old))
    assert client.get(f"/v1/faces/{faces[0]}").json()["quality"] == 21.5


def test_no_serving_model_shows_no_face_embedded(client: TestClient, settings: Settings) -> None:
    face = insert_face(settings)

    one = client.get(f"/v1/faces/{face}").json()

    assert one == client.get("/v1/faces").json()["items"][0]
    assert (one["embedded"], one["quality"], one["serving_model_id"]) == (False, None, None)


def test_a_page_of_faces_costs_the_same_queries_whatever_its_size(
    client: TestClient, settings: Settings
) -> None:
    faces = [insert_face(settings) for _ in range(12)]
    model = insert_model(settings)
    with session_scope(settings.database_url) as session:
        session.add_all(
            FaceEmbedding(face_id=f, model_id=model, vector=b"\0" * 8, quality=1.0) for f in faces
        )
        session.add(Activation(model_id=model, embedded_at=utcnow()))

    def statements(limit: int) -> int:
        executed: list[str] = []
        engine = get_engine(settings.database_url)
        listener = lambda *args: executed.append(args[2])  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            page = client.get("/v1/faces", params={"limit": limit}).json()
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        assert len(page["items"]) == limit and all(face["embedded"] for face in page["items"])
        return len(executed)

    client.get("/v1/faces")  # the key's first use writes its last_used_at (once a minute), not a page's cost
    assert statements(2) == statements(12)


def test_a_multipart_body_cut_before_its_closing_boundary_is_refused(
    client: TestClient, settings: Settings, face_pngs: list[Path]
) -> None:
    image = face_pngs[0].read_bytes()
    body = (
        b'--cut\r\nContent-Disposition: form-data; name="file"; filename="face.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image
    )

    response = client.post(
        "/v1/faces", content=body, headers={"content-type": "multipart/form-data; boundary=cut"}
    )
    whole = client.post(
        "/v1/faces",
        content=body + b"\r\n--cut--\r\n",
        headers={"content-type": "multipart/form-data; boundary=cut"},
    )

    problem = assert_problem(response, 400, "malformed-multipart")
    assert "closing boundary" in problem["detail"]
    assert whole.status_code == 201, "the same body with its closing boundary is a face"
    assert count_rows(settings, Face) == 1


def test_an_erase_the_blob_store_refuses_is_recorded_and_finished_by_the_sweeper(
    client: TestClient, settings: Settings, face_pngs: list[Path]
) -> None:
    from app.jobs.sweeper import sweep_once
    from app.tables import Erasure

    image = face_pngs[0].read_bytes()
    face = upload(client, image).json()
    path = settings.blob_dir / "faces" / face["sha256"][:2] / face["sha256"]
    path.unlink()
    (path / "held").mkdir(parents=True)  # a directory where the file was: the store cannot unlink it

    response = client.delete(f"/v1/faces/{face['id']}")

    assert response.status_code == 202, response.text
    assert response.json()["erasure"] == "pending"
    assert_problem(client.get(f"/v1/faces/{face['id']}"), 404, "unknown-face")
    assert count_rows(settings, Face) == 0
    assert count_rows(settings, Erasure) == 1
    assert sweep_once(settings).erasures_pending == 1, "still refused: the tombstone stays"

    (path / "held").rmdir()
    path.rmdir()
    path.write_bytes(image)  # the store takes changes again, and the image is still there
    report = sweep_once(settings)

    assert (report.erased, report.erasures_pending) == (1, 0)
    assert not path.exists()
    assert count_rows(settings, Erasure) == 0
