"""The shared johns faces as the job tests need them: images per person, pair labels by content."""

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path


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
            digests[relative] = hashlib.sha256((johns_dir / relative).read_bytes()).hexdigest()
        return digests[relative]

    rows = json.loads((johns_dir / "pairs.json").read_text())
    return {frozenset((digest(r["image1"]), digest(r["image2"]))): int(r["label"]) for r in rows}
