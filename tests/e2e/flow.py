"""The feedback loop as a frontend and an operator drive it, over HTTP only; shared by the end-to-end tests.

Faces of johns go up, their pairs come in as feedback (two images per person form the regression set),
the MobileFaceNet checkpoint is registered and validated by the worker, activated (which re-embeds every
face), fine-tuned, judged against its parent and, when it passes the gate, promoted and re-embedded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.durable import file_digest
from app.splits import split_for_digest
from tests.e2e.services import magtune_command
from worker.ml import pair_file

FINISHED = ("succeeded", "failed", "cancelled")
# Small enough for two CPU cores; still a real fine-tune of the real network on real faces.
QUICK_FINETUNE = {"epochs": 2, "batch_size": 16, "seed": 0}
REGRESSION_FACES_PER_PERSON = 2
POLL_S = 0.1
JOB_TIMEOUT_S = 900.0
EMBED_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Pair:
    image1: str  # relative to pairs.json, e.g. aligned_112/John_Simm/000.png
    image2: str
    label: int


FacePair = tuple[str, str]  # face ids in the api's canonical order (face_a < face_b)


@dataclass
class Seeded:
    """What the service holds after seeding: faces by image path, the pairs, the base model.

    Two of johns' images have identical bytes, so 55 images are 54 faces: the pair of those two images is
    one face with itself (refused), and pairs naming either of them collapse into one.
    """

    faces: dict[str, dict[str, Any]]
    regression_faces: set[str]  # face ids
    pairs: list[Pair]
    base_model: dict[str, Any] = field(default_factory=dict)

    @property
    def face_ids(self) -> set[str]:
        return {face["id"] for face in self.faces.values()}

    def face_pair(self, pair: Pair) -> FacePair | None:
        a, b = self.faces[pair.image1]["id"], self.faces[pair.image2]["id"]
        return None if a == b else (min(a, b), max(a, b))

    def in_regression(self, pair: Pair) -> bool:
        return {self.faces[pair.image1]["id"], self.faces[pair.image2]["id"]} <= self.regression_faces

    def feedback(self) -> dict[FacePair, Pair]:
        """The pairs the service keeps: one per pair of distinct faces, the first posted."""
        kept: dict[FacePair, Pair] = {}
        for pair in self.pairs:
            key = self.face_pair(pair)
            if key is not None:
                kept.setdefault(key, pair)
        return kept

    def split_of(self, pair: Pair) -> str:
        """The split the api should give a pair: regression, else its faces' common split, else cross."""
        if self.in_regression(pair):
            return "regression"
        a, b = (self.faces[image]["split"] for image in (pair.image1, pair.image2))
        return a if a == b else "cross"

    def expected_feedback_splits(self) -> Counter[str]:
        return Counter(self.split_of(pair) for pair in self.feedback().values())


def expected_batch(seeded: Seeded, pairs: list[Pair], seen: set[FacePair]) -> dict[str, int]:
    """What a batch of `pairs` should come back as, given the face pairs already stored (updated)."""
    counts = Counter({"created": 0, "existing": 0, "failed": 0})
    for pair in pairs:
        key = seeded.face_pair(pair)
        outcome = "failed" if key is None else "existing" if key in seen else "created"
        counts[outcome] += 1
        if key is not None:
            seen.add(key)
    return dict(counts)


@dataclass
class JobTrace:
    """Every poll of a job until it finished: what a frontend following it would have seen."""

    job: dict[str, Any]
    polls: list[dict[str, Any]]

    @property
    def saw_progress_while_running(self) -> bool:
        return any(poll["status"] == "running" and (poll.get("progress") or {}) for poll in self.polls)


def read_pairs(johns_dir: Path) -> list[Pair]:
    """The seed file, read by the service's own reader, with images named relative to the johns folder."""
    root = johns_dir.resolve()
    return [
        Pair(pair.image1.relative_to(root).as_posix(), pair.image2.relative_to(root).as_posix(), pair.label)
        for pair in pair_file.read_pairs(johns_dir / "pairs.json").pairs
    ]


