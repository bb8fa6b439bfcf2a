"""Files that survive a crash whole or not at all, and the sha256 of a file.

Every file this service writes for later (blobs, checkpoints, pair files, embeddings, histories) goes through
:class:`DurableFile`: a temp file in the destination's directory (the same filesystem, so the rename is
atomic), written, flushed and fsynced, renamed over the destination, then the directory fsynced so the
rename itself is on disk. A reader sees the old file or the new one, never half; a write that fails leaves
no temp file behind. The bytes are hashed as they are written, so a writer knows its content address
without reading the file back. Torch-free and web-free: the api and the worker both use it.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import BinaryIO


def file_digest(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's content, as hex."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
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


class DurableFile:
    """A write-only binary file under a temporary name in ``directory``, hashed as it is written.

    ``commit(final)`` puts it on disk under its final name; ``discard()`` (or leaving the ``with`` block
    without a commit) removes it. Not seekable: writers that need to seek (zip) fall back to streaming.
    """

    def __init__(self, directory: Path, prefix: str = ".incoming-") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{prefix}{uuid.uuid4().hex}"
        self._file: BinaryIO | None = open(self.path, "xb")  # noqa: SIM115 - closed by finish/discard
        self._hash = hashlib.sha256()
        self.size = 0
        self._sha256: str | None = None
        self.committed = False

    def write(self, data: bytes) -> int:
        if self._file is None:
            raise RuntimeError("the file is already complete")
        self._hash.update(data)
        self.size += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def writable(self) -> bool:
        return True

    def finish(self) -> str:
        """Flush and fsync, close, and return the content's sha256; no more writes after this."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            self._sha256 = self._hash.hexdigest()
        if self._sha256 is None:
            raise RuntimeError("the file was discarded")
        return self._sha256

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            raise RuntimeError("finish() the file before reading its sha256")
        return self._sha256

    def commit(self, final: Path) -> str:
        """Rename the finished file to ``final`` (replacing it) and make that durable; returns the sha256."""
        sha = self.finish()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, final)
        self.committed = True
        fsync_directory(final.parent)
        return sha

    def discard(self) -> None:
        """Close and remove the temp file unless it was committed; safe to call more than once."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.committed:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.discard()


@contextmanager
def durable_write(path: str | os.PathLike[str]) -> Iterator[DurableFile]:
    """Write ``path`` whole or not at all: it takes the new content only when the block ends without error.

    After the block, the yielded file's ``sha256`` is the content's.
    """
    path = Path(path)
    with DurableFile(path.parent, prefix=f".{path.name}.") as temporary:
        yield temporary
        temporary.commit(path)
