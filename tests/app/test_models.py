"""/v1/models and the checkpoint pre-check, against the real PostgreSQL and Redis.

The tests build checkpoints with torch (the api itself never imports it).
"""

import collections
import hashlib
import json
import os
import pickle
import uuid
import zipfile
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.config import Settings
from app.db import get_engine, session_scope
from app.main import create_app
from app.migrate import upgrade_database
from app.models.checkpoint_keys import architecture_table
from app.models.checkpoint_scan import ALLOWED_GLOBALS, CheckpointRejected, scan_checkpoint
from app.models.service import activate, validation_jobs_by_model
from app.models.serving import mark_embedded_if_complete
from app.tables import Activation, FaceEmbedding, Job, ModelVersion, utcnow
from tests.app.checkpoint_files import RunsAShellCommand, saved
from tests.app.factories import count_rows, insert_face, insert_job, insert_model
from tests.app.problems import assert_problem
from tests.keys import bearer, issue_test_key, key_id
from tests.queues import QueueProbe


def backbone_weights(
    arch: str, seed: int = 0, prefix: str = ""
) -> collections.OrderedDict[str, torch.Tensor]:
    """Random tensors of `arch`'s shapes, each one random value expanded so the file stays a few kilobytes."""
    generator = torch.Generator().manual_seed(seed)
    return collections.OrderedDict(
        (
            prefix + key,
            torch.tensor(seed)
            if key.endswith("num_batches_tracked")
            else torch.randn(1, generator=generator).expand(shape),
        )
        for key, shape in architecture_table()[arch].items()
    )


def magface_checkpoint(arch: str = "iresnet18", seed: int = 0, *, legacy: bool = False) -> bytes:
    """MagFace's trainer layout: `features.module.` keys beside a `parallel_fc.weight` head."""
    weights = backbone_weights(arch, seed, prefix="features.module.")
    weights["parallel_fc.weight"] = torch.randn(512, 10, generator=torch.Generator().manual_seed(seed))
    return saved({"epoch": 25, "arch": arch, "state_dict": weights}, legacy=legacy)


def state_dict_checkpoint(seed: int = 0) -> bytes:
    return magface_checkpoint("iresnet18", seed)


def upload(
    client: TestClient, content: bytes, arch: str | None = "iresnet18", **fields: str
) -> httpx.Response:
    data = {"arch": arch, **fields} if arch is not None else fields
    return client.post("/v1/models", files={"file": ("model.pth", content)}, data=data)


def stored_files(settings: Settings) -> list[Path]:
    root = settings.blob_dir / "checkpoints"
    return [path for path in root.rglob("*") if path.is_file()] if root.exists() else []