def face_images(johns_dir: Path) -> list[str]:
    return sorted(str(path.relative_to(johns_dir)) for path in (johns_dir / "aligned_112").rglob("*.png"))


def choose_regression_faces(faces: dict[str, dict[str, Any]]) -> set[str]:
    """Two training faces of each person: their pairs form the regression set, leaving val and test intact."""
    chosen: set[str] = set()
    by_person = itertools.groupby(sorted(faces), key=lambda image: Path(image).parent.name)
    for _person, images in by_person:
        train = list(
            dict.fromkeys(faces[image]["id"] for image in images if faces[image]["split"] == "train")
        )
        chosen.update(train[:REGRESSION_FACES_PER_PERSON])
    return chosen


def ok(response: httpx.Response, *statuses: int) -> Any:
    assert response.status_code in statuses, f"{response.request.method} {response.request.url}: " + (
        f"{response.status_code} {response.text[:2000]}"
    )
    return response.json()


# Seeding over HTTP, as a frontend does.


def upload_faces(http: httpx.Client, johns_dir: Path) -> dict[str, dict[str, Any]]:
    """Every image; bytes seen before come back (200) as the face stored before."""
    faces: dict[str, dict[str, Any]] = {}
    by_sha: dict[str, str] = {}
    for image in face_images(johns_dir):
        content = (johns_dir / image).read_bytes()
        sha = hashlib.sha256(content).hexdigest()
        response = http.post("/v1/faces", files={"file": ("face.png", content, "image/png")})
        face = ok(response, 200 if sha in by_sha else 201)
        assert face["sha256"] == sha
        assert face["id"] == by_sha.setdefault(sha, face["id"])
        faces[image] = face
    assert len(faces) == 55 and len(by_sha) == len({face["id"] for face in faces.values()})
    return faces


def post_feedback(http: httpx.Client, seeded: Seeded) -> None:
    """Regression pairs first (split "regression"), then the rest, each set in one batch."""
    seen: set[FacePair] = set()
    regression = [pair for pair in seeded.pairs if seeded.in_regression(pair)]
    rest = [pair for pair in seeded.pairs if not seeded.in_regression(pair)]
    for pairs, extra in ((regression, {"split": "regression"}), (rest, {})):
        items = [
            {
                "face_a": seeded.faces[p.image1]["id"],
                "face_b": seeded.faces[p.image2]["id"],
                "label": p.label,
                **extra,
            }
            for p in pairs
        ]
        reply = ok(http.post("/v1/feedback/batch", json={"items": items}), 200)
        counts = {key: reply[key] for key in ("created", "existing", "failed")}
        assert counts == expected_batch(seeded, pairs, seen), [
            r for r in reply["results"] if r["status"] == "error"
        ]


def seed_over_http(http: httpx.Client, johns_dir: Path, *, every_nth_pair: int = 1) -> Seeded:
    """Every face and every pair, or every n-th pair where a shorter fine-tune serves the test as well."""
    faces = upload_faces(http, johns_dir)
    seeded = Seeded(faces, choose_regression_faces(faces), read_pairs(johns_dir)[::every_nth_pair])
    post_feedback(http, seeded)
    return refresh_splits(http, seeded)


def refresh_splits(http: httpx.Client, seeded: Seeded) -> Seeded:
    """The faces as stored now: a face without labels may have joined its first partner's split."""
    listed = {face["id"]: face for face in ok(http.get("/v1/faces", params={"limit": 100}), 200)["items"]}
    assert len(listed) < 100
    faces = {image: listed[face["id"]] for image, face in seeded.faces.items()}
    return dataclasses.replace(seeded, faces=faces)


# Seeding with `magtune import`, as an operator with the seed's feedback files does.


def _import(feedback_file: Path, api_url: str, api_key: str, *extra: str) -> dict[str, Any]:
    """`magtune import` with the key in MAGTUNE_API_KEY, as the README has it."""
    done = subprocess.run(
        magtune_command("import", str(feedback_file), "--api", api_url, "--json", *extra),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MAGTUNE_API_KEY": api_key},
    )
    assert done.returncode == 0, f"magtune import failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def _write_pairs(path: Path, johns_dir: Path, pairs: list[Pair]) -> Path:
    rows = [
        {"image1": str(johns_dir / p.image1), "image2": str(johns_dir / p.image2), "label": p.label}
        for p in pairs
    ]
    path.write_text(json.dumps(rows))
    return path


