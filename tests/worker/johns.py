"""The shared johns faces as the job tests need them: images per person, pair labels by content, and a
feedback world built from them."""

import hashlib
import itertools
import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from app.blobs import BlobStore
from app.config import Settings
from app.db import session_scope
from app.durable import file_digest
from app.splits import split_for_digest
from app.tables import Activation, Face
from tests.worker.factories import add_face, add_pair, add_ready_base

TRAINED_PEOPLE = ("John_Salley", "John_Schneider", "John_Simm")
REGRESSION_PEOPLE = ("John_Savage", "John_Shimkus")


def johns_images(
    johns_dir: Path, people: Iterable[str] | None = None, per_person: int | None = None
) -> dict[str, list[Path]]:
    folder = johns_dir / "aligned_112"
    names = sorted(people) if people is not None else sorted(p.name for p in folder.iterdir() if p.is_dir())
    return {name: sorted((folder / name).glob("*.png"))[:per_person] for name in names}


def johns_labels(johns_dir: Path) -> dict[frozenset[str], int]:
    """Label of each pair in the shared pairs file, keyed by the two images' sha256."""
    digests: dict[str, str] = {}

    def digest(relative: str) -> str:
        if relative not in digests:
            digests[relative] = file_digest(johns_dir / relative)
        return digests[relative]

    rows = json.loads((johns_dir / "pairs.json").read_text())
    return {frozenset((digest(r["image1"]), digest(r["image2"]))): int(r["label"]) for r in rows}


@dataclass
class Johns:
    """Faces of three people fed back for training, and of two others forming the regression set."""

    base_id: uuid.UUID
    faces: dict[uuid.UUID, str] = field(default_factory=dict)  # face id → person
    regression_faces: set[uuid.UUID] = field(default_factory=set)


def add_johns(
    settings: Settings,
    store: BlobStore,
    johns_dir: Path,
    checkpoint: Path,
    *,
    regression_per_person: int = 6,
    train_per_person: int = 4,
) -> Johns:
    """Upload the faces, post every labelled pair among them (the regression people's pairs as regression),
    register and activate the base model. Every val and test face of the trained people is kept; their train
    faces are capped at `train_per_person` so that a fine-tune stays short."""
    labels = johns_labels(johns_dir)
    images = johns_images(johns_dir, TRAINED_PEOPLE) | johns_images(
        johns_dir, REGRESSION_PEOPLE, per_person=regression_per_person
    )
    with session_scope(settings.database_url) as session:
        base = add_ready_base(session, store, checkpoint)
        session.add(Activation(model_id=base.id, actor="test", reason="base"))
        world = Johns(base_id=base.id)
        faces: list[Face] = []
        seen: set[str] = set()
        for person, paths in images.items():
            trained = 0
            for path in paths:
                data = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    continue  # the same photo twice (johns has one): the api keeps one face for it
                if person in TRAINED_PEOPLE and split_for_digest(digest, settings.split_fractions) == "train":
                    if trained == train_per_person:
                        continue
                    trained += 1
                face = add_face(session, store, data, settings, subject=person)
                seen.add(face.sha256)
                faces.append(face)
                world.faces[face.id] = person
                if person in REGRESSION_PEOPLE:
                    world.regression_faces.add(face.id)
        for a, b in itertools.combinations(faces, 2):
            label = labels[frozenset((a.sha256, b.sha256))]
            both_regression = a.id in world.regression_faces and b.id in world.regression_faces
            add_pair(session, a, b, label, "regression" if both_regression else None)
    return world