class TestRegister:
    def test_a_valid_checkpoint_is_stored_and_queued_for_validation(
        self, client: TestClient, settings: Settings, broker: QueueProbe
    ) -> None:
        content = state_dict_checkpoint()

        response = upload(client, content, name="magface-base")

        assert response.status_code == 202
        body = response.json()
        assert response.headers["location"] == f"/v1/models/{body['id']}"
        assert body["status"] == "validating"
        assert body["arch"] == "iresnet18"
        assert body["name"] == "magface-base"
        assert body["sha256"] == hashlib.sha256(content).hexdigest()
        assert body["byte_size"] == len(content)
        assert body["is_active"] is False
        job = client.get(f"/v1/jobs/{body['validation_job_id']}").json()
        assert job["kind"] == "validate_model"
        assert job["status"] == "queued"
        assert job["params"] == {"model": body["id"]}
        assert broker.sent_job_ids() == [job["id"]]
        assert [path.name for path in stored_files(settings)] == [body["sha256"]]
        assert_problem(client.get(f"/v1/models/{body['id']}/checkpoint"), 409, "model-not-ready")
        with session_scope(settings.database_url) as session:
            session.get(ModelVersion, uuid.UUID(body["id"])).status = "ready"
        assert client.get(f"/v1/models/{body['id']}/checkpoint").content == content

    def test_a_legacy_format_checkpoint_is_accepted(self, client: TestClient) -> None:
        content = magface_checkpoint("mobilefacenet", legacy=True)

        assert upload(client, content, arch="mobilefacenet").status_code == 202

    def test_the_same_bytes_and_arch_return_the_registered_model(
        self, client: TestClient, broker: QueueProbe
    ) -> None:
        # A layout the torch-free reader does not know (a non-tensor entry) is left to the worker.
        content = saved({"state_dict": {"conv.weight": torch.zeros(4, 3, 3, 3), "note": "not a tensor"}})
        first = upload(client, content).json()

        again = upload(client, content)
        other_arch = upload(client, content, arch="iresnet50")

        assert again.status_code == 200
        assert again.json()["id"] == first["id"]
        assert again.json()["validation_job_id"] is None
        assert other_arch.status_code == 202
        assert other_arch.json()["id"] != first["id"]
        assert len(broker.sent_job_ids()) == 2

    @pytest.mark.parametrize(
        ("content", "kind"),
        [
            (os.urandom(4096), "not-a-checkpoint"),
            (json.dumps({"state_dict": {"w": [1, 2, 3]}}).encode(), "not-a-checkpoint"),
            (pickle.dumps({"w": [1.0, 2.0]}), "not-a-checkpoint"),
            (b"PK\x03\x04 a truncated zip", "not-a-checkpoint"),
            (b"", "empty-checkpoint"),
        ],
        ids=["random-bytes", "json", "plain-pickle", "broken-zip", "empty"],
    )
    def test_what_is_not_a_checkpoint_is_refused_and_not_kept(
        self, client: TestClient, settings: Settings, broker: QueueProbe, content: bytes, kind: str
    ) -> None:
        response = upload(client, content)

        assert_problem(response, 422, kind)
        assert stored_files(settings) == []
        assert client.get("/v1/models").json()["items"] == []
        assert broker.sent_job_ids() == []

    def test_a_checkpoint_carrying_code_is_refused_without_running_it(
        self, client: TestClient, settings: Settings, tmp_path: Path
    ) -> None:
        marker = tmp_path / "pwned"
        content = saved({"state_dict": {"w": torch.zeros(1)}, "extra": RunsAShellCommand(marker)})

        response = upload(client, content)

        problem = assert_problem(response, 422, "checkpoint-contains-code")
        assert "posix.system" in problem["detail"]
        assert problem["offending_global"] == "posix.system"
        assert not marker.exists()
        assert stored_files(settings) == []

    @pytest.mark.parametrize("name", ["an\u0000n", "x" * 257], ids=["nul", "over-256"])
    def test_a_name_the_database_cannot_store_is_refused_and_not_kept(
        self, client: TestClient, settings: Settings, broker: QueueProbe, name: str
    ) -> None:
        body = assert_problem(upload(client, state_dict_checkpoint(), name=name), 422, "validation-error")

        assert [error["loc"] for error in body["errors"]] == [["body", "name"]]
        assert count_rows(settings, ModelVersion) == count_rows(settings, Job) == 0
        assert stored_files(settings) == []
        assert broker.sent_job_ids() == []

    def test_a_filename_over_256_characters_names_the_model_cut_to_256(self, client: TestClient) -> None:
        filename = "m" * 300 + ".pth"
        response = client.post(
            "/v1/models", files={"file": (filename, state_dict_checkpoint())}, data={"arch": "iresnet18"}
        )

        assert response.status_code == 202, response.text
        assert response.json()["name"] == filename[:256]

    def test_an_oversized_checkpoint_is_a_413_and_leaves_nothing(self, settings: Settings) -> None:
        small = settings.model_copy(update={"max_checkpoint_bytes": 1024})
        key = issue_test_key(settings.database_url)
        with TestClient(create_app(small, run_sweeper=False), headers=bearer(key)) as client:
            response = upload(client, state_dict_checkpoint())

        assert_problem(response, 413, "upload-too-large")
        root = settings.blob_dir / "checkpoints"
        assert not root.exists() or [path for path in root.rglob("*") if path.is_file()] == []

    @pytest.mark.parametrize("arch", [None, "resnet9000"])
    def test_arch_is_required_and_checked(self, client: TestClient, arch: str | None) -> None:
        response = upload(client, state_dict_checkpoint(), arch=arch)

        problem = assert_problem(response, 422, "validation-error")
        assert [error["loc"] for error in problem["errors"]] == [["body", "arch"]]