def _expected_import(
    seeded: Seeded, pairs: list[Pair], stored: set[str], seen: set[FacePair]
) -> dict[str, Any]:
    """The counts `magtune import` should print for `pairs`, given the faces and pairs already stored."""
    images = sorted({image for pair in pairs for image in (pair.image1, pair.image2)})
    created = {seeded.faces[image]["sha256"] for image in images} - stored
    stored.update(created)
    same_face = sum(seeded.face_pair(pair) is None for pair in pairs)
    batch = expected_batch(seeded, [pair for pair in pairs if seeded.face_pair(pair) is not None], seen)
    return {
        "faces": {"created": len(created), "existing": len(images) - len(created), "rejected": 0},
        "pairs": {
            "created": batch["created"],
            "existing": batch["existing"],
            "rejected": 0,
            "same_face": same_face,
            "bad_image": 0,
        },
    }


def seed_with_import_command(http: httpx.Client, johns_dir: Path, workdir: Path) -> Seeded:
    """The regression pairs with `--regression`, then every other pair; faces found back by content hash."""
    pairs = read_pairs(johns_dir)
    shas = {image: file_digest(johns_dir / image) for image in face_images(johns_dir)}
    # The service's split rule, applied here to choose the regression faces before anything is uploaded.
    planned = {
        image: {"id": sha, "sha256": sha, "split": split_for_digest(sha)} for image, sha in shas.items()
    }
    plan = Seeded(planned, choose_regression_faces(planned), pairs)
    in_regression = [pair for pair in pairs if plan.in_regression(pair)]
    rest = [pair for pair in pairs if not plan.in_regression(pair)]

    stored: set[str] = set()
    seen: set[FacePair] = set()
    crossing: dict[str, int] = {}
    for name, subset, extra in (("regression", in_regression, ("--regression",)), ("feedback", rest, ())):
        printed = _import(
            _write_pairs(workdir / f"{name}.json", johns_dir, subset),
            str(http.base_url),
            http.headers["Authorization"].removeprefix("Bearer "),
            *extra,
        )
        expected = _expected_import(plan, subset, stored, seen)
        crossing[name] = printed["pairs"].pop("cross")
        assert (printed["faces"], printed["pairs"]) == (expected["faces"], expected["pairs"]), name

    listed = {face["sha256"]: face for face in ok(http.get("/v1/faces", params={"limit": 100}), 200)["items"]}
    assert set(listed) == set(shas.values())
    faces = {image: listed[sha] for image, sha in shas.items()}
    regression = {listed[sha]["id"] for sha in plan.regression_faces}
    seeded = Seeded(faces, regression, pairs)
    # every pair of the file the api answered for, duplicates included, with the faces' final splits
    answered = [pair for pair in rest if seeded.face_pair(pair) is not None]
    assert crossing == {
        "regression": 0,
        "feedback": sum(seeded.split_of(pair) == "cross" for pair in answered),
    }
    return seeded


# Models and jobs.


def wait_for_job(
    http: httpx.Client,
    job_id: str,
    *,
    until: Callable[[dict[str, Any]], bool] = lambda job: job["status"] in FINISHED,
    timeout_s: float = JOB_TIMEOUT_S,
) -> JobTrace:
    polls: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = ok(http.get(f"/v1/jobs/{job_id}"), 200)
        polls.append(job)
        if until(job):
            return JobTrace(job, polls)
        time.sleep(POLL_S)
    raise AssertionError(f"job {job_id} still {polls[-1]['status']} after {timeout_s:.0f} s: {polls[-1]}")


