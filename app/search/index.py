"""An in-memory, exact top-k index over one model's face embeddings (cosine = dot product of unit vectors).

Layout. The rows live in one C-contiguous float32 matrix whose capacity doubles when full, so appends are
amortised O(1) and the first `len(index)` rows are always a plain view, beside per-row label codes (subject
and source as int32 codes into small name tables, -1 for none), the ids (a list of UUIDs and a dict from id
to row) and, once the index holds `quantize_min_rows` rows, an 8-bit copy of every row: faiss's uniform
scalar quantiser over [-vmax, vmax], kept in an IVF index whose S lists serve only as S shards (row g is
entry g // S of list g % S, with faiss id g), so that faiss scans one query with all its threads. Removing a
row moves the last row into its place; re-adding an id overwrites its row.

Exactness. Small indexes and small filtered subsets are scored in float32 directly. Otherwise a first pass
over the 8-bit codes gives approximate scores a_i = q·x̂_i. With e_i = ||x_i - x̂_i||, measured when the row is
encoded, and ||q|| = 1, Cauchy-Schwarz gives |q·x_i - q·x̂_i| <= e_i; a margin `slack` covers float32
rounding in both. Let `bound` be the k-th largest lower bound a_i - e_i - slack among the rows the first pass
returned: at least k rows score >= bound, so a row scoring below it is not in the top k. A row can score
>= bound only if a_i >= bound - e_max - slack (`floor`). The first pass's own top k' holds every such row
when its last score is below `floor`; otherwise a range search at `floor` collects them. The candidates are
then scored in float32 and ranked, so the answer is the brute-force one by construction, and the best score
per subject follows the same argument with `bound` taken over subjects.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

try:
    import faiss
except ImportError:  # pragma: no cover - without faiss every search takes the exact float32 path
    faiss = None

IdLike = uuid.UUID | bytes | str

QUANTIZE_MIN_VALUES = 2**23  # rows x dim below which a float32 scan is about as fast as the 8-bit first pass
FIRST_PASS_MIN = 512  # rows the first pass returns at least (k' = max(FIRST_PASS_MIN, FIRST_PASS_PER_K * k))
FIRST_PASS_PER_K = 16
GATHER_FRACTION = 8  # a filtered subset of at most 1/8 of the rows is gathered and scored in float32
FILTER_AFTER_FRACTION = (
    2  # a subset of at least 1/2 of the rows: scan all codes, then filter (else a selector)
)
RANGE_HEADROOM = 1.05  # the quantiser's range: the largest |component| at (re)build time, plus 5%
RETRAIN_FACTOR = 2.0  # re-encode everything once a clipped row's error exceeds twice an in-range row's worst
ENCODE_CHUNK = 65_536
SHARDS_PER_THREAD = 8


def as_uuid(value: IdLike) -> uuid.UUID:
    """An id as a UUID: a UUID, its 16 bytes, or its string form."""
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) == 16:
            return uuid.UUID(bytes=raw)
        raise ValueError(f"an id must be 16 bytes, not {len(raw)}")
    if isinstance(value, str):
        return uuid.UUID(value)
    raise TypeError(f"an id must be a UUID, 16 bytes or a UUID string, not {type(value).__name__}")


class _ReadWriteLock:
    """Many readers or one writer; a waiting writer holds off new readers so that adds are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True

    def release_write(self) -> None:
        with self._cond:
            self._writing = False
            self._cond.notify_all()


class _Labels:
    """Names (subjects or sources) as small int codes; None is -1. Codes are never reused."""

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.names: list[str] = []

    def encode(self, names: Sequence[str | None]) -> np.ndarray:
        out = np.empty(len(names), np.int32)
        for i, name in enumerate(names):
            if name is None:
                out[i] = -1
                continue
            code = self.codes.get(name)
            if code is None:
                code = self.codes[name] = len(self.names)
                self.names.append(name)
            out[i] = code
        return out

    def name(self, code: int) -> str | None:
        return None if code < 0 else self.names[code]