class TestArchitectureCheck:
    def assert_refused_and_not_kept(
        self, response: httpx.Response, client: TestClient, settings: Settings, broker: QueueProbe
    ) -> dict:
        problem = assert_problem(response, 422, "wrong-architecture")
        assert stored_files(settings) == []
        assert client.get("/v1/models").json()["items"] == []
        assert broker.sent_job_ids() == []
        return problem

    def test_mobilefacenet_uploaded_as_iresnet18_is_refused_naming_mobilefacenet(
        self, client: TestClient, settings: Settings, broker: QueueProbe, mobilefacenet_checkpoint: Path
    ) -> None:
        response = upload(client, mobilefacenet_checkpoint.read_bytes(), arch="iresnet18")

        problem = self.assert_refused_and_not_kept(response, client, settings, broker)
        assert problem["suggested_arch"] == "mobilefacenet"
        assert problem["detail"].startswith(
            "the checkpoint does not fit iresnet18 (187 tensors expected, 307 found"
        )
        assert problem["detail"].endswith("; it fits mobilefacenet")

    def test_mobilefacenet_uploaded_as_mobilefacenet_is_accepted(
        self, client: TestClient, broker: QueueProbe, mobilefacenet_checkpoint: Path
    ) -> None:
        response = upload(client, mobilefacenet_checkpoint.read_bytes(), arch="mobilefacenet")

        assert response.status_code == 202
        assert response.json()["status"] == "validating"
        assert len(broker.sent_job_ids()) == 1

    def test_a_magface_iresnet18_fits_iresnet18_only(
        self, client: TestClient, settings: Settings, broker: QueueProbe
    ) -> None:
        content = magface_checkpoint("iresnet18")

        wrong = upload(client, content, arch="iresnet50")
        problem = self.assert_refused_and_not_kept(wrong, client, settings, broker)
        right = upload(client, content, arch="iresnet18")

        assert problem["suggested_arch"] == "iresnet18"
        assert problem["detail"].endswith("; it fits iresnet18")
        assert right.status_code == 202
        assert right.json()["arch"] == "iresnet18"

    def test_a_single_reshaped_tensor_is_refused_naming_no_architecture(
        self, client: TestClient, settings: Settings, broker: QueueProbe
    ) -> None:
        weights = backbone_weights("iresnet18", prefix="features.module.")
        weights["features.module.fc.weight"] = torch.zeros(256, 25088)

        response = upload(client, saved({"state_dict": weights}), arch="iresnet18")

        problem = self.assert_refused_and_not_kept(response, client, settings, broker)
        assert problem["suggested_arch"] is None
        assert "1 with another shape such as fc.weight" in problem["detail"]
        assert problem["detail"].endswith("it fits no known architecture")

    def test_code_is_refused_by_the_scan_before_any_key_is_read(
        self, client: TestClient, settings: Settings, tmp_path: Path
    ) -> None:
        marker = tmp_path / "pwned"
        weights = backbone_weights("mobilefacenet")
        content = saved({"state_dict": weights, "extra": RunsAShellCommand(marker)})

        response = upload(client, content, arch="iresnet18")

        assert_problem(response, 422, "checkpoint-contains-code")
        assert not marker.exists()
        assert stored_files(settings) == []


