"""Content-addressed blob store on a local directory: face images and model checkpoints.

A blob lives at `<root>/<namespace>/<sha[:2]>/<sha>`. Writes go to a temp file in the namespace's directory
(the same filesystem, so the final `os.replace` is atomic), are fsynced, and only then take their final name:
a reader never sees half a blob, and a write that fails or runs over its size limit leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import AsyncIterable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from anyio import to_thread

NAMESPACES = frozenset({"faces", "checkpoints"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".incoming-"


class BlobTooLarge(Exception):
    """The stream ran past `max_bytes`; nothing was kept."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"blob exceeds the limit of {max_bytes} bytes")
        self.max_bytes = max_bytes


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int
    path: Path


class StagedBlob:
    """A blob being received: bytes go to a temp file and are hashed as they arrive.

    `commit()` moves it to its content address; until then it can be inspected at `path`. Made by
    `BlobStore.staging()`, which removes the temp file unless it was committed.
    """

    def __init__(self, store: BlobStore, namespace: str, max_bytes: int | None) -> None:
        self._store = store
        self._namespace = namespace
        self._max_bytes = max_bytes
        directory = store.root / namespace
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        self._file: BinaryIO | None = open(self.path, "xb")  # noqa: SIM115 - closed by finish/discard
        self._hash = hashlib.sha256()
        self.size = 0
        self._sha256: str | None = None
        self.committed = False

    def write(self, chunk: bytes) -> None:
        if self._file is None:
            raise RuntimeError("the blob is already complete")
        self.size += len(chunk)
        if self._max_bytes is not None and self.size > self._max_bytes:
            raise BlobTooLarge(self._max_bytes)
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        """Flush to disk and return the content's sha256; no more writes after this."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._sha256 = self._hash.hexdigest()
        assert self._sha256 is not None
        return self._sha256

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            raise RuntimeError("finish() the blob before reading its sha256")
        return self._sha256

    def commit(self) -> StoredBlob:
        """Give the blob its content address; if that blob already exists the copy is simply dropped."""
        sha = self.finish()
        final = self._store.path(self._namespace, sha)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            self.path.unlink(missing_ok=True)
        else:
            os.replace(self.path, final)
            _fsync_directory(final.parent)
        self.committed = True
        return StoredBlob(sha256=sha, size=self.size, path=final)

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.committed:
            self.path.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path(self, namespace: str, sha256: str) -> Path:
        _check_namespace(namespace)
        if not _SHA256.fullmatch(sha256):
            raise ValueError(f"not a lower-case sha256: {sha256!r}")
        return self.root / namespace / sha256[:2] / sha256

    def exists(self, namespace: str, sha256: str) -> bool:
        return self.path(namespace, sha256).is_file()

    def open(self, namespace: str, sha256: str) -> BinaryIO:
        return self.path(namespace, sha256).open("rb")

    def delete(self, namespace: str, sha256: str) -> bool:
        """Remove a blob; False when it was not there."""
        try:
            self.path(namespace, sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    @contextmanager
    def staging(self, namespace: str, max_bytes: int | None = None) -> Iterator[StagedBlob]:
        """A blob to fill and inspect before committing; its temp file is gone on exit unless committed."""
        _check_namespace(namespace)
        staged = StagedBlob(self, namespace, max_bytes)
        try:
            yield staged
        finally:
            staged.discard()

    def write_stream(
        self, namespace: str, chunks: Iterable[bytes], max_bytes: int | None = None
    ) -> StoredBlob:
        """Store a stream of chunks atomically; `BlobTooLarge` past `max_bytes`, with nothing kept."""
        with self.staging(namespace, max_bytes) as staged:
            for chunk in chunks:
                staged.write(chunk)
            return staged.commit()

    async def write_async_stream(
        self, namespace: str, chunks: AsyncIterable[bytes], max_bytes: int | None = None
    ) -> StoredBlob:
        """`write_stream` for an async source (e.g. a request body); disk work runs off the event loop."""
        with self.staging(namespace, max_bytes) as staged:
            async for chunk in chunks:
                await to_thread.run_sync(staged.write, chunk)
            return await to_thread.run_sync(staged.commit)


def _check_namespace(namespace: str) -> None:
    if namespace not in NAMESPACES:
        raise ValueError(f"unknown blob namespace {namespace!r}; expected one of {sorted(NAMESPACES)}")


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
