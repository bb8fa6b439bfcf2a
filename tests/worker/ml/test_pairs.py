import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.ml.pairs import (
    IndexedPairs,
    LabeledPair,
    PairFileError,
    index_pairs,
    read_pairs,
    write_pairs,
)
from worker.ml.preprocessing import ImageCache


@pytest.fixture(scope="module")
def johns_pairs(johns_dir: Path) -> list[LabeledPair]:
    return read_pairs(johns_dir / "pairs.json").pairs


@pytest.fixture()
def faces_dir(tmp_path: Path, johns_dir: Path) -> Path:
    """A folder with two real faces, a.png and sub/b.png."""
    faces = sorted((johns_dir / "aligned_112").glob("*/*.png"))[:2]
    (tmp_path / "sub").mkdir()
    shutil.copy(faces[0], tmp_path / "a.png")
    shutil.copy(faces[1], tmp_path / "sub" / "b.png")
    return tmp_path


def _write_rows(path: Path, rows: object) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_johns_pairs_are_read_with_paths_relative_to_the_file(
    johns_dir: Path, johns_pairs: list[LabeledPair]
) -> None:
    assert len(johns_pairs) == 1485
    assert sum(p.label == 1 for p in johns_pairs) == 275
    assert sum(p.label == 0 for p in johns_pairs) == 1210
    images = {image for pair in johns_pairs for image in (pair.image1, pair.image2)}
    assert len(images) == 55
    assert all(image.is_absolute() and image.is_file() for image in images)
    raw = json.loads((johns_dir / "pairs.json").read_text())
    assert johns_pairs[0].image1 == (johns_dir / raw[0]["image1"]).resolve()
    assert read_pairs(johns_dir / "pairs.json").problems == []


def test_bad_rows_are_reported_with_their_row_numbers(faces_dir: Path) -> None:
    rows = [
        {"image1": "a.png", "image2": "sub/b.png", "label": 1},
        {"image1": "a.png", "image2": "missing.png", "label": 0},
        {"image1": "a.png", "image2": "sub/b.png", "label": 2},
        {"image1": "a.png", "image2": "sub/b.png", "label": True},
        {"image1": "a.png", "image2": "sub/b.png", "label": "1"},
        {"image1": "a.png", "image2": "sub/../a.png", "label": 1},
        {"image1": "a.png", "label": 0},
        ["a.png", "sub/b.png", 1],
        {"image1": 3, "image2": "sub/b.png", "label": 0},
        {"image1": str(faces_dir / "sub" / "b.png"), "image2": "a.png", "label": 0, "annotator": "x"},
    ]
    path = _write_rows(faces_dir / "pairs.json", rows)

    with pytest.raises(PairFileError) as raised:
        read_pairs(path)
    bad_rows = [2, 3, 4, 5, 6, 7, 8, 9]
    assert [p.row for p in raised.value.problems] == bad_rows
    assert "rows 2, 3, 4, 5, 6, 7, 8, 9" in str(raised.value)
    assert str(path) in str(raised.value)

    result = read_pairs(path, on_bad_row="skip")
    assert [p.row for p in result.problems] == bad_rows
    messages = {p.row: p.message for p in result.problems}
    assert "missing.png" in messages[2] and "not found" in messages[2]
    assert "same file" in messages[6]
    assert "label" in messages[3] and messages[7] == "missing image2"
    a, b = (faces_dir / "a.png").resolve(), (faces_dir / "sub" / "b.png").resolve()
    assert result.pairs == [LabeledPair(a, b, 1), LabeledPair(b, a, 0)]


@pytest.mark.parametrize("content", ['{"image1": "a.png"}', "[{", "", '"pairs"', "null"])
def test_a_file_that_is_not_a_list_of_pairs_is_refused(faces_dir: Path, content: str) -> None:
    path = faces_dir / "pairs.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PairFileError, match=r"pairs\.json") as raised:
        read_pairs(path, on_bad_row="skip")
    assert raised.value.problems == []


def test_a_missing_pairs_file_is_a_pair_file_error(tmp_path: Path) -> None:
    with pytest.raises(PairFileError, match=r"nowhere\.json"):
        read_pairs(tmp_path / "nowhere.json")


def test_unknown_bad_row_policy_is_rejected(johns_dir: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_row"):
        read_pairs(johns_dir / "pairs.json", on_bad_row="ignore")


def test_written_pairs_use_relative_paths_and_read_back_equal(
    tmp_path: Path, johns_pairs: list[LabeledPair]
) -> None:
    out = tmp_path / "exports" / "pairs.json"
    out.parent.mkdir()
    write_pairs(out, johns_pairs[:40])
    rows = json.loads(out.read_text())
    assert all(not row[key].startswith("/") for row in rows for key in ("image1", "image2"))
    assert [row["label"] for row in rows] == [p.label for p in johns_pairs[:40]]
    assert read_pairs(out).pairs == johns_pairs[:40]


def test_index_pairs_stores_each_distinct_image_once(johns_pairs: list[LabeledPair]) -> None:
    cache = ImageCache()
    indexed = index_pairs(johns_pairs, cache)
    assert indexed.pixels.shape == (55, 3, 112, 112) and indexed.pixels.dtype == torch.uint8
    assert len(indexed) == 1485 and indexed.image_count == 55 == len(cache)
    assert indexed.first.dtype == torch.int64 and indexed.labels.dtype == torch.float32
    assert int(indexed.labels.sum()) == 275
    assert cache.resized_count == 0
    for i in (0, 100, 1484):
        pair = johns_pairs[i]
        assert indexed.names[indexed.first[i]] == str(pair.image1)
        assert indexed.names[indexed.second[i]] == str(pair.image2)
        assert torch.equal(indexed.pixels[indexed.first[i]], cache.get(pair.image1))
        assert indexed.labels[i] == pair.label


def test_index_pairs_of_nothing_is_empty() -> None:
    indexed = index_pairs([], ImageCache())
    assert indexed.pixels.shape == (0, 3, 112, 112) and len(indexed) == 0


def test_indexed_pairs_from_arrays_checks_its_inputs() -> None:
    pixels = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    built = IndexedPairs.from_arrays(pixels, [0, 1], [1, 0], [1, 0], ["x", "y"])
    assert built.first.tolist() == [0, 1] and built.labels.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="index"):
        IndexedPairs.from_arrays(pixels, [0, 2], [1, 0], [1, 0], ["x", "y"])
    with pytest.raises(ValueError, match="labels"):
        IndexedPairs.from_arrays(pixels, [0, 1], [1, 0], [1, 2], ["x", "y"])
    with pytest.raises(ValueError, match="names"):
        IndexedPairs.from_arrays(pixels, [0, 1], [1, 0], [1, 0], ["x"])
    with pytest.raises(ValueError, match="uint8"):
        IndexedPairs.from_arrays(pixels.astype(np.float32), [0, 1], [1, 0], [1, 0], ["x", "y"])
