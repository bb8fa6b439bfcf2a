"""Content-addressed blob store on a local directory: face images and model checkpoints.

A blob lives at `<root>/<namespace>/<sha[:2]>/<sha>`. Writes go to a `app.durable.DurableFile` in the
namespace's directory (the same filesystem, so the final rename is atomic), are fsynced, and only then take
their final name: a reader never sees half a blob, and a write that fails or runs over its size limit leaves
nothing behind.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from anyio import to_thread

from app.durable import DurableFile

NAMESPACES = frozenset({"faces", "checkpoints"})
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TEMP_PREFIX = ".incoming-"


class StorageUnavailable(Exception):
    """The blob store cannot be written (read-only, full, no permission): the service's fault, not the
    client's, and nothing was kept. The api answers 503 `storage-unavailable`."""


@contextmanager
def _storage_errors(action: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StorageUnavailable(f"the blob store could not {action}: {exc.strerror or exc}") from exc


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
    """A blob being received: a durable temp file in the namespace's directory, hashed as bytes arrive.

    `commit()` moves it to its content address; until then it can be inspected at `path`. Made by
    `BlobStore.staging()`, which removes the temp file unless it was committed. It is a writable binary file
    object, so a serialiser (e.g. a checkpoint saver) can write straight into it.
    """

    def __init__(self, store: BlobStore, namespace: str, max_bytes: int | None) -> None:
        self._store = store
        self._namespace = namespace
        self._max_bytes = max_bytes
        with _storage_errors("create a file"):
            self._file = DurableFile(store.root / namespace, prefix=_TEMP_PREFIX)
        self.path = self._file.path
        self.committed = False

    @property
    def size(self) -> int:
        return self._file.size

    def write(self, chunk: bytes) -> int:
        if self._max_bytes is not None and self.size + len(chunk) > self._max_bytes:
            raise BlobTooLarge(self._max_bytes)
        with _storage_errors("write"):
            return self._file.write(chunk)

    def flush(self) -> None:
        self._file.flush()

    def writable(self) -> bool:
        return True

    def finish(self) -> str:
        """Flush to disk and return the content's sha256; no more writes after this."""
        with _storage_errors("write"):
            return self._file.finish()

    @property
    def sha256(self) -> str:
        return self._file.sha256

    def commit(self) -> StoredBlob:
        """Give the blob its content address; if that blob already exists the copy is simply dropped."""
        sha = self.finish()
        final = self._store.path(self._namespace, sha)
        if final.exists():
            self._file.discard()
        else:
            with _storage_errors("store a file"):
                self._file.commit(final)
        self.committed = True
        return StoredBlob(sha256=sha, size=self.size, path=final)

    def discard(self) -> None:
        self._file.discard()


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