def wait_embedded(http: httpx.Client, face_ids: list[str], timeout_s: float = EMBED_TIMEOUT_S) -> None:
    """Wait until the api reports every one of the faces embedded by the model in service."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(ok(http.get(f"/v1/faces/{face_id}"), 200)["embedded"] for face_id in face_ids):
            return
        time.sleep(0.2)
    raise AssertionError(f"faces {face_ids} were not embedded within {timeout_s:.0f} s")


def wait_for_success(http: httpx.Client, job_id: str, **kwargs: Any) -> JobTrace:
    trace = wait_for_job(http, job_id, **kwargs)
    assert trace.job["status"] == "succeeded", trace.job
    return trace


def register_model(http: httpx.Client, checkpoint: Path, arch: str) -> dict[str, Any]:
    """Upload a checkpoint and wait for the worker's strict load to make it ready."""
    files = {"file": (checkpoint.name, checkpoint.read_bytes(), "application/octet-stream")}
    registered = ok(http.post("/v1/models", files=files, data={"arch": arch, "name": checkpoint.stem}), 202)
    assert registered["status"] == "validating"
    validation = wait_for_success(http, registered["validation_job_id"])
    assert validation.job["kind"] == "validate_model"
    model = ok(http.get(f"/v1/models/{registered['id']}"), 200)
    assert model["status"] == "ready", model
    assert model["sha256"] == file_digest(checkpoint)
    return model


def activate(http: httpx.Client, model_id: str, reason: str) -> dict[str, Any]:
    activation = ok(http.post(f"/v1/models/{model_id}/activate", json={"reason": reason}), 200)
    assert activation["model_id"] == model_id
    assert ok(http.get("/v1/models/active"), 200)["id"] == model_id
    return activation


def seed_and_activate(http: httpx.Client, seeded: Seeded, checkpoint: Path) -> Seeded:
    """Register the base model, activate it and wait until every face is embedded by it."""
    base = register_model(http, checkpoint, "mobilefacenet")
    activation = activate(http, base["id"], "the pretrained base")
    assert activation["reindex_job_id"], "activating a model queues the reindex of every face"
    wait_for_success(http, activation["reindex_job_id"])
    assert ok(http.get("/v1/metrics"), 200)["faces"]["embedded_by_active_model"] == len(seeded.face_ids)
    seeded.base_model = base
    return seeded


def start_finetune(http: httpx.Client, params: dict[str, Any]) -> dict[str, Any]:
    response = http.post("/v1/jobs", json={"kind": "finetune", "params": params})
    job = ok(response, 202)
    assert job["status"] == "queued"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


# The loop.


def _evaluation(model: dict[str, Any], job_id: str, split: str) -> dict[str, Any]:
    matches = [e for e in model["evaluations"] if e["job_id"] == job_id and e["split"] == split]
    assert len(matches) == 1, (
        f"model {model['id']}: evaluations on {split} by job {job_id}: {model['evaluations']}"
    )
    return matches[0]


def check_finetune_outcome(http: httpx.Client, seeded: Seeded, job: dict[str, Any]) -> dict[str, Any]:
    """The new model, both evaluations, the gate and (when promoted) the reindex; returns a summary."""
    base_id = seeded.base_model["id"]
    result = job["result"]
    children = [
        m
        for m in ok(http.get("/v1/models", params={"limit": 100}), 200)["items"]
        if m["parent_id"] == base_id
    ]
    assert [child["id"] for child in children] == [result["model_id"]]
    candidate = children[0]
    assert (candidate["status"], candidate["created_by_job_id"], candidate["arch"]) == (
        "ready",
        job["id"],
        "mobilefacenet",
    )
    assert candidate["threshold"] is not None, "the threshold is calibrated on val and stored with the model"
    parent = ok(http.get(f"/v1/models/{base_id}"), 200)

    expected = seeded.expected_feedback_splits()
    for split in ("test", "regression"):
        ours, theirs = _evaluation(candidate, job["id"], split), _evaluation(parent, job["id"], split)
        assert ours["pairs_sha256"] == theirs["pairs_sha256"], (
            f"{split}: both models scored on the same pairs"
        )
        assert ours["pair_count"] == theirs["pair_count"] == expected[split], split
        assert ours["metrics"]["roc_auc"] is not None, split

    # The seed's test split holds far fewer pairs than the gate's minimums (20 same, 20 different): the gate
    # refuses with not-enough-evidence, says which labels are missing, and the base stays active.
    gate = result["gate"]
    assert [check["name"] for check in gate["checks"]] == [
        "evidence",
        "test_auc_lower_bound",
        "test_improvement",
        "regression_auc",
        "improved_on_val",
    ]
    assert gate["passed"] == all(check["passed"] for check in gate["checks"])
    evidence = result["evidence_report"]
    assert evidence["counts"]["test_same"] + evidence["counts"]["test_different"] == expected["test"]
    assert evidence["needed"]["test"], "fewer test pairs than the minimums: the report says how many more"
    assert gate["refusals"][:1] == ["not-enough-evidence"] and gate["passed"] is False
    assert gate["intervals"]["test"]["samples"] == 1000
    promoted = gate["promoted"]
    assert promoted is False, "auto_promote is on, but a refusal is not promoted"
    active = ok(http.get("/v1/models/active"), 200)
    assert active["id"] == base_id
    assert result["reindex_job_id"] is None
    return {"candidate": candidate, "promoted": promoted, "gate": gate, "active_id": active["id"]}