class TestRead:
    def test_get_list_and_filter(self, client: TestClient, settings: Settings) -> None:
        ready = insert_model(settings, status="ready")
        invalid = insert_model(settings, status="invalid")

        listed = client.get("/v1/models").json()["items"]
        only_ready = client.get("/v1/models", params={"status": "ready"}).json()["items"]
        detail = client.get(f"/v1/models/{invalid}").json()

        assert [item["id"] for item in listed] == [str(invalid), str(ready)]
        assert [item["id"] for item in only_ready] == [str(ready)]
        assert detail["status"] == "invalid"
        for key in ("status_reason", "parent_id", "created_by_job_id", "hyperparameters", "dataset_snapshot"):
            assert key in detail
        assert detail["evaluations"] == []

    def test_a_model_shows_its_validation_job_until_and_after_it_ends(
        self, client: TestClient, settings: Settings
    ) -> None:
        registered = upload(client, state_dict_checkpoint()).json()
        finetuned = insert_model(settings, status="ready")

        detail = client.get(f"/v1/models/{registered['id']}").json()
        listed = {item["id"]: item for item in client.get("/v1/models").json()["items"]}
        job_id = uuid.UUID(registered["validation_job_id"])
        refused = {"type": "wrong-architecture", "title": "Wrong architecture", "detail": "fits iresnet50"}
        with session_scope(settings.database_url) as session:
            job = session.get(Job, job_id)
            job.status, job.error = "failed", refused
        after = client.get(f"/v1/models/{registered['id']}").json()

        expected = {"id": str(job_id), "status": "queued", "error": None}
        assert detail["validation_job"] == expected
        assert listed[registered["id"]]["validation_job"] == expected
        assert listed[str(finetuned)]["validation_job"] is None
        assert after["validation_job"] == {"id": str(job_id), "status": "failed", "error": refused}

    def test_a_list_page_reads_the_validation_jobs_in_one_query(
        self, client: TestClient, settings: Settings
    ) -> None:
        for seed in range(3):
            upload(client, state_dict_checkpoint(seed))
        statements: list[str] = []

        def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
            statements.append(statement)

        engine = get_engine(settings.database_url)
        event.listen(engine, "before_cursor_execute", record)
        try:
            items = client.get("/v1/models").json()["items"]
        finally:
            event.remove(engine, "before_cursor_execute", record)

        assert len(items) == 3 and all(item["validation_job"] is not None for item in items)
        assert sum("FROM jobs" in statement for statement in statements) == 1

    def test_validation_jobs_are_found_on_sqlite_too(self, tmp_path: Path) -> None:
        """The embedded default keeps job params in SQLite's JSON, not PostgreSQL's JSONB."""
        url = f"sqlite:///{tmp_path / 'models.db'}"
        upgrade_database(url)
        with session_scope(url) as session:
            models = [ModelVersion(arch="iresnet18", sha256=f"{n}" * 64, byte_size=1) for n in range(3)]
            session.add_all(models)
            session.flush()
            older = Job(kind="validate_model", params={"model": str(models[0].id)}, status="failed")
            session.add(older)
            session.flush()
            newer = Job(kind="validate_model", params={"model": str(models[0].id)}, status="queued")
            other = Job(kind="reindex", params={"model": str(models[1].id)})
            session.add_all([newer, other])
            session.flush()
            newer.created_at = older.created_at + timedelta(seconds=1)
            session.flush()

            found = validation_jobs_by_model(session, [model.id for model in models])

            assert {model_id: job.id for model_id, job in found.items()} == {models[0].id: newer.id}
        get_engine(url).dispose()

    @pytest.mark.parametrize("status", ["validating", "invalid"])
    def test_the_checkpoint_of_a_model_that_is_not_ready_is_not_served(
        self, client: TestClient, settings: Settings, status: str
    ) -> None:
        model_id = insert_model(settings, status=status)

        problem = assert_problem(client.get(f"/v1/models/{model_id}/checkpoint"), 409, "model-not-ready")

        assert problem["model_status"] == status

    @pytest.mark.parametrize("suffix", ["", "/checkpoint", "/activate"])
    def test_unknown_model_is_a_404_problem(self, client: TestClient, suffix: str) -> None:
        url = f"/v1/models/{uuid.uuid4()}{suffix}"
        response = client.post(url) if suffix == "/activate" else client.get(url)

        assert_problem(response, 404, "unknown-model")


