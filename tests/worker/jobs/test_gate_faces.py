"""The promotion gate on real checkpoints and the real CMU faces (20 people, head poses and sunglasses, on
which the shared MobileFaceNet scores AUC ≈ 0.72): a damaged model is refused on the bootstrap bound, and a
fine-tune that really improves on faces it never trained on is promoted by the finetune job."""

import hashlib
import itertools
import random
import uuid
from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.evidence import EvidenceCounts, EvidenceMinimums, evidence_report
from app.splits import split_for_digest
from app.tables import Activation, Face, Job
from tests.conftest import require
from tests.worker.factories import add_face, add_job, add_pair, add_ready_base, get_job, run_in_process
from worker.jobs import gate
from worker.ml.bootstrap import BootstrapConfig
from worker.ml.checkpoints import load_backbone, save_checkpoint
from worker.ml.evaluation import ModelUnderTest, compare_models
from worker.ml.pairs import LabeledPair, index_pairs
from worker.ml.preprocessing import ImageCache, preprocess_spec_for

pytestmark = pytest.mark.slow

SPEC = preprocess_spec_for("mobilefacenet")
# More faces in val and test than the default 70/15/15, so that 12 images a person give the gate well over
# its 20 same and 20 different test pairs while training stays short.
FRACTIONS = {"train": 0.5, "val": 0.2, "test": 0.3}
PER_PERSON = 12
SHUFFLED_LAYER = "features.7.conv.2.weight"


@pytest.fixture(scope="module")
def cmu_faces(shared_dir: Path) -> dict[str, list[Path]]:
    folder = shared_dir / "data" / "faces" / "cmu" / "aligned_112"
    require(folder.is_dir(), f"CMU faces not found at {folder}")
    people = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return {person: sorted((folder / person).glob("*.png"))[:PER_PERSON] for person in people}


def _split(path: Path) -> str:
    return split_for_digest(hashlib.sha256(path.read_bytes()).hexdigest(), FRACTIONS)


def _pairs(items: list[tuple[str, Path]]) -> list[LabeledPair]:
    return [LabeledPair(a, b, int(pa == pb)) for (pa, a), (pb, b) in itertools.combinations(items, 2)]


def test_a_candidate_with_a_shuffled_layer_is_refused_on_the_bootstrap_bound(
    cmu_faces: dict[str, list[Path]], mobilefacenet_checkpoint: Path, tmp_path: Path
) -> None:
    test_faces = [(person, p) for person, paths in cmu_faces.items() for p in paths if _split(p) == "test"]
    pairs = index_pairs(_pairs(test_faces), ImageCache())
    parent = load_backbone(mobilefacenet_checkpoint).model
    damaged = load_backbone(mobilefacenet_checkpoint).model
    weights = dict(damaged.named_parameters())[SHUFFLED_LAYER]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        flat = weights.data.reshape(-1)
        weights.data.copy_(flat[torch.randperm(flat.numel(), generator=generator)].reshape(weights.shape))
    path = tmp_path / "shuffled.pth"
    save_checkpoint(path, damaged, arch="mobilefacenet", epoch=1, metadata={})
    candidate = load_backbone(path, "mobilefacenet").model  # the checkpoint as the registry would load it

    compared = compare_models(
        ModelUnderTest(parent, SPEC, None),
        ModelUnderTest(candidate, SPEC, None),
        pairs,
        bootstrap=BootstrapConfig(samples=1000, seed=0),
    )
    labels = compared["candidate"]["counts"]
    evidence = evidence_report(
        EvidenceCounts(test_same=labels["positives"], test_different=labels["negatives"]),
        EvidenceMinimums(test_same=20, test_different=20, regression_pairs=20),
    )
    decision = gate.decide(
        (compared["baseline"], compared["candidate"]),
        None,
        evidence=evidence,
        intervals={"test": compared["intervals"]},
        test_auc_tolerance=0.002,
        regression_auc_tolerance=0.002,
        best_epoch=1,
    )
    auc = compared["intervals"]["roc_auc"]
    print({"pairs": labels, "auc_difference": auc})
    assert evidence["needed"] == {}, "enough pairs: the refusal is about the model, not the evidence"
    assert auc["low"] < -0.002 and auc["low"] <= auc["estimate"] <= auc["high"]
    failing = [check.name for check in decision.checks if not check.passed]
    assert "test_auc_lower_bound" in failing and not decision.passed


def test_the_finetune_job_promotes_a_real_improvement_on_faces_it_never_trained_on(
    settings: Settings,
    cmu_faces: dict[str, list[Path]],
    mobilefacenet_checkpoint: Path,
    sent_jobs: list[tuple[uuid.UUID, str]],
) -> None:
    settings = settings.model_copy(update={"split_fractions": FRACTIONS})
    store = BlobStore(settings.blob_dir)
    rng = random.Random(0)
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, mobilefacenet_checkpoint)
        session.add(Activation(model_id=base.id, actor="test", reason="base"))
        faces: dict[str, list[tuple[str, Face]]] = {"train": [], "val": [], "test": []}
        for person, paths in cmu_faces.items():
            for path in paths:
                face = add_face(session, store, path.read_bytes(), settings, subject=person)
                faces[face.split].append((person, face))
        for split, members in faces.items():
            pairs = [(a, b, int(pa == pb)) for (pa, a), (pb, b) in itertools.combinations(members, 2)]
            if split == "train":  # a short fine-tune: a subset of same and of different pairs
                same = [p for p in pairs if p[2]]
                different = [p for p in pairs if not p[2]]
                pairs = rng.sample(same, min(160, len(same))) + rng.sample(different, 160)
            for a, b, label in pairs:
                add_pair(session, a, b, label)
        params = {
            "base_model": str(base.id),
            "epochs": 2,
            "learning_rate": 3e-4,
            "batch_size": 16,
            "margin": 1.4,
            "distill_weight": 1.0,
            "freeze_stem": True,
            "seed": 0,
            "patience": 2,
            "auto_promote": True,
        }
        job = add_job(session, "finetune", params)
        trained = {face.id for _, face in faces["train"]}
        tested = {face.id for _, face in faces["test"]}

    outcome = run_in_process(settings, job.id)

    assert outcome.status == "succeeded", outcome.error
    with session_scope(settings.database_url) as session:
        result = get_job(session, job.id).result
        decision = result["gate"]
        print({"gate": decision["reasons"], "intervals": decision["intervals"]["test"]})
        assert not trained & tested, "the test faces were never trained on"
        assert result["evidence_report"]["needed"] == {}
        counts = result["evidence_report"]["counts"]
        assert counts["test_same"] == result["dataset_snapshot"]["pairs"]["test"]["same"] >= 20
        test = decision["test"]
        assert test["candidate"]["roc_auc"] > test["parent"]["roc_auc"]
        assert decision["intervals"]["test"]["roc_auc"]["low"] >= -settings.gate_auc_tolerance
        assert decision["passed"] and decision["promoted"], decision["reasons"]
        active = session.scalars(select(Activation).order_by(Activation.created_at.desc()).limit(1)).one()
        assert str(active.model_id) == result["model_id"] and active.previous_model_id == base.id
        reindex = session.get(Job, uuid.UUID(result["reindex_job_id"]))
        assert reindex is not None and (reindex.id, "reindex") in sent_jobs
