"""Seeding bench/volume.py's database: faces and feedback pairs as the service stores them, by COPY.

Every face is a real, distinct 16×16 PNG in the blob store, its row what an upload writes (digest, size,
dimensions, the split its digest gives). Pairs are canonical (face_a < face_b), distinct, half of each label,
most of them between faces of one split (as placement makes them) and the rest `cross`; both spread over a
year. COPY fires the tally triggers like any insert; the faces with labels, which the api counts itself, are
counted once at the end (`recount_labelled_faces`), then the tables are vacuumed and analysed, as autovacuum
would have done by then.
"""

from __future__ import annotations

import hashlib
import io
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

SAME_SPLIT_SHARE = 0.9
YEAR = timedelta(days=365)
IMAGE_SIDE = 16


def tiny_png(rng: random.Random) -> bytes:
    from PIL import Image

    image = Image.frombytes("RGB", (IMAGE_SIDE, IMAGE_SIDE), rng.randbytes(IMAGE_SIDE * IMAGE_SIDE * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_faces(blob_root: Path, count: int, start: datetime) -> list[tuple[Any, ...]]:
    """`count` images written to the blob store; their faces' rows, oldest first."""
    from app.blobs import BlobStore
    from app.splits import split_for_digest

    store = BlobStore(blob_root)
    rng = random.Random(11)
    rows = []
    for index in range(count):
        data = tiny_png(rng)
        digest = hashlib.sha256(data).hexdigest()
        path = store.path("faces", digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        created_at = start + YEAR * index / count
        rows.append(
            (uuid.uuid4(), digest, len(data), "image/png", IMAGE_SIDE, IMAGE_SIDE, 3,
             split_for_digest(digest), f"subject-{index // 4}", "volume-seed", created_at)
        )  # fmt: skip
    return rows


def pair_rows(faces: list[tuple[Any, ...]], count: int, start: datetime) -> list[tuple[Any, ...]]:
    """`count` distinct canonical pairs over `faces`, oldest first."""
    from app.feedback.service import pair_split

    rng = random.Random(12)
    by_split: dict[str, list[int]] = {}
    for index, face in enumerate(faces):
        by_split.setdefault(face[7], []).append(index)
    groups = list(by_split.values())
    weights = [len(group) for group in groups]
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < count:
        if rng.random() < SAME_SPLIT_SHARE:
            (group,) = rng.choices(groups, weights)
            x, y = rng.choice(group), rng.choice(group)
        else:
            x, y = rng.randrange(len(faces)), rng.randrange(len(faces))
        key = (min(x, y), max(x, y))
        if x == y or key in seen:
            continue
        seen.add(key)
        a, b = sorted((faces[x], faces[y]), key=lambda face: face[0])
        created_at = start + YEAR * len(rows) / count
        rows.append(
            (uuid.uuid4(), a[0], b[0], len(rows) % 2, pair_split(None, a[7], b[7]), "volume-seed", created_at)
        )
    return rows


def seed(database_url: str, blob_root: Path, *, faces: int, pairs: int) -> dict[str, float]:
    """Faces and pairs written and analysed; the seconds each step took."""
    import psycopg
    from processes import libpq_url

    from app.db import session_scope
    from app.tallies import recount_labelled_faces

    start = datetime.now(UTC) - YEAR - timedelta(days=1)
    timings: dict[str, float] = {}
    began = time.perf_counter()
    face_rows = write_faces(blob_root, faces, start)
    timings["images_s"] = time.perf_counter() - began
    began = time.perf_counter()
    feedback_rows = pair_rows(face_rows, pairs, start + timedelta(hours=1))
    timings["pairs_drawn_s"] = time.perf_counter() - began
    began = time.perf_counter()
    with psycopg.connect(libpq_url(database_url)) as conn, conn.cursor() as cursor:
        columns = (
            "id, sha256, byte_size, media_type, width, height, channels, split, subject, source, created_at"
        )
        with cursor.copy(f"COPY faces ({columns}) FROM STDIN") as copy:
            for row in face_rows:
                copy.write_row(row)
        with cursor.copy(
            "COPY feedback (id, face_a, face_b, label, split, source, created_at) FROM STDIN"
        ) as copy:
            for row in feedback_rows:
                copy.write_row(row)
    timings["copy_s"] = time.perf_counter() - began
    began = time.perf_counter()
    with session_scope(database_url) as session:
        recount_labelled_faces(session)
    with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE faces")
        conn.execute("VACUUM ANALYZE feedback")
    timings["count_and_vacuum_s"] = time.perf_counter() - began
    return {name: round(value, 1) for name, value in timings.items()}