class TestActivate:
    def test_no_active_model_is_a_404_problem(self, client: TestClient) -> None:
        response = client.get("/v1/models/active")

        assert_problem(response, 404, "no-active-model")

    @pytest.mark.parametrize("status", ["validating", "invalid"])
    def test_a_model_that_is_not_ready_cannot_be_activated(
        self, client: TestClient, settings: Settings, status: str
    ) -> None:
        model = insert_model(settings, status=status)

        response = client.post(f"/v1/models/{model}/activate", json={"reason": "try"})

        assert_problem(response, 409, "model-not-ready")
        assert client.get("/v1/models/activations").json()["items"] == []

    @pytest.mark.parametrize(("field", "value"), [("reason", "o\u0000ps"), ("actor", "ops")])
    def test_a_reason_holding_nul_or_a_self_declared_actor_is_refused(
        self, client: TestClient, settings: Settings, broker: QueueProbe, field: str, value: str
    ) -> None:
        """Who activated comes from the key, never from the body."""
        model = insert_model(settings)

        response = client.post(f"/v1/models/{model}/activate", json={field: value})

        body = assert_problem(response, 422, "validation-error")
        assert [error["loc"] for error in body["errors"]] == [["body", field]]
        assert count_rows(settings, Activation) == count_rows(settings, Job) == 0
        assert broker.sent_job_ids() == []

    def test_activation_is_logged_and_queues_a_reindex(
        self, client: TestClient, settings: Settings, broker: QueueProbe, all_scopes_key: str
    ) -> None:
        first, second = insert_model(settings, threshold=0.4), insert_model(settings, threshold=0.5)

        one = client.post(f"/v1/models/{first}/activate")
        two = client.post(f"/v1/models/{second}/activate", json={"reason": "better on test"})
        back = client.post(f"/v1/models/{first}/activate", json={"reason": "rollback"})

        assert one.status_code == two.status_code == back.status_code == 200
        assert one.json()["previous_model_id"] is None
        assert two.json()["previous_model_id"] == str(first)
        assert (two.json()["actor"], two.json()["api_key_id"]) == ("tests", key_id(all_scopes_key))
        assert back.json()["previous_model_id"] == str(second)
        reindex = client.get(f"/v1/jobs/{two.json()['reindex_job_id']}").json()
        assert reindex["kind"] == "reindex"
        assert reindex["params"] == {"model": str(second)}
        assert len(broker.sent_job_ids()) == 3
        active = client.get("/v1/models/active").json()
        assert active["id"] == str(first)
        assert active["is_active"] is True
        log = client.get("/v1/models/activations").json()["items"]
        assert [entry["model_id"] for entry in log] == [str(first), str(second), str(first)]
        assert [entry["reason"] for entry in log] == ["rollback", "better on test", None]
        of_second = client.get("/v1/models/activations", params={"model_id": str(second)}).json()["items"]
        assert [entry["id"] for entry in of_second] == [two.json()["id"]]

    def test_the_active_model_shows_the_serving_one_while_it_embeds_faces(
        self, client: TestClient, settings: Settings
    ) -> None:
        faces = [insert_face(settings) for _ in range(3)]
        old, new = insert_model(settings), insert_model(settings)
        with session_scope(settings.database_url) as session:
            session.add_all(
                FaceEmbedding(face_id=f, model_id=old, vector=b"\0" * 8, quality=1.0) for f in faces
            )
            session.add(FaceEmbedding(face_id=faces[0], model_id=new, vector=b"\0" * 8, quality=1.0))
            session.add(Activation(model_id=old, embedded_at=utcnow()))
        client.post(f"/v1/models/{new}/activate", json={"reason": "newer"})

        switching = client.get("/v1/models/active").json()
        with session_scope(settings.database_url) as session:
            session.add_all(
                FaceEmbedding(face_id=f, model_id=new, vector=b"\0" * 8, quality=1.0) for f in faces[1:]
            )
            mark_embedded_if_complete(session, new)
        switched = client.get("/v1/models/active").json()

        assert (switching["id"], switching["is_active"]) == (str(new), True)
        assert (switching["serving_model_id"], switching["switching"], switching["waiting_faces"]) == (
            str(old),
            True,
            2,
        )
        assert (switched["serving_model_id"], switched["switching"], switched["waiting_faces"]) == (
            str(new),
            False,
            0,
        )
        assert switched["sha256"] == switching["sha256"]

    def test_activating_the_active_model_changes_nothing(
        self, client: TestClient, settings: Settings, broker: QueueProbe
    ) -> None:
        model = insert_model(settings, threshold=0.4)
        first = client.post(f"/v1/models/{model}/activate").json()

        again = client.post(f"/v1/models/{model}/activate", json={"reason": "again"}).json()

        assert again["id"] == first["id"]
        assert again["reindex_job_id"] is None
        assert len(broker.sent_job_ids()) == 1

    def test_the_worker_can_activate_within_its_own_transaction(
        self, settings: Settings, broker: QueueProbe
    ) -> None:
        model = insert_model(settings, threshold=0.4)
        finetune = insert_job(settings, status="running")

        with session_scope(settings.database_url) as session:
            activation = activate(
                session=session,
                settings=settings,
                model_id=model,
                actor="auto-promote",
                reason="gate",
                job_id=finetune,
            ).activation
            assert broker.sent_job_ids() == []
        with session_scope(settings.database_url) as session:
            stored = session.get(Activation, activation.id)
            reindex = session.query(Job).filter(Job.kind == "reindex").one()
            assert (stored.model_id, stored.job_id, stored.actor) == (model, finetune, "auto-promote")
            assert reindex.parent_job_id == finetune
        assert broker.sent_job_ids() == [str(reindex.id)]

    def test_a_model_without_a_threshold_gets_a_calibration_on_val(
        self, client: TestClient, settings: Settings, broker: QueueProbe
    ) -> None:
        uncalibrated, calibrated = insert_model(settings), insert_model(settings, threshold=0.4)

        one = client.post(f"/v1/models/{uncalibrated}/activate").json()
        two = client.post(f"/v1/models/{calibrated}/activate").json()

        with session_scope(settings.database_url) as session:
            evaluations = session.query(Job).filter(Job.kind == "evaluate").all()
        (evaluation,) = evaluations
        assert evaluation.params == {
            "model": str(uncalibrated),
            "split": "val",
            "compare_to": None,
            "calibrate": True,
        }
        sent = {one["reindex_job_id"], str(evaluation.id), two["reindex_job_id"]}
        assert sorted(broker.sent_job_ids()) == sorted(sent)

    def test_a_rollback_to_a_model_covering_every_face_serves_at_once(
        self, client: TestClient, settings: Settings, broker: QueueProbe
    ) -> None:
        from app.models.serving import serving_model
        from app.tables import Face, FaceEmbedding

        old, new = insert_model(settings, threshold=0.4), insert_model(settings, threshold=0.4)
        with session_scope(settings.database_url) as session:
            face = Face(sha256="ab" * 32, byte_size=1, media_type="image/png", width=1, height=1, channels=3)
            face.split = "train"
            session.add(face)
            session.flush()
            session.add(FaceEmbedding(face_id=face.id, model_id=old, vector=b"\0" * 512, quality=1.0))

        client.post(f"/v1/models/{old}/activate")
        with session_scope(settings.database_url) as session:
            assert serving_model(session).id == old, "old covered every face when activated"
        client.post(f"/v1/models/{new}/activate")
        with session_scope(settings.database_url) as session:
            assert serving_model(session).id == old, "new embeds nothing yet: old keeps serving"
        client.post(f"/v1/models/{old}/activate", json={"reason": "rollback"})
        with session_scope(settings.database_url) as session:
            assert serving_model(session).id == old
            latest = session.query(Activation).order_by(Activation.created_at.desc()).first()
            assert latest.reason == "rollback" and latest.embedded_at is not None