class _Codes:
    """The 8-bit copy of the rows: faiss's uniform scalar quantiser, rows sharded over the lists of an IVF
    index (row g is entry g // S of list g % S, with id g) that scans one query with all its threads."""

    def __init__(self, dim: int, shards: int, vmax: float) -> None:
        self.dim, self.shards, self.vmax = dim, shards, vmax
        self._coarse = faiss.IndexFlatIP(dim)  # every list is probed; its centroids never matter
        self._coarse.add(np.zeros((shards, dim), np.float32))
        index = faiss.IndexIVFScalarQuantizer(
            self._coarse,
            dim,
            shards,
            faiss.ScalarQuantizer.QT_8bit_uniform,
            faiss.METRIC_INNER_PRODUCT,
            False,
        )
        index.sq.train(np.array([[-vmax] * dim, [vmax] * dim], np.float32))
        index.is_trained = True
        index.nprobe = shards
        index.parallel_mode = 1  # one query: the lists are scanned in parallel
        self.index = index
        self.params = faiss.SearchParametersIVF(nprobe=shards)
        # The worst error of a row inside the range: half a quantisation step in every component.
        self.in_range_error = float(np.sqrt(dim) * vmax / 255.0)

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and per-row error bounds ||x - decode(code)||, slightly inflated for float32 rounding."""
        x = np.ascontiguousarray(x, np.float32)
        codes = np.empty((len(x), self.index.code_size), np.uint8)
        errors = np.empty(len(x), np.float32)
        for start in range(0, len(x), ENCODE_CHUNK):
            part = slice(start, start + ENCODE_CHUNK)
            codes[part] = self.quantize(x[part])
            diff = self.index.sq.decode(codes[part])
            diff -= x[part]
            errors[part] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
        errors *= np.float32(1.001)
        errors += np.float32(1e-7)
        return codes, errors

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return self.index.sq.compute_codes(x)

    def append(self, start: int, codes: np.ndarray) -> None:
        """Rows start, start + 1, ... in order (they go to the ends of their lists)."""
        count, lists = len(codes), self.shards
        for j in range(lists):
            first = (j - start) % lists
            if first >= count:
                continue
            chunk = np.ascontiguousarray(codes[first::lists])
            ids = np.arange(start + first, start + count, lists, dtype=np.int64)
            self.index.invlists.add_entries(j, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(chunk))
        self.index.ntotal += count

    def replace(self, row: int, code: np.ndarray) -> None:
        code = np.ascontiguousarray(code, np.uint8)
        self.index.invlists.update_entry(row % self.shards, row // self.shards, row, faiss.swig_ptr(code))

    def pop(self, last: int) -> None:
        """Drops row `last`, the last one."""
        self.index.invlists.resize(last % self.shards, last // self.shards)
        self.index.ntotal -= 1

    def selecting(self, mask: np.ndarray) -> tuple[Any, ...]:
        """Search parameters limited to the rows where mask is true (keep the tuple alive while searching)."""
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        return faiss.SearchParametersIVF(sel=selector, nprobe=self.shards), selector, bitmap

    def top(self, q: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Approximate scores (descending) and rows of the k best rows."""
        scores, rows = self.index.search(q[None], k, params=params)
        scores, rows = scores[0], rows[0]
        found = int(np.count_nonzero(rows >= 0))
        return scores[:found], rows[:found]

    def above(self, q: np.ndarray, floor: float, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Approximate scores and rows of every row whose approximate score exceeds floor (any order)."""
        _, scores, rows = self.index.range_search(q[None], float(floor), params=params)
        return scores, rows

    @property
    def nbytes(self) -> int:
        entries = sum(self.index.invlists.list_size(j) for j in range(self.shards))
        return entries * (self.index.code_size + 8)  # a code and a 64-bit id per row


def _kth_largest(values: np.ndarray, k: int) -> float:
    return float(np.partition(values, len(values) - k)[len(values) - k])


def _best(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, plus any that tie with the k-th (ranked later by id)."""
    m = len(scores)
    if k >= m:
        return np.arange(m)
    part = np.argpartition(scores, m - k)[m - k :]
    kth = scores[part].min()
    if np.count_nonzero(scores >= kth) > k:
        part = np.flatnonzero(scores >= kth)
    return part


class EmbeddingIndex:
    """Exact top-k cosine search over the unit embeddings of one model, with subject/source filters.

    Thread-safe: searches run concurrently; add and remove take the index to themselves, so a search never
    sees a half-written row. Vectors are stored as given (the service stores L2-normalised float32); queries
    are normalised. Ids are UUIDs (16 raw bytes and UUID strings are accepted)."""

    def __init__(
        self,
        dim: int,
        *,
        capacity: int = 1024,
        quantize: bool = True,
        quantize_min_rows: int | None = None,
        shards: int | None = None,
    ) -> None:
        if dim <= 0:
            raise ValueError("dim must be positive")
        self.dim = dim
        capacity = max(1, capacity)
        self._vectors = np.empty((capacity, dim), np.float32)
        self._errors = np.zeros(capacity, np.float32)
        self._subjects = np.empty(capacity, np.int32)
        self._sources = np.empty(capacity, np.int32)
        self._ids: list[uuid.UUID] = []
        self._rows: dict[uuid.UUID, int] = {}
        self._subject_labels = _Labels()
        self._source_labels = _Labels()
        self._n = 0
        # The 8-bit first pass (it needs faiss) starts once the index holds quantize_min_rows rows (by
        # default 2**23 values: 16,384 rows of 512 or 65,536 of 128); None keeps every search on float32.
        if quantize_min_rows is None:
            quantize_min_rows = -(-QUANTIZE_MIN_VALUES // dim)
        self._quantize_min_rows = quantize_min_rows if quantize and faiss is not None else None
        # Lists the 8-bit codes are sharded over: several per thread, so that faiss's dynamic schedule lets
        # one thread take over the work of another that the OS has descheduled (a busy shared machine).
        self._shards = shards or (SHARDS_PER_THREAD * max(1, faiss.omp_get_max_threads()) if faiss else 1)
        self._codes: _Codes | None = None
        self._error_max = 0.0  # >= every row's error bound (it only shrinks when the codes are rebuilt)
        self._slack = 4.0 * dim * 2.0**-24 + 1e-6  # float32 rounding in approximate and exact scores
        self._lock = _ReadWriteLock()
        # Counts for benchmarks and tests (not locked: approximate under concurrent searches).
        self.stats = {"first_pass": 0, "range_search": 0, "widened": 0}
        self.reallocations = 0  # times the buffers grew (each doubles them)
        self.rebuilds = 0  # times the 8-bit codes were (re)built from all rows

    # ---- reading --------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __contains__(self, face_id: object) -> bool:
        try:
            return as_uuid(face_id) in self._rows  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    @property
    def capacity(self) -> int:
        return len(self._vectors)

    @property
    def quantized(self) -> bool:
        """Whether searches over many rows take the 8-bit first pass."""
        return self._codes is not None

    @property
    def nbytes(self) -> int:
        """Bytes held: the buffers at their capacity, the id table (estimated) and the 8-bit codes."""
        buffers = self._vectors.nbytes + self._errors.nbytes + self._subjects.nbytes + self._sources.nbytes
        ids = self._n * (8 + 56 + 100)  # list slot, UUID object with its int, dict entry
        return buffers + ids + (self._codes.nbytes if self._codes is not None else 0)

    def ids(self) -> list[uuid.UUID]:
        """A copy of every id held, in row order (the review queue samples faces from it)."""
        self._lock.acquire_read()
        try:
            return list(self._ids)
        finally:
            self._lock.release_read()

    def neighbours_of(self, face_ids: Sequence[IdLike], k: int) -> list[list[tuple[uuid.UUID, float]]]:
        """For each stored face, its k nearest other faces (exact float32 scores, best first).

        One matrix product for all of them: many queries at once cost about one float32 scan of the rows
        (48 faces over 100k x 512 took 0.2 s where 48 single searches took 3.4 s on a busy 2-core machine).
        A face not in the index gets an empty list.
        """
        if k <= 0:
            return [[] for _ in face_ids]
        self._lock.acquire_read()
        try:
            n = self._n
            rows = [self._rows.get(as_uuid(face_id), -1) for face_id in face_ids]
            present = [row for row in rows if row >= 0]
            found: dict[int, list[tuple[uuid.UUID, float]]] = {}
            if present and n > 1:
                scores = self._vectors[present] @ self._vectors[:n].T
                scores[np.arange(len(present)), present] = -np.inf
                want = min(k, n - 1)
                top = np.argpartition(-scores, want - 1, axis=1)[:, :want]
                for i, row in enumerate(present):
                    ranked = sorted(
                        ((float(scores[i, j]), int(j)) for j in top[i]), key=lambda item: (-item[0], item[1])
                    )
                    found[row] = [(self._ids[j], score) for score, j in ranked]
            return [found.get(row, []) if row >= 0 else [] for row in rows]
        finally:
            self._lock.release_read()

    def vector(self, face_id: IdLike) -> np.ndarray:
        """A copy of the stored vector (KeyError when absent)."""
        key = as_uuid(face_id)
        self._lock.acquire_read()
        try:
            return self._vectors[self._rows[key]].copy()
        finally:
            self._lock.release_read()

    def labels(self, face_id: IdLike) -> tuple[str | None, str | None]:
        """(subject, source) of a face (KeyError when absent)."""
        key = as_uuid(face_id)
        self._lock.acquire_read()
        try:
            row = self._rows[key]
            return (
                self._subject_labels.name(int(self._subjects[row])),
                self._source_labels.name(int(self._sources[row])),
            )
        finally:
            self._lock.release_read()

    # ---- writing --------------------------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[IdLike],
        vectors: Any,
        subjects: Sequence[str | None] | None = None,
        sources: Sequence[str | None] | None = None,
    ) -> None:
        """Adds rows; an id already present has its row replaced (within a batch, the last one wins)."""
        keys = [as_uuid(i) for i in ids]
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim == 1 and len(keys) == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (n, {self.dim}), not {x.shape}")
        if x.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} ids for {x.shape[0]} vectors")
        if not np.isfinite(x).all():
            raise ValueError("vectors must be finite")
        subjects = [None] * len(keys) if subjects is None else list(subjects)
        sources = [None] * len(keys) if sources is None else list(sources)
        if len(subjects) != len(keys) or len(sources) != len(keys):
            raise ValueError("subjects and sources must have one entry per id")
        if not keys:
            return
        if len(set(keys)) != len(keys):
            last = {key: i for i, key in enumerate(keys)}
            keep = sorted(last.values())
            keys = [keys[i] for i in keep]
            x = x[keep]
            subjects = [subjects[i] for i in keep]
            sources = [sources[i] for i in keep]
        x = np.ascontiguousarray(x)
        self._lock.acquire_write()
        try:
            self._add_locked(keys, x, subjects, sources)
        finally:
            self._lock.release_write()

    def _add_locked(
        self, keys: list[uuid.UUID], x: np.ndarray, subjects: list[str | None], sources: list[str | None]
    ) -> None:
        subject_codes = self._subject_labels.encode(subjects)
        source_codes = self._source_labels.encode(sources)
        codes = errors = None
        if self._codes is not None:
            codes, errors = self._codes.encode(x)
        old = [i for i, key in enumerate(keys) if key in self._rows]
        if old:
            rows = np.array([self._rows[keys[i]] for i in old], np.int64)
            self._vectors[rows] = x[old]
            self._subjects[rows] = subject_codes[old]
            self._sources[rows] = source_codes[old]
            if self._codes is not None:
                self._errors[rows] = errors[old]
                for i, row in zip(old, rows.tolist(), strict=True):
                    self._codes.replace(row, codes[i])
        new = [i for i, key in enumerate(keys) if key not in self._rows] if old else list(range(len(keys)))
        if new:
            start, end = self._n, self._n + len(new)
            self._reserve(end)
            part = slice(start, end)
            if len(new) < len(keys):
                x, subject_codes, source_codes = x[new], subject_codes[new], source_codes[new]
            self._vectors[part], self._subjects[part], self._sources[part] = x, subject_codes, source_codes
            for row, i in enumerate(new, start):
                self._ids.append(keys[i])
                self._rows[keys[i]] = row
            if self._codes is not None:
                self._errors[part] = errors[new]
                self._codes.append(start, codes[new] if len(new) != len(keys) else codes)
            self._n = end
        if self._codes is not None:
            self._error_max = max(self._error_max, float(errors.max()))
            if self._error_max > RETRAIN_FACTOR * self._codes.in_range_error:
                self._build_codes()  # rows outside the quantiser's range: widen it
        elif self._quantize_min_rows is not None and self._n >= self._quantize_min_rows:
            self._build_codes()

    def _reserve(self, rows: int) -> None:
        capacity = len(self._vectors)
        if rows <= capacity:
            return
        while capacity < rows:
            capacity *= 2
        n = self._n
        for name in ("_vectors", "_errors", "_subjects", "_sources"):
            old = getattr(self, name)
            grown = np.empty((capacity, *old.shape[1:]), old.dtype)
            grown[:n] = old[:n]
            setattr(self, name, grown)
        self.reallocations += 1

    def _build_codes(self) -> None:
        n = self._n
        vectors = self._vectors[:n]
        vmax = float(np.abs(vectors).max()) * RANGE_HEADROOM if n else 1.0
        codes = _Codes(self.dim, self._shards, max(vmax, 1e-6))
        for start in range(0, n, ENCODE_CHUNK):
            part = slice(start, min(n, start + ENCODE_CHUNK))
            chunk_codes, self._errors[part] = codes.encode(vectors[part])
            codes.append(start, chunk_codes)
        self._codes = codes
        self._error_max = float(self._errors[:n].max()) if n else 0.0
        self.rebuilds += 1

    def remove(self, ids: Iterable[IdLike]) -> int:
        """Removes faces (absent ids are ignored); returns how many were removed. The last row moves into
        each hole, so removal costs O(1) rows whatever the size."""
        keys = [as_uuid(i) for i in ids]
        removed = 0
        self._lock.acquire_write()
        try:
            for key in keys:
                row = self._rows.pop(key, None)
                if row is None:
                    continue
                last = self._n - 1
                if row != last:
                    moved = self._ids[last]
                    self._vectors[row] = self._vectors[last]
                    self._errors[row] = self._errors[last]
                    self._subjects[row] = self._subjects[last]
                    self._sources[row] = self._sources[last]
                    self._ids[row] = moved
                    self._rows[moved] = row
                    if self._codes is not None:
                        code, _ = self._codes.encode(self._vectors[row : row + 1])
                        self._codes.replace(row, code[0])
                self._ids.pop()
                if self._codes is not None:
                    self._codes.pop(last)
                self._n = last
                removed += 1
        finally:
            self._lock.release_write()
        return removed

    # ---- searching ------------------------------------------------------------------------------------

    def _unit(self, query: Any) -> np.ndarray:
        q = np.asarray(query, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"the query has {q.shape[0]} dimensions, the index {self.dim}")
        norm = float(np.sqrt(np.dot(q, q, out=None)))
        if not np.isfinite(norm) or norm == 0.0:
            raise ValueError("the query must be a finite, non-zero vector")
        if abs(norm - 1.0) > 1e-5:
            q = q / np.float32(norm)
        return np.ascontiguousarray(q)

    def _mask(self, subject: str | None, source: str | None) -> np.ndarray | bool | None:
        """The rows passing the filters; None when there is no filter, False when nothing can pass."""
        mask = None
        n = self._n
        if subject is not None:
            code = self._subject_labels.codes.get(subject)
            if code is None:
                return False
            mask = self._subjects[:n] == code
        if source is not None:
            code = self._source_labels.codes.get(source)
            if code is None:
                return False
            mask = self._sources[:n] == code if mask is None else mask & (self._sources[:n] == code)
        return mask

    def search(
        self,
        query: Any,
        k: int = 10,
        *,
        subject: str | None = None,
        source: str | None = None,
        exclude: Iterable[IdLike] = (),
    ) -> list[tuple[uuid.UUID, float]]:
        """The k faces most similar to `query` (cosine), best first, as (id, score); equal scores are ordered
        by id. `subject`/`source` keep only faces with that label; `exclude` leaves out the given ids."""
        if k < 0:
            raise ValueError("k must not be negative")
        q = self._unit(query)
        skip_keys = {as_uuid(i) for i in exclude}
        if k == 0:
            return []
        self._lock.acquire_read()
        try:
            skip = {self._rows[key] for key in skip_keys if key in self._rows}
            want = k + len(skip)
            rows, scores = self._top(q, want, self._mask(subject, source))
            ids = self._ids
            ranked = sorted(
                zip(scores.tolist(), rows.tolist(), strict=True), key=lambda item: (-item[0], ids[item[1]])
            )
            return [(ids[row], score) for score, row in ranked if row not in skip][:k]
        finally:
            self._lock.release_read()

    def _top(self, q: np.ndarray, k: int, mask: np.ndarray | bool | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and float32 scores of the top k among the rows in mask (ties with the k-th included)."""
        n = self._n
        empty = np.empty(0, np.int64), np.empty(0, np.float32)
        if n == 0 or mask is False:
            return empty
        if mask is None:
            if self._codes is None:
                scores = self._vectors[:n] @ q
                best = _best(scores, k)
                return best, scores[best]
            return self._first_pass(q, k, None, n)
        count = int(np.count_nonzero(mask))
        if count == 0:
            return empty
        if self._codes is None or count * GATHER_FRACTION <= n:
            rows = np.flatnonzero(mask)
            scores = self._vectors[rows] @ q
            best = _best(scores, k)
            return rows[best], scores[best]
        return self._first_pass(q, k, mask, count)

    def _candidates(
        self, q: np.ndarray, kq: int, mask: np.ndarray | None, count: int, bound_of: Any, *, select: bool
    ) -> tuple[np.ndarray, bool]:
        """Rows (all in mask) that provably include every row of mask scoring >= bound_of(approx, rows), the
        bound taken over rows of mask the first pass returned; False when bound_of returned None (too few
        such rows). With `select` faiss skips the rows outside mask; without, the first pass scans every
        row and is filtered after (cheaper when most rows pass), returning about kq rows of mask."""
        assert self._codes is not None
        n = self._n
        held: tuple[Any, ...] = (self._codes.params,)
        after = mask is not None and count < n and not select
        if mask is not None and count < n and select:
            held = self._codes.selecting(mask)
        wanted = min(n, -(-kq * n // count)) if after else min(kq, count)
        approx, rows = self._codes.top(q, wanted, held[0])
        self.stats["first_pass"] += 1
        last = approx[-1] if len(approx) else -np.inf  # no row left out scores above it, approximately
        if after:
            keep = mask[rows]
            approx, rows = approx[keep], rows[keep]
            if len(rows) >= count:
                return rows, True
        elif len(rows) >= count:
            return rows, True  # every row of mask came back
        bound = bound_of(approx, rows)
        if bound is None:
            return rows, False
        floor = bound - self._error_max - self._slack
        if last >= floor:  # rows not returned may still reach the bound: take all above floor
            _, rows = self._codes.above(q, floor - self._slack, held[0])
            if after:
                rows = rows[mask[rows]]
            self.stats["range_search"] += 1
        return rows, True

    def _first_pass(
        self, q: np.ndarray, k: int, mask: np.ndarray | None, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._codes is not None
        kq = max(FIRST_PASS_MIN, FIRST_PASS_PER_K * k)
        errors, slack = self._errors, self._slack

        def bound_of(approx: np.ndarray, rows: np.ndarray) -> float | None:
            return _kth_largest(approx - errors[rows] - slack, k) if len(rows) >= k else None

        select = mask is not None and count * FILTER_AFTER_FRACTION < self._n
        rows, done = self._candidates(q, kq, mask, count, bound_of, select=select)
        if not done:  # filtering after the first pass left fewer than k rows: let faiss skip the others
            self.stats["widened"] += 1
            rows, _ = self._candidates(q, kq, mask, count, bound_of, select=True)
        scores = self._vectors[rows] @ q
        best = _best(scores, k)
        return rows[best], scores[best]

    def best_subjects(
        self, query: Any, k: int | None = 10, *, source: str | None = None, exclude: Iterable[IdLike] = ()
    ) -> list[tuple[str, float]]:
        """The subjects whose best face is most similar to `query`, as (subject, best score), best first,
        over the whole index (every face with a subject, after the filters), equal scores by name; k=None
        gives every subject."""
        if k is not None and k < 0:
            raise ValueError("k must not be negative")
        q = self._unit(query)
        skip_keys = {as_uuid(i) for i in exclude}
        if k == 0:
            return []
        self._lock.acquire_read()
        try:
            n = self._n
            if n == 0:
                return []
            mask = self._subjects[:n] >= 0
            if source is not None:
                code = self._source_labels.codes.get(source)
                if code is None:
                    return []
                mask &= self._sources[:n] == code
            for key in skip_keys:
                row = self._rows.get(key)
                if row is not None:
                    mask[row] = False
            count = int(np.count_nonzero(mask))
            if count == 0:
                return []
            rows = self._subject_candidates(q, k, mask, count)
            if rows is None:
                if count == n:
                    scores, rows = self._vectors[:n] @ q, np.arange(n)
                else:
                    rows = np.flatnonzero(mask)
                    scores = self._vectors[rows] @ q
            else:
                scores = self._vectors[rows] @ q
            return self._group(rows, scores, k)
        finally:
            self._lock.release_read()

    def _subject_candidates(self, q: np.ndarray, k: int | None, mask: np.ndarray, count: int) -> Any:
        """Rows holding the best face of each of the top k subjects, or None to score every row in mask."""
        if k is None or self._codes is None or count * GATHER_FRACTION <= self._n:
            return None
        select = count * FILTER_AFTER_FRACTION < self._n
        errors, subjects, slack = self._errors, self._subjects, self._slack

        def bound_of(approx: np.ndarray, rows: np.ndarray) -> float | None:
            # The k-th best, over subjects, of each subject's best lower bound.
            codes, where = np.unique(subjects[rows], return_inverse=True)
            if len(codes) < k:
                return None
            best = np.full(len(codes), -np.inf, np.float32)
            np.maximum.at(best, where, approx - errors[rows] - slack)
            return _kth_largest(best, k)

        kq = max(FIRST_PASS_MIN, FIRST_PASS_PER_K * k)
        while True:
            rows, done = self._candidates(q, kq, mask, count, bound_of, select=select)
            if done:
                return rows
            kq *= 4  # too few distinct subjects among the first pass's rows
            self.stats["widened"] += 1
            if kq * GATHER_FRACTION > count:
                return None

    def _group(self, rows: np.ndarray, scores: np.ndarray, k: int | None) -> list[tuple[str, float]]:
        codes, where = np.unique(self._subjects[rows], return_inverse=True)
        best = np.full(len(codes), -np.inf, np.float32)
        np.maximum.at(best, where, scores)
        if k is not None and k < len(codes):
            keep = _best(best, k)
            codes, best = codes[keep], best[keep]
        names = self._subject_labels.names
        ranked = sorted(
            zip(best.tolist(), codes.tolist(), strict=True), key=lambda item: (-item[0], names[item[1]])
        )
        return [(names[code], score) for score, code in ranked][:k]