def check_dashboard(
    http: httpx.Client, seeded: Seeded, finetune: dict[str, Any], outcome: dict[str, Any]
) -> None:
    metrics = ok(http.get("/v1/metrics"), 200)
    kept = seeded.feedback()
    labels = Counter(str(pair.label) for pair in kept.values())
    assert metrics["feedback"]["total"] == len(kept)
    assert metrics["feedback"]["by_label"] == {"1": labels["1"], "0": labels["0"]}
    by_split = {split: count for split, count in metrics["feedback"]["by_split"].items() if count}
    assert by_split == dict(seeded.expected_feedback_splits())
    faces = len(seeded.face_ids)
    assert metrics["faces"]["total"] == faces
    assert metrics["faces"]["embedded_by_active_model"] == faces, (
        "one embedding per face for the active model"
    )
    assert metrics["active_model"]["id"] == outcome["active_id"]
    jobs = metrics["jobs"]["by_kind_status"]
    assert jobs["finetune"]["succeeded"] == 1
    assert jobs["validate_model"]["succeeded"] == 1
    assert jobs["reindex"]["succeeded"] == (2 if outcome["promoted"] else 1)
    assert metrics["jobs"]["by_status"]["running"] == metrics["jobs"]["by_status"]["queued"] == 0
    latest = metrics["latest_finetune"]
    assert (latest["job_id"], latest["status"]) == (finetune["id"], "succeeded")
    assert (latest["parent_model_id"], latest["new_model_id"]) == (
        seeded.base_model["id"],
        outcome["candidate"]["id"],
    )
    assert latest["promoted"] == outcome["promoted"]
    decided = metrics["latest_gate"]
    assert (decided["job_id"], decided["promoted"]) == (finetune["id"], outcome["promoted"])
    assert decided["refusals"] == outcome["gate"]["refusals"]
    assert decided["intervals"]["test"]["roc_auc"] == outcome["gate"]["intervals"]["test"]["roc_auc"]
    compared = latest["evaluations"]["test"]
    assert compared["candidate"]["pairs_sha256"] == compared["parent"]["pairs_sha256"]
    prometheus = http.get("/metrics")
    assert prometheus.status_code == 200 and prometheus.headers["content-type"].startswith("text/plain")


def run_feedback_loop(http: httpx.Client, seeded: Seeded, checkpoint: Path) -> dict[str, Any]:
    """From seeded faces and feedback to a judged (and maybe promoted) fine-tune; returns what happened."""
    seed_and_activate(http, seeded, checkpoint)
    finetune = start_finetune(http, QUICK_FINETUNE)
    trace = wait_for_success(http, finetune["id"])
    assert trace.saw_progress_while_running, "a frontend polling the job sees its progress"
    assert trace.job["attempts"] == 1
    assert trace.job["started_at"] and trace.job["finished_at"]
    outcome = check_finetune_outcome(http, seeded, trace.job)
    check_dashboard(http, seeded, trace.job, outcome)
    return {"job": trace.job, "polls": len(trace.polls), **outcome}