class TestCheckpointScan:
    def test_the_allowlist_is_within_what_torch_loads_with_weights_only(self) -> None:
        from torch._weights_only_unpickler import _get_allowed_globals

        assert set(ALLOWED_GLOBALS) <= set(_get_allowed_globals())

    @pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
    def test_code_is_refused_whatever_the_pickle_protocol(self, tmp_path: Path, protocol: int) -> None:
        """Protocols 1 to 3 reach the global; 0, 4 and 5 are refused before it, at an opcode (DICT, FRAME)
        that weights-only loading does not read."""
        path = tmp_path / "crafted.pt"
        payload = pickle.dumps(
            {"state_dict": {}, "x": RunsAShellCommand(tmp_path / "pwned")}, protocol=protocol
        )
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", payload)

        with pytest.raises(CheckpointRejected) as rejected:
            scan_checkpoint(path)

        if protocol in (1, 2, 3):
            assert rejected.value.kind == "checkpoint-contains-code"
            assert rejected.value.offending == "posix.system"
        else:
            assert rejected.value.kind == "not-a-checkpoint"
            assert "weights-only loading reads" in rejected.value.detail

    @pytest.mark.filterwarnings("ignore::DeprecationWarning")
    def test_whole_modules_and_torchscript_are_refused(self, tmp_path: Path) -> None:
        module = tmp_path / "module.pt"
        torch.save(torch.nn.Linear(2, 2), module)
        script = tmp_path / "script.pt"
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(script))

        for path in (module, script):
            with pytest.raises(CheckpointRejected) as rejected:
                scan_checkpoint(path)
            assert rejected.value.kind == "checkpoint-contains-code"
