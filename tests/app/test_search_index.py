"""EmbeddingIndex against brute-force numpy: exact top-k on both paths (float32 and the 8-bit first pass with
its provable re-rank), filters, best subjects, add/replace/remove, growth and concurrent use."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import pytest

from app.search import index as index_module
from app.search.index import EmbeddingIndex

pytestmark = pytest.mark.skipif(index_module.faiss is None, reason="faiss-cpu is not installed")


@pytest.fixture(params=["default", "narrow"])
def first_pass(request, monkeypatch) -> str:
    """The first pass as shipped, and one returning so few rows that the range search must complete it
    (and best_subjects must widen it)."""
    if request.param == "narrow":
        monkeypatch.setattr(index_module, "FIRST_PASS_MIN", 12)
        monkeypatch.setattr(index_module, "FIRST_PASS_PER_K", 1)
    return request.param


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def ids_for(n: int, offset: int = 0) -> list[uuid.UUID]:
    return [uuid.UUID(int=offset + i + 1) for i in range(n)]


def brute(x: np.ndarray, ids: list[uuid.UUID], q: np.ndarray, k: int, keep: np.ndarray | None = None):
    scores = x @ unit(q)
    rows = np.arange(len(x)) if keep is None else np.flatnonzero(keep)
    order = sorted(rows.tolist(), key=lambda r: (-float(scores[r]), ids[r]))[:k]
    return [(ids[r], float(scores[r])) for r in order], scores


def assert_same(got, expected, scores_by_id: dict[uuid.UUID, float]) -> None:
    """Same length, scores within 1e-6 position by position, and the same ids except where scores tie."""
    assert len(got) == len(expected)
    for (gid, gscore), (eid, escore) in zip(got, expected, strict=True):
        assert gscore == pytest.approx(escore, abs=1e-6)
        assert gscore == pytest.approx(scores_by_id[gid], abs=1e-6)
        if gid != eid:
            assert abs(scores_by_id[gid] - escore) <= 1e-6, "a different face where no scores tie"
    assert len({gid for gid, _ in got}) == len(got)
    assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)


def build(n=3000, d=64, *, quantize=True, seed=0, shards=2, subjects=None, sources=None):
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, d)))
    ids = ids_for(n)
    subjects = subjects if subjects is not None else [f"s{i % 37}" for i in range(n)]
    sources = sources if sources is not None else ["upload" if i % 4 else "import" for i in range(n)]
    index = EmbeddingIndex(d, capacity=16, quantize=quantize, quantize_min_rows=500, shards=shards)
    for start in range(0, n, 700):
        part = slice(start, start + 700)
        index.add(ids[part], x[part], subjects[part], sources[part])
    assert index.quantized is quantize
    return index, x, ids, subjects, sources, rng


def queries(rng, x, count):
    q = unit(rng.standard_normal((count, x.shape[1])))
    picks = rng.integers(0, len(x), count // 2)
    q[: count // 2] = unit(x[picks] + 0.3 * q[: count // 2])  # near a stored face
    return q


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_top_k_matches_brute_force(quantize, shards):
    index, x, ids, *_, rng = build(quantize=quantize, shards=shards)
    for i, q in enumerate(queries(rng, x, 40)):
        k = (1, 10, 100)[i % 3]
        expected, scores = brute(x, ids, q, k)
        assert_same(index.search(q, k), expected, dict(zip(ids, scores.tolist(), strict=True)))


def test_near_ties_stay_exact_through_the_first_pass(first_pass):
    """Clusters of faces closer to each other than the 8-bit error bound, so the first pass cannot separate
    them: the provable candidate set must still give the brute-force answer."""
    rng = np.random.default_rng(7)
    d = 128
    centres = unit(rng.standard_normal((30, d)))
    scale = rng.choice([1e-6, 1e-4, 1e-3, 1e-2], size=(3000, 1))
    x = unit(centres[rng.integers(0, 30, 3000)] + scale * rng.standard_normal((3000, d)))
    ids = ids_for(3000)
    index = EmbeddingIndex(d, quantize_min_rows=100, shards=2)
    index.add(ids, x)
    assert index.quantized
    lookup = None
    for i in range(60):
        q = unit(centres[i % 30] + (0.05 if i % 2 else 1e-5) * rng.standard_normal(d))
        k = (10, 50, 100)[i % 3]
        expected, scores = brute(x, ids, q, k)
        lookup = dict(zip(ids, scores.tolist(), strict=True))
        assert_same(index.search(q, k), expected, lookup)
    assert index.stats["first_pass"] == 60
    if first_pass == "narrow":
        assert index.stats["range_search"] > 0


def test_exactness_argument_on_random_data_with_duplicates(first_pass):
    """Exact duplicates and near-duplicates (ties and near-ties) under many random queries, several sizes."""
    rng = np.random.default_rng(11)
    for n, d in ((700, 32), (2500, 128), (1200, 512)):
        base = unit(rng.standard_normal((n // 2, d)))
        x = np.concatenate([base, unit(base + 1e-5 * rng.standard_normal(base.shape))])
        x[: n // 10] = x[n // 10 : 2 * (n // 10)]  # exact duplicates: equal scores, ordered by id
        ids = ids_for(len(x))
        index = EmbeddingIndex(d, quantize_min_rows=200, shards=2)
        index.add(ids, x)
        for q in queries(rng, x, 20):
            expected, scores = brute(x, ids, q, 10)
            got = index.search(q, 10)
            assert_same(got, expected, dict(zip(ids, scores.tolist(), strict=True)))
        if first_pass == "narrow":
            assert index.stats["range_search"] > 0


def test_exact_with_a_coarse_first_pass(monkeypatch, first_pass):
    """The exactness argument on its own: codes keeping only 4 of their 8 bits make the first pass's order
    plainly wrong (errors of about 0.1), yet the error bounds must still gather every true top-k row."""

    def coarse(self, x):
        return (self.index.sq.compute_codes(x) & 0xF0) | 0x08

    monkeypatch.setattr(index_module._Codes, "quantize", coarse)
    monkeypatch.setattr(index_module, "RETRAIN_FACTOR", 1e9)
    rng = np.random.default_rng(5)
    centres = unit(rng.standard_normal((20, 64)))
    x = unit(centres[rng.integers(0, 20, 4000)] + 0.15 * rng.standard_normal((4000, 64)))
    ids = ids_for(4000)
    subjects = [f"s{i % 300}" for i in range(4000)]
    index = EmbeddingIndex(64, quantize_min_rows=100, shards=2)
    index.add(ids, x, subjects)
    assert index._error_max > 0.05
    misordered = 0
    for i, q in enumerate(queries(rng, x, 30)):
        k = (1, 10, 50)[i % 3]
        expected, scores = brute(x, ids, q, k)
        assert_same(index.search(q, k), expected, dict(zip(ids, scores.tolist(), strict=True)))
        assert_same_subjects(index.best_subjects(q, k), brute_subjects(x, subjects, q, k))
        _, rows = index._codes.top(unit(q), k, index._codes.params)
        misordered += [ids[r] for r in rows] != [key for key, _ in expected]
    assert misordered > 10  # the first pass alone would have been wrong
    if first_pass == "narrow":
        assert index.stats["range_search"] > 0


def test_outliers_widen_the_quantiser_and_stay_exact():
    index, x, ids, *_, rng = build(n=2000, d=64)
    rebuilds = index.rebuilds
    spiky = np.zeros((5, 64), np.float32)
    spiky[np.arange(5), np.arange(5)] = 1.0  # far outside the range the codes were built for
    extra = ids_for(5, offset=10_000)
    index.add(extra, spiky)
    assert index.rebuilds == rebuilds + 1
    all_x, all_ids = np.concatenate([x, spiky]), ids + extra
    for q in [*queries(rng, x, 10), spiky[0], unit(spiky[1] + spiky[2])]:
        expected, scores = brute(all_x, all_ids, q, 10)
        assert_same(index.search(q, 10), expected, dict(zip(all_ids, scores.tolist(), strict=True)))


@pytest.mark.parametrize("quantize", [False, True])
def test_filters_by_subject_and_source(quantize, first_pass):
    index, x, ids, subjects, sources, rng = build(quantize=quantize)
    subj, src = np.array(subjects), np.array(sources)
    for q in queries(rng, x, 10):
        lookup = dict(zip(ids, (x @ unit(q)).tolist(), strict=True))
        for kwargs, keep in (
            ({"subject": "s5"}, subj == "s5"),
            ({"source": "upload"}, src == "upload"),  # 3/4 of the rows: the selector path when quantised
            ({"source": "import"}, src == "import"),
            ({"subject": "s5", "source": "import"}, (subj == "s5") & (src == "import")),
        ):
            expected, _ = brute(x, ids, q, 10, keep)
            assert_same(index.search(q, 10, **kwargs), expected, lookup)
    assert index.search(x[0], 10, subject="nobody") == []
    assert index.search(x[0], 10, source="nowhere") == []


@pytest.mark.parametrize("quantize", [False, True])
def test_exclude_leaves_out_ids(quantize):
    index, x, ids, *_ = build(quantize=quantize)
    got = index.search(x[3], 5, exclude=[ids[3], uuid.uuid4()])
    assert ids[3] not in [i for i, _ in got] and len(got) == 5
    expected, scores = brute(x, ids, x[3], 6)
    assert_same(got, expected[1:], dict(zip(ids, scores.tolist(), strict=True)))


def brute_subjects(x, subjects, q, k, keep=None):
    scores = x @ unit(q)
    best: dict[str, float] = {}
    for row, name in enumerate(subjects):
        if name is None or (keep is not None and not keep[row]):
            continue
        best[name] = max(best.get(name, -np.inf), float(scores[row]))
    return sorted(best.items(), key=lambda item: (-item[1], item[0]))[:k]


def assert_same_subjects(got, expected):
    assert len(got) == len(expected)
    exp = dict(expected)
    for (gname, gscore), (ename, escore) in zip(got, expected, strict=True):
        assert gscore == pytest.approx(escore, abs=1e-6)
        if gname != ename:
            assert abs(gscore - exp.get(gname, -9)) <= 1e-6 or abs(gscore - escore) <= 1e-6


@pytest.mark.parametrize("quantize", [False, True])
def test_best_subjects_over_the_whole_index(quantize, first_pass):
    n = 3000
    # a few huge subjects (one face's neighbours are mostly its own subject), many small ones, some unnamed
    subjects = [None if i % 50 == 0 else f"big{i % 3}" if i < 1500 else f"p{i % 400}" for i in range(n)]
    index, x, ids, subjects, sources, rng = build(n=n, quantize=quantize, subjects=subjects)
    src = np.array(sources)
    for i, q in enumerate(queries(rng, x, 16)):
        k = (1, 5, 20, None)[i % 4]
        expected = brute_subjects(x, subjects, q, k if k is not None else 10**9)
        assert_same_subjects(index.best_subjects(q, k), expected)
        assert_same_subjects(
            index.best_subjects(q, k, source="upload"),
            brute_subjects(x, subjects, q, k if k is not None else 10**9, src == "upload"),
        )
    # excluding a face takes its score out of its subject's best
    q = x[1601]
    assert index.best_subjects(q, 1) == [(subjects[1601], pytest.approx(1.0, abs=1e-6))]
    got = dict(index.best_subjects(q, None, exclude=[ids[1601]]))
    keep = np.ones(n, bool)
    keep[1601] = False
    expected = dict(brute_subjects(x, subjects, q, 10**9, keep))
    assert got[subjects[1601]] == pytest.approx(expected[subjects[1601]], abs=1e-6)
    assert got[subjects[1601]] < 0.99
    assert index.best_subjects(q, 5, source="nowhere") == []


def test_best_subjects_when_one_subject_crowds_the_first_pass(first_pass):
    """Every near neighbour belongs to one subject: the first pass must widen until k subjects appear."""
    rng = np.random.default_rng(3)
    d = 64
    centre = unit(rng.standard_normal(d))
    crowd = unit(centre + 0.05 * rng.standard_normal((2000, d)))
    others = unit(rng.standard_normal((2000, d)))
    x = np.concatenate([crowd, others])
    subjects = ["crowd"] * 2000 + [f"o{i}" for i in range(2000)]
    index = EmbeddingIndex(d, quantize_min_rows=100, shards=2)
    index.add(ids_for(4000), x, subjects)
    for k in (1, 5, 40):
        assert_same_subjects(index.best_subjects(centre, k), brute_subjects(x, subjects, centre, k))
    assert index.stats["widened"] > 0
    if first_pass == "narrow":
        assert index.stats["first_pass"] > index.stats["widened"]  # a widened first pass that sufficed


@pytest.mark.parametrize("quantize", [False, True])
def test_add_replace_remove(quantize):
    index, x, ids, subjects, sources, rng = build(n=1200, quantize=quantize)
    assert len(index) == 1200 and ids[5] in index and ids[5].bytes in index and str(ids[5]) in index
    assert uuid.uuid4() not in index and "not-an-id" not in index
    # replace: same id, new vector and labels; the row count stays
    new = unit(rng.standard_normal(64))
    index.add([ids[5]], new[None], ["someone"], ["camera"])
    assert len(index) == 1200
    np.testing.assert_array_equal(index.vector(ids[5]), new)
    assert index.labels(ids[5]) == ("someone", "camera")
    x = x.copy()
    x[5] = new
    subjects[5], sources[5] = "someone", "camera"
    assert index.search(new, 1)[0][0] == ids[5]
    assert index.search(new, 1, subject="someone")[0][0] == ids[5]
    # remove: some in the middle, the last one, an absent one; the last rows move into the holes
    gone = [ids[0], ids[5], ids[600], ids[-1]]
    assert index.remove([*gone, uuid.uuid4()]) == 4
    assert index.remove([ids[0]]) == 0
    assert len(index) == 1196 and all(g not in index for g in gone)
    with pytest.raises(KeyError):
        index.vector(ids[0])
    keep = np.array([i not in gone for i in ids])
    left_x, left_ids = x[keep], [i for i in ids if i not in gone]
    for q in [*queries(rng, x, 10), x[0], new]:
        expected, scores = brute(left_x, left_ids, q, 20)
        assert_same(index.search(q, 20), expected, dict(zip(left_ids, scores.tolist(), strict=True)))
    for key, row in zip(left_ids, left_x, strict=True):
        np.testing.assert_array_equal(index.vector(key), row)
    # a batch naming one id twice keeps the last
    twice = ids_for(1, offset=50_000)[0]
    index.add([twice, twice], np.stack([x[1], x[2]]), ["a", "b"])
    np.testing.assert_array_equal(index.vector(twice), x[2])
    assert index.labels(twice) == ("b", None)
    # removing everything, then adding again
    index.remove([*left_ids, twice])
    assert len(index) == 0 and index.search(x[1], 5) == []
    index.add(ids[:3], x[:3])
    assert [i for i, _ in index.search(x[2], 1)] == [ids[2]]


def test_growth_doubles_the_buffers_without_copying_per_add():
    index = EmbeddingIndex(16, capacity=4, quantize=False)
    rng = np.random.default_rng(0)
    buffers = []
    for i in range(100):
        index.add([uuid.UUID(int=i + 1)], unit(rng.standard_normal(16))[None])
        buffers.append(index._vectors)
    assert index.capacity == 128 and index.reallocations == 5  # 4 -> 8 -> 16 -> 32 -> 64 -> 128
    assert len({id(b) for b in buffers}) == 6  # the buffer changes only when it doubles
    index.add(ids_for(1000, offset=1000), unit(rng.standard_normal((1000, 16))))
    assert index.capacity == 2048 and index.reallocations == 6  # one batch: one reallocation
    assert index.nbytes >= index.capacity * 16 * 4


def test_empty_index_small_k_and_errors():
    index = EmbeddingIndex(8)
    q = unit(np.arange(1, 9, dtype=np.float32))
    assert index.search(q, 5) == [] and index.best_subjects(q, 5) == [] and len(index) == 0
    x = unit(np.random.default_rng(0).standard_normal((3, 8)))
    index.add(ids_for(3), x, ["a", None, "b"])
    got = index.search(q, 50)  # k larger than the index: everything, ranked
    assert [i for i, _ in got] == [ids_for(3)[r] for r in np.argsort(-(x @ q))]
    assert index.search(q, 0) == []
    assert [name for name, _ in index.best_subjects(q, 10)] == sorted(
        ["a", "b"], key=lambda s: -float(x[0 if s == "a" else 2] @ q)
    )
    scaled, plain = index.search(3 * q, 3), index.search(q, 3)  # queries are normalised
    assert [i for i, _ in scaled] == [i for i, _ in plain]
    assert [s for _, s in scaled] == pytest.approx([s for _, s in plain], abs=1e-6)
    with pytest.raises(ValueError):
        index.add(ids_for(1, offset=9), np.ones((1, 9), np.float32))  # d mismatch
    with pytest.raises(ValueError):
        index.add(ids_for(2, offset=9), np.ones((1, 8), np.float32))  # ids and vectors disagree
    with pytest.raises(ValueError):
        index.add(ids_for(1, offset=9), np.full((1, 8), np.nan, np.float32))
    with pytest.raises(ValueError):
        index.search(np.ones(9, np.float32), 3)
    with pytest.raises(ValueError):
        index.search(np.zeros(8, np.float32), 3)
    with pytest.raises(ValueError):
        index.search(q, -1)
    with pytest.raises(ValueError):
        index.add([b"short"], x[:1])
    with pytest.raises(ValueError):
        EmbeddingIndex(0)


@pytest.mark.parametrize("quantize", [False, True])
def test_concurrent_searches_never_see_a_partial_row(quantize):
    """Writers add, replace and remove rows whose components all have one magnitude (a row half-written
    would mix two); readers search and read vectors back and check every row they are shown."""
    d = 64
    index = EmbeddingIndex(d, quantize=quantize, quantize_min_rows=300, shards=2)

    def row_for(seed: int) -> np.ndarray:
        signs = np.where(np.random.default_rng(seed).random(d) < 0.5, -1.0, 1.0)
        return (signs / np.sqrt(d)).astype(np.float32)

    index.add(ids_for(400), np.stack([row_for(i) for i in range(400)]), [f"c{i % 7}" for i in range(400)])
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for round_ in range(30):
                fresh = ids_for(20, offset=10_000 + round_ * 20)
                index.add(fresh, np.stack([row_for(1000 + round_ * 20 + i) for i in range(20)]))
                index.add(ids_for(5), np.stack([row_for(5000 + round_ * 5 + i) for i in range(5)]))  # replace
                index.remove(fresh[::2])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    def reader(seed: int) -> None:
        local = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                q = unit(local.standard_normal(d))
                for key, score in index.search(q, 10):
                    try:
                        v = index.vector(key)
                    except KeyError:
                        continue  # removed since the search: fine
                    assert np.allclose(np.abs(v), 1 / np.sqrt(d)), "a partial row"
                    assert abs(score) <= 1.0 + 1e-6
                best = index.best_subjects(q, 3)
                assert len(best) == 3 and all(abs(score) <= 1.0 + 1e-6 for _, score in best)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=writer),
        *(threading.Thread(target=reader, args=(s,)) for s in range(3)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    assert len(index) == 400 + 30 * 10


def test_neighbours_of_many_faces_match_brute_force_without_the_face_itself():
    index, x, ids, *_ = build(n=1500, d=32)
    asked = [ids[3], ids[700], uuid.uuid4(), ids[1499]]

    found = index.neighbours_of(asked, 7)

    assert found[2] == []  # not in the index
    for face_id, got in zip(asked, found, strict=True):
        if face_id not in index:
            continue
        row = ids.index(face_id)
        keep = np.ones(len(ids), bool)
        keep[row] = False
        expected, scores = brute(x, ids, x[row], 7, keep)
        assert_same(got, expected, dict(zip(ids, scores.tolist(), strict=True)))
    assert index.neighbours_of(asked, 0) == [[], [], [], []]
