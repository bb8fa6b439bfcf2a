"""The stored hostile corpus (tests/hostile/): each file posted to the route it targets is refused with its
own 4xx problem, and nothing already stored changes: no face, model, job or feedback row and no blob file is
added or removed, and no payload ran.

A face, a model and a feedback pair are stored first, so "unchanged" also means nothing was lost.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.tables import Face, FeedbackPair, Job, ModelVersion
from tests.app.factories import count_rows
from tests.app.problems import assert_problem
from tests.hostile.generate import BOUNDARY, CORPUS_DIR, MARKER


@dataclass(frozen=True)
class Case:
    file: str
    route: str
    status: int
    problem: str
    error_loc: list[str] | None = None  # the field a validation error must name


CASES = [
    Case("magic-number-smuggling.pt", "/v1/models", 422, "checkpoint-contains-code"),
    Case("legacy-then-zip-polyglot.pt", "/v1/models", 422, "checkpoint-contains-code"),
    Case("zip-pickle-payload.pt", "/v1/models", 422, "checkpoint-contains-code"),
    Case("legacy-pickle-payload.pt", "/v1/models", 422, "checkpoint-contains-code"),
    Case("nonepop-scan-bomb.pt", "/v1/models", 422, "not-a-checkpoint"),
    Case("nul-in-filename.multipart", "/v1/models", 422, "validation-error", ["body", "file"]),
    Case("over-long-name.multipart", "/v1/models", 422, "validation-error", ["body", "name"]),
    Case("cut-before-closing-boundary.multipart", "/v1/faces", 400, "malformed-multipart"),
    Case("corrupt-image.png", "/v1/faces", 422, "corrupt-image"),
    Case("truncated-image.png", "/v1/faces", 422, "corrupt-image"),
]


def post(client: TestClient, case: Case) -> httpx.Response:
    """A `.multipart` file is the whole body; any other file is the `file` part of a well-formed one."""
    content = (CORPUS_DIR / case.file).read_bytes()
    if case.file.endswith(".multipart"):
        headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
        return client.post(case.route, content=content, headers=headers)
    fields = {"arch": "iresnet18"} if case.route == "/v1/models" else {}
    return client.post(case.route, files={"file": (case.file, content)}, data=fields)


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((112, 112), 40 + seed).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def stored_state(settings: Settings) -> dict[str, object]:
    tables = (Face, ModelVersion, Job, FeedbackPair)
    rows = {table.__tablename__: count_rows(settings, table) for table in tables}
    root = settings.blob_dir
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
    return {**rows, "blob files": files}


@pytest.fixture
def stored(client: TestClient, settings: Settings, mobilefacenet_checkpoint: Path) -> dict[str, object]:
    """Two faces, a pair of them and a registered model: what every refusal must leave as it is."""
    faces = [client.post("/v1/faces", files={"file": ("f.png", png(seed))}).json()["id"] for seed in (1, 2)]
    pair = client.post("/v1/feedback", json={"face_a": faces[0], "face_b": faces[1], "label": 1})
    checkpoint = {"file": ("m.pt", mobilefacenet_checkpoint.read_bytes())}
    model = client.post("/v1/models", files=checkpoint, data={"arch": "mobilefacenet"})
    assert pair.status_code == 201, pair.text
    assert model.status_code == 202, model.text
    MARKER.unlink(missing_ok=True)
    return stored_state(settings)


@pytest.mark.parametrize("case", CASES, ids=[case.file for case in CASES])
def test_each_hostile_file_is_refused_with_its_problem_and_changes_nothing(
    client: TestClient, settings: Settings, stored: dict[str, object], case: Case
) -> None:
    response = post(client, case)

    problem = assert_problem(response, case.status, case.problem)
    if case.error_loc is not None:
        assert [error["loc"] for error in problem["errors"]] == [case.error_loc]
    assert stored_state(settings) == stored
    assert not MARKER.exists(), "the payload never ran"


def test_the_corpus_is_small_and_complete() -> None:
    """Every stored file has a case (a new one is not silently skipped), and the bomb is small on the wire."""
    files = {path.name for path in CORPUS_DIR.iterdir() if path.suffix in (".pt", ".png", ".multipart")}
    assert files == {case.file for case in CASES}
    assert sum((CORPUS_DIR / name).stat().st_size for name in files) < 64 * 1024
