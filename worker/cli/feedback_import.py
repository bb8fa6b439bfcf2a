"""`magtune import`: a feedback file of image paths, sent to a running api as faces and pairs of face ids.

Torch-free: it is a client, usable wherever the package is installed, and it loads neither torch nor the api.
The file is read by `worker.ml.pair_file`, the one reader `magtune finetune` uses too, so both refuse the same
rows. Paths stay on this machine: each image goes up as bytes under a neutral file name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.domain import FeedbackSplit
from worker.cli.api_client import ApiClient, ApiRefused
from worker.cli.output import CommandError
from worker.ml.pair_file import LabeledPair, PairFileError, read_pairs

MAX_LISTED_REJECTIONS = 20


def read_seed_pairs(path: Path) -> list[LabeledPair]:
    """All rows, or CommandError naming every bad row (nothing is sent when one row is wrong).

    The file is read by the same rule as ``magtune finetune`` and the other offline commands read it.
    """
    try:
        return read_pairs(path).pairs
    except PairFileError as exc:
        raise CommandError(str(exc)) from exc


def upload_faces(
    client: ApiClient, images: list[Path], *, source: str
) -> tuple[dict[Path, str], dict[str, int], list[str]]:
    """Each distinct image once; identical bytes under two paths come back as one face.

    An image the api refuses is reported and its pairs are skipped; the rest go on.
    """
    face_ids: dict[Path, str] = {}
    counts = {"created": 0, "existing": 0, "rejected": 0}
    rejections: list[str] = []
    for image in images:
        try:
            status, face = client.upload(
                "/v1/faces", image.read_bytes(), f"face{image.suffix.lower()}", {"source": source}
            )
        except ApiRefused as exc:
            counts["rejected"] += 1
            rejections.append(f"image {image}: {exc}")
            continue
        face_ids[image] = face["id"]
        counts["created" if status == 201 else "existing"] += 1
    return face_ids, counts, rejections


def post_pairs(
    client: ApiClient, items: list[dict[str, Any]], rows: list[int], *, chunk_size: int
) -> tuple[dict[str, int], list[str]]:
    """Batches of `chunk_size`; the api answers for each item, so one bad pair never sinks the rest.

    `cross` counts the stored pairs (created or existing) whose faces ended in different splits: labels that
    neither train nor evaluate.

    `rows` gives each item's row number in the input file, to name rejected pairs the way the user sees them.
    """
    counts = {"created": 0, "existing": 0, "rejected": 0, "cross": 0}
    rejections: list[str] = []
    for start in range(0, len(items), chunk_size):
        _status, reply = client.post_json("/v1/feedback/batch", {"items": items[start : start + chunk_size]})
        counts["created"] += reply["created"]
        counts["existing"] += reply["existing"]
        counts["rejected"] += reply["failed"]
        for outcome in reply["results"]:
            if outcome.get("split") == FeedbackSplit.CROSS:
                counts["cross"] += 1
            if outcome["status"] == "error":
                error = outcome.get("error") or {}
                what = " ".join(str(error[key]) for key in ("title", "detail") if error.get(key))
                rejections.append(f"row {rows[start + outcome['index']]}: {what}")
    return counts, rejections


def import_feedback(
    feedback_json: str | Path,
    *,
    api_url: str,
    regression: bool = False,
    source: str = "magtune import",
    annotator: str | None = None,
    chunk_size: int = 1000,
    timeout_s: float = 120.0,
    api_key: str | None = None,
) -> dict[str, Any]:
    if chunk_size < 1:
        raise CommandError("--chunk-size must be at least 1")
    path = Path(feedback_json)
    pairs = read_seed_pairs(path)
    images = sorted({image for pair in pairs for image in (pair.image1, pair.image2)})
    client = ApiClient(api_url, timeout_s, api_key)
    face_ids, face_counts, rejections = upload_faces(client, images, source=source)
    split = FeedbackSplit.REGRESSION if regression else None
    items: list[dict[str, Any]] = []
    rows: list[int] = []
    skipped = {"same_face": 0, "bad_image": 0}
    for row, pair in enumerate(pairs, start=1):
        face_a, face_b = face_ids.get(pair.image1), face_ids.get(pair.image2)
        if face_a is None or face_b is None:
            skipped["bad_image"] += 1
            continue
        if face_a == face_b:
            skipped["same_face"] += 1
            continue
        item: dict[str, Any] = {"face_a": face_a, "face_b": face_b, "label": pair.label, "source": source}
        if annotator:
            item["annotator"] = annotator
        if split:
            item["split"] = split
        items.append(item)
        rows.append(row)
    pair_counts, pair_rejections = post_pairs(client, items, rows, chunk_size=chunk_size)
    rejections += pair_rejections
    return {
        "input": str(path),
        "api": client.base_url,
        "rows": len(pairs),
        "images": len(images),
        "split": split,
        "faces": face_counts,
        "pairs": {**pair_counts, **skipped},
        "rejections": rejections[:MAX_LISTED_REJECTIONS],
    }
